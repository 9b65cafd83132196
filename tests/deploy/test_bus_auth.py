"""The deployment gate for the bus's identities: no rendered nats-server configuration lets
anyone in without credentials, and the chart grants each service what the code does
(libs/bus_grants.py), no more."""

from __future__ import annotations

import json
import re
from typing import Any

from libs import bus_grants

from . import k8s
from .conftest import RELEASE
from .k8s import Doc

Rendered = tuple[str, list[Doc]]

# A value nats-server's configuration allows unquoted: `$VAR`, `9Gi`, `1s`.
_BARE = re.compile(r"(:\s*)(\$[A-Z_][A-Z0-9_]*|\d+(?:\.\d+)?[A-Za-z]+)(\s*[,\n}])")


def nats_config(docs: list[Doc]) -> dict[str, Any]:
    (cm,) = [c for c in k8s.by_kind(docs, "ConfigMap") if k8s.name(c).endswith("-nats-config")]
    text = cm["data"]["nats.conf"]
    assert "include " not in text, "an include the gate cannot read"
    return json.loads(_BARE.sub(r'\1"\2"\3', text))


def test_no_rendered_nats_config_allows_anonymous_users(rendered: Rendered) -> None:
    values_name, docs = rendered
    conf = nats_config(docs)
    auth = conf.get("authorization") or {}
    assert "no_auth_user" not in conf and "no_auth_user" not in auth, values_name
    assert "token" not in auth, f"[{values_name}] one shared token is no identity"
    for block in ("mqtt", "websocket", "leafnodes"):
        assert "no_auth_user" not in (conf.get(block) or {}), f"[{values_name}] {block}"
    assert auth.get("users"), f"[{values_name}] no users: the server would let anyone in"
    for user in auth["users"]:
        assert user.get("user") and str(user.get("password", "")).startswith("$"), user
    # Everyone else is asked about through the callout; its own users are the services only.
    callout = auth["auth_callout"]
    assert callout["issuer"] == "$BUS_ISSUER"
    assert set(callout["auth_users"]) == {*bus_grants.SERVICE_USERS, bus_grants.SYSTEM_USER}
    for account in (conf.get("accounts") or {}).values():
        for user in account.get("users", []):
            assert str(user.get("password", "")).startswith("$"), user


def test_the_chart_grants_each_service_what_the_code_does(rendered: Rendered) -> None:
    values_name, docs = rendered
    users = {u["user"]: u["permissions"] for u in nats_config(docs)["authorization"]["users"]}
    for name, grant in bus_grants.service_grants().items():
        perms = users.pop(name)
        assert perms["publish"]["allow"] == list(grant.publish), f"[{values_name}] {name}"
        assert perms["subscribe"]["allow"] == list(grant.subscribe), f"[{values_name}] {name}"
        assert perms.get("allow_responses", False) == grant.responses, f"[{values_name}] {name}"
    assert not users, f"[{values_name}] users the code does not know: {sorted(users)}"


def test_nats_reads_every_password_hash_and_the_issuer_from_the_bus_secret(
    rendered: Rendered,
) -> None:
    values_name, docs = rendered
    (nats,) = [s for s in k8s.by_kind(docs, "StatefulSet") if k8s.name(s).endswith("-nats")]
    (container,) = [c for c in k8s.containers(nats["spec"]["template"]) if c["name"] == "nats"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    wanted = {f"NATS_PW_{u.upper().replace('-', '_')}" for u in bus_grants.SERVICE_USERS}
    wanted |= {"NATS_PW_BUSAUTH_SYS", "BUS_ISSUER"}
    assert set(refs) == wanted, values_name
    assert {r["name"] for r in refs.values()} == {f"{RELEASE}-bus"}, values_name


def test_jetstream_syncs_as_often_as_the_embedded_server(rendered: Rendered) -> None:
    values_name, docs = rendered
    assert nats_config(docs)["jetstream"]["sync_interval"] == "1s", values_name


def _nats_url(docs: list[Doc]) -> str:
    (cm,) = [c for c in k8s.by_kind(docs, "ConfigMap") if k8s.name(c).endswith("-settings")]
    return str(cm["data"]["NATS_URL"])


def test_nats_tls_on_serves_tls_on_client_and_mqtt_listeners_and_services_use_it(
    render: Any,
) -> None:
    docs = render(
        "default", "--set", "nats.tls.enabled=true", "--set", "nats.tls.secretName=bus-tls"
    )
    conf = nats_config(docs)
    assert conf["tls"]["cert_file"].endswith("/tls.crt"), conf.get("tls")
    assert conf["tls"]["key_file"].endswith("/tls.key"), conf.get("tls")
    assert conf["mqtt"]["tls"]["cert_file"].endswith("/tls.crt"), conf["mqtt"]
    assert _nats_url(docs).startswith("tls://")
    (nats,) = [s for s in k8s.by_kind(docs, "StatefulSet") if k8s.name(s).endswith("-nats")]
    volumes = nats["spec"]["template"]["spec"]["volumes"]
    assert "bus-tls" in {v["secret"]["secretName"] for v in volumes if "secret" in v}


def _deployments(docs: list[Doc]) -> list[Doc]:
    return [d for d in k8s.by_kind(docs, "Deployment") if k8s.is_ours(d)]


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_nats_tls_on_every_smarthome_pod_trusts_the_ca_of_the_certificate_secret(
    render: Any,
) -> None:
    # dev: the services and the demo devices.
    docs = render("dev", "--set", "nats.tls.enabled=true", "--set", "nats.tls.secretName=bus-tls")
    deployments = _deployments(docs)
    assert {k8s.component(d) for d in deployments} >= {"gateway", "actors", "lightbulb"}
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "nats-ca"]
        assert volume["secret"]["secretName"] == "bus-tls", k8s.name(deployment)
        assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt"]
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "nats-ca"]
        assert mount["readOnly"] is True, k8s.name(deployment)
        ca = _env(container)["SMARTHOME_NATS_TLS_CA"]
        assert ca == f"{mount['mountPath']}/ca.crt", k8s.name(deployment)


def test_nats_tls_ca_key_is_configurable(render: Any) -> None:
    docs = render(
        "default",
        "--set",
        "nats.tls.enabled=true",
        "--set",
        "nats.tls.secretName=bus-tls",
        "--set",
        "nats.tls.caKey=root.pem",
    )
    for deployment in _deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "nats-ca"]
        assert [i["key"] for i in volume["secret"]["items"]] == ["root.pem"]
        assert _env(spec["containers"][0])["SMARTHOME_NATS_TLS_CA"].endswith("/root.pem")


def test_nats_tls_is_off_by_default(rendered: Rendered) -> None:
    values_name, docs = rendered
    conf = nats_config(docs)
    assert "tls" not in conf and "tls" not in conf.get("mqtt", {}), values_name
    assert _nats_url(docs).startswith("nats://"), values_name
    for deployment in _deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        assert "nats-ca" not in {v["name"] for v in spec["volumes"]}, values_name
        assert "SMARTHOME_NATS_TLS_CA" not in _env(spec["containers"][0]), values_name
