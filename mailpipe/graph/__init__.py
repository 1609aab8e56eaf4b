"""Graph access for backups: msgraph-sdk + azure-identity, a per-mailbox limiter, retries, typed results.

See docs/GRAPH.md. Importing this package is cheap; msgraph is imported when a client is built.
"""

from mailpipe.graph.client import (
    DeltaPage,
    Folder,
    GraphStats,
    GraphTenant,
    Mailbox,
    MailboxGraph,
    MailboxListing,
    MessageInfo,
    RetryPolicy,
    SkippedUser,
    classify,
)
from mailpipe.graph.errors import (
    ForbiddenError,
    GraphError,
    NoMailboxError,
    NotFoundError,
    PermanentError,
    ResyncRequired,
    ThrottledError,
    TransientError,
)
from mailpipe.graph.limiter import MailboxLimiter

__all__ = [
    "DeltaPage", "Folder", "ForbiddenError", "GraphError", "GraphStats", "GraphTenant", "Mailbox", "MailboxGraph",
    "MailboxLimiter", "MailboxListing", "MessageInfo", "NoMailboxError", "NotFoundError", "PermanentError",
    "ResyncRequired", "RetryPolicy", "SkippedUser", "ThrottledError", "TransientError", "classify",
]
