"""``mailpipe check``: is every committed snapshot restorable? (Like ``restic check [--read-data]``.)

Without ``read_data`` it reads every snapshot's commit record, manifest and folder table, and checks that
every chunk a manifest names is in the repository (one listing of ``blobs/``, not one request per chunk).
With ``read_data`` it also downloads, decompresses and hashes every referenced chunk once, and checks
each item's size against the sum of its chunks (an item of one chunk: its sha256 is the chunk's name).
Checkpoints of unfinished backups are not checked: nothing restores from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mailpipe.repo.repository import IntegrityError, Repository, RepositoryError

MAX_PROBLEMS = 1000  # listed in the result; counting goes on


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

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def check_repository(repo: Repository, mailboxes: Iterable[tuple[str, str]], *, snapshot: str = "all",
                     read_data: bool = False, progress: Callable[[str], None] | None = None) -> CheckResult:
    """Check ``mailboxes`` ((user id, upn) pairs); ``snapshot``: ``all``, ``latest`` or one snapshot id.
    ``progress(upn)`` is called after each mailbox."""
    res = CheckResult()
    present: set[str] | None = None if read_data else set(repo.iter_chunk_names())
    chunks: dict[str, int | None] = {}  # referenced chunk -> decompressed length (None: damaged/unread)
    for uid, upn in mailboxes:
        res.mailboxes += 1
        try:
            infos = repo.list_snapshots(uid)
        except RepositoryError as e:
            res.problem(f"{upn}: cannot list snapshots: {e}")
            continue
        if snapshot == "latest":
            infos = infos[-1:]
        elif snapshot != "all":
            infos = [s for s in infos if s.snapshot_id == snapshot]
            if not infos:
                res.problem(f"{upn}: no committed snapshot {snapshot!r}")
        for info in infos:
            res.snapshots += 1
            try:
                _check_snapshot(repo, uid, upn, info.snapshot_id, info.items, res, present, chunks)
            except (RepositoryError, OSError, ValueError) as e:
                res.problem(f"{upn} snapshot {info.snapshot_id}: unreadable: {e}")
        if progress:
            progress(upn)
    res.chunks = len(chunks)
    return res


def _check_snapshot(repo: Repository, uid: str, upn: str, sid: str, expected_items: int, res: CheckResult,
                    present: set[str] | None, chunks: dict[str, int | None]) -> None:
    folders = {r["folder_id"] for r in repo.read_folders(uid, sid).to_pylist()}
    rows = 0
    for batch in repo.iter_manifest(uid, sid, columns=["item_id", "folder_id", "size", "sha256", "chunks"]):
        for row in batch.to_pylist():
            rows += 1
            item = f"{upn} snapshot {sid} item {row['item_id']}"
            if row["folder_id"] not in folders:
                res.problem(f"{item}: folder {row['folder_id']} is not in folders.parquet")
            names = row["chunks"] or []
            if not names and row["size"]:
                res.problem(f"{item}: {row['size']} bytes but no chunks")
            if len(names) == 1 and names[0] != row["sha256"]:
                res.problem(f"{item}: its only chunk {names[0]} is not its sha256 {row['sha256']}")
            total: int | None = 0
            for h in names:
                fresh = h not in chunks
                if fresh:
                    chunks[h] = _read(repo, h, item, res) if present is None else None
                if present is not None:
                    if h not in present:
                        res.problem(f"{item}: chunk {h} is missing from the repository")
                    continue
                n = chunks[h]
                if n is None and not fresh:  # (when fresh, _read reported it)
                    res.problem(f"{item}: chunk {h} is damaged or missing")
                total = None if n is None or total is None else total + n
            if present is None and total is not None and total != row["size"]:
                res.problem(f"{item}: its chunks hold {total} bytes, the manifest says {row['size']}")
    res.items += rows
    if rows != expected_items:
        res.problem(f"{upn} snapshot {sid}: manifest has {rows} items, snapshot.json says {expected_items}")


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
