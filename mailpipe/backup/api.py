"""The backup engine's public API: what the Dagster layer and the CLI call.

The engine knows nothing of Dagster. It backs up mailboxes of one tenant concurrently and returns one
:class:`MailboxResult` per mailbox; a mailbox that fails does so alone (``ok=False`` with a reason), its
stored progress kept for the next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from mailpipe.config import TenantConfig
from mailpipe.settings import Settings


@dataclass(frozen=True)
class MailboxRef:
    user_id: str  # Entra object id: the repository directory
    upn: str      # lower-cased user principal name: the partition key's second half


@dataclass(frozen=True)
class SkippedUser:
    upn: str
    user_id: str
    reason: str  # e.g. "no mailbox (MailboxNotEnabledForRESTAPI)"


@dataclass(frozen=True)
class Discovery:
    mailboxes: list[MailboxRef]  # sorted by upn, filtered by the tenant's include/exclude globs
    skipped: list[SkippedUser]


@dataclass
class MailboxResult:
    """The outcome of backing up one mailbox; the figures are what the Dagster layer publishes."""

    upn: str
    user_id: str | None = None
    ok: bool = False
    error: str | None = None        # one clear line when ok is False
    # transient | throttled | no-mailbox | forbidden | not-found | permanent | unsafe-link | protocol |
    # bad-content | busy (another backup holds the mailbox's lease) | deadline | storage
    error_kind: str | None = None
    snapshot_id: str | None = None
    committed_at: datetime | None = None
    already_committed: bool = False  # skipped because a snapshot was committed after `skip_if_committed_since`
    items_total: int = 0
    items_new: int = 0
    items_changed: int = 0
    items_removed: int = 0
    items_skipped: int = 0
    items_reused: int = 0            # items whose content came from a previous snapshot or checkpoint
    items_repaired: int = 0          # items downloaded again because their stored chunks were damaged
    chunks_verified: int = 0         # chunks of carried-forward items read back and verified
    bytes_fetched: int = 0           # MIME bytes downloaded from Graph
    bytes_stored_new: int = 0        # compressed bytes newly written to the repository
    requests: int = 0                # Graph requests sent
    throttled: int = 0               # 429 responses received
    seconds: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{item_id, folder_path, subject, reason, pending}]
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged base snapshot that was skipped
    items_by_type: dict[str, int] = field(default_factory=dict)  # content: fidelity — items per message class

    def metrics(self) -> dict[str, int | float]:
        """The numeric figures, for metadata that the UI plots over time."""
        return {
            k: v for k, v in asdict(self).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }


ProgressCallback = Callable[[str, dict[str, Any]], None]  # (upn, figures so far)


async def discover_mailboxes(tenant: TenantConfig, settings: Settings | None = None) -> Discovery:
    """List the tenant's mailboxes (Graph ``/users``), filtered by the tenant's globs."""
    from mailpipe.backup.engine import discover

    return await discover(tenant, settings)


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
    from mailpipe.backup.engine import backup_many

    return await backup_many(
        tenant, list(upns), settings=settings, skip_if_committed_since=skip_if_committed_since, progress=progress,
        max_parallel_mailboxes=max_parallel_mailboxes, graph_options=graph_options, s3_client=s3_client,
        wait_for_lease=wait_for_lease,
    )


def run(coro):
    """Run an engine coroutine from synchronous code (Dagster ops, the CLI)."""
    return asyncio.run(coro)
