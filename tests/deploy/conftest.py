"""The deployment gate: a real helm renders charts/smarthome; the tests read what it renders.

No cluster is involved. helm comes from ops/ci/get-helm.sh (cached in .cache/helm/); when it
cannot be had, every test that needs it fails with the script's reason: this gate never skips.
promtool (the alerts' unit tests) comes from ops/ci/get-promtool.sh (Debian's package, cached in
.cache/promtool/): where it cannot be had it is skipped, unless SMARTHOME_REQUIRE_PROMTOOL is
set (CI, which installs it): then it fails.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .k8s import CHART, ROOT, Doc

NATS_TGZ = "nats-2.14.2.tgz"
VENDORED_NATS = ROOT.parent / "shared" / "vendor" / "charts" / NATS_TGZ
RELEASE = "smarthome"
NAMESPACE = "smarthome"
# The Kubernetes release the manifests are rendered and validated for; the chart's kubeVersion
# floor (Chart.yaml) is validated too.
KUBE_VERSION = "1.37.0"
VALUES_FILES: dict[str, list[Path]] = {
    "default": [],
    "dev": [CHART / "values-dev.yaml"],
    "prod": [CHART / "values-prod.yaml"],
}

Render = Callable[..., list[Doc]]


def run(cmd: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary, fetched and cached by ops/ci/get-helm.sh."""
    proc = run(["bash", ROOT / "ops" / "ci" / "get-helm.sh"])
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(
            f"helm is required and could not be obtained (ops/ci/get-helm.sh exited "
            f"{proc.returncode}):\n{proc.stderr}",
            pytrace=False,
        )
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Prometheus's promtool, fetched and cached by ops/ci/get-promtool.sh."""
    proc = run(["bash", ROOT / "ops" / "ci" / "get-promtool.sh"])
    if proc.returncode != 0 or not proc.stdout.strip():
        why = f"ops/ci/get-promtool.sh exited {proc.returncode}: {proc.stderr.strip()}"
        if os.environ.get("SMARTHOME_REQUIRE_PROMTOOL"):  # CI installs it: missing is a failure
            pytest.fail(f"promtool is required and could not be obtained ({why})", pytrace=False)
        pytest.skip(f"no promtool ({why})")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def chart(helm: Path) -> Path:
    """charts/smarthome with the NATS chart in charts/, as `helm dependency build` leaves it."""
    target = CHART / "charts" / NATS_TGZ
    if VENDORED_NATS.exists():
        if not target.exists() or not filecmp.cmp(VENDORED_NATS, target, shallow=False):
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(VENDORED_NATS, target)
    elif not target.exists():
        pytest.fail(
            f"the NATS chart dependency is missing: neither {target} nor {VENDORED_NATS} exists "
            f"(with internet: `helm dependency build {CHART}`)",
            pytrace=False,
        )
    return CHART


@pytest.fixture(scope="session")
def render(helm: Path, chart: Path) -> Render:
    """render(values_name, *helm_args) -> the rendered documents (cached per arguments)."""
    cache: dict[tuple[str, ...], list[Doc]] = {}

    def _render(values_name: str, *args: str) -> list[Doc]:
        key = (values_name, *args)
        if key not in cache:
            proc = run(
                [
                    helm,
                    "template",
                    RELEASE,
                    chart,
                    "--namespace",
                    NAMESPACE,
                    "--kube-version",
                    KUBE_VERSION,
                    *[f"--values={f}" for f in VALUES_FILES[values_name]],
                    *args,
                ]
            )
            if proc.returncode != 0:
                raise AssertionError(f"helm template ({values_name} {args}) failed:\n{proc.stderr}")
            cache[key] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[key]

    return _render


@pytest.fixture(params=list(VALUES_FILES))
def rendered(request: pytest.FixtureRequest, render: Render) -> tuple[str, list[Doc]]:
    """(values name, documents) for the default, dev and prod values."""
    return request.param, render(request.param)
