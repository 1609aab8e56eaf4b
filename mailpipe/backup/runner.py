"""The backup engine's calls: what the Dagster layer and the CLI call (:func:`backup_mailboxes`,
:func:`discover_mailboxes`), and how a tenant's mailboxes are run together — one store pool and one repository
per call, one :class:`~mailpipe.backup.engine.MailboxBackup` per mailbox, of the class the tenant's ``content``
mode asks for (MIME, the export API's streams, or both)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from mailpipe.backup.api import Discovery, MailboxRef, MailboxResult, ProgressCallback, SkippedUser
from mailpipe.backup.engine import STORE_THREADS, MailboxBackup
from mailpipe.backup.fidelity import BothBackup, FidelityBackup
from mailpipe.config import TenantConfig
from mailpipe.settings import Settings


async def discover_mailboxes(tenant: TenantConfig, settings: Settings | None = None) -> Discovery:
    """List the tenant's mailboxes (Graph ``/users``), filtered by the tenant's globs."""
    from mailpipe.graph import GraphTenant

    async with GraphTenant.from_config(tenant, settings) as graph:
        listing = await graph.list_mailboxes()
    mailboxes = sorted(
        (MailboxRef(user_id=m.id, upn=m.upn.lower()) for m in listing.mailboxes
         if tenant.mailboxes.matches(m.upn)),
        key=lambda m: m.upn,
    )
    skipped = [SkippedUser(upn=s.upn.lower(), user_id=s.id, reason=s.reason) for s in listing.skipped]
    return Discovery(mailboxes=mailboxes, skipped=skipped)


async def backup_mailboxes(
    tenant: TenantConfig,
    upns: Sequence[str],
    *,
    settings: Settings | None = None,
    skip_if_committed_since: datetime | None = None,
    progress: ProgressCallback | None = None,
    max_parallel_mailboxes: int | None = None,
    graph_options: dict[str, Any] | None = None,
    s3_client: Any = None,
    wait_for_lease: bool = False,
) -> list[MailboxResult]:
    """Back up ``upns`` of ``tenant`` concurrently; one result per upn, in the same order.

    ``settings``: retry budgets, time bounds, checkpoint cadence… (:class:`mailpipe.settings.Settings`;
    defaults when None — the engine never reads the environment). ``graph_options``: keyword arguments for
    :meth:`mailpipe.graph.GraphTenant.from_config` (a retry policy, request time bounds, the request
    window's length) — for tests and benchmarks. ``s3_client``: a boto3 S3 client for an ``s3://``
    repository (the Dagster layer passes dagster-aws' ``S3Resource`` client); by default one is made from
    the tenant's ``s3`` settings and the standard AWS credential chain.

    ``skip_if_committed_since``: a mailbox whose latest snapshot was committed at or after this time is
    not backed up again (its result has ``already_committed=True`` and that snapshot's figures) — how a
    retried batch run skips what it already did.

    ``wait_for_lease``: when another backup of a mailbox is running (it holds the mailbox's lease), wait
    for it (within the mailbox deadline) and, if it committed meanwhile, report that snapshot as
    ``already_committed``; when False, that mailbox fails at once with ``error_kind="busy"``.

    A repository that cannot be opened (a missing bucket, bad credentials, a read-only folder) raises a
    :class:`mailpipe.errors.UserError` naming the tenant and the storage: no mailbox can be backed up.
    """
    from mailpipe.graph import GraphTenant
    from mailpipe.repo import open_repository

    settings = settings or Settings()
    work = settings.tenant_work_dir(tenant.name)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="mailpipe-store")
    try:
        await loop.run_in_executor(pool, sweep_work_dirs, work, max(3600.0, 2 * settings.lease_seconds))
        repo = await loop.run_in_executor(pool, lambda: open_repository(tenant, s3_client=s3_client, tmp_dir=work))
        await loop.run_in_executor(pool, repo.load_damaged)
        sem = asyncio.Semaphore(max_parallel_mailboxes or settings.max_parallel_mailboxes)
        async with GraphTenant.from_config(tenant, settings, **(graph_options or {})) as graph:

            async def one(upn: str) -> MailboxResult:
                async with sem:
                    job = backup_class(tenant)(tenant, graph, repo, pool, upn, settings=settings, work=work,
                                               progress=progress, skip_if_committed_since=skip_if_committed_since,
                                               wait_for_lease=wait_for_lease)
                    return await job.run()

            return list(await asyncio.gather(*(one(u) for u in upns)))
    finally:
        pool.shutdown(wait=True)


def run(coro):
    """Run an engine coroutine from synchronous code (Dagster ops, the CLI)."""
    return asyncio.run(coro)


def sweep_work_dirs(tenant_work: str, older_than: float) -> int:
    """Remove mailbox work dirs of backups that died (nothing in them touched for ``older_than`` s)."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(os.scandir(tenant_work))
    except FileNotFoundError:
        return 0
    for e in entries:
        if not e.is_dir(follow_symlinks=False) or e.name.startswith("."):  # .index-cache: shared, kept
            continue
        try:
            newest = e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # its backup ended (and removed it) since the listing: another process's
            continue
        for dirpath, _, files in os.walk(e.path):
            for f in files:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, f)).st_mtime)
                except FileNotFoundError:
                    pass
        if newest < cutoff:
            shutil.rmtree(e.path, ignore_errors=True)
            removed += 1
    return removed


def backup_class(tenant: TenantConfig) -> type[MailboxBackup]:
    """The backup of one mailbox for the tenant's ``content`` mode: MIME, or the export API's streams."""
    if tenant.content in ("fidelity", "both"):
        return FidelityBackup if tenant.content == "fidelity" else BothBackup
    return MailboxBackup
