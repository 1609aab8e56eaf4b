"""The simulator's routes of Graph v1.0's mailbox import/export API (docs/SIMULATOR.md).

``GET /v1.0/users/{u}/settings/exchange`` → ``primaryMailboxId``; under
``/v1.0/admin/exchange/mailboxes/{mailbox id}``: ``folders`` (+ ``/{id}``, ``/{id}/childFolders``, ``/delta``),
``folders/{id}/items/delta`` and ``folders/{id}/items/{item id}`` (GET; DELETE with ``disposalType``),
``POST exportItems`` (≤ 20 ids, per-item errors inside a 200) and ``POST createImportSession`` → an ``importUrl``
on the upload origin with its own token, to which exported data is POSTed (``{FolderId, Mode, Data, ItemId?,
ChangeKey?}``).

Every route is admitted like the mail routes (the mailbox's concurrency and request window, the injected
faults); the import URL's POSTs are charged to the mailbox's upload budget too. The routes are the methods of
:class:`ExportApi` (``x_`` names), which :class:`~mailpipe.sim.server.SimServer` inherits.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from mailpipe.sim import fidelity
from mailpipe.sim.answers import Reset, graph_error, read_body, too_large
from mailpipe.sim.model import Mailbox, NotFound, TokenError

MAX_EXPORT_IDS = 20
MAX_IMPORT_BYTES = 150 * 1024 * 1024  # Exchange's largest message; no limit of the import URL is published
EXPORT_ROLES = ("MailboxItem.Export.All", "MailboxItem.ImportExport.All")
IMPORT_ROLES = ("MailboxItem.ImportExport.All",)
FOLDER_WRITE_ROLES = ("MailboxFolder.ReadWrite.All",)
ITEM_WRITE_ROLES = ("MailboxItem.ReadWrite.All",)  # DELETE of an item (its v1.0 page's application permission)
DISPOSAL_TYPES = ("softDelete", "hardDelete")
IMPORT_PATH = re.compile(r"/api/v1\.0/Mailboxes\('([^']*)'\)/importItem/?", re.I)  # on the upload origin
# per-item errors of exportItems (``fail_exports``): status -> (code, message)
_EXPORT_ERRORS = {
    404: ("ErrorItemNotFound", "The specified object was not found in the store."),
    500: ("ErrorCorruptData", "The item is corrupt and cannot be exported."),
    503: ("ErrorInternalServerTransientError", "A transient error occurred; try again later."),
    403: ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
}


@dataclass
class ImportSession:
    token: str
    user_id: str
    mailbox_id: str
    expires: float  # monotonic


def _err(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return graph_error(status, code, message, headers)


def kind(low: list[str], method: str) -> str:
    """The request kind counted in ``/_sim/stats`` for a route under ``admin/exchange/mailboxes/{id}``."""
    rest = low[4:]
    if rest == ["exportitems"] and method == "POST":
        return "export"
    if rest == ["createimportsession"] and method == "POST":
        return "import_session"
    if rest[:1] == ["folders"]:
        if rest[1:] == ["delta"]:
            return "mailbox_folder_delta"
        if method == "POST" and (len(rest) == 1 or rest[2:] == ["childfolders"]):
            return "mailbox_create_folder"
        if len(rest) >= 3 and rest[2] == "items":
            if method == "DELETE":
                return "mailbox_item_delete"
            return "mailbox_item_delta" if rest[3:] == ["delta"] else "mailbox_item"
        return "mailbox_folders"
    return "other"


async def _json(request: web.Request, limit: int) -> tuple[dict[str, Any] | None, int, web.Response | None]:
    raw, n = await read_body(request, limit)
    if raw is None:
        return None, n, too_large(n)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        return None, n, _err(400, "RequestBodyRead", f"The request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        return None, n, _err(400, "RequestBodyRead", "The request body must be a JSON object.")
    # parameter names are case-insensitive (msgraph-sdk sends "ItemIds", the documentation shows "itemIds")
    return {k.lower(): v for k, v in body.items()}, n, None


class ExportApi:
    """The export API's routes, a part of :class:`~mailpipe.sim.server.SimServer` (which inherits them, so
    ``self`` is the server: its model, limits, faults and counters)."""

    def _x_roles_problem(self, need: tuple[str, ...]) -> web.Response | None:
        roles = self.model.cfg.roles
        if roles is None or any(r in roles for r in need):
            return None
        return _err(403, "ErrorAccessDenied", f"Missing role permissions on the request. API requires one of "
                    f"'{', '.join(need)}'. Roles on the request '{', '.join(roles)}'.")

    def x_find_mailbox(self, mbx: str) -> Mailbox:
        for mb in self.model.mailboxes.values():
            if mb.x_mailbox_id().lower() == mbx.lower():
                return mb
        raise NotFound(mbx)

    async def x_route(self, request: web.Request, segs: list[str], low: list[str]) -> web.StreamResponse:
        """``segs`` = ``admin/exchange/mailboxes/{id}/...`` (already authorized)."""
        self.total += 1
        if len(segs) < 5:
            return _err(400, "BadRequest", "Listing mailboxes is not supported by the simulator.")
        try:
            mb = self.x_find_mailbox(segs[3])
        except NotFound:
            self.requests["_tenant"]["other"] += 1
            return _err(404, "ErrorInvalidMailbox", f"The mailbox '{segs[3]}' was not found.")
        user = mb.user
        k = kind(low, request.method)
        self.requests[user.id][k] += 1
        problem = self._x_roles_problem({"import_session": IMPORT_ROLES, "mailbox_create_folder": FOLDER_WRITE_ROLES,
                                       "mailbox_item_delete": ITEM_WRITE_ROLES}.get(k, EXPORT_ROLES))
        if problem is not None:
            return problem
        return await self._limited(user, lambda: self._x_route(request, mb, segs[4:], low[4:]))

    async def _x_route(self, request: web.Request, mb: Mailbox, segs: list[str], low: list[str]):
        try:
            if request.method == "POST" and low == ["exportitems"]:
                return await self.x_export_items(request, mb)
            if request.method == "POST" and low == ["createimportsession"]:
                return self.x_create_import_session(mb)
            if request.method == "POST" and low == ["folders"]:
                return await self.x_create_folder(request, mb, mb.root_id)
            if request.method == "POST" and len(low) == 3 and low[0] == "folders" and low[2] == "childfolders":
                return await self.x_create_folder(request, mb, mb.x_any_folder(segs[1])[0].id)
            if request.method == "DELETE" and len(low) == 4 and low[0] == "folders" and low[2] == "items":
                return await self.x_delete_item(request, mb, segs[1], segs[3])
            if request.method == "GET" and low[:1] == ["folders"]:
                if len(low) == 1:
                    return self.x_folder_list(request, mb, mb.root_id)
                if low[1:] == ["delta"]:
                    return self.x_folder_delta(request, mb)
                f, _ = mb.x_any_folder(segs[1])
                if len(low) == 2:
                    with mb.lock:
                        return web.json_response(mb.x_folder_json(f, mb.x_item_counts()))
                if low[2:] == ["childfolders"]:
                    return self.x_folder_list(request, mb, f.id)
                if low[2:] == ["items", "delta"]:
                    return self.x_item_delta(request, mb, f.id)
                if low[2] == "items" and len(low) == 4:
                    it = mb.x_find_item(segs[3])
                    if it is None or it.folder != f.id:
                        raise NotFound(segs[3])
                    with mb.lock:
                        return web.json_response(mb.x_item_json(it))
        except NotFound as e:
            return _err(404, "ErrorItemNotFound", f"The specified object was not found in the store. ({e})")
        return _err(400, "BadRequest", f"The simulator does not support {request.method} on this resource.")

    async def x_delete_item(self, request: web.Request, mb: Mailbox, folder: str, item_id: str) -> web.Response:
        """``DELETE folders/{id}/items/{id}?disposalType=softDelete|hardDelete`` → 204. The simulator has no
        recoverable-items folder: either way the item leaves the mailbox (a removal in its folder's delta)."""
        disposal = request.query.get("disposalType")
        if disposal not in DISPOSAL_TYPES:
            return _err(400, "ErrorInvalidRequest", "The query parameter 'disposalType' is required and must be one "
                        f"of {', '.join(DISPOSAL_TYPES)} (got {disposal!r}).")
        with mb.lock:  # the check and the delete at once: an item moved or deleted meanwhile is a 404
            f, _ = mb.x_any_folder(folder)
            it = mb.x_find_item(item_id)
            if it is None or it.folder != f.id:
                raise NotFound(item_id)
            op = {"op": "delete", "ids": [it.id]} if it.id in mb.msgs else {"op": "delete_item", "ids": [it.id]}
            self.model.mutate(mb.user.id, [op])
        self.deleted_items[mb.user.id] += 1
        return web.Response(status=204)

    def _x_base(self, mb: Mailbox) -> str:
        return f"{self.base_url}/v1.0/admin/exchange/mailboxes/{mb.x_mailbox_id()}"

    def x_folder_list(self, request: web.Request, mb: Mailbox, parent: str) -> web.Response:
        top = min(int(request.query.get("$top", "10")), 999)
        skip = int(request.query.get("$skip", "0") or 0)
        with mb.lock:
            kids = sorted(mb.x_children(parent), key=lambda f: f.id)
            counts = mb.x_item_counts()
            page = [mb.x_folder_json(f, counts) for f in kids[skip:skip + top]]
        body: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(mailboxFolder)",
                                "value": page}
        if skip + top < len(kids):
            body["@odata.nextLink"] = f"{self.base_url}{request.path}?$top={top}&$skip={skip + top}"
        return web.json_response(body)

    def x_folder_delta(self, request: web.Request, mb: Mailbox) -> web.Response:
        tok = request.query.get("$deltatoken") or request.query.get("$skiptoken")
        try:
            state = self.model.decode_token(mb, "__xfolders__", tok) if tok else None
        except TokenError as e:
            return self._sync_state_not_found(mb, e)
        with mb.lock:
            changed, gone, nxt = mb.x_folder_delta(state)
            counts = mb.x_item_counts()
            value = [mb.x_folder_json(f, counts) for f in changed]
        value += [{"id": fid, "@removed": {"reason": "deleted"}} for fid in gone]
        link = self.model.encode_token(mb, "__xfolders__", nxt, True)
        return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(mailboxFolder)",
                                  "value": value,
                                  "@odata.deltaLink": f"{self._x_base(mb)}/folders/delta()?$deltatoken={link}"})

    def x_item_delta(self, request: web.Request, mb: Mailbox, fid: str) -> web.Response:
        tok = request.query.get("$skiptoken") or request.query.get("$deltatoken")
        key = "x:" + fid  # export-API tokens are not message-delta tokens, and the other way round
        state = None
        if tok:
            try:
                body = self.model.decode_token(mb, key, tok)
            except TokenError as e:
                return self._sync_state_not_found(mb, e)
            state = {k: body[k] for k in ("w", "hi", "ph", "c") if k in body}
        base = f"{self._x_base(mb)}/folders/{fid}/items/delta()"
        p_empty = self.faults.p_empty_page
        if state is not None and "hi" in state and p_empty and self.rng.random() < p_empty:
            self.injected[mb.user.id]["empty_page"] += 1
            skip = self.model.encode_token(mb, key, state, True)
            return web.json_response({"value": [], "@odata.nextLink": f"{base}?$skiptoken={skip}"})
        with mb.lock:
            upserts, removed, nxt = mb.x_delta_page(fid, state, self._page_size(request))
            value = [mb.x_item_json(it) for it in upserts]
        value += [{"id": iid, "@removed": {"reason": "deleted"}} for iid in removed]
        link = self.model.encode_token(mb, key, nxt, True)
        out: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(mailboxItem)",
                               "value": value}
        if "hi" in nxt:
            out["@odata.nextLink"] = f"{base}?$skiptoken={link}"
        else:
            out["@odata.deltaLink"] = f"{base}?$deltatoken={link}"
        return web.json_response(out)

    async def x_export_items(self, request: web.Request, mb: Mailbox) -> web.StreamResponse:
        from mailpipe.sim.posted import MAX_REQUEST_BYTES

        body, _, bad = await _json(request, MAX_REQUEST_BYTES)
        if bad is not None:
            return bad
        ids = body.get("itemids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            return _err(400, "ErrorInvalidRequest", "'itemIds' must be a non-empty collection of item ids.")
        if len(ids) > MAX_EXPORT_IDS:
            return _err(400, "ErrorInvalidRequest", f"The maximum size of 'itemIds' is {MAX_EXPORT_IDS} "
                        f"(got {len(ids)}).")
        f, inj = self.faults, self.injected[mb.user.id]
        with mb.lock:
            found = [(iid, mb.x_find_item(iid)) for iid in ids]
        value = []
        for iid, it in found:
            status = f.fail_exports.get(iid)
            p_item = f.p_export_item_error
            if status is None and it is not None and p_item and self.rng.random() < p_item:
                status = 503
                inj["export_item_error"] += 1
            elif status is not None:
                inj["fail_export"] += 1
            if it is None:
                status = 404
            if status is not None:
                code, msg = _EXPORT_ERRORS.get(int(status), _EXPORT_ERRORS[503])
                value.append({"itemId": iid, "error": {"code": code, "message": msg}})
                continue
            with mb.lock:
                ck = mb.x_item_change_key(it)
            big = not isinstance(it, fidelity.XItem) and it.huge
            if big:
                import asyncio

                data = await asyncio.get_running_loop().run_in_executor(None, fidelity.stream, mb, it)
            else:
                data = mb.x_stream(it)
            self.export_downloads[mb.user.id][iid] += 1
            self.export_bytes[mb.user.id] += len(data)
            value.append({"itemId": iid, "changeKey": ck, "data": base64.b64encode(data).decode()})
        out = json.dumps({"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(microsoft.graph."
                                            "exportItemResponse)", "value": value}).encode()
        return await self._send_bytes(request, mb, out, "application/json")

    async def x_create_folder(self, request: web.Request, mb: Mailbox, parent: str) -> web.Response:
        """``POST folders`` / ``folders/{id}/childFolders`` ``{"displayName", "type"?}`` → 201 with the folder. The
        class defaults to IPF.Note; a mail folder (IPF.Note) only under the root or another mail folder (the
        simulator's mail routes keep a tree of their own); a sibling of the same name → 409 ErrorFolderExists."""
        from mailpipe.sim.posted import MAX_REQUEST_BYTES

        body, bad = await self._x_charged_json(request, mb, MAX_REQUEST_BYTES)
        if bad is not None:
            return bad
        name, cls = body.get("displayname"), body.get("type") or "IPF.Note"
        if not isinstance(name, str) or not name.strip():
            return _err(400, "ErrorInvalidRequest", "A folder needs a non-empty 'displayName'.")
        if cls not in fidelity.ITEM_CLASS:
            return _err(400, "ErrorInvalidRequest", f"The simulator creates folders of class "
                        f"{', '.join(fidelity.ITEM_CLASS)} (got {cls!r}).")
        with mb.lock:
            if any(f.name.casefold() == name.casefold() for f in mb.x_children(parent)):
                return _err(409, "ErrorFolderExists", "A folder with the specified name already exists.")
            if cls == "IPF.Note":
                if parent != mb.root_id and parent not in mb.folders:
                    return _err(400, "ErrorInvalidRequest", "The simulator keeps mail folders (IPF.Note) under the "
                                "root or another mail folder.")
                fid = self.model.mutate(mb.user.id, [{"op": "create_folder", "parent": parent, "name": name}])[0]
            else:
                fid = self.model.mutate(mb.user.id, [{"op": "create_xfolder", "parent": parent, "name": name,
                                                     "class": cls}])[0]
            f, _ = mb.x_any_folder(fid)
            d = mb.x_folder_json(f, mb.x_item_counts())
        self.created_folders[mb.user.id] += 1
        return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#mailboxFolder", **d}, status=201)

    def x_create_import_session(self, mb: Mailbox) -> web.Response:
        token = secrets.token_urlsafe(24)
        life = self.limits.import_session_seconds
        mbx = mb.x_mailbox_id()
        self.import_sessions[token] = ImportSession(token, mb.user.id, mbx, time.monotonic() + life)
        expires = (datetime.now(timezone.utc) + timedelta(seconds=life)).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
        self.import_session_count[mb.user.id] += 1
        return web.json_response({
            "@odata.context": f"{self.base_url}/v1.0/$metadata#microsoft.graph.mailboxItemImportSession",
            "importUrl": f"{self.upload_base_url}/api/v1.0/Mailboxes('{mbx}')/importItem?authtoken={token}",
            "expirationDateTime": expires}, status=201)

    def x_expire_sessions(self, user_ref: str) -> int:
        """Expire every import session of a mailbox now (``/_sim/expire_import_sessions``): their URLs answer
        401 ``ExpiredAuthenticationToken`` from then on."""
        uid = self.model.user(user_ref).id
        doomed = [t for t, s in self.import_sessions.items() if s.user_id == uid]
        for t in doomed:
            self.import_sessions.pop(t)
            self.expired_import_tokens[t] = uid
        return len(doomed)

    async def x_handle_import(self, request: web.Request, mbx: str) -> web.StreamResponse:
        """POST on an import URL (the upload origin): its own token in the URL, no ``Authorization`` header."""
        sess = self.import_sessions.get(request.query.get("authtoken", ""))
        who = sess.user_id if sess else "_unknown"
        if "Authorization" in request.headers:
            self.upload_with_bearer[who] += 1
            await read_body(request, 0)
            return _err(401, "InvalidAudience", "This import URL is pre-authenticated (authtoken): requests to it "
                        "must not carry an Authorization header.")
        if sess is None and self.expired_import_tokens.get(request.query.get("authtoken", "")):
            self.import_expired[self.expired_import_tokens[request.query["authtoken"]]] += 1
            await read_body(request, 0)
            return _err(401, "ExpiredAuthenticationToken", "The import URL's token has expired: create a new "
                        "import session.")
        if sess is None or sess.mailbox_id.lower() != unquote(mbx).lower():
            await read_body(request, 0)
            return _err(401, "InvalidAuthenticationToken", "The import URL's token is not valid.")
        if sess.expires <= time.monotonic():
            self.import_sessions.pop(sess.token, None)
            self.expired_import_tokens[sess.token] = sess.user_id
            self.import_expired[sess.user_id] += 1
            await read_body(request, 0)
            return _err(401, "ExpiredAuthenticationToken", "The import URL's token has expired: create a new "
                        "import session.")
        if request.method != "POST":
            return _err(405, "ErrorInvalidRequest", "An import URL takes POST.")
        user = self.model.user(sess.user_id)
        self.total += 1
        self.requests[user.id]["import"] += 1
        return await self._limited(user, lambda: self._x_import(request, self.model.mailbox(user.id)))

    async def _x_charged_json(self, request: web.Request, mb: Mailbox,
                              limit: int) -> tuple[dict[str, Any], web.Response | None]:
        """A write's JSON body, its bytes charged to the mailbox's upload budget; or the answer refusing it."""
        body, n, bad = await _json(request, limit)
        return body or {}, bad if bad is not None else self._charge_upload(mb.user.id, n)

    async def _x_import(self, request: web.Request, mb: Mailbox) -> web.Response:
        body, bad = await self._x_charged_json(request, mb, MAX_IMPORT_BYTES)
        if bad is not None:
            return bad
        mode, fid, data_b64 = body.get("mode"), body.get("folderid"), body.get("data")
        item_id, change_key = body.get("itemid"), body.get("changekey")
        if mode not in ("create", "update"):
            return _err(400, "ErrorInvalidRequest", "'Mode' must be 'create' or 'update'.")
        if not isinstance(fid, str) or not fid or not isinstance(data_b64, str) or not data_b64:
            return _err(400, "ErrorInvalidRequest", "'FolderId' and 'Data' are required.")
        if mode == "create" and (item_id or change_key):
            return _err(400, "ErrorInvalidRequest", "'ItemId' and 'ChangeKey' are not allowed in create mode.")
        if mode == "update" and not (item_id and change_key):
            return _err(400, "ErrorInvalidRequest", "'ItemId' and 'ChangeKey' are required in update mode.")
        try:
            props, _ = fidelity.decode(base64.b64decode(data_b64, validate=True))
        except (binascii.Error, ValueError) as e:
            return _err(400, "ErrorInvalidRequest", f"'Data' is not a valid FastTransfer stream ({e}).")
        try:
            with mb.lock:
                f, is_mail = mb.x_any_folder(fid)
                cls = f.cls if not is_mail else "IPF.Note"
                if not props["type"].startswith(fidelity.ITEM_CLASS[cls]):
                    return _err(400, "ErrorInvalidRequest", f"An item of class {props['type']} cannot be imported into "
                                f"a folder of class {cls} (the simulator keeps items in folders of their class).")
                if mode == "update":
                    it = mb.x_find_item(item_id)
                    if it is None or it.folder != f.id or mb.x_item_change_key(it) != change_key:
                        return _err(400, "ErrorIrresolvableConflict", "No item with this ItemId and ChangeKey in "
                                    "the folder.")
        except NotFound:
            return _err(404, "ErrorItemNotFound", f"The folder '{fid}' was not found in the mailbox.")
        op = {"op": "import_item", "folder": f.id, "data": data_b64, "at": datetime.now(timezone.utc).isoformat()}
        if mode == "update":
            op["id"] = item_id
        iid = (await self._apply(mb, [op], big=len(data_b64) > 1024 * 1024))[0]
        self.imported_items[mb.user.id] += 1
        if self.faults.p_lost_import and self.rng.random() < self.faults.p_lost_import:
            self.injected[mb.user.id]["lost_import"] += 1
            raise Reset()  # made, but the client never hears of it
        with mb.lock:
            ck = mb.x_item_change_key(mb.x_find_item(iid))
        return web.json_response({"@odata.context": f"{self.upload_base_url}/api/v1.0/$metadata#microsoft.graph."
                                                    "importMailboxItemResponse", "itemId": iid, "changeKey": ck})
