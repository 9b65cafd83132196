"""The demo in Kubernetes: the devices' heartbeat probes, and the hook Job that stores the demo
rule so that `helm install` alone gives the demo of `smarthome up`."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from . import k8s
from .conftest import Render
from .k8s import ROOT, Doc
from .test_rendered_manifests import (
    DEMO_RULE_MODULE,
    app_containers,
    env_map,
    kind_of,
    migrate_job,
)

PROBE = ROOT / "devices" / "probe.py"
PROBE_COMMAND = ["python", "-m", "devices.probe"]
# What each probe asks the heartbeat file: started and alive while the device's loop turns,
# ready while the bus acknowledges it.
CHECKS = {"startupProbe": "live", "livenessProbe": "live", "readinessProbe": "ready"}


def devices(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    return [(w, c) for w, c, m in app_containers(docs) if kind_of(m) == "device"]


def demo_rule_job(docs: list[Doc]) -> Doc | None:
    jobs = [j for j in k8s.by_kind(docs, "Job") if k8s.component(j) == "demo-rule"]
    assert len(jobs) <= 1
    return jobs[0] if jobs else None


def only_container(workload: Doc) -> Doc:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(
    ("values_name", "args"),
    [("dev", ()), ("prod", ("--set", "lightbulb.enabled=true,energyTracker.enabled=true"))],
)
def test_device_probes_read_the_heartbeat_file_the_device_is_told_to_write(
    render: Render, values_name: str, args: tuple[str, ...]
) -> None:
    docs = render(values_name, *args)
    literals = k8s.string_literals([PROBE])
    assert len(devices(docs)) == 2, values_name
    for workload, container in devices(docs):
        who = k8s.ident(workload)
        told = env_map(docs, container).get("SMARTHOME_DEVICE_HEARTBEAT_FILE")
        assert told, f"{who} is not told where to write its heartbeat"
        # On a writable volume: the root filesystem is read-only.
        template = workload["spec"]["template"]
        writable = {v["name"] for v in template["spec"]["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(str(PurePosixPath(told).parent)) in writable, f"{who}: {told}"
        for probe_kind, check in CHECKS.items():
            probe = container.get(probe_kind)
            assert probe and "exec" in probe, f"{who}: no exec {probe_kind}"
            command = probe["exec"]["command"]
            assert command[:3] == PROBE_COMMAND, f"{who}: {probe_kind} runs {command}"
            assert len(command) == 6, command
            asked, path, max_age = command[3:]
            assert asked == check and check in literals, f"{who}: {probe_kind} asks {asked}"
            assert path == told, f"{who}: {probe_kind} reads {path}, the device writes {told}"
            # Fresher than a few of the device's rewrites (every 2 s), and than its heartbeat
            # (every 5 s) for readiness.
            assert 5 < float(max_age) <= 60, f"{who}: {probe_kind} allows {max_age}s"
            assert probe["timeoutSeconds"] >= 2, "a Python start under a CPU limit takes time"


def test_the_demo_rule_is_a_hook_job_after_the_migration(render: Render) -> None:
    docs = render("dev")
    job = demo_rule_job(docs)
    assert job is not None, "values-dev.yaml runs the demo: its rule is stored by a hook"
    annotations = k8s.annotations(job)
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    # With the in-chart Postgres the migration is a post-install hook too: it registers the
    # key the demo rule's Job signs in with, so it goes first.
    migrate = migrate_job(docs)
    assert "post-install" in k8s.annotations(migrate)["helm.sh/hook"]
    assert int(annotations["helm.sh/hook-weight"]) > int(
        k8s.annotations(migrate)["helm.sh/hook-weight"]
    )
    container = only_container(job)
    assert container["command"] == ["python", "-m", DEMO_RULE_MODULE]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0


def test_the_demo_rule_job_runs_locked_down_like_the_others(render: Render) -> None:
    job = demo_rule_job(render("dev"))
    assert job is not None
    spec = job["spec"]["template"]["spec"]
    sc = {**spec["securityContext"], **only_container(job)["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    assert spec["automountServiceAccountToken"] is False


def test_the_demo_rule_names_the_demo_devices_and_takes_those_options(render: Render) -> None:
    setting = {"lightbulb": {"deviceId": "lamp-1"}, "demoRule": {"forSeconds": 7.5}}
    docs = render("dev", "--set-json", json.dumps(setting))
    job = demo_rule_job(docs)
    assert job is not None
    args = only_container(job)["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    literals = k8s.string_literals(k8s.module_sources(DEMO_RULE_MODULE))
    assert set(options) <= literals, f"python -m {DEMO_RULE_MODULE} has no option among {args}"
    ids = {k8s.component(w): env_map(docs, c)["SMARTHOME_DEVICE_ID"] for w, c in devices(docs)}
    assert options["--light-id"] == ids["lightbulb"] == "lamp-1"
    assert options["--meter-id"] == ids["energy-tracker"]
    assert float(options["--for"]) == 7.5


def test_the_demo_rule_job_signs_in_with_an_admin_key_the_migration_registers(
    render: Render,
) -> None:
    """Rules are a resident's or an administrator's: the demo devices' installer key cannot
    store one. The Job uses the admin key the migration registers (SMARTHOME_METRICS_API_KEY
    of services/launcher/credentials.py), from the same Secret key."""
    for values_name, extra in (("dev", ()), ("prod", ("--set", "lightbulb.enabled=true"))):
        docs = render(values_name, *extra)
        job = demo_rule_job(docs)
        assert job is not None, values_name
        token = next(e for e in only_container(job)["env"] if e["name"] == "SMARTHOME_API_TOKEN")
        migrate_env = only_container(migrate_job(docs))["env"]
        registered = next(e for e in migrate_env if e["name"] == "SMARTHOME_METRICS_API_KEY")
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["key"] == registered["valueFrom"]["secretKeyRef"]["key"], values_name
        assert k8s.env_value(docs, token) == k8s.env_value(docs, registered), values_name
    credentials = (ROOT / "services" / "launcher" / "credentials.py").read_text()
    assert '"metrics", Role.ADMIN' in credentials, "the migration's metrics key is no admin's"


def test_the_demo_rule_job_reaches_the_gateway_through_its_service(render: Render) -> None:
    docs = render("dev")
    job = demo_rule_job(docs)
    assert job is not None
    url = env_map(docs, only_container(job))["SMARTHOME_API_URL"]
    assert url is not None and url.startswith("http://"), url
    host, _, port = url.removeprefix("http://").partition(":")
    (service,) = [s for s in k8s.by_kind(docs, "Service") if k8s.component(s) == "gateway"]
    assert host == k8s.name(service), f"{url} is not the gateway's Service"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    (gateway,) = [d for d in k8s.by_kind(docs, "Deployment") if k8s.component(d) == "gateway"]
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert k8s.selector_matches(service["spec"]["selector"], gateway_labels)
    target = service_port["targetPort"]
    container_port = k8s.container_port(only_container(gateway), target)
    assert container_port is not None, f"the gateway has no port {target}"
    # The Service's name is one the gateway answers to (it refuses unknown Hosts).
    allowed = env_map(docs, only_container(gateway))["SMARTHOME_ALLOWED_HOSTS"] or ""
    assert host in allowed.split(","), allowed
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    name = target if isinstance(target, str) else None
    for gateway_from in ([], [{"ipBlock": {"cidr": "10.0.0.0/8"}}]):
        setting = f"networkPolicy.gatewayFrom={json.dumps(gateway_from)}"
        rendered = render("dev", "--set-json", setting)
        policies = k8s.by_kind(rendered, "NetworkPolicy")
        assert policies, "no NetworkPolicies to check"
        assert k8s.policy_allows(
            policies, "Egress", job_labels, gateway_labels, container_port, name
        ), "the demo rule's NetworkPolicy does not let it call the gateway"
        assert k8s.policy_allows(
            policies, "Ingress", gateway_labels, job_labels, container_port, name
        ), f"the gateway's NetworkPolicy (gatewayFrom={gateway_from}) refuses the demo rule"


@pytest.mark.parametrize(
    ("values_name", "args"),
    [
        ("default", ()),  # no demo device
        ("prod", ()),
        ("dev", ("--set", "demoRule.enabled=false")),
        ("dev", ("--set", "gateway.enabled=false")),
    ],
)
def test_no_demo_rule_job_without_the_demo(
    render: Render, values_name: str, args: tuple[str, ...]
) -> None:
    docs = render(values_name, *args)
    assert demo_rule_job(docs) is None
    leftovers = [k8s.ident(d) for d in docs if k8s.component(d) == "demo-rule"]
    assert not leftovers, leftovers
