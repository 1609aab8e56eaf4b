"""The restore engine: a snapshot back into a mailbox, with no knowledge of Dagster (docs/RESTORE.md)."""

from mailpipe.restore.api import RestoreRequest, RestoreResult
from mailpipe.restore.runner import restore_mailbox, run

__all__ = ["RestoreRequest", "RestoreResult", "restore_mailbox", "run"]
