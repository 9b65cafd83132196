"""`python -m services.busauth`: who may connect to the bus, and with what rights.

It answers nats-server's auth callout (`$SYS.REQ.USER.AUTH`, a queue group: run several)
from the registry, and closes the connections of identities revoked since (`kicker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from libs import bus, bus_auth, bus_grants, runtime, subjects
from libs.settings import Settings
from services.busauth.authorizer import Admission, Authorizer, Refused, Revocations
from services.busauth.kicker import Kicker

log = logging.getLogger("services.busauth")

IN_FLIGHT = 64

ANSWERS = Counter("smarthome_busauth_answers_total", "Callout answers", ["outcome"])
LATENCY = Histogram(
    "smarthome_busauth_answer_seconds",
    "From the server's request to the answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


def issuer_seed(settings: Settings) -> bytes:
    """The signing key: from the environment (a Kubernetes Secret), else the data dir's."""
    if settings.bus_issuer_seed:
        return settings.bus_issuer_seed.encode()
    return bus_auth.ensure_issuer_seed(settings.data_dir / "bus")


class Callout:
    """One answer per connecting client: admitted with its grant, or refused."""

    def __init__(self, nc: NATS, authorizer: Authorizer, seed: bytes) -> None:
        self._nc = nc
        self._authorizer = authorizer
        self._signer = bus_auth.issuer(seed)
        # nats-py runs a subscription's callbacks one after another: a reconnect storm is
        # answered IN_FLIGHT at a time instead (each mostly waits on the database).
        self._room = asyncio.Semaphore(IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    async def dispatch(self, msg: Msg) -> None:
        await self._room.acquire()
        task = asyncio.create_task(self.on_request(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.release()

    async def on_request(self, msg: Msg) -> None:
        began = time.perf_counter()
        try:
            request = bus_auth.decode_request(msg.data)
        except Exception as exc:  # not the server's: nothing to answer
            log.warning("unreadable auth callout request: %s", exc)
            return
        try:
            admission: Admission = await self._authorizer.admit(request)
            token = bus_auth.user_jwt(
                self._signer, request, admission.name, admission.grant, admission.expires_s
            )
            answer, outcome = bus_auth.allow(self._signer, request, token), "admitted"
        except Refused as exc:
            log.info("refused %s (%s): %s", request.username or "-", request.client_type, exc)
            answer, outcome = bus_auth.deny(self._signer, request, str(exc)), "refused"
        except Exception as exc:  # the database is away: refused now, the client retries
            log.warning("callout for %s failed: %r", request.username, exc)
            answer, outcome = bus_auth.deny(self._signer, request, "try again later"), "error"
        if msg.reply:
            try:
                await self._nc.publish(msg.reply, answer)
            except Exception as exc:  # the connection is going: the server times the client out
                log.warning("could not answer the callout for %s: %r", request.username, exc)
                return
        ANSWERS.labels(outcome).inc()
        LATENCY.observe(time.perf_counter() - began)


async def work(p: runtime.Process) -> None:
    system = await bus.connect(
        p.settings.effective_nats_url,
        "busauth-system",
        bus_grants.SYSTEM_USER,
        p.settings.nats_system_password,
        ca=p.settings.nats_tls_ca,
    )
    revocations = Revocations()
    callout = Callout(p.nc, Authorizer(p.sessions, revocations), issuer_seed(p.settings))
    answering = asyncio.Event()
    p.ready_when(answering)
    # Answering first: devices connect while the gateway may still be provisioning.
    sub = await p.nc.subscribe(
        bus_auth.CALLOUT_SUBJECT, queue=bus_auth.CALLOUT_QUEUE, cb=callout.dispatch
    )
    answering.set()
    try:
        if await p.provisioned([(subjects.SYSTEM_STREAM, bus.BUSAUTH_DURABLE)]):
            await Kicker(p.nc, system, revocations, p.sessions).run(p.stop)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await system.drain()


def keygen() -> None:
    """`python -m services.busauth keygen`: a new issuer key, for a deployment's Secret."""
    seed = bus_auth.new_issuer_seed()
    print(f"seed: {seed.decode()}\npublic key: {bus_auth.issuer_public_key(seed)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["keygen"]:
        keygen()
    else:
        runtime.serve("busauth", work)
