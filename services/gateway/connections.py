"""How many live streams (SSE and WebSocket alike) each principal holds open, capped.

One count for both endpoints, kept on the app's state: a client that opens its
`SMARTHOME_MAX_STREAMS_PER_CLIENT`-th stream (`Settings.max_streams_per_client`, 20 by default)
gets no more until it closes one. SSE answers that with 429 problem details, a WebSocket is
closed with 1013 (try again later).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import TooManyRequestsException

STATE_KEY = "stream_limits"
RETRY_AFTER_S = "5"


class TooManyStreams(TooManyRequestsException):
    """The client holds as many live streams as it may."""


class StreamLimits:
    """Open live streams per client address, at most `per_client` each."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: Counter[str] = Counter()

    def open(self, client: str) -> Callable[[], None]:
        """Count one more stream of `client`; returns the callable that ends it (once).

        Raises TooManyStreams when the client is at its cap.
        """
        if self._open[client] >= self.per_client:
            raise TooManyStreams(
                detail=f"this client has {self.per_client} live streams open, the most it may "
                "(SSE and WebSocket together); close one and try again",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self._open[client] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._open[client] -= 1
            if self._open[client] <= 0:
                del self._open[client]  # the table holds only clients with open streams

        return release

    def count(self, client: str) -> int:
        return self._open[client]


def stream_owner(connection: ASGIConnection) -> str:
    """Whom a stream counts against: its principal (behind a proxy many people share one
    address, and one person may come from many)."""
    user = connection.scope.get("user")
    if user is not None:
        return str(user.actor)
    client = connection.client
    return client.host if client else "unknown"


def install(state: State, per_client: int) -> StreamLimits:
    """Give the app its one count (at start, from the settings)."""
    limits = StreamLimits(per_client)
    state[STATE_KEY] = limits
    return limits


def provide_stream_limits(state: State) -> StreamLimits:
    """The app's one count, installed by `create_app`."""
    return state[STATE_KEY]
