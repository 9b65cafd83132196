"""The HTTP client every command uses: the gateway's URL and token (refreshed when it has
expired); a refusal is an `ApiError` carrying the API's problem details."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec

from services.ctl import config
from services.ctl.config import API_PREFIX, Credentials, Target
from services.ctl.errors import ApiError, CtlError, NotLoggedIn, Unreachable

TIMEOUT_S = 15.0
PAGE_MAX = 500  # the largest page most of the API's lists give
NOT_LOGGED_IN = "not logged in: run `smarthome login URL`, or set SMARTHOME_URL and SMARTHOME_TOKEN"

Params = Mapping[str, str | int | float | bool | None]


def problem_of(response: httpx.Response) -> ApiError:
    fallback = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        body = {"detail": text[0][:200] if text else fallback}
    return ApiError(response.status_code, body if isinstance(body, dict) else {}, fallback)


def unreachable(url: str, exc: httpx.HTTPError) -> CtlError:
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return CtlError(f"{url} is not a URL of a gateway ({exc})")
    reason = str(exc) or type(exc).__name__
    return Unreachable(f"cannot reach the gateway at {url}: {reason}")


class Api:
    """A session with the gateway; paths are relative to `/api/v1` unless they start with
    `/health`."""

    def __init__(self, target: Target, timeout: float = TIMEOUT_S) -> None:
        self.target = target
        self.http = httpx.Client(base_url=target.url, timeout=timeout)

    @classmethod
    def from_config(cls) -> Api:
        target = config.target()
        if target is None:
            raise NotLoggedIn(NOT_LOGGED_IN)
        return cls(target)

    def close(self) -> None:
        self.http.close()

    def _url(self, path: str) -> str:
        return path if path.startswith("/health") else API_PREFIX + path

    def fresh(self) -> Credentials | None:
        """The stored login (None for a token from the environment), its access token
        refreshed first if it has expired."""
        stored = self.target.stored
        if stored is not None and stored.expired:
            self._refresh()
        return self.target.stored

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        self.fresh()
        return {"Authorization": f"Bearer {self.target.token}", **(extra or {})}

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        allow: tuple[int, ...] = (),
    ) -> httpx.Response:
        """The answer; a status of 400 or more that `allow` does not name raises `ApiError`."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in (1, 2):
            try:
                response = self.http.request(
                    method, self._url(path), params=query, json=json, headers=self._headers()
                )
            except httpx.HTTPError as exc:
                raise unreachable(self.target.url, exc) from None
            if response.status_code == 401 and self.target.stored is not None and attempt == 1:
                self._refresh()  # revoked or expired early: one more try with a new token
                continue
            break
        if response.status_code >= 400 and response.status_code not in allow:
            raise self._refused(response)
        return response

    def _refused(self, response: httpx.Response) -> CtlError:
        error = problem_of(response)
        if response.status_code == 401:
            how = "run `smarthome login` again" if self.target.stored else "check SMARTHOME_TOKEN"
            return NotLoggedIn(f"{error.message} ({how})")
        return error

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        response = self.request("POST", path, json=body, params=params)
        return response.json() if response.content else None

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body).json()

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def items(
        self, path: str, limit: int | None = None, page_size: int = PAGE_MAX, **params: Any
    ) -> Iterator[Any]:
        """The items of a paginated list, following `next_cursor`, at most `limit`."""
        cursor = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(remaining, page_size)
            page = self.get(path, **params, cursor=cursor, limit=size)
            if isinstance(page, list):  # a list that is not paginated
                yield from page[:remaining]
                return
            yield from page["items"][:remaining]
            if remaining is not None:
                remaining -= len(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    @contextmanager
    def stream(
        self,
        path: str,
        *,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = TIMEOUT_S,
    ) -> Iterator[httpx.Response]:
        """A GET whose body is read as it comes (a live stream, an export)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        timeout = httpx.Timeout(TIMEOUT_S, read=read_timeout)
        try:
            with self.http.stream(
                "GET", self._url(path), params=query, headers=self._headers(headers),
                timeout=timeout,
            ) as response:  # fmt: skip
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                yield response
        except httpx.HTTPError as exc:
            raise unreachable(self.target.url, exc) from None

    def _refresh(self) -> None:
        """A new access token for the stored login, and the new refresh token stored."""
        stored = self.target.stored
        assert stored is not None
        with config.refreshing():
            # Another command may have refreshed while this one waited for the lock.
            current = config.load()
            if current is not None and current.refresh_token != stored.refresh_token:
                self._use(current)
                if not current.expired:
                    return
                stored = current
            try:
                response = self.http.post(
                    API_PREFIX + "/auth/refresh", json={"refresh_token": stored.refresh_token}
                )
            except httpx.HTTPError as exc:
                raise unreachable(self.target.url, exc) from None
            if response.status_code in (400, 401, 422):
                raise NotLoggedIn("the login has expired: run `smarthome login` again")
            if response.status_code >= 400:
                raise problem_of(response)
            self._use(store_tokens(stored.url, stored.username, response.json()))

    def _use(self, credentials: Credentials) -> None:
        self.target = Target(credentials.url, credentials.access_token, credentials)


def store_tokens(url: str, username: str, pair: Mapping[str, Any]) -> Credentials:
    """Keep a token pair the API answered (`/auth/token`, `/auth/refresh`)."""
    credentials = Credentials(
        url=url,
        username=username,
        access_token=str(pair["access_token"]),
        refresh_token=str(pair["refresh_token"]),
        expires_at=time.time() + float(pair["expires_in"]),
    )
    config.save(credentials)
    return credentials


def decode_json(text: str, what: str) -> Any:
    """JSON the user gave on the command line or in a file; a one-line error if it is not."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise CtlError(f"{what} is not JSON: {exc}") from None


@contextmanager
def session() -> Iterator[Api]:
    """The logged-in session a command works in."""
    api = Api.from_config()
    try:
        yield api
    finally:
        api.close()
