"""Reading what a JetStream KV bucket holds now, without leaving consumers on the bus.

nats-py reads a bucket through a watcher, an ephemeral consumer that stays on the server for
five minutes after the watcher stops unless told otherwise. A process that lists a bucket
every half second (counting its peers, `libs.lease.Members`) left ~600 idle consumers on the
bus: each one server memory, and each matched against every write to the bucket. The
readers here have the server remove theirs seconds after they are done.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

# How long the server keeps a reader's consumer once it has stopped.
GONE_AFTER_S = 2.0
# How long a reader waits for the next of the current entries before giving up.
READ_WAIT_S = 5.0


async def entries(
    kv: KeyValue, match: str = ">", *, meta_only: bool = False, wait: float = READ_WAIT_S
) -> list[KeyValue.Entry]:
    """The current entry of each key matching `match` (deleted keys left out); with
    `meta_only`, without their values. TimeoutError if they do not all come within `wait`
    of each other (a partial list would mislead)."""
    watcher = await kv.watch(
        match, ignore_deletes=True, meta_only=meta_only, inactive_threshold=GONE_AFTER_S
    )
    found: dict[str, KeyValue.Entry] = {}
    try:
        # nats-py leaves its watcher's methods unannotated; None: all current ones delivered.
        while (entry := await watcher.updates(timeout=wait)) is not None:  # type: ignore[no-untyped-call]
            found[entry.key] = entry
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py: untyped
    return list(found.values())


async def keys(kv: KeyValue, match: str = ">") -> list[str]:
    """The keys matching `match` that hold a value now."""
    return [entry.key for entry in await entries(kv, match, meta_only=True)]
