"""Reading rendered manifests and the code they point at: the reviewer's questions as functions."""

from __future__ import annotations

import ast
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "smarthome"

Doc = dict[str, Any]

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Kinds that Kubernetes itself does not define; kubernetes-validate has no schema for them,
# so the tests check them by cross-reference instead, and the Prometheus Operator's against
# the schemas of monitoring_crds.py.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def name(doc: Doc) -> str:
    return doc["metadata"]["name"]


def labels(doc: Doc) -> dict[str, str]:
    return doc["metadata"].get("labels") or {}


def annotations(doc: Doc) -> dict[str, str]:
    return doc["metadata"].get("annotations") or {}


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{name(doc)}"


def is_ours(doc: Doc) -> bool:
    """Rendered by charts/smarthome itself (not by the nats subchart)."""
    return labels(doc).get("app.kubernetes.io/part-of") == "smarthome"


def component(doc: Doc) -> str | None:
    return labels(doc).get("app.kubernetes.io/component")


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: list[Doc], kind: str, doc_name: str) -> Doc | None:
    return next((d for d in by_kind(docs, kind) if name(d) == doc_name), None)


def pod_template(doc: Doc) -> Doc | None:
    """The pod template (metadata + spec) of a workload, or the Pod itself."""
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] in POD_TEMPLATE_KINDS:
        return doc["spec"]["template"]
    return None


def pods(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) for everything that runs containers."""
    for doc in docs:
        template = pod_template(doc)
        if template is not None:
            yield doc, template


def containers(template: Doc) -> list[Doc]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selector_matches(selector: Doc | None, pod_labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a Service's plain selector map."""
    if not selector:
        return True
    match_labels = selector.get("matchLabels")
    expressions = selector.get("matchExpressions")
    if match_labels is None and expressions is None:
        match_labels = selector
    for key, value in (match_labels or {}).items():
        if pod_labels.get(key) != value:
            return False
    for expr in expressions or []:
        present = expr["key"] in pod_labels
        value = pod_labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def env_value(docs: list[Doc], env: Doc) -> str | None:
    """The value an env entry resolves to, from the rendered ConfigMaps and Secrets.

    None when it comes from an object the chart does not render (an existing Secret).
    """
    if "value" in env:
        return env["value"]
    source = env.get("valueFrom", {})
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        cm = find(docs, "ConfigMap", ref["name"])
        return None if cm is None else cm.get("data", {}).get(ref["key"])
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        secret = find(docs, "Secret", ref["name"])
        if secret is None:
            return None
        if ref["key"] in secret.get("stringData", {}):
            return secret["stringData"][ref["key"]]
        raw = secret.get("data", {}).get(ref["key"])
        return None if raw is None else base64.b64decode(raw).decode()
    return None


def container_port(container: Doc, port: int | str) -> int | None:
    """Resolve a probe's or Service's port (number or name) against the container's ports."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


# --- the code side -------------------------------------------------------------------------

_ENV_READERS = {("os", "environ", "get"), ("os", "getenv")}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def env_names_read(sources: list[Path]) -> set[str]:
    """Environment variable names a module reads, found by reading its source (not importing it).

    Counts `os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]`, and calls with a literal
    name to a module function that hands its parameter to one of those (like settings.py's
    `_port("SMARTHOME_HTTP_PORT", 8000)`).
    """
    names: set[str] = set()
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        # Functions that read the variable named by one of their parameters: name -> index;
        # also through one another (`_positive` hands its name to `_float`), to a fixpoint.
        forwarders: dict[str, int] = {}
        functions = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)]
        while True:
            found = {fn.name: i for fn in functions if (i := _forwards(fn, forwarders)) is not None}
            if found == forwarders:
                break
            forwarders = found
        for node in ast.walk(tree):
            arg: ast.AST | None = None
            if isinstance(node, ast.Call):
                func = _dotted(node.func)
                if func in _ENV_READERS and node.args:
                    arg = node.args[0]
                elif (
                    len(func) == 1
                    and func[0] in forwarders
                    and len(node.args) > forwarders[func[0]]
                ):
                    arg = node.args[forwarders[func[0]]]
            elif isinstance(node, ast.Subscript) and _dotted(node.value) == ("os", "environ"):
                arg = node.slice
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
    return names


def _forwards(fn: ast.FunctionDef, forwarders: dict[str, int]) -> int | None:
    """Which of `fn`'s parameters names the variable it reads (directly or through a known
    forwarder), if one does."""
    params = [a.arg for a in fn.args.args]
    for call in ast.walk(fn):
        if not isinstance(call, ast.Call):
            continue
        func = _dotted(call.func)
        if func in _ENV_READERS:
            index = 0
        elif len(func) == 1 and func[0] in forwarders:
            index = forwarders[func[0]]
        else:
            continue
        if len(call.args) > index:
            arg = call.args[index]
            if isinstance(arg, ast.Name) and arg.id in params:
                return params.index(arg.id)
    return None


def python_sources(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def string_literals(sources: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def module_dir(module: str) -> Path:
    """Where `python -m <module>`'s source lives in the repository."""
    return ROOT.joinpath(*module.split("."))


def module_sources(module: str) -> list[Path]:
    """The source of `python -m <module>`: a package's files, or the module's one file."""
    where = module_dir(module)
    return python_sources(where) if where.is_dir() else [where.with_suffix(".py")]


# --- network policies ----------------------------------------------------------------------


def _port_matches(rule: Doc, port: int, port_name: str | None) -> bool:
    """A rule's `ports` admit the destination's container port (by number or by name)."""
    wanted = rule.get("ports")
    if not wanted:
        return True
    return any(
        p.get("protocol", "TCP") == "TCP" and p.get("port") in (port, port_name) for p in wanted
    )


def _peers_match(peers: list[Doc] | None, peer_labels: dict[str, str]) -> bool:
    """`from`/`to` admit a pod of the same namespace with these labels (absent: anyone)."""
    if not peers:
        return True
    return any(
        "podSelector" in p
        and "namespaceSelector" not in p
        and selector_matches(p["podSelector"], peer_labels)
        for p in peers
    )


def policy_allows(
    policies: list[Doc],
    direction: str,
    pod_labels: dict[str, str],
    peer_labels: dict[str, str],
    port: int,
    port_name: str | None = None,
) -> bool:
    """Whether the NetworkPolicies let a pod (`pod_labels`) talk to a peer of its namespace:
    `Egress` from the pod to the peer's `port`, or `Ingress` to the pod's `port` from the peer.
    A pod no policy of that type selects is not isolated in that direction."""
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    isolating = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", [])
        and selector_matches(p["spec"]["podSelector"], pod_labels)
    ]
    if not isolating:
        return True
    return any(
        _peers_match(rule.get(peers_key), peer_labels) and _port_matches(rule, port, port_name)
        for p in isolating
        for rule in p["spec"].get(key) or []
    )
