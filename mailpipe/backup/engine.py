"""The backup engine: incremental, resumable, deduplicated backups of Exchange mailboxes.

One mailbox backup (:class:`MailboxBackup`):

1. resolve the mailbox (UPN → Entra object id) and load the latest committed snapshot's manifest into
   an on-disk merge table (:mod:`mailpipe.backup.state`), plus the checkpoint rows of an interrupted
   backup newer than it;
2. list the folder tree, then run every folder's message delta from the link the last snapshot
   committed (from scratch for new folders, and again from scratch after a 410);
3. queue a download only for items whose content is not known; downloads run through the mailbox's
   Graph limiter (≤ 4 in flight) while hashing, compression and uploads run in a thread pool, so the
   limiter stays busy;
4. checkpoint stored items every few seconds (so a killed backup loses at most that), and finally
   stream the merged manifest into a new snapshot and commit it; the delta links advance only there.

Many mailboxes run concurrently (:func:`backup_many`), each with its own limiter: a throttled mailbox
never holds up the others. A mailbox that fails does so alone; its checkpoints remain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from mailpipe.backup.api import Discovery, MailboxRef, MailboxResult, ProgressCallback, SkippedUser
from mailpipe.backup.state import BackupState, Content
from mailpipe.config import TenantConfig

log = logging.getLogger("mailpipe.backup")

CHECKPOINT_SECONDS = float(os.environ.get("MAILPIPE_CHECKPOINT_SECONDS", "2"))
CHECKPOINT_ITEMS = int(os.environ.get("MAILPIPE_CHECKPOINT_ITEMS", "25"))
CHECKPOINT_COMPACT_PARTS = 64  # merge the parts every so often: a restart reads few objects
PROGRESS_SECONDS = 10.0
DELTA_PAGE_SIZE = 500
FOLDER_SCANNERS = 2          # folders whose delta is read at the same time, per mailbox
STORE_THREADS = 8            # hashing + compression + uploads, shared by the mailboxes of one call
DEFAULT_PARALLEL_MAILBOXES = 32


async def discover(tenant: TenantConfig) -> Discovery:
    from mailpipe.graph import GraphTenant

    async with GraphTenant.from_config(tenant) as graph:
        listing = await graph.list_mailboxes()
    mailboxes = sorted(
        (MailboxRef(user_id=m.id, upn=m.upn.lower()) for m in listing.mailboxes
         if tenant.mailboxes.matches(m.upn)),
        key=lambda m: m.upn,
    )
    skipped = [SkippedUser(upn=s.upn.lower(), user_id=s.id, reason=s.reason) for s in listing.skipped]
    return Discovery(mailboxes=mailboxes, skipped=skipped)


async def backup_many(
    tenant: TenantConfig,
    upns: list[str],
    *,
    skip_if_committed_since: datetime | None = None,
    progress: ProgressCallback | None = None,
    max_parallel_mailboxes: int | None = None,
    graph_options: dict[str, Any] | None = None,
    s3_client: Any = None,
) -> list[MailboxResult]:
    from mailpipe.graph import GraphTenant
    from mailpipe.repo import open_repository

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="mailpipe-store")
    try:
        repo = await loop.run_in_executor(pool, lambda: open_repository(tenant, s3_client=s3_client))
        sem = asyncio.Semaphore(max_parallel_mailboxes or DEFAULT_PARALLEL_MAILBOXES)
        async with GraphTenant.from_config(tenant, **(graph_options or {})) as graph:

            async def one(upn: str) -> MailboxResult:
                async with sem:
                    job = MailboxBackup(tenant, graph, repo, pool, upn, progress=progress,
                                        skip_if_committed_since=skip_if_committed_since)
                    return await job.run()

            return list(await asyncio.gather(*(one(u) for u in upns)))
    finally:
        pool.shutdown(wait=True)


class MailboxBackup:
    """One mailbox, from the last committed snapshot to a new one."""

    def __init__(
        self,
        tenant: TenantConfig,
        graph: Any,
        repo: Any,
        pool: ThreadPoolExecutor,
        upn: str,
        *,
        progress: ProgressCallback | None = None,
        skip_if_committed_since: datetime | None = None,
        fetch_workers: int | None = None,
    ) -> None:
        self.tenant = tenant
        self.graph = graph
        self.repo = repo
        self.pool = pool
        self.upn = upn.lower()
        self.progress = progress
        self.skip_since = skip_if_committed_since
        # one more than the limiter admits, so a request is always ready when one finishes
        self.fetch_workers = fetch_workers or tenant.limits.concurrent_requests_per_mailbox + 2
        self.result = MailboxResult(upn=self.upn)
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)
        self._ckpt_rows: list[dict[str, Any]] = []
        self._ckpt_at = time.monotonic()
        self._progress_at = time.monotonic()
        self._fatal: BaseException | None = None
        self._listings = 0
        self._ckpt_parts = 0
        self._compacting = asyncio.Lock()
        self.bytes_fetched = 0
        self.bytes_stored_new = 0

    async def _io(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    # ------------------------------------------------------------------------------------------------
    async def run(self) -> MailboxResult:
        from mailpipe.graph.errors import GraphError

        t0 = time.monotonic()
        mb = None
        try:
            mailbox = await self.graph.resolve_mailbox(self.upn)
            self.result.user_id = mailbox.id
            mb = self.graph.mailbox(mailbox.id, self.upn)
            await self._run(mb)
            self.result.ok = True
        except GraphError as e:
            msg = str(e)
            self.result.error = msg if self.upn in msg else f"{self.upn}: {msg}"
            self.result.error_kind = e.kind
        except Exception as e:  # a bug or a storage failure: this mailbox fails alone
            log.exception("backup of %s failed", self.upn)
            self.result.error = f"{self.upn}: {type(e).__name__}: {e}"
            self.result.error_kind = "permanent" if not _is_storage_transient(e) else "transient"
        finally:
            if mb is not None:
                self.result.requests = mb.stats.requests
                self.result.throttled = mb.stats.throttled
                await self.graph.release(mb.user_id)
            self.result.bytes_fetched = self.bytes_fetched
            self.result.bytes_stored_new = self.bytes_stored_new
            self.result.seconds = round(time.monotonic() - t0, 3)
        if not self.result.ok:
            log.warning("backup of %s failed: %s", self.upn, self.result.error)
        return self.result

    async def _run(self, mb: Any) -> None:
        user_id = self.result.user_id
        latest = await self._io(lambda: self.repo.latest_snapshot(user_id))
        if latest is not None and self.skip_since is not None and latest.committed_at >= self.skip_since:
            self._already_committed(latest)
            return
        with tempfile.TemporaryDirectory(prefix="mailpipe-backup-") as tmp:
            state = BackupState(os.path.join(tmp, "state.sqlite"))
            try:
                await self._backup(mb, state, latest)
            finally:
                state.close()

    def _already_committed(self, latest: Any) -> None:
        r = self.result
        r.already_committed = True
        r.snapshot_id = latest.snapshot_id
        r.committed_at = latest.committed_at
        for k, v in (latest.stats or {}).items():
            if k.startswith("items_") and hasattr(r, k) and isinstance(v, int):
                setattr(r, k, v)

    async def _backup(self, mb: Any, state: BackupState, latest: Any) -> None:
        user_id = self.result.user_id
        started_at = datetime.now(timezone.utc)
        # 1. what is known: the last snapshot, and what an interrupted backup stored since
        prev_links: dict[str, str] = {}
        prev_skipped: list[dict[str, Any]] = []
        if latest is not None:
            prev_links = dict(latest.delta_links or {})
            prev_skipped = list(latest.skipped or [])
            await self._stream_into(
                lambda: self.repo.iter_manifest(user_id, latest.snapshot_id), state.load_previous
            )
        n_ckpt = await self._stream_into(lambda: self.repo.iter_checkpoint_rows(user_id), state.load_checkpoint)
        if n_ckpt:
            log.info("%s: resuming: %d items stored by an interrupted backup", self.upn, n_ckpt)

        # 2. the folder tree as it is now
        folders = {f.id: f for f in (await mb.list_folders())}
        live = set(folders)
        writer = await self._io(lambda: self.repo.begin_snapshot(
            user_id, self.upn, after=latest.snapshot_id if latest else ""))
        try:
            # 3. deltas + downloads, pipelined
            new_links: dict[str, str] = {}
            workers = [asyncio.create_task(self._fetch_worker(mb, state)) for _ in range(self.fetch_workers)]
            scan_sem = asyncio.Semaphore(FOLDER_SCANNERS)

            async def scan(fid: str) -> None:
                async with scan_sem:
                    new_links[fid] = await self._scan_folder(mb, state, fid, prev_links.get(fid))

            try:
                # items Graph could not serve last time are tried again
                for s in prev_skipped:
                    if s.get("item_id") and state.item_folder(s["item_id"]) is None and s.get("folder_id") in live:
                        if state.upsert(s["folder_id"], s):
                            await self._put_queue(s["item_id"])
                await _gather_or_cancel([scan(fid) for fid in sorted(folders)])
            finally:
                for _ in workers:
                    await self._queue.put(None)
                await asyncio.gather(*workers, return_exceptions=True)
                # whatever happened, what was stored stays usable by the next attempt
                await self._flush_checkpoint(force=True)
            if self._fatal is not None:
                raise self._fatal

            # 4. the new snapshot: everything present now
            counts = state.counts(live)
            snapshot_id = writer.snapshot_id
            await self._io(lambda: writer.set_folders(_folder_rows(folders)))
            for batch in state.iter_manifest(live, snapshot_id):
                rows = [_manifest_row(r, folders) for r in batch]
                await self._io(lambda rows=rows: writer.add_items(rows))
            skipped = [
                {**s, "folder_path": list(folders[s["folder_id"]].path) if s["folder_id"] in folders else []}
                for s in state.skipped()
            ]
            r = self.result
            for k, v in counts.items():
                setattr(r, k, v)
            r.skipped = skipped
            stats = {**counts, "bytes_fetched": self.bytes_fetched, "bytes_stored_new": self.bytes_stored_new,
                     "requests": mb.stats.requests, "throttled": mb.stats.throttled}
            info = await self._io(lambda: writer.commit(
                delta_links=new_links, stats=stats, skipped=skipped, started_at=started_at))
        except BaseException:
            await self._io(writer.abort)
            raise
        r.snapshot_id = info.snapshot_id
        r.committed_at = info.committed_at
        await self._io(lambda: self.repo.clear_checkpoints(user_id))
        self._report(force=True)

    async def _stream_into(self, make_iter: Callable[[], Any], sink: Callable[[list[dict]], int]) -> int:
        """Feed record batches from a repository iterator (run in the pool) into the state table."""
        it = await self._io(make_iter)
        n = 0
        while True:
            batch = await self._io(lambda: next(it, None))
            if batch is None:
                return n
            n += sink(batch.to_pylist() if hasattr(batch, "to_pylist") else batch)

    async def _scan_folder(self, mb: Any, state: BackupState, folder_id: str, link: str | None) -> str:
        """Run one folder's delta to its end; returns the new delta link."""
        from mailpipe.graph.errors import ResyncRequired

        for attempt in range(3):
            listing = None
            if link is None:  # a from-scratch listing: what it does not report is gone
                self._listings += 1
                listing = self._listings
            try:
                async for page in mb.message_delta(folder_id, link, page_size=DELTA_PAGE_SIZE):
                    for item_id in page.removed:
                        state.remove(folder_id, item_id)
                    for m in page.upserts:
                        if state.upsert(folder_id, _message_meta(m), listing):
                            await self._put_queue(m.id)
                    if page.delta_link:
                        if listing is not None:
                            state.finish_full_listing(folder_id, listing)
                        return page.delta_link
                    self._report()
                raise RuntimeError(f"delta of folder {folder_id} ended without a deltaLink")
            except ResyncRequired:
                # the saved link expired: list the folder from scratch. Items already stored are reused
                # (same immutable ids), items not listed again are removed at the end: no ghosts, no dupes.
                log.info("%s: folder %s needs a resync (delta token expired)", self.upn, folder_id)
                link = None
        raise RuntimeError(f"folder {folder_id}: delta resync did not settle after 3 attempts")

    async def _put_queue(self, item_id: str) -> None:
        if self._fatal is not None:
            raise self._fatal
        await self._queue.put(item_id)

    async def _fetch_worker(self, mb: Any, state: BackupState) -> None:
        from mailpipe.graph.errors import ForbiddenError, NotFoundError, PermanentError

        while True:
            item_id = await self._queue.get()
            if item_id is None:
                return
            if self._fatal is not None:
                continue  # drain
            try:
                data = await mb.get_mime(item_id)
            except NotFoundError:
                state.gone(item_id)  # deleted while we were working: not an error
                continue
            except (PermanentError, ForbiddenError) as e:
                state.skip(item_id, f"{e.kind}: {e}")
                continue
            except Exception as e:  # throttling/5xx beyond the retry budget, or a bug: the mailbox fails
                self._fatal = e
                continue
            self.bytes_fetched += len(data)
            try:
                stored = await self._io(lambda data=data: self.repo.put_content(data))
            except Exception as e:
                self._fatal = e
                continue
            del data
            self.bytes_stored_new += stored.new_stored_bytes
            row = state.stored(item_id, Content(stored.sha256, list(stored.chunks), stored.size))
            if row is not None:
                self._ckpt_rows.append(row)
            await self._flush_checkpoint()
            self._report()

    async def _flush_checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._ckpt_rows:
            return
        if not force and len(self._ckpt_rows) < CHECKPOINT_ITEMS and now - self._ckpt_at < CHECKPOINT_SECONDS:
            return
        rows, self._ckpt_rows = self._ckpt_rows, []
        self._ckpt_at = now
        user_id = self.result.user_id
        await self._io(lambda: self.repo.write_checkpoint(user_id, rows))
        self._ckpt_parts += 1
        if self._ckpt_parts % CHECKPOINT_COMPACT_PARTS == 0:
            async with self._compacting:
                await self._io(lambda: self.repo.compact_checkpoints(user_id))

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_SECONDS:
            return
        self._progress_at = now
        self.progress(self.upn, {"bytes_fetched": self.bytes_fetched, "bytes_stored_new": self.bytes_stored_new,
                                 "queued": self._queue.qsize()})


async def _gather_or_cancel(coros: list[Awaitable[Any]]) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _message_meta(m: Any) -> dict[str, Any]:
    return {
        "item_id": m.id,
        "internet_message_id": m.internet_message_id,
        "subject": m.subject,
        "sender": m.sender,
        "received_at": m.received_at,
        "last_modified_at": m.last_modified_at,
        "created_at": m.created_at,
        "change_key": m.change_key,
        "is_read": m.is_read,
        "is_draft": m.is_draft,
        "flag_status": m.flag_status,
        "categories": list(m.categories or []),
        "has_attachments": m.has_attachments,
    }


def _manifest_row(r: dict[str, Any], folders: dict[str, Any]) -> dict[str, Any]:
    r["folder_path"] = list(folders[r["folder_id"]].path)  # timestamps are parsed by schema.to_batch
    return r


def _folder_rows(folders: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"folder_id": f.id, "parent_id": f.parent_id, "display_name": f.display_name, "path": list(f.path),
         "total_item_count": f.total_item_count}
        for f in sorted(folders.values(), key=lambda f: f.path)
    ]


def _is_storage_transient(e: BaseException) -> bool:
    return isinstance(e, (OSError, TimeoutError))
