"""Writing into a mailbox (restore): folders, messages created from JSON, attachments, upload sessions.

Everything goes through the mailbox's limiter (4 in flight, the request window, the Retry-After fence) and,
for request bodies, through :class:`UploadBudget`, Exchange's other per-mailbox limit: 150 MB of POST, PUT
and PATCH bodies per 5 minutes. A restore of a big mailbox paces itself on it instead of being throttled
into failure.

Creating a message or an attachment is not idempotent: after a timeout, a reset or a 5xx the request may
have been applied. Those calls are not retried blindly (:meth:`_Caller.call` with ``idempotent=False``);
the restore engine looks for what it may have created (every message it creates carries a tag property)
before it tries again — no duplicates.

Upload sessions: Graph answers ``createUploadSession`` with a URL on *another host* that carries its own
authorisation. It is the one place mailpipe sends requests outside graph_url, and it sends **no token**
there: a separate client without credentials, which talks only to that URL (docs/GRAPH.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from mailpipe.graph.client import MailboxGraph, Paging, _values, json_object, raise_for_status
from mailpipe.graph.errors import NotFoundError, PermanentError, TransientError, UnsafeLinkError
from mailpipe.graph.http import GraphOrigin, GuardedTransport, client_timeout

SMALL_ATTACHMENT = 3 * 1024 * 1024   # below: one POST (contentBytes); from here: an upload session
UPLOAD_CHUNK = 4 * 1024 * 1024       # an upload session's pieces (Graph: at most 4 MB each)
MAX_MESSAGE_PAGES = 100_000
UPLOAD_BUDGET_SECONDS = 300.0     # Exchange: 150 MB (157,286,400 bytes) per 5 minutes per mailbox


class UploadBudget:
    """A sliding window of request-body bytes per mailbox (Exchange: 150 MB per 5 minutes). ``acquire(n)``
    waits until ``n`` more bytes fit; a body bigger than the whole budget waits for an empty window."""

    def __init__(self, max_bytes: int = 152_000_000, window_seconds: float = UPLOAD_BUDGET_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.window_seconds = window_seconds
        self._clock = clock
        self._sent: deque[list[float]] = deque()  # [when, bytes]: when it was sent, then when it was answered
        self._total = 0
        self.waited = 0.0  # seconds spent waiting for the budget (shown as throttled waits)
        self._lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - self.window_seconds:
            self._total -= self._sent.popleft()[1]

    async def acquire(self, n: int) -> list[float]:
        """Wait until ``n`` more bytes fit; returns the entry to :meth:`settle` once the request is answered."""
        async with self._lock:  # first come, first served: a big body is not starved by small ones
            while True:
                now = self._clock()
                self._expire(now)
                if self._total + n <= self.max_bytes or not self._sent:
                    entry = [now, float(n)]
                    self._sent.append(entry)
                    self._total += n
                    return entry
                # wait until enough of the oldest bytes leave the window
                need, acc, until = self._total + n - self.max_bytes, 0, now
                for t, b in self._sent:
                    acc += b
                    until = t + self.window_seconds
                    if acc >= need:
                        break
                wait = max(0.01, until - now)
                self.waited += wait
                await asyncio.sleep(wait)

    def settle(self, entry: list[float]) -> None:
        """The request was answered: its bytes leave the window counting from now. Exchange counts a body
        when it has received it — after we started sending, before it answered — so counting from the
        answer never lets our window free bytes before the server's does (a slow transfer included)."""
        entry[0] = max(entry[0], self._clock())

    def seconds_for(self, nbytes: int) -> float:
        """The least time ``nbytes`` of bodies take under this budget (for estimates)."""
        return max(0.0, (nbytes - self.max_bytes) / self.max_bytes * self.window_seconds)


class MailboxWriter:
    """Write operations on one mailbox (see the module docstring)."""

    def __init__(self, mb: MailboxGraph, budget: UploadBudget | None = None) -> None:
        self.mb = mb
        self.t = mb.t
        self.budget = budget or UploadBudget(mb.t.tenant.limits.upload_bytes_per_5min_per_mailbox,
                                             mb.t.upload_window_seconds)
        self.upload_clients: dict[str, httpx.AsyncClient] = {}
        self._base = f"{self.t.graph_url}/users/{quote(mb.user_id, safe='')}"

    @property
    def _adapter(self) -> Any:
        return self.mb._user.request_adapter  # the mailbox's own connection pool

    async def _send(self, kind: str, method: str, path: str, what: str, body: Any = None, *,
                    idempotent: bool = True) -> httpx.Response:
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None

        async def attempt() -> httpx.Response:
            # charged when it is sent (inside the limiter's slot), and again for every retry: the client's
            # window then runs in step with the server's
            if data is None or method not in ("POST", "PUT", "PATCH"):
                return await self.t.request(self._adapter, method, f"{self._base}/{path}", what, body=data)
            entry = await self.budget.acquire(len(data))
            try:
                return await self.t.request(self._adapter, method, f"{self._base}/{path}", what, body=data)
            finally:
                self.budget.settle(entry)

        return await self.mb._caller.call(kind, attempt, what, idempotent=idempotent)

    async def _json(self, kind: str, method: str, path: str, what: str, body: Any = None, *,
                    idempotent: bool = True) -> dict[str, Any]:
        return json_object(await self._send(kind, method, path, what, body, idempotent=idempotent), what)

    async def _pages(self, kind: str, path: str, what: str) -> AsyncIterator[list[dict[str, Any]]]:
        resp = await self._json(kind, "GET", path, what)
        paging = Paging(self.t.origin, what, MAX_MESSAGE_PAGES)
        while True:
            page = [v for v in _values(resp, what) if isinstance(v, dict)]
            yield page
            link = resp.get("@odata.nextLink")
            if not link:
                return
            url = paging.follow(link, empty_page=not page)
            resp = await self.mb._caller.call(
                kind, lambda: self.t.request(self._adapter, "GET", url, what), what)
            resp = json_object(resp, what)

    # -- folders ------------------------------------------------------------------------------------------
    async def get_folder(self, ref: str) -> dict[str, Any] | None:
        """A folder by id or well-known name (``inbox``, ``msgfolderroot``…), or None when there is none."""
        try:
            return await self._json("folders", "GET", f"mailFolders/{quote(ref, safe='')}?$select=id,displayName,"
                                    "parentFolderId", f"mailbox {self.mb.upn} folder {ref}")
        except NotFoundError:
            return None

    async def child_folders(self, parent_id: str | None) -> list[dict[str, Any]]:
        path = (f"mailFolders/{quote(parent_id, safe='')}/childFolders" if parent_id else "mailFolders")
        out: list[dict[str, Any]] = []
        async for page in self._pages("folders", f"{path}?$select=id,displayName,parentFolderId&$top=999",
                                      f"mailbox {self.mb.upn} folders"):
            out += page
        return out

    async def ensure_folder(self, parent_id: str | None, name: str) -> dict[str, Any]:
        """The child folder ``name`` of ``parent_id`` (None: the top level), created when missing. Creating
        is idempotent by nature: a second create answers 409 ErrorFolderExists, and the existing one is used."""
        what = f"mailbox {self.mb.upn} create folder {name!r}"
        path = f"mailFolders/{quote(parent_id, safe='')}/childFolders" if parent_id else "mailFolders"
        try:
            return await self._json("create_folder", "POST", path, what, {"displayName": name})
        except PermanentError as e:
            if e.status != 409:
                raise
        for f in await self.child_folders(parent_id):
            if str(f.get("displayName", "")).casefold() == name.casefold():
                return f
        raise PermanentError(f"{what}: Graph says it exists but it is not among the folder's children")

    # -- messages -----------------------------------------------------------------------------------------
    async def list_messages(self, folder_id: str, select: list[str], expand_property: str | None = None
                            ) -> AsyncIterator[list[dict[str, Any]]]:
        """A folder's messages, page by page (1,000 a page), with ``select`` and, when given, the value of
        one extended property (``$expand=singleValueExtendedProperties($filter=id eq '…')``)."""
        q = f"$select={','.join(select)}&$top=1000"
        if expand_property:
            q += f"&$expand=singleValueExtendedProperties($filter=id eq '{_odata(expand_property)}')"
        async for page in self._pages("messages", f"mailFolders/{quote(folder_id, safe='')}/messages?{q}",
                                      f"mailbox {self.mb.upn} folder {folder_id} messages"):
            yield page

    async def find_tagged(self, folder_id: str, prop: str, value: str) -> list[dict[str, Any]]:
        """Messages of the folder whose extended property ``prop`` is ``value``."""
        q = (f"$filter=singleValueExtendedProperties/Any(ep: ep/id eq '{_odata(prop)}' and ep/value eq "
             f"'{_odata(value)}')&$select=id")
        out: list[dict[str, Any]] = []
        async for page in self._pages("messages", f"mailFolders/{quote(folder_id, safe='')}/messages?{q}",
                                      f"mailbox {self.mb.upn} find {value}"):
            out += page
        return out

    async def create_message(self, folder_id: str, message: dict[str, Any]) -> dict[str, Any]:
        """POST the message JSON into the folder (not retried after an ambiguous failure: see the module)."""
        return await self._json("create_message", "POST", f"mailFolders/{quote(folder_id, safe='')}/messages",
                                f"mailbox {self.mb.upn} create message", message, idempotent=False)

    async def delete_message(self, message_id: str) -> None:
        try:
            await self._send("delete", "DELETE", f"messages/{quote(message_id, safe='')}",
                             f"mailbox {self.mb.upn} delete {message_id}")
        except NotFoundError:
            pass  # already gone (a retried delete, or someone else's)

    # -- attachments --------------------------------------------------------------------------------------
    async def list_attachments(self, message_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for page in self._pages("attachments", f"messages/{quote(message_id, safe='')}/attachments"
                                      "?$select=id,name,size,isInline,contentType",
                                      f"mailbox {self.mb.upn} attachments of {message_id}"):
            out += page
        return out

    async def add_attachment(self, message_id: str, attachment: dict[str, Any]) -> dict[str, Any]:
        """POST one attachment (a file under 3 MB as ``contentBytes``, or an item attachment)."""
        return await self._json("attachment", "POST", f"messages/{quote(message_id, safe='')}/attachments",
                                f"mailbox {self.mb.upn} attach {attachment.get('name')!r}", attachment,
                                idempotent=False)

    async def upload_attachment(self, message_id: str, item: dict[str, Any], data: bytes) -> None:
        """A file attachment of 3–150 MB: an upload session, then ``PUT``s of at most 4 MB with
        ``Content-Range`` to the session's URL — which carries its own authorisation: no token is sent."""
        what = f"mailbox {self.mb.upn} upload {item.get('name')!r}"
        session = await self._json("upload_session", "POST",
                                   f"messages/{quote(message_id, safe='')}/attachments/createUploadSession",
                                   what, {"AttachmentItem": {"attachmentType": "file", **item, "size": len(data)}})
        url = session.get("uploadUrl")
        if not isinstance(url, str):
            raise TransientError(f"{what}: createUploadSession answered no uploadUrl")
        client = self._upload_client(url, what)
        start = 0
        while start < len(data):
            end = min(start + UPLOAD_CHUNK, len(data))
            piece = data[start:end]
            headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "Content-Type": "application/octet-stream"}

            async def put(piece: bytes = piece, headers: dict[str, str] = headers) -> httpx.Response:
                entry = await self.budget.acquire(len(piece))
                try:
                    r = await client.put(url, content=piece, headers=headers)
                finally:
                    self.budget.settle(entry)
                raise_for_status(r, what, GraphOrigin(url))
                return r

            try:
                r = await self.mb._caller.call("upload_put", put, what)
            except NotFoundError:
                if end == len(data) and await self._has_attachment(message_id, item.get("name")):
                    return  # the last piece landed, its answer was lost, and the finished session is gone
                raise
            if r.status_code == 201:
                return
            nxt = _next_start(r, end)
            if nxt <= start:  # the session does not move on: give up rather than loop
                raise TransientError(f"{what}: the upload session keeps asking for bytes {nxt}- again")
            start = nxt
        raise TransientError(f"{what}: the upload session did not complete after the last piece")

    async def _has_attachment(self, message_id: str, name: Any) -> bool:
        return any(a.get("name") == name for a in await self.list_attachments(message_id))

    def _upload_client(self, url: str, what: str) -> httpx.AsyncClient:
        """A client *without credentials* for one upload session's origin (https, or http on loopback)."""
        u = urlsplit(url)
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        if u.scheme != "https" and not (u.scheme == "http" and loopback):
            raise UnsafeLinkError(f"{what}: refused an upload URL that is not https ({u.scheme}://{u.hostname})")
        origin = GraphOrigin(f"{u.scheme}://{u.netloc}{u.path}")
        key = f"{u.scheme}://{u.netloc}"
        c = self.upload_clients.get(key)
        if c is None:
            c = self.upload_clients[key] = httpx.AsyncClient(
                transport=GuardedTransport(origin_for_host(origin), self.t.timeouts, verify=self.t._verify,
                                           limits=httpx.Limits(max_connections=8)),
                timeout=client_timeout(self.t.timeouts), follow_redirects=False, trust_env=False)
        return c

    async def aclose(self) -> None:
        for c in self.upload_clients.values():
            await c.aclose()
        self.upload_clients.clear()


def origin_for_host(origin: GraphOrigin) -> GraphOrigin:
    """The upload host as a whole (any path on it): session URLs differ by path."""
    return GraphOrigin(f"{origin.scheme}://{origin.host}:{origin.port}/")


def _next_start(resp: httpx.Response, fallback: int) -> int:
    """Where the next piece starts, from the session's ``nextExpectedRanges`` (``["4194304-"]``)."""
    try:
        body = {k.lower(): v for k, v in json.loads(resp.content).items()}  # Outlook answers in PascalCase
        ranges = body.get("nextexpectedranges") or []
        return int(str(ranges[0]).split("-", 1)[0])
    except (ValueError, AttributeError, IndexError, TypeError):
        return fallback


def _odata(value: str) -> str:
    return value.replace("'", "''")


def file_attachment(name: str, content_type: str, data: bytes, *, is_inline: bool = False,
                    content_id: str | None = None) -> dict[str, Any]:
    """The JSON of a small file attachment (one POST)."""
    att: dict[str, Any] = {"@odata.type": "#microsoft.graph.fileAttachment", "name": name,
                           "contentType": content_type, "contentBytes": base64.b64encode(data).decode(),
                           "isInline": is_inline}
    if content_id:
        att["contentId"] = content_id
    return att
