"""What the backup engine's public API takes and returns (the calls are in :mod:`mailpipe.backup.runner`).

The engine knows nothing of Dagster. It backs up mailboxes of one tenant concurrently and returns one
:class:`MailboxResult` per mailbox; a mailbox that fails does so alone (``ok=False`` with a reason), its
stored progress kept for the next attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class MailboxRef:
    user_id: str  # Entra object id: the repository directory
    upn: str      # lower-cased user principal name: the partition key's second half


@dataclass(frozen=True)
class SkippedUser:
    upn: str
    user_id: str
    reason: str  # e.g. "no mailbox (MailboxNotEnabledForRESTAPI)"


@dataclass(frozen=True)
class Discovery:
    mailboxes: list[MailboxRef]  # sorted by upn, filtered by the tenant's include/exclude globs
    skipped: list[SkippedUser]


@dataclass
class MailboxResult:
    """The outcome of backing up one mailbox; the figures are what the Dagster layer publishes."""

    upn: str
    user_id: str | None = None
    ok: bool = False
    error: str | None = None        # one clear line when ok is False
    # transient | throttled | no-mailbox | forbidden | not-found | permanent | unsafe-link | protocol |
    # bad-content | busy (another backup holds the mailbox's lease) | deadline | storage
    error_kind: str | None = None
    snapshot_id: str | None = None
    committed_at: datetime | None = None
    already_committed: bool = False  # skipped because a snapshot was committed after `skip_if_committed_since`
    items_total: int = 0
    items_new: int = 0
    items_changed: int = 0
    items_removed: int = 0
    items_skipped: int = 0
    items_reused: int = 0            # items whose content came from a previous snapshot or checkpoint
    items_repaired: int = 0          # items downloaded again because their stored chunks were damaged
    chunks_verified: int = 0         # chunks of carried-forward items read back and verified
    bytes_fetched: int = 0           # MIME bytes downloaded from Graph
    bytes_stored_new: int = 0        # compressed bytes newly written to the repository
    requests: int = 0                # Graph requests sent
    throttled: int = 0               # 429 responses received
    seconds: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{item_id, folder_path, subject, reason, pending}]
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged base snapshot that was skipped
    items_by_type: dict[str, int] = field(default_factory=dict)  # content: fidelity — items per message class

    def metrics(self) -> dict[str, int | float]:
        """The numeric figures, for metadata that the UI plots over time."""
        return {
            k: v for k, v in asdict(self).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }


ProgressCallback = Callable[[str, dict[str, Any]], None]  # (upn, figures so far)
