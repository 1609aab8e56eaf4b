"""Graph errors, classified so that callers decide by kind, never by parsing messages.

==================  ================================================  =========================
kind                what                                              what the caller does
==================  ================================================  =========================
``transient``       5xx, timeouts, connection resets (after retries)  retry later (run fails)
``throttled``       429 beyond the retry budget                       retry later
``resync``          410 / SyncStateNotFound / resyncRequired          list that folder again
``no-mailbox``      404 MailboxNotEnabledForRESTAPI                   skip that user
``forbidden``       401/403 (permissions, Conditional Access)         fix the app registration
``not-found``       404 of an item/folder                             drop it (it went away)
``permanent``       any other 4xx, and items Graph cannot serve       skip with a reason
``bad-content``     ``$value`` answered with an HTML page or nothing  retry later, then skip
``unsafe-link``     a link/redirect outside graph_url                 fail that mailbox
``protocol``        paging loops, folder cycles, endless listings     fail that mailbox
==================  ================================================  =========================

Messages name the status and Graph's error code and message; they never contain tokens, secrets or
request headers.
"""

from __future__ import annotations

import re

_RESYNC_CODES = {"syncstatenotfound", "resyncrequired", "syncstateinvalid", "invalidsyncstate"}
_NO_MAILBOX_CODES = {"mailboxnotenabledforrestapi", "mailboxnotsupportedforrestapi", "mailboxinfostale"}


class GraphError(Exception):
    kind = "permanent"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [self.args[0] if self.args else self.kind]
        if self.status is not None or self.code:
            parts.append(f"({', '.join(p for p in (str(self.status) if self.status else '', self.code or '') if p)})")
        return " ".join(parts)


class TransientError(GraphError):
    kind = "transient"


class ThrottledError(TransientError):
    kind = "throttled"


class ResyncRequired(GraphError):
    kind = "resync"


class NoMailboxError(GraphError):
    kind = "no-mailbox"


class ForbiddenError(GraphError):
    kind = "forbidden"


class NotFoundError(GraphError):
    kind = "not-found"


class PermanentError(GraphError):
    kind = "permanent"


class BadContentError(GraphError):
    """A ``200`` whose body is not an item's content (an HTML error page, an empty body)."""

    kind = "bad-content"


class UnsafeLinkError(GraphError):
    """A link, ``Location`` or redirect that would take our request (and token) outside graph_url."""

    kind = "unsafe-link"


class ProtocolError(GraphError):
    """The server broke Graph's paging or tree contract in a way that would never end (a repeated
    nextLink, a folder inside itself, more pages than the folder can have)."""

    kind = "protocol"


def _clean(msg: str | None) -> str:
    """Graph error messages are safe, but never let anything token-like through."""
    if not msg:
        return ""
    msg = re.sub(r"(?i)\b(bearer\s+)(?:bearer\s+)*[\w\-.~+/=]+", r"\1[redacted]", msg)  # "Bearer Bearer x" too
    msg = re.sub(r"eyJ[\w\-]+\.[\w\-]+\.[\w\-]+", "[redacted-jwt]", msg)
    return msg.strip()[:500]


def from_status(status: int | None, code: str | None, message: str | None, *, what: str,
                retry_after: float | None = None) -> GraphError:
    """Map an HTTP status + Graph error code to the right class."""
    c = (code or "").lower()
    text = f"{what}: {_clean(message) or 'Graph error'}"
    kw = {"status": status, "code": code, "retry_after": retry_after}
    if c in _RESYNC_CODES or status == 410:
        return ResyncRequired(text, **kw)
    if c in _NO_MAILBOX_CODES:
        return NoMailboxError(text, **kw)
    if status == 429:
        return ThrottledError(text, **kw)
    if status is not None and status >= 500:
        # an item Exchange cannot convert/serve answers 500 with ErrorCorrupt*/ErrorInvalid*: retrying won't help
        if c.startswith(("errorcorrupt", "errorinvalid", "errormimecontent")):
            return PermanentError(text, **kw)
        return TransientError(text, **kw)
    if status in (401, 403):
        if c == "errorquotaexceeded":
            return PermanentError(text, **kw)
        return ForbiddenError(text, **kw)
    if status == 404:
        return NotFoundError(text, **kw)
    return PermanentError(text, **kw)
