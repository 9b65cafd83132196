"""Who may do what on the bus: each service's static user, a device's, a bridge's and a
claiming device's permissions, and the nats-server `authorization` block that enforces them.

Services are static users of the server's configuration (bcrypt-hashed passwords), listed
in `auth_callout.auth_users` so that they never wait on the callout; every other client is
asked about through the callout (`libs.bus_auth`, answered by `services.busauth`). Each
grant holds only the subjects and JetStream API calls its holder makes: the recorder
cannot publish commands, only the gateway and the rules can; only the gateway, which
provisions the bus, may create streams (the leases' and episodes' KV buckets excepted: a
worker makes its own bucket if it is missing) and nobody but the gateway may delete or
purge one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from libs import service_status, subjects

JS = "$JS.API"
SERVICE_USERS = ("gateway", "actors", "rules", "recorder", "webhooks", "busauth", "operator")
# The system account's user: the busauth service closes a revoked device's connection
# through it (`$SYS.REQ.SERVER.<id>.KICK`); it has no rights in the platform's account.
SYSTEM_USER = "busauth-sys"
SYSTEM_ACCOUNT = "SYS"
CREDENTIALS_FILE = "services.json"
ENV_USER = "SMARTHOME_NATS_USER"
ENV_PASSWORD = "SMARTHOME_NATS_PASSWORD"
ENV_SYSTEM_PASSWORD = "SMARTHOME_NATS_SYSTEM_PASSWORD"
# The server waits this long for the callout's answer (its default is 2 s): a reconnect
# storm of thousands of devices queues behind one another.
AUTH_TIMEOUT_S = 10
PROVISION_PREFIX = "provision"  # see `subjects.provision`


@dataclass(frozen=True)
class Grant:
    """Subjects a user may publish to and subscribe to (NATS wildcards)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False  # may answer requests it received (the callout's)


inbox_prefix = subjects.inbox_prefix


def _inbox(kind: str, name: str) -> str:
    return inbox_prefix(kind, name) + ".>"


def device_durable(device_id: str) -> str:
    """The durable consumer of a device's commands (made by the gateway with credentials)."""
    return f"device-{device_id}"


# --- JetStream API, by what a user does with a stream ----------------------------------------


def _read_durable(stream: str, durable: str) -> tuple[str, ...]:
    """Fetch from and ack an existing durable consumer."""
    return (
        f"{JS}.CONSUMER.INFO.{stream}.{durable}",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    )


def _read_stream(stream: str) -> tuple[str, ...]:
    """Stream info and messages read by sequence or subject."""
    return (
        f"{JS}.STREAM.INFO.{stream}",
        f"{JS}.STREAM.MSG.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
    )


def _own_consumers(stream: str) -> tuple[str, ...]:
    """Create, list, read, fetch, ack and delete consumers of a stream (not the stream)."""
    return (
        f"{JS}.CONSUMER.*.{stream}",
        f"{JS}.CONSUMER.*.{stream}.>",
        f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def _kv(bucket: str) -> tuple[str, ...]:
    """A KV bucket: create it if missing (same config), read, write, watch its keys."""
    stream = f"KV_{bucket}"
    return (
        f"{JS}.STREAM.CREATE.{stream}",
        f"$KV.{bucket}.>",
        *_read_stream(stream),
        *_own_consumers(stream),
    )


def _status(name: str) -> tuple[str, ...]:
    """Write (and delete, on a clean stop) its own entries in the status bucket, keyed
    `<name>.<instance>` (`libs.service_status`); only the gateway reads them all."""
    return (f"$KV.{STATUS}.{name}.>", f"{JS}.STREAM.INFO.KV_{STATUS}")


LEASES = "leases"
ACTOR_LEASES = "actor_leases"
EPISODES = "rule_episodes"
STATUS = service_status.BUCKET
EVENTS, COMMANDS, SYSTEM, DEADLETTER = (
    subjects.EVENTS_STREAM,
    subjects.COMMANDS_STREAM,
    subjects.SYSTEM_STREAM,
    subjects.DEADLETTER_STREAM,
)
ALL_STREAMS = (EVENTS, COMMANDS, SYSTEM, DEADLETTER)


def service_grants() -> dict[str, Grant]:
    """Each service's grant, from what its code does on the bus."""
    return {
        # The HTTP surface and the bus's provisioner: streams and consumers, publishing
        # events (POST /events), commands, registry facts, feeds of any subject.
        "gateway": Grant(
            publish=(
                subjects.EVENTS_ALL,
                subjects.COMMANDS_ALL,
                subjects.SYSTEM_ALL,
                subjects.DEADLETTER_ALL,
                f"{PROVISION_PREFIX}.>",
                f"$KV.{STATUS}.gateway.>",
                f"{JS}.>",
                "$JS.ACK.>",
                "$JS.FC.>",
            ),
            subscribe=(
                _inbox("svc", "gateway"),
                subjects.SYSTEM_ALL,
                subjects.device_events("*", "hello"),
            ),
        ),
        # Device state: reads EVENTS, publishes state facts (and transitions, the ones the
        # recorder audits), refusal facts, presence timeouts.
        "actors": Grant(
            publish=(
                subjects.device_state("*"),
                subjects.device_transition("*"),
                subjects.device_rejected("*"),
                subjects.device_events("*", "presence_timeout"),
                subjects.DEADLETTER_ALL,
                # Its partitions' consumers (`actors-<p>`, as many as installed: a token
                # wildcard), and the one from before partitions, deleted once drained.
                *_read_durable(EVENTS, "*"),
                f"{JS}.CONSUMER.DELETE.{EVENTS}.actors",
                *_read_stream(EVENTS),
                *_kv(LEASES),
                *_kv(ACTOR_LEASES),
                *_status("actors"),
            ),
            subscribe=(_inbox("svc", "actors"), subjects.DEVICE_REGISTRY_ALL),
        ),
        # Rules: commands (with the gateway, the only ones), alerts, traces, marks and
        # published events; their own consumers on SYSTEM and EVENTS; episodes in KV.
        "rules": Grant(
            publish=(
                subjects.COMMANDS_ALL,
                subjects.EVENTS_ALL,
                "system.rule.>",
                "system.alert.>",
                "system.notify.>",
                subjects.DEADLETTER_ALL,
                *_own_consumers(SYSTEM),
                *_own_consumers(EVENTS),
                *_read_stream(SYSTEM),
                *_read_stream(EVENTS),
                *_kv(EPISODES),
                *_kv(LEASES),
                *_status("rules"),
            ),
            subscribe=(
                _inbox("svc", "rules"),
                subjects.RULES_CHANGED_ALL,
                subjects.DEVICE_REGISTRY_ALL,
            ),
        ),
        # History and audit: reads three streams, writes only dead letters.
        "recorder": Grant(
            publish=(
                subjects.DEADLETTER_ALL,
                *(p for s in (EVENTS, COMMANDS, SYSTEM) for p in _recorder_reads(s)),
                *_status("recorder"),
            ),
            subscribe=(_inbox("svc", "recorder"),),
        ),
        # One consumer per subscription on whichever stream it follows.
        "webhooks": Grant(
            publish=(
                subjects.DEADLETTER_ALL,
                *(p for s in ALL_STREAMS for p in (*_own_consumers(s), *_read_stream(s))),
                *_kv(LEASES),
                *_status("webhooks"),
            ),
            # The facts that say which home a subscription's messages belong to.
            subscribe=(
                _inbox("svc", "webhooks"),
                "system.subscription.*.changed",
                subjects.DEVICE_REGISTRY_ALL,
                subjects.RULES_CHANGED_ALL,
                subjects.location_changed("*"),
            ),
        ),
        # Answers the server's questions about connecting clients; reads the facts that
        # revoke credentials.
        "busauth": Grant(
            publish=(*_read_durable(SYSTEM, "busauth"), *_status("busauth")),
            subscribe=("$SYS.REQ.USER.AUTH", _inbox("svc", "busauth")),
            responses=True,
        ),
        # People operating the bus (`nats` CLI, benchmarks, the tests' own client): all.
        "operator": Grant(publish=(">",), subscribe=(">",), responses=True),
    }


def _recorder_reads(stream: str) -> tuple[str, ...]:
    return (*_read_durable(stream, f"recorder-{stream.lower()}"), *_read_stream(stream))


def device_grant(device_id: str) -> Grant:
    """Exactly: publish its own events; receive its own commands, live or through its
    durable consumer (read and ack it, never make or change one); its own inbox."""
    durable = device_durable(device_id)
    return Grant(
        publish=(
            subjects.device_events_all(device_id),
            *_read_durable(COMMANDS, durable),
        ),
        subscribe=(subjects.commands(device_id), _inbox("dev", device_id)),
    )


def bridge_grant(bridge_id: str, device_ids: Iterable[str]) -> Grant:
    """A hub speaking for its devices on one connection: each one's events and commands."""
    ids = sorted(device_ids)
    return Grant(
        publish=tuple(subjects.device_events_all(d) for d in ids),
        subscribe=(*(subjects.commands(d) for d in ids), _inbox("bridge", bridge_id)),
    )


def claimant_grant(device_id: str, nonce: str) -> Grant:
    """A device presenting a provisioning token: announce itself and wait for its
    credentials, nothing else."""
    return Grant(
        publish=(subjects.device_events(device_id, "hello"),),
        subscribe=(subjects.provision(device_id, nonce), _inbox("claim", device_id)),
    )


# --- the services' passwords and the server's configuration ---------------------------------


@dataclass(frozen=True)
class ServicePassword:
    password: str
    bcrypt: str  # what the server's configuration holds


def ensure_service_passwords(directory: Path) -> dict[str, ServicePassword]:
    """The services' passwords kept in `directory` (made on first start, mode 0600); a
    user added since is given one."""
    path = directory / CREDENTIALS_FILE
    known: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
    wanted = (*SERVICE_USERS, SYSTEM_USER)
    stale = [u for u in wanted if u not in known or not known[u]["bcrypt"].startswith(BCRYPT)]
    if stale:
        for user in stale:
            password = known.get(user, {}).get("password") or secrets.token_urlsafe(32)
            known[user] = {"password": password, "bcrypt": bcrypt_hash(password)}
        write_secret_file(path, json.dumps(known, indent=1).encode())
    return {user: ServicePassword(**known[user]) for user in wanted}


def write_secret_file(path: Path, content: bytes) -> None:
    """Write `content` readable by this user only, atomically (no moment with wider rights)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# The passwords are 256 random bits: no cost of hashing is needed to keep them from being
# guessed; the hash keeps a usable password out of the server's configuration. A low cost
# keeps each service's (re)connection a millisecond of the server's read loop instead of a
# tenth of a second or more (seconds on a busy machine, past the client's connect timeout).
BCRYPT_ROUNDS = 6
BCRYPT = f"$2a${BCRYPT_ROUNDS:02d}$"


def bcrypt_hash(password: str) -> str:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
    # The same algorithm; the server's parser names the `2a` variant.
    return "$2a$" + hashed[4:]


def service_env(passwords: Mapping[str, ServicePassword], user: str) -> dict[str, str]:
    """The environment that gives a child process its own bus identity, and no other (the
    busauth service also gets the system account's, to close revoked connections)."""
    env = {ENV_USER: user, ENV_PASSWORD: passwords[user].password}
    if user == "busauth":
        env[ENV_SYSTEM_PASSWORD] = passwords[SYSTEM_USER].password
    return env


def authorization_config(
    passwords: Mapping[str, str], issuer_public_key: str, grants: Mapping[str, Grant] | None = None
) -> str:
    """The server's `authorization`, `accounts` and `system_account` settings: the static
    service users (their passwords as given: bcrypt hashes, or `$ENV_VAR` references the
    server resolves), and the callout for everyone else. No anonymous user exists."""
    grants = grants if grants is not None else service_grants()
    users = ",\n".join(
        f"    {{user: {_q(user)}, password: {_q(passwords[user])}, "
        f"permissions: {_permissions(grants[user])}}}"
        for user in SERVICE_USERS
    )
    auth_users = ", ".join(_q(u) for u in (*SERVICE_USERS, SYSTEM_USER))
    system_user = f"{{user: {_q(SYSTEM_USER)}, password: {_q(passwords[SYSTEM_USER])}}}"
    return f"""authorization {{
  timeout: {AUTH_TIMEOUT_S}
  users: [
{users}
  ]
  auth_callout {{
    issuer: {_q(issuer_public_key)}
    auth_users: [ {auth_users} ]
  }}
}}
accounts {{
  {SYSTEM_ACCOUNT} {{ users: [ {system_user} ] }}
}}
system_account: {SYSTEM_ACCOUNT}
"""


def _permissions(grant: Grant) -> str:
    pub = ", ".join(_q(s) for s in grant.publish)
    sub = ", ".join(_q(s) for s in grant.subscribe)
    responses = ", allow_responses: true" if grant.responses else ""
    return f"{{publish: {{allow: [{pub}]}}, subscribe: {{allow: [{sub}]}}{responses}}}"


def _q(value: str) -> str:
    # `$NAME` unquoted is a variable reference the server resolves from its environment.
    if value.startswith("$") and value[1:].replace("_", "").isalnum() and value[1:].isupper():
        return value
    return json.dumps(value)
