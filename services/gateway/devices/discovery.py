"""Discovery: a device that says hello without being registered enters the registry as
`pending`, for an administrator to approve (`PATCH /devices/{id}` with `lifecycle: active`)
or reject (`rejected`). Its events are refused until it is approved (the actors).

The name and kind are what its hello says (`data.name`, `data.kind`), when they are valid;
else its id and `unknown`. One gateway answers each hello (a queue group); a hello sent while
no gateway listened is not replayed: the device's next hello (a reconnect) enters it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs import messages as m
from libs import subjects
from services.gateway.devices.schemas import Kind
from services.gateway.devices.service import DeviceService

log = logging.getLogger(__name__)

QUEUE = "gateway-discovery"
UNKNOWN_KIND = "unknown"


class Discovery:
    def __init__(self, nc: NATS, devices: DeviceService) -> None:
        self._nc = nc
        self._devices = devices
        self._sub: Subscription | None = None

    async def start(self) -> None:
        hellos = subjects.device_events("*", "hello")
        self._sub = await self._nc.subscribe(hellos, queue=QUEUE, cb=self._on_hello)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_hello(self, msg: Msg) -> None:
        try:
            event = m.cloud_event_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the actors dead-letter it
        if msg.subject != event.nats_subject:
            return
        data = event.data or {}
        name = _valid(data.get("name"), m.Name) or event.subject
        kind = _valid(data.get("kind"), Kind) or UNKNOWN_KIND
        try:
            if await self._devices.discover(event.subject, name, kind):
                log.info("discovered %s (%s): pending approval", event.subject, kind)
        except Exception as exc:  # a registration at the same moment, or the database away
            log.warning("could not enter %s as pending: %r", event.subject, exc)


def _valid(value: Any, annotated: Any) -> str | None:
    try:
        return msgspec.convert(value, annotated)
    except msgspec.ValidationError:
        return None
