"""The backup engine: one mailbox (and many concurrently), with no knowledge of Dagster."""

from mailpipe.backup.api import Discovery, MailboxRef, MailboxResult, SkippedUser
from mailpipe.backup.runner import backup_mailboxes, discover_mailboxes, run

__all__ = [
    "Discovery", "MailboxRef", "MailboxResult", "SkippedUser", "backup_mailboxes", "discover_mailboxes", "run",
]
