"""What a webhook request carries for bus messages, before it is signed (pure).

A CloudEvent goes out in the CloudEvents HTTP binding the subscription chose: `structured`
(the event as JSON, `application/cloudevents+json`) or `binary` (`data` as the body, the
attributes in `ce-*` headers), one event per request; any other bus message (a platform fact)
goes out as it is, as JSON. In `batched` mode several messages go in one request, as a JSON
array of structured CloudEvents (`application/cloudevents-batch+json`); a message that is not
a CloudEvent is wrapped in one there, since every item of a batch must be one.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import msgspec

from libs import bus
from libs import messages as m

STRUCTURED = "structured"
BINARY = "binary"
BATCHED = "batched"
SUBJECT_HEADER = "smarthome-subject"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# How many events a batched request holds (a receiver may check it against the array).
COUNT_HEADER = "smarthome-count"
# The `source` of a platform fact wrapped as a CloudEvent in a batch.
WRAPPED_SOURCE = "smarthome"


@dataclass(frozen=True)
class Payload:
    msg_id: str  # the same on every attempt: receivers de-duplicate on it (`webhook-id`)
    body: bytes
    headers: dict[str, str]


def render(
    mode: str, subject: str, data: bytes, nats_headers: Mapping[str, str] | None, fallback_id: str
) -> Payload:
    """The request for a message on `subject`; `fallback_id` names it when nothing else does."""
    try:
        event = m.cloud_event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        msg_id = _header_id(nats_headers) or fallback_id
        return Payload(
            msg_id, data, {"content-type": _json_or_bytes(data), SUBJECT_HEADER: subject}
        )
    if mode == BINARY:
        return _binary(event, subject)
    return Payload(
        event.id,
        data,
        {"content-type": "application/cloudevents+json", SUBJECT_HEADER: subject},
    )


@dataclass(frozen=True)
class Item:
    """One bus message of a batch."""

    stream: str
    seq: int
    subject: str
    data: bytes
    nats_headers: Mapping[str, str] | None


def render_batch(items: Sequence[Item]) -> Payload:
    """One request for `items` (in stream order): a JSON array of structured CloudEvents. Its
    `webhook-id` follows from the items, so that a retry of the same batch carries the same."""
    body = b"[" + b",".join(_as_cloud_event(item) for item in items) + b"]"
    return Payload(
        batch_id(items),
        body,
        {"content-type": BATCH_CONTENT_TYPE, COUNT_HEADER: str(len(items))},
    )


def event_id(item: Item) -> str:
    """What names one message of a batch: its CloudEvent id, else its message id."""
    try:
        return m.cloud_event_decoder.decode(item.data).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _header_id(item.nats_headers) or f"{item.stream}-{item.seq}"


def batch_id(items: Sequence[Item]) -> str:
    """`<stream>-<first seq>-<last seq>-<digest of every seq>`: the same items, the same id."""
    seqs = ",".join(str(item.seq) for item in items).encode()
    digest = hashlib.sha256(seqs).hexdigest()[:12]
    return f"batch-{items[0].stream}-{items[0].seq}-{items[-1].seq}-{digest}"


def _as_cloud_event(item: Item) -> bytes:
    try:
        m.cloud_event_decoder.decode(item.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    else:
        return item.data
    msg_id = _header_id(item.nats_headers) or f"{item.stream}-{item.seq}"
    wrapped: dict[str, object] = {
        "specversion": "1.0",
        "id": msg_id,
        "source": WRAPPED_SOURCE,
        "type": item.subject,
        "subject": item.subject,
    }
    if _json_or_bytes(item.data) == "application/json":
        wrapped["datacontenttype"] = "application/json"
        return msgspec.json.encode(wrapped)[:-1] + b',"data":' + item.data + b"}"
    wrapped["datacontenttype"] = "application/octet-stream"
    wrapped["data_base64"] = base64.b64encode(item.data).decode()
    return msgspec.json.encode(wrapped)


def _binary(event: m.CloudEvent, subject: str) -> Payload:
    attributes = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.isoformat().replace("+00:00", "Z") if event.time else None,
        "correlationid": event.correlationid,
    }
    headers = {f"ce-{k}": _header_value(v) for k, v in attributes.items() if v is not None}
    headers[SUBJECT_HEADER] = subject
    if event.data is None:  # no data: an empty body and no content type (CloudEvents HTTP 3.1)
        return Payload(event.id, b"", headers)
    headers["content-type"] = event.datacontenttype
    return Payload(event.id, msgspec.json.encode(event.data), headers)


# CloudEvents HTTP binding 3.1.3.2: printable ASCII except space, `"` and `%` go as they are.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def _header_value(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE)


def _header_id(nats_headers: Mapping[str, str] | None) -> str | None:
    return (nats_headers or {}).get(bus.MSG_ID)


def _json_or_bytes(data: bytes) -> str:
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return "application/octet-stream"
    return "application/json"
