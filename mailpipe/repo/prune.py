"""``mailpipe prune``: delete what no committed snapshot needs — safely while backups run, with no lock service.

The protocol (docs/FORMAT.md, "Prune", says why it is safe) has two passes, at least ``safety_seconds``
apart, in the spirit of duplicacy's two-step fossil collection and kopia's GC with minimum ages:

1. **Plan.** Every committed snapshot's manifest and every checkpoint is read; a pack none of whose chunks
   is referenced (or one that is mostly unreferenced, or small) and that is older than ``safety_seconds``
   is written into a plan, ``prune/<id>.json``, with the time it was made. Nothing is deleted. From the
   moment a plan exists, every backup that starts (that takes its mailbox lease) treats the plan's packs
   as absent: it stores again any chunk it needs from them instead of reusing it, and drops checkpoint
   rows that use them.
2. **Delete**, in a later run, once ``safety_seconds`` have passed since the plan **and** no mailbox lease
   acquired before the plan (plus a margin for clocks) is still live — every backup that could have
   decided to reuse a chunk of a planned pack without seeing the plan has ended. Then references are read
   again (snapshots committed since, checkpoints), the chunks of planned packs that are referenced now are
   copied into new packs, the index is rewritten without the planned packs, and the packs are deleted.

A prune killed at any point leaves a whole repository: copies come before index changes, index changes
before deletions, the plan is removed last, and a pass that is run again does the same thing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from mailpipe.errors import UserError
from mailpipe.repo.packs import PACK_TARGET, PackFormatError, decode_index, encode_index, index_key, pack_key
from mailpipe.repo.repository import IntegrityError, LeaseBusy, Repository, mailbox_dir
from mailpipe.repo.store import KeyNotFound, ObjectLocked

SAFETY_SECONDS = 3600.0  # packs younger are never planned; a plan's second pass waits at least this long
CLOCK_MARGIN = 600.0     # leases acquired up to this long after a plan are waited for too (clock skew)
REPACK_DEAD = 0.25       # a pack whose unreferenced share is at least this is repacked
SMALL_PACK = PACK_TARGET // 8  # packs smaller than this (a checkpoint flushed them early) are merged
LEASE_KEY = "prune-lease.json"


class PruneRefused(UserError):
    """Prune cannot tell what is referenced (a damaged snapshot), so it deletes nothing."""


@dataclass
class PruneResult:
    dry_run: bool = False
    mailboxes: int = 0
    snapshots: int = 0
    referenced_chunks: int = 0
    packs: int = 0
    pack_bytes: int = 0
    planned_packs: int = 0          # new plan (first pass)
    planned_bytes: int = 0
    plan_id: str | None = None
    deleted_packs: int = 0          # second pass
    freed_bytes: int = 0
    repacked_chunks: int = 0
    repacked_bytes: int = 0
    orphan_packs_deleted: int = 0   # packs no index lists (a writer died between a pack and its index)
    lost_packs_unindexed: int = 0   # packs the index listed that are gone: their entries dropped
    retained_packs: int = 0         # Object Lock: still locked, kept
    locks_extended: int = 0
    leftovers_removed: int = 0
    damage_markers_removed: int = 0
    waiting: list[str] = field(default_factory=list)  # plans not yet deletable, and why
    busy_mailboxes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mb = 1024 * 1024
        head = "prune (dry run: nothing written)" if self.dry_run else "prune"
        lines = [f"{head}: {self.mailboxes} mailboxes, {self.snapshots} snapshots, {self.referenced_chunks} chunks "
                 f"referenced, {self.packs} packs ({self.pack_bytes / mb:.1f} MiB)"]
        if self.deleted_packs or self.repacked_chunks or self.orphan_packs_deleted:
            lines.append(f"  deleted {self.deleted_packs} packs ({self.freed_bytes / mb:.1f} MiB freed), copied "
                         f"{self.repacked_chunks} referenced chunks ({self.repacked_bytes / mb:.1f} MiB) into new "
                         f"packs, {self.orphan_packs_deleted} unindexed leftover packs deleted")
        if self.planned_packs:
            verb = "would plan" if self.dry_run else "planned"
            lines.append(f"  {verb} {self.planned_packs} packs ({self.planned_bytes / mb:.1f} MiB) for deletion"
                         + (f" (plan {self.plan_id})" if self.plan_id else "")
                         + ": a later prune deletes them, once the safety delay has passed and every backup "
                           "that started before the plan has ended")
        lines += [f"  waiting: {w}" for w in self.waiting]
        if self.retained_packs:
            lines.append(f"  {self.retained_packs} packs kept: still under Object Lock retention")
        if self.locks_extended:
            lines.append(f"  Object Lock retention extended on {self.locks_extended} objects still in use")
        if self.leftovers_removed or self.damage_markers_removed:
            lines.append(f"  removed {self.leftovers_removed} leftovers of dead backups and "
                         f"{self.damage_markers_removed} damage markers of chunks nothing uses")
        if self.busy_mailboxes:
            lines.append(f"  leftovers not collected in {len(self.busy_mailboxes)} mailboxes being backed up")
        if not (self.planned_packs or self.deleted_packs or self.waiting or self.orphan_packs_deleted):
            lines.append("  nothing to prune")
        return "\n".join(lines)


class _Refs:
    """The set of referenced chunk ids, on disk (bounded memory for millions of chunks)."""

    def __init__(self, work: str | None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="mailpipe-prune-", suffix=".sqlite", dir=work)
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE refs(chunk BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def add(self, chunks: list[list[str]]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO refs VALUES (?)",
                            ((bytes.fromhex(h),) for cs in chunks if cs for h in cs))

    def done(self) -> None:
        self.db.execute("COMMIT")

    def __contains__(self, h: str) -> bool:
        return self.db.execute("SELECT 1 FROM refs WHERE chunk=?", (bytes.fromhex(h),)).fetchone() is not None

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)


def _parse_time(v: Any) -> datetime | None:
    try:
        d = datetime.fromisoformat(str(v))
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def prune(repo: Repository, *, dry_run: bool = False, now: datetime | None = None,
          safety_seconds: float = SAFETY_SECONDS, clock_margin: float | None = None,
          lease_seconds: float = 600.0, progress: Callable[[str], None] | None = None) -> PruneResult:
    """One prune run: the second pass of every plan that is due, then a new plan (first pass), then the
    leftovers. ``dry_run``: report what a run would do, write nothing."""
    t0 = time.monotonic()
    now = now or datetime.now(timezone.utc)
    margin = min(CLOCK_MARGIN, safety_seconds) if clock_margin is None else clock_margin
    say = progress or (lambda _m: None)
    res = PruneResult(dry_run=dry_run)
    lease = None
    if not dry_run:
        try:
            lease = repo.acquire_lease("", "prune", lease_seconds, what="prune of this repository", key=LEASE_KEY)
        except LeaseBusy as e:
            raise UserError(str(e)) from None
    refs: _Refs | None = None
    try:
        repo.sync_index()
        plans = repo.prune_plans()
        # (a) which plans may be completed: decided BEFORE references are read (see the module docstring)
        leases = repo.live_leases()
        due: list[dict[str, Any]] = []
        for plan in plans:
            created = _parse_time(plan.get("created_at"))
            if created is None:
                res.waiting.append(f"plan {plan['key']} is unreadable; left alone")
                continue
            if now < created + timedelta(seconds=safety_seconds):
                res.waiting.append(f"plan {plan.get('id')}: its packs are deleted from "
                                   f"{(created + timedelta(seconds=safety_seconds)).isoformat(timespec='minutes')}")
                continue
            older = [le for le in leases
                     if (_parse_time(le.get("acquired_at")) or now) < created + timedelta(seconds=margin)]
            if older:
                res.waiting.append(f"plan {plan.get('id')}: waiting for {len(older)} backup(s) that started before "
                                   f"it (e.g. {older[0].get('upn')}, since {str(older[0].get('acquired_at'))[:19]})")
                continue
            due.append(plan)
        # (b) what is referenced now: every committed snapshot and every checkpoint
        refs = _Refs(repo.tmp_dir)
        _read_references(repo, refs, res, say)
        refs.done()
        res.referenced_chunks = refs.count()
        repo.sync_index()
        packs = repo.index.packs()
        res.packs, res.pack_bytes = len(packs), sum(v or 0 for v in packs.values())
        # (c) second pass of the due plans
        for plan in due:
            _complete_plan(repo, plan, refs, res, dry_run, say)
        repo.sync_index()
        # (d) first pass: a new plan
        _new_plan(repo, refs, res, now, safety_seconds, dry_run, say)
        # (e) what dead writers left, unindexed packs, damage markers of chunks nothing uses
        _leftovers(repo, refs, res, now, safety_seconds, dry_run, lease_seconds)
    finally:
        if refs is not None:
            refs.close()
        if lease is not None:
            lease.release()
    res.seconds = round(time.monotonic() - t0, 2)
    return res


def _read_references(repo: Repository, refs: _Refs, res: PruneResult, say: Callable[[str], None]) -> None:
    dirs = sorted({k.split("/")[1] for k in repo.store.list("mailboxes") if k.count("/") >= 2})
    by_dir = {mailbox_dir(uid): uid for uid, _ in repo.list_mailboxes()}
    for d in dirs:
        uid = by_dir.get(d, d)
        res.mailboxes += 1
        for sid, info, why in repo.scan_snapshots(uid):
            if info is None:
                raise PruneRefused(f"snapshot {sid} of mailbox {uid} is unreadable ({why}): prune cannot tell what "
                                   "it references, so it deletes nothing. Run `mailpipe check`, then forget or "
                                   "repair that snapshot.")
            try:
                for b in repo.iter_manifest(uid, sid, columns=["chunks"], tmp_dir=repo.tmp_dir):
                    refs.add(b.column("chunks").to_pylist())
                for b in repo.iter_fidelity(uid, sid, columns=["chunks"], tmp_dir=repo.tmp_dir):  # export API streams
                    refs.add(b.column("chunks").to_pylist())
            except IntegrityError as e:
                raise PruneRefused(f"snapshot {sid} of mailbox {uid} is damaged ({e}): prune deletes nothing until "
                                   "it is repaired or forgotten (`mailpipe check`)") from None
            res.snapshots += 1
        for key in repo.list_checkpoints(uid):
            try:
                for b in repo._iter_parquet(key, 10_000, ["chunks"], tmp_dir=repo.tmp_dir):
                    refs.add(b.column("chunks").to_pylist())
            except IntegrityError:
                continue  # a damaged part is not reused by backups either
        say(uid)


def _complete_plan(repo: Repository, plan: dict[str, Any], refs: _Refs, res: PruneResult, dry_run: bool,
                   say: Callable[[str], None]) -> None:
    doomed = set(plan.get("packs") or ())
    indexed = repo.index.packs()
    for pid in sorted(doomed):
        if pid not in indexed:
            continue
        data = None
        for h, off, n in repo.index.pack_blobs(pid):
            if h not in refs or any(p not in doomed for p, _, _ in repo.index.locations(h)):
                continue  # unreferenced, or another copy stays
            if dry_run:
                res.repacked_chunks += 1
                res.repacked_bytes += n
                continue
            if data is None:
                data = repo.store.get_bytes(pack_key(pid))
            blob = data[off:off + n]
            repo._piece(h, blob, f"pack {pid}")  # copy only what verifies
            repo._add_blob(h, blob, False)
            res.repacked_chunks += 1
            res.repacked_bytes += n
    if not dry_run:
        repo.flush()  # the copies are stored and indexed before anything goes
        _rewrite_index_without(repo, doomed)
    for pid in sorted(doomed):
        size = indexed.get(pid) or 0
        if dry_run:
            res.deleted_packs += int(pid in indexed)
            res.freed_bytes += size
            continue
        try:
            repo.store.delete(pack_key(pid))
            res.deleted_packs += 1
            res.freed_bytes += size
        except ObjectLocked:
            res.retained_packs += 1
    if not dry_run:
        repo.store.delete(plan["key"])
    say(f"plan {plan.get('id')} done")


def _rewrite_index_without(repo: Repository, doomed: set[str]) -> None:
    """Every index file that lists a doomed pack is replaced by one without it (new file first)."""
    for name in sorted(repo.index.files_of_packs(doomed)):
        try:
            packs = decode_index(repo.store.get_bytes(index_key(name)), repo._unseal)
        except (KeyNotFound, PackFormatError, IntegrityError):
            continue
        keep = [p for p in packs if p["id"] not in doomed]
        if keep:
            new = encode_index(keep, repo._seal)
            repo.store.put_bytes(index_key(hashlib.sha256(new).hexdigest()), new)
        repo.store.delete(index_key(name))
    repo.sync_index()


def _new_plan(repo: Repository, refs: _Refs, res: PruneResult, now: datetime, safety_seconds: float,
              dry_run: bool, say: Callable[[str], None]) -> None:
    planned_already = repo.excluded
    cutoff = now - timedelta(seconds=safety_seconds)
    chosen: list[str] = []
    small: list[tuple[str, int]] = []
    lock_cfg = getattr(repo.store, "object_lock", None)
    for pid, size in sorted(repo.index.packs().items()):
        if pid in planned_already:
            continue
        blobs = repo.index.pack_blobs(pid)
        live = dead = 0
        for h, _, n in blobs:
            # a chunk counts as live in one pack only: the copy in the first pack (by id) that is not planned
            keeper = min((p for p, _, _ in repo.index.locations(h) if p not in planned_already), default=pid)
            if h in refs and keeper == pid:
                live += n
            else:
                dead += n
        written = _pack_written_at(repo, pid)
        old_enough = written is not None and written <= cutoff
        if lock_cfg is not None and live and not dry_run:
            res.locks_extended += _extend_lock(repo, pid, now, lock_cfg)
        if not old_enough:
            continue
        if lock_cfg is not None and (repo.store.retained_until(pack_key(pid)) or now) > now:
            res.retained_packs += 1  # still locked: planning it would only copy its live chunks for nothing
            continue
        total = live + dead
        if total == 0 or live == 0 or dead / total >= REPACK_DEAD:
            chosen.append(pid)
        elif (size or total) < SMALL_PACK:
            small.append((pid, size or total))
    if len(small) >= 2:
        chosen += [p for p, _ in small]
    if not chosen:
        return
    sizes = repo.index.packs()
    res.planned_packs = len(chosen)
    res.planned_bytes = sum(sizes.get(p) or 0 for p in chosen)
    if dry_run:
        return
    plan_id = now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)
    repo.write_json(f"prune/{plan_id}.json", {"id": plan_id, "created_at": datetime.now(timezone.utc).isoformat(),
                                              "packs": sorted(chosen), "safety_seconds": safety_seconds})
    res.plan_id = plan_id
    say(f"planned {len(chosen)} packs")


def _pack_written_at(repo: Repository, pid: str) -> datetime | None:
    info = repo.index.pack_info(pid)
    return _parse_time(info[1]) if info and info[1] else None


def _extend_lock(repo: Repository, pid: str, now: datetime, lock_cfg: Any) -> int:
    """Object Lock: a pack still in use keeps at least half its retention ahead of it."""
    days = int(getattr(lock_cfg, "days", 0) or 0)
    if not days:
        return 0
    until = repo.store.retained_until(pack_key(pid))
    if until is not None and until >= now + timedelta(days=days / 2):
        return 0
    repo.store.extend_retention(pack_key(pid), now + timedelta(days=days))
    return 1


def _leftovers(repo: Repository, refs: _Refs, res: PruneResult, now: datetime, safety_seconds: float,
               dry_run: bool, lease_seconds: float) -> None:
    # packs the index lists that are gone (lost, deleted by hand): their entries are dropped, so that
    # readers stop trying them (chunks with no other copy are damage that check reports either way)
    present = {k.rsplit("/", 1)[-1] for k in repo.store.list("packs")}
    lost = {p for p in repo.index.packs() if p not in present}
    if lost:
        res.lost_packs_unindexed = len(lost)
        if not dry_run:
            _rewrite_index_without(repo, lost)
    # packs that no index lists, older than the safety age: a writer died between the pack and its index
    indexed = set(repo.index.packs())
    excluded_or_indexed = indexed | set(repo.excluded)
    for key in list(repo.store.list("packs")):
        pid = key.rsplit("/", 1)[-1]
        if pid in excluded_or_indexed or len(pid) != 64:
            continue
        age = _object_age(repo, key, now)
        if age is None or age < safety_seconds:
            continue
        if not dry_run:
            try:
                repo.store.delete(key)
            except ObjectLocked:
                res.retained_packs += 1
                continue
        res.orphan_packs_deleted += 1
    # damage markers of chunks nothing references any more
    for key in list(repo.store.list("damaged")):
        h = key.rsplit("/", 1)[-1]
        if len(h) == 64 and h not in refs:
            if not dry_run:
                repo.store.delete(key)
            res.damage_markers_removed += 1
    # uncommitted snapshot folders, old checkpoints, temporary files of mailboxes nobody is backing up
    if dry_run:
        return
    by_dir = {mailbox_dir(uid): (uid, upn) for uid, upn in repo.list_mailboxes()}
    dirs = sorted({k.split("/")[1] for k in repo.store.list("mailboxes") if k.count("/") >= 2})
    for d in dirs:
        uid, upn = by_dir.get(d, (d, d))
        try:
            lease = repo.acquire_lease(uid, upn, lease_seconds, what="prune of this mailbox's leftovers",
                                       key=f"mailboxes/{d}/lease.json")
        except LeaseBusy:
            res.busy_mailboxes.append(upn)
            continue
        try:
            res.leftovers_removed += repo.clean_mailbox(uid, older_than=safety_seconds)
            latest = repo.snapshot_ids(uid)
            if latest:
                for key in repo.list_checkpoints(uid):
                    part = key.rsplit("/", 1)[-1]  # named by the time it was written, like snapshot ids
                    if part[:23] < latest[-1][:23]:  # written before the mailbox's latest commit: used up
                        repo.store.delete(key)
                        res.leftovers_removed += 1
        finally:
            lease.release()


def _object_age(repo: Repository, key: str, now: datetime) -> float | None:
    """Seconds since ``key`` was written (None: gone)."""
    try:
        return (now - repo.store.modified_at(key)).total_seconds()
    except KeyNotFound:
        return None
