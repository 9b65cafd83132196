"""Access tokens and stream tickets: short-lived JWTs (HS256) signed by the gateway.

Litestar's `Token` encodes and decodes them (PyJWT underneath): the algorithm is pinned, so
`alg: none` or a token signed with another key fails, and the issuer and the audience are
checked. A stream ticket is a JWT for another audience that lives 30 s and works once: what
a browser's EventSource or WebSocket, which cannot send headers, puts in the URL.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from litestar.exceptions import NotAuthorizedException
from litestar.security.jwt import Token

from libs.principals import Principal, PrincipalKind, Role
from libs.settings import Settings

ALGORITHM = "HS256"
ISSUER = "smarthome"
API_AUDIENCE = "smarthome-api"
STREAM_AUDIENCE = "smarthome-stream"
TICKET_TTL_S = 30
MAX_VERIFIED = 10_000


class TokenError(NotAuthorizedException):
    """401 with `WWW-Authenticate: Bearer`."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail=detail, headers={"WWW-Authenticate": 'Bearer realm="smarthome"'})


def signing_key(settings: Settings) -> str:
    """SMARTHOME_JWT_SECRET, or a key made once and kept in the data dir (mode 0600), so that
    tokens survive a restart of the gateway."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / "jwt-secret"
    if not path.exists():
        _create_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def _create_private(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = path.open("x")  # two gateways starting at once: the first one's key wins
    except FileExistsError:
        return
    with fd:
        path.chmod(0o600)
        fd.write(content)


class Tokens:
    def __init__(self, key: str, access_ttl_s: float) -> None:
        self._key = key
        self.access_ttl_s = int(access_ttl_s)
        self._used_tickets: dict[str, float] = {}  # jti → expiry, until it passes
        # Tokens verified already, with their expiry: a client sends the same one with every
        # request, and checking a signature again gives the same answer until it expires.
        self._verified: dict[str, tuple[Principal, float]] = {}

    def access(self, principal: Principal) -> str:
        return self._encode(principal, API_AUDIENCE, self.access_ttl_s)

    def ticket(self, principal: Principal) -> str:
        return self._encode(principal, STREAM_AUDIENCE, TICKET_TTL_S)

    def read_access(self, encoded: str) -> Principal:
        known = self._verified.get(encoded)
        if known is not None and known[1] > time.time():
            return known[0]
        token = self._token(encoded, API_AUDIENCE)
        if len(self._verified) >= MAX_VERIFIED:
            self._verified.clear()  # a bound, not a cache policy: they are cheap to check again
        principal = _principal(token)
        self._verified[encoded] = (principal, token.exp.timestamp())
        return principal

    def redeem_ticket(self, encoded: str) -> Principal:
        """The ticket's principal, once: a second use is refused."""
        token = self._token(encoded, STREAM_AUDIENCE)
        now = time.time()
        self._used_tickets = {j: t for j, t in self._used_tickets.items() if t > now}
        jti = str(token.jti)
        if jti in self._used_tickets:
            raise TokenError("this stream ticket was used already")
        self._used_tickets[jti] = token.exp.timestamp()
        return _principal(token)

    def _encode(self, principal: Principal, audience: str, ttl_s: int) -> str:
        now = datetime.now(UTC)
        token = Token(
            exp=now + timedelta(seconds=ttl_s),
            sub=principal.id,
            iat=now,
            iss=ISSUER,
            aud=audience,
            jti=secrets.token_hex(8),
            extras={
                "kind": principal.kind.value,
                "role": principal.role.value,
                "homes": None if principal.homes is None else sorted(principal.homes),
            },
        )
        return token.encode(self._key, ALGORITHM)

    def _token(self, encoded: str, audience: str) -> Token:
        try:
            return Token.decode(
                encoded,
                self._key,
                ALGORITHM,
                audience=audience,
                issuer=ISSUER,
                require_claims=["exp", "iat", "iss", "aud", "jti"],
            )
        except NotAuthorizedException:
            raise TokenError("the token is invalid or expired") from None


def _principal(token: Token) -> Principal:
    extras = token.extras
    try:
        homes = extras["homes"]
        return Principal(
            kind=PrincipalKind(extras["kind"]),
            id=token.sub,
            role=Role(extras["role"]),
            homes=None if homes is None else frozenset(homes),
        )
    except (KeyError, ValueError, TypeError):
        raise TokenError("the token does not name a principal") from None
