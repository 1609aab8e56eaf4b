"""Fidelity backups (``content: fidelity``): every item of every folder through the mailbox export API,
20 items per request (docs/ENGINE.md, "Fidelity backups").

:class:`FidelityBackup` is a :class:`MailboxBackup` whose middle differs: the lease, the deadline, the work
directory, the local journal and the checkpoints, the commit and the failure handling are the engine's own.
Instead of per-folder message deltas and one ``$value`` per message it runs the export API's folder tree and
per-folder item deltas, and exports what it must in batches of at most 20 ids and a byte budget (the items'
sizes from the delta). Each stream is stored like MIME — chunked, deduplicated, in packs — and listed in the
snapshot's ``fidelity.parquet`` (docs/FORMAT.md); the snapshot's ``manifest.parquet`` is empty (no MIME).

Rules, as for MIME: links advance only in a committed snapshot; a folder whose link Graph no longer accepts is
listed from scratch (what the listing does not report leaves: no ghosts, no duplicates); an item's stored
stream is reused as long as its ``changeKey`` is the one the stream was exported at (any change to an item —
read state, flag, categories, an edit, a move — gives it a new ``changeKey`` and a new stream, which is
exported again: its unchanged parts deduplicate). A per-item error in an answer is that item's: not found →
looked up by id (twice, a moment apart) and dropped only if Graph confirms it is gone; transient → tried again
at the end; permanent (``ErrorCorruptData``, ...) → skipped, listed, and pending for the next backup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from mailpipe.backup.engine import (
    CONFIRMATIONS,
    FOLDER_SCANNERS,
    ITEM_RETRY_PASSES,
    WIND_DOWN_SECONDS,
    MailboxBackup,
    _gather_or_cancel,
)

log = logging.getLogger("mailpipe.backup")

CKPT_PREFIX = "fts:"              # checkpoint rows of export streams (never confused with MIME rows)
MAX_BATCH_IDS = 20                # Graph's exportItems limit
BATCH_BYTES = 24 * 1024 * 1024    # stream bytes per exportItems request (the answer is ~4/3 of it: base64)
UNKNOWN_SIZE = 256 * 1024         # an item whose delta entry has no size counts this much
DELTA_PAGE_SIZE = 1000


_COLS = ("id", "folder", "type", "ck", "size", "created", "modified", "cats", "c_ck", "sha", "chunks", "c_size",
         "first", "listing", "in_base", "fetched", "skipped")


class FidelityState:
    """Every item of the mailbox now (from the base snapshot, then the deltas), with its stored stream: an
    SQLite table in the backup's work directory (memory stays flat whatever the mailbox's size, like the MIME
    engine's merge table)."""

    def __init__(self, path: str) -> None:
        import sqlite3

        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("PRAGMA cache_size=-16000")  # 16 MB page cache
        self.reset()

    def reset(self) -> None:
        self.db.execute("DROP TABLE IF EXISTS items")
        self.db.execute("DROP TABLE IF EXISTS known")
        self.db.execute("DROP TABLE IF EXISTS base")
        self.db.execute("CREATE TABLE base (id TEXT PRIMARY KEY)")  # the items of the base snapshot
        self.db.execute("CREATE TABLE items (id TEXT PRIMARY KEY, folder TEXT, type TEXT, ck TEXT, size INT, "
                        "created TEXT, modified TEXT, cats TEXT, c_ck TEXT, sha TEXT, chunks TEXT, c_size INT, "
                        "first TEXT, listing INT, in_base INT DEFAULT 0, fetched INT DEFAULT 0, skipped TEXT)")
        self.db.execute("CREATE INDEX items_folder ON items (folder)")
        self.db.execute("CREATE TABLE known (id TEXT PRIMARY KEY, ck TEXT, sha TEXT, chunks TEXT, size INT)")
        self.reused = 0

    def close(self) -> None:
        self.db.close()

    def load_base(self, rows: list[dict[str, Any]]) -> int:
        self.db.executemany(
            "INSERT OR REPLACE INTO items (id, folder, type, ck, size, created, modified, cats, c_ck, sha, chunks, "
            "c_size, first, in_base) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
            [(r["item_id"], r["folder_id"], r.get("item_type"), r.get("change_key"), r.get("size"),
              _iso(r.get("created_at")), _iso(r.get("last_modified_at")), json.dumps(list(r.get("categories") or ())),
              r.get("change_key"), r["sha256"], json.dumps(list(r["chunks"])), int(r["size"]),
              r.get("first_snapshot_id")) for r in rows])
        self.db.executemany("INSERT OR IGNORE INTO base VALUES (?)", [(r["item_id"],) for r in rows])
        return len(rows)

    def base_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM base").fetchone()[0]

    def load_known(self, rows: list[dict[str, Any]]) -> int:
        data = [(r["item_id"][len(CKPT_PREFIX):], r.get("change_key"), r["sha256"], json.dumps(list(r["chunks"])),
                 int(r["size"])) for r in rows
                if (r.get("item_id") or "").startswith(CKPT_PREFIX) and r.get("sha256") and r.get("chunks") is not None]
        self.db.executemany("INSERT OR REPLACE INTO known VALUES (?,?,?,?,?)", data)
        return len(data)

    def upsert(self, folder_id: str, info: Any, listing: int | None) -> bool:
        """Record an item reported in ``folder_id``; True when its stream must be exported."""
        row = self.db.execute("SELECT c_ck FROM items WHERE id=?", (info.id,)).fetchone()
        vals = (folder_id, info.item_type, info.change_key, info.size, _iso(info.created_at),
                _iso(info.last_modified_at), json.dumps(list(info.categories)), listing)
        if row is None:
            self.db.execute("INSERT INTO items (folder, type, ck, size, created, modified, cats, listing, id) "
                            "VALUES (?,?,?,?,?,?,?,?,?)", (*vals, info.id))
        else:
            self.db.execute("UPDATE items SET folder=?, type=coalesce(?, type), ck=?, size=?, created=?, modified=?, "
                            "cats=?, listing=?, skipped=NULL WHERE id=?", (*vals, info.id))
            if row[0] is not None and row[0] == info.change_key and info.change_key:
                return False
        k = self.db.execute("SELECT ck, sha, chunks, size FROM known WHERE id=?", (info.id,)).fetchone()
        if k is not None and k[0] == info.change_key and info.change_key:
            self.db.execute("UPDATE items SET c_ck=?, sha=?, chunks=?, c_size=?, first=NULL WHERE id=?",
                            (k[0], k[1], k[2], k[3], info.id))
            self.reused += 1
            return False
        return True

    def add_pending(self, item_id: str, folder_id: str, item_type: Any, change_key: Any, size: Any) -> bool:
        """An item the last backup could not export, not reported by any delta: export it all the same."""
        cur = self.db.execute("INSERT OR IGNORE INTO items (id, folder, type, ck, size) VALUES (?,?,?,?,?)",
                              (item_id, folder_id, item_type, change_key, size))
        return cur.rowcount == 1

    def _delete(self, where: str, args: tuple) -> None:
        self.db.execute(f"DELETE FROM items WHERE {where}", args)

    def remove(self, folder_id: str, item_id: str) -> None:
        self._delete("id=? AND folder=?", (item_id, folder_id))

    def gone(self, item_id: str) -> None:
        self._delete("id=?", (item_id,))

    def gone_folder(self, folder_id: str) -> None:
        self._delete("folder=?", (folder_id,))

    def finish_full_listing(self, folder_id: str, listing: int) -> None:
        self._delete("folder=? AND (listing IS NULL OR listing<>?)", (folder_id, listing))

    def wanted(self, item_id: str) -> bool:
        row = self.db.execute("SELECT ck, c_ck, sha FROM items WHERE id=?", (item_id,)).fetchone()
        return row is not None and (row[2] is None or row[1] != row[0])

    def size_hint(self, item_id: str) -> int | None:
        row = self.db.execute("SELECT size FROM items WHERE id=?", (item_id,)).fetchone()
        return row[0] if row else None

    def folder_of(self, item_id: str) -> str | None:
        row = self.db.execute("SELECT folder FROM items WHERE id=?", (item_id,)).fetchone()
        return row[0] if row else None

    def stored(self, item_id: str, change_key: str | None, sha256: str, chunks: list[str], size: int) -> bool:
        """The stream exported at ``change_key`` (None: the delta's) is stored; False if the item left meanwhile."""
        cur = self.db.execute("UPDATE items SET c_ck=coalesce(?, ck), sha=?, chunks=?, c_size=?, first=NULL, "
                              "fetched=1, skipped=NULL WHERE id=?",
                              (change_key, sha256, json.dumps(chunks), size, item_id))
        return cur.rowcount == 1

    def content_key(self, item_id: str) -> str | None:
        row = self.db.execute("SELECT c_ck FROM items WHERE id=?", (item_id,)).fetchone()
        return row[0] if row else None

    def skip(self, item_id: str, reason: str) -> None:
        self.db.execute("UPDATE items SET skipped=? WHERE id=?", (reason, item_id))

    def rows(self) -> Any:
        """Every item, a batch at a time, as dicts (the columns of :data:`_COLS`)."""
        cols = ", ".join("EXISTS (SELECT 1 FROM base b WHERE b.id = items.id)" if c == "in_base" else c for c in _COLS)
        cur = self.db.execute(f"SELECT {cols} FROM items ORDER BY id")
        while True:
            batch = cur.fetchmany(5000)
            if not batch:
                return
            yield [dict(zip(_COLS, r)) for r in batch]


def _iso(v: Any) -> str | None:
    if v is None:
        return None
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


class FidelityPart:
    """The export API's side of one mailbox backup: its base, deltas, batched exports and the rows it commits.
    Run on its own (:class:`FidelityBackup`, ``content: fidelity``) or beside the MIME backup of the same
    mailbox (:class:`BothBackup`, ``content: both``): it shares the job's repository, thread pool, mailbox
    limiter and checkpoints, and keeps its own queue, retries and state."""

    def __init__(self, job: MailboxBackup, mb: Any) -> None:
        from mailpipe.graph.export import MailboxExport

        self.job = job
        self.mb = mb
        self.ex = MailboxExport(mb)
        self.fs = FidelityState(os.path.join(job.work, "fidelity.sqlite"))
        self._batch: list[str] = []
        self._batch_bytes = 0
        self._batches: asyncio.Queue[list[str] | None] = asyncio.Queue(maxsize=8)
        self._deferred: dict[str, str] = {}
        self._tries: dict[str, int] = {}
        self._side: set[asyncio.Task[Any]] = set()
        self._confirming = asyncio.Semaphore(CONFIRMATIONS)
        self._invalid: list[dict[str, Any]] = []
        self._listings = 0
        self._fatal: BaseException | None = None
        self.prev_links: dict[str, str] = {}
        self.prev_pending: list[dict[str, Any]] = []
        self.folders: dict[str, Any] = {}
        self.new_links: dict[str, str] = {}

    @property
    def upn(self) -> str:
        return self.job.upn

    async def load(self, base: Any) -> None:
        """The base snapshot's streams and links, and the streams an interrupted backup checkpointed."""
        from mailpipe.graph.export import check_permissions
        from mailpipe.repo.repository import IntegrityError, RepositoryError

        job, fs = self.job, self.fs
        user_id = job.result.user_id
        await check_permissions(self.mb, "fidelity")
        fid = dict(base.fidelity or {}) if base is not None else {}
        self.prev_links = dict(fid.get("delta_links") or {})
        self.prev_pending = list(fid.get("pending") or [])
        if base is not None and "fidelity.parquet" in base.files:
            try:
                await job._stream_into(lambda: job.repo.iter_fidelity(user_id, base.snapshot_id, tmp_dir=job.work),
                                       fs.load_base)
            except (IntegrityError, RepositoryError) as e:
                job._warn(f"the fidelity streams of snapshot {base.snapshot_id} cannot be read ({e}); every folder "
                          "is listed from scratch")
                fs.reset()
                self.prev_links, self.prev_pending = {}, []
        stored = job.repo.chunk_is_reusable
        n_ckpt = await job._stream_into(
            lambda: job.repo.iter_checkpoint_rows(user_id, tmp_dir=job.work),
            lambda rows: fs.load_known([r for r in rows if all(stored(h) for h in (r.get("chunks") or []))]))
        if n_ckpt:
            log.info("%s: resuming: %d streams stored by an interrupted backup", self.upn, n_ckpt)
        self.folders = {f.id: f for f in await self.ex.folders()}

    async def run(self) -> None:
        """Every folder's item delta, the exports they call for, and the retries of what Graph could not serve."""
        fs, folders = self.fs, self.folders
        gone_folders: set[str] = set()
        workers = [asyncio.create_task(self._export_worker())
                   for _ in range(self.job.tenant.limits.concurrent_requests_per_mailbox)]
        scan_sem = asyncio.Semaphore(FOLDER_SCANNERS)

        async def scan(folder_id: str) -> None:
            async with scan_sem:
                invalid_before = len(self._invalid)
                link = await self._scan(folder_id, self.prev_links.get(folder_id), folders[folder_id].total_item_count)
                if link is None:
                    gone_folders.add(folder_id)
                elif len(self._invalid) > invalid_before:
                    if folder_id in self.prev_links:  # the link does not advance: those changes are read again
                        self.new_links[folder_id] = self.prev_links[folder_id]
                else:
                    self.new_links[folder_id] = link

        try:
            for p in self.prev_pending:  # what Graph could not serve last time, whatever the delta says now
                iid = p.get("item_id")
                if iid and p.get("folder_id") in folders and fs.add_pending(
                        iid, p["folder_id"], p.get("item_type"), p.get("change_key"), p.get("size")):
                    await self._want(iid)
            await _gather_or_cancel([scan(f) for f in sorted(folders)])
            await self._drain_exports()
        finally:
            await self._stop_workers(workers)
        if self._fatal is not None:
            raise self._fatal
        for f in gone_folders:
            del folders[f]

    async def abort(self) -> None:
        await self.ex.aclose()
        self.fs.close()

    async def commit_rows(self, writer: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        """Write the snapshot's ``fidelity.parquet`` rows; → (the commit record's ``fidelity``, skipped entries,
        figures)."""
        fs, folders, job = self.fs, self.folders, self.job
        snapshot_id = writer.snapshot_id
        rows: list[dict[str, Any]] = []
        by_type: Counter[str] = Counter()
        skipped, pending = [], []
        counts: Counter[str] = Counter()
        present_base = 0
        for batch_rows in fs.rows():
            for it in batch_rows:
                iid = it["id"]
                f = folders.get(it["folder"])
                if f is None:
                    continue
                present_base += bool(it["in_base"])
                if it["sha"] is None or it["skipped"]:
                    reason = it["skipped"] or "not exported in this backup"
                    skipped.append({"item_id": iid, "folder_id": it["folder"], "folder_path": list(f.path),
                                    "subject": None, "item_type": it["type"], "reason": reason, "pending": True,
                                    "content": "fidelity"})
                    pending.append({"item_id": iid, "folder_id": it["folder"], "item_type": it["type"],
                                    "change_key": it["ck"], "size": it["size"]})
                    if it["sha"] is None:
                        continue
                by_type[it["type"] or "unknown"] += 1
                counts["items_new" if not it["in_base"] else ("items_changed" if it["fetched"] else "_same")] += 1
                rows.append({"item_id": iid, "item_type": it["type"], "folder_id": it["folder"],
                             "folder_path": list(f.path), "folder_class": f.folder_class, "change_key": it["c_ck"],
                             "created_at": it["created"], "last_modified_at": it["modified"],
                             "categories": json.loads(it["cats"] or "[]"), "size": it["c_size"], "sha256": it["sha"],
                             "chunks": json.loads(it["chunks"]), "first_snapshot_id": it["first"] or snapshot_id})
                if len(rows) >= 5000:
                    batch, rows = rows, []
                    await job._io(lambda batch=batch: writer.add_fidelity_items(batch))
        if rows or not writer.fidelity_items:
            await job._io(lambda: writer.add_fidelity_items(rows))
        skipped += [{"item_id": None, "folder_id": v["folder_id"], "subject": None,
                     "folder_path": list(folders[v["folder_id"]].path) if v["folder_id"] in folders else [],
                     "reason": v["reason"], "pending": False, "content": "fidelity"} for v in self._invalid]
        figures = {"items_total": sum(by_type.values()), "items_new": counts["items_new"],
                   "items_changed": counts["items_changed"], "items_removed": fs.base_count() - present_base,
                   "items_skipped": len(skipped), "items_reused": fs.reused,
                   "items_by_type": dict(sorted(by_type.items()))}
        fidelity = {"delta_links": self.new_links, "pending": pending, "by_type": figures["items_by_type"],
                    "folders": {f.id: {"class": f.folder_class, "well_known": f.well_known} for f in folders.values()}}
        await self.ex.aclose()
        self.fs.close()
        return fidelity, skipped, figures

    # -- deltas --------------------------------------------------------------------------------------------
    async def _scan(self, folder_id: str, link: str | None, item_count: int | None) -> str | None:
        """One folder's item delta to its end → the new delta link, or None when the folder is gone."""
        from mailpipe.graph.errors import NotFoundError, ProtocolError, ResyncRequired

        fs = self.fs
        for _ in range(3):
            listing = None
            if link is None:
                self._listings += 1
                listing = self._listings
            try:
                async for page in self.ex.item_delta(folder_id, link, page_size=DELTA_PAGE_SIZE,
                                                     expected_items=item_count):
                    for iid in page.removed:
                        fs.remove(folder_id, iid)
                    for info in page.upserts:
                        if fs.upsert(folder_id, info, listing):
                            await self._want(info.id)
                    for bad in page.invalid:
                        self._invalid.append({"folder_id": folder_id, **bad})
                    if page.delta_link:
                        if listing is not None:
                            fs.finish_full_listing(folder_id, listing)
                        return page.delta_link
                    self.job._report()
                raise ProtocolError(f"mailbox {self.upn} export folder {folder_id}: the delta ended without a "
                                    "deltaLink")
            except ResyncRequired as e:
                log.info("%s: folder %s is listed again from scratch: %s", self.upn, folder_id, e)
                link = None
            except NotFoundError:
                if folder_id not in {f.id for f in await self.ex.folders()}:
                    log.info("%s: folder %s was deleted during the backup", self.upn, folder_id)
                    fs.gone_folder(folder_id)
                    return None
                raise
        raise ProtocolError(f"mailbox {self.upn} export folder {folder_id}: the delta did not settle after 3 "
                            "listings from scratch")

    # -- exports -------------------------------------------------------------------------------------------
    async def _want(self, item_id: str) -> None:
        """Queue an item for export: batches of at most 20 ids and :data:`BATCH_BYTES` of stream."""
        if self._fatal is not None:
            raise self._fatal
        hint = self.fs.size_hint(item_id)
        size = hint if hint is not None else UNKNOWN_SIZE
        if self._batch and self._batch_bytes + size > BATCH_BYTES:
            await self._flush_batch()
        self._batch.append(item_id)
        self._batch_bytes += size
        if len(self._batch) >= MAX_BATCH_IDS:
            await self._flush_batch()

    async def _flush_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            await self._batches.put(batch)

    def _defer(self, item_id: str, reason: str) -> None:
        self._deferred[item_id] = reason
        self._tries[item_id] = self._tries.get(item_id, 0) + 1

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    async def _drain_exports(self) -> None:
        """Wait for every queued export; then export the deferred items again, up to
        :data:`ITEM_RETRY_PASSES` times with growing pauses; what still fails is skipped + pending."""
        await self._settle_exports()
        for n in range(ITEM_RETRY_PASSES):
            if not self._deferred or self._fatal is not None:
                break
            await asyncio.sleep(self.job.s.item_retry_delay * 2 ** n)
            again, self._deferred = self._deferred, {}
            log.info("%s: exporting %d item(s) again that Graph could not serve", self.upn, len(again))
            for iid in again:
                if self.fs.wanted(iid):
                    await self._want(iid)
            await self._settle_exports()
        for iid, reason in self._deferred.items():
            self.fs.skip(iid, f"{reason} (tried {self._tries.get(iid, 1)} times in this backup; the next backup "
                              "tries again)")

    async def _settle_exports(self) -> None:
        await self._flush_batch()
        while True:
            await self._batches.join()
            if not self._side:
                if not self._batch:
                    return
                await self._flush_batch()
                continue
            await asyncio.gather(*list(self._side), return_exceptions=True)

    async def _stop_workers(self, workers: list[asyncio.Task[None]]) -> None:
        while not self._batches.empty():
            self._batches.get_nowait()
            self._batches.task_done()
        for _ in workers:
            await self._batches.put(None)
        tasks = [*workers, *self._side]
        _, late = await asyncio.wait(tasks, timeout=WIND_DOWN_SECONDS) if tasks else (set(), set())
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _export_worker(self) -> None:
        while True:
            batch = await self._batches.get()
            if batch is None:
                self._batches.task_done()
                return
            try:
                todo = [i for i in batch if self.fs.wanted(i)]
                if todo and self._fatal is None and self.job._fatal is None:
                    await self._export(todo)
            except Exception as e:  # throttling/5xx beyond the retry budget, a refused permission, or a bug
                self._fatal = self._fatal or e
            finally:
                self._batches.task_done()

    async def _export(self, ids: list[str]) -> None:
        job, fs = self.job, self.fs
        results = await self.ex.export_items(ids)

        async def keep(res: Any) -> None:
            data = res.data
            job.bytes_fetched += len(data)
            st = await job._io(lambda: job.repo.put_content(data))
            job.bytes_stored_new += st.new_stored_bytes
            if not fs.stored(res.item_id, res.change_key, st.sha256, list(st.chunks), st.size):
                return  # removed by a delta meanwhile
            self._deferred.pop(res.item_id, None)
            row = {"item_id": CKPT_PREFIX + res.item_id, "change_key": fs.content_key(res.item_id), "is_draft": None,
                   "sha256": st.sha256, "chunks": list(st.chunks), "size": st.size}
            job._ckpt_rows.append(row)
            job._journal_rows.append(row)

        await asyncio.gather(*(keep(r) for r in results if r.ok))
        for res in results:
            if res.ok:
                continue
            why = f"{res.error_code}: {res.error_message or 'no message'}"
            if res.not_found:
                await self._confirming.acquire()
                self._spawn(self._confirm_gone(res.item_id, why))
            elif res.permanent:
                fs.skip(res.item_id, f"permanent: exportItems answered {why}")
                self._deferred.pop(res.item_id, None)
            else:
                self._defer(res.item_id, f"transient: exportItems answered {why}")
        await job._flush_checkpoint()
        job._report()

    async def _confirm_gone(self, item_id: str, why: str) -> None:
        """A per-item ``ErrorItemNotFound``: the item leaves only if a GET of it answers 404 twice, a
        moment apart (as for ``$value``: Exchange's not-found is not always the truth)."""
        from mailpipe.graph.errors import GraphError, NotFoundError

        try:
            folder = self.fs.folder_of(item_id)
            if folder is None:
                return
            for _ in range(2):
                await asyncio.sleep(self.job.s.item_retry_delay)
                try:
                    await self.ex.get_item(folder, item_id)
                except NotFoundError:
                    continue
                except GraphError as e:
                    self._defer(item_id, f"not-found: exportItems answered {why}, and checking the item failed: {e}")
                    return
                self._defer(item_id, f"not-found: exportItems answered {why} although the item exists")
                return
            self.fs.gone(item_id)
            self._deferred.pop(item_id, None)
        except Exception as e:
            self._fatal = self._fatal or e
        finally:
            self._confirming.release()


class FidelityBackup(MailboxBackup):
    """``content: fidelity``: one mailbox through the export API only (see the module docstring)."""

    async def _backup(self, mb: Any, state: Any) -> None:
        user_id = self.result.user_id
        started_at = datetime.now(timezone.utc)
        part = FidelityPart(self, mb)
        base, base_entry = await self._load_base(state)  # MIME rows (none in a fidelity snapshot) + base record
        await part.load(base)
        ids = await self._io(lambda: self.repo.snapshot_ids(user_id))
        writer = await self._io(lambda: self.repo.begin_snapshot(
            user_id, self.upn, after=ids[-1] if ids else "", tmp_dir=self.work))
        try:
            try:
                await part.run()
            finally:
                await self._flush_checkpoint(force=True)
            if self._fatal is not None:
                raise self._fatal
            await self._io(lambda: writer.set_folders(_folder_rows(part.folders)))
            fidelity, skipped, figures = await part.commit_rows(writer)
            r = self.result
            for k, v in figures.items():
                setattr(r, k, v)
            r.skipped = skipped
            stats = {**figures, "bytes_fetched": self.bytes_fetched, "bytes_stored_new": self.bytes_stored_new,
                     "requests": mb.stats.requests, "throttled": mb.stats.throttled,
                     "export_requests": mb.stats.by_kind.get("export", 0), "content": "fidelity"}
            info = await self._io(lambda: writer.commit(
                delta_links={}, stats=stats, skipped=skipped, pending=[], base=base_entry, started_at=started_at,
                fidelity=fidelity, before_commit=self._lease.renew if self._lease is not None else None))
        except BaseException:
            await self._io(writer.abort)
            await part.abort()
            raise
        r.snapshot_id = info.snapshot_id
        r.committed_at = info.committed_at
        await self._io(lambda: self.repo.clear_checkpoints(user_id))
        self._report(force=True)


class BothBackup(MailboxBackup):
    """``content: both``: the MIME backup of the mailbox's messages and, beside it through the same limiter,
    the export API's streams of every item, committed in one snapshot (``manifest.parquet`` and
    ``fidelity.parquet``)."""

    async def _companion_start(self, mb: Any, base: Any) -> None:
        self._part = FidelityPart(self, mb)
        await self._part.load(base)
        self._part_task = asyncio.create_task(self._part.run())

    async def _companion_finish(self, writer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        await self._part_task
        # folders.parquet lists every folder of the mailbox: the mail folders, and the export API's others
        writer.add_folders(_folder_rows(self._part.folders))
        fidelity, skipped, figures = await self._part.commit_rows(writer)
        self.result.items_by_type = figures["items_by_type"]
        fidelity["figures"] = {k: v for k, v in figures.items() if k != "items_by_type"}
        return fidelity, skipped

    async def _companion_abort(self) -> None:
        task = getattr(self, "_part_task", None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if getattr(self, "_part", None) is not None:
            await self._part.abort()


def _folder_rows(folders: dict[str, Any]) -> list[dict[str, Any]]:
    """``folders.parquet`` rows of the export API's folders (every class)."""
    return [{"folder_id": f.id, "parent_id": f.parent_id, "display_name": f.display_name, "path": list(f.path),
             "total_item_count": f.total_item_count} for f in folders.values()]
