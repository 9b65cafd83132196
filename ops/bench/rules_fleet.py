"""The rules engine and a big fleet: what registering devices, and state facts no rule
reads, cost the rules process. `python ops/bench/rules.py --fleet 10000 [--rules 100]`.

The set-up is `rules.py`'s (its own nats-server, a fresh database, R meters, R lights and
R threshold rules "meter i above 50 W → turn light i off", plus R/10 selector rules on the
meters' kind and location), then the real `python -m services.rules` is started and:

(F1) registration: D devices (kind `thermometer`, location `fleet/...`, no rule reads
     them) are registered as the gateway does it: rows inserted in `devices` (500 a
     transaction) and, after each commit, one `created` registry fact per device published
     to `system.device.<id>.registry`; CPU seconds of the rules process from the first
     insert until 2 s after the last fact's ack.
(F2) the catch-up: the rules process's CPU seconds from the end of (F1) until its next
     periodic reload (`loaded N rules` in its log, every 30 s) has been logged for 1 s,
     less nothing: idle time costs what it costs.
With `--partitions P` the rules process evaluates P partitions (SMARTHOME_RULES_PARTITIONS):
each partition's durable reads every state fact.

(F3) D state facts of those devices (no rule reads them), published with `publish_async`
     and drained by the rules' durable consumer: CPU seconds, and µs per fact.
(F4) N state facts of the meters (`--facts`, every one read by a rule, all below the line:
     evaluated, nothing fires): facts per second from the first publish until drained, and
     per CPU second of the rules process.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
from harness import BenchError, Child, Results, attribute_fact
from nats.js import JetStreamContext
from rules import Bench, publish_all, state_facts

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import Device, RuleRecord

FLEET_KIND = "thermometer"
FLEET_LOCATION = "fleet/floor/room"
BATCH = 500
SETTLE_S = 2.0
RELOADED = re.compile(r"loaded \d+ rules")
LOADED = re.compile(r"partition (\d+)/\d+: loaded (\d+) rules")


class FleetBench(Bench):
    async def run(self) -> Results:
        js = await self.setup()
        self.env["SMARTHOME_RULES_PARTITIONS"] = str(self.args.partitions)
        db = self.database
        assert db is not None
        a = self.args
        r = self.results
        selectors = max(a.rules // 10, 0)
        await self.store_selector_rules(selectors)
        r.header.append(
            f"{a.fleet:,} devices registered while {a.rules:,} threshold rules on other "
            f"devices (+{selectors} selector rules on their kind/location) run; "
            f"database {db.kind}; {a.partitions} rules partition(s) in one process; "
            f"{a.facts:,} facts read by a rule for (F4)"
        )
        rules, port = await self.start_service("rules", "services.rules")
        await self.wait_ready(rules, port)
        await self.all_loaded(rules, a.rules + selectors)
        fleet = [f"fleet-{self.run_id}-{i:05d}" for i in range(a.fleet)]

        cpu = self.cpu("rules")
        started = time.perf_counter()
        await self.register(js, fleet)
        registered = time.perf_counter() - started
        await asyncio.sleep(SETTLE_S)
        r.add(
            f"(F1) rules CPU registering {a.fleet:,} devices ({registered:.1f} s + {SETTLE_S:g} s)",
            f"{self.cpu('rules') - cpu:.2f} s",
        )

        cpu, started = self.cpu("rules"), time.perf_counter()
        reloads = len(RELOADED.findall(rules.tail(10**9)))
        deadline = time.monotonic() + 40
        while len(RELOADED.findall(rules.tail(10**9))) <= reloads:
            if time.monotonic() > deadline:
                raise BenchError("(F2) no periodic reload within 40 s")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        waited = time.perf_counter() - started
        r.add(
            f"(F2) rules CPU idle until its periodic catch-up ({waited:.0f} s)",
            f"{self.cpu('rules') - cpu:.2f} s",
        )

        cpu, started = self.cpu("rules"), time.perf_counter()
        await self.drain(js, fleet_facts(fleet, self.run_id))
        used = self.cpu("rules") - cpu
        r.add(
            f"(F3) rules CPU for {a.fleet:,} state facts no rule reads "
            f"({time.perf_counter() - started:.1f} s)",
            f"{used:.2f} s",
        )
        r.add("(F3)   per fact", f"{used / a.fleet * 1e6:,.0f} µs")

        if a.rules == 0:
            return r
        cpu, started = self.cpu("rules"), time.perf_counter()
        await self.drain(js, state_facts(self.home, self.run_id, a.facts))
        wall = time.perf_counter() - started
        used = self.cpu("rules") - cpu
        r.add(
            "(F4) facts read by a rule, publish to drained",
            f"{a.facts / wall:,.0f} facts/s",
        )
        r.add("(F4)   per CPU second of the rules process", f"{a.facts / used:,.0f} facts/s")
        return r

    async def all_loaded(self, rules: Child, count: int) -> None:
        """Until the partitions' last loads (`partition i/P: loaded k rules`) add up."""
        deadline = time.monotonic() + 30
        while True:
            last = dict(LOADED.findall(rules.tail(10**9)))
            if len(last) == self.args.partitions and sum(map(int, last.values())) == count:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"rules: not all {count} rules loaded within 30 s: {last}")
            await asyncio.sleep(0.1)

    def cpu(self, name: str) -> float:
        return self.sampler.cpu_seconds()[name]

    async def store_selector_rules(self, count: int) -> None:
        """Rules on the meters' kind and location: a fleet device is of neither."""
        assert self.database is not None
        specs = [
            m.RuleSpec(
                name=f"bench: any meter in bench/ above {1000 + i} W",
                trigger=m.ThresholdTrigger(
                    attribute="power_w",
                    selector=m.Selector(kind="energy_meter", location="bench/floor")
                    if i % 2
                    else m.Selector(location="bench/floor"),
                    above=1000.0 + i,
                ),
                actions=[m.NotifyAction(message="too much")],
                id=f"bench-{self.run_id}-sel-{i:03d}",
            )
            for i in range(count)
        ]
        engine = make_engine(self.database.url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                session.add_all(
                    RuleRecord(id=s.id, name=s.name, spec=msgspec.to_builtins(s), enabled=True)
                    for s in specs
                )
        finally:
            await engine.dispose()

    async def register(self, js: JetStreamContext, fleet: list[str]) -> None:
        """As the gateway does: rows committed, then their registry facts published."""
        assert self.database is not None
        engine = make_engine(self.database.url)
        try:
            sessions = make_sessionmaker(engine)
            for start in range(0, len(fleet), BATCH):
                ids = fleet[start : start + BATCH]
                async with sessions.begin() as session:
                    session.add_all(
                        Device(id=d, name=d, kind=FLEET_KIND, location=FLEET_LOCATION) for d in ids
                    )
                failed = await publish_all(js, [registry_fact(d) for d in ids])
                if failed:
                    raise BenchError(f"(F1): {failed} registry facts not published")
        finally:
            await engine.dispose()

    async def drain(self, js: JetStreamContext, facts: list[tuple[str, bytes, str]]) -> None:
        """Publish the facts and wait until the rules' durable has nothing left."""
        failed = await publish_all(js, facts)
        if failed:
            raise BenchError(f"{failed} state facts not published")
        deadline = time.monotonic() + 120
        while True:
            left = 0
            for index in range(self.args.partitions):  # each partition reads every fact
                info = await js.consumer_info(
                    subjects.SYSTEM_STREAM, bus.rules_facts_durable(index), timeout=2
                )
                left += info.num_pending + info.num_ack_pending
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the rules did not drain SYSTEM in time ({left} left)")
            await asyncio.sleep(0.02)


def registry_fact(device_id: str) -> tuple[str, bytes, str]:
    fact = m.RegistryFact(
        device_id=device_id,
        change=m.RegistryChange.CREATED,
        actor="bench",
        correlation_id=device_id,
        time=m.now(),
        device=m.RegistryEntry(
            id=device_id, name=device_id, kind=FLEET_KIND, location=FLEET_LOCATION
        ),
    )
    return subjects.device_registry(device_id), m.encode(fact), f"registry:{device_id}"


def fleet_facts(fleet: list[str], run_id: str) -> list[tuple[str, bytes, str]]:
    at = m.now()
    out = []
    for n, device in enumerate(fleet):
        attributes: dict[str, m.AttributeValue] = {"temperature_c": 20.0 + n % 10}
        fact = attribute_fact(device, 1, attributes, f"bench-{run_id}-fleet-{n}", at)
        out.append((subjects.device_state(device), m.encode(fact), f"bench:{run_id}:f{n}"))
    return out
