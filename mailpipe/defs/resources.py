"""The Dagster resource that hands the engine its tenants, S3 clients and settings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import dagster as dg

from mailpipe.config import TenantConfig, find_tenant, load_tenants


class MailpipeResource(dg.ConfigurableResource):
    """Tenants from the tenants file (``$MAILPIPE_TENANTS`` when ``tenants_file`` is not set; the demo
    tenant without either). Graph clients and repositories are built per tenant by the engine; S3
    repositories get their boto3 client from dagster-aws' ``S3Resource`` (endpoint and region from the
    tenant's ``s3`` settings, credentials from the standard AWS chain)."""

    tenants_file: str | None = None
    max_parallel_mailboxes: int = 32

    def tenants(self) -> list[TenantConfig]:
        return load_tenants(self.tenants_file)

    def tenant(self, name: str) -> TenantConfig:
        """The tenant ``name``; a UserError naming the configured tenants when there is none."""
        return find_tenant(name, self.tenants_file)

    def s3_client(self, tenant: TenantConfig) -> Any:
        if not tenant.storage_is_s3:
            return None
        from dagster_aws.s3 import S3Resource

        return S3Resource(endpoint_url=tenant.s3.endpoint_url, region_name=tenant.s3.region).get_client()

    def discover(self, tenant: TenantConfig):
        from mailpipe.backup import discover_mailboxes, run

        return run(discover_mailboxes(tenant))

    def backup(self, tenant: TenantConfig, upns: list[str], *, skip_if_committed_since: datetime | None,
               progress: Callable[[str, dict], None] | None = None):
        from mailpipe.backup import backup_mailboxes, run

        return run(backup_mailboxes(tenant, upns, skip_if_committed_since=skip_if_committed_since,
                                    progress=progress, max_parallel_mailboxes=self.max_parallel_mailboxes,
                                    s3_client=self.s3_client(tenant)))
