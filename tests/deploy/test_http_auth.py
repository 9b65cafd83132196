"""HTTP authentication in a cluster: the gateway's signing key, the first administrator and
Prometheus's key come from the Secret; the gateway answers to the names it is reached by.

Cross-checked against the code: the values reach libs/settings.py, which must accept them, and
services/gateway/browser.py decides which Host it answers to.
"""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING

import pytest

from . import k8s
from .conftest import NAMESPACE, Render
from .k8s import ROOT, Doc
from .test_rendered_manifests import app_containers, env_map, kind_of

if TYPE_CHECKING:
    from libs.settings import Settings

Rendered = tuple[str, list[Doc]]

INGRESS_HOST = "smarthome.example.com"  # values-prod.yaml
# Held by the app Secret and read by these processes only.
CREDENTIALS = {
    "SMARTHOME_JWT_SECRET": {"api", "services.recorder"},  # recorder: audit checkpoints
    "SMARTHOME_ADMIN_PASSWORD": {"migrate"},
    "SMARTHOME_METRICS_API_KEY": {"migrate"},
}


def processes(docs: list[Doc]) -> dict[str, tuple[Doc, dict[str, str | None]]]:
    """kind of process ("api", "migrate", ...) or worker module -> (container, resolved env)."""
    out = {}
    for _, container, module in app_containers(docs):
        kind = kind_of(module)
        who = module if kind in {"worker", "device"} else kind
        out[who] = (container, env_map(docs, container))
    return out


def secret_ref(container: Doc, var: str) -> Doc | None:
    env = next((e for e in container.get("env", []) if e["name"] == var), None)
    return None if env is None else env.get("valueFrom", {}).get("secretKeyRef")


def load_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> Settings:
    """libs.settings.load() under a container's environment (what the chart resolves of it)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from libs import settings

    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return settings.load()


def test_credentials_come_from_the_secret_and_only_to_their_readers(rendered: Rendered) -> None:
    values_name, docs = rendered
    problems = []
    for kind, (container, env) in processes(docs).items():
        for var, readers in CREDENTIALS.items():
            wanted = kind in readers
            if not wanted and var in env:
                problems.append(f"{kind}: gets {var}, which it does not use")
            if wanted and secret_ref(container, var) is None:
                problems.append(f"{kind}: {var} does not come from a Secret")
    assert not problems, f"[{values_name}]\n" + "\n".join(problems)


def test_the_generated_credentials_are_ones_the_code_accepts(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    values_name, docs = rendered
    procs = processes(docs)
    _, gateway = procs["api"]
    _, migrate = procs["migrate"]
    if gateway["SMARTHOME_JWT_SECRET"] is None:
        assert values_name == "prod", "only an existing Secret leaves it unresolved"
        return
    s = load_settings(monkeypatch, gateway)  # SettingsError under 32 characters
    assert s.jwt_secret and len(s.jwt_secret) >= 32
    key = migrate["SMARTHOME_METRICS_API_KEY"]
    assert key is not None and key.startswith("shk_") and len(key) >= 36, (
        "libs.accounts.ensure_api_key refuses it: the migration would fail"
    )
    assert migrate["SMARTHOME_ADMIN_PASSWORD"]


def test_the_migration_hook_registers_the_credentials_of_the_release_secret(
    render: Render,
) -> None:
    """An external database: the pre-install hook brings its own Secret, which must hold the
    same admin password and metrics key as the release's (else nobody can sign in, and
    Prometheus is refused)."""
    docs = render("default", "--set", "postgresql.enabled=false,externalDatabase.host=db")
    _, migrate = processes(docs)["migrate"]
    (app_secret,) = [s for s in k8s.by_kind(docs, "Secret") if k8s.component(s) == "settings"]
    data = {k: base64.b64decode(v).decode() for k, v in app_secret["data"].items()}
    assert migrate["SMARTHOME_ADMIN_PASSWORD"] == data["admin-password"]
    assert migrate["SMARTHOME_METRICS_API_KEY"] == data["metrics-api-key"]


def test_prometheus_scrapes_the_gateway_with_the_key_the_migration_registers(
    render: Render,
) -> None:
    for values_name, args in {
        "prod": (),
        "default": ("--set", "monitoring.serviceMonitor.enabled=true"),
    }.items():
        docs = render(values_name, *args)
        (sm,) = k8s.by_kind(docs, "ServiceMonitor")
        endpoints = {e["port"]: e for e in sm["spec"]["endpoints"]}
        auth = endpoints["http"].get("authorization")
        assert auth is not None and auth["type"] == "Bearer", f"[{values_name}] {endpoints}"
        migrate, _ = processes(docs)["migrate"]
        registered = secret_ref(migrate, "SMARTHOME_METRICS_API_KEY")
        assert registered is not None
        assert auth["credentials"] == {"name": registered["name"], "key": registered["key"]}
        # The workers' health port has no authentication: only metricsFrom reaches it.
        assert "authorization" not in endpoints["health"]
        for policy in k8s.by_kind(docs, "NetworkPolicy"):
            if k8s.component(policy) in {"actors", "rules", "recorder", "webhooks"}:
                for rule in policy["spec"].get("ingress", []):
                    assert rule.get("from"), f"[{values_name}] {k8s.ident(policy)} lets anyone in"


def test_the_gateway_answers_to_its_ingress_host_and_service_names(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render("prod")
    _, gateway = processes(docs)["api"]
    s = load_settings(monkeypatch, gateway)
    from services.gateway.browser import allowed_hosts, host_name

    answers = allowed_hosts(s)
    (svc,) = [d for d in k8s.by_kind(docs, "Service") if k8s.component(d) == "gateway"]
    service = k8s.name(svc)
    for host in (
        f"{INGRESS_HOST}:443",
        f"{service}:8000",  # the devices' SMARTHOME_API_URL, `helm test`
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.cluster.local:8000",
        "localhost:8000",  # kubectl port-forward
        "127.0.0.1:8000",
    ):
        assert host_name(host) in answers, host
    assert host_name("evil.example.net") not in answers
    # TLS at the Ingress: pages come from https only.
    assert s.allowed_origins == (f"https://{INGRESS_HOST}",)
    assert s.trusted_proxies == s.webhook_allow_nets == ()


def test_values_extend_the_hosts_origins_proxies_and_webhook_networks(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(
        "prod",
        "--set-json",
        '{"ingress":{"tls":[]},'
        '"gateway":{"allowedHosts":["192.168.1.10","home.lan"],'
        '"allowedOrigins":["https://dashboard.example.com"],"trustedProxies":["10.244.0.0/16"]},'
        '"webhooks":{"allowNets":["192.168.1.0/24","fd00::/8"]}}',
    )
    procs = processes(docs)
    _, gateway = procs["api"]
    s = load_settings(monkeypatch, gateway)
    assert {INGRESS_HOST, "192.168.1.10", "home.lan"} <= set(s.allowed_hosts)
    # No TLS at the Ingress: its host over http as well.
    assert s.allowed_origins == (
        f"https://{INGRESS_HOST}",
        f"http://{INGRESS_HOST}",
        "https://dashboard.example.com",
    )
    assert s.trusted_proxies == ("10.244.0.0/16",)
    assert s.webhook_allow_nets == ("192.168.1.0/24", "fd00::/8")
    # The webhooks worker checks the same networks before each POST; nobody else reads them.
    for who, (_, env) in procs.items():
        has = env.get("SMARTHOME_WEBHOOK_ALLOW_NETS")
        if who in {"api", "services.webhooks"}:
            assert has == "192.168.1.0/24,fd00::/8", who
        else:
            assert has is None, who
