"""`/api/v1/devices/{id}/credentials`, `/api/v1/bridges`, `/api/v1/provisioning-tokens`: HTTP
only; the logic is in `service.py`."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from libs.principals import Permission
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.credentials.schemas import (
    Bridge,
    BridgeCreate,
    BusCredentials,
    ProvisioningToken,
    ProvisioningTokenCreate,
)
from services.gateway.credentials.service import CredentialService
from services.gateway.resources import Resources

MANAGE = [requires(Permission.MANAGE_DEVICES)]


def provide_credential_service(resources: NamedDependency[Resources]) -> CredentialService:
    return CredentialService(resources.sessions, resources.nc, resources.js)


class CredentialController(Controller):
    tags = ["devices"]
    guards = MANAGE
    dependencies = {
        "credentials": Provide(provide_credential_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/devices/{device_id:str}/credentials",
        operation_id="rotateDeviceCredentials",
        summary="Issue a device new bus credentials",
        description="The answer is shown once (only a hash is kept). The old password is "
        "refused from now on, over NATS and MQTT, and a connection that used it is closed "
        "within seconds.",
    )
    async def rotate(
        self,
        credentials: NamedDependency[CredentialService],
        device_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> BusCredentials:
        return await credentials.rotate(device_id, ctx)

    @post(
        "/bridges",
        dto=StrictBody[BridgeCreate],
        operation_id="createBridge",
        summary="Make a bridge: one connection for many devices of a home",
        description="Its `credentials` are shown once. Devices registered with "
        '`"bridge": "<id>"` in its home are the ones it may speak for.',
    )
    async def create_bridge(
        self,
        credentials: NamedDependency[CredentialService],
        data: JSONBody[BridgeCreate],
        ctx: NamedDependency[Context],
    ) -> Bridge:
        return await credentials.create_bridge(data, ctx)

    @post(
        "/bridges/{bridge_id:str}/credentials",
        operation_id="rotateBridgeCredentials",
        summary="Issue a bridge new bus credentials",
        description="Shown once; its connection with the old ones is closed within seconds.",
    )
    async def rotate_bridge(
        self,
        credentials: NamedDependency[CredentialService],
        bridge_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> BusCredentials:
        return await credentials.rotate_bridge(bridge_id, ctx)

    @post(
        "/provisioning-tokens",
        dto=StrictBody[ProvisioningTokenCreate],
        operation_id="createProvisioningToken",
        summary="Make a claim token for devices of a home",
        description="The `token` is shown once. A device connecting with its id as "
        "username, the token as password and a random nonce as connection name may only "
        "say hello; once approved it receives its own credentials on "
        "`provision.<id>.<nonce>`.",
    )
    async def create_token(
        self,
        credentials: NamedDependency[CredentialService],
        data: JSONBody[ProvisioningTokenCreate],
        ctx: NamedDependency[Context],
    ) -> ProvisioningToken:
        return await credentials.create_token(data, ctx)
