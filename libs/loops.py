"""What an object that lives on one event loop shares: that loop, looked up once.

`asyncio.get_running_loop()` makes a system call (getpid) each time in Python 3.11 (3.12
dropped it), and the consumer's and the actors' hot paths asked for the loop several times
a message: at a trickle of one-message batches, getpid alone was ~6 % of the actors' CPU
(py-spy --native at the soak's 1,000 events/s)."""

from __future__ import annotations

import asyncio
import functools


class OnOneLoop:
    """`self._loop`: the running loop when first asked for, kept. For objects made and used
    on one loop only (a connection's, a service's), as everything here is."""

    @functools.cached_property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()
