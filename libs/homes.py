"""Which home a bus message is about, for those who may see only their homes' messages: the
gateway's replay, SSE and WebSocket for residents and installers, the webhooks of a home.

A subject names the object it is about:

    events.<device>.<type>, commands.<device>, system.device.<device>.<fact>  → a device
    system.rule.<rule>.<fact>, system.alert.<rule>                          → a rule
    system.notify.<addressee>, system.subscription.<addressee>.changed     → an addressee
    system.location.<location>                                              → a location

An addressee is what a rule's `notify` action may name: a webhook subscription or a
notification channel (one id space; the webhooks service delivers both).

`HomeIndex` holds each object's home in memory: a device's is the first segment of its
location, a rule's and an addressee's the one they belong to, a location's the home it is in.
Classifying a message is one split of its subject and one dict lookup (`home`): no I/O,
whatever the number of homes, objects or followers, and a live feed does it once per message
for all its followers. A message about no home (a dead letter, a user's or an API key's
change, a device without a location, an object the index does not know) is for
administrators only, who skip the classification entirely.

The index is read from the database (`reload`) and kept current by the facts that change it,
on core NATS as they are published (`start`): registry facts (`system.device.*.registry`)
and the change facts of rules, addressees and locations. An object deleted keeps its home
until the next reload, so that the fact of its deletion, and what was on its way, still reach
its home. The owner reloads now and then (`keep_current`, or `refresh_if_stale` per use) to
heal what a lost connection missed; between reloads an object the index has not heard of
yet is hidden (never shown to the wrong home) by `home`; a reader that can wait asks
`home_of_message` instead (the gateway's live feeds and replay; the webhooks `home_of`, which
retries a database error rather than hide): the home the message states when it is the fact
that places the object, else the database's, so that a message is not dropped for arriving
before the fact that taught the index its object.

A fact that places its object belongs to the home it states, whatever the index holds when
the fact passes (`classify` leaves it to `home_of_message`): the index may not have applied
it yet, and a replayed one may be old. A move's fact goes to the new home only (it says
where in that home the object now is); the old home's residents are told nothing of it.
Any other message goes by its object's current home, except a device's from before it came
there: the index keeps when each device's placement began (its `home_since`, or the time of
the registry fact that registered it or moved it to another home), and a reader that has
the message's body (`home_of`, `home_at_once`) finds such a message no home's: what the
device recorded in its previous home is not its new home's to see, and which home that was
is not kept. A message is dated as the recorder files it (`recorded_at`): its own time (an
event's `time`, a command's `issued_at`, a fact's `time`), else the time the stream stored
it when the reader has that; one with neither goes by the current home (a live message is
new). `classify` reads no body: a live feed's messages, new ones, are not dated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Final

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from sqlalchemy import CompoundSelect, Select, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.db.models import Channel, Device, Location, RuleRecord, Subscription
from libs.principals import home_of

log = logging.getLogger(__name__)

DEVICE: Final = "device"
RULE: Final = "rule"
# An addressee: a webhook subscription or a notification channel (see the module docstring).
SUBSCRIPTION: Final = "subscription"
LOCATION: Final = "location"
KINDS = (DEVICE, RULE, SUBSCRIPTION, LOCATION)

# `system.<second token>...` → (what the next token names, how many tokens the subject has,
# which of them place it: the last token of those that do, or True for all, False for none).
_SYSTEM: dict[str, tuple[str, int, str | bool]] = {
    "device": (DEVICE, 4, "registry"),
    "rule": (RULE, 4, "changed"),
    "alert": (RULE, 3, False),
    "notify": (SUBSCRIPTION, 3, False),
    "subscription": (SUBSCRIPTION, 4, "changed"),
    "location": (LOCATION, 3, True),
}
# The facts that change what the index holds.
WATCHED = (
    subjects.DEVICE_REGISTRY_ALL,
    subjects.RULES_CHANGED_ALL,
    subjects.SUBSCRIPTIONS_CHANGED_ALL,
    subjects.location_changed("*"),
)
RELOAD_EVERY_S = 60.0
# An object the database did not know when asked is not asked for again for this long.
UNKNOWN_FOR_S = 5.0
# How long `home_of_message` waits for the database (a live feed waits behind it).
LOOK_UP_TIMEOUT_S = 3.0

Homes = dict[str, dict[str, str | None]]
# device id → when its current placement began (its `home_since`); absent: always.
Placed = dict[str, datetime]


class _Dated(msgspec.Struct):
    """The time a device's message carries (an event, a command, a fact); the rest of the
    body is skipped, not read."""

    time: datetime | None = None
    issued_at: datetime | None = None


_dated_decoder = msgspec.json.Decoder(_Dated)


def about(subject: str) -> tuple[str, str] | None:
    """The object a subject is about, as (kind, id); None when it is about no object that
    belongs to a home (a dead letter, a user, an API key, anything unknown)."""
    found = _object(subject)
    return None if found is None else (found[0], found[1])


def _object(subject: str) -> tuple[str, str, bool] | None:
    """(kind, id, whether the message is a fact that places it) of the object `subject` is
    about; None as `about`."""
    tokens = subject.split(".")
    first = tokens[0]
    if first == "events":
        return (DEVICE, tokens[1], False) if len(tokens) == 3 else None
    if first == "commands":
        return (DEVICE, tokens[1], False) if len(tokens) == 2 else None
    if first == "system" and len(tokens) >= 3:
        known = _SYSTEM.get(tokens[1])
        if known is not None and len(tokens) == known[1]:
            placing = known[2]
            return known[0], tokens[2], placing is True or placing == tokens[-1]
    return None


def stated_home(subject: str, data: bytes) -> tuple[str, str, str | None] | None:
    """(kind, id, home) of the object a fact that places it states (see WATCHED); None for
    any other message, a deletion that names no place, or a fact that cannot be read."""
    stated = _stated(subject, data)
    return None if stated is None else stated[:3]


def _stated(subject: str, data: bytes) -> tuple[str, str, str | None, m.RegistryFact | None] | None:
    """`stated_home` and, for a device, the registry fact read."""
    found = _object(subject)
    if found is None or not found[2]:
        return None  # a reading, a firing, an alert, a notification: they place nothing
    kind, object_id, _ = found
    try:
        if kind == DEVICE:
            fact = m.registry_fact_decoder.decode(data)
            if fact.device is None:  # a deletion: the object keeps the home it had
                return None
            return kind, object_id, home_of(fact.device.location), fact
        return kind, object_id, m.change_fact_decoder.decode(data).home, None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def recorded_at(data: bytes) -> datetime | None:
    """The time a device's message carries, which the recorder files it under: an event's
    `time`, a command's `issued_at`, a fact's `time`; None when it has none."""
    try:
        dated = _dated_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return _utc(dated.time or dated.issued_at)


def _utc(at: datetime | None) -> datetime | None:
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


class Unknown:
    """What `HomeIndex.classify` answers when the index alone cannot tell (None is an answer:
    the message is no home's): the message places its object, or is about one the index has
    not heard of yet."""


UNKNOWN: Final = Unknown()


class HomeIndex:
    """Each object's home, in memory; see the module docstring."""

    def __init__(self) -> None:
        self._homes: Homes = {kind: {} for kind in KINDS}
        self._placed: Placed = {}
        self._unknown: dict[tuple[str, str], float] = {}  # asked for, not found: until when
        self._since_reload: list[tuple[str, bytes]] | None = None  # facts during a reload
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._subscriptions: list[NatsSubscription] = []
        self._reloading: asyncio.Task[None] | None = None
        self.nc: NATS | None = None
        self.loaded_at = float("-inf")

    # --- classification (hot path) ------------------------------------------------------

    def home(self, subject: str) -> str | None:
        """The home of the object `subject` is about; None: no home's (admins only)."""
        key = about(subject)
        if key is None:
            return None
        return self._homes[key[0]].get(key[1])

    def classify(self, subject: str) -> str | Unknown | None:
        """`home`, or UNKNOWN (`home_of_message` then tells) for a fact that places its
        object (it belongs to the home it states: the index may not have applied it yet, or
        it is an old one replayed) and for an object the index has not heard of; the same
        split and lookup."""
        found = _object(subject)
        if found is None:
            return None
        if found[2]:
            return UNKNOWN
        return self._homes[found[0]].get(found[1], UNKNOWN)

    def knows(self, subject: str) -> bool:
        """Whether the index has heard of the message's object (or it is no object's)."""
        key = about(subject)
        return key is None or key[1] in self._homes[key[0]]

    def set(self, kind: str, object_id: str, home: str | None) -> None:
        self._homes[kind][object_id] = home

    def before_placement(self, subject: str, data: bytes, stored: datetime | None = None) -> bool:
        """Whether the message is a device's from before its current placement began (see
        the module docstring): dated by its own time, else `stored` (the stream's); False
        when neither tells, and for a fact that places the device (it goes where it says)."""
        found = _object(subject)
        if found is None or found[0] != DEVICE or found[2]:
            return False
        since = self._placed.get(found[1])
        if since is None:
            return False  # placed always (before the index kept when), or not known
        at = recorded_at(data) or _utc(stored)
        return at is not None and at < since

    def _unless_before(
        self, home: str | None, subject: str, data: bytes, stored: datetime | None
    ) -> str | None:
        """`home`, or None (no home's) for a message from before the placement in it."""
        if home is None or self.before_placement(subject, data, stored):
            return None
        return home

    # --- keeping it current -------------------------------------------------------------

    def learn(self, subject: str, data: bytes) -> None:
        """Apply a fact that may change an object's home (see WATCHED); anything else, or a
        fact that cannot be read, changes nothing."""
        if self._since_reload is not None:
            self._since_reload.append((subject, data))
        self._apply(self._homes, self._placed, subject, data)

    @staticmethod
    def _apply(homes: Homes, placed: Placed, subject: str, data: bytes) -> None:
        stated = _stated(subject, data)
        if stated is None:  # a deleted device keeps its home until a reload
            return
        kind, object_id, home, fact = stated
        known = homes[kind]
        if fact is not None and fact.device is not None:
            # Registered (again: its earlier life's messages are not this one's), moved to
            # another home, or not heard of (the database's is read at the next reload).
            anew = object_id not in known or known[object_id] != home
            if anew or fact.change == m.RegistryChange.CREATED:
                # The row's `home_since` is its `updated_at` of that change, to the microsecond.
                placed[object_id] = _utc(fact.device.updated_at) or fact.time
        known[object_id] = home

    async def start(
        self, nc: NATS, sessions: async_sessionmaker[AsyncSession], *, must_load: bool = True
    ) -> None:
        """Follow the facts (first, so that none is missed while reading), then read all.
        Unless `must_load`, a database that does not answer is logged, not raised: the
        owner's `keep_current` reads it when it answers (meanwhile `look_up` asks)."""
        self.nc = nc
        self._sessions = sessions

        async def on_fact(msg: Msg) -> None:
            self.learn(msg.subject, msg.data)

        try:
            for subject in WATCHED:
                self._subscriptions.append(await nc.subscribe(subject, cb=on_fact))
            if must_load:
                await self.reload()
            else:
                await self._reload_logged()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        reloading, self._reloading = self._reloading, None
        if reloading is not None:
            reloading.cancel()
            with contextlib.suppress(BaseException):
                await reloading

    async def reload(self) -> None:
        """Read every object's home from the database and swap it in, with the facts that
        came while reading applied on top (they may be newer than what was read)."""
        assert self._sessions is not None, "start() first"
        self._since_reload = []
        try:
            homes, placed = await read_homes(self._sessions)
            for subject, data in self._since_reload:
                self._apply(homes, placed, subject, data)
            self._homes, self._placed = homes, placed
            self._unknown.clear()
            self.loaded_at = time.monotonic()
        finally:
            self._since_reload = None

    def refresh_if_stale(self, max_age_s: float = RELOAD_EVERY_S) -> None:
        """Reload in the background when the last reload is older than `max_age_s` (for an
        owner without a task of its own: the gateway calls it as a stream or replay opens)."""
        if time.monotonic() - self.loaded_at < max_age_s:
            return
        if self._reloading is not None and not self._reloading.done():
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_logged())

    async def keep_current(self, stop: asyncio.Event, every_s: float = RELOAD_EVERY_S) -> None:
        """Reload every `every_s` until `stop` (for an owner with a task of its own); every
        second until a first reload succeeded."""
        while not stop.is_set():
            wait = every_s if self.loaded_at > float("-inf") else min(every_s, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if not stop.is_set():
                await self._reload_logged()

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # the facts keep it current meanwhile; the next one heals
            log.warning("homes index not reloaded: %s", exc)

    async def look_up(self, subject: str) -> None:
        """Ask the database for the object of a message the index does not know yet (a
        fact on its way); what is not there either is not asked for again for a while."""
        key = about(subject)
        if key is None or key[1] in self._homes[key[0]]:
            return
        if self._unknown.get(key, 0.0) > time.monotonic():
            return
        assert self._sessions is not None, "start() first"
        since = None
        if key[0] == DEVICE:
            found, home, since = await read_device(self._sessions, key[1])
        else:
            found, home = await read_home(self._sessions, *key)
        if found:
            self._homes[key[0]].setdefault(key[1], home)
            if since is not None:
                self._placed.setdefault(key[1], since)
        else:
            self._unknown[key] = time.monotonic() + UNKNOWN_FOR_S

    def home_at_once(self, subject: str, data: bytes) -> str | None:
        """The home of a message without asking the database: the one a fact that places
        its object states, else the index's (None for an object it has not heard of, and
        for a device's message from before its placement there)."""
        stated = stated_home(subject, data)
        if stated is not None:
            return stated[2]
        return self._unless_before(self.home(subject), subject, data, None)

    async def home_of(
        self, subject: str, data: bytes, stored: datetime | None = None
    ) -> str | None:
        """The home of a message for a reader that can wait: the index's (`classify`), or
        when it alone cannot tell, the one the message states when it is a fact that places
        its object (not learnt: the subscription brings it, and a replayed fact may be old),
        else the database's (None: no home's); None too for a device's message from before
        its placement there (dated by its own time, else `stored`, the stream's). A
        database error is raised: for a reader that retries rather than hide (the
        webhooks)."""
        home = self.classify(subject)
        if isinstance(home, Unknown):
            stated = stated_home(subject, data)
            if stated is not None:
                return stated[2]
            await self.look_up(subject)
            home = self.home(subject)
        return self._unless_before(home, subject, data, stored)

    async def home_of_message(
        self,
        subject: str,
        data: bytes,
        timeout: float = LOOK_UP_TIMEOUT_S,
        stored: datetime | None = None,
    ) -> str | None:
        """`home_of` for a reader that waits behind it (a live feed, a replay): None (no
        home's: hidden) when it cannot tell within `timeout`; a database that does not
        answer is not asked again for a while."""
        try:
            async with asyncio.timeout(timeout):
                return await self.home_of(subject, data, stored)
        except Exception as exc:
            log.warning("home of %s not looked up, hidden: %r", subject, exc)
            key = about(subject)
            if key is not None:
                self._unknown[key] = time.monotonic() + UNKNOWN_FOR_S
        return self._unless_before(self.home(subject), subject, data, stored)


class Audience:
    """Someone who sees the messages about its homes only (an administrator needs none)."""

    __slots__ = ("homes", "index")

    def __init__(self, index: HomeIndex, homes: frozenset[str]) -> None:
        self.index = index
        self.homes = homes

    def may_see(self, subject: str) -> bool:
        """False for a message surely not for this audience; True for one it sees and for
        one whose home takes reading it or asking the database (`sees_message` tells)."""
        home = self.index.classify(subject)
        return isinstance(home, Unknown) or self.sees_home(home)

    async def sees_message(
        self,
        subject: str,
        data: bytes,
        timeout: float = LOOK_UP_TIMEOUT_S,
        stored: datetime | None = None,
    ) -> bool:
        """Whether the message is about one of its homes, as a live feed classifies it
        (`HomeIndex.home_of_message`; `stored`: when the stream stored it, if known)."""
        home = await self.index.home_of_message(subject, data, timeout, stored)
        return self.sees_home(home)

    def sees_home(self, home: str | None) -> bool:
        """For a home classified once and shared by many audiences (a live feed)."""
        return home is not None and home in self.homes


async def read_homes(sessions: async_sessionmaker[AsyncSession]) -> tuple[Homes, Placed]:
    """Every object's home, and when each device's placement there began, from the
    database."""
    async with sessions() as session:
        devices = (
            await session.execute(select(Device.id, Device.location, Device.home_since))
        ).all()
        rules = (await session.execute(select(RuleRecord.id, RuleRecord.home))).all()
        subs = (await session.execute(select(Subscription.id, Subscription.home))).all()
        channels = (await session.execute(select(Channel.id, Channel.home))).all()
        locations = (await session.execute(select(Location.id, Location.path))).all()
    homes: Homes = {
        DEVICE: {d: home_of(location) for d, location, _ in devices},
        RULE: dict(rules),
        SUBSCRIPTION: dict(subs) | dict(channels),
        LOCATION: {loc: home_of(path) for loc, path in locations},
    }
    return homes, {d: since for d, _, since in devices if since is not None}


async def read_home(
    sessions: async_sessionmaker[AsyncSession], kind: str, object_id: str
) -> tuple[bool, str | None]:
    """(whether the object exists, its home), from the database."""
    if kind == DEVICE:
        return (await read_device(sessions, object_id))[:2]
    query: Select[str | None] | CompoundSelect[str | None]
    if kind == RULE:
        query = select(RuleRecord.home).where(RuleRecord.id == object_id)
    elif kind == SUBSCRIPTION:
        query = union_all(
            select(Subscription.home).where(Subscription.id == object_id),
            select(Channel.home).where(Channel.id == object_id),
        )
    else:
        query = select(Location.path).where(Location.id == object_id)
    async with sessions() as session:
        row = (await session.execute(query)).first()
    if row is None:
        return False, None
    value = row[0]
    return True, home_of(value) if kind == LOCATION else value


async def read_device(
    sessions: async_sessionmaker[AsyncSession], device_id: str
) -> tuple[bool, str | None, datetime | None]:
    """(whether the device is registered, its home, when its placement there began), from
    the database."""
    query = select(Device.location, Device.home_since).where(Device.id == device_id)
    async with sessions() as session:
        row = (await session.execute(query)).first()
    return (False, None, None) if row is None else (True, home_of(row[0]), row[1])
