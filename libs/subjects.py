"""Subject names: built and parsed here only (DESIGN.md, 'Wire protocol')."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

EVENTS_STREAM = "EVENTS"
COMMANDS_STREAM = "COMMANDS"
SYSTEM_STREAM = "SYSTEM"
DEADLETTER_STREAM = "DEADLETTER"

EVENTS_ALL = "events.>"
# What the EVENTS stream takes: `events.<device_id>.<type>`, one token each. It stores them
# with their partition (its subject transform, `partitioned`) first, after a mark no device
# id has: `events.~.<partition>.<device_id>.<type>`. A partition's consumer then filters on a
# prefix (`events.~.<p>.>`), which nats-server finds by walking that branch of a block's
# subject index; a filter that begins with wildcards (`events.*.*.<p>`) makes it walk the
# whole index for each event it delivers (ops/bench/partition_filters.py: 4-11x the cost at
# 1,000-3,000 devices). Installs made before stop 21 store `events.<device_id>.<type>.
# <partition>` ("partition last") and keep it: each function below takes the layout, which
# `libs.bus.partition_first` reads off the stream. Neither layout's filters match the other's
# subjects (`~` is no token; 5 tokens against 4).
EVENTS_PUBLISHED = "events.*.*"
PARTITION_MARK = "~"
_MARKED = f"events.{PARTITION_MARK}."
COMMANDS_ALL = "commands.>"
SYSTEM_ALL = "system.>"
DEADLETTER_ALL = "deadletter.>"

# One subject token: what a device id, an event type or a rule id may be. The one pattern:
# libs.messages.Token and the gateway's schemas are built from it.
TOKEN = r"[A-Za-z0-9_-]{1,128}"
_TOKEN = re.compile(rf"^{TOKEN}$")
# A subscription filter: tokens, `*` for one token, `>` for the rest.
_FILTER_TOKEN = re.compile(rf"^({TOKEN}|\*)$")


def is_token(value: str) -> bool:
    """True when `value` can stand as one subject token (no dots, no wildcards)."""
    return bool(_TOKEN.fullmatch(value))


def check_token(value: str, what: str) -> str:
    if not is_token(value):
        raise ValueError(f"{what} {value!r} must be 1-128 characters of A-Z a-z 0-9 _ -")
    return value


def is_filter(value: str) -> bool:
    """True when `value` is a valid subscription subject with `*` / `>` wildcards."""
    tokens = value.split(".")
    if not tokens or any(t == "" for t in tokens):
        return False
    *head, last = tokens
    return all(_FILTER_TOKEN.fullmatch(t) for t in head) and (
        last == ">" or bool(_FILTER_TOKEN.fullmatch(last))
    )


def device_events(device_id: str, event_type: str = "*") -> str:
    """`events.<device_id>.<type>`; `*` matches every type."""
    return f"events.{device_id}.{event_type}"


def partitioned(partitions: int, first: bool = True) -> tuple[str, str]:
    """The EVENTS stream's subject transform (source, destination): NATS's `partition()`
    hashes the device id, so one device's events stay in one partition, in order. `first`:
    the partition stored first (new installs), else last (installs from before stop 21)."""
    part = f"{{{{partition({partitions},1)}}}}"
    if first:
        return (
            EVENTS_PUBLISHED,
            f"events.{PARTITION_MARK}.{part}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
        )
    return EVENTS_PUBLISHED, f"events.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{part}"


def transform_partitions(destination: str) -> int | None:
    """How many partitions a stored transform's destination makes (None: not ours)."""
    found = re.search(r"\{\{partition\((\d+),1\)\}\}", destination)
    if not found:
        return None
    count = int(found.group(1))
    ours = (partitioned(count, first=True)[1], partitioned(count, first=False)[1])
    return count if destination in ours else None


def transform_partition_first(destination: str) -> bool:
    """Whether a stored transform's destination stores the partition first."""
    return destination.startswith(_MARKED)


def events_partition(partition: int, first: bool = True) -> str:
    """The stored subjects of one partition's events."""
    if first:
        return f"events.{PARTITION_MARK}.{partition}.>"
    return f"events.*.*.{partition}"


def published(subject: str) -> str:
    """A stored subject as it was published: `events.~.<p>.<device>.<type>` and
    `events.<device>.<type>.<p>` lose their partition; any other subject is its own."""
    if subject.startswith(_MARKED):
        tokens = subject.split(".")
        return f"events.{tokens[3]}.{tokens[4]}" if len(tokens) == 5 else subject
    if subject.startswith("events.") and subject.count(".") == 3:
        return subject.rpartition(".")[0]
    return subject


def stored_filter(filter_subject: str, first: bool = True) -> str:
    """A filter on published event subjects as a JetStream filter on stored ones (the
    layout: `first`): `events.<a>.<b>` (either may be `*`) and `events.<a>.>` gain the
    partition token; `events.>`, `events.*.>` and other subjects match as they are."""
    tokens = filter_subject.split(".")
    if tokens[0] != "events" or len(tokens) != 3:
        return filter_subject
    device, rest = tokens[1], tokens[2]
    if rest == ">":
        return (
            f"events.{PARTITION_MARK}.*.{device}.>" if first and device != "*" else filter_subject
        )
    if first:
        return f"events.{PARTITION_MARK}.*.{device}.{rest}"
    return filter_subject + ".*"


def device_events_all(device_id: str) -> str:
    return f"events.{device_id}.>"


def commands(device_id: str) -> str:
    return f"commands.{device_id}"


def device_state(device_id: str) -> str:
    return f"system.device.{device_id}.state"


def device_transition(device_id: str) -> str:
    """A state fact whose `changed` holds state, connection or mark (`DeviceStateFact`, the
    same bytes as the state fact beside it): the ones the recorder audits."""
    return f"system.device.{device_id}.transition"


def device_registry(device_id: str) -> str:
    return f"system.device.{device_id}.registry"


def device_rejected(device_id: str) -> str:
    """An event the actors did not apply (device disabled, unknown), with the reason."""
    return f"system.device.{device_id}.rejected"


DEVICE_STATES_ALL = "system.device.*.state"
DEVICE_TRANSITIONS_ALL = "system.device.*.transition"
DEVICE_REGISTRY_ALL = "system.device.*.registry"


def location_changed(location_id: str) -> str:
    """A home, floor or room was created, renamed or deleted (`ChangeFact`)."""
    return f"system.location.{location_id}"


def rule_fired(rule_id: str) -> str:
    return f"system.rule.{rule_id}.fired"


def rule_changed(rule_id: str) -> str:
    """A rule was created, updated or deleted: the rules service reloads it."""
    return f"system.rule.{rule_id}.changed"


RULES_CHANGED_ALL = "system.rule.*.changed"


def user_changed(user_id: str) -> str:
    """A user was created, changed or removed (`ChangeFact`, audited)."""
    return f"system.user.{check_token(user_id, 'user id')}.changed"


def api_key_changed(key_id: str) -> str:
    """An API key was made or revoked: every gateway forgets the keys it verified."""
    return f"system.apikey.{check_token(key_id, 'API key id')}.changed"


API_KEYS_CHANGED_ALL = "system.apikey.*.changed"
RULES_FIRED_ALL = "system.rule.*.fired"


def stream_of(filter_subject: str) -> str | None:
    """The stream that holds the subjects of a filter (by its first token)."""
    return {
        "events": EVENTS_STREAM,
        "commands": COMMANDS_STREAM,
        "system": SYSTEM_STREAM,
        "deadletter": DEADLETTER_STREAM,
    }.get(filter_subject.split(".", 1)[0])


def alert(alert_id: str) -> str:
    return f"system.alert.{alert_id}"


def notification(subscription_id: str) -> str:
    """A rule's `notify` action addressed to one webhook subscription or notification
    channel (the webhooks service)."""
    return f"system.notify.{subscription_id}"


def rule_notification(rule_id: str, addressee: str | None) -> str:
    """Where a rule's `notify` action goes: the subscription or channel it names, else the
    rule's alerts (whoever subscribed to them)."""
    return notification(addressee) if addressee else alert(rule_id)


NOTIFICATIONS_ALL = "system.notify.*"


def parse_notification(subject: str) -> str:
    """The subscription id of `system.notify.<id>`; ValueError if it is not one."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[:2] != ["system", "notify"] or not is_token(parts[2]):
        raise ValueError(f"{subject!r} is not system.notify.<subscription_id>")
    return parts[2]


def subscription_changed(subscription_id: str) -> str:
    """A webhook subscription was created, deleted or re-driven: the webhooks service
    reloads it (`ChangeFact`, audited)."""
    return f"system.subscription.{subscription_id}.changed"


SUBSCRIPTIONS_CHANGED_ALL = "system.subscription.*.changed"


def parse_subscription_changed(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["system", "subscription"] or parts[3] != "changed":
        raise ValueError(f"{subject!r} is not system.subscription.<id>.changed")
    return parts[2]


def webhook_consumer(subscription_id: str) -> str:
    """The durable consumer a webhook subscription reads its filter through."""
    return f"webhook-{subscription_id}"


def webhook_notify_consumer(subscription_id: str) -> str:
    """The consumer of the notifications rules address to a webhook subscription (SYSTEM)."""
    return f"webhook-{subscription_id}-notify"


def check_filter(filter_subject: str) -> str:
    """The stream a subscription's filter reads from; ValueError when it is not a filter under
    one of the platform's streams (`events.*.telemetry`, `system.alert.>`)."""
    if not is_filter(filter_subject):
        raise ValueError(
            f"{filter_subject!r} is not a subject filter: tokens of A-Z a-z 0-9 _ - separated "
            "by dots, `*` for one token, `>` for the rest"
        )
    stream = stream_of(filter_subject)
    if stream is None or "." not in filter_subject:
        raise ValueError(
            f"{filter_subject!r} must start with events., commands., system. or deadletter."
        )
    return stream


def credentials_changed(device_id: str) -> str:
    """A device's bus credentials were issued, rotated or revoked (`ChangeFact`, audited):
    the busauth service closes a connection that used the old ones."""
    return f"system.credentials.{device_id}.changed"


CREDENTIALS_CHANGED_ALL = "system.credentials.*.changed"


def bridge_changed(bridge_id: str) -> str:
    """A bridge was made or its credentials rotated (`ChangeFact`, audited)."""
    return f"system.bridge.{bridge_id}.changed"


BRIDGES_CHANGED_ALL = "system.bridge.*.changed"


def inbox_prefix(kind: str, name: str) -> str:
    """A client's own inbox prefix (`_INBOX.<kind>.<name>`, nats-py's `inbox_prefix`): its
    replies arrive under it, and its grant lets it read no other. `kind` (`svc`, `dev`,
    `bridge`, `claim`) keeps a device named like a service out of the service's."""
    return f"_INBOX.{kind}.{name}"


def device_inbox(device_id: str) -> str:
    """The inbox prefix a device connects with (JetStream acks, its consumer's messages)."""
    return inbox_prefix("dev", device_id)


def provision(device_id: str, nonce: str) -> str:
    """Where a device that claimed its id with a provisioning token receives its
    credentials once approved: only its claiming connection, named `nonce`, may read it."""
    return f"provision.{device_id}.{nonce}"


def provisioning_token_changed(token_id: str) -> str:
    """A provisioning token was made (`ChangeFact`, audited; never its secret)."""
    return f"system.provisioning.{token_id}.changed"


def deadletter(original_subject: str) -> str:
    return f"deadletter.{original_subject}"


def deadletter_changed(seq: int) -> str:
    """Dead letter `seq` was redriven (`ChangeFact`, audited)."""
    return f"system.deadletter.{seq}.changed"


def mqtt_topic(subject: str) -> str:
    """The MQTT topic of a subject (`events/<id>/<type>`, `commands/<id>`): nats-server's MQTT
    listener maps `/` to `.`, which is exact for subjects of tokens (no `.` or `/` inside)."""
    return subject.replace(".", "/")


class EventSubject(NamedTuple):
    device_id: str
    event_type: str


def parse_device_event(subject: str) -> EventSubject:
    """Split `events.<device_id>.<type>`; ValueError if it is not one."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "events" or not all(is_token(p) for p in parts[1:]):
        raise ValueError(f"{subject!r} is not events.<device_id>.<type>")
    return EventSubject(parts[1], parts[2])


def parse_command(subject: str) -> str:
    """Return the device id of `commands.<device_id>`."""
    parts = subject.split(".")
    if len(parts) != 2 or parts[0] != "commands" or not is_token(parts[1]):
        raise ValueError(f"{subject!r} is not commands.<device_id>")
    return parts[1]


def parse_system_device(subject: str) -> tuple[str, str]:
    """Return (device_id, fact) of `system.device.<id>.<fact>`."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["system", "device"]:
        raise ValueError(f"{subject!r} is not system.device.<id>.<fact>")
    return parts[2], parts[3]


def parse_rule_fired(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["system", "rule"] or parts[3] != "fired":
        raise ValueError(f"{subject!r} is not system.rule.<id>.fired")
    return parts[2]


def matches(filter_subject: str, subject: str) -> bool:
    """NATS wildcard matching, for checks made outside the server."""
    f_tokens = filter_subject.split(".")
    s_tokens = subject.split(".")
    for i, ft in enumerate(f_tokens):
        if ft == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (ft != "*" and ft != s_tokens[i]):
            return False
    return len(f_tokens) == len(s_tokens)


class SubjectKind(StrEnum):
    """What a subject carries (`classify`)."""

    DEVICE_EVENT = "device_event"
    COMMAND = "command"
    DEVICE_STATE = "device_state"
    DEVICE_TRANSITION = "device_transition"
    DEVICE_REGISTRY = "device_registry"
    DEVICE_REJECTED = "device_rejected"
    RULE_FIRED = "rule_fired"
    RULE_CHANGED = "rule_changed"
    NOTIFICATION = "notification"
    ALERT = "alert"
    LOCATION_CHANGED = "location_changed"
    SUBSCRIPTION_CHANGED = "subscription_changed"
    USER_CHANGED = "user_changed"
    API_KEY_CHANGED = "api_key_changed"
    CREDENTIALS_CHANGED = "credentials_changed"
    BRIDGE_CHANGED = "bridge_changed"
    PROVISIONING_CHANGED = "provisioning_changed"
    DEADLETTER_CHANGED = "deadletter_changed"
    DEAD_LETTER = "dead_letter"
    OTHER = "other"


class Classified(NamedTuple):
    """A subject taken apart: its kind and the id it names (a device, rule, subscription,
    location, user, API key, bridge or provisioning token); `event_type` for a device
    event; `original` for a dead letter (the subject it was on)."""

    kind: SubjectKind
    id: str = ""
    event_type: str = ""
    original: str = ""

    @property
    def is_change(self) -> bool:
        """A user's change of a location, rule, subscription, user, API key, credentials,
        bridge, provisioning token or dead letter (a `ChangeFact`, audited)."""
        return self.kind in CHANGE_KINDS


CHANGE_KINDS = frozenset(
    {
        SubjectKind.LOCATION_CHANGED,
        SubjectKind.RULE_CHANGED,
        SubjectKind.SUBSCRIPTION_CHANGED,
        SubjectKind.USER_CHANGED,
        SubjectKind.API_KEY_CHANGED,
        SubjectKind.CREDENTIALS_CHANGED,
        SubjectKind.BRIDGE_CHANGED,
        SubjectKind.PROVISIONING_CHANGED,
        SubjectKind.DEADLETTER_CHANGED,
    }
)
# `system.<noun>.<id>.<verb>` facts, by (noun, verb).
_SYSTEM_FACTS: dict[tuple[str, str], SubjectKind] = {
    ("device", "state"): SubjectKind.DEVICE_STATE,
    ("device", "transition"): SubjectKind.DEVICE_TRANSITION,
    ("device", "registry"): SubjectKind.DEVICE_REGISTRY,
    ("device", "rejected"): SubjectKind.DEVICE_REJECTED,
    ("rule", "fired"): SubjectKind.RULE_FIRED,
    ("rule", "changed"): SubjectKind.RULE_CHANGED,
    ("subscription", "changed"): SubjectKind.SUBSCRIPTION_CHANGED,
    ("user", "changed"): SubjectKind.USER_CHANGED,
    ("apikey", "changed"): SubjectKind.API_KEY_CHANGED,
    ("credentials", "changed"): SubjectKind.CREDENTIALS_CHANGED,
    ("bridge", "changed"): SubjectKind.BRIDGE_CHANGED,
    ("provisioning", "changed"): SubjectKind.PROVISIONING_CHANGED,
    ("deadletter", "changed"): SubjectKind.DEADLETTER_CHANGED,
}
# `system.<noun>.<id>` facts.
_SYSTEM_SHORT: dict[str, SubjectKind] = {
    "notify": SubjectKind.NOTIFICATION,
    "alert": SubjectKind.ALERT,
    "location": SubjectKind.LOCATION_CHANGED,
}


SYSTEM_KINDS = frozenset((*_SYSTEM_FACTS.values(), *_SYSTEM_SHORT.values()))


def kind_filter(kind: SubjectKind) -> str:
    """The filter of every subject of a system fact's kind (`system.device.*.registry`,
    `system.alert.*`): exactly the subjects `classify` gives that kind."""
    for (noun, verb), known in _SYSTEM_FACTS.items():
        if known is kind:
            return f"system.{noun}.*.{verb}"
    for noun, known in _SYSTEM_SHORT.items():
        if known is kind:
            return f"system.{noun}.*"
    raise ValueError(f"{kind} is not a system fact's kind")


def classify(subject: str) -> Classified:
    """Tell what `subject` is; a subject of no known shape is `OTHER` (never an error)."""
    head, _, rest = subject.partition(".")
    if head == "deadletter" and rest:
        return Classified(SubjectKind.DEAD_LETTER, original=rest)
    parts = subject.split(".")
    if not all(is_token(p) for p in parts[1:]):
        return Classified(SubjectKind.OTHER)
    match parts:
        case ["events", device_id, event_type]:
            return Classified(SubjectKind.DEVICE_EVENT, device_id, event_type)
        case ["commands", device_id]:
            return Classified(SubjectKind.COMMAND, device_id)
        case ["system", noun, id_, verb] if (noun, verb) in _SYSTEM_FACTS:
            return Classified(_SYSTEM_FACTS[noun, verb], id_)
        case ["system", noun, id_] if noun in _SYSTEM_SHORT:
            return Classified(_SYSTEM_SHORT[noun], id_)
    return Classified(SubjectKind.OTHER)
