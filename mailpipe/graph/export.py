"""The mailbox import/export API of Graph v1.0 (``/admin/exchange/mailboxes/{id}``): full-fidelity items of
every type, 20 per request (docs/GRAPH.md, "The mailbox import/export API").

Everything goes through the mailbox's :class:`MailboxGraph` — its limiter (4 in flight, the request window,
the Retry-After fence), its retries and error classes, the link-origin rule — and through msgraph-sdk's
builders where it has them (``users/{id}/settings/exchange``, ``folders/delta``, ``items/delta``,
``exportItems``, ``createImportSession``); responses are taken raw and parsed here, as the rest of the Graph
layer does (:meth:`GraphTenant.send`).

The import URL is the exception to the origin rule, as attachment upload URLs are (:mod:`mailpipe.graph.write`):
Graph hands it out on another host with its own token in it; it gets **no** bearer token, through a client
without credentials that talks to that one origin, and every POST to it is paced by the mailbox's upload budget.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from mailpipe.graph.client import (
    MAX_FOLDERS,
    MIN_DELTA_PAGES,
    NATIONAL_CLOUDS,
    MailboxGraph,
    Paging,
    _parse_dt,
    _str,
    _values,
    json_object,
    raise_for_status,
    walk_delta,
)
from mailpipe.graph.errors import (
    ForbiddenError,
    NotFoundError,
    ProtocolError,
    TransientError,
    UnsafeLinkError,
)
from mailpipe.graph.http import GraphOrigin, GuardedTransport, client_timeout

MAX_EXPORT_IDS = 20                      # Graph: "You can export up to 20 items in a single export request."
EXPORT_PERMISSIONS = ("MailboxItem.Export.All", "MailboxItem.ImportExport.All")  # either one exports
IMPORT_PERMISSION = "MailboxItem.ImportExport.All"
DELETE_PERMISSION = "MailboxItem.ReadWrite.All"   # DELETE folders/{id}/items/{id} (collisions: replace)
CONTENT_MODES = ("mime", "fidelity", "both")
# per-item errors of exportItems that a later attempt may not get (anything else is tried again)
PERMANENT_ITEM_ERRORS = {"errorcorruptdata", "erroraccessdenied", "errorinvalidid", "errorinvalididmalformed",
                         "errormessagesizeexceeded", "errorunsupportedtypeforconversion"}
NOT_FOUND_ITEM_ERRORS = {"erroritemnotfound", "errorobjectnotfound"}


@dataclass(frozen=True)
class ExportFolder:
    id: str
    parent_id: str | None
    display_name: str
    path: tuple[str, ...]
    folder_class: str | None          # IPF.Note, IPF.Appointment, IPF.Contact, IPF.Task, ...
    well_known: str | None
    total_item_count: int | None = None


@dataclass(frozen=True)
class ExportItemInfo:
    id: str
    item_type: str | None             # the message class: IPM.Note, IPM.Appointment, ...
    size: int | None
    change_key: str | None
    created_at: datetime | None
    last_modified_at: datetime | None
    categories: tuple[str, ...] = ()


@dataclass
class ItemDeltaPage:
    upserts: list[ExportItemInfo]
    removed: list[str]
    next_link: str | None
    delta_link: str | None            # relative to graph_url: how it is saved
    invalid: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ExportResult:
    """One item of an ``exportItems`` answer: its stream, or a per-item error (never a failed batch)."""

    item_id: str
    change_key: str | None
    data: bytes | None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None and self.error_code is None

    @property
    def not_found(self) -> bool:
        return (self.error_code or "").lower() in NOT_FOUND_ITEM_ERRORS

    @property
    def permanent(self) -> bool:
        return (self.error_code or "").lower() in PERMANENT_ITEM_ERRORS


@dataclass(frozen=True)
class ImportSession:
    url: str
    expires_at: datetime | None


def _item_info(m: dict[str, Any]) -> ExportItemInfo:
    """An item delta entry → :class:`ExportItemInfo`; fields of the wrong type are read as absent."""
    size, cats = m.get("size"), m.get("categories")
    return ExportItemInfo(m["id"], _str(m.get("type")), size if isinstance(size, int) and size >= 0 else None,
                          _str(m.get("changeKey")), _parse_dt(m.get("createdDateTime")),
                          _parse_dt(m.get("lastModifiedDateTime")),
                          tuple(c for c in cats if isinstance(c, str)) if isinstance(cats, list) else ())


def roles_from_token(token: str) -> set[str] | None:
    """The application permissions (``roles``) an Entra access token carries, or None when the token is not
    a readable JWT (a simulator's static token). Read for diagnostics only: never trusted for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    roles = payload.get("roles") if isinstance(payload, dict) else None
    if not isinstance(roles, list):
        return None if not isinstance(payload, dict) or "roles" not in payload else set()
    return {r for r in roles if isinstance(r, str)}


def missing_permissions(content: str, roles: set[str] | None, *, restore: bool = False) -> str | None:
    """What the app lacks for ``content`` (and a fidelity restore), as one sentence, or None. ``roles=None``
    (unknown) is never a problem here: the first export request tells."""
    if roles is None or content == "mime":
        return None
    if restore and IMPORT_PERMISSION not in roles:
        return (f"a fidelity restore needs the application permission {IMPORT_PERMISSION}; the app has "
                f"{', '.join(sorted(roles)) or 'none'}")
    if not any(r in roles for r in EXPORT_PERMISSIONS):
        return (f"content: {content} needs the application permission {EXPORT_PERMISSIONS[0]} (or "
                f"{EXPORT_PERMISSIONS[1]}); the app has {', '.join(sorted(roles)) or 'none'}")
    return None


async def check_permissions(mb: MailboxGraph, content: str, *, restore: bool = False) -> None:
    """Raise :class:`ForbiddenError` naming the missing permission when the tenant's token says it lacks
    what ``content`` needs; nothing when it has them or when the token does not say."""
    if content == "mime" and not restore:
        return
    host = mb.t.origin.host
    scope = f"https://{host}/.default" if host in NATIONAL_CLOUDS else "https://graph.microsoft.com/.default"
    try:
        tok = await mb.t.credential.get_token(scope)
    except Exception:  # noqa: BLE001 - authentication problems surface on the first request, classified
        return
    problem = missing_permissions(content, roles_from_token(getattr(tok, "token", "") or ""), restore=restore)
    if problem:
        raise ForbiddenError(f"tenant {mb.t.tenant.name}: {problem} (grant it in the app registration, with "
                             "admin consent)", status=403, code="MissingPermission")


def _forbidden(e: ForbiddenError, what: str, need: str) -> ForbiddenError:
    return ForbiddenError(f"{what}: Graph refused the mailbox export API ({e.status} {e.code}): the app needs the "
                          f"application permission {need} — {e}", status=e.status, code=e.code)


class MailboxExport:
    """The import/export API on one mailbox."""

    def __init__(self, mb: MailboxGraph, budget: Any = None) -> None:
        self.mb = mb
        self.t = mb.t
        self.budget = budget  # an UploadBudget (mailpipe.graph.write) for imports; made on first import
        self._mailbox_id: str | None = None
        self._root_id: str | None = None  # the root folder's id (the parent of top-level folders)
        self._import_clients: dict[str, httpx.AsyncClient] = {}

    async def _call(self, kind: str, fn: Any, what: str, *, need: str = EXPORT_PERMISSIONS[0],
                    idempotent: bool = True) -> Any:
        try:
            return await self.mb._caller.call(kind, fn, what, idempotent=idempotent)
        except ForbiddenError as e:
            raise _forbidden(e, what, need) from None

    def _config(self, query: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.t._config(query, headers)

    @property
    def _root(self) -> Any:
        return self.mb._user  # makes the mailbox's client (its own pool) on first use

    def _mailbox(self, mailbox_id: str) -> Any:
        return self.mb._client.admin.exchange.mailboxes.by_mailbox_id(mailbox_id)

    def _folders_url(self, mailbox_id: str) -> str:
        """The mailbox's ``folders`` URL, for requests msgraph-sdk has no builder for (sent by URL through the
        same adapter)."""
        from urllib.parse import quote

        return f"{self.t.graph_url}/admin/exchange/mailboxes/{quote(mailbox_id, safe=':@')}/folders"

    async def mailbox_id(self) -> str:
        """``GET /users/{id}/settings/exchange`` → ``primaryMailboxId`` (cached)."""
        if self._mailbox_id is None:
            what = f"mailbox {self.mb.upn} settings/exchange"
            b = self._root.settings.exchange
            d = await self._call("settings", lambda: self.t.get_json(b, self._config(), what), what)
            mid = d.get("primaryMailboxId")
            if not isinstance(mid, str) or not mid:
                raise ProtocolError(f"{what}: the answer has no primaryMailboxId")
            self._mailbox_id = mid
        return self._mailbox_id

    async def folders(self) -> list[ExportFolder]:
        """Every folder of the mailbox, of every class, with paths from the root: a folder delta from
        scratch (the whole hierarchy, flattened; a few requests whatever the mailbox size). A folder met twice
        or a parent that is never listed (a cycle, a broken tree) is a :class:`ProtocolError`."""
        mid = await self.mailbox_id()
        what = f"mailbox {self.mb.upn} export folders"
        b = self._mailbox(mid).folders.delta
        paging = Paging(self.t.origin, what, 10_000)
        resp = await self._call("mailbox_folder_delta", lambda: self.t.get_json(b, self._config(), what), what)
        raw: dict[str, dict[str, Any]] = {}
        while True:
            page = _values(resp, what)
            for f in page:
                if not isinstance(f, dict) or "@removed" in f:
                    continue
                fid = f.get("id")
                if not isinstance(fid, str) or not fid:
                    raise ProtocolError(f"{what}: a folder without an id")
                raw[fid] = f
                if len(raw) > MAX_FOLDERS:
                    raise ProtocolError(f"{what}: more than {MAX_FOLDERS:,} folders; stopped")
            nxt = resp.get("@odata.nextLink")
            if not nxt:
                if not resp.get("@odata.deltaLink"):
                    raise TransientError(f"{what}: a page without nextLink or deltaLink")
                break
            url = paging.follow(nxt, empty_page=not page)
            resp = await self._call("mailbox_folder_delta",
                                    lambda: self.t.get_json(b.with_url(url), self._config(), what), what)
        paths: dict[str, tuple[str, ...]] = {}

        def path(fid: str, depth: int = 0) -> tuple[str, ...]:
            if fid in paths:
                return paths[fid]
            if depth > 1000:
                raise ProtocolError(f"{what}: folder {fid} is inside itself")
            f = raw[fid]
            name = f.get("displayName") if isinstance(f.get("displayName"), str) else ""
            parent = f.get("parentFolderId")
            p = (*path(parent, depth + 1), name) if isinstance(parent, str) and parent in raw else (name,)
            paths[fid] = p
            return p

        roots = Counter(f.get("parentFolderId") for f in raw.values() if f.get("parentFolderId") not in raw)
        if roots:
            self._root_id = roots.most_common(1)[0][0]  # the parent of the top-level folders
        out = []
        for fid, f in raw.items():
            total = f.get("totalItemCount")
            out.append(ExportFolder(fid, _str(f.get("parentFolderId")), _str(f.get("displayName")) or "", path(fid),
                                    _str(f.get("type")), _str(f.get("wellKnownName")),
                                    total if isinstance(total, int) else None))
        return out

    async def item_delta(self, folder_id: str, link: str | None, *, page_size: int = 500,
                         expected_items: int | None = None) -> AsyncIterator[ItemDeltaPage]:
        """One folder's item delta, page by page, from ``link`` (a saved delta link, relative to graph_url) or
        from scratch — the rules of :meth:`MailboxGraph.message_delta`: every nextLink followed (pages may be
        empty), links on graph_url only and never repeating, :class:`ResyncRequired` for 410 and friends (and
        a 400/404 answered to a link Graph issued), the deltaLink returned relative to graph_url."""
        mid = await self.mailbox_id()
        builder = self._mailbox(mid).folders.by_mailbox_folder_id(folder_id).items.delta
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        what = f"mailbox {self.mb.upn} export folder {folder_id} delta"

        async def get(url: str | None) -> dict[str, Any]:
            b = builder if url is None else builder.with_url(url)
            return await self._call("mailbox_item_delta", lambda: self.t.get_json(b, self._config(None, headers), what),
                                    what)

        async for page in walk_delta(self.t, what, MIN_DELTA_PAGES + 2 * max(0, expected_items or 0), get, link,
                                     _item_info):
            yield ItemDeltaPage(*page)

    async def create_folder(self, parent_id: str | None, name: str, folder_class: str | None) -> str:
        """``POST folders`` (under the root) or ``folders/{id}/childFolders`` ``{displayName, type}`` → the new
        folder's id; a sibling of that name (409 ``ErrorFolderExists``, also after a create whose answer was
        lost) → that folder's id. msgraph-sdk has no builder for this POST: the request goes through the same
        adapter (auth, guarded transport) by URL. Needs ``MailboxFolder.ReadWrite.All``."""
        from urllib.parse import quote

        from mailpipe.graph.errors import GraphError as _GE

        mid = await self.mailbox_id()
        base = self._folders_url(mid)
        url = f"{base}/{quote(parent_id, safe='')}/childFolders" if parent_id else base
        what = f"mailbox {self.mb.upn} create folder {name!r}"
        body = json.dumps({"displayName": name, **({"type": folder_class} if folder_class else {})}).encode()
        try:
            resp = await self._call("mailbox_create_folder", lambda: self.t.request(
                self._root.request_adapter, "POST", url, what, body=body), what, need="MailboxFolder.ReadWrite.All",
                idempotent=False)
        except _GE as e:
            if e.status != 409 and not isinstance(e, TransientError):
                raise
            for f in await self.folders():  # it exists (maybe made by the request whose answer was lost)
                if f.parent_id == (parent_id or self._root_id) and f.display_name.casefold() == name.casefold():
                    return f.id
            raise
        d = json_object(resp, what)
        fid = d.get("id")
        if not isinstance(fid, str) or not fid:
            raise TransientError(f"{what}: the answer has no id")
        if parent_id is None and isinstance(d.get("parentFolderId"), str):
            self._root_id = d["parentFolderId"]
        return fid

    async def get_item(self, folder_id: str, item_id: str) -> dict[str, Any]:
        """``GET folders/{id}/items/{id}``: one item's metadata (``NotFoundError`` when Graph says it does not
        exist) — how a per-item ``ErrorItemNotFound`` of ``exportItems`` is told apart from a deleted item."""
        mid = await self.mailbox_id()
        what = f"mailbox {self.mb.upn} export item {item_id}"
        b = self._mailbox(mid).folders.by_mailbox_folder_id(folder_id).items.by_mailbox_item_id(item_id)
        return await self._call("mailbox_item", lambda: self.t.get_json(b, self._config(), what), what)

    async def delete_item(self, folder_id: str, item_id: str, *, disposal: str = "softDelete") -> bool:
        """``DELETE folders/{id}/items/{id}?disposalType=softDelete`` (recoverable: Exchange's soft-delete
        semantics; ``hardDelete`` only when asked). False when the item is already gone (404, also after a
        retry of a DELETE whose answer was lost). Needs ``MailboxItem.ReadWrite.All``. msgraph-sdk's builder has
        no ``disposalType`` (a required parameter): the request goes through the same adapter by URL."""
        from urllib.parse import quote

        if disposal not in ("softDelete", "hardDelete"):
            raise ValueError(f"disposal must be softDelete or hardDelete (got {disposal!r})")
        mid = await self.mailbox_id()
        url = (f"{self._folders_url(mid)}/{quote(folder_id, safe='')}/items/{quote(item_id, safe='')}"
               f"?disposalType={disposal}")
        what = f"mailbox {self.mb.upn} delete item {item_id}"
        try:
            await self._call("mailbox_item_delete", lambda: self.t.request(
                self._root.request_adapter, "DELETE", url, what), what, need=DELETE_PERMISSION)
        except NotFoundError:
            return False
        return True

    async def export_items(self, item_ids: list[str]) -> list[ExportResult]:
        """``POST exportItems`` for at most 20 ids: one :class:`ExportResult` per id asked, in that order.
        A per-item error (or an id the answer leaves out, or data that is not base64) is that item's result,
        never an exception; only a failure of the whole request raises (after the usual retries)."""
        from kiota_abstractions.native_response_handler import NativeResponseHandler
        from kiota_http.middleware.options import ResponseHandlerOption
        from msgraph.generated.admin.exchange.mailboxes.item.export_items.export_items_post_request_body import (
            ExportItemsPostRequestBody,
        )

        if not item_ids or len(item_ids) > MAX_EXPORT_IDS:
            raise ValueError(f"exportItems takes 1 to {MAX_EXPORT_IDS} ids (got {len(item_ids)})")
        mid = await self.mailbox_id()
        what = f"mailbox {self.mb.upn} exportItems ({len(item_ids)} items)"
        builder = self._mailbox(mid).export_items

        async def attempt() -> httpx.Response:
            info = builder.to_post_request_information(ExportItemsPostRequestBody(item_ids=list(item_ids)),
                                                       self._config())
            info.add_request_options([ResponseHandlerOption(NativeResponseHandler())])
            resp = await builder.request_adapter.send_primitive_async(info, "bytes", None)
            raise_for_status(resp, what, self.t.origin)
            return resp

        resp = await self._call("export", attempt, what)
        self.mb.stats.bytes_received += len(resp.content)
        body = json_object(resp, what)
        by_id: dict[str, ExportResult] = {}
        for v in _values(body, what):
            if not isinstance(v, dict) or not isinstance(v.get("itemId"), str):
                continue
            iid, ck, err = v["itemId"], _str(v.get("changeKey")), v.get("error")
            if isinstance(err, dict) and (err.get("code") or err.get("message")):
                by_id[iid] = ExportResult(iid, ck, None, _str(err.get("code")) or "Error", _str(err.get("message")))
                continue
            data = v.get("data")
            try:
                raw = base64.b64decode(data, validate=True) if isinstance(data, str) and data else None
            except (binascii.Error, ValueError):
                raw = None
            by_id[iid] = ExportResult(iid, ck, raw) if raw else ExportResult(
                iid, ck, None, "MailpipeBadData", "the answer's data is missing or not base64")
        return [by_id.get(i) or ExportResult(i, None, None, "MailpipeMissing", "the answer does not list this item")
                for i in item_ids]

    async def create_import_session(self) -> ImportSession:
        """``POST createImportSession`` → the import URL (its own token inside; valid until ``expires_at``)."""
        from kiota_abstractions.native_response_handler import NativeResponseHandler
        from kiota_http.middleware.options import ResponseHandlerOption

        mid = await self.mailbox_id()
        what = f"mailbox {self.mb.upn} createImportSession"
        builder = self._mailbox(mid).create_import_session

        async def attempt() -> httpx.Response:
            info = builder.to_post_request_information(self._config())
            info.add_request_options([ResponseHandlerOption(NativeResponseHandler())])
            resp = await builder.request_adapter.send_primitive_async(info, "bytes", None)
            raise_for_status(resp, what, self.t.origin)
            return resp

        d = json_object(await self._call("import_session", attempt, what, need=IMPORT_PERMISSION), what)
        url = d.get("importUrl")
        if not isinstance(url, str) or not url:
            raise TransientError(f"{what}: the answer has no importUrl")
        return ImportSession(url, _parse_dt(d.get("expirationDateTime")))

    async def import_item(self, session: ImportSession, folder_id: str, data: bytes, *, mode: str = "create",
                          item_id: str | None = None, change_key: str | None = None) -> tuple[str, str | None]:
        """POST one exported stream to the import URL → (new item id, its changeKey). Not idempotent: a
        timeout, reset or 5xx is raised for the caller to find out whether the item was created; only a 429
        (not processed) is retried. No bearer token is sent: the URL carries its own authorisation."""
        what = f"mailbox {self.mb.upn} import into {folder_id}"
        body: dict[str, Any] = {"FolderId": folder_id, "Mode": mode, "Data": base64.b64encode(data).decode()}
        if mode == "update":
            body.update(ItemId=item_id, ChangeKey=change_key)
        raw = json.dumps(body, separators=(",", ":")).encode()
        client = self._import_client(session.url, what)
        if self.budget is None:
            from mailpipe.graph.write import UploadBudget

            self.budget = UploadBudget(self.t.tenant.limits.upload_bytes_per_5min_per_mailbox,
                                       self.t.upload_window_seconds)

        async def attempt() -> httpx.Response:
            entry = await self.budget.acquire(len(raw))
            try:
                r = await client.post(session.url, content=raw, headers={"Content-Type": "application/json"})
            finally:
                self.budget.settle(entry)
            raise_for_status(r, what, GraphOrigin(session.url))
            return r

        d = json_object(await self._call("import", attempt, what, need=IMPORT_PERMISSION, idempotent=False), what)
        iid = d.get("itemId")
        if not isinstance(iid, str) or not iid:
            raise TransientError(f"{what}: the answer has no itemId")
        return iid, _str(d.get("changeKey"))

    def _import_client(self, url: str, what: str) -> httpx.AsyncClient:
        """A client *without credentials* for the import URL's origin (https, or http on loopback)."""
        from mailpipe.graph.write import origin_for_host

        u = urlsplit(url)
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        if u.scheme != "https" and not (u.scheme == "http" and loopback):
            raise UnsafeLinkError(f"{what}: refused an import URL that is not https ({u.scheme}://{u.hostname})")
        key = f"{u.scheme}://{u.netloc}"
        c = self._import_clients.get(key)
        if c is None:
            origin = GraphOrigin(f"{u.scheme}://{u.netloc}{u.path}")
            c = self._import_clients[key] = httpx.AsyncClient(
                transport=GuardedTransport(origin_for_host(origin), self.t.timeouts, verify=self.t._verify,
                                           limits=httpx.Limits(max_connections=8)),
                timeout=client_timeout(self.t.timeouts), follow_redirects=False, trust_env=False)
        return c

    async def aclose(self) -> None:
        for c in self._import_clients.values():
            await c.aclose()
        self._import_clients.clear()


__all__ = [
    "CONTENT_MODES", "DELETE_PERMISSION", "EXPORT_PERMISSIONS", "IMPORT_PERMISSION", "MAX_EXPORT_IDS", "ExportFolder", "ExportItemInfo",
    "ExportResult", "ImportSession", "ItemDeltaPage", "MailboxExport", "check_permissions", "missing_permissions",
    "roles_from_token",
]
