"""A TCP relay on loopback between a service and nats-server, for losing messages in flight.

`drop()` makes the relay swallow what the server sends on the connections open now: the server
hands out deliveries that never arrive, as when a connection dies with data in its buffers.
`cut()` then closes those connections (the client reconnects through the relay, which relays
new connections faithfully). Threads, not the test's event loop: the tests start services
with blocking calls, during which the relay must keep working.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from libs import embedded_nats

CHUNK = 64 * 1024


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.port = embedded_nats.free_port()
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: list[_Pair] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def drop(self) -> None:
        """From now on, swallow what the server sends on the connections open now."""
        with self._lock:
            for pair in self._open:
                pair.dropping = True

    def cut(self) -> None:
        """Close the connections open now (the client sees them end and reconnects)."""
        with self._lock:
            pairs, self._open = self._open, []
        for pair in pairs:
            pair.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._open.append(pair)
            pair.start()


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.dropping = False

    def start(self) -> None:
        threading.Thread(target=self._pump, args=(self.client, self.server), daemon=True).start()
        threading.Thread(
            target=self._pump, args=(self.server, self.client, True), daemon=True
        ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool = False) -> None:
        try:
            while data := src.recv(CHUNK):
                if not (downstream and self.dropping):
                    dst.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
