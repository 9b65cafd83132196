"""Who is acting: roles, what each may do, and the principal a request runs as.

One vocabulary for every process: the gateway authenticates people and integrations into a
`Principal`; the webhooks worker and the audit log read the same homes and names.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class Role(StrEnum):
    ADMIN = "admin"
    INSTALLER = "installer"
    RESIDENT = "resident"


class Permission(StrEnum):
    """What a route needs; a guard refuses the roles without it (403)."""

    READ = "read"  # devices, state, history, statistics, commands, rules, audit, locations
    COMMAND = "command"  # send a device a command
    MANAGE_DEVICES = "manage_devices"  # register, approve, reject, decommission, credentials
    MANAGE_LOCATIONS = "manage_locations"
    MANAGE_RULES = "manage_rules"
    MANAGE_SUBSCRIPTIONS = "manage_subscriptions"
    PUBLISH = "publish"  # POST /events on behalf of a device of one's homes
    ADMINISTER = "administer"  # users, API keys, platform status, metrics, the whole bus


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.INSTALLER: frozenset(
        {
            Permission.READ,
            Permission.MANAGE_DEVICES,
            Permission.MANAGE_LOCATIONS,
            Permission.PUBLISH,
        }
    ),
    Role.RESIDENT: frozenset(
        {
            Permission.READ,
            Permission.COMMAND,
            Permission.MANAGE_RULES,
            Permission.MANAGE_SUBSCRIPTIONS,
        }
    ),
}


class PrincipalKind(StrEnum):
    USER = "user"
    API_KEY = "apikey"


class Principal(msgspec.Struct, frozen=True):
    """An authenticated caller. `homes` is None for an admin: every home, and what belongs
    to none (a device without a location, a platform-wide rule)."""

    kind: PrincipalKind
    id: str  # the user name, or the API key's id
    role: Role
    homes: frozenset[str] | None

    @property
    def actor(self) -> str:
        """How the audit log names it: `user:alice`, `apikey:k-1f2e`."""
        return f"{self.kind}:{self.id}"

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def sees(self, home: str | None) -> bool:
        """Whether an object of this home (None: of no home) is visible to it."""
        return self.homes is None or (home is not None and home in self.homes)


def home_of(location: str | None) -> str | None:
    """A device's home: the first segment of its location path (`home/ground/hall` → home)."""
    if not location:
        return None
    return location.split("/", 1)[0]


def at_most(role: Role, of: Role) -> bool:
    """Whether `role` grants nothing that `of` lacks (an API key's role against its maker's)."""
    return ROLE_PERMISSIONS[role] <= ROLE_PERMISSIONS[of]
