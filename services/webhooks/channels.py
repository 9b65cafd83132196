"""Notification channels: a rule's alert addressed to a channel (`system.notify.<channel id>`)
rendered for people and sent by e-mail (SMTP), to a Slack-compatible incoming webhook or to
ntfy. A channel is delivered by a subscription's machinery (`worker.py`: its notify consumer,
retries with back-off, delivery records, re-drives); only rendering and sending are its own.

Every destination obeys the webhooks' address policy (`libs.webhooks.refused_range`): the
HTTP ones through the checked resolver of the channel's session, the SMTP host by the check
below, whose SMTP session runs over a socket connected to the address that was checked
(a second lookup could answer another: DNS rebinding). Failures are told in our own words,
never the server's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable, Sequence
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
import msgspec
from aiohttp.abc import AbstractResolver

from libs import messages as m
from libs import webhooks
from libs.webhooks import Failure
from services.webhooks.payload import Payload
from services.webhooks.sender import Outcome, Sender, failed, refused_address

# ntfy's priorities (1-5) by the alert's severity.
NTFY_PRIORITY = {"info": 3, "warning": 4, "critical": 5}


class Alert(msgspec.Struct, frozen=True):
    """What a rule's `notify` action publishes as its event's data (`services.rules.actions`)."""

    message: str
    severity: str = "info"
    rule_id: str | None = None
    rule_name: str | None = None
    home: str | None = None
    values: dict[str, Any] = {}


def alert_of(payload: Payload) -> tuple[m.CloudEvent, Alert]:
    """The alert a notification carries; ValueError when it is none."""
    try:
        event = m.cloud_event_decoder.decode(payload.body)
        return event, msgspec.convert(event.data, Alert)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"the notification is no rule alert ({exc})") from None


def title(alert: Alert) -> str:
    """`WARNING: Light on too long`: what a phone shows first."""
    return f"{alert.severity.upper()}: {alert.rule_name or alert.rule_id or 'smarthome'}"


def text(event: m.CloudEvent, alert: Alert) -> str:
    """The alert's message, then where it comes from."""
    lines = [alert.message, ""]
    if alert.rule_id:
        lines.append(f"Rule: {alert.rule_name or alert.rule_id} ({alert.rule_id})")
    lines.append(f"About: {event.subject}")
    lines.extend(f"{name}: {value}" for name, value in sorted(alert.values.items()))
    if event.time is not None:
        lines.append(f"Time: {event.time.isoformat()}")
    return "\n".join(lines).rstrip() + "\n"


def slack_body(alert: Alert) -> bytes:
    """A Slack incoming-webhook message (Mattermost and Rocket.Chat take the same)."""
    return msgspec.json.encode({"text": f"*{title(alert)}*\n{alert.message}"})


def ntfy_body(config: m.NtfyChannel, event: m.CloudEvent, alert: Alert) -> bytes:
    """ntfy's JSON publishing (`POST <server>/` with the topic in the body)."""
    return msgspec.json.encode(
        {
            "topic": config.topic,
            "title": title(alert),
            "message": text(event, alert),
            "priority": NTFY_PRIORITY.get(alert.severity, 3),
            "tags": [alert.severity],
        }
    )


def email_message(
    config: m.EmailChannel, event: m.CloudEvent, alert: Alert, msg_id: str
) -> EmailMessage:
    """The e-mail; its Message-ID follows from the notification, the same on every attempt."""
    message = EmailMessage()
    message["From"] = config.from_
    message["To"] = ", ".join(config.to)
    message["Subject"] = f"[smarthome] {title(alert)}"
    message["Message-ID"] = f"<{msg_id}@smarthome>"
    message.set_content(text(event, alert))
    return message


def ntfy_url(server: str) -> str:
    return server.rstrip("/") + "/"


class ChannelSender:
    """Sends a channel's notifications (`worker.SourceWorker` hands it the rendered alert
    event): POSTs over the channel's session for Slack and ntfy, an SMTP session for e-mail.
    `resolver`: what looks the SMTP host up (tests); the system's resolver by default."""

    def __init__(
        self,
        config: m.ChannelConfig,
        session: aiohttp.ClientSession,
        settings: webhooks.WebhookSettings,
        *,
        allow_private_targets: bool,
        home: str | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._local_hostname: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._home = home
        self._settings = settings
        self._private = allow_private_targets
        self._http: Sender | None = None  # e-mail goes over SMTP
        match config:
            case m.SlackChannel(url=url) | m.NtfyChannel(server=url):
                if isinstance(config, m.NtfyChannel):
                    url = ntfy_url(url)
                # Unsigned: these endpoints check their URL's token, not a signature.
                self._http = Sender(
                    session, settings, url, None, allow_private_targets=allow_private_targets
                )

    async def send(self, payload: Payload) -> Outcome:
        try:
            event, alert = alert_of(payload)
        except ValueError as exc:
            return failed(Failure.INVALID, str(exc))
        if alert.home is not None and alert.home != self._home:
            # A homed rule notifies its own home's channels only.
            return failed(Failure.BLOCKED, "the alert is of another home than the channel")
        config = self._config
        if isinstance(config, m.EmailChannel):
            return await self._mail(config, email_message(config, event, alert, payload.msg_id))
        assert self._http is not None
        headers = {"content-type": "application/json"}
        if isinstance(config, m.NtfyChannel):
            body = ntfy_body(config, event, alert)
            if config.token:
                headers["authorization"] = f"Bearer {config.token}"
        else:
            body = slack_body(alert)
        return await self._http.send(Payload(payload.msg_id, body, headers))

    async def _mail(self, config: m.EmailChannel, message: EmailMessage) -> Outcome:
        timeout = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._addresses(config.host, config.port)
                if isinstance(addresses, Outcome):
                    return addresses
                # What aiosmtplib would otherwise make after it took the socket: made first,
                # nothing stands between the connection and the session taking it over.
                local_hostname, tls = await self._session_defaults(config)
                sock = await connect(addresses, config.port)
                # The session runs over the socket connected to a checked address, never over
                # a second lookup of the name, and owns it (its transport closes it); TLS
                # still verifies the host's name.
                await aiosmtplib.send(
                    message,
                    hostname=config.host,
                    sock=sock,
                    local_hostname=local_hostname,
                    tls_context=tls,
                    username=config.username,
                    password=config.password,
                    use_tls=config.security == "tls",
                    start_tls=config.security == "starttls",
                    timeout=timeout,
                )
        except TimeoutError:  # aiosmtplib's timeouts are TimeoutErrors too
            return failed(Failure.TIMEOUT, f"no answer within {timeout:g} s")
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            return smtp_failure(exc)
        return Outcome(True, 250)

    async def _session_defaults(self, config: m.EmailChannel) -> tuple[str, ssl.SSLContext | None]:
        """This machine's name for EHLO and, when the channel uses TLS, a context verifying
        the server's certificate and name: aiosmtplib's own defaults, made once."""
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        if self._tls is None and config.security != "none":
            self._tls = await asyncio.to_thread(ssl.create_default_context)
        return self._local_hostname, self._tls

    async def _addresses(self, host: str, port: int) -> list[str] | Outcome:
        """The addresses of the SMTP host it may be connected to, in the resolver's order; an
        outcome when there is none. Like a webhook's `CheckedResolver`, a name is reached only
        at the addresses it resolves to that the policy allows."""
        nets = self._settings.allow_nets
        if webhooks.is_address(host):
            reason = refused_address(host, nets, allow_private_targets=self._private)
            return [host] if reason is None else failed(Failure.BLOCKED, reason)
        try:
            answers = await self._resolve(host, port)
        except (OSError, UnicodeError):
            return failed(Failure.DNS, "the host name does not resolve")
        allowed, refused = allowed_addresses(answers, nets, allow_private_targets=self._private)
        if not allowed:
            return failed(
                Failure.BLOCKED, f"{host} resolves to {refused[0] if refused else 'no address'}"
            )
        return allowed

    async def _resolve(self, host: str, port: int) -> list[str]:
        if self._resolver is not None:
            answers = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
            return [answer["host"] for answer in answers]
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(sockaddr[0]) for *_, sockaddr in found]


def allowed_addresses(
    answers: Iterable[str], nets: Iterable[webhooks.IPNetwork], *, allow_private_targets: bool
) -> tuple[list[str], list[str]]:
    """(the addresses that may be connected to, in order and once each; why the others may
    not)."""
    nets = tuple(nets)
    allowed: list[str] = []
    refused: list[str] = []
    for address in dict.fromkeys(answers):
        reason = webhooks.refused_range(address, nets, allow_private_targets=allow_private_targets)
        if reason is None:
            allowed.append(address)
        else:
            refused.append(reason)
    return allowed, refused


async def connect(addresses: Sequence[str], port: int) -> socket.socket:
    """A TCP connection to the first of `addresses` that accepts one; the last failure when
    none does."""
    loop = asyncio.get_running_loop()
    error: OSError = OSError("no address to connect to")
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (address, port))
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # cancelled or timed out: the socket is not left open
            sock.close()
            raise
        return sock
    raise error


def smtp_failure(exc: BaseException) -> Outcome:
    """An SMTP failure in our own words: the reply's code and class, never its text."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        code = exc.recipients[0].code
        return failed(Failure.of_status(code), f"SMTP {code}: the recipients were refused", code)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return failed(
            Failure.of_status(exc.code), f"SMTP {exc.code}: authentication failed", exc.code
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return failed(
            Failure.of_status(exc.code), f"SMTP {exc.code}: the sender was refused", exc.code
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return failed(Failure.of_status(exc.code), f"SMTP {exc.code}: the server refused", exc.code)
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError | aiosmtplib.SMTPTimeoutError):
        return failed(Failure.TIMEOUT, "the SMTP server did not answer in time")
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return failed(Failure.TLS, "the TLS handshake failed")
    if isinstance(exc, ConnectionRefusedError) or isinstance(exc.__cause__, ConnectionRefusedError):
        return failed(Failure.REFUSED, "the connection was refused")
    if isinstance(exc, aiosmtplib.SMTPException) and "STARTTLS" in str(exc):
        return failed(Failure.TLS, "the server offers no STARTTLS")
    return failed(Failure.CONNECTION, "the SMTP session failed")
