"""The Dagster resource that hands the engine its tenants, S3 clients and settings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import dagster as dg

from mailpipe.config import TenantConfig, find_tenant, load_tenants
from mailpipe.settings import Settings

# The engine's settings (mailpipe.settings) that are this resource's config: one field each, same name.
ENGINE_SETTINGS = (
    "graph_retry_attempts", "graph_retry_base_delay", "graph_retry_max_delay", "graph_response_timeout",
    "graph_min_transfer_rate", "graph_slow_body_grace", "checkpoint_seconds", "checkpoint_items",
    "mailbox_deadline", "item_retry_delay", "verify_min_chunks", "verify_cycle", "lease_seconds", "prune_safety",
    "work_dir", "max_parallel_mailboxes",
)
_D = Settings()


class MailpipeResource(dg.ConfigurableResource):
    """Tenants from the tenants file (``$MAILPIPE_TENANTS`` when ``tenants_file`` is not set; the demo
    tenant without either). Graph clients and repositories are built per tenant by the engine; S3
    repositories get their boto3 client from dagster-aws' ``S3Resource`` (endpoint and region from the
    tenant's ``s3`` settings, credentials from the standard AWS chain).

    The other fields are the engine's settings (docs/OPERATIONS.md: one ``MAILPIPE_*`` variable each, read
    once when the definitions load, shown here in the UI, overridable in a run's config)."""

    tenants_file: str | None = None
    graph_retry_attempts: int = _D.graph_retry_attempts
    graph_retry_base_delay: float = _D.graph_retry_base_delay
    graph_retry_max_delay: float = _D.graph_retry_max_delay
    graph_response_timeout: float = _D.graph_response_timeout
    graph_min_transfer_rate: int = _D.graph_min_transfer_rate
    graph_slow_body_grace: float = _D.graph_slow_body_grace
    checkpoint_seconds: float = _D.checkpoint_seconds
    checkpoint_items: int = _D.checkpoint_items
    mailbox_deadline: float = _D.mailbox_deadline
    item_retry_delay: float = _D.item_retry_delay
    verify_min_chunks: int = _D.verify_min_chunks
    verify_cycle: int = _D.verify_cycle
    lease_seconds: float = _D.lease_seconds
    prune_safety: float = _D.prune_safety
    work_dir: str = _D.work_dir
    max_parallel_mailboxes: int = _D.max_parallel_mailboxes

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> MailpipeResource:
        return cls(**{k: getattr(settings, k) for k in ENGINE_SETTINGS}, **kw)

    def settings(self) -> Settings:
        """The engine's settings, checked like environment values."""
        return Settings().replace(**{k: getattr(self, k) for k in ENGINE_SETTINGS})

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

    def repository(self, tenant: TenantConfig):
        """The tenant's repository (it must exist); files in transit go to the tenant's private work dir."""
        from mailpipe.repo import open_repository

        return open_repository(tenant, s3_client=self.s3_client(tenant), create=False,
                               tmp_dir=self.settings().tenant_work_dir(tenant.name))

    def check_snapshots(self, tenant: TenantConfig, snapshots: list[tuple[str, str, str]]):
        """The structural check (``mailpipe check`` without ``--read-data``) of one snapshot per mailbox,
        ``(user id, upn, snapshot id)``: a :class:`mailpipe.repo.check.CheckResult`, per mailbox by upn."""
        from mailpipe.repo.check import check_repository

        return check_repository(self.repository(tenant), [(uid, upn) for uid, upn, _ in snapshots],
                                snapshot={uid: sid for uid, _, sid in snapshots})

    def sample_check(self, tenant: TenantConfig, upns: list[str], sample: tuple[int, int]):
        """``mailpipe check --read-data`` of every snapshot of ``upns`` restricted to the chunks in slice
        ``sample = (k, n)``; mailboxes without a backup are left out. Per mailbox by lower-cased upn."""
        from mailpipe.repo.check import check_repository

        repo = self.repository(tenant)
        wanted = {u.lower() for u in upns}
        mailboxes = [(uid, upn.lower()) for uid, upn in repo.list_mailboxes() if upn.lower() in wanted]
        return check_repository(repo, mailboxes, snapshot="all", read_data=True, sample=sample)

    def maintain(self, tenant: TenantConfig, *, dry_run: bool = False,
                 progress: Callable[[str], None] | None = None):
        """Repository maintenance: ``forget`` (the tenant's retention), then ``prune`` (``progress``: its
        steps); both results."""
        from mailpipe.repo.forget import forget
        from mailpipe.repo.prune import prune

        s = self.settings()
        repo = self.repository(tenant)
        forgotten = forget(repo, tenant, dry_run=dry_run, lease_seconds=s.lease_seconds)
        pruned = prune(repo, dry_run=dry_run, safety_seconds=s.prune_safety, lease_seconds=s.lease_seconds,
                       progress=progress)
        return forgotten, pruned

    def discover(self, tenant: TenantConfig):
        from mailpipe.backup import discover_mailboxes, run
        from mailpipe.sim.embedded import resolve

        return run(discover_mailboxes(resolve(tenant), self.settings()))

    def restore(self, tenant: TenantConfig, request: Any, *, progress: Callable[[dict], None] | None = None):
        """Restore ``request`` (a :class:`mailpipe.restore.RestoreRequest`) from ``tenant``'s repository."""
        from mailpipe.restore import restore_mailbox, run
        from mailpipe.sim.embedded import resolve

        return run(restore_mailbox(resolve(tenant), request, settings=self.settings(), progress=progress,
                                   s3_client=self.s3_client(tenant)))

    def backup(self, tenant: TenantConfig, upns: list[str], *, skip_if_committed_since: datetime | None,
               progress: Callable[[str, dict], None] | None = None):
        """Back up ``upns``; another backup of one of them running (its lease) is waited for, and its
        snapshot reported as this run's when it commits meanwhile (the partition ends MATERIALIZED)."""
        from mailpipe.backup import backup_mailboxes, run
        from mailpipe.sim.embedded import resolve

        return run(backup_mailboxes(resolve(tenant), upns, settings=self.settings(),
                                    skip_if_committed_since=skip_if_committed_since, progress=progress,
                                    s3_client=self.s3_client(tenant), wait_for_lease=True))
