"""What a webhook request carries for one bus message, before it is signed (pure).

A CloudEvent goes out in the CloudEvents HTTP binding the subscription chose: `structured`
(the event as JSON, `application/cloudevents+json`) or `binary` (`data` as the body, the
attributes in `ce-*` headers). Any other bus message (a platform fact) goes out as it is, as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import msgspec

from libs import bus
from libs import messages as m

STRUCTURED = "structured"
BINARY = "binary"
SUBJECT_HEADER = "smarthome-subject"


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
        msg_id = (nats_headers or {}).get(bus.MSG_ID) or fallback_id
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


def _json_or_bytes(data: bytes) -> str:
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return "application/octet-stream"
    return "application/json"
