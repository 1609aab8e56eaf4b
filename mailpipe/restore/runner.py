"""The restore engine's call (:func:`restore_mailbox`, what the CLI and the Dagster layer call): one restore
from its plan to its result, through the job its snapshot asks for — :class:`~mailpipe.restore.engine.RestoreJob`
(MIME) or :class:`~mailpipe.restore.fidelity.FidelityRestoreJob` (full-fidelity streams)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.graph.errors import GraphError
from mailpipe.repo.repository import IntegrityError
from mailpipe.restore.api import ProgressCallback, RestoreRequest, RestoreResult
from mailpipe.restore.engine import STORE_THREADS, RestoreJob, _aware, choose_snapshot
from mailpipe.restore.fidelity import FidelityRestoreJob, has_fidelity
from mailpipe.settings import Settings


async def restore_mailbox(tenant: TenantConfig, request: RestoreRequest, *, settings: Settings | None = None,
                          progress: ProgressCallback | None = None, s3_client: Any = None,
                          graph_options: dict[str, Any] | None = None) -> RestoreResult:
    """Restore ``request`` (see :class:`RestoreRequest`) from ``tenant``'s repository. Resumable: the same
    request started again continues where the last one stopped, creating nothing twice."""
    return await restore(tenant, request, settings=settings or Settings(), progress=progress, s3_client=s3_client,
                         graph_options=graph_options)


def run(coro):
    return asyncio.run(coro)


async def restore(tenant: TenantConfig, req: RestoreRequest, *, settings: Settings,
                  progress: ProgressCallback | None = None, s3_client: Any = None,
                  graph_options: dict[str, Any] | None = None) -> RestoreResult:
    from mailpipe.repo import open_repository

    req = RestoreRequest(**{**req.__dict__, "since": _aware(req.since), "until": _aware(req.until),
                            "at": _aware(req.at)})
    t0 = time.monotonic()
    result = RestoreResult(upn=req.upn.lower(), target=(req.to or req.upn).lower(), dry_run=req.dry_run)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="mailpipe-restore")
    try:
        work = settings.tenant_work_dir(tenant.name)
        repo = await loop.run_in_executor(pool, lambda: open_repository(tenant, s3_client=s3_client, create=False,
                                                                        tmp_dir=work))
        job = (await loop.run_in_executor(pool, lambda: job_class(repo, req)))(
            tenant, repo, pool, req, settings, result, progress, work)
        await job.plan()
        if progress:
            progress({"phase": "plan", "items": result.items_selected, "bytes": result.bytes_selected,
                      "expected_seconds": result.expected_seconds, "snapshot_id": result.snapshot_id,
                      "target_root": result.target_root})
        if not req.dry_run:
            await job.run(graph_options or {})
        result.ok = True
    except UserError as e:  # no such backup/snapshot/folder, a repository or lease problem
        result.error, result.error_kind = str(e), "usage"
    except GraphError as e:  # the target mailbox, credentials, or Graph beyond its retries
        result.error, result.error_kind = str(e), e.kind
    except IntegrityError as e:  # the snapshot's files are damaged (`mailpipe check` says more)
        result.error, result.error_kind = f"the repository is damaged: {e}", "storage"
    finally:
        pool.shutdown(wait=True)
        result.seconds = round(time.monotonic() - t0, 3)
    return result


def job_class(repo: Any, req: RestoreRequest) -> type[RestoreJob]:
    """A snapshot with full-fidelity streams (``content: fidelity``) is restored through import sessions."""
    uid = repo.find_mailbox(req.upn)
    if uid is None:
        return RestoreJob  # its plan says there is no such backup
    try:
        snap = choose_snapshot(repo, uid, req)
    except UserError:
        return RestoreJob
    return FidelityRestoreJob if has_fidelity(snap) else RestoreJob
