"""What the restore engine's public API takes and returns (docs/RESTORE.md; the call is
:func:`mailpipe.restore.runner.restore_mailbox`).

A sibling of the backup engine, on the same Graph layer and repository, knowing nothing of Dagster. One
call restores one mailbox's snapshot (all of it, some folders, some items) into that mailbox or another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable

COLLISIONS = ("skip", "copy", "replace")


@dataclass(frozen=True)
class RestoreRequest:
    upn: str                               # the mailbox whose backup is restored
    snapshot: str = "latest"               # a snapshot id, or latest
    at: datetime | None = None             # instead: the newest snapshot committed at or before this time
    to: str | None = None                  # the mailbox restored into (default: the same)
    folders: tuple[str, ...] = ()          # folder paths ("Inbox/Projects"): those folders and their subfolders
    items: tuple[str, ...] = ()            # item ids
    since: datetime | None = None          # received at or after
    until: datetime | None = None          # received before
    into: str | None = None                # the folder the tree is recreated in (default "Restored <time>")
    in_place: bool = False                 # into the original folders instead (missing ones created)
    collisions: str = "skip"               # an item already in the target folder: skip | copy | replace
    dry_run: bool = False

    def __post_init__(self) -> None:
        from mailpipe.errors import UserError

        if self.collisions not in COLLISIONS:
            raise UserError(f"collisions must be one of {', '.join(COLLISIONS)} (got {self.collisions!r})")
        if self.in_place and self.into:
            raise UserError("--into and --in-place exclude each other")
        if self.at is not None and self.snapshot not in ("latest", None):
            raise UserError("--at and --snapshot exclude each other")
        if self.since and self.until and self.since >= self.until:
            raise UserError("--since must be before --until")


@dataclass
class FolderPlan:
    path: tuple[str, ...]                  # the source folder's path
    target: tuple[str, ...]                # where its items go in the target mailbox
    items: int = 0
    bytes: int = 0


@dataclass
class RestoreResult:
    upn: str
    target: str
    ok: bool = False
    error: str | None = None
    error_kind: str | None = None
    restore_id: str | None = None
    snapshot_id: str | None = None
    target_root: str | None = None         # "Restored 2026-11-25 10:00 UTC" (None in place)
    dry_run: bool = False
    items_selected: int = 0
    bytes_selected: int = 0
    restored: int = 0                      # created in this run
    resumed: int = 0                       # created by an earlier, interrupted run of the same restore
    completed: int = 0                     # found half-made or made but not recorded (an earlier run died
                                           # mid-item) and completed here
    skipped_present: int = 0               # already in the target folder (collisions: skip)
    replaced: int = 0                      # collisions: replace — MIME: created anew, the colliding item deleted;
                                           # fidelity: a changed copy updated in place with the stored stream
    failed_count: int = 0                  # items that could not be restored (a new run tries them again)
    failed: list[dict[str, Any]] = field(default_factory=list)   # the first 1,000: [{item_id, folder_path, reason}]
    warnings: list[str] = field(default_factory=list)             # e.g. a restore continued from an earlier run
    losses: dict[str, int] = field(default_factory=dict)         # what could not be recreated → items
    folders: list[FolderPlan] = field(default_factory=list)
    bytes_uploaded: int = 0
    requests: int = 0
    throttled: int = 0
    upload_wait_seconds: float = 0.0       # time spent pacing for Exchange's upload budget
    expected_seconds: float = 0.0          # the estimate given at the start
    seconds: float = 0.0

    def metrics(self) -> dict[str, int | float]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def summary(self) -> str:
        if not self.ok:
            return f"{self.upn} → {self.target}: FAILED: {self.error}"
        if self.dry_run:
            return (f"dry run: {self.items_selected} items ({self.bytes_selected:,} bytes) of snapshot {self.snapshot_id} "
                    f"would be restored into {self.target}" + (f", folder {self.target_root!r}" if self.target_root
                                                                  else " (in place)")
                    + f"; about {self.expected_seconds:.0f} s")
        return (f"{self.upn} → {self.target}: {self.restored} restored, {self.resumed + self.completed} from an earlier "
                f"run, {self.skipped_present} already present, {self.replaced} replaced, {self.failed_count} failed "
                f"({self.bytes_uploaded:,} bytes uploaded, {self.requests} requests, {self.throttled} throttled, "
                f"{self.upload_wait_seconds:.0f} s paced, {self.seconds:.1f} s)")


ProgressCallback = Callable[[dict[str, Any]], None]
