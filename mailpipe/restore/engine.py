"""The restore engine: a snapshot (or part of it) back into a mailbox, resumable and paced.

1. **Choose**: the snapshot (an id, ``latest``, or the newest committed at or before ``--at``) and its
   items (folders and their subfolders, item ids, a received-time range).
2. **Plan**: per source folder, where its items go — a new folder ``Restored <snapshot time>`` (or
   ``--into NAME``) under the mailbox root with the original tree beneath it, or the original folders
   (``--in-place``: well-known folders by their well-known name, others by path; missing ones created).
   With ``--dry-run`` the plan (items and bytes per folder, the expected duration) is all.
3. **Folders**: created (or found: a second create answers 409) parent first.
4. **What is there**: each target folder is listed once — ``internetMessageId``, subject, sent time and
   the restore tag property of every message — to find collisions and what an earlier, interrupted run
   of this very restore already created (every message a restore creates carries
   ``<restore id>:<source item id>`` in :data:`~mailpipe.restore.convert.TAG_PROPERTY`).
5. **Items**, by ``limit + 2`` workers through the target mailbox's limiter and upload budget: the
   content is read from the repository (verified), converted (:mod:`mailpipe.restore.convert`), created
   as JSON with the tag, then its attachments (≤ 3 MB one POST, larger through an upload session).
   Progress is checkpointed in the repository every few seconds; a run started again skips what is
   recorded done, completes what it finds half-made (the tag tells), and never creates a second copy —
   a create that fails ambiguously (a timeout, a reset) is looked up by its tag before it is tried again.

One restore at a time per restore id (a lease, like backups). docs/RESTORE.md has the details.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable

from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.graph.errors import GraphError
from mailpipe.restore.api import FolderPlan, ProgressCallback, RestoreRequest, RestoreResult
from mailpipe.restore.convert import MAX_JSON_BYTES, TAG_PROPERTY, Attachment, RestoreMessage, convert, fingerprint
from mailpipe.settings import Settings

log = logging.getLogger("mailpipe.restore")

WELL_KNOWN = {  # well-known folder name → its English display name (a fallback when the source is gone)
    "inbox": "Inbox", "drafts": "Drafts", "sentitems": "Sent Items", "deleteditems": "Deleted Items",
    "junkemail": "Junk Email", "archive": "Archive", "outbox": "Outbox",
}
STORE_THREADS = 8
PROGRESS_SECONDS = 5.0
PROGRESS_COMPACT_PARTS = 64   # progress parts merged into one every so often: a resume reads few objects
MAX_FAILED_LISTED = 1000      # failed items listed in the result (all are counted)


def _restore_id(tenant: str, source: str, target: str, req: RestoreRequest) -> str:
    """A restore's identity: the request *as given* (``latest`` stays ``latest``), so that the same command
    started again is the same restore — it continues from the snapshot and folder its first run pinned in
    ``plan.json``, even after a backup has committed a newer snapshot meanwhile."""
    key = json.dumps([tenant, source, target, req.snapshot, str(req.at), sorted(f.casefold() for f in req.folders),
                      sorted(req.items), str(req.since), str(req.until), req.into, req.in_place, req.collisions])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def choose_snapshot(repo: Any, user_id: str, req: RestoreRequest) -> Any:
    from mailpipe.repo.repository import RepositoryError

    if req.at is not None:
        at = req.at if req.at.tzinfo else req.at.replace(tzinfo=timezone.utc)
        older = [s for s in repo.list_snapshots(user_id) if s.committed_at <= at]
        if not older:
            raise RepositoryError(f"no snapshot of {req.upn} committed at or before {at.isoformat()}")
        return older[-1]
    return repo.read_snapshot(user_id, req.snapshot or "latest")


def _selected(row: dict[str, Any], req: RestoreRequest, prefixes: list[str]) -> bool:
    if req.items and row["item_id"] not in req.items:
        return False
    if prefixes:
        path = "/".join(row.get("folder_path") or []).casefold()
        if not any(path == p or path.startswith(p + "/") for p in prefixes):
            return False
    received = row.get("received_at")
    if req.since and (received is None or received < req.since):
        return False
    if req.until and (received is None or received >= req.until):
        return False
    return True


def _attachment_json(att: Attachment) -> dict[str, Any]:
    from mailpipe.graph.write import file_attachment

    if att.kind == "item":
        return {"@odata.type": "#microsoft.graph.itemAttachment", "name": att.name, "item": att.item}
    return file_attachment(att.name, att.content_type, att.data, is_inline=att.is_inline, content_id=att.content_id)


def _with_inline_attachments(rm: RestoreMessage) -> tuple[dict[str, Any], list[Attachment]]:
    """The create request with as many small attachments as fit below Graph's request size (they are
    created with the message, atomically), and the attachments left for separate requests."""
    from mailpipe.graph.write import SMALL_ATTACHMENT

    budget = MAX_JSON_BYTES - len(json.dumps(rm.message))
    inline: list[dict[str, Any]] = []
    rest: list[Attachment] = []
    for att in rm.attachments:
        cost = (att.size * 4 // 3 + 1024) if att.kind == "file" else len(json.dumps(att.item)) + 1024
        if (att.kind == "item" or att.size < SMALL_ATTACHMENT) and cost <= budget:
            inline.append(_attachment_json(att))
            budget -= cost
        else:
            rest.append(att)
    return ({**rm.message, "attachments": inline} if inline else rm.message), rest


def _aware(d: datetime | None) -> datetime | None:
    return d if d is None or d.tzinfo else d.replace(tzinfo=timezone.utc)


class RestoreJob:
    def __init__(self, tenant: TenantConfig, repo: Any, pool: ThreadPoolExecutor, req: RestoreRequest,
                 settings: Settings, result: RestoreResult, progress: ProgressCallback | None, work: str) -> None:
        self.tenant = tenant
        self.repo = repo
        self.pool = pool
        self.req = req
        self.s = settings
        self.r = result
        self.progress = progress
        self.work = work
        self.prefixes: list[str] = []
        self.total = 0
        self.folder_paths: dict[str, tuple[str, ...]] = {}
        self.needed: list[tuple[str, ...]] = []          # source folder paths to recreate, parents first
        self.target_of: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.root: str | None = None
        self._ckpt: list[dict[str, Any]] = []
        self._ckpt_at = time.monotonic()
        self._progress_at = 0.0
        self._done_items = 0
        self._fatal: BaseException | None = None
        self._ckpt_parts = 0
        self.warnings = result.warnings

    async def _io(self, fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def _selected_batches(self) -> Any:
        """The selected manifest rows, a batch at a time (run in the pool)."""
        for b in self.repo.iter_manifest(self.source_uid, self.snap.snapshot_id, batch_size=2000, tmp_dir=self.work):
            yield [row for row in b.to_pylist() if _selected(row, self.req, self.prefixes)]

    # -- choose and plan ---------------------------------------------------------------------------------
    async def plan(self, pinned: dict[str, Any] | None = None) -> None:
        """Choose the snapshot and the items, and where they go. ``pinned``: the plan of an earlier run of
        this restore, whose snapshot and target folder are kept."""
        req, r = self.req, self.r
        self.source_uid = await self._io(lambda: self.repo.find_mailbox(req.upn))
        if self.source_uid is None:
            raise UserError(f"no backup of mailbox {req.upn!r} in {self.repo.store.describe()}")
        if pinned:
            self.snap = await self._io(lambda: self.repo.read_snapshot(self.source_uid, pinned["snapshot_id"]))
        else:
            self.snap = await self._io(lambda: choose_snapshot(self.repo, self.source_uid, req))
        r.snapshot_id = self.snap.snapshot_id
        table = await self._io(lambda: self.repo.read_folders(self.source_uid, self.snap.snapshot_id, tmp_dir=self.work))
        self.folder_paths = {f["folder_id"]: tuple(f["path"] or ()) for f in table.to_pylist()}
        prefixes = [f.strip("/").casefold() for f in req.folders]
        known_paths = {"/".join(p).casefold() for p in self.folder_paths.values()}
        for p in prefixes:
            if not any(k == p or k.startswith(p + "/") for k in known_paths):
                raise UserError(f"snapshot {self.snap.snapshot_id} of {req.upn} has no folder {p!r}")

        self.prefixes = prefixes
        # one pass over the manifest for the plan (counts and bytes per folder); the items are read again,
        # batch by batch, when they are restored: memory stays bounded whatever the mailbox's size
        per_path: dict[tuple[str, ...], list[int]] = {}
        found_items: set[str] = set()

        def count() -> None:
            for rows in self._selected_batches():
                for row in rows:
                    c = per_path.setdefault(tuple(row["folder_path"] or ()), [0, 0])
                    c[0] += 1
                    c[1] += int(row["size"])
                    if req.items:
                        found_items.add(row["item_id"])

        await self._io(count)
        missing = set(req.items) - found_items
        if missing:
            raise UserError(f"snapshot {self.snap.snapshot_id} of {req.upn} has no item(s) {', '.join(sorted(missing))}"
                            " (or they are outside the folders/dates asked for)")
        whole = not (req.folders or req.items or req.since or req.until)
        paths = set(self.folder_paths.values()) if whole else set(per_path)
        for p in list(paths):
            paths.update(p[:i] for i in range(1, len(p)))
        self.needed = sorted((p for p in paths if p), key=lambda p: (len(p), p))
        self.root = None if req.in_place else (pinned["root"] if pinned else req.into or
                                               f"Restored {self.snap.committed_at.astimezone(timezone.utc):%Y-%m-%d %H.%M.%S} UTC")
        r.target_root = self.root
        self.target_of = {p: (p if self.root is None else (self.root, *p)) for p in self.needed}
        r.folders = [FolderPlan(p, self.target_of[p], *per_path.get(p, (0, 0))) for p in self.needed]
        r.items_selected = self.total = sum(c[0] for c in per_path.values())
        r.bytes_selected = sum(c[1] for c in per_path.values())
        # the least time it can take: the request window, or Exchange's upload budget (150 MB / 5 min)
        from mailpipe.graph.write import UploadBudget

        budget = UploadBudget(self.tenant.limits.upload_bytes_per_5min_per_mailbox)
        per_second = self.tenant.limits.requests_per_10min_per_mailbox / 600
        r.expected_seconds = round(max(r.items_selected * 1.05 / per_second,
                                       budget.seconds_for(int(r.bytes_selected * 1.1))), 1)

    async def _resume_or_pin(self, target_id: str, rid: str, on_row: Callable[[dict[str, Any]], None] | None = None,
                             **plan_extra: Any) -> set[str]:
        """Continue restore ``rid`` from the snapshot and folder its first run pinned (returns the source
        items it already restored; ``on_row`` sees each of its progress rows as they are read), or pin them now:
        the plan names the snapshot (which forget then keeps)."""
        req, r = self.req, self.r
        plan = await self._io(lambda: self.repo.read_restore_plan(target_id, rid))
        done: set[str] = set()
        if not plan:
            await self._io(lambda: self.repo.write_restore_plan(target_id, rid, {
                "request": {k: v for k, v in req.__dict__.items()}, "source": self.source_uid,
                "snapshot_id": self.snap.snapshot_id, "target": target_id, "root": self.root,
                "started_at": datetime.now(timezone.utc).isoformat(), "items": r.items_selected, **plan_extra}))
            return done
        if (plan.get("snapshot_id"), plan.get("root")) != (self.snap.snapshot_id, self.root):
            await self.plan(pinned=plan)  # the snapshot and folder the first run chose
        self.warnings.append(f"continuing restore {rid}, started {str(plan.get('started_at'))[:19]} UTC "
                             f"from snapshot {self.snap.snapshot_id}")

        def read_done() -> None:
            for row in self.repo.iter_restore_progress(target_id, rid):
                done.add(row["source"])
                if on_row is not None:
                    on_row(row)

        await self._io(read_done)
        return done

    # -- run -------------------------------------------------------------------------------------------------
    async def run(self, graph_options: dict[str, Any]) -> None:
        """Resolve the target, take this restore's lease, restore (:meth:`_restore`), and — whatever happened —
        record the progress, then give the lease back (a progress record that cannot be written fails the run,
        never keeps its lease until it expires)."""
        from mailpipe.graph import GraphTenant

        req, r = self.req, self.r
        async with GraphTenant.from_config(self.tenant.for_restore(), self.s, **graph_options) as graph:
            target = await graph.resolve_mailbox(r.target)
            self.target_uid = target.id
            rid = r.restore_id = _restore_id(self.tenant.name, self.source_uid, target.id, req)
            mb = graph.mailbox(target.id, target.upn)
            writer = await self._writer(mb)
            lease = await self._lease_io(lambda: self.repo.acquire_lease(
                target.id, target.upn, self.s.lease_seconds, name=f"restores/{rid}/lease.json",
                what="run of this restore"))
            renewer = asyncio.create_task(self._renew(lease))
            try:
                await self._restore(graph, mb, writer, rid)
            finally:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                try:
                    await self._flush(force=True)
                finally:
                    try:
                        await self._lease_io(lease.release)
                    finally:
                        await writer.aclose()
                        r.requests = mb.stats.requests
                        r.throttled = mb.stats.throttled
                        r.upload_wait_seconds = _waited(writer)
                        await graph.release(mb.user_id)
            if self._fatal is not None:
                raise self._fatal
            await self._io(lambda: self.repo.write_restore_result(target.id, rid, {
                k: v for k, v in r.__dict__.items() if k != "folders"}))

    async def _writer(self, mb: Any) -> Any:
        """What writes into the target mailbox (with ``budget``, the upload budget, and ``aclose``)."""
        from mailpipe.graph.write import MailboxWriter

        return MailboxWriter(mb)

    async def _restore(self, graph: Any, mb: Any, writer: Any, rid: str) -> None:
        done = await self._resume_or_pin(self.target_uid, rid)
        folder_ids = await self._folders(writer, graph, mb)
        existing = await self._existing(writer, {folder_ids[p] for p in self.target_of.values()}, rid)
        await self._items(writer, folder_ids, existing, done, rid)

    async def _lease_io(self, fn: Any) -> Any:
        """Lease calls on the default executor: never queued behind the store pool's reads."""
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def _renew(self, lease: Any) -> None:
        from mailpipe.repo.repository import LeaseBusy

        while True:
            await asyncio.sleep(lease.seconds / 3)
            try:
                await self._lease_io(lease.renew)
            except LeaseBusy as e:  # another run of this restore took over: stop creating (no duplicates)
                self._fatal = e
                return
            except Exception as e:  # unreachable: the next renewal tries again
                log.warning("restore %s: could not renew its lease: %s", self.r.restore_id, e)

    async def _folders(self, writer: Any, graph: Any, mb: Any) -> dict[tuple[str, ...], str]:
        """Target folder id of every target path (created when missing), parents first."""
        ids: dict[tuple[str, ...], str] = {}
        if self.root is not None:
            ids[(self.root,)] = (await writer.ensure_folder(None, self.root))["id"]
        else:
            # well-known folders of the source (so that "Posteingang" still lands in the target's Inbox)
            source_wk = await self._source_well_known(graph)
            for wk in WELL_KNOWN:
                if wk in source_wk:
                    f = await writer.get_folder(wk)
                    if f is not None:
                        ids[source_wk[wk]] = f["id"]
        for p in self.needed:
            t = self.target_of[p]
            if t in ids:
                continue
            parent = ids.get(t[:-1]) if len(t) > 1 else None
            ids[t] = (await writer.ensure_folder(parent, t[-1]))["id"]
        return ids

    async def _source_well_known(self, graph: Any) -> dict[str, tuple[str, ...]]:
        """Well-known name → the path of that folder in the snapshot: asked of the source mailbox (its folder
        ids are the snapshot's), or by English display name when it is gone."""
        from mailpipe.graph.write import MailboxWriter

        out: dict[str, tuple[str, ...]] = {}
        try:
            source = graph.mailbox(self.source_uid, self.req.upn)
            w = MailboxWriter(source)
            for wk in WELL_KNOWN:
                f = await w.get_folder(wk)
                if f is not None and f.get("id") in self.folder_paths:
                    out[wk] = self.folder_paths[f["id"]]
            if self.source_uid != self.target_uid:  # (the same mailbox: its client is the writer's)
                await graph.release(self.source_uid)
        except GraphError as e:
            log.info("restore: source mailbox %s not readable (%s): well-known folders by name", self.req.upn, e)
        if not out:
            by_name = {WELL_KNOWN[wk].casefold(): wk for wk in WELL_KNOWN}
            for p in self.folder_paths.values():
                if len(p) == 1 and p[0].casefold() in by_name:
                    out[by_name[p[0].casefold()]] = p
        return out

    async def _existing(self, writer: Any, folder_ids: set[str], rid: str) -> dict[str, Any]:
        """What the target folders hold: messages this restore made (by source item), and the others' keys
        (hashed to keep memory per message small; with ids only under ``replace``, which deletes them)."""
        ours: dict[str, tuple[str, str]] = {}           # source item id → (created id, folder id)
        by_key: dict[int, list[str] | None] = {}        # hash(folder id, internetMessageId or fingerprint) → ids
        keep_ids = self.req.collisions == "replace"
        for fid in folder_ids:
            async for page in writer.list_messages(fid, ["id", "internetMessageId", "subject", "sentDateTime"],
                                                   TAG_PROPERTY):
                for m in page:
                    tag = next((p.get("value") for p in m.get("singleValueExtendedProperties") or []
                                if str(p.get("id", "")).casefold() == TAG_PROPERTY.casefold()), None)
                    if isinstance(tag, str) and tag.startswith(f"{rid}:"):
                        ours[tag.split(":", 1)[1]] = (m["id"], fid)
                        continue
                    key = hash((fid, m.get("internetMessageId") or fingerprint(m.get("subject"), m.get("sentDateTime"))))
                    if keep_ids:
                        by_key.setdefault(key, []).append(m["id"])  # type: ignore[union-attr]
                    else:
                        by_key[key] = None
        return {"ours": ours, "by_key": by_key}

    async def _items(self, writer: Any, folder_ids: dict[tuple[str, ...], str], existing: dict[str, Any],
                     done: set[str], rid: str) -> None:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        nworkers = self.tenant.limits.concurrent_requests_per_mailbox + 2

        async def worker() -> None:
            while (row := await queue.get()) is not None:
                if self._fatal is not None:
                    continue  # drain: the restore is stopping
                try:
                    await self._one(writer, row, folder_ids, existing, done, rid)
                except Exception as e:  # this item fails; the restore goes on (and a new run retries it)
                    if not isinstance(e, (GraphError, UserError)):
                        log.exception("restore of item %s failed", row["item_id"])
                    self._failed(row, str(e))
                self._done_items += 1
                try:
                    await self._flush()
                except Exception as e:  # the repository is away: the rows stay queued for the next flush
                    log.warning("restore %s: could not record its progress (will retry): %s", rid, e)
                self._report(writer)

        workers = [asyncio.create_task(worker()) for _ in range(nworkers)]
        try:
            batches = await self._io(self._selected_batches)
            while self._fatal is None and (rows := await self._io(lambda: next(batches, None))) is not None:
                for row in rows:
                    await queue.put(row)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _failed(self, row: dict[str, Any], reason: str) -> None:
        self.r.failed_count += 1
        if len(self.r.failed) < MAX_FAILED_LISTED:
            self.r.failed.append({"item_id": row["item_id"], "folder_path": row.get("folder_path"),
                                  "reason": reason[:500]})

    async def _one(self, writer: Any, row: dict[str, Any], folder_ids: dict[tuple[str, ...], str],
                   existing: dict[str, Any], done: set[str], rid: str) -> None:
        from mailpipe.graph.errors import TransientError

        item = row["item_id"]
        if item in done:
            self.r.resumed += 1
            return
        fid = folder_ids[self.target_of[tuple(row["folder_path"] or ())]]
        data = await self._io(lambda: self.repo.read_content(row["sha256"], row["chunks"], row["size"],
                                                             item=f"item {item}"))
        tag = f"{rid}:{item}"
        rm = convert(data, received_at=row.get("received_at"), is_read=row.get("is_read"),
                     flag_status=row.get("flag_status"), categories=row.get("categories"), tag=tag)
        for loss in rm.losses:
            self.r.losses[loss.split(" (")[0]] = self.r.losses.get(loss.split(" (")[0], 0) + 1
        key = hash((fid, rm.message.get("internetMessageId") or fingerprint(rm.message.get("subject"), rm.sent_at)))
        collides = key in existing["by_key"]
        ours = existing["ours"].get(item)
        if ours is not None:  # made by an earlier run of this restore, which died before recording it
            await self._attachments(writer, ours[0], rm.attachments, resume=True)
            await self._replace(writer, existing["by_key"].get(key))
            self.r.completed += 1
            self._record(item, ours[0], fid, "done")
            return
        if collides and self.req.collisions == "skip":
            self.r.skipped_present += 1
            self._record(item, "", fid, "present")
            return
        # small attachments travel with the message: one request for most messages
        message, rest = _with_inline_attachments(rm)
        created = None
        last: Exception | None = None
        for _ in range(3):
            try:
                created = (await writer.create_message(fid, message))["id"]
                break
            except TransientError as e:  # applied or not? the tag says (Exchange may still be committing it)
                last = e
                for _ in range(2):
                    await asyncio.sleep(self.s.item_retry_delay)
                    found = await writer.find_tagged(fid, TAG_PROPERTY, tag)
                    if found:
                        created = found[0]["id"]
                        for extra in found[1:]:  # made twice by ambiguous retries: keep one
                            await writer.delete_message(extra["id"])
                        break
                if created is not None:
                    break
        if created is None:
            raise last or TransientError("could not create the message")
        self.r.bytes_uploaded += len(json.dumps(message))
        await self._attachments(writer, created, rest, resume=False)
        if collides and self.req.collisions == "replace":
            await self._replace(writer, existing["by_key"].get(key))
            self.r.replaced += 1
        self.r.restored += 1
        self._record(item, created, fid, "done")

    async def _replace(self, writer: Any, old_ids: list[str] | None) -> None:
        """``--collisions replace``: the colliding items go once the restored one exists (not before)."""
        if self.req.collisions == "replace":
            for old in old_ids or ():
                await writer.delete_message(old)

    async def _attachments(self, writer: Any, message_id: str, attachments: list[Attachment], *,
                           resume: bool) -> None:
        """Add ``attachments`` to the message; with ``resume`` (or after an ambiguous failure), those
        already there (by name, counted) are not added again."""
        from mailpipe.graph.errors import TransientError
        from mailpipe.graph.write import SMALL_ATTACHMENT

        present: dict[str, int] = {}

        async def refresh() -> None:
            present.clear()
            for a in await writer.list_attachments(message_id):
                present[str(a.get("name"))] = present.get(str(a.get("name")), 0) + 1

        if resume and attachments:
            await refresh()
        wanted: dict[str, int] = {}
        for att in attachments:
            wanted[att.name] = wanted.get(att.name, 0) + 1
            if present.get(att.name, 0) >= wanted[att.name]:
                continue  # already there
            if att.kind == "file" and att.size >= SMALL_ATTACHMENT:
                item = {"name": att.name, "contentType": att.content_type, "isInline": att.is_inline}
                if att.content_id:
                    item["contentId"] = att.content_id
                await writer.upload_attachment(message_id, item, att.data)
                self.r.bytes_uploaded += att.size
                continue
            payload = _attachment_json(att)
            try:
                await writer.add_attachment(message_id, payload)
            except TransientError:
                await refresh()  # did it land?
                if present.get(att.name, 0) < wanted[att.name]:
                    await writer.add_attachment(message_id, payload)
            self.r.bytes_uploaded += att.size

    # -- progress ------------------------------------------------------------------------------------------------
    def _record(self, source: str, created: str, folder: str, status: str) -> None:
        self._ckpt.append({"source": source, "created": created, "folder": folder, "status": status})

    async def _flush(self, force: bool = False) -> None:
        if not self._ckpt or not hasattr(self, "target_uid"):
            return
        if not force and len(self._ckpt) < self.s.checkpoint_items and \
                time.monotonic() - self._ckpt_at < self.s.checkpoint_seconds:
            return
        rows, self._ckpt = self._ckpt, []
        self._ckpt_at = time.monotonic()
        rid = self.r.restore_id
        try:
            await self._io(lambda: self.repo.write_restore_progress(self.target_uid, rid, rows))
        except BaseException:
            self._ckpt = rows + self._ckpt  # recorded by the next flush
            raise
        self._ckpt_parts += 1
        if self._ckpt_parts % PROGRESS_COMPACT_PARTS == 0:
            await self._io(lambda: self.repo.compact_restore_progress(self.target_uid, rid))

    def _report(self, writer: Any) -> None:
        if self.progress is None or time.monotonic() - self._progress_at < PROGRESS_SECONDS \
                and self._done_items < self.total:
            return
        self._progress_at = time.monotonic()
        self.progress({"phase": "items", "done": self._done_items, "total": self.total, "restored": self.r.restored,
                       "bytes_uploaded": self.r.bytes_uploaded, "upload_wait_seconds": _waited(writer),
                       "throttled": writer.mb.stats.throttled, "failed": self.r.failed_count})


def _waited(writer: Any) -> float:
    """Seconds the writer spent pacing for the upload budget (a fidelity restore's budget is made on its first
    import)."""
    return round(writer.budget.waited, 1) if writer.budget is not None else 0.0
