"""The episode book: when a rule fires, as pure functions of (book, input, now).

An episode is a period in which a rule's trigger holds for a device (`rule_logic.Episode`).
It starts when the trigger starts to hold, fires once when its `for` deadline comes (and its
conditions hold), holds while the trigger holds, and clears when it stops holding; a clear
before the deadline fires nothing. Its actions run up to the first `delay` and resume when the
delay has passed. Instantaneous triggers (events, schedules) follow the rule's mode while a run
is still waiting on a delay: `single` skips the new trigger, `restart` replaces the run,
`queued` runs it after.

Each function takes the book (the episodes by key `<rule id>.<device id | event | schedule>`
and the stream sequences already decided) and returns a `Decision`: the new book, the effects
to carry out in order (per key), and what each evaluation came to (for the metrics). Nothing
here does I/O; the rules service (`services.rules`) carries the effects out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

import msgspec

from libs import messages as m
from libs.rule_logic import (
    DeviceInfo,
    DeviceView,
    Episode,
    Observation,
    conditions_hold,
    due,
    event_matches,
    home_views,
    in_home,
    next_occurrence,
    selects,
    step,
)

# --- what a decision asks for -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """Run the rule's actions `actions` for `episode`, then trace the run as `kind`."""

    key: str
    rule: m.Rule
    episode: Episode
    actions: range
    resume_at: datetime | None
    kind: Literal["fired", "continued"]  # the first run of the episode, or after a delay
    reason: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Trace that the episode's trigger was not acted on, and why."""

    key: str
    rule: m.Rule
    episode: Episode
    note: str


@dataclass(frozen=True, slots=True)
class Clear:
    """The episode ended after it fired: clear the marks its run set, trace it."""

    key: str
    rule: m.Rule
    episode: Episode
    note: str


@dataclass(frozen=True, slots=True)
class Put:
    """Store the episode (it survives a restart and a fail-over)."""

    key: str
    episode: Episode


@dataclass(frozen=True, slots=True)
class Delete:
    """Forget the stored episode."""

    key: str


Effect = Run | Skip | Clear | Put | Delete


@dataclass(frozen=True, slots=True)
class World:
    """What the decisions read but do not change: the devices' last states (conditions) and
    the registry (homes, selectors)."""

    views: Mapping[str, DeviceView] = field(default_factory=dict)
    registry: Mapping[str, DeviceInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Book:
    """The episodes by key, and the last fact and event (stream sequences) decided: one
    delivered again is not decided again (an old fact after a newer one would put an old state
    back; an event would trigger again)."""

    episodes: Mapping[str, Episode] = field(default_factory=dict)
    fact_seq: int = 0
    event_seq: int = 0


class Decision(NamedTuple):
    book: Book
    effects: list[Effect]
    outcomes: list[str]  # one per evaluation: start, hold, end, none, event, fired, ...


# --- the inputs ---------------------------------------------------------------------------------


def on_fact(
    book: Book,
    seq: int,
    fact: m.DeviceStateFact,
    rules: Iterable[m.Rule],
    world: World,
    now: datetime,
) -> Decision:
    """A device's new state (stream sequence `seq`), for the `rules` that may watch it; the
    device's own view in `world` is already the new one."""
    if seq <= book.fact_seq:
        return Decision(book, [], [])
    draft = _Draft(book.episodes)
    obs = Observation.of(fact)
    info = world.registry.get(fact.device_id)
    for rule in rules:
        trigger = rule.trigger
        if not isinstance(trigger, m.ThresholdTrigger | m.StateTrigger):
            continue
        if isinstance(trigger, m.ThresholdTrigger) and trigger.selector is not None:
            if not selects(trigger, fact.device_id, info, rule.home):
                continue
        elif trigger.device_id != fact.device_id or not in_home(rule.home, info):
            continue
        key = f"{rule.id}.{fact.device_id}"
        current = draft.get(key)
        episode, what = step(current, rule, obs, fact.time)
        draft.outcomes.append(what)
        if what == "start" and episode is not None:
            if due(episode, now):
                # Acted on at once: stored once, after the actions. A crash before that
                # replays the fact, and the re-run's ids are de-duplicated.
                _advance(draft, key, rule, episode, world, now)
            else:
                draft.save(key, episode)
        elif what == "end" and current is not None:
            _end(draft, key, rule, current)
    return draft.decision(book, fact_seq=seq)


def on_event(
    book: Book,
    seq: int,
    subject: str,
    event: m.CloudEvent,
    at: datetime,
    rules: Iterable[m.Rule],
    world: World,
    now: datetime,
) -> Decision:
    """A device event (stream sequence `seq`, stored at `at`) for the event rules."""
    if seq <= book.event_seq:
        return Decision(book, [], [])
    draft = _Draft(book.episodes)
    info = world.registry.get(event.subject)
    for rule in rules:
        trigger = rule.trigger
        if not isinstance(trigger, m.EventTrigger) or not in_home(rule.home, info):
            continue  # a homed rule hears its home's devices only
        if event_matches(trigger, subject, event.data):
            draft.outcomes.append("event")
            episode = Episode(
                rule.id,
                event.subject,
                at,
                at,
                trigger_event_id=event.id,
                values=dict(event.data or {}),
                rule_version=rule.version,
            )
            _trigger(draft, f"{rule.id}.event", rule, episode, world, now)
    return draft.decision(book, event_seq=seq)


def on_tick(book: Book, rules: Mapping[str, m.Rule], world: World, now: datetime) -> Decision:
    """Advance the episodes whose time has come (also those that came while nobody was
    evaluating); forget those of rules that are gone."""
    draft = _Draft(book.episodes)
    for key, episode in book.episodes.items():
        rule = rules.get(episode.rule_id)
        if rule is None:
            draft.forget(key)
        elif rule.enabled and due(episode, now):
            _advance(draft, key, rule, draft.get(key) or episode, world, now)
    return draft.decision(book)


def retire(book: Book, rules: Mapping[str, m.Rule]) -> Decision:
    """End the episodes of rules deleted, switched off or changed since they began: such a
    rule starts afresh (a fired episode is cleared, saying why; the next fact that meets its
    trigger starts a new one). Kept, a fired episode of a rule switched off and on again
    would wait for its trigger to stop holding while it was on, which a device whose value
    no longer changes never shows: the rule would not fire again."""
    draft = _Draft(book.episodes)
    for key, episode in book.episodes.items():
        rule = rules.get(episode.rule_id)
        if rule is None:
            draft.forget(key)
        elif not rule.enabled:
            _end(draft, key, rule, episode, "the rule was disabled")
        elif episode.rule_version and episode.rule_version != rule.version:
            _end(draft, key, rule, episode, "the rule was changed")
    return draft.decision(book)


def schedule(book: Book, rules: Iterable[m.Rule], now: datetime) -> Decision:
    """Every schedule rule has exactly one episode waiting: its next cron time."""
    draft = _Draft(book.episodes)
    for rule in rules:
        trigger = rule.trigger
        key = f"{rule.id}.schedule"
        if isinstance(trigger, m.ScheduleTrigger) and draft.get(key) is None:
            draft.save(key, _cron_episode(rule, trigger, next_occurrence(trigger, now)))
    return draft.decision(book)


# --- how far a run goes, and why it fired -----------------------------------------------------


def plan_run(rule: m.Rule, start: int, now: datetime) -> tuple[int, datetime | None]:
    """Where a run from action `start` stops: just after the first delay (resuming when it
    has passed), or at the end."""
    for index in range(start, len(rule.actions)):
        action = rule.actions[index]
        if isinstance(action, m.DelayAction):
            return index + 1, now + timedelta(seconds=action.seconds)
    return len(rule.actions), None


def reason(rule: m.Rule, episode: Episode) -> str:
    """Why the rule fired, for its trace."""
    t = rule.trigger
    values = ", ".join(f"{k} = {v!r}" for k, v in episode.values.items())
    match t:
        case m.ThresholdTrigger():
            return f"{values} on {episode.device_id} held {_describe(t)} for {t.for_s:g}s"
        case m.StateTrigger():
            return f"{episode.device_id} {t.attribute} is {t.to} for {t.for_s:g}s"
        case m.EventTrigger():
            return f"event {episode.trigger_event_id} of {episode.device_id} matched {t.subject}"
        case m.ScheduleTrigger():
            return f"cron {t.cron} ({t.timezone}) at {episode.deadline.isoformat()}"
    return "fired"


def _describe(t: m.ThresholdTrigger) -> str:
    if t.equals is not None:
        return f"= {t.equals!r}"
    parts = [f"> {t.low:g}"] if t.low is not None else []
    parts += [f"< {t.high:g}"] if t.high is not None else []
    return " and ".join(parts)


# --- the moves ----------------------------------------------------------------------------------


_GONE = object()


class _Draft:
    """The changes a decision makes, over the book it started from (copied once, at the end,
    and only when something changed: a fact no episode cares about costs no copy)."""

    def __init__(self, base: Mapping[str, Episode]) -> None:
        self._base = base
        self._changed: dict[str, Episode | object] = {}
        self.effects: list[Effect] = []
        self.outcomes: list[str] = []

    def get(self, key: str) -> Episode | None:
        found = self._changed.get(key, self._base.get(key))
        return found if isinstance(found, Episode) else None

    def save(self, key: str, episode: Episode) -> None:
        self._changed[key] = episode
        self.effects.append(Put(key, episode))

    def forget(self, key: str) -> None:
        self._changed[key] = _GONE
        self.effects.append(Delete(key))

    def decision(self, book: Book, **seqs: int) -> Decision:
        episodes = book.episodes
        if self._changed:
            merged = dict(book.episodes)
            for key, episode in self._changed.items():
                if isinstance(episode, Episode):
                    merged[key] = episode
                else:
                    merged.pop(key, None)
            episodes = merged
        new = Book(
            episodes,
            seqs.get("fact_seq", book.fact_seq),
            seqs.get("event_seq", book.event_seq),
        )
        return Decision(new, self.effects, self.outcomes)


def _trigger(
    draft: _Draft, key: str, rule: m.Rule, episode: Episode, world: World, now: datetime
) -> None:
    """A new instantaneous trigger (event): start it, or apply the rule's mode."""
    running = draft.get(key)
    if running is not None and running.trigger_event_id == episode.trigger_event_id:
        return  # its own trigger again: redelivered after a crash, before its ack
    if running is not None and running.running:
        if rule.mode == m.RuleMode.SINGLE:
            draft.effects.append(Skip(key, rule, episode, "already running (mode single)"))
            return
        if rule.mode == m.RuleMode.QUEUED:
            queued = [*running.queued, f"{episode.device_id}|{episode.trigger_event_id}"]
            draft.save(key, msgspec.structs.replace(running, queued=queued))
            return
    draft.save(key, episode)  # restart: the running one is replaced
    _advance(draft, key, rule, episode, world, now)


def _advance(
    draft: _Draft, key: str, rule: m.Rule, episode: Episode, world: World, now: datetime
) -> None:
    """Run the actions from where the episode stands, up to the end or the next delay."""
    first = not episode.fired
    if first:
        views = home_views(world.views, world.registry, rule.home)
        ok, why = conditions_hold(rule, views, now)
        if not ok:
            draft.effects.append(Skip(key, rule, episode, f"conditions: {why}"))
            _finish(draft, key, rule, msgspec.structs.replace(episode, fired=True), world, now)
            return
    start = episode.next_action
    end, resume_at = plan_run(rule, start, now)
    kind: Literal["fired", "continued"] = "fired" if first else "continued"
    why = reason(rule, episode) if first else "after delay"
    draft.effects.append(Run(key, rule, episode, range(start, end), resume_at, kind, why))
    draft.outcomes.append(kind)
    progressed = msgspec.structs.replace(episode, fired=True, next_action=end, resume_at=resume_at)
    if resume_at is not None:
        draft.save(key, progressed)
    else:
        _finish(draft, key, rule, progressed, world, now)


def _finish(
    draft: _Draft, key: str, rule: m.Rule, episode: Episode, world: World, now: datetime
) -> None:
    """Actions done: a lasting episode waits for its end; an instant one makes room."""
    t = rule.trigger
    if isinstance(t, m.ScheduleTrigger):
        draft.save(key, _cron_episode(rule, t, next_occurrence(t, max(now, episode.deadline))))
    elif isinstance(t, m.EventTrigger):
        if episode.queued:
            device_id, event_id = episode.queued[0].split("|", 1)
            nxt = Episode(
                rule.id,
                device_id,
                now,
                now,
                trigger_event_id=event_id,
                queued=episode.queued[1:],
                rule_version=rule.version,
            )
            draft.save(key, nxt)
            _advance(draft, key, rule, nxt, world, now)
        else:
            draft.forget(key)
    else:
        draft.save(key, msgspec.structs.replace(episode, resume_at=None))


def _end(
    draft: _Draft, key: str, rule: m.Rule, episode: Episode, why: str = "trigger no longer holds"
) -> None:
    """The trigger no longer holds (or the rule was switched off or changed): clear marks;
    delayed actions still pending are dropped."""
    if episode.fired:
        note = why
        if episode.running:
            note += f"; {len(rule.actions) - episode.next_action} delayed action(s) cancelled"
        draft.effects.append(Clear(key, rule, episode, note))
    draft.forget(key)


def _cron_episode(rule: m.Rule, trigger: m.ScheduleTrigger, at: datetime) -> Episode:
    return Episode(rule.id, "", at, at, values={"cron": trigger.cron}, rule_version=rule.version)
