"""One active worker at a time: a lease in JetStream KV, renewed by compare-and-set.

The actors' ordering and the rules' once-per-episode firing need a single consumer of
their durable (two would interleave a device's events). Extra workers wait as hot
standbys and take over when the owner's lease expires (it died, or lost the bus),
within `ttl` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from libs import kv as kv_read

log = logging.getLogger(__name__)

BUCKET = "leases"
# The actors' partition leases: a bucket of their own, for its shorter ttl (a KV bucket's ttl
# is bucket-wide), so that a dead process's partitions are taken over within 5 s.
ACTOR_BUCKET = "actor_leases"
ACTOR_TTL_S = 3.0


class Lease:
    def __init__(
        self, js: JetStreamContext, key: str, ttl: float = 6.0, bucket_name: str = BUCKET
    ) -> None:
        self._js = js
        self._key = key
        self._ttl = ttl
        self._bucket_name = bucket_name
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._kv: KeyValue | None = None
        self._revision = 0
        self._written_at = -math.inf  # when the last write that succeeded was sent
        self.held = asyncio.Event()

    @property
    def revision(self) -> int:
        """The lease's KV revision as last written by this worker (taken or renewed): it
        grows with every write to the bucket, so a later holder's is always higher."""
        return self._revision

    def surely_held(self) -> bool:
        """Held, by this process's clock alone: the bus expires the lease no sooner than ttl
        after our last write that it took, so within half of that nobody else can have
        taken it. False after a pause (a stopped process's clock went on): ask the bus."""
        since = time.monotonic() - self._written_at
        return self.held.is_set() and since < self._ttl / 2

    async def still_held(self) -> bool:
        """Whether the bus still has this worker's last write of the lease (one read)."""
        if self._kv is None or not self.held.is_set():
            return False
        try:
            entry = await self._kv.get(self._key)
        except Exception:
            return False
        return entry.revision == self._revision and entry.value == self.owner.encode()

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this worker owns the lease (True) or `stop` is set (False)."""
        waiting_logged = False
        while not stop.is_set():
            if await self.try_acquire():
                return True
            if not waiting_logged:
                log.info("lease %s is held by another worker; standing by", self._key)
                waiting_logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._ttl / 3)
        return False

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (one attempt)."""
        kv = await self._bucket()
        sent = time.monotonic()
        try:
            self._revision = await kv.create(self._key, self.owner.encode())
        except KeyWrongLastSequenceError:
            return False
        self._written_at = sent
        self.held.set()
        log.info("lease %s acquired by %s", self._key, self.owner)
        return True

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await bucket(self._js, self._ttl, self._bucket_name)
        return self._kv

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew while held; clear `held` when a renewal fails (someone else may own it now)."""
        while not stop.is_set() and self.held.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._ttl / 3)
            if stop.is_set():
                break
            try:
                assert self._kv is not None
                sent = time.monotonic()
                self._revision = await self._kv.update(
                    self._key, self.owner.encode(), last=self._revision
                )
                self._written_at = sent
            except Exception as exc:
                log.warning("lease %s lost: %s", self._key, exc)
                self.held.clear()

    async def release(self) -> None:
        """Hand over at once on a clean stop instead of making the standby wait for the ttl."""
        if self._kv is not None and self.held.is_set():
            with contextlib.suppress(Exception):
                await self._kv.delete(self._key, last=self._revision)
            self.held.clear()
            log.info("lease %s released by %s", self._key, self.owner)


async def bucket(js: JetStreamContext, ttl: float, name: str = BUCKET) -> KeyValue:
    return await js.create_key_value(KeyValueConfig(bucket=name, ttl=ttl, storage=StorageType.FILE))


class Members:
    """The workers of one kind alive now, for sharing partitions fairly: each puts a key
    `<kind>-member.<id>` in the leases bucket every ttl/3; the bucket's ttl expires the dead."""

    def __init__(
        self,
        js: JetStreamContext,
        kind: str,
        owner: str,
        ttl: float = 6.0,
        bucket_name: str = BUCKET,
    ) -> None:
        self._js = js
        self._bucket_name = bucket_name
        self._prefix = f"{kind}-member."
        # KV keys allow letters, digits and -_=/. only.
        self._key = self._prefix + re.sub(r"[^A-Za-z0-9_=-]", "_", owner)
        self._ttl = ttl
        self._kv: KeyValue | None = None

    async def beat(self, stop: asyncio.Event) -> None:
        """Say this worker is alive until `stop` is set; then leave at once."""
        self._kv = await bucket(self._js, self._ttl, self._bucket_name)
        while not stop.is_set():
            with contextlib.suppress(Exception):  # the bus is away: the ttl decides
                await self._kv.put(self._key, b"")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._ttl / 3)
        with contextlib.suppress(Exception):
            await self._kv.delete(self._key)

    async def count(self) -> int:
        """How many workers of this kind are alive (at least this one)."""
        if self._kv is None:
            return 1
        try:
            keys = await kv_read.keys(self._kv, self._prefix + ">")
        except Exception:  # the bus is away: this one, at least
            return 1
        return max(1, len(keys))
