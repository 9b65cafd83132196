"""A reviewer's questions, asked of every rendered manifest (default, dev and prod values).

Each answer is cross-checked against the code the manifest points at: the entry points, the
settings libs/settings.py reads, the ports and paths the processes serve.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from libs import settings as settings_mod

from . import k8s
from .conftest import RELEASE, Render
from .k8s import ROOT, Doc

Rendered = tuple[str, list[Doc]]

SETTINGS = ROOT / "libs" / "settings.py"
HEALTH = ROOT / "libs" / "health.py"
PROBE_PATHS = {"/health/live", "/health/ready"}

# What each kind of process must be told in Kubernetes (else it falls back to an embedded
# default that is wrong in a cluster: SQLite, an in-process cache, a local nats-server,
# 127.0.0.1, no probe port, a data dir on the read-only root filesystem).
REQUIRED_ENV = {
    "api": {
        "NATS_URL", "DATABASE_URL", "REDIS_URL", "SMARTHOME_DATA_DIR", "SMARTHOME_HTTP_HOST",
        "SMARTHOME_HTTP_PORT", "SMARTHOME_JWT_SECRET", "SMARTHOME_ALLOWED_HOSTS",
        "SMARTHOME_ALLOWED_ORIGINS", "SMARTHOME_TRUSTED_PROXIES",
    },
    "worker": {
        "NATS_URL", "DATABASE_URL", "REDIS_URL", "SMARTHOME_DATA_DIR", "SMARTHOME_HTTP_HOST",
        "SMARTHOME_HEALTH_PORT",
    },
    "device": {
        "NATS_URL", "SMARTHOME_API_URL", "SMARTHOME_DEVICE_ID", "SMARTHOME_API_TOKEN",
        "SMARTHOME_DEVICE_LOCATION", "SMARTHOME_DEVICE_HEARTBEAT_FILE",
    },
    "migrate": {
        "DATABASE_URL", "SMARTHOME_DATA_DIR", "SMARTHOME_ADMIN_PASSWORD",
        "SMARTHOME_METRICS_API_KEY",
    },
    "demo-rule": {"SMARTHOME_API_URL", "SMARTHOME_API_TOKEN"},
}  # fmt: skip
# The migration Job runs `smarthome migrate`: the schema, the first administrator, the
# Prometheus key (services/launcher/cli.py).
MIGRATE_MODULE = "services.launcher"
# The demo rule's hook Job stores the demo home and rule through the API (test_demo.py).
DEMO_RULE_MODULE = "services.launcher.demo"
GATEWAY = "services.gateway"


def kind_of(module: str) -> str:
    if module == "services.gateway":
        return "api"
    if module == MIGRATE_MODULE:
        return "migrate"
    if module == DEMO_RULE_MODULE:
        return "demo-rule"
    return "device" if module.startswith("devices.") else "worker"


def entry_module(container: Doc) -> str:
    command = container.get("command", [])
    assert command[:2] == ["python", "-m"] and len(command) == 3, (
        f"container {container['name']} runs {command}, not `python -m <module>`"
    )
    return command[2]


def device_sources() -> list[Path]:
    """Devices are separate programs (devices/*) sharing devices/platform_link.py."""
    return k8s.python_sources(ROOT / "devices")


def env_read_by(module: str) -> set[str]:
    """What a process reads: libs/settings.py for the services; for a device, what the devices'
    own code reads (and the settings too, should it ever load them)."""
    settings = k8s.env_names_read([SETTINGS])
    if kind_of(module) == "demo-rule":  # an API client: no settings of the platform's
        return k8s.env_names_read(k8s.module_sources(module))
    if kind_of(module) == "migrate":
        return settings | k8s.env_names_read(k8s.python_sources(k8s.module_dir(module)))
    if kind_of(module) != "device":
        return settings
    sources = device_sources()
    text = "\n".join(p.read_text() for p in sources)
    uses_settings = any(m in text for m in ("libs.settings", "import settings", "libs.runtime"))
    return k8s.env_names_read(sources) | (settings if uses_settings else set())


def app_containers(docs: list[Doc]) -> list[tuple[Doc, Doc, str]]:
    """(workload, container, module) for every smarthome process, the migration included."""
    out = []
    for workload, template in k8s.pods(docs):
        if k8s.is_ours(workload) and workload["kind"] in {"Deployment", "Job"}:
            for container in k8s.containers(template):
                out.append((workload, container, entry_module(container)))
    return out


def env_map(docs: list[Doc], container: Doc) -> dict[str, str | None]:
    return {e["name"]: k8s.env_value(docs, e) for e in container.get("env", [])}


def migrate_job(docs: list[Doc]) -> Doc:
    (job,) = [j for j in k8s.by_kind(docs, "Job") if k8s.component(j) == "migrate"]
    return job


def test_each_deployment_runs_a_real_entry_point(rendered: Rendered) -> None:
    """`python -m X`: X is importable and runnable as a module (a package needs __main__)."""
    _, docs = rendered
    if importlib.util.find_spec("libs") is None:
        # Not installed (pip install -e .): import from the checkout, as the image's
        # site-packages would.
        sys.path.insert(0, str(ROOT))
    missing = []
    for workload, _, module in app_containers(docs):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{module}.__main__")
        if spec is None:
            missing.append(f"{k8s.ident(workload)}: python -m {module}")
    assert not missing, "entry points that do not exist:\n" + "\n".join(missing)


def test_every_env_var_the_chart_sets_is_read_by_the_code(rendered: Rendered) -> None:
    values_name, docs = rendered
    unread = []
    for workload, container, module in app_containers(docs):
        readable = env_read_by(module)
        for var in env_map(docs, container):
            if var not in readable:
                unread.append(f"{k8s.ident(workload)}: {var}")
    assert not unread, (
        f"[{values_name}] set by the chart, read by no code (libs/settings.py, devices/*):\n"
        + "\n".join(unread)
    )


def test_every_process_gets_the_settings_it_needs(rendered: Rendered) -> None:
    values_name, docs = rendered
    problems = []
    for workload, container, module in app_containers(docs):
        env = env_map(docs, container)
        kind = kind_of(module)
        for var in sorted(REQUIRED_ENV[kind] - env.keys()):
            problems.append(f"{k8s.ident(workload)}: {var} is not set")
        if kind in {"api", "worker"} and env.get("SMARTHOME_HTTP_HOST") != "0.0.0.0":
            problems.append(f"{k8s.ident(workload)}: SMARTHOME_HTTP_HOST is not 0.0.0.0")
        data_dir = env.get("SMARTHOME_DATA_DIR")
        template = k8s.pod_template(workload)
        assert template is not None
        writable = {v["name"] for v in template["spec"].get("volumes", []) if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if data_dir is not None and mounts.get(data_dir) not in writable:
            problems.append(f"{k8s.ident(workload)}: SMARTHOME_DATA_DIR={data_dir} is no emptyDir")
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_the_settings_values_are_ones_the_code_accepts(rendered: Rendered) -> None:
    _, docs = rendered
    (cm,) = [d for d in k8s.by_kind(docs, "ConfigMap") if k8s.name(d).endswith("-settings")]
    data = cm["data"]
    for var in ("SMARTHOME_HTTP_PORT", "SMARTHOME_HEALTH_PORT"):
        assert 0 < int(data[var]) < 65536
    assert float(data["SMARTHOME_HEARTBEAT_TIMEOUT"]) > 0
    assert data["SMARTHOME_LOG_LEVEL"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    assert data["NATS_URL"].startswith(("nats://", "tls://"))
    gateway = [d for d in k8s.by_kind(docs, "Service") if k8s.component(d) == "gateway"]
    host, _, port = data["SMARTHOME_API_URL"].removeprefix("http://").partition(":")
    assert (host, int(port)) == (k8s.name(gateway[0]), gateway[0]["spec"]["ports"][0]["port"])
    for secret in k8s.by_kind(docs, "Secret"):
        for key, raw in secret.get("data", {}).items():
            value = base64.b64decode(raw).decode()
            if key == "database-url":
                assert value.startswith(("postgresql://", "postgres://")), value
            if key == "redis-url":
                assert value.startswith(("redis://", "rediss://")), value


def served_paths(module: str) -> tuple[str, set[str]]:
    """Which variable names a process's probe port, and the probe paths it serves there."""
    if kind_of(module) == "api":
        literals = k8s.string_literals(k8s.python_sources(k8s.module_dir(module)))
        # A full path, or a controller path ("/health") plus its route ("/live").
        paths = {
            p for p in PROBE_PATHS if p in literals or {"/health", p[len("/health") :]} <= literals
        }
        return "SMARTHOME_HTTP_PORT", paths
    # Workers serve libs/health.py's responder, started by libs.runtime.serve.
    text = "\n".join(p.read_text() for p in k8s.python_sources(k8s.module_dir(module)))
    if "runtime.serve(" in text or "health.serve" in text:
        return "SMARTHOME_HEALTH_PORT", k8s.string_literals([HEALTH]) & PROBE_PATHS
    return "SMARTHOME_HEALTH_PORT", set()


def test_probes_hit_paths_and_ports_the_processes_serve(rendered: Rendered) -> None:
    values_name, docs = rendered
    problems = []
    for workload, container, module in app_containers(docs):
        if workload["kind"] != "Deployment":
            continue
        who = k8s.ident(workload)
        if kind_of(module) == "device":
            # A device serves no HTTP: its probes read its heartbeat file (test_demo.py).
            http = [k for k, v in container.items() if k.endswith("Probe") and "httpGet" in v]
            if container.get("ports") or http:
                problems.append(f"{who}: ports or HTTP probes, but {module} serves no HTTP")
            continue
        port_var, paths = served_paths(module)
        env = env_map(docs, container)
        listen = env.get(port_var)
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_kind)
            if not probe or "httpGet" not in probe:
                problems.append(f"{who}: no HTTP {probe_kind}")
                continue
            get = probe["httpGet"]
            port = k8s.container_port(container, get["port"])
            if listen is None or port != int(listen):
                problems.append(f"{who}: {probe_kind} on port {port}, not {port_var}={listen}")
            if get["path"] not in paths:
                problems.append(f"{who}: {probe_kind} {get['path']} is not served by {module}")
        ready = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
        if ready != "/health/ready":
            problems.append(
                f"{who}: readiness is {ready}, not /health/ready (bus and database reachable)"
            )
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_stateful_sets_have_probes(rendered: Rendered) -> None:
    """In-chart Postgres and Redis, and the NATS servers (not the NATS chart's sidecars: its
    config reloader and metrics exporter)."""
    _, docs = rendered
    for workload in k8s.by_kind(docs, "StatefulSet"):
        for container in k8s.containers(workload["spec"]["template"]):
            if not k8s.is_ours(workload) and container["name"] != "nats":
                continue
            for probe_kind in ("readinessProbe", "livenessProbe"):
                assert container.get(probe_kind), (
                    f"{k8s.ident(workload)}/{container['name']}: no {probe_kind}"
                )


def test_every_pod_runs_as_non_root_with_a_locked_down_container(rendered: Rendered) -> None:
    values_name, docs = rendered
    problems = []
    for workload, template in k8s.pods(docs):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        for c in k8s.containers(template):
            who = f"{k8s.ident(workload)}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
                problems.append(f"{who}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{who}: privilege escalation allowed")
            if sc.get("privileged"):
                problems.append(f"{who}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{who}: writable root filesystem")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{who}: capabilities not dropped")
            if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{who}: no RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{k8s.ident(workload)}: mounts a service account token")
        if k8s.is_ours(workload) and spec.get("enableServiceLinks") is not False:
            # A Service named <release>-nats would inject SMARTHOME_NATS_PORT=tcp://...
            problems.append(f"{k8s.ident(workload)}: service links on")
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_every_container_has_requests_and_limits(rendered: Rendered) -> None:
    values_name, docs = rendered
    problems = []
    for workload, template in k8s.pods(docs):
        for c in k8s.containers(template):
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            if not {"cpu", "memory"} <= requests.keys() or "memory" not in limits:
                problems.append(f"{k8s.ident(workload)}/{c['name']}: resources {res}")
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_deployments_spread_and_roll_without_downtime(rendered: Rendered) -> None:
    values_name, docs = rendered
    for d in k8s.by_kind(docs, "Deployment"):
        strategy = d["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0, k8s.ident(d)
        spread = d["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        if values_name == "dev":
            continue  # one minikube node
        keys = {c["topologyKey"] for c in spread}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, k8s.ident(d)
        for c in spread:
            assert k8s.selector_matches(
                c["labelSelector"], d["spec"]["template"]["metadata"]["labels"]
            )


def test_references_between_objects_resolve(rendered: Rendered) -> None:
    """Selectors select, names name, ports exist: what `kubectl apply` would not tell."""
    values_name, docs = rendered
    problems = []
    pod_sets = [(w, t) for w, t in k8s.pods(docs) if w["kind"] != "Job"]

    def selected(selector: Doc | None) -> list[tuple[Doc, Doc]]:
        return [
            (w, t)
            for w, t in pod_sets
            if k8s.selector_matches(selector, t["metadata"].get("labels", {}))
        ]

    for svc in k8s.by_kind(docs, "Service"):
        pods = selected(svc["spec"].get("selector"))
        if not pods:
            problems.append(f"{k8s.ident(svc)} selects no pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w, t in pods:
                if not any(k8s.container_port(c, target) for c in k8s.containers(t)):
                    problems.append(f"{k8s.ident(svc)}: {k8s.ident(w)} has no port {target}")
    for kind in ("HorizontalPodAutoscaler",):
        for hpa in k8s.by_kind(docs, kind):
            ref = hpa["spec"]["scaleTargetRef"]
            target = k8s.find(docs, ref["kind"], ref["name"])
            if target is None:
                problems.append(f"{k8s.ident(hpa)} scales a missing {ref['kind']}/{ref['name']}")
            elif "replicas" in target["spec"]:
                problems.append(
                    f"{k8s.ident(target)} sets replicas although {k8s.ident(hpa)} owns them"
                )
    for so in k8s.by_kind(docs, "ScaledObject"):
        if k8s.find(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"]) is None:
            problems.append(f"{k8s.ident(so)} scales a missing Deployment")
    for pdb in k8s.by_kind(docs, "PodDisruptionBudget"):
        if not selected(pdb["spec"]["selector"]):
            problems.append(f"{k8s.ident(pdb)} selects no pods")
    # A Job's pods come and go (the migration, the demo rule): their policies wait for them.
    jobs = {k8s.component(j) for j in k8s.by_kind(docs, "Job")} | {"migrate"}
    for np in k8s.by_kind(docs, "NetworkPolicy"):
        if not selected(np["spec"]["podSelector"]) and k8s.component(np) not in jobs:
            problems.append(f"{k8s.ident(np)} selects no pods")
    services = k8s.by_kind(docs, "Service")
    for sm in k8s.by_kind(docs, "ServiceMonitor"):
        ports = {
            p.get("name")
            for s in services
            if k8s.selector_matches(sm["spec"]["selector"], k8s.labels(s))
            for p in s["spec"]["ports"]
        }
        for endpoint in sm["spec"]["endpoints"]:
            if endpoint["port"] not in ports:
                problems.append(f"{k8s.ident(sm)}: no selected Service has port {endpoint['port']}")
    for ing in k8s.by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = k8s.find(docs, "Service", backend["name"])
                if svc is None or backend["port"].get("name") not in {
                    p.get("name") for p in svc["spec"]["ports"]
                }:
                    problems.append(f"{k8s.ident(ing)}: backend {backend} does not exist")
    for workload, template in k8s.pods(docs):
        spec = template["spec"]
        sa = spec.get("serviceAccountName")
        if k8s.is_ours(workload) and sa and k8s.find(docs, "ServiceAccount", sa) is None:
            problems.append(f"{k8s.ident(workload)}: ServiceAccount {sa} is not rendered")
        for c in k8s.containers(template):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = k8s.find(docs, "ConfigMap", ref["name"])
                    if cm is None or ref["key"] not in cm.get("data", {}):
                        problems.append(f"{k8s.ident(workload)}: ConfigMap key {ref} missing")
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                secret = ref and k8s.find(docs, "Secret", ref["name"])
                if secret and ref["key"] not in secret.get("data", {}):
                    problems.append(f"{k8s.ident(workload)}: Secret key {ref} missing")
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_only_the_gateway_is_reachable_from_outside(rendered: Rendered) -> None:
    values_name, docs = rendered
    policies = k8s.by_kind(docs, "NetworkPolicy")
    for workload, template in k8s.pods(docs):
        pod_labels = template["metadata"].get("labels", {})
        if not k8s.is_ours(workload) or k8s.component(workload) == "test":
            continue
        mine = [p for p in policies if k8s.selector_matches(p["spec"]["podSelector"], pod_labels)]
        types = {t for p in mine for t in p["spec"]["policyTypes"]}
        assert {"Ingress", "Egress"} <= types, f"{k8s.ident(workload)} is not isolated"
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                open_to_all = not rule.get("from")
                if open_to_all:
                    assert k8s.component(workload) == "gateway", (
                        f"[{values_name}] {k8s.ident(policy)} opens {k8s.ident(workload)} to anyone"
                    )
    for store in ("postgresql", "redis"):
        for policy in [p for p in policies if k8s.component(p) == store]:
            (rule,) = policy["spec"]["ingress"]
            (peer,) = rule["from"]
            allowed = set(peer["podSelector"]["matchExpressions"][0]["values"])
            services = {"gateway", "actors", "rules", "recorder", "webhooks", "busauth"}
            assert allowed <= services | {"migrate"}, allowed


def _nats_open_ports(docs: list[Doc]) -> list[tuple[set[int], list[Doc]]]:
    """(ports, peers) of the NATS NetworkPolicy's rules other than the release pods' own."""
    release_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}
    (policy,) = [
        p
        for p in k8s.by_kind(docs, "NetworkPolicy")
        if k8s.is_ours(p) and k8s.component(p) == "nats"
    ]
    return [
        ({p["port"] for p in rule.get("ports", [])}, rule.get("from", []))
        for rule in policy["spec"]["ingress"]
        if rule.get("from") != [release_pods]
    ]


def test_mqtt_devices_reach_the_nats_mqtt_port_and_nothing_else(rendered: Rendered) -> None:
    """NATS listens for MQTT on 1883, its Service exposes it, and from outside the release
    that port is the only one of NATS open to anyone."""
    values_name, docs = rendered
    (conf,) = [c for c in k8s.by_kind(docs, "ConfigMap") if k8s.name(c).endswith("-nats-config")]
    assert re.search(r'"mqtt": \{\s*"port": 1883', conf["data"]["nats.conf"]), values_name
    (service,) = [s for s in k8s.by_kind(docs, "Service") if k8s.name(s).endswith("-nats")]
    assert {"name": "mqtt", "port": 1883} in [
        {"name": p["name"], "port": p["port"]} for p in service["spec"]["ports"]
    ], values_name
    open_to_anyone = [ports for ports, peers in _nats_open_ports(docs) if not peers]
    assert open_to_anyone == [{1883}], f"[{values_name}] {open_to_anyone}"


def test_mqtt_from_narrows_who_reaches_the_mqtt_port(render: Render) -> None:
    home = {"ipBlock": {"cidr": "192.168.1.0/24"}}
    docs = render("default", "--set-json", f"networkPolicy.mqttFrom=[{json.dumps(home)}]")
    assert _nats_open_ports(docs) == [({1883}, [home])]


def test_the_migration_is_a_hook_that_runs_before_the_new_code(render: Render) -> None:
    for values_name, phases in {
        "default": "post-install,pre-upgrade",  # the in-chart Postgres is part of the release
        "prod": "pre-install,pre-upgrade",
    }.items():
        docs = render(values_name)
        job = migrate_job(docs)
        assert k8s.annotations(job)["helm.sh/hook"] == phases, values_name
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", MIGRATE_MODULE]
        assert container["args"] == ["migrate"]
        literals = k8s.string_literals(k8s.python_sources(k8s.module_dir(MIGRATE_MODULE)))
        assert "migrate" in literals, "`smarthome migrate` is no command of the launcher"
        # What the Job uses must exist when a pre-install hook runs: hooks or pre-existing.
        weight = int(k8s.annotations(job)["helm.sh/hook-weight"])
        sa = k8s.find(docs, "ServiceAccount", job["spec"]["template"]["spec"]["serviceAccountName"])
        assert sa is not None and int(k8s.annotations(sa)["helm.sh/hook-weight"]) < weight
        assert k8s.annotations(sa)["helm.sh/hook"] == phases
        (env,) = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
        secret = k8s.find(docs, "Secret", env["valueFrom"]["secretKeyRef"]["name"])
        if phases.startswith("pre-install") and secret is not None:
            assert int(k8s.annotations(secret)["helm.sh/hook-weight"]) < weight


def test_dev_runs_one_of_everything_and_prod_is_highly_available(render: Render) -> None:
    dev = render("dev")
    assert {d["spec"]["replicas"] for d in k8s.by_kind(dev, "Deployment")} == {1}
    assert {k8s.component(d) for d in k8s.by_kind(dev, "Deployment")} >= {
        "lightbulb",
        "energy-tracker",
    }
    (dev_nats,) = [s for s in k8s.by_kind(dev, "StatefulSet") if k8s.name(s).endswith("-nats")]
    assert dev_nats["spec"]["replicas"] == 1

    prod = render("prod")
    (nats,) = [s for s in k8s.by_kind(prod, "StatefulSet") if k8s.name(s).endswith("-nats")]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["volumeClaimTemplates"], "JetStream file storage needs a PVC"
    (nats_cm,) = [c for c in k8s.by_kind(prod, "ConfigMap") if k8s.name(c).endswith("-nats-config")]
    assert "jetstream" in nats_cm["data"]["nats.conf"] and "cluster" in nats_cm["data"]["nats.conf"]
    assert {k8s.component(h) for h in k8s.by_kind(prod, "HorizontalPodAutoscaler")} == {"gateway"}
    assert {k8s.component(p) for p in k8s.by_kind(prod, "PodDisruptionBudget")} >= {
        "gateway", "actors", "rules", "recorder", "webhooks",
    }  # fmt: skip
    for d in k8s.by_kind(prod, "Deployment"):
        assert d["spec"].get("replicas", 2) >= 2, k8s.ident(d)
    assert not k8s.by_kind(prod, "StatefulSet")[1:], (
        "prod runs Postgres and Redis outside the release"
    )
    assert not [s for s in k8s.by_kind(prod, "Secret") if k8s.is_ours(s)], (
        "prod credentials come from an existing Secret"
    )


def test_keda_scales_the_actors_on_consumer_lag(render: Render) -> None:
    """On every partition's consumer: the nats-jetstream scaler reads one, so one trigger
    each at the threshold's share (the HPA takes the largest, at least the mean)."""
    docs = render(
        "prod",
        "--set",
        "actors.keda.enabled=true,actors.autoscaling.enabled=false,actors.partitions=4",
    )
    (so,) = k8s.by_kind(docs, "ScaledObject")
    triggers = so["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"nats-jetstream"}
    assert {t["metadata"]["stream"] for t in triggers} == {"EVENTS"}
    assert [t["metadata"]["consumer"] for t in triggers] == [f"actors-{p}" for p in range(4)]
    assert {t["metadata"]["lagThreshold"] for t in triggers} == {"250"}
    assert all(t["metadata"]["natsServerMonitoringEndpoint"].endswith(":8222") for t in triggers)
    assert so["spec"]["maxReplicaCount"] == 4  # more than the partitions would stand by
    assert {k8s.component(h) for h in k8s.by_kind(docs, "HorizontalPodAutoscaler")} == {"gateway"}
    actors = next(d for d in k8s.by_kind(docs, "Deployment") if k8s.component(d) == "actors")
    assert "replicas" not in actors["spec"]


def test_keda_sums_the_actors_lag_in_prometheus_when_it_has_one(render: Render) -> None:
    docs = render(
        "prod",
        "--set",
        "actors.keda.enabled=true,actors.autoscaling.enabled=false,"
        "actors.keda.prometheusServerAddress=http://prometheus:9090",
    )
    (so,) = k8s.by_kind(docs, "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(max by (consumer) (smarthome_consumer_pending_messages{")
    assert 'consumer=~"actors-[0-9]+"' in query and 'stream="EVENTS"' in query
    assert trigger["metadata"]["threshold"] == "1000"


def test_the_actors_partition_count_reaches_every_service(render: Render) -> None:
    docs = render("prod", "--set", "actors.partitions=8")
    env = {module: env_map(docs, container) for _, container, module in app_containers(docs)}
    assert env["services.gateway"]["SMARTHOME_ACTOR_PARTITIONS"] == "8"  # it provisions them
    assert env["services.actors"]["SMARTHOME_ACTOR_PARTITIONS"] == "8"


def test_stream_replicas_follow_the_cluster_when_the_code_can_say_so(render: Render) -> None:
    """R3 in prod needs the services to create R3 streams; the chart can only pass the number."""
    if "SMARTHOME_STREAM_REPLICAS" not in k8s.env_names_read([SETTINGS]):
        pytest.skip("libs/settings.py has no stream replica setting yet; streams are created R1")
    prod = render("prod")
    for _, container, module in app_containers(prod):
        if kind_of(module) in {"api", "worker"}:
            assert env_map(prod, container).get("SMARTHOME_STREAM_REPLICAS") == "3", module


def test_an_existing_secret_replaces_the_charts(render: Render) -> None:
    docs = render(
        "default",
        "--set",
        "secrets.existingSecret=mine,postgresql.enabled=false,redis.enabled=false",
    )
    assert not [s for s in k8s.by_kind(docs, "Secret") if k8s.is_ours(s)]
    for _, container, _ in app_containers(docs):
        for e in container["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            # The bus's identities are in `<release>-bus`, which nats-server reads too.
            if ref:
                assert ref["name"] in ("mine", f"{RELEASE}-bus"), e


def test_ingress_and_service_monitor_point_at_the_gateway_and_metrics(render: Render) -> None:
    prod = render("prod")
    (ing,) = k8s.by_kind(prod, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"].endswith("-gateway")
    (sm,) = k8s.by_kind(prod, "ServiceMonitor")
    assert {e["path"] for e in sm["spec"]["endpoints"]} == {"/metrics"}
    assert "/metrics" in k8s.string_literals([HEALTH]), "workers serve /metrics (libs/health.py)"


def test_release_renders_under_another_name(helm: Path, chart: Path) -> None:
    """Names derive from the release: two installs in one namespace do not collide."""
    from .conftest import run

    proc = run([helm, "template", "home-b", chart])
    assert proc.returncode == 0, proc.stderr
    assert "name: home-b-smarthome-gateway" in proc.stdout
    assert "nats://home-b-nats:4222" in proc.stdout


def test_device_arguments_are_ones_the_devices_take(render: Render) -> None:
    literals = k8s.string_literals(device_sources())
    for _, container, module in app_containers(render("dev")):
        if kind_of(module) != "device":
            continue
        for arg in container.get("args", []):
            if arg.startswith("--"):
                assert arg in literals, f"python -m {module} has no option {arg}"


def test_the_actors_hpa_owns_their_replicas_when_on(render: Render) -> None:
    docs = render("prod", "--set", "actors.autoscaling.enabled=true")
    assert {k8s.component(h) for h in k8s.by_kind(docs, "HorizontalPodAutoscaler")} == {
        "gateway",
        "actors",
    }
    actors = next(d for d in k8s.by_kind(docs, "Deployment") if k8s.component(d) == "actors")
    assert "replicas" not in actors["spec"]


def test_the_recorder_keeps_what_the_retention_values_say(render: Render) -> None:
    docs = render("dev", "--set", "recorder.retention.historyDays=3")
    env = {module: env_map(docs, container) for _, container, module in app_containers(docs)}
    assert env["services.recorder"]["SMARTHOME_HISTORY_KEEP_DAYS"] == "3"
    assert env["services.recorder"]["SMARTHOME_STATISTICS_KEEP_DAYS"] == "730"
    assert env["services.recorder"]["SMARTHOME_AUDIT_KEEP_DAYS"] == "365"
    assert "SMARTHOME_HISTORY_KEEP_DAYS" not in env["services.gateway"]  # only its reader


def _bytes(size: str) -> float:
    """A Kubernetes or nats-server size (`9Gi`, `900Mi`, `10G`, bytes) in bytes."""
    found = re.fullmatch(r"([\d.]+)\s*([KMGTP]?)(i?)B?", size.strip().strip('"'), re.IGNORECASE)
    assert found, f"not a size: {size!r}"
    number, unit, binary = found.groups()
    base = 1024 if binary or unit == "" else 1000
    return float(number) * base ** " KMGTP".index(unit.upper() or " ")


def test_jetstream_refuses_new_messages_before_its_volume_is_full(rendered: Rendered) -> None:
    """At `max_file_store` nats-server refuses a message at once (the gateway answers 507);
    with no room under the volume it would fail writes on a full disk instead, and stay
    failed until restarted."""
    values_name, docs = rendered
    config = k8s.find(docs, "ConfigMap", f"{RELEASE}-nats-config")
    assert config is not None, f"[{values_name}] no NATS config"
    found = re.search(r'"max_file_store":\s*"?([^,\s"]+)', config["data"]["nats.conf"])
    assert found, f"[{values_name}] the NATS config sets no max_file_store"
    (nats,) = [s for s in k8s.by_kind(docs, "StatefulSet") if not k8s.is_ours(s)]
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    volume = claim["spec"]["resources"]["requests"]["storage"]
    assert 0 < _bytes(found[1]) <= 0.95 * _bytes(volume), (
        f"[{values_name}] max_file_store {found[1]} leaves no headroom on a {volume} volume"
    )


def test_the_gateway_budgets_the_streams_for_the_store_nats_is_given(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway, which provisions the streams, shares JetStream's store out as their byte
    budgets (libs/bus.py): it is told the size the NATS servers are given, and reads it as
    they do. Budgets made for a larger store would be refused by the servers."""
    values_name, docs = rendered
    config = k8s.find(docs, "ConfigMap", f"{RELEASE}-nats-config")
    assert config is not None
    found = re.search(r'"max_file_store":\s*"?([^,\s"]+)', config["data"]["nats.conf"])
    assert found, f"[{values_name}] the NATS config sets no max_file_store"
    env = {module: env_map(docs, container) for _, container, module in app_containers(docs)}
    given = env["services.gateway"].get("SMARTHOME_NATS_MAX_STORE")
    assert given == found[1], f"[{values_name}] the gateway is told {given}, NATS {found[1]}"
    assert given is not None
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", given)
    assert settings_mod.load().nats_max_store == _bytes(given)
    others = [m for m, e in env.items() if "SMARTHOME_NATS_MAX_STORE" in e and m != GATEWAY]
    assert not others, f"[{values_name}] only the provisioner needs it: {others}"


def test_an_external_bus_gives_the_streams_no_budget(render: Render) -> None:
    """Its store is unknown to the chart: no size is passed, and the streams keep the age
    limits only."""
    docs = render("default", "--set", "nats.enabled=false,externalNats.url=nats://bus:4222")
    for _, container, module in app_containers(docs):
        assert "SMARTHOME_NATS_MAX_STORE" not in env_map(docs, container), module


def test_the_demo_devices_sign_in_with_the_key_the_migration_registers(render: Render) -> None:
    """The demo devices register themselves over HTTP: each gets SMARTHOME_API_TOKEN from the
    Secret, the key the migration registers for the demo home as SMARTHOME_DEMO_API_KEY (with
    an existing Secret, prod's: from the same key of it)."""
    for values_name, extra in (("dev", ()), ("prod", ("--set", "lightbulb.enabled=true"))):
        docs = render(values_name, *extra)
        migrate_env = migrate_job(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
        registered = next(e for e in migrate_env if e["name"] == "SMARTHOME_DEMO_API_KEY")
        key = k8s.env_value(docs, registered)
        if values_name == "dev":
            assert key is not None and key.startswith("shk_") and len(key) >= 36
        devices = [(w, c) for w, c, m in app_containers(docs) if kind_of(m) == "device"]
        assert devices, values_name
        for workload, container in devices:
            token = next(e for e in container["env"] if e["name"] == "SMARTHOME_API_TOKEN")
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref["key"] == registered["valueFrom"]["secretKeyRef"]["key"], values_name
            assert k8s.env_value(docs, token) == key, k8s.ident(workload)

    without_demo = render("default")
    assert "SMARTHOME_DEMO_API_KEY" not in env_map(
        without_demo, migrate_job(without_demo)["spec"]["template"]["spec"]["containers"][0]
    )
    for secret in k8s.by_kind(without_demo, "Secret"):
        assert "demo-api-key" not in secret.get("data", {}), k8s.ident(secret)
