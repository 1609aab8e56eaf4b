"""The backup engine: incremental, resumable, deduplicated backups of Exchange mailboxes.

One mailbox backup (:class:`MailboxBackup`):

1. resolve the mailbox (UPN → Entra object id) and take its **lease** in the repository (one backup of a
   mailbox at a time, across processes and hosts); clear what dead backups of it left behind;
2. load the newest *readable* committed snapshot's manifest into an on-disk merge table
   (:mod:`mailpipe.backup.state`) — a damaged one is skipped, and what can be salvaged of it is kept as
   known content — plus the checkpoint rows of an interrupted backup;
3. list the folder tree; find carried-forward content whose chunks are damaged (marked by ``check`` or
   by another backup, or found by reading back a rotating slice) and queue those items for download;
4. run every folder's message delta from the link the last snapshot committed (from scratch for new
   folders, and again from scratch when Graph no longer accepts the link); queue a download only for
   items whose content is not known; downloads run through the mailbox's Graph limiter while hashing,
   compression and uploads run in a thread pool;
5. items Graph could not serve are tried again later in the same backup (a ``$value`` 404 is first
   confirmed with a metadata GET: only a confirmed miss removes an item); what still fails is skipped and
   recorded as pending, so the next backup fetches it even though the delta will not mention it again;
6. checkpoint stored items every few seconds, and finally stream the merged manifest into a new
   snapshot and commit it (renewing the lease right before); the delta links advance only there.

Everything is bounded in time: a deadline per mailbox, per request (docs/GRAPH.md), and paging budgets.
Many mailboxes run concurrently (:func:`mailpipe.backup.runner.backup_mailboxes`), each with its own
limiter: a throttled mailbox never holds up the others. A mailbox that fails does so alone; its checkpoints remain.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from mailpipe.backup.api import MailboxResult, ProgressCallback
from mailpipe.backup.state import BackupState, Content
from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.settings import Settings, private_dir

log = logging.getLogger("mailpipe.backup")

CHECKPOINT_COMPACT_PARTS = 64  # merge the parts every so often: a restart reads few objects
PROGRESS_SECONDS = 10.0
DELTA_PAGE_SIZE = 500
FOLDER_SCANNERS = 2          # folders whose delta is read at the same time, per mailbox
STORE_THREADS = 8            # hashing + compression + uploads, shared by the mailboxes of one call
ITEM_RETRY_PASSES = 3        # an item Graph could not serve is tried this many more times in one backup
VERIFY_BATCH = 256           # chunks read back at a time (in the thread pool)
WIND_DOWN_SECONDS = 15.0     # a failing backup waits this long for downloads in flight to be stored
CONFIRMATIONS = 16           # 404s being confirmed at once, per mailbox
STORE_BATCH_ITEMS = 64       # downloaded items handed to the store pool at once, per mailbox
STORE_PENDING_BYTES = 8 << 20  # downloads wait while this much downloaded content waits for the store
# (or a whole batch of items does: what a SIGKILL loses beyond the journal stays bounded in items too)
STORE_LINGER = 0.05          # seconds a batch may wait to fill up (a batch of 1–2 items saves little)


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
        settings: Settings,
        work: str,
        progress: ProgressCallback | None = None,
        skip_if_committed_since: datetime | None = None,
        wait_for_lease: bool = False,
        fetch_workers: int | None = None,
    ) -> None:
        self.tenant = tenant
        self.graph = graph
        self.repo = repo
        self.pool = pool
        self.upn = upn.lower()
        self.s = settings
        self.tenant_work = work
        self.work: str | None = None  # this mailbox's private work dir, once its id is known
        self.progress = progress
        self.skip_since = skip_if_committed_since
        self.wait_for_lease = wait_for_lease
        # one more than the limiter admits, so a request is always ready when one finishes
        self.fetch_workers = fetch_workers or tenant.limits.concurrent_requests_per_mailbox + 2
        self.result = MailboxResult(upn=self.upn)
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)
        self._ckpt_rows: list[dict[str, Any]] = []     # stored items since the last uploaded checkpoint part
        self._ckpt_at = time.monotonic()
        self._journal_rows: list[dict[str, Any]] = []  # … since the last part of the local journal
        self._journal_at = time.monotonic()
        self._ckpt_lock = asyncio.Lock()  # one checkpoint or journal part at a time, in the order asked
        self._progress_at = time.monotonic()
        self._fatal: BaseException | None = None
        self._listings = 0
        self._ckpt_parts = 0
        self._compacting = asyncio.Lock()
        self._deferred: dict[str, str] = {}     # item id → why Graph could not serve it (tried again later)
        self._tries: dict[str, int] = {}         # failed tries of deferred items
        self._side: set[asyncio.Task[Any]] = set()  # confirmations of 404s, running beside the workers
        self._confirming = asyncio.Semaphore(CONFIRMATIONS)  # at most this many at once
        self._invalid: list[dict[str, Any]] = []   # delta entries that cannot be items (no id)
        self._lease: Any = None
        self._store_pending: list[tuple[str, bytes]] = []  # downloaded, not yet handed to the store pool
        self._store_pending_bytes = 0
        self._store_room = asyncio.Event()  # set when a download may add to _store_pending
        self._store_room.set()
        self._store_full = asyncio.Event()  # set when the pending batch is full
        self._store_task: asyncio.Task[None] | None = None
        self._finishing = False
        self.bytes_fetched = 0
        self.bytes_stored_new = 0

    async def _io(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def _lease_io(self, fn: Callable[[], Any]) -> Any:
        """Lease calls on the default executor: a renewal never waits behind the store pool's work."""
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    # ------------------------------------------------------------------------------------------------
    async def run(self) -> MailboxResult:
        from mailpipe.graph.errors import GraphError
        from mailpipe.repo.repository import LeaseBusy

        t0 = time.monotonic()
        mb = None
        renewer: asyncio.Task[None] | None = None
        deadline = asyncio.timeout(self.s.mailbox_deadline)
        try:
            async with deadline:
                mailbox = await self.graph.resolve_mailbox(self.upn)
                self.result.user_id = mailbox.id
                mb = self.graph.mailbox(mailbox.id, self.upn)
                if await self._take_lease():
                    renewer = asyncio.create_task(self._renew_lease())
                    await self._run(mb)
                self.result.ok = True
        except TimeoutError as e:
            if not deadline.expired():
                log.exception("backup of %s failed", self.upn)
                self._fail(f"timed out: {e}", "transient")
            else:
                self._fail(f"did not finish within its deadline of {self.s.mailbox_deadline:g} s "
                           "(MAILPIPE_MAILBOX_DEADLINE); what it stored is kept for the next attempt", "deadline")
        except LeaseBusy as e:
            self._fail(str(e), "busy")
        except GraphError as e:
            self._fail(str(e), e.kind)
        except UserError as e:  # storage: a clear line, no traceback
            self._fail(str(e), "storage")
        except Exception as e:  # a bug or a storage failure: this mailbox fails alone
            log.exception("backup of %s failed", self.upn)
            self._fail(f"{type(e).__name__}: {e}", "permanent" if not _is_storage_transient(e) else "transient")
        finally:
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            if self.work is not None:  # before the lease goes: the next holder may use the same directory
                shutil.rmtree(self.work, ignore_errors=True)
            if self._lease is not None:
                await self._lease_io(self._lease.release)
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

    def _fail(self, msg: str, kind: str) -> None:
        self.result.error = msg if self.upn in msg else f"{self.upn}: {msg}"
        self.result.error_kind = kind

    def _warn(self, msg: str) -> None:
        log.warning("%s: %s", self.upn, msg)
        self.result.warnings.append(msg)

    async def _take_lease(self) -> bool:
        """Hold the mailbox's lease. False when, having waited for another backup of it, that one
        committed a snapshot since this backup was asked for (nothing left to do)."""
        from mailpipe.repo.repository import LeaseBusy

        asked_at = datetime.now(timezone.utc)
        user_id = self.result.user_id
        waited = False
        while True:
            try:
                self._lease = await self._lease_io(lambda: self.repo.acquire_lease(user_id, self.upn,
                                                                                   self.s.lease_seconds))
                break
            except LeaseBusy as e:
                if not self.wait_for_lease:
                    raise
                if not waited:
                    log.info("%s: waiting: %s", self.upn, e)
                waited = True
                await asyncio.sleep(min(10.0, self.s.lease_seconds / 3))
        since = asked_at if waited else self.skip_since
        if since is not None:
            latest = await self._io(lambda: _latest_readable(self.repo, user_id))
            if latest is not None and latest.committed_at >= since:
                self._already_committed(latest)
                return False
        return True

    async def _renew_lease(self) -> None:
        from mailpipe.repo.repository import LeaseBusy

        while True:
            await asyncio.sleep(self._lease.seconds / 3)
            try:
                await self._lease_io(self._lease.renew)
            except LeaseBusy as e:
                self._fatal = e
                return
            except Exception as e:  # the store is unreachable: try again at the next third
                log.warning("%s: could not renew the lease: %s", self.upn, e)

    async def _run(self, mb: Any) -> None:
        from mailpipe.repo.repository import mailbox_dir

        user_id = self.result.user_id
        self.work = os.path.join(self.tenant_work, mailbox_dir(user_id))
        # a dead backup's state (we hold the lease): its journal becomes checkpoint parts, the rest goes
        journaled = await self._io(lambda: self.repo.upload_journal(user_id, self.work))
        if journaled:
            log.info("%s: %d items from the local journal of an interrupted backup", self.upn, journaled)
        shutil.rmtree(self.work, ignore_errors=True)
        private_dir(self.work)
        cleaned = await self._io(lambda: self.repo.clean_mailbox(
            user_id, older_than=max(3600.0, 2 * self.s.lease_seconds)))
        if cleaned:
            log.info("%s: removed %d leftovers of an interrupted backup", self.upn, cleaned)
        # after the lease is ours: the index and the prune plans as they are now (a prune's second pass
        # waits for every backup whose lease is older than its plan: docs/FORMAT.md, "Prune")
        await self._io(self.repo.refresh_for_backup)
        state = BackupState(os.path.join(self.work, "state.sqlite"))
        try:
            await self._backup(mb, state)
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

    # -- 1. the base: the newest readable snapshot ---------------------------------------------------------
    async def _load_base(self, state: BackupState) -> tuple[Any, dict[str, Any]]:
        """Load the newest snapshot whose record and manifest are intact; damaged newer ones are skipped
        (said so in the result and the new commit record) and what can be read of their manifests is kept
        as known content. Returns (the base's record or None, the ``base`` entry of the new commit)."""
        from mailpipe.repo.repository import IntegrityError, RepositoryError

        user_id = self.result.user_id
        ids = await self._io(lambda: self.repo.snapshot_ids(user_id))
        unreadable: list[dict[str, str]] = []
        salvaged = 0
        for sid in reversed(ids):
            try:
                info = await self._io(lambda sid=sid: self.repo.read_snapshot(user_id, sid))
                await self._stream_into(
                    lambda sid=sid: self.repo.iter_manifest(user_id, sid, tmp_dir=self.work), state.load_previous)
            except (IntegrityError, RepositoryError) as e:
                state.reset_previous()
                unreadable.append({"snapshot_id": sid, "error": str(e)[:300]})
                salvaged += await self._stream_into(
                    lambda sid=sid: self.repo.salvage_content(user_id, sid, tmp_dir=self.work), state.load_checkpoint)
                continue
            if unreadable:
                self._warn(f"snapshot(s) {', '.join(u['snapshot_id'] for u in unreadable)} cannot be read "
                           f"({unreadable[0]['error']}); this backup continues from snapshot {sid}"
                           + (f", reusing the content of {salvaged} items still readable in them" if salvaged else ""))
            return info, {"snapshot_id": sid, "unreadable": unreadable, "salvaged_items": salvaged}
        if unreadable:
            self._warn(f"no readable snapshot ({len(unreadable)} damaged: {unreadable[0]['error']}); every folder is "
                       f"listed from scratch, reusing the content of {salvaged} items still readable in them")
        return None, {"snapshot_id": None, "unreadable": unreadable, "salvaged_items": salvaged}

    # -- 2. damaged content: found by check or another backup, or by reading back a slice ------------------
    async def _find_damage(self, state: BackupState, live: set[str], base: Any) -> list[str]:
        """Items whose carried-forward content uses a damaged chunk; their content is forgotten, so they
        are downloaded again and the chunks rewritten. Reads back a rotating slice of the chunks this
        backup carries forward: all of them when there are at most ``verify_min_chunks``, else one
        ``verify_cycle``-th (at least ``verify_min_chunks``), a different slice each backup — chosen by the
        chunk's hash, so memory stays bounded by the slice, whatever the mailbox size."""
        from mailpipe.repo.repository import IntegrityError

        carried = state.count_carried()  # ≈ distinct chunks: most items are one chunk of their own
        per_cycle = math.ceil(carried / self.s.verify_cycle) if self.s.verify_cycle else 0
        budget = max(self.s.verify_min_chunks, per_cycle)
        if budget and carried:
            slices = max(1, math.ceil(carried / budget))
            prev = ((base.stats or {}).get("verify") or {}) if base is not None else {}
            k = (int(prev.get("slice", -1)) + 1) % slices if prev.get("of") == slices else 0
            todo = sorted({h for _, chunks in state.carried_chunks(live) for h in chunks
                           if int(h[:8], 16) % slices == k and h not in self.repo.damaged})
            self.result.chunks_verified = len(todo)
            self._verify_slice = {"slice": k, "of": slices, "chunks": len(todo)}

            def verify(h: str) -> None:
                try:
                    self.repo.verify_chunk(h, item=f"mailbox {self.upn}")
                except IntegrityError as e:
                    self.repo.mark_damaged(h, f"found by a backup of {self.upn}: {e}")

            for i in range(0, len(todo), VERIFY_BATCH):
                await asyncio.gather(*(self._io(lambda h=h: verify(h)) for h in todo[i:i + VERIFY_BATCH]))
        damaged = set(self.repo.damaged)
        if not damaged:
            return []
        dropped = state.drop_checkpoint_rows_using(damaged)
        repair = [i for i, chunks in state.carried_chunks(live) if damaged.intersection(chunks)]
        state.invalidate(repair)
        if repair or dropped:
            self._warn(f"{len(repair)} item(s) use damaged or missing chunks: downloading them again to repair "
                       "the repository")
        self.result.items_repaired = len(repair)
        return repair

    # -- 3. the backup -------------------------------------------------------------------------------------
    async def _backup(self, mb: Any, state: BackupState) -> None:
        user_id = self.result.user_id
        started_at = datetime.now(timezone.utc)
        self._verify_slice: dict[str, int] = {}
        base, base_entry = await self._load_base(state)
        prev_links: dict[str, str] = dict(base.delta_links or {}) if base is not None else {}
        prev_pending = base.pending_items() if base is not None else []
        n_ckpt = await self._stream_into(
            lambda: self.repo.iter_checkpoint_rows(user_id, tmp_dir=self.work), state.load_checkpoint)
        if n_ckpt:
            log.info("%s: resuming: %d items stored by an interrupted backup", self.upn, n_ckpt)
        # known content (checkpoints, salvage) stands for an item only if every chunk of it is stored in a
        # pack no prune plans to delete (docs/FORMAT.md, "Prune"): otherwise the item is downloaded again
        stored = self.repo.chunk_is_reusable
        unusable = state.drop_checkpoint_rows_where(lambda chunks: not all(stored(h) for h in chunks))
        if unusable:
            log.info("%s: %d items of an interrupted backup are downloaded again (their chunks are no longer "
                     "stored, or a prune is about to remove them)", self.upn, unusable)

        folders = {f.id: f for f in (await mb.list_folders())}
        live = set(folders)
        repair = await self._find_damage(state, live, base)
        ids = await self._io(lambda: self.repo.snapshot_ids(user_id))
        writer = await self._io(lambda: self.repo.begin_snapshot(
            user_id, self.upn, after=ids[-1] if ids else "", tmp_dir=self.work))
        try:
            await self._companion_start(mb, base)
            new_links: dict[str, str] = {}
            gone_folders: set[str] = set()
            workers = [asyncio.create_task(self._fetch_worker(mb, state)) for _ in range(self.fetch_workers)]
            scan_sem = asyncio.Semaphore(FOLDER_SCANNERS)

            async def scan(fid: str) -> None:
                async with scan_sem:
                    invalid_before = len(self._invalid)
                    link = await self._scan_folder(mb, state, fid, prev_links.get(fid),
                                                   folders[fid].total_item_count)
                    if link is None:
                        gone_folders.add(fid)
                    elif len(self._invalid) > invalid_before:
                        # Graph sent entries we could not use (no id): the folder's link does not advance,
                        # so the next backup reads those changes again instead of never seeing them
                        if fid in prev_links:
                            new_links[fid] = prev_links[fid]
                    else:
                        new_links[fid] = link

            try:
                for item_id in repair:
                    await self._put_queue(item_id)
                # items Graph could not serve last time are fetched again, whatever the delta says
                for s in prev_pending:
                    if s.get("item_id") and state.item_folder(s["item_id"]) is None and s.get("folder_id") in live:
                        if state.upsert(s["folder_id"], s):
                            await self._put_queue(s["item_id"])
                await _gather_or_cancel([scan(fid) for fid in sorted(folders)])
                await self._drain(state)
            finally:
                await self._wind_down(workers)
                # whatever happened, what was stored stays usable by the next attempt
                await self._flush_checkpoint(force=True)
            if self._fatal is not None:
                raise self._fatal
            for fid in gone_folders:  # Graph confirmed these folders no longer exist: their items leave
                del folders[fid]
                live.discard(fid)

            # 4. the new snapshot: everything present now
            counts = state.counts(live)
            snapshot_id = writer.snapshot_id
            await self._io(lambda: writer.set_folders(_folder_rows(folders)))
            for batch in state.iter_manifest(live, snapshot_id):
                rows = [_manifest_row(r, folders) for r in batch]
                await self._io(lambda rows=rows: writer.add_items(rows))
            skipped_rows = state.skipped()
            pending = [{k: v for k, v in s.items() if k != "reason"} for s in skipped_rows]
            skipped = [
                {"item_id": s["item_id"], "folder_id": s["folder_id"], "subject": s.get("subject"),
                 "folder_path": list(folders[s["folder_id"]].path) if s["folder_id"] in folders else [],
                 "reason": s["reason"], "pending": True}
                for s in skipped_rows
            ] + [
                {"item_id": None, "folder_id": v["folder_id"], "subject": v.get("subject"),
                 "folder_path": list(folders[v["folder_id"]].path) if v["folder_id"] in folders else [],
                 "reason": v["reason"], "pending": False}
                for v in self._invalid
            ]
            counts["items_skipped"] += len(self._invalid)
            r = self.result
            for k, v in counts.items():
                setattr(r, k, v)
            r.skipped = skipped
            stats = {**counts, "bytes_fetched": self.bytes_fetched, "bytes_stored_new": self.bytes_stored_new,
                     "requests": mb.stats.requests, "throttled": mb.stats.throttled,
                     "items_repaired": r.items_repaired, "chunks_verified": r.chunks_verified,
                     "verify": self._verify_slice}
            companion = await self._companion_finish(writer)  # content: both — the export API's part
            fidelity = None
            if companion is not None:
                fidelity, more_skipped = companion
                skipped += more_skipped
                stats.update(items_by_type=r.items_by_type, content="both",
                             export_requests=mb.stats.by_kind.get("export", 0))
            info = await self._io(lambda: writer.commit(
                delta_links=new_links, stats=stats, skipped=skipped, pending=pending, base=base_entry,
                started_at=started_at, before_commit=self._lease.renew if self._lease is not None else None,
                fidelity=fidelity))
        except BaseException:
            await self._io(writer.abort)
            await self._companion_abort()
            raise
        r.snapshot_id = info.snapshot_id
        r.committed_at = info.committed_at
        await self._io(lambda: self.repo.clear_checkpoints(user_id))
        self._report(force=True)

    # -- a companion: the export API's part of a `content: both` backup (mailpipe.backup.fidelity.BothBackup) ----
    async def _companion_start(self, mb: Any, base: Any) -> None:
        """Start work that runs beside this backup's own (nothing here)."""

    async def _companion_finish(self, writer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """Finish it and add its rows to ``writer``: → (the commit record's ``fidelity``, skipped entries)."""
        return None

    async def _companion_abort(self) -> None:
        """Stop it: this backup fails."""

    async def _stream_into(self, make_iter: Callable[[], Any], sink: Callable[[list[dict]], int]) -> int:
        """Feed record batches from a repository iterator (run in the pool) into the state table."""
        it = await self._io(make_iter)
        n = 0
        while True:
            batch = await self._io(lambda: next(it, None))
            if batch is None:
                return n
            n += sink(batch.to_pylist() if hasattr(batch, "to_pylist") else batch)

    async def _scan_folder(self, mb: Any, state: BackupState, folder_id: str, link: str | None,
                           item_count: int | None) -> str | None:
        """Run one folder's delta to its end; returns the new delta link (relative to graph_url), or None
        when Graph confirms that the folder no longer exists."""
        from mailpipe.graph.errors import NotFoundError, ProtocolError, ResyncRequired

        for _ in range(3):
            listing = None
            if link is None:  # a from-scratch listing: what it does not report is gone
                self._listings += 1
                listing = self._listings
            try:
                async for page in mb.message_delta(folder_id, link, page_size=DELTA_PAGE_SIZE,
                                                   expected_items=item_count):
                    fetch = []
                    with state.transaction():  # one per page
                        for item_id in page.removed:
                            state.remove(folder_id, item_id)
                        for m in page.upserts:
                            if state.upsert(folder_id, _message_meta(m), listing):
                                fetch.append(m.id)
                        if page.delta_link and listing is not None:
                            state.finish_full_listing(folder_id, listing)
                    for item_id in fetch:
                        await self._put_queue(item_id)
                    for bad in page.invalid:
                        self._invalid.append({"folder_id": folder_id, **bad})
                    if page.delta_link:
                        return page.delta_link
                    self._report()
                raise ProtocolError(f"mailbox {self.upn} folder {folder_id}: the delta ended without a deltaLink")
            except ResyncRequired as e:
                # Graph no longer accepts the saved link: list the folder from scratch. Items already stored are
                # reused (same immutable ids), items not listed again are removed at the end: no ghosts, no dupes.
                log.info("%s: folder %s is listed again from scratch: %s", self.upn, folder_id, e)
                link = None
            except NotFoundError:
                if link is None and await self._folder_gone(mb, folder_id):
                    log.info("%s: folder %s was deleted during the backup", self.upn, folder_id)
                    return None
                raise
        raise ProtocolError(f"mailbox {self.upn} folder {folder_id}: the delta did not settle after 3 listings "
                            "from scratch")

    async def _folder_gone(self, mb: Any, folder_id: str) -> bool:
        from mailpipe.graph.errors import NotFoundError

        try:
            await mb.get_folder(folder_id)
        except NotFoundError:
            return True
        return False

    async def _put_queue(self, item_id: str) -> None:
        if self._fatal is not None:
            raise self._fatal
        await self._queue.put(item_id)

    # -- downloads -----------------------------------------------------------------------------------------
    async def _wind_down(self, workers: list[asyncio.Task[None]]) -> None:
        """Stop downloading: drop what is queued, let the downloads in flight finish storing (their items
        then reach the checkpoint, so the next attempt does not fetch them again) for at most
        :data:`WIND_DOWN_SECONDS`, then cancel whatever is left."""
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        for _ in workers:
            self._queue.put_nowait(None)
        tasks = [*workers, *self._side]
        t0 = time.monotonic()
        _, late = await asyncio.wait(tasks, timeout=WIND_DOWN_SECONDS) if tasks else (set(), set())
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # what was downloaded is stored, within the same bound
            await self._store_settled(max(0.1, WIND_DOWN_SECONDS - (time.monotonic() - t0)))
        except TimeoutError:
            if self._store_task is not None:
                self._store_task.cancel()
                await asyncio.gather(self._store_task, return_exceptions=True)

    async def _fetch_worker(self, mb: Any, state: BackupState) -> None:
        while True:
            item_id = await self._queue.get()
            if item_id is None:
                self._queue.task_done()
                return
            try:
                if self._fatal is None and state.wanted(item_id):
                    await self._fetch_one(mb, state, item_id)
            except Exception as e:  # a bug: the mailbox fails, the other workers drain the queue
                self._fatal = self._fatal or e
            finally:
                self._queue.task_done()

    async def _fetch_one(self, mb: Any, state: BackupState, item_id: str) -> None:
        from mailpipe.graph.errors import BadContentError, ForbiddenError, NotFoundError, PermanentError

        try:
            data = await mb.get_mime(item_id)
        except NotFoundError as e:
            await self._confirming.acquire()  # released by the confirmation
            self._spawn(self._confirm_miss(mb, state, item_id, e))
            return
        except BadContentError as e:
            self._defer(item_id, f"{e.kind}: {e}")
            return
        except (PermanentError, ForbiddenError) as e:
            state.skip(item_id, f"{e.kind}: {e}")
            return
        except Exception as e:  # throttling/5xx beyond the retry budget, a hostile server, or a bug
            self._fatal = self._fatal or e
            return
        self.bytes_fetched += len(data)
        await self._store(state, item_id, data)

    # -- storing: downloaded items go to the store pool in batches ---------------------------------------------
    async def _store(self, state: BackupState, item_id: str, data: bytes) -> None:
        """Hand a downloaded item to the store: it joins the pending batch, which one task per mailbox
        (:meth:`_store_loop`) hands to the thread pool as a whole — one thread hop per batch, not per item —
        while downloads go on. A download waits here while :data:`STORE_PENDING_BYTES` of content or
        :data:`STORE_BATCH_ITEMS` items are pending (memory, and what a kill loses, stay bounded whatever
        the store's speed)."""
        while self._store_pending and (self._store_pending_bytes >= STORE_PENDING_BYTES
                                       or len(self._store_pending) >= STORE_BATCH_ITEMS):
            self._store_room.clear()
            await self._store_room.wait()
        self._store_pending.append((item_id, data))
        self._store_pending_bytes += len(data)
        if len(self._store_pending) >= STORE_BATCH_ITEMS or self._store_pending_bytes >= STORE_PENDING_BYTES:
            self._store_full.set()
        if self._store_task is None or self._store_task.done():
            self._store_task = asyncio.ensure_future(self._store_loop(state))

    async def _store_loop(self, state: BackupState) -> None:
        try:
            # also after another failure: what was downloaded is stored, so the next attempt reuses it
            while self._store_pending:
                if not self._store_full.is_set() and not self._finishing:
                    try:  # let the batch fill up a little: one thread hop for many items
                        async with asyncio.timeout(STORE_LINGER):
                            await self._store_full.wait()
                    except TimeoutError:
                        pass
                self._store_full.clear()
                batch = self._store_pending[:STORE_BATCH_ITEMS]
                del self._store_pending[:STORE_BATCH_ITEMS]
                self._store_pending_bytes -= sum(len(d) for _, d in batch)
                if len(self._store_pending) >= STORE_BATCH_ITEMS or self._store_pending_bytes >= STORE_PENDING_BYTES:
                    self._store_full.set()
                self._store_room.set()
                put = self.repo.put_content
                results = await self._io(lambda batch=batch: [put(d) for _, d in batch])
                with state.transaction():  # one per batch
                    for (item_id, _), st in zip(batch, results):
                        self._deferred.pop(item_id, None)
                        self.bytes_stored_new += st.new_stored_bytes
                        row = state.stored(item_id, Content(st.sha256, list(st.chunks), st.size))
                        if row is not None:
                            self._ckpt_rows.append(row)
                            self._journal_rows.append(row)
                del batch, results
                await self._flush_checkpoint()
                self._report()
        except Exception as e:  # a storage failure or a bug: the mailbox fails, nothing more is stored
            self._fatal = self._fatal or e
            self._store_pending.clear()
            self._store_pending_bytes = 0
        finally:
            self._store_room.set()  # never hold a download up

    async def _store_settled(self, timeout: float | None = None) -> None:
        """Wait until everything downloaded so far is stored (or the store failed)."""
        self._finishing = True  # no lingering: nothing else is coming
        self._store_full.set()
        async with asyncio.timeout(timeout):
            while self._store_task is not None and not self._store_task.done():
                await asyncio.wait([self._store_task])

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    def _defer(self, item_id: str, reason: str) -> None:
        self._deferred[item_id] = reason
        self._tries[item_id] = self._tries.get(item_id, 0) + 1  # failed tries, of deferred items only

    async def _confirm_miss(self, mb: Any, state: BackupState, item_id: str, err: Any) -> None:
        """``$value`` answered 404. Exchange does that for items that exist (replication lag, an item being
        moved), so an item leaves the snapshot only when a metadata GET by its immutable id also answers
        404, twice, after a short delay each. Otherwise it is tried again later in this backup. (Holds one
        of :data:`CONFIRMATIONS` slots, taken by the worker that spawned it: a server that answers 404 to
        everything slows the workers down instead of piling up tasks.)"""
        from mailpipe.graph.errors import GraphError, NotFoundError

        try:
            for _ in range(2):
                await asyncio.sleep(self.s.item_retry_delay)
                try:
                    await mb.get_message(item_id)
                except NotFoundError:
                    continue
                except GraphError as e:
                    self._defer(item_id, f"not-found: $value answered 404, and checking the item failed: {e}")
                    return
                self._defer(item_id, f"not-found: $value answered 404 ({err.code or 'no code'}) although the "
                                     "item exists")
                return
            state.gone(item_id)  # Graph says, twice, that the item no longer exists
            self._deferred.pop(item_id, None)
        except Exception as e:
            self._fatal = self._fatal or e
        finally:
            self._confirming.release()

    async def _drain(self, state: BackupState) -> None:
        """Wait for every queued download and 404 confirmation; then try the deferred items again, up to
        :data:`ITEM_RETRY_PASSES` times with growing pauses; what still fails is skipped + pending."""
        await self._settle()
        for n in range(ITEM_RETRY_PASSES):
            if not self._deferred or self._fatal is not None:
                break
            await asyncio.sleep(self.s.item_retry_delay * 2 ** n)
            again = list(self._deferred)
            log.info("%s: trying %d item(s) again that Graph could not serve", self.upn, len(again))
            for item_id in again:
                await self._put_queue(item_id)
            await self._settle()
        for item_id, reason in self._deferred.items():
            state.skip(item_id, f"{reason} (tried {self._tries.get(item_id, 1)} times in this backup; the next "
                                "backup tries again)")

    async def _settle(self) -> None:
        while True:
            await self._queue.join()
            if self._side:
                await asyncio.gather(*list(self._side), return_exceptions=True)
                continue
            if self._store_task is not None and not self._store_task.done():
                await self._store_settled()
                continue
            return

    async def _flush_checkpoint(self, force: bool = False) -> None:
        """An uploaded checkpoint part every ``checkpoint_items`` / ``checkpoint_seconds`` (one request each;
        what survives any restart), and between them a part of the local journal every ``journal_items`` /
        ``journal_seconds`` (a file in the work dir: what a restart on this host also finds)."""
        now = time.monotonic()
        if not self._ckpt_rows:
            return
        user_id, work = self.result.user_id, self.work
        if not force and len(self._ckpt_rows) < self.s.checkpoint_items and now - self._ckpt_at < self.s.checkpoint_seconds:
            s = self.s
            if not (s.journal_items and self._journal_rows and work is not None
                    and (len(self._journal_rows) >= s.journal_items or now - self._journal_at >= s.journal_seconds)):
                return
            rows, self._journal_rows = self._journal_rows, []
            self._journal_at = now
            async with self._ckpt_lock:
                await self._io(lambda: self.repo.write_journal(rows, tmp_dir=work))
            return
        rows, self._ckpt_rows, self._journal_rows = self._ckpt_rows, [], []
        self._ckpt_at = self._journal_at = now

        def upload() -> None:
            self.repo.write_checkpoint(user_id, rows, tmp_dir=work)
            if work is not None:  # the journal parts written so far list only rows of this part
                self.repo.drop_journal(work)

        async with self._ckpt_lock:
            await self._io(upload)
        self._ckpt_parts += 1
        if self._ckpt_parts % CHECKPOINT_COMPACT_PARTS == 0:
            async with self._compacting:
                await self._io(lambda: self.repo.compact_checkpoints(user_id, tmp_dir=self.work))

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_SECONDS:
            return
        self._progress_at = now
        self.progress(self.upn, {"bytes_fetched": self.bytes_fetched, "bytes_stored_new": self.bytes_stored_new,
                                 "queued": self._queue.qsize(), "deferred": len(self._deferred)})


def _latest_readable(repo: Any, user_id: str) -> Any:
    """The newest snapshot record that can be read, or None."""
    from mailpipe.repo.repository import RepositoryError

    for sid in reversed(repo.snapshot_ids(user_id)):
        try:
            return repo.read_snapshot(user_id, sid)
        except RepositoryError:
            continue
    return None


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
