"""charts/smarthome lints, renders, and validates against Kubernetes' and its own values schema."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from . import k8s, values_table
from .conftest import KUBE_VERSION, NAMESPACE, RELEASE, VALUES_FILES, Render, run
from .k8s import CHART, ROOT


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values coalescing: maps merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chart_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in VALUES_FILES[name]:
        values = merged(values, yaml.safe_load(f.read_text()))
    return values


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_helm_lint_strict_passes(helm: Path, chart: Path, values_name: str) -> None:
    proc = run(
        [
            helm,
            "lint",
            "--strict",
            chart,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            *[f"--values={f}" for f in VALUES_FILES[values_name]],
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_nats_is_the_official_chart_declared_as_a_dependency() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (dep,) = meta["dependencies"]
    assert dep == {
        "name": "nats",
        "version": "2.14.2",
        "repository": "https://nats-io.github.io/k8s/helm/charts/",
        "condition": "nats.enabled",
    }


def test_the_dependency_tgz_is_ignored_and_never_committed() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "charts/smarthome/charts/*.tgz" in ignored
    assert ".cache/" in ignored
    tracked = run(["git", "ls-files", "charts/smarthome/charts"], cwd=ROOT)
    assert tracked.stdout.strip() == "", f"committed chart archives: {tracked.stdout}"


def test_every_manifest_is_valid_for_kubernetes(render: Render, tmp_path: Path) -> None:
    """kubernetes-validate --strict on every rendered object, for the oldest supported and the
    current Kubernetes; only the known CRD kinds may lack a schema (checked by reference in
    test_rendered_manifests)."""
    floor = re.search(
        r"(\d+\.\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    )
    assert floor, "Chart.yaml kubeVersion has no version floor"
    files = []
    for name in VALUES_FILES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(name)))
        files.append(path)
    # The variants the values files do not switch on.
    for name, args in {
        "keda": ("--set", "actors.keda.enabled=true,actors.autoscaling.enabled=false")
    }.items():
        path = tmp_path / f"prod-{name}.yaml"
        path.write_text(yaml.safe_dump_all(render("prod", *args)))
        files.append(path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            floor.group(1),
            "-k",
            KUBE_VERSION,
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    errors = [line for line in lines if not line.startswith("WARN")]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr
    crd_kinds = {kind for _, kind in k8s.CRD_KINDS}
    unknown = [
        w for w in lines if w.startswith("WARN") and not any(f" kind {k} " in w for k in crd_kinds)
    ]
    assert not unknown, "objects without a Kubernetes schema:\n" + "\n".join(unknown)


def test_values_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft7Validator.check_schema(schema())


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_values_files_meet_the_schema(values_name: str) -> None:
    errors = sorted(
        jsonschema.Draft7Validator(schema()).iter_errors(chart_values(values_name)), key=str
    )
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"gateway": {"replicas": 2}}, "a misspelt key"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "running as root"),
        # null removes a default in Helm's values coalescing.
        (
            {"actors": {"resources": {"requests": {"memory": None}}}},
            "a container without a memory request",
        ),
        ({"settings": {"logLevel": "VERBOSE"}}, "a log level the settings refuse"),
        ({"settings": {"healthPort": 70000}}, "a port out of range"),
        ({"secrets": {"jwtSecret": "too-short"}}, "a JWT key the gateway refuses"),
        ({"secrets": {"metricsApiKey": "x" * 40}}, "a metrics key the migration refuses"),
        ({"gateway": {"trustedProxies": ["ingress-nginx"]}}, "a proxy that is no CIDR"),
        ({"gateway": {"allowedOrigins": ["home.example.com"]}}, "an origin without a scheme"),
        ({"serviceMonitor": {"enabled": True}}, "the ServiceMonitor outside `monitoring`"),
        ({"monitoring": {"dashboards": {"namespace": "Grafana"}}}, "a namespace that is no name"),
    ],
)
def test_the_schema_rejects_bad_values(
    helm: Path, chart: Path, override: dict[str, Any], why: str, tmp_path: Path
) -> None:
    bad = merged(chart_values("default"), override)
    assert list(jsonschema.Draft7Validator(schema()).iter_errors(bad)), f"schema accepts {why}"
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump(bad))
    proc = run([helm, "template", RELEASE, chart, f"--values={values}"])
    assert proc.returncode != 0 and "schema" in proc.stderr, f"helm renders {why}"


def test_keda_and_the_hpa_never_both_scale_the_actors(helm: Path, chart: Path) -> None:
    proc = run(
        [
            helm,
            "template",
            RELEASE,
            chart,
            "--values",
            CHART / "values-prod.yaml",
            "--set",
            "actors.keda.enabled=true,actors.autoscaling.enabled=true",
        ]
    )
    assert proc.returncode != 0
    assert "enable one" in proc.stderr


def test_an_external_database_must_be_named(helm: Path, chart: Path) -> None:
    proc = run([helm, "template", RELEASE, chart, "--set", "postgresql.enabled=false"])
    assert proc.returncode != 0
    assert "externalDatabase" in proc.stderr


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    assert values_table.START in readme and values_table.END in readme
    assert readme == values_table.readme_with_table(readme), (
        "charts/smarthome/README.md's values table is stale: "
        "run `python tests/deploy/values_table.py --write`"
    )
