"""The one exception family; the gateway maps it to RFC 9457 problem details."""

from __future__ import annotations


class PlatformError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class Invalid(PlatformError):
    status = 422
    title = "Invalid input"


class NotFound(PlatformError):
    status = 404
    title = "Not found"


class Conflict(PlatformError):
    status = 409
    title = "Conflict"


class Unavailable(PlatformError):
    """A dependency (bus, database, cache) cannot be reached: try again later."""

    status = 503
    title = "Service unavailable"


class StorageFull(PlatformError):
    """The bus refuses to store more (its storage limit is reached): try again once space
    is freed (retention, a purge, a larger volume)."""

    status = 507
    title = "Insufficient storage"
