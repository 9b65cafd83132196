"""`smarthome events ...`: follow the bus live (Server-Sent Events) and publish to it."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from services.ctl.client import Api, decode_json, session
from services.ctl.errors import ApiError, CtlError, Group, Unreachable
from services.ctl.output import JsonFlag, emit_json, json_line, note, record

app = Group(help="Follow the event bus live, publish to it.", no_args_is_help=True)

# The gateway writes a comment every 15 s: a read this long without one is a lost connection.
READ_TIMEOUT_S = 45.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
RETRIED = (429, 502, 503, 504)


@dataclass
class Frame:
    """One Server-Sent Event: `id` the stream sequence, `event` the subject."""

    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)


def frames(lines: Iterator[str]) -> Iterator[Frame]:
    """The events of an SSE body (comments, such as the heartbeat, left out)."""
    frame = Frame()
    for line in lines:
        if line == "":
            if frame.event is not None or frame.data:
                yield frame
            frame = Frame()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            frame.data.append(value)
        elif name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value


class Lost(Exception):
    """The stream ended or fell behind; it is followed again from the last sequence seen."""


def _print_event(seq: int, subject: str, data: Any, as_json: bool) -> None:
    if as_json:
        json_line({"seq": seq, "subject": subject, "data": data})
    else:
        if isinstance(data, dict) and "specversion" in data:  # a CloudEvent: what it says
            data = data.get("data")
        compact = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        sys.stdout.write(f"{seq:>8}  {subject}  {compact}\n")
        sys.stdout.flush()


class Tail:
    """Follows one subject filter across connections: each one resumes after the last
    sequence printed (`Last-Event-ID`), or after `--since-seq` before anything was."""

    def __init__(
        self, api: Api, subject: str, since_seq: int | None, count: int | None, as_json: bool
    ) -> None:
        self.api = api
        self.params = {"subject": subject, "since_seq": since_seq}
        self.remaining = count
        self.as_json = as_json
        self.last: int | None = None
        self.connected = False  # once: a later failure is retried, a first one is not

    def run(self) -> None:
        delay = RECONNECT_MIN_S
        while self.remaining is None or self.remaining > 0:
            before = self.last
            try:
                self._follow()
                continue
            except Lost as exc:
                reason = str(exc)
            except Unreachable as exc:
                if not self.connected:
                    raise
                reason = exc.message
            except ApiError as exc:
                if exc.status not in RETRIED:
                    raise
                reason = exc.message
            if self.last != before:  # that connection delivered: the next one may too
                delay = RECONNECT_MIN_S
            after = f" after {self.last}" if self.last is not None else ""
            note(f"stream lost ({reason}); following again{after} in {delay:g}s")
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _follow(self) -> None:
        headers = {"Last-Event-ID": str(self.last)} if self.last is not None else None
        with self.api.stream(
            "/events/stream", params=self.params, headers=headers, read_timeout=READ_TIMEOUT_S
        ) as response:
            self.connected = True
            for frame in frames(response.iter_lines()):
                text = "\n".join(frame.data)
                if frame.event == "error":  # fell behind: resume from the last one seen
                    raise Lost(text)
                try:
                    data: Any = json.loads(text)
                except ValueError:
                    data = text
                if frame.id and frame.id.isdigit():
                    self.last = int(frame.id)
                _print_event(self.last or 0, frame.event or "", data, self.as_json)
                if self.remaining is not None:
                    self.remaining -= 1
                    if self.remaining == 0:
                        return
        raise Lost("the gateway ended the stream")


@app.command("tail")
def tail(
    subject: Annotated[
        str, typer.Option("--subject", "-s", help="Subject filter: * one token, > the rest.")
    ] = "events.>",
    since_seq: Annotated[
        int | None,
        typer.Option(
            "--since-seq", min=0, help="Start after this stream sequence (default: new only)."
        ),
    ] = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after this many events.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Follow messages live; a lost connection is resumed where it stopped (Last-Event-ID)."""
    try:
        with session() as api:
            Tail(api, subject, since_seq, count, as_json).run()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def make_event(device_id: str, event_type: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """A CloudEvent from this CLI: `source` says so, `id` is new (the bus de-duplicates on it)."""
    event: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "source": "smarthome-cli",
        "type": event_type,
        "subject": device_id,
        "specversion": "1.0",
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
    }
    if data is not None:
        event["data"] = data
    return event


@app.command("publish")
def publish(
    device_id: Annotated[str | None, typer.Argument(help="The device the event is about.")] = None,
    event_type: Annotated[
        str | None, typer.Argument(help="telemetry, state, heartbeat, or a custom type.")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="A JSON object.")] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="CloudEvents (JSON: one, or an array) instead."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Publish a CloudEvent to the bus; prints where it was stored."""
    body: Any
    if file is not None:
        try:
            body = decode_json(file.read_text(), str(file))
        except OSError as exc:
            raise CtlError(f"cannot read {file}: {exc.strerror}") from None
    elif device_id and event_type:
        payload = decode_json(data, "--data") if data is not None else None
        if payload is not None and not isinstance(payload, dict):
            raise CtlError("--data: a JSON object")
        body = make_event(device_id, event_type, payload)
    else:
        raise CtlError("give DEVICE_ID and EVENT_TYPE, or --file")
    with session() as api:
        answer = api.post("/events", body)
    if as_json:
        emit_json(answer)
    else:
        for result in answer.get("results", [answer]):
            record(result)
