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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mailpipe.repo.repository import _SNAP_ID, IntegrityError, Repository, RepositoryError
from mailpipe.repo.schema import FOLDERS, MANIFEST
from mailpipe.repo.store import StoreError

MAX_PROBLEMS = 1000  # listed in the result; counting goes on
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CheckResult:
    mailboxes: int = 0
    snapshots: int = 0
    items: int = 0               # manifest rows checked, over all snapshots
    chunks: int = 0              # distinct chunks referenced
    chunks_read: int = 0         # with read_data
    bytes_read: int = 0          # decompressed, with read_data
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_chunks: set[str] = field(default_factory=set)  # missing or corrupt, marked for repair
    affected: dict[str, int] = field(default_factory=dict)  # upn → items (latest snapshot) using damaged chunks
    mark_error: str | None = None  # why the damaged chunks could not be marked for repair

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

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


def check_repository(repo: Repository, mailboxes: Iterable[tuple[str, str]], *, snapshot: str = "all",
                     read_data: bool = False, progress: Callable[[str], None] | None = None,
                     mark_damaged: bool = True) -> CheckResult:
    """Check ``mailboxes`` ((user id, upn) pairs); ``snapshot``: ``all``, ``latest`` or one snapshot id.
    ``progress(upn)`` is called after each mailbox. Missing or corrupt chunks are marked for repair
    unless ``mark_damaged`` is False."""
    res = CheckResult()
    present: set[str] | None = None if read_data else set(repo.iter_chunk_names())
    chunks: dict[str, int | None] = {}  # referenced chunk -> decompressed length (None: damaged/missing)
    for uid, upn in mailboxes:
        res.mailboxes += 1
        try:
            scanned = repo.scan_snapshots(uid)
        except (RepositoryError, StoreError) as e:
            res.problem(f"{upn}: cannot list snapshots: {e}")
            continue
        if snapshot == "latest":
            scanned = scanned[-1:]
        elif snapshot != "all":
            scanned = [s for s in scanned if s[0] == snapshot]
            if not scanned:
                res.problem(f"{upn}: no committed snapshot {snapshot!r}")
        for i, (sid, info, error) in enumerate(scanned):
            res.snapshots += 1
            if info is None:
                res.problem(f"{upn} snapshot {sid}: unreadable: {error}")
                continue
            latest = i == len(scanned) - 1
            try:
                _check_snapshot(repo, uid, upn, info, res, present, chunks, latest)
            except (IntegrityError, RepositoryError, StoreError, OSError, ValueError) as e:
                res.problem(f"{upn} snapshot {sid}: unreadable: {e}")
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
        res.problem(f"{where}: {p}")
    ids: set[str] = set()
    for row in table.to_pylist():
        fid = row.get("folder_id")
        if not isinstance(fid, str) or not fid:
            res.problem(f"{where}: a folder without an id")
            continue
        if fid in ids:
            res.problem(f"{where}: folder {fid} is listed twice")
        ids.add(fid)
        path = row.get("path")
        if not isinstance(path, list) or not all(isinstance(x, str) for x in path):
            res.problem(f"{where}: folder {fid} has no valid path")
    return ids


def _check_snapshot(repo: Repository, uid: str, upn: str, info: Any, res: CheckResult,
                    present: set[str] | None, chunks: dict[str, int | None], latest: bool) -> None:
    sid = info.snapshot_id
    folders = _check_folders(repo, uid, upn, sid, res)
    rows = 0
    seen: set[int] = set()
    schema_checked = False
    affected = 0
    for batch in repo.iter_manifest(uid, sid):  # every column: the whole file is decoded and validated
        if not schema_checked:
            schema_checked = True
            if (p := _schema_problem(batch.schema, MANIFEST)):
                res.problem(f"{upn} snapshot {sid} manifest.parquet: {p}")
                return
        for row in batch.to_pylist():
            rows += 1
            item = f"{upn} snapshot {sid} item {row['item_id']}"
            bad = _row_problem(row, folders)
            if bad:
                res.problem(f"{item}: {bad}")
                continue
            key = hash(row["item_id"])
            if key in seen:
                res.problem(f"{item}: listed twice in the manifest")
            seen.add(key)
            names = row["chunks"]
            total: int | None = 0
            damaged = False
            for h in names:
                fresh = h not in chunks
                if fresh:
                    # (a chunk written after the listing, by a backup running now, is looked up again)
                    chunks[h] = _read(repo, h, item, res) if present is None else \
                        (0 if h in present or repo.has_chunk(h) else None)
                n = chunks[h]
                if n is None:
                    damaged = True
                    if present is not None:
                        res.problem(f"{item}: chunk {h} is missing from the repository")
                    elif not fresh:  # (when fresh, _read reported it)
                        res.problem(f"{item}: chunk {h} is damaged or missing")
                total = None if n is None or total is None else total + n
            affected += damaged
            if present is None and total is not None and total != row["size"]:
                res.problem(f"{item}: its chunks hold {total} bytes, the manifest says {row['size']}")
    res.items += rows
    if latest and affected:
        res.affected[upn] = affected
    if rows != info.items:
        res.problem(f"{upn} snapshot {sid}: manifest has {rows} items, snapshot.json says {info.items}")


def _row_problem(row: dict[str, Any], folders: set[str]) -> str | None:
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
    if len(names) == 1 and names[0] != row["sha256"]:
        return f"its only chunk {names[0]} is not its sha256 {row['sha256']}"
    first = row.get("first_snapshot_id")
    if first is not None and not _SNAP_ID.match(str(first)):
        return f"first_snapshot_id {str(first)[:40]!r} is not a snapshot id"
    for c in ("categories",):
        v = row.get(c)
        if v is not None and not all(isinstance(x, str) for x in v):
            return f"{c} is not a list of strings"
    return None


def _read(repo: Repository, h: str, item: str, res: CheckResult) -> int | None:
    """Download, decompress and hash chunk ``h`` once; its length, or None (reported) when damaged."""
    try:
        n = repo.verify_chunk(h, item=item)
    except IntegrityError as e:
        res.problem(f"{e}")
        return None
    res.chunks_read += 1
    res.bytes_read += n
    return n
