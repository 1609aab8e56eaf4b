"""``mailpipe check``: is every committed snapshot restorable? (Like ``restic check [--read-data]``.)

Without ``read_data`` it reads every snapshot's commit record, and reads and validates **every column
of every row** of its manifest and folder table (the files' sizes and sha256 against the commit record,
Parquet page checksums, the schema, and each value: ids, hashes, chunk lists, sizes, folders), and
checks that every chunk a manifest names is in the repository (one listing of ``blobs/``, not one
request per chunk). With ``read_data`` it also downloads, decompresses and hashes every referenced
chunk once, and checks each item's size against the sum of its chunks (an item of one chunk: its sha256
is the chunk's name).

Damage is reported, never raised: an unreadable ``snapshot.json`` or Parquet file is one problem of that
snapshot and the check goes on. Every missing or corrupt chunk is marked in the repository
(``damaged/<h>``): the next backup of each mailbox using it downloads those items again, if they still
exist, and rewrites the chunk (self-heal; docs/ENGINE.md). Checkpoints of unfinished backups are not
checked: nothing restores from them.

``snapshot`` may name one snapshot per mailbox (the Dagster asset checks the snapshot each backup just
committed), and every problem is also filed under its mailbox (:attr:`CheckResult.by_mailbox`), so a caller
can report per mailbox. ``sample=(k, n)`` checks only the chunks in slice ``k`` of ``n`` (:func:`chunk_slice`:
the chunk ids' leading 64 bits cut into ``n`` equal ranges), so ``n`` runs with ``k = 0 … n-1`` read every
chunk exactly once: with ``read_data``, a daily run with ``k = day number mod 30`` reads the whole
repository every 30 days at 1/30 of the cost a day (:func:`day_slice`). Manifests are still read whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from mailpipe.repo.repository import _SNAP_ID, IntegrityError, Repository, RepositoryError
from mailpipe.repo.schema import FIDELITY, FOLDERS, MANIFEST
from mailpipe.repo.store import StoreError

MAX_PROBLEMS = 1000  # listed in the result; counting goes on
MAX_MAILBOX_PROBLEMS = 100  # listed per mailbox (CheckResult.by_mailbox); counting goes on
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def chunk_slice(h: str, n: int) -> int:
    """The slice (0 … n-1) chunk id ``h`` falls in: its leading 64 bits cut into ``n`` equal ranges. Chunk
    ids are SHA-256 names, so each slice holds ~1/n of the chunks, and every chunk is in exactly one."""
    return (int(h[:16], 16) * n) >> 64


def day_slice(day: date, n: int) -> int:
    """The slice a rotating sample reads on ``day``: its day number (days since 1970-01-01) mod ``n``."""
    return (day - date(1970, 1, 1)).days % n


@dataclass
class MailboxCheck:
    """What the check found for one mailbox (its problems are also in :attr:`CheckResult.problems`)."""

    upn: str
    snapshots: int = 0
    items: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)  # the first MAX_MAILBOX_PROBLEMS

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


@dataclass
class CheckResult:
    mailboxes: int = 0
    snapshots: int = 0
    items: int = 0               # manifest rows checked, over all snapshots
    chunks: int = 0              # distinct chunks referenced (with a sample: those in the slice)
    chunks_read: int = 0         # with read_data
    bytes_read: int = 0          # decompressed, with read_data
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_chunks: set[str] = field(default_factory=set)  # missing or corrupt, marked for repair
    affected: dict[str, int] = field(default_factory=dict)  # upn → items (latest snapshot) using damaged chunks
    mark_error: str | None = None  # why the damaged chunks could not be marked for repair
    sample: tuple[int, int] | None = None  # (k, n): only the chunks in slice k of n were checked
    snapshots_gone: int = 0      # forgotten (deleted by maintenance) while being checked: not counted as damage
    by_mailbox: dict[str, MailboxCheck] = field(default_factory=dict)  # upn → its figures and problems

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str, upn: str | None = None) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        if upn is not None:
            mb = self.by_mailbox.setdefault(upn, MailboxCheck(upn))
            mb.problem_count += 1
            if len(mb.problems) < MAX_MAILBOX_PROBLEMS:
                mb.problems.append(text)

    def advice(self) -> str | None:
        """What happens next, when chunks are damaged (printed by the CLI)."""
        if not self.damaged_chunks:
            return None
        if self.mark_error:
            return (f"{len(self.damaged_chunks)} damaged or missing chunks could not be marked for repair "
                    f"({self.mark_error}); run the check with write access, or back the affected mailboxes up: "
                    "each backup reads back what it carries forward and repairs what it finds.")
        who = ", ".join(f"{u} ({n} items)" for u, n in sorted(self.affected.items())[:10]) or "none"
        return (f"{len(self.damaged_chunks)} damaged or missing chunks are marked for repair: the next backup of "
                f"each affected mailbox downloads those items again from Graph, if they still exist, and rewrites "
                f"the chunks — mailboxes whose latest snapshot is affected: {who}. Items that no longer exist in "
                "their mailbox cannot be repaired; older snapshots that use those chunks stay damaged.")


def check_repository(repo: Repository, mailboxes: Iterable[tuple[str, str]], *,
                     snapshot: str | Mapping[str, str] = "all", read_data: bool = False,
                     progress: Callable[[str], None] | None = None, mark_damaged: bool = True,
                     sample: tuple[int, int] | None = None) -> CheckResult:
    """Check ``mailboxes`` ((user id, upn) pairs); ``snapshot``: ``all``, ``latest``, one snapshot id, or a
    mapping user id → snapshot id (one snapshot of each mailbox). ``sample=(k, n)``: only the chunks in
    slice ``k`` of ``n`` (:func:`chunk_slice`) are checked (and, with ``read_data``, read); manifests and
    folder tables are checked whole. ``progress(upn)`` is called after each mailbox. Missing or corrupt
    chunks are marked for repair unless ``mark_damaged`` is False."""
    if sample is not None:
        k, n = sample
        if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and 0 <= k < n):
            raise ValueError(f"sample must be (k, n) with 0 <= k < n, got {sample!r}")
    res = CheckResult(sample=sample)
    present: set[str] | None = None if read_data else set(repo.iter_chunk_names())
    repo.ensure_index()
    for p in repo.index_problems:  # an index file that cannot be read: chunks it lists look missing
        res.problem(p)
    if read_data:  # every pack's header (what the index can be rebuilt from) is whole and agrees with the index
        for pid in sorted(repo.index.packs()):
            if sample is not None and int(pid[:8], 16) % sample[1] != sample[0]:
                continue
            if (p := repo.pack_header_problem(pid)) is not None:
                res.problem(p)
    chunks: dict[str, int | None] = {}  # referenced chunk -> decompressed length (None: damaged/missing)
    for uid, upn in mailboxes:
        res.mailboxes += 1
        mb = res.by_mailbox.setdefault(upn, MailboxCheck(upn))
        want = snapshot[uid] if isinstance(snapshot, Mapping) else snapshot
        try:
            scanned = repo.scan_snapshots(uid)
        except (RepositoryError, StoreError) as e:
            res.problem(f"{upn}: cannot list snapshots: {e}", upn)
            continue
        if want == "latest":
            scanned = scanned[-1:]
        elif want != "all":
            scanned = [s for s in scanned if s[0] == want]
            if not scanned:
                res.problem(f"{upn}: no committed snapshot {want!r}", upn)
        for i, (sid, info, error) in enumerate(scanned):
            res.snapshots += 1
            mb.snapshots += 1
            if info is None:
                res.problem(f"{upn} snapshot {sid}: unreadable: {error}", upn)
                continue
            latest = i == len(scanned) - 1
            try:
                _check_snapshot(repo, uid, upn, info, res, present, chunks, latest)
            except (IntegrityError, RepositoryError, StoreError, OSError, ValueError) as e:
                if not _still_committed(repo, uid, sid):  # forgotten while it was being read: not damage
                    res.snapshots_gone += 1
                    continue
                res.problem(f"{upn} snapshot {sid}: unreadable: {e}", upn)
        if progress:
            progress(upn)
    res.chunks = len(chunks)
    res.damaged_chunks = {h for h, n in chunks.items() if n is None and (present is None or h not in present)}
    if mark_damaged:
        try:
            for h in res.damaged_chunks:
                repo.mark_damaged(h, "found by mailpipe check")
            if read_data:  # verified good now: a stale marker (e.g. rewritten by hand) is cleared
                for h in repo.load_damaged() & {h for h, n in chunks.items() if n is not None}:
                    repo.repaired(h)
        except StoreError as e:  # read-only credentials, say: the report stands, the marks are missing
            res.mark_error = str(e)
    return res


def _still_committed(repo: Repository, uid: str, sid: str) -> bool:
    """Whether snapshot ``sid`` still exists (``forget`` may delete it while a check reads it)."""
    try:
        return any(s == sid for s, _, _ in repo.scan_snapshots(uid))
    except (RepositoryError, StoreError):
        return True


def _same_type(a: Any, b: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_list(a) and pa.types.is_list(b):  # Parquet names the list's child "element", Arrow "item"
        return _same_type(a.value_type, b.value_type)
    return a.equals(b)


def _schema_problem(schema: Any, want: Any) -> str | None:
    got = {f.name: f.type for f in schema}
    missing = [f.name for f in want if f.name not in got]
    if missing:
        return f"columns missing: {', '.join(missing)}"
    wrong = [f.name for f in want if not _same_type(got[f.name], f.type)]
    if wrong:
        return f"columns of the wrong type: {', '.join(wrong)}"
    return None


def _check_folders(repo: Repository, uid: str, upn: str, sid: str, res: CheckResult) -> set[str]:
    table = repo.read_folders(uid, sid)
    where = f"{upn} snapshot {sid} folders.parquet"
    if (p := _schema_problem(table.schema, FOLDERS)):
        res.problem(f"{where}: {p}", upn)
    ids: set[str] = set()
    for row in table.to_pylist():
        fid = row.get("folder_id")
        if not isinstance(fid, str) or not fid:
            res.problem(f"{where}: a folder without an id", upn)
            continue
        if fid in ids:
            res.problem(f"{where}: folder {fid} is listed twice", upn)
        ids.add(fid)
        path = row.get("path")
        if not isinstance(path, list) or not all(isinstance(x, str) for x in path):
            res.problem(f"{where}: folder {fid} has no valid path", upn)
    return ids


def _check_snapshot(repo: Repository, uid: str, upn: str, info: Any, res: CheckResult,
                    present: set[str] | None, chunks: dict[str, int | None], latest: bool) -> None:
    sid = info.snapshot_id
    folders = _check_folders(repo, uid, upn, sid, res)
    # every column of every file: the whole file is decoded and validated
    rows, affected = _check_rows(repo, upn, sid, repo.iter_manifest(uid, sid), MANIFEST, "manifest.parquet",
                                 folders, res, present, chunks)
    if rows is None:
        return
    f_rows = f_affected = 0
    if info.fidelity or "fidelity.parquet" in info.files:  # content: fidelity|both — the export API's streams
        f_rows, f_affected = _check_rows(repo, upn, sid, repo.iter_fidelity(uid, sid), FIDELITY, "fidelity.parquet",
                                         folders, res, present, chunks)
        if f_rows is None:
            return
        if f_rows != int(info.fidelity.get("items", -1)):
            res.problem(f"{upn} snapshot {sid}: fidelity.parquet has {f_rows} items, snapshot.json says "
                        f"{info.fidelity.get('items')}", upn)
    res.items += rows + f_rows
    res.by_mailbox[upn].items += rows + f_rows
    if latest and (affected or f_affected):
        res.affected[upn] = affected + f_affected
    want = info.fidelity.get("manifest_items", info.items) if info.fidelity else info.items
    if rows != want:
        res.problem(f"{upn} snapshot {sid}: manifest has {rows} items, snapshot.json says {want}", upn)


def _check_rows(repo: Repository, upn: str, sid: str, batches: Any, schema: Any, name: str, folders: set[str],
                res: CheckResult, present: set[str] | None, chunks: dict[str, int | None]
                ) -> tuple[int | None, int]:
    """Check every row of a manifest-like file (``manifest.parquet``, ``fidelity.parquet``) and the chunks
    it names → (rows, items using a damaged chunk); (None, 0) when its schema is wrong."""
    rows = 0
    seen: set[int] = set()
    schema_checked = False
    affected = 0
    said = "the manifest" if name == "manifest.parquet" else name
    for batch in batches:
        if not schema_checked:
            schema_checked = True
            if (p := _schema_problem(batch.schema, schema)):
                res.problem(f"{upn} snapshot {sid} {name}: {p}", upn)
                return None, 0
        for row in batch.to_pylist():
            rows += 1
            item = f"{upn} snapshot {sid} item {row['item_id']}"
            bad = _row_problem(row, folders, keyed=repo.cipher is not None)
            if bad:
                res.problem(f"{item}: {bad}", upn)
                continue
            key = hash(row["item_id"])
            if key in seen:
                res.problem(f"{item}: listed twice in {said}", upn)
            seen.add(key)
            names = row["chunks"]
            total: int | None = 0
            damaged = False
            for h in names:
                if res.sample is not None and chunk_slice(h, res.sample[1]) != res.sample[0]:
                    total = None  # not in today's slice: not read, so the item's size cannot be summed
                    continue
                fresh = h not in chunks
                if fresh:
                    # (a chunk written after the listing, by a backup running now, is looked up again)
                    chunks[h] = _read(repo, h, item, res, upn) if present is None else \
                        (0 if h in present or repo.has_chunk(h) else None)
                n = chunks[h]
                if n is None:
                    damaged = True
                    if present is not None:
                        res.problem(f"{item}: chunk {h} is missing from the repository", upn)
                    elif not fresh:  # (when fresh, _read reported it)
                        res.problem(f"{item}: chunk {h} is damaged or missing", upn)
                total = None if n is None or total is None else total + n
            affected += damaged
            if present is None and total is not None and total != row["size"]:
                res.problem(f"{item}: its chunks hold {total} bytes, {said} says {row['size']}", upn)
    return rows, affected


def _row_problem(row: dict[str, Any], folders: set[str], *, keyed: bool = False) -> str | None:
    """What is wrong with one manifest row (None: nothing). ``keyed``: chunk names are keyed HMACs (an
    encrypted repository), so a one-chunk item's name is not its sha256."""
    """What is wrong with one manifest row, or None (every column is looked at)."""
    if not isinstance(row.get("item_id"), str) or not row["item_id"]:
        return "no item id"
    if row.get("folder_id") not in folders:
        return f"folder {row.get('folder_id')} is not in folders.parquet"
    path = row.get("folder_path")
    if path is not None and not all(isinstance(x, str) for x in path):
        return "folder_path is not a list of names"
    if not _HEX64.match(str(row.get("sha256") or "")):
        return f"sha256 {str(row.get('sha256'))[:70]!r} is not a SHA-256"
    names = row.get("chunks")
    if not isinstance(names, list) or not all(_HEX64.match(str(h)) for h in names):
        return "chunks is not a list of chunk names"
    size = row.get("size")
    if not isinstance(size, int) or size < 0:
        return f"size {size!r} is not a byte count"
    if not names and size:
        return f"{size} bytes but no chunks"
    if len(names) == 1 and not keyed and names[0] != row["sha256"]:
        return f"its only chunk {names[0]} is not its sha256 {row['sha256']}"
    first = row.get("first_snapshot_id")
    if first is not None and not _SNAP_ID.match(str(first)):
        return f"first_snapshot_id {str(first)[:40]!r} is not a snapshot id"
    for c in ("categories",):
        v = row.get(c)
        if v is not None and not all(isinstance(x, str) for x in v):
            return f"{c} is not a list of strings"
    return None


def _read(repo: Repository, h: str, item: str, res: CheckResult, upn: str) -> int | None:
    """Download, decompress and hash chunk ``h`` once; its length, or None (reported) when damaged."""
    try:
        n = repo.verify_chunk(h, item=item)
    except IntegrityError as e:
        res.problem(f"{e}", upn)
        return None
    res.chunks_read += 1
    res.bytes_read += n
    return n
