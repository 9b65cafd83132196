"""Dashboards and alerts as code: ops/prometheus/ and ops/grafana/, and the chart that ships them.

The alerts pass `promtool test rules` (a case that fires and one that stays silent for each);
every metric the alerts and dashboards read is one the code defines, one issue 14 names (being
added by the services), or a named outside exporter's, so a rename breaks a test; the chart's
copies equal ops/; the chart renders them only when asked and covers every process's /metrics.
"""

from __future__ import annotations

import ast
import filecmp
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from . import k8s
from .conftest import Render, run
from .k8s import CHART, ROOT, Doc
from .monitoring_crds import SCHEMAS

RULES = ROOT / "ops" / "prometheus" / "smarthome.rules.yaml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "smarthome.rules.test.yaml"
METRICS_README = ROOT / "ops" / "prometheus" / "README.md"
DASHBOARDS = sorted((ROOT / "ops" / "grafana").glob("*.json"))
# The chart reads its own copies (`.Files` sees only the chart's directory).
COPIES = {
    RULES: CHART / "alerts" / RULES.name,
    **{d: CHART / "dashboards" / d.name for d in DASHBOARDS},
}
MONITORING_ON = (
    "--set",
    "monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true,"
    "monitoring.dashboards.enabled=true",
)

# Metrics issue 14 asks for, by type, which the services are being given: accepted until the
# code defines them; then the entry goes (a test says so) and the code's definition counts.
PROMISED: dict[str, str] = {}
# Metrics from outside smarthome's code, and where they come from.
EXTERNAL = {
    "up": "Prometheus, for every target it scrapes",
    "process_resident_memory_bytes": "prometheus_client's process collector",
    "process_cpu_seconds_total": "prometheus_client's process collector",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
    "nats_varz_jetstream_stats_storage": "prometheus-nats-exporter (-varz, -prefix=nats)",
    "nats_varz_jetstream_config_max_storage": "prometheus-nats-exporter (-varz, -prefix=nats)",
}
METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
# A custom collector's families (read on scrape), as the metric types they expose.
FAMILY_TYPES = {"CounterMetricFamily": "Counter", "GaugeMetricFamily": "Gauge"}
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "enum": ("",),
}


# --- what the alerts and dashboards read -----------------------------------------------------


def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def rule_list() -> list[dict[str, Any]]:
    return [r for g in rules()["groups"] for r in g["rules"]]


def dashboard_exprs(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("type") == "query"]
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what they stand for."""
    return expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")


def label_values_query(expr: str) -> str:
    match = re.fullmatch(r"label_values\((.*), *[a-z_]+\)", expr)
    return match.group(1) if match else expr


def metric_names(expr: str) -> set[str]:
    """Loosely: smarthome_* anywhere, selectors (`name{`), and the outside exporters' prefixes.
    Recording rules' names (`level:metric:ops`) are left to the caller."""
    names = set(re.findall(r"\bsmarthome_[a-z_]+", expr))
    names |= set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    names |= set(re.findall(r"\b(?:process|kube|nats)_[a-z_]+", expr))
    return names


def used_metrics() -> dict[str, set[str]]:
    """metric name -> where it is read ("alert X", "record X", "dashboard <file>")."""
    used: dict[str, set[str]] = {}
    for rule in rule_list():
        where = f"alert {rule['alert']}" if "alert" in rule else f"record {rule['record']}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"dashboard {path.name}")
    return used


# --- what the code defines -------------------------------------------------------------------


def code_metrics() -> dict[str, str]:
    """name -> type of every prometheus_client metric libs/, services/ and devices/ define
    with a literal name (read from the source, not imported)."""
    found: dict[str, str] = {}
    for top in ("libs", "services", "devices"):
        for path in k8s.python_sources(ROOT / top):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                kind = FAMILY_TYPES.get(kind, kind)
                if kind not in METRIC_TYPES:
                    continue
                arg = node.args[0] if node.args else None
                arg = next((k.value for k in node.keywords if k.arg == "name"), arg)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found[arg.value] = kind.lower()
    return found


def gateway_http_series() -> set[str]:
    """The series Litestar's Prometheus middleware exposes with the gateway's prefix, seen by
    serving a request through it (the names are the library's, not ours to guess)."""
    from litestar import Litestar, get
    from litestar.plugins.prometheus import PrometheusConfig
    from litestar.testing import TestClient
    from prometheus_client import REGISTRY

    (prefix,) = {
        k.value.value
        for path in k8s.python_sources(ROOT / "services" / "gateway")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PrometheusConfig"
        for k in node.keywords
        if k.arg == "prefix" and isinstance(k.value, ast.Constant)
    }

    @get("/probe", sync_to_thread=False)
    def probe() -> str:
        return "ok"

    config = PrometheusConfig(app_name="gateway", prefix=prefix, group_path=True)
    with TestClient(Litestar([probe], middleware=[config.middleware])) as client:
        assert client.get("/probe").status_code == 200
    series: set[str] = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith(f"{prefix}_") and sample.labels.get("path") == "/probe":
                assert {"method", "path", "status_code"} <= set(sample.labels), sample
                series.add(sample.name)
    assert series, f"no {prefix}_* series after a request"
    return series


def exposed_series() -> set[str]:
    defined = {**PROMISED, **code_metrics()}
    series = set()
    for name, kind in defined.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        series |= {base + suffix for suffix in SERIES_SUFFIXES[kind]}
    return series | gateway_http_series()


# --- the alerts ------------------------------------------------------------------------------


def test_alert_rules_are_valid(promtool: Path) -> None:
    proc = run([promtool, "check", "rules", RULES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_pass_their_unit_tests(promtool: Path) -> None:
    proc = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {r["alert"] for r in rule_list() if "alert" in r}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


def test_every_alert_says_what_it_means_and_what_to_do() -> None:
    for rule in rule_list():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["alert"].startswith("Smarthome"), rule["alert"]


# --- the dashboards --------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_grafana_json_with_its_data_source_a_variable(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"].startswith("smarthome")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"


def test_dashboards_cover_what_an_operator_asks() -> None:
    titles = {p["title"] for d in DASHBOARDS for p in json.loads(d.read_text())["panels"]}
    for wanted in (
        "Ingest rate",
        "Lag per consumer",
        "Event apply latency",
        "Dead letters and redeliveries",
        "Devices by connection",
        "Commands by status",
        "Rule runs",
        "Webhook deliveries",
        "HTTP p99 by route",
        "Resident memory",
        "CPU",
    ):
        assert wanted in titles


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule's expression)."""
    exprs = [label_values_query(as_promql(e)) for d in DASHBOARDS for e in dashboard_exprs(d)]
    records = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    check = {"groups": [{"name": "dashboards", "rules": records}]}
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(check))
    proc = run([promtool, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the metric names ------------------------------------------------------------------------


def test_every_metric_read_is_defined_somewhere() -> None:
    series = exposed_series()
    recorded = {r["record"] for r in rule_list() if "record" in r}
    unknown = {
        name: sorted(where)
        for name, where in used_metrics().items()
        if name not in series and name not in EXTERNAL and name not in recorded
    }
    assert not unknown, (
        "metrics read by the alerts or dashboards that no code defines (renamed?): "
        f"{json.dumps(unknown, indent=1)}"
    )


def test_promised_metrics_leave_the_list_once_the_code_defines_them() -> None:
    """Else a promised name would stay accepted after the code renamed it."""
    defined = code_metrics()
    landed = {name: defined[name] for name in PROMISED if name in defined}
    wrong = {n: (t, PROMISED[n]) for n, t in landed.items() if t != PROMISED[n]}
    assert not wrong, f"defined as another type than the alerts and dashboards read: {wrong}"
    assert not landed, (
        f"the code defines {landed}: delete them from PROMISED in tests/deploy/test_monitoring.py"
    )


def test_the_process_metrics_are_there_to_read() -> None:
    from prometheus_client import REGISTRY

    names = {s.name for f in REGISTRY.collect() for s in f.samples}
    used = {n for n in used_metrics() if n.startswith("process_")}
    assert used and used <= names, used - names


def test_the_nats_exporter_serves_the_names_the_alerts_read(render: Render) -> None:
    (nats,) = [d for d in k8s.by_kind(render("prod"), "StatefulSet") if "nats" in k8s.name(d)]
    exporter = next(
        c for c in nats["spec"]["template"]["spec"]["containers"] if c["name"] == "prom-exporter"
    )
    assert {"-varz", "-prefix=nats"} <= set(exporter["args"])


def test_every_metric_read_is_listed_in_the_readme() -> None:
    readme = METRICS_README.read_text()
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used_metrics()}
    missing = sorted(n for n in bases if f"`{n}`" not in readme)
    assert not missing, f"ops/prometheus/README.md does not list: {missing}"


# --- the chart -------------------------------------------------------------------------------


def test_the_chart_ships_copies_equal_to_ops() -> None:
    assert DASHBOARDS, "no dashboard in ops/grafana/"
    for source, copy in COPIES.items():
        assert copy.exists() and filecmp.cmp(source, copy, shallow=False), (
            f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
            f"cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"
        )
    shipped = {*(CHART / "alerts").iterdir(), *(CHART / "dashboards").iterdir()}
    assert shipped == set(COPIES.values()), "the chart ships files ops/ does not have"


MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def dashboards(docs: list[Doc]) -> list[Doc]:
    return [d for d in k8s.by_kind(docs, "ConfigMap") if k8s.component(d) == "dashboards"]


def test_monitoring_is_off_by_default(render: Render) -> None:
    for values_name in ("default", "dev"):
        docs = render(values_name)
        assert not [d for d in docs if d["kind"] in MONITORING_KINDS], values_name
        assert not dashboards(docs), values_name


def test_the_prometheus_rule_is_the_alerts_file(render: Render) -> None:
    (rule,) = k8s.by_kind(render("default", *MONITORING_ON), "PrometheusRule")
    assert rule["spec"]["groups"] == rules()["groups"]


def test_the_dashboards_are_config_maps_for_grafanas_sidecar(render: Render) -> None:
    docs = render(
        "default",
        *MONITORING_ON,
        "--set",
        "monitoring.dashboards.namespace=grafana,monitoring.dashboards.annotations.grafana_folder=smarthome",
    )
    maps = dashboards(docs)
    assert len(maps) == len(DASHBOARDS)
    for cm in maps:
        assert k8s.labels(cm)["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "grafana"
        assert k8s.annotations(cm) == {"grafana_folder": "smarthome"}
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((ROOT / "ops" / "grafana" / key).read_text())


def test_monitoring_objects_have_the_operators_shape(render: Render) -> None:
    """kubernetes-validate cannot check CRD kinds (test_helm_chart tolerates them); this does."""
    seen = set()
    for docs in (render("prod"), render("default", *MONITORING_ON)):
        for doc in docs:
            if doc["kind"] in SCHEMAS and doc["apiVersion"].startswith("monitoring.coreos.com/"):
                errors = list(jsonschema.Draft7Validator(SCHEMAS[doc["kind"]]).iter_errors(doc))
                assert not errors, f"{k8s.ident(doc)}: " + "; ".join(
                    f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
                )
                seen.add(doc["kind"])
    assert seen == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_the_service_monitor_scrapes_every_process_that_serves_metrics(render: Render) -> None:
    """Each Deployment with a /metrics port (the gateway's `http`, a worker's `health`) is
    reached: a Service the ServiceMonitor selects has that port and selects its pods."""
    for values_name, args in {"prod": (), "dev": MONITORING_ON}.items():
        docs = render(values_name, *args)
        (sm,) = k8s.by_kind(docs, "ServiceMonitor")
        scraped = {e["port"] for e in sm["spec"]["endpoints"]}
        services = [
            s
            for s in k8s.by_kind(docs, "Service")
            if k8s.selector_matches(sm["spec"]["selector"], k8s.labels(s))
        ]
        for workload, template in k8s.pods(docs):
            if not k8s.is_ours(workload) or workload["kind"] != "Deployment":
                continue
            ports = {p["name"] for c in k8s.containers(template) for p in c.get("ports", [])} & {
                "http",
                "health",
            }
            for port in ports:
                assert port in scraped, f"[{values_name}] {k8s.ident(workload)}: {port} unscraped"
                assert any(
                    k8s.selector_matches(s["spec"]["selector"], template["metadata"]["labels"])
                    and port in {p["name"] for p in s["spec"]["ports"]}
                    for s in services
                ), f"[{values_name}] no scraped Service reaches {k8s.ident(workload)}:{port}"
        for endpoint in sm["spec"]["endpoints"]:
            targets = {r.get("targetLabel"): r for r in endpoint["relabelings"]}
            assert targets["job"]["replacement"] == "smarthome", "the alerts select job=smarthome"
            assert "component" in targets, "the dashboards show component"
