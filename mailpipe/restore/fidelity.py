"""Fidelity restores: a snapshot of ``content: fidelity`` put back through the mailbox import API
(docs/RESTORE.md, "Fidelity restores").

:class:`FidelityRestoreJob` is a :class:`RestoreJob` whose items are the snapshot's ``fidelity.parquet`` rows
(every item type) and which recreates each one by POSTing its stored stream to an import session's URL: the
item comes back as the original — type, properties, received (not a draft) — in a folder of its class. The
plan, the restore id, the lease, the progress records and the result are the engine's own.

A stream cannot carry a tag, so "the same item" in a target folder is found by what the repository and the
export API can tell:

- **the same stream**: an item whose export has the same size and sha256 (an exact copy);
- **the same item, changed since**: the source item itself (restoring into its own mailbox), or an item that a
  restore of this source item recorded as made (any restore into this mailbox: its progress records).

``skip`` (the default) leaves the item alone when either is there; ``replace`` keeps one of them as backed up —
an exact copy as it is, else a changed one updated in place with the stored stream (the import's update mode:
same id, nothing deleted) — and soft-deletes the other copies restores made of it; ``copy`` imports anyway.

Idempotence: a restore started again finds what its earlier runs recorded, and what they imported without
recording (a crash between an import and its progress record): under ``skip`` and ``replace`` such an item is
an exact copy, found as above; under ``copy`` the target folders' contents before the restore's first import are
kept in the repository (``baseline.json``), and an exact copy that is neither in it nor created by a restore is
the earlier run's. An import whose answer is lost (a timeout, a reset, a 5xx) is looked for among the folder's
items that are new since the import was sent, before it is tried again; items with the same stream into one
folder are restored one at a time (decision and import), so an import in flight is never taken for another's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from mailpipe.restore.engine import WELL_KNOWN, RestoreJob, _selected

log = logging.getLogger("mailpipe.restore")

SESSION_MARGIN_SECONDS = 120.0   # an import session this close to its expiry is replaced before use
STREAM_STRIPES = 256             # locks for (target folder, stream) pairs: one item of a stream at a time


class _Folder:
    """A target folder's items as its item delta listed them: id → (size, change key), and ids by size."""

    __slots__ = ("items", "by_size", "recent")

    def __init__(self) -> None:
        self.items: dict[str, tuple[int | None, str | None]] = {}
        self.by_size: dict[int | None, set[str]] = {}
        self.recent: set[str] | None = None  # while the folder is listed again: what this restore made meanwhile

    def add(self, item_id: str, size: int | None, change_key: str | None) -> None:
        old = self.items.get(item_id)
        if old is not None:
            self.by_size.get(old[0], set()).discard(item_id)
        self.items[item_id] = (size, change_key)
        self.by_size.setdefault(size, set()).add(item_id)

    def discard(self, item_id: str) -> None:
        old = self.items.pop(item_id, None)
        if old is not None:
            self.by_size.get(old[0], set()).discard(item_id)


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

    async def _writer(self, mb: Any) -> Any:
        from mailpipe.graph.export import MailboxExport, check_permissions

        await check_permissions(mb, "fidelity", restore=True)
        self._ex = MailboxExport(mb)
        return self._ex

    async def _restore(self, graph: Any, mb: Any, ex: Any, rid: str) -> None:
        self._links: dict[str, set[str]] = {}
        self._made_by: dict[str, set[str]] = {}
        self._created_any: set[str] = set()
        self._claimed: set[str] = set()
        done = await self._resume_or_pin(self.target_uid, rid, lambda row: self._link(row, True, True),
                                         content="fidelity")
        await self._io(lambda: self._read_links(rid))
        folder_ids = await self._fidelity_folders(ex)
        self._index: dict[str, _Folder] = {}
        self._sha: dict[str, tuple[str | None, str]] = {}  # target item → (its change key, its stream's sha256)
        self._locks: dict[str, asyncio.Lock] = {}          # a folder's listing
        self._claim_locks: dict[str, asyncio.Lock] = {}    # a folder's decisions (what to do, claimed)
        self._streams = [asyncio.Lock() for _ in range(STREAM_STRIPES)]  # (folder, stream) → one of these
        self._orphans: dict[str, set[str]] = {}            # copy: imported by an earlier run, not recorded
        self._gone: set[str] = set()                        # deleted by this restore (replace)
        if self.req.collisions == "copy":
            await self._baseline(rid, set(folder_ids.values()))
        self._session: Any = None
        self._session_life = SESSION_MARGIN_SECONDS * 4
        self._session_lock = asyncio.Lock()
        await self._import_session()  # a missing permission fails the restore here, not item by item
        await self._items(ex, folder_ids, {}, done, rid)

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

    # -- what the target folders hold ------------------------------------------------------------------------
    def _read_links(self, rid: str) -> None:
        """What the other restores into this mailbox recorded (this one's rows came with its resume): see
        :meth:`_link`."""
        for other, plan in self.repo.restores_into(self.target_uid):
            if other != rid:
                same_source = plan.get("source") == self.source_uid
                for row in self.repo.iter_restore_progress(self.target_uid, other):
                    self._link(row, same_source, False)

    def _link(self, row: dict[str, Any], same_source: bool, own: bool) -> None:
        """One progress row of a restore into this mailbox: per source item of this source, the target items
        recorded for it (``_links``, any status: "the same item") and those a restore *created* (``_made_by``: the
        only ones ``replace`` may delete); every target item any restore created (``_created_any``: a copy
        restore's baseline never makes them its own); and this restore's (``_claimed``: a target item serves one
        source item only)."""
        made, source = row.get("created"), row.get("source")
        if not isinstance(made, str) or not made:
            return
        created = row.get("status") in ("created", "done")  # (MIME restores record "done")
        if created:
            self._created_any.add(made)
        if own:
            self._claimed.add(made)
        if same_source and isinstance(source, str):
            self._links.setdefault(source, set()).add(made)
            if created:
                self._made_by.setdefault(source, set()).add(made)

    async def _baseline(self, rid: str, folders: set[str]) -> None:
        """``copy``: the target folders' items before this restore's first import, kept in the repository (written
        before any import: a run that finds none has imported nothing). Started again, the items that are neither
        in it nor recorded by this restore were imported by an earlier run that died before recording them."""
        base = await self._io(lambda: self.repo.read_restore_baseline(self.target_uid, rid))
        now = {fid: await self._folder(fid) for fid in sorted(folders)}
        if base is None:
            await self._io(lambda: self.repo.write_restore_baseline(
                self.target_uid, rid, {fid: sorted(f.items) for fid, f in now.items()}))
            return
        for fid, f in now.items():
            orphans = set(f.items) - set(base.get(fid, ())) - self._created_any - self._claimed
            if orphans:
                self._orphans[fid] = orphans

    async def _folder(self, folder_id: str, *, fresh: bool = False) -> _Folder:
        """The items of a target folder (ids, sizes, change keys) from one item delta, listed once (again with
        ``fresh``) and kept up to date with what this restore makes and deletes — also across a fresh listing,
        which may have been read before an import of this restore ended or after a delete was sent."""
        lock = self._locks.setdefault(folder_id, asyncio.Lock())
        async with lock:
            f = self._index.get(folder_id)
            if f is None or fresh:
                new = _Folder()
                if f is not None:
                    f.recent = set()
                async for page in self._ex.item_delta(folder_id, None, page_size=1000):
                    for i in page.upserts:
                        new.add(i.id, i.size, i.change_key)
                for i in (f.recent or ()) if f is not None else ():  # made while the listing was read
                    if i not in new.items and i in f.items:
                        new.add(i, *f.items[i])
                for i in self._gone:
                    new.discard(i)
                self._index[folder_id] = f = new
            return f

    async def _same_stream(self, folder_id: str, size: int, sha256: str, among: set[str] | None = None) -> list[str]:
        """The items of ``folder_id`` (or of ``among`` in it) whose stream is this one: same size, then the same
        sha256 of their export (each exported once per change key)."""
        f = await self._folder(folder_id)
        ids = f.by_size.get(size, set()) if among is None else among & f.by_size.get(size, set())
        todo = [i for i in sorted(ids) if i not in self._sha or self._sha[i][0] != f.items[i][1]]
        for k in range(0, len(todo), 20):
            for res in await self._ex.export_items(todo[k:k + 20]):
                if res.ok:
                    self._sha[res.item_id] = (f.items.get(res.item_id, (None, None))[1],
                                              hashlib.sha256(res.data).hexdigest())
        return sorted(i for i in ids if i in f.items and self._sha.get(i, (None, ""))[1] == sha256)

    async def _linked(self, folder_id: str, item: str) -> list[str]:
        """The items of ``folder_id`` that are this source item: itself (restoring into its own mailbox), or
        what a restore of it recorded as made."""
        f = await self._folder(folder_id)
        known = set(self._links.get(item, ()))
        if self.target_uid == self.source_uid:
            known.add(item)
        return sorted(i for i in known if i in f.items)

    def _made(self, folder_id: str, item_id: str, size: int, change_key: str | None, sha256: str, *,
              new: bool = True) -> None:
        """Record an item this restore made (``new``) or updated; a new item that another source item already
        claimed is refused (the item fails, the next run looks again), never recorded twice."""
        from mailpipe.graph.errors import ProtocolError

        if new and item_id in self._claimed:
            raise ProtocolError(f"import into {folder_id}: Exchange answered item {item_id}, which this restore "
                                "already recorded for another item")
        f = self._index.setdefault(folder_id, _Folder())
        f.add(item_id, size, change_key)
        if f.recent is not None:
            f.recent.add(item_id)
        self._sha[item_id] = (change_key, sha256)
        self._claimed.add(item_id)

    # -- one item -------------------------------------------------------------------------------------------------
    async def _one(self, ex: Any, row: dict[str, Any], folder_ids: dict[tuple[str, ...], str],
                   existing: dict[str, Any], done: set[str], rid: str) -> None:
        item = row["item_id"]
        if item in done:
            self.r.resumed += 1
            return
        folder = folder_ids[self.target_of[tuple(row["folder_path"] or ())]]
        size, sha = int(row["size"]), row["sha256"]
        # one item of a stream at a time per folder, decision and import: an import of the same stream in flight
        # (made, not answered yet) is never taken for another's (two items with one stream are rare: no cost)
        async with self._streams[hash((folder, sha)) % len(self._streams)]:
            await self._one_stream(ex, row, item, folder, size, sha)

    async def _one_stream(self, ex: Any, row: dict[str, Any], item: str, folder: str, size: int, sha: str) -> None:
        policy = self.req.collisions
        keep: str | None = None
        extra: list[str] = []
        async with self._claim_locks.setdefault(folder, asyncio.Lock()):  # what to do, decided and claimed at once
            if policy == "copy":
                mine = await self._same_stream(folder, size, sha, self._orphans.get(folder, set()))
                if mine:  # imported by an earlier run that died before recording it
                    self._orphans[folder].discard(mine[0])
                    self._claimed.add(mine[0])
                    self.r.completed += 1
                    self._record(item, mine[0], folder, "created")
                    return
            else:
                same = [i for i in await self._same_stream(folder, size, sha) if i not in self._claimed]
                linked = [i for i in await self._linked(folder, item) if i not in self._claimed]
                own = item if item in linked and self.target_uid == self.source_uid else None
                # the one kept: the item itself (in its own mailbox), else an exact copy, else a changed copy
                keep = own or next((i for i in same if i in linked), None) or (same or linked or [None])[0]
                if keep is not None:
                    self._claimed.add(keep)
                    if policy == "skip":
                        self.r.skipped_present += 1
                        self._record(item, keep, folder, "present")
                        return
                    # replace: the other copies go, and only copies that restores created (never the user's items)
                    extra = [i for i in linked if i != keep and i != own and i in self._made_by.get(item, ())]
                    if keep in same:
                        await self._delete(folder, extra)
                        self.r.skipped_present += 1
                        self._record(item, keep, folder, "present")
                        return
        data = await self._io(lambda: self.repo.read_content(row["sha256"], row["chunks"], row["size"], item=item))
        if keep is not None:
            await self._update(ex, folder, keep, data, size, sha)
            await self._delete(folder, extra)
            self.r.replaced += 1
            status, made = "replaced", keep
        else:
            made = await self._create(ex, folder, data, size, sha)
            status = "created"
        self.r.restored += 1
        self.r.bytes_uploaded += len(data)
        self._record(item, made, folder, status)

    async def _create(self, ex: Any, folder: str, data: bytes, size: int, sha: str) -> str:
        """Import ``data`` as a new item of ``folder``; an import whose answer was lost is looked for among the
        folder's items that are new since it was sent (twice, a moment apart) before it is sent again."""
        from mailpipe.graph.errors import TransientError

        before = set((await self._folder(folder)).items)
        for attempt in range(2):
            try:
                new_id, ck = await self._import(ex, folder, data)
                self._made(folder, new_id, size, ck, sha)
                return new_id
            except TransientError:
                for _ in range(2):
                    await asyncio.sleep(self.s.item_retry_delay)
                    async with self._claim_locks.setdefault(folder, asyncio.Lock()):  # looked for and claimed at once
                        f = await self._folder(folder, fresh=True)
                        found = await self._same_stream(folder, size, sha, set(f.items) - before - self._claimed)
                        if found:
                            self._made(folder, found[0], size, f.items[found[0]][1], sha)
                            return found[0]
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _update(self, ex: Any, folder: str, item_id: str, data: bytes, size: int, sha: str) -> None:
        """Import ``data`` over ``item_id`` (update mode, its current change key): the item becomes the stored one,
        keeping its id. A stale change key (the item changed meanwhile) or a lost answer: the folder is listed again
        and the update sent again unless the item already is the stored one."""
        from mailpipe.graph.errors import GraphError, TransientError

        for attempt in range(3):
            f = await self._folder(folder, fresh=attempt > 0)
            if item_id not in f.items:
                raise GraphError(f"item {item_id} left the target folder while it was being replaced",
                                 status=404, code="ErrorItemNotFound")
            if attempt and await self._same_stream(folder, size, sha, {item_id}):
                break
            try:
                _, ck = await self._import(ex, folder, data, mode="update", item_id=item_id,
                                           change_key=f.items[item_id][1])
                self._made(folder, item_id, size, ck, sha, new=False)
                return
            except GraphError as e:
                if attempt == 2 or not (isinstance(e, TransientError) or e.code == "ErrorIrresolvableConflict"):
                    raise
        f = self._index[folder]
        self._made(folder, item_id, size, f.items[item_id][1], sha, new=False)

    async def _import(self, ex: Any, folder: str, data: bytes, **kw: Any) -> tuple[str, str | None]:
        """One POST to the import URL; a new session once when the URL's own token is refused (401)."""
        from mailpipe.graph.errors import ForbiddenError

        for attempt in range(2):
            session = await self._import_session()
            try:
                return await ex.import_item(session, folder, data, **kw)
            except ForbiddenError as e:  # the import URL's own token expired (401): a new session, once
                if attempt or e.status != 401:
                    raise
                await self._import_session(renew=True)
        raise AssertionError("unreachable")

    async def _delete(self, folder: str, ids: list[str]) -> None:
        """``replace``: the other copies restores made of an item, soft-deleted (recoverable) once the one kept
        is as backed up."""
        for i in ids:
            await self._ex.delete_item(folder, i)
            self._gone.add(i)
            f = self._index.get(folder)
            if f is not None:
                f.discard(i)

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
