"""Fidelity restores: a snapshot of ``content: fidelity`` put back through the mailbox import API
(docs/RESTORE.md, "Fidelity restores").

:class:`FidelityRestoreJob` is a :class:`RestoreJob` whose items are the snapshot's ``fidelity.parquet`` rows
(every item type) and which recreates each one by POSTing its stored stream to an import session's URL: the
item comes back as the original — type, properties, received (not a draft) — in a folder of its class. The
plan, the restore id, the lease, the progress records and the result are the engine's own.

Idempotence: a stream cannot carry a tag, so what a restore already made is recognised by content: the target
folders' items of the same size are exported and their streams' sha256 compared with the source's (the
collision check, and how an import whose answer was lost is settled). Under ``collisions: skip`` (the default)
a restore started again creates nothing twice; under ``copy`` an item imported in the seconds before a crash
(before its progress was recorded) may be imported again. ``replace`` is not offered (the export API's item
DELETE is not used yet).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Any

from mailpipe.errors import UserError
from mailpipe.restore.engine import WELL_KNOWN, RestoreJob, _selected

log = logging.getLogger("mailpipe.restore")

SESSION_MARGIN_SECONDS = 120.0   # an import session this close to its expiry is replaced before use


def has_fidelity(snap: Any) -> bool:
    return "fidelity.parquet" in (snap.files or {})


class FidelityRestoreJob(RestoreJob):
    def _selected_batches(self) -> Any:
        """The selected rows of ``fidelity.parquet`` (``received_at``: the item's creation time, for
        ``--since``/``--until``), a batch at a time (run in the pool)."""
        for b in self.repo.iter_fidelity(self.source_uid, self.snap.snapshot_id, batch_size=2000, tmp_dir=self.work):
            rows = b.to_pylist()
            for r in rows:
                r["received_at"] = r.get("created_at")
            yield [r for r in rows if _selected(r, self.req, self.prefixes)]

    def _classes(self) -> tuple[dict[tuple[str, ...], str | None], dict[tuple[str, ...], str]]:
        """Source folder path → its class, and well-known name → source path (from the commit record)."""
        info = (self.snap.fidelity or {}).get("folders") or {}
        cls: dict[tuple[str, ...], str | None] = {}
        wk: dict[str, tuple[str, ...]] = {}
        for fid, p in self.folder_paths.items():
            meta = info.get(fid) or {}
            cls[p] = meta.get("class")
            if meta.get("well_known"):
                wk[str(meta["well_known"]).lower()] = p
        return cls, wk

    async def run(self, graph_options: dict[str, Any]) -> None:
        from mailpipe.graph import GraphTenant
        from mailpipe.graph.export import MailboxExport, check_permissions

        req, r = self.req, self.r
        if req.collisions == "replace":
            raise UserError("collisions: replace is not offered for fidelity restores (skip or copy)")
        async with GraphTenant.from_config(self.tenant.for_restore(), self.s, **graph_options) as graph:
            target = await graph.resolve_mailbox(r.target)
            self.target_uid = target.id
            from mailpipe.restore.engine import _restore_id

            rid = _restore_id(self.tenant.name, self.source_uid, target.id, req)
            r.restore_id = rid
            mb = graph.mailbox(target.id, target.upn)
            await check_permissions(mb, "fidelity", restore=True)
            ex = MailboxExport(mb)
            self._ex = ex
            lease = await self._lease_io(lambda: self.repo.acquire_lease(
                target.id, target.upn, self.s.lease_seconds, name=f"restores/{rid}/lease.json",
                what="run of this restore"))
            renewer = asyncio.create_task(self._renew(lease))
            try:
                done = await self._resume_or_pin(target.id, rid, content="fidelity")
                folder_ids = await self._fidelity_folders(ex)
                self._sizes: dict[str, dict[int | None, set[str]]] = {}  # target folder → size → item ids
                self._sha: dict[str, str] = {}                             # target item → its stream's sha256
                self._locks: dict[str, asyncio.Lock] = {}
                self._session: Any = None
                self._session_life = SESSION_MARGIN_SECONDS * 4
                self._session_lock = asyncio.Lock()
                await self._import_session()  # a missing permission fails the restore here, not item by item
                await self._items(ex, folder_ids, {}, done, rid)
            finally:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                await self._flush(force=True)
                await self._lease_io(lease.release)
                await ex.aclose()
                r.requests = mb.stats.requests
                r.throttled = mb.stats.throttled
                r.upload_wait_seconds = round(ex.budget.waited, 1) if ex.budget is not None else 0.0
                await graph.release(mb.user_id)
            if self._fatal is not None:
                raise self._fatal
            await self._io(lambda: self.repo.write_restore_result(target.id, rid, {
                k: v for k, v in r.__dict__.items() if k != "folders"}))

    async def _fidelity_folders(self, ex: Any) -> dict[tuple[str, ...], str]:
        """Target folder id of every target path, created when missing with the source folder's class;
        in place, the source's well-known folders go to the target's (a German Kalender into Calendar)."""
        cls, source_wk = self._classes()
        tree = await ex.folders()
        by_path = {tuple(p.casefold() for p in f.path): f.id for f in tree}
        target_wk = {f.well_known.lower(): f.id for f in tree if f.well_known}
        ids: dict[tuple[str, ...], str] = {}

        async def ensure(parent: str | None, path: tuple[str, ...], folder_class: str | None) -> str:
            key = tuple(p.casefold() for p in path)
            if key in by_path:
                return by_path[key]
            fid = await ex.create_folder(parent, path[-1], folder_class)
            by_path[key] = fid
            return fid

        if self.root is not None:
            ids[(self.root,)] = await ensure(None, (self.root,), "IPF.Note")
        else:
            for wk, p in source_wk.items():
                if wk in target_wk and (wk in WELL_KNOWN or wk in ("calendar", "contacts", "tasks", "notes")):
                    ids[p] = target_wk[wk]
        for p in self.needed:
            t = self.target_of[p]
            if t in ids:
                continue
            parent = ids.get(t[:-1]) if len(t) > 1 else None
            ids[t] = await ensure(parent, t, cls.get(p) or "IPF.Note")
        return ids

    async def _present_in(self, folder_id: str, size: int, sha256: str, *, fresh: bool = False) -> str | None:
        """The id of an item of ``folder_id`` whose stream is this one (same size, then same sha256 of its
        export), or None. The folder's sizes come from one item delta (again with ``fresh``: after an import
        whose answer was lost); only items of the same size are exported to be compared, each once."""
        ex = self._ex
        lock = self._locks.setdefault(folder_id, asyncio.Lock())
        async with lock:
            sizes = self._sizes.get(folder_id)
            if sizes is None or fresh:
                sizes = {}
                async for page in ex.item_delta(folder_id, None, page_size=1000):
                    for i in page.upserts:
                        sizes.setdefault(i.size, set()).add(i.id)
                self._sizes[folder_id] = sizes
            todo = [i for i in sizes.get(size, ()) if i not in self._sha]
            for k in range(0, len(todo), 20):
                for res in await ex.export_items(todo[k:k + 20]):
                    if res.ok:
                        self._sha[res.item_id] = hashlib.sha256(res.data).hexdigest()
            return next((i for i in sorted(sizes.get(size, ())) if self._sha.get(i) == sha256), None)

    def _created(self, folder_id: str, size: int, sha256: str, item_id: str) -> None:
        self._sizes.setdefault(folder_id, {}).setdefault(size, set()).add(item_id)
        self._sha[item_id] = sha256

    async def _import_session(self, renew: bool = False) -> Any:
        """The import session to use: a new one when there is none, when asked (its URL's token was refused),
        or when it expires within a quarter of its lifetime (at most :data:`SESSION_MARGIN_SECONDS`)."""
        async with self._session_lock:
            s = self._session
            now = datetime.now(timezone.utc)
            left = (s.expires_at - now).total_seconds() if s and s.expires_at else None
            margin = min(SESSION_MARGIN_SECONDS, self._session_life / 4)
            if renew or s is None or (left is not None and left < margin):
                self._session = await self._ex.create_import_session()
                exp = self._session.expires_at
                self._session_life = (exp - now).total_seconds() if exp else SESSION_MARGIN_SECONDS * 4
            return self._session

    async def _one(self, ex: Any, row: dict[str, Any], folder_ids: dict[tuple[str, ...], str],
                   existing: dict[str, Any], done: set[str], rid: str) -> None:
        from mailpipe.graph.errors import ForbiddenError, TransientError

        item = row["item_id"]
        if item in done:
            self.r.resumed += 1
            return
        folder = folder_ids[self.target_of[tuple(row["folder_path"] or ())]]
        size, sha = int(row["size"]), row["sha256"]
        if self.req.collisions == "skip":
            same = await self._present_in(folder, size, sha)
            if same is not None:
                self.r.skipped_present += 1
                self._record(item, same, folder, "present")
                return
        data = await self._io(lambda: self.repo.read_content(row["sha256"], row["chunks"], row["size"], item=item))
        for attempt in range(2):
            session = await self._import_session()
            try:
                new_id, _ = await ex.import_item(session, folder, data)
                break
            except ForbiddenError as e:  # the import URL's own token expired (401): a new session, once
                if attempt or e.status != 401:
                    raise
                await self._import_session(renew=True)
            except TransientError:
                # it may have been applied: look for it by content (twice, a moment apart) before trying again
                for _ in range(2):
                    await asyncio.sleep(self.s.item_retry_delay)
                    found = await self._present_in(folder, size, sha, fresh=True)
                    if found is not None:
                        new_id = found
                        break
                else:
                    if attempt:
                        raise
                    continue
                break
        self._created(folder, size, sha, new_id)
        self.r.restored += 1
        self.r.bytes_uploaded += len(data)
        self._record(item, new_id, folder, "created")

    def _report(self, writer: Any) -> None:
        if self.progress is None or time.monotonic() - self._progress_at < 5.0 and self._done_items < self.total:
            return
        self._progress_at = time.monotonic()
        ex = self._ex
        self.progress({"phase": "items", "done": self._done_items, "total": self.total, "restored": self.r.restored,
                       "bytes_uploaded": self.r.bytes_uploaded,
                       "upload_wait_seconds": round(ex.budget.waited, 1) if ex.budget is not None else 0.0,
                       "throttled": ex.mb.stats.throttled, "failed": self.r.failed_count})
