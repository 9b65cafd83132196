"""The Tiltfile, evaluated against stand-ins for Tilt's builtins (no tilt binary is available).

The Tiltfile is written in the Python-compatible subset of Starlark, so it runs here as Python.
helm() really renders the chart; local() really runs; what the stand-ins record is then checked
the way `tilt up` would check it (a workload for each k8s_resource, each object selector
matching one object, known resource_deps) and against the Dockerfile and the chart.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from . import k8s
from .conftest import NATS_TGZ
from .k8s import CHART, ROOT, Doc

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}


@dataclass
class Tilt:
    """What a Tiltfile asked Tilt to do."""

    helm_bin: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    objects: list[Doc] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    helm_calls: list[dict[str, Any]] = field(default_factory=list)

    def builtins(self) -> dict[str, Any]:
        def local(cmd: str | list[str], quiet: bool = False, **_: Any) -> str:
            path = f"{self.helm_bin.parent}:{os.environ['PATH']}"
            proc = subprocess.run(
                cmd, shell=isinstance(cmd, str), cwd=ROOT, capture_output=True, text=True,
                timeout=300, env={**os.environ, "PATH": path},
            )  # fmt: skip
            assert proc.returncode == 0, f"local({cmd}) failed: {proc.stderr}"
            return proc.stdout

        def helm(
            chart: str, name: str = "", namespace: str = "", values: Any = (), set: Any = ()
        ) -> str:
            self.helm_calls.append({"chart": chart, "name": name, "values": values, "set": set})
            args = [str(self.helm_bin), "template", name, chart]
            args += [f"--values={v}" for v in values] + [f"--set={s}" for s in set]
            if namespace:
                args += ["--namespace", namespace]
            proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        def docker_build(ref: str, context: str, **kwargs: Any) -> None:
            self.images.append({"ref": ref, "context": context, **kwargs})

        def k8s_yaml(blob: str) -> None:
            self.objects.extend(d for d in yaml.safe_load_all(blob) if d)

        def k8s_resource(workload: str = "", new_name: str = "", **kwargs: Any) -> None:
            self.resources[new_name or workload] = {"workload": workload, **kwargs}

        def local_resource(name: str, **kwargs: Any) -> None:
            self.local_resources[name] = kwargs

        def path_exists(p: str) -> bool:
            return (ROOT / p).exists()

        tilt_os = SimpleNamespace(
            path=SimpleNamespace(exists=path_exists, dirname=os.path.dirname),
            getenv=os.environ.get,
            putenv=lambda key, value: None,
        )
        return {
            "version_settings": lambda **_: None,
            "ci_settings": lambda **_: None,
            "local": local,
            "helm": helm,
            "docker_build": docker_build,
            "k8s_yaml": k8s_yaml,
            "k8s_resource": k8s_resource,
            "local_resource": local_resource,
            "decode_yaml_stream": lambda blob: [d for d in yaml.safe_load_all(blob) if d],
            "encode_yaml_stream": lambda docs: yaml.safe_dump_all(docs),
            "sync": lambda src, dest: ("sync", src, dest),
            "fall_back_on": lambda files: ("fall_back_on", files),
            "link": lambda url, name="": (url, name),
            "os": tilt_os,
            "TRIGGER_MODE_MANUAL": "manual",
            "TRIGGER_MODE_AUTO": "auto",
        }


@pytest.fixture(scope="module")
def tilt(helm: Path, chart: Path) -> Tilt:
    recorder = Tilt(helm)
    source = (ROOT / "Tiltfile").read_text()
    namespace: dict[str, Any] = {"__builtins__": __builtins__, **recorder.builtins()}
    exec(compile(source, str(ROOT / "Tiltfile"), "exec"), namespace)
    return recorder


def workloads(tilt: Tilt) -> dict[str, Doc]:
    return {k8s.name(o): o for o in tilt.objects if o["kind"] in WORKLOAD_KINDS}


def test_the_chart_deploys_with_the_dev_values(tilt: Tilt) -> None:
    (call,) = tilt.helm_calls
    assert (ROOT / call["chart"]).resolve() == CHART
    assert [(ROOT / v).resolve() for v in call["values"]] == [CHART / "values-dev.yaml"]
    assert (CHART / "charts" / NATS_TGZ).exists()


def test_every_workload_is_a_configured_resource(tilt: Tilt) -> None:
    """Tilt fails on a k8s_resource naming no workload; a workload left out gets no labels
    and no ordering."""
    configured = {r["workload"] for r in tilt.resources.values() if r["workload"]}
    assert configured == set(workloads(tilt)), (configured, set(workloads(tilt)))
    for name, resource in {**tilt.resources, **tilt.local_resources}.items():
        assert resource.get("labels"), f"{name} has no label"


def test_object_selectors_each_match_one_unclaimed_object(tilt: Tilt) -> None:
    claimed: set[str] = set(workloads(tilt))
    for name, resource in tilt.resources.items():
        for selector in resource.get("objects", []):
            obj_name, _, kind = selector.partition(":")
            matches = [
                o for o in tilt.objects
                if k8s.name(o) == obj_name and (not kind or o["kind"].lower() == kind.lower())
            ]  # fmt: skip
            assert len(matches) == 1, f"{name}: {selector} matches {len(matches)} objects"
            key = f"{obj_name}:{matches[0]['kind']}"
            assert key not in claimed, f"{selector} is claimed twice"
            claimed.add(key)
    # Tilt attaches Services to their workloads by selector; everything else must be claimed.
    loose = [
        k8s.ident(o) for o in tilt.objects
        if o["kind"] not in WORKLOAD_KINDS | {"Service"}
        and f"{k8s.name(o)}:{o['kind']}" not in claimed
    ]  # fmt: skip
    assert not loose, f"objects in no resource: {loose}"


def test_resources_start_in_order(tilt: Tilt) -> None:
    """NATS and the database, then the migration, then the services, then the devices."""
    everything = {**tilt.resources, **tilt.local_resources}
    for name, resource in everything.items():
        for dep in resource.get("resource_deps", []):
            assert dep in everything, f"{name} depends on unknown resource {dep}"

    def deps(name: str) -> set[str]:
        direct = set(everything[name].get("resource_deps", []))
        return direct.union(*(deps(d) for d in direct)) if direct else set()

    assert {"postgres"} <= deps("migrate")
    for service in ("gateway", "actors", "rules", "recorder", "webhooks"):
        assert {"migrate", "nats", "postgres", "redis"} <= deps(service), service
    for device in ("lightbulb", "energy-tracker", "demo-rule"):
        assert "gateway" in deps(device), device


def test_image_builds_the_dev_stage_and_live_updates_into_site_packages(tilt: Tilt) -> None:
    (image,) = tilt.images
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"AS {image['target']}" in dockerfile
    used = {c["image"].split(":")[0] for _, t in k8s.pods(tilt.objects) for c in k8s.containers(t)}
    assert image["ref"] in used, "the built image is not the one the chart runs"
    syncs = [step for step in image["live_update"] if step[0] == "sync"]
    assert {src for _, src, _ in syncs} == {"libs", "services", "devices"}
    for _, src, dest in syncs:
        assert (ROOT / src).is_dir()
        # The dev stage hands exactly these directories to the app user.
        assert dest in dockerfile, f"{dest} is not prepared by the Dockerfile's dev stage"
        assert dest.startswith("/opt/venv/lib/python3.11/site-packages/")


def test_processes_restart_on_a_sync_and_keep_their_entry_point(tilt: Tilt, render: Any) -> None:
    (image,) = tilt.images
    synced = sorted(
        dest for step, *rest in image["live_update"] if step == "sync" for dest in rest[1:]
    )
    plain = {k8s.name(d): d for d in render("dev") if d["kind"] == "Deployment"}
    for d in (o for o in tilt.objects if o["kind"] == "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        assert command[0] == "watchfiles" and sorted(command[-3:]) == synced, command
        if k8s.name(d) not in plain:  # busauth: rendered with the issuer key the Tiltfile makes
            assert k8s.name(d).endswith("-busauth"), k8s.name(d)
            assert "python -m services.busauth" in command
            continue
        original = plain[k8s.name(d)]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert " ".join(original) in command
    assert "watchfiles" in (ROOT / "requirements.txt").read_text(), (
        "watchfiles must be in the image"
    )


def test_gateway_and_nats_are_forwarded(tilt: Tilt) -> None:
    settings = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    assert f"8000:{settings['httpPort']}" in tilt.resources["gateway"]["port_forwards"]
    assert "4222:4222" in tilt.resources["nats"]["port_forwards"]


def test_the_demo_rule_is_stored_by_the_charts_hook_job(tilt: Tilt) -> None:
    """`tilt up` stores the demo rule as `helm install` does: with the chart's hook Job, which
    Tilt applies as a plain Job once the migration (its API key) and the gateway are up."""
    resource = tilt.resources["demo-rule"]
    job = workloads(tilt)[resource["workload"]]
    assert job["kind"] == "Job" and k8s.component(job) == "demo-rule", k8s.ident(job)
    assert {"migrate", "gateway"} <= set(resource["resource_deps"])
    assert "demo-rule" not in tilt.local_resources
