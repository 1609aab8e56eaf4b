"""Credentials from the tenants file (async azure-identity classes, or a static token for the simulator)."""

from __future__ import annotations

import os
import time
from typing import Any

from azure.core.credentials import AccessToken

from mailpipe.config import AUTHORITY, TenantConfig
from mailpipe.errors import UserError

SIMULATOR_TOKEN = "mailpipe-simulator-static-token"  # not a secret: the simulator accepts any bearer token


class StaticTokenCredential:
    """An async credential returning a fixed token (the simulator without its token endpoint)."""

    def __init__(self, token: str = SIMULATOR_TOKEN) -> None:
        self._token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "StaticTokenCredential()"


def make_credential(tenant: TenantConfig, authority: str, ca_bundle: str | None) -> Any:
    """The async credential for ``tenant``. Secrets are read from the environment here and nowhere else."""
    auth = tenant.auth
    kw: dict[str, Any] = {}
    if authority and authority.rstrip("/") != AUTHORITY:
        # national cloud or a test server: do not ask the public cloud for instance metadata
        kw["authority"] = authority
        kw["disable_instance_discovery"] = True
    if ca_bundle:
        kw["connection_verify"] = ca_bundle
    if auth.simulator:
        return StaticTokenCredential()
    if auth.client_secret_env:
        from azure.identity.aio import ClientSecretCredential

        secret = os.environ.get(auth.client_secret_env)
        if not secret:
            raise UserError(f"tenant {tenant.name!r}: environment variable {auth.client_secret_env} "
                            "(auth.client_secret_env) is not set or empty")
        return ClientSecretCredential(tenant.tenant_id, tenant.client_id, secret, **kw)
    if auth.certificate_path:
        from azure.identity.aio import CertificateCredential

        if not os.path.isfile(auth.certificate_path):
            raise UserError(f"tenant {tenant.name!r}: auth.certificate_path {auth.certificate_path} is not a file")
        return CertificateCredential(tenant.tenant_id, tenant.client_id, certificate_path=auth.certificate_path,
                                     **kw)
    if auth.managed_identity:
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=tenant.client_id)
    raise UserError(f"tenant {tenant.name!r}: no auth method configured")
