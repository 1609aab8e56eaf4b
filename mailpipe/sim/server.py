"""The simulator's HTTP server: Graph v1.0 mail routes, OAuth routes, faults, limits and /_sim admin.

Routing is done by hand on a normalised path (``//`` collapsed, ``mailfolders('id')`` → ``mailfolders/id``,
``delta()`` → ``delta``, keywords case-insensitive) because that is what Graph accepts and what the SDK
and real nextLinks send.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import math
import random
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mailpipe.sim import export_api, posted
from mailpipe.sim.answers import Reset, graph_error, read_body, too_large
from mailpipe.sim.model import Mailbox, Msg, NotFound, TenantModel, TokenError
from mailpipe.sim.posted import MAX_REQUEST_BYTES, GraphError


def _checked(cls: Any, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)``, refusing unknown option names with a clear message."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return cls(**d)


# what a gateway in front of Exchange answers with a 200 instead of the item (``bad_values``, ``p_*_value``)
_BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "html": (b"<!DOCTYPE html>\r\n<html><head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
             b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>Microsoft-Azure-Application-Gateway/v2"
             b"</center>\r\n</body>\r\n</html>\r\n", "text/html; charset=utf-8"),
    "empty": (b"", "text/plain"),
}

# how an unusable (expired, unknown, tampered, foreign) delta token is answered: Graph sends all three
_TOKEN_ERRORS: dict[int, tuple[str, str]] = {
    410: ("SyncStateNotFound", "The sync state could not be found ({}); restart the synchronization from an "
                               "empty token."),
    400: ("ErrorInvalidRequest", "The delta token is invalid. ({})"),
    404: ("ErrorItemNotFound", "The sync state could not be found. ({})"),
}

# the error code Exchange gives a failing item (``fail_messages``, ``fail_values``)
_ITEM_ERRORS = {500: "ErrorCorruptData", 404: "ErrorItemNotFound", 403: "ErrorAccessDenied"}


@dataclass
class FaultConfig:
    """Faults injected into mailbox endpoints (docs/SIMULATOR.md), all off by default.

    Probabilities are drawn from the server's seeded RNG, and a probability that is 0 draws nothing: a new
    fault kind never shifts the random stream (so the behaviour) of the older ones."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    p_429: float = 0.0
    retry_after_s: float = 1.0
    p_503: float = 0.0
    p_504: float = 0.0
    p_reset: float = 0.0
    p_slow_body: float = 0.0
    slow_body_ms: float = 500.0
    p_empty_page: float = 0.0
    fail_messages: dict[str, int] = field(default_factory=dict)  # immutable id -> status, forever
    fail_users: dict[str, int] = field(default_factory=dict)     # upn -> status for every mail endpoint
    # faults of GET .../messages/{id}/$value only: the item's metadata GET keeps answering 200, which is how a
    # client tells a transient or body-only failure from a deleted item
    p_404_value: float = 0.0    # 404 ErrorItemNotFound for an item that exists (replication lag, item being moved)
    fail_values: dict[str, int] = field(default_factory=dict)    # immutable id -> status of its $value, forever
    bad_values: dict[str, str] = field(default_factory=dict)     # immutable id -> "html" | "empty", with a 200
    p_html_value: float = 0.0   # a 200 whose body is a gateway's HTML error page
    p_empty_value: float = 0.0  # a 200 with an empty body
    trickle_values: list[str] = field(default_factory=list)      # immutable ids whose $value drips 1 byte at a time
    trickle_interval_s: float = 5.0
    # delta
    expired_token_status: int = 410  # how an unusable delta token is answered: 410, 400 or 404 (Graph sends all 3)
    p_item_without_id: float = 0.0   # a message delta upsert sent without its "id"
    # the export API (exportItems): per-item errors inside a 200 answer
    fail_exports: dict[str, int] = field(default_factory=dict)   # item id -> status (404, 500, 503, 403), forever
    p_export_item_error: float = 0.0  # a transient per-item error (ErrorInternalServerTransientError)
    # the import URL: an item imported, then the connection dropped before the answer (the client cannot know)
    p_lost_import: float = 0.0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.bad_values.items() if v not in _BAD_BODIES}
        if bad:
            raise ValueError(f"bad_values: {bad} (each must be one of {', '.join(sorted(_BAD_BODIES))})")
        if self.expired_token_status not in _TOKEN_ERRORS:
            raise ValueError(f"expired_token_status {self.expired_token_status!r} is not one of "
                             f"{', '.join(map(str, sorted(_TOKEN_ERRORS)))}")
        if self.trickle_interval_s <= 0:
            raise ValueError("trickle_interval_s must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultConfig:
        return _checked(cls, d, "fault")


@dataclass
class LimitConfig:
    """Exchange's per-mailbox limits (docs/SIMULATOR.md): concurrency, a sliding request window, and the upload
    budget of the write API (request bodies of POST/PUT/PATCH, upload-URL PUTs included)."""

    concurrent_per_mailbox: int = 4
    window_requests: int = 10000
    window_seconds: float = 600.0
    max_page_size: int = 1000
    default_page_size: int = 10
    upload_bytes: int = 150 * 1024 * 1024       # 157,286,400 bytes of request bodies...
    upload_window_seconds: float = 300.0        # ...per 5 minutes, sliding
    upload_session_seconds: float = 900.0       # lifetime of an attachment upload session (not extended by PUTs)
    import_session_seconds: float = 3600.0      # lifetime of an import session's importUrl (its own token)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LimitConfig:
        return _checked(cls, d, "limit")


def _item_error(status: int, message: str) -> web.Response:
    code = _ITEM_ERRORS.get(status, "ServiceUnavailable" if status >= 500 else "ErrorInvalidRequest")
    return graph_error(status, code, message)


class _MailboxCounters:
    __slots__ = ("inflight", "max_seen", "window", "uploads", "upload_sum")

    def __init__(self) -> None:
        self.inflight = 0
        self.max_seen = 0
        self.window: deque[float] = deque()
        self.uploads: deque[tuple[float, int]] = deque()  # (time, request body bytes) in the upload window
        self.upload_sum = 0


@dataclass
class _UploadSession:
    """An attachment upload session: the bytes received so far (in order) and where it belongs."""

    id: str
    token: str
    user_id: str
    message_id: str  # immutable id
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    expires: float  # monotonic
    expires_iso: str
    buf: bytearray = field(default_factory=bytearray)


def _oauth_error(error: str, code: int, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": f"AADSTS{code}: {description}",
                              "error_codes": [code]}, status=401 if error == "invalid_client" else 400)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class SimServer(export_api.ExportApi):
    """The aiohttp application around a :class:`TenantModel`."""

    def __init__(self, model: TenantModel, faults: FaultConfig, limits: LimitConfig, *, oauth: bool,
                 clients: dict[str, str], token_lifetime_s: int, base_url: str = "",
                 client_certificates: dict[str, str] | None = None) -> None:
        self.model = model
        self.faults = faults
        self.limits = limits
        self.oauth = oauth
        self.clients = clients
        self.client_certs = {cid: x509.load_pem_x509_certificate(pem.encode())
                             for cid, pem in (client_certificates or {}).items()}
        self.token_lifetime_s = token_lifetime_s
        self.base_url = base_url
        self.rng = random.Random(model.cfg.seed ^ 0x5EED)
        self.tokens: dict[str, float] = {}  # issued access token -> expiry (monotonic)
        self.last_request = time.monotonic()
        self.counters: dict[str, _MailboxCounters] = defaultdict(_MailboxCounters)
        self.upload_sessions: dict[str, _UploadSession] = {}
        self.import_sessions: dict[str, export_api.ImportSession] = {}
        self.expired_import_tokens: dict[str, str] = {}  # token -> user id, once expired (401 from then on)
        self.reset_stats()
        self.app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        # the upload URLs of attachment sessions live on another origin, as Exchange's do (outlook.office.com):
        # the embedding code serves this app on a second 127.0.0.1 port and sets upload_base_url
        self.upload_app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        self.upload_app.router.add_route("*", "/{tail:.*}", self.handle_upload)
        self.upload_base_url = ""

    # stats --------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.requests: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.throttled: dict[str, int] = defaultdict(int)
        self.injected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.mime_downloads: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.total = 0
        # the write API
        self.uploaded_bytes: dict[str, int] = defaultdict(int)
        self.created_messages: dict[str, int] = defaultdict(int)
        self.created_folders: dict[str, int] = defaultdict(int)
        self.attachments_added: dict[str, int] = defaultdict(int)
        self.updated_messages: dict[str, int] = defaultdict(int)
        self.deleted_messages: dict[str, int] = defaultdict(int)
        self.upload_puts: dict[str, int] = defaultdict(int)
        self.upload_ranges: dict[str, dict[str, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
        self.upload_session_info: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.upload_with_bearer: dict[str, int] = defaultdict(int)
        self.upload_throttled: dict[str, int] = defaultdict(int)
        # the export/import API
        self.export_downloads: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.export_bytes: dict[str, int] = defaultdict(int)
        self.imported_items: dict[str, int] = defaultdict(int)
        self.deleted_items: dict[str, int] = defaultdict(int)    # DELETEs of the export API's items
        self.import_session_count: dict[str, int] = defaultdict(int)
        self.import_expired: dict[str, int] = defaultdict(int)  # POSTs with an expired import token (401)
        for c in getattr(self, "counters", {}).values():
            c.max_seen = c.inflight

    def stats(self) -> dict[str, Any]:
        upn = {u.id: u.upn for u in self.model.users}
        return {
            "total_requests": self.total,
            "requests": {upn.get(k, k): dict(v) for k, v in self.requests.items()},
            "max_concurrency": {upn.get(k, k): c.max_seen for k, c in self.counters.items()},
            "throttled": {upn.get(k, k): v for k, v in self.throttled.items()},
            "faults_injected": {upn.get(k, k): dict(v) for k, v in self.injected.items()},
            "bytes_served": {upn.get(k, k): v for k, v in self.bytes_served.items()},
            "mime_downloads": {upn.get(k, k): dict(v) for k, v in self.mime_downloads.items()},
            **{name: {upn.get(k, k): v for k, v in getattr(self, name).items()}
               for name in ("uploaded_bytes", "created_messages", "created_folders", "attachments_added",
                            "updated_messages", "deleted_messages", "upload_puts", "upload_with_bearer",
                            "upload_throttled", "export_bytes", "imported_items", "deleted_items")},
            "export_downloads": {upn.get(k, k): dict(v) for k, v in self.export_downloads.items()},
            "import_sessions": {upn.get(k, k): v for k, v in self.import_session_count.items()},
            "import_expired": {upn.get(k, k): v for k, v in self.import_expired.items()},
            "upload_ranges": {upn.get(k, k): {sid: [list(r) for r in rs] for sid, rs in v.items()}
                              for k, v in self.upload_ranges.items()},
            "upload_sessions": {upn.get(k, k): {sid: dict(i) for sid, i in v.items()}
                                for k, v in self.upload_session_info.items()},
        }

    # entry point --------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.last_request = time.monotonic()
        raw = request.rel_url.raw_path
        path = re.sub(r"/+", "/", raw)
        path = re.sub(r"\('([^']*)'\)", lambda m: "/" + m.group(1), path)
        path = re.sub(r"(?i)/delta\(\)", "/delta", path).rstrip("/")
        segs = [quote_unescape(s) for s in path.split("/")[1:]]
        try:
            if segs and segs[0] == "_sim":
                return await self.admin(request, segs[1:])
            if segs and segs[0].lower() == "v1.0":
                return await self.graph(request, segs[1:])
            if len(segs) >= 2 and segs[-3:] == ["oauth2", "v2.0", "token"] and self.oauth:
                return await self.token(request, segs[-4])
            if len(segs) >= 3 and segs[-2:] == [".well-known", "openid-configuration"] and self.oauth:
                return self.openid(request, segs[0])
            return graph_error(404, "UnknownPath", f"no such route: {request.method} {raw}")
        except Reset:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError() from None

    # OAuth --------------------------------------------------------------------------------------------
    def _issuer(self, tenant: str) -> str:
        return f"{self.base_url}/{tenant}/v2.0"

    def openid(self, request: web.Request, tenant: str) -> web.Response:
        b = self.base_url
        return web.json_response({
            "token_endpoint": f"{b}/{tenant}/oauth2/v2.0/token",
            "authorization_endpoint": f"{b}/{tenant}/oauth2/v2.0/authorize",
            "issuer": self._issuer(tenant), "jwks_uri": f"{b}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "response_types_supported": ["code", "token"], "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"], "tenant_region_scope": "EU",
        })

    async def token(self, request: web.Request, tenant: str) -> web.Response:
        """Client credentials grant with a client secret, or with a certificate (a signed JWT client
        assertion, ``private_key_jwt``: RS256 + ``x5t`` or PS256 + ``x5t#S256``), as Entra ID accepts."""
        form = await request.post()
        self.requests["_tenant"]["token"] += 1
        cid = str(form.get("client_id", ""))
        if form.get("grant_type") != "client_credentials":
            return _oauth_error("unsupported_grant_type", 9002313, "Invalid request: only client_credentials.")
        if "client_assertion" in form:
            problem = self._check_assertion(cid, str(form.get("client_assertion_type", "")),
                                            str(form["client_assertion"]), f"{self.base_url}/{tenant}/oauth2/v2.0/token")
            if problem:
                return _oauth_error("invalid_client", *problem)
        elif cid not in self.clients or not secrets.compare_digest(str(self.clients[cid]),
                                                                    str(form.get("client_secret", ""))):
            return _oauth_error("invalid_client", 7000215, "Invalid client secret provided. Ensure the secret "
                                "being sent in the request is the client secret value, not the client secret ID.")
        tok = "simtok." + secrets.token_urlsafe(24)
        self.tokens[tok] = time.monotonic() + self.token_lifetime_s
        return web.json_response({"token_type": "Bearer", "expires_in": self.token_lifetime_s,
                                  "ext_expires_in": self.token_lifetime_s, "access_token": tok})

    def _check_assertion(self, cid: str, kind: str, assertion: str, audience: str) -> tuple[int, str] | None:
        """``None`` if ``assertion`` is a valid client assertion for ``cid``, else (AADSTS code, message)."""
        import jwt

        if kind != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return 70002, f"client_assertion_type {kind!r} is not supported."
        cert = self.client_certs.get(cid)
        if cert is None:
            return 700027, "Client assertion failed signature validation. [Reason - The key was not found.]"
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return 50027, "Invalid JWT token. Token format not valid."
        thumbs = {"x5t": _b64url(cert.fingerprint(hashes.SHA1())),  # noqa: S303 - Entra's legacy thumbprint
                  "x5t#S256": _b64url(cert.fingerprint(hashes.SHA256()))}
        # azure-identity keeps the base64 padding, MSAL strips it; Entra takes both
        if not any(str(header.get(h, "")).rstrip("=") == v for h, v in thumbs.items()):
            return 700027, "Client assertion failed signature validation. [Reason - The key was not found.]"
        try:
            claims = jwt.decode(assertion, cert.public_key(), algorithms=["RS256", "PS256"], audience=audience,
                                issuer=cid, options={"require": ["exp", "aud", "iss", "sub"]}, leeway=300)
        except jwt.ExpiredSignatureError:
            return 700024, "Client assertion is not within its valid time range."
        except jwt.InvalidAudienceError:
            return 700212, f"No matching federated identity record found for presented assertion audience. " \
                           f"[expected {audience}]"
        except jwt.PyJWTError as e:
            return 700027, f"Client assertion failed signature validation. [Reason - {type(e).__name__}]"
        if claims.get("sub") != cid:
            return 700021, "Client assertion application identifier doesn't match 'client_id' parameter."
        return None

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) < 8:
            return False
        if not self.oauth:
            return True
        exp = self.tokens.get(auth[7:])
        return exp is not None and exp > time.monotonic()

    # Graph --------------------------------------------------------------------------------------------
    async def graph(self, request: web.Request, segs: list[str]) -> web.StreamResponse:
        if not self._authorized(request):
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty, expired or invalid.")
        low = [s.lower() for s in segs]
        if low[:3] == ["admin", "exchange", "mailboxes"]:
            return await self.x_route(request, segs, low)
        if not low or low[0] != "users":
            return graph_error(400, "BadRequest", "Resource not found for the segment.")
        if len(segs) == 1:
            self.requests["_tenant"]["users"] += 1
            self.total += 1
            return self.list_users(request)
        try:
            user = self.model.user(segs[1])
        except NotFound:
            self.total += 1
            return graph_error(404, "Request_ResourceNotFound", f"Resource '{segs[1]}' does not exist.")
        if len(segs) == 2:
            self.requests["_tenant"]["users"] += 1
            self.total += 1
            return web.json_response(self.user_json(user, request.query.get("$select")))
        kind = _kind(low[2:], request.method, "$filter" in request.query)
        self.total += 1
        self.requests[user.id][kind] += 1
        mb = self.model.mailboxes.get(user.id)
        if mb is None:
            return graph_error(404, "MailboxNotEnabledForRESTAPI", "The mailbox is either inactive, soft-deleted, "
                                                                   "or is hosted on-premise.")
        return await self._limited(user, lambda: self.mailbox_route(request, mb, segs[2:], low[2:]))

    async def _limited(self, user: Any, call: Any) -> web.StreamResponse:
        """``call()`` under the mailbox's limits and injected faults, as Exchange admits every request to a
        mailbox (Graph's, and the upload URL's PUTs)."""
        # per-mailbox limits, as Exchange enforces them (counted before admission: what clients attempted)
        c = self.counters[user.id]
        c.inflight += 1
        c.max_seen = max(c.max_seen, c.inflight)
        try:
            now = time.monotonic()
            win = c.window
            while win and win[0] <= now - self.limits.window_seconds:
                win.popleft()
            if c.inflight > self.limits.concurrent_per_mailbox:
                self.throttled[user.id] += 1
                return graph_error(429, "ApplicationThrottled",
                                   "Application is over its MailboxConcurrency limit.", {"Retry-After": "1"})
            if len(win) >= self.limits.window_requests:
                self.throttled[user.id] += 1
                wait = max(1, int(win[0] + self.limits.window_seconds - now + 0.999))
                return graph_error(429, "ApplicationThrottled", "Application is over its MailboxRequests limit.",
                                   {"Retry-After": str(wait)})
            win.append(now)
            f = self.faults
            if f.latency_ms or f.jitter_ms:
                await asyncio.sleep(max(0.0, f.latency_ms + self.rng.uniform(-f.jitter_ms, f.jitter_ms)) / 1000)
            if user.upn in f.fail_users:
                st = int(f.fail_users[user.upn])
                self.injected[user.id][str(st)] += 1
                return graph_error(st, "ErrorInternalServerError" if st >= 500 else "ErrorAccessDenied",
                                   "Injected failure for this mailbox.")
            r = self.rng.random()
            for p, what in ((f.p_429, "429"), (f.p_503, "503"), (f.p_504, "504"), (f.p_reset, "reset")):
                if r < p:
                    self.injected[user.id][what] += 1
                    if what == "429":
                        self.throttled[user.id] += 1
                        return graph_error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency "
                                           "limit.", {"Retry-After": f"{f.retry_after_s:g}"})
                    if what == "503":
                        return graph_error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
                    if what == "504":
                        return graph_error(504, "GatewayTimeout", "The gateway timed out.")
                    raise Reset()
                r -= p
            return await call()
        finally:
            c.inflight -= 1

    def list_users(self, request: web.Request) -> web.Response:
        top = min(int(request.query.get("$top", "100")), 999)
        skip = int(request.query.get("$skiptoken", "0") or 0)
        sel = request.query.get("$select")
        users = self.model.users[skip:skip + top]
        body: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#users",
                                "value": [self.user_json(u, sel) for u in users]}
        if skip + top < len(self.model.users):
            q = f"$top={top}&$skiptoken={skip + top}" + (f"&$select={quote(sel)}" if sel else "")
            body["@odata.nextLink"] = f"{self.base_url}/v1.0/users?{q}"
        return web.json_response(body)

    def user_json(self, u: Any, select: str | None) -> dict[str, Any]:
        d = {"id": u.id, "userPrincipalName": u.upn, "displayName": u.display_name,
             "mail": u.upn if u.kind != "nomailbox" else None, "accountEnabled": u.kind != "shared",
             "userType": "Member"}
        return _select(d, select)

    async def mailbox_route(self, request: web.Request, mb: Mailbox, segs: list[str], low: list[str]):
        immutable = "immutableid" in request.headers.get("Prefer", "").lower()
        try:
            if request.method not in ("GET", "HEAD"):
                return await self.write_route(request, mb, segs, low, immutable)
            if low == ["messages"]:
                return self.message_list(request, mb, None, immutable)
            if low == ["settings", "exchange"]:
                return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#users('{mb.user.id}')"
                                                            "/settings/exchange/$entity",
                                          "primaryMailboxId": mb.x_mailbox_id()})
            if low[:1] == ["mailfolders"]:
                if len(segs) == 1:
                    return self.folder_list(request, mb, mb.root_id)
                if low[1] == "delta" and len(segs) == 2:
                    return self.folder_delta(request, mb)
                fid = mb.folder_id(segs[1])
                if len(segs) == 2:
                    return web.json_response(mb.folder_json(mb.folders[fid], mb.folder_counts()))
                if low[2] == "childfolders" and len(segs) == 3:
                    return self.folder_list(request, mb, fid)
                if low[2] == "messages":
                    if len(segs) == 4 and low[3] == "delta":
                        return await self.message_delta(request, mb, fid, immutable)
                    if len(segs) == 3:
                        return self.message_list(request, mb, fid, immutable)
                    return await self.message_route(request, mb, segs[3:], low[3:], immutable)
            if low[:1] == ["messages"] and len(segs) >= 2:
                return await self.message_route(request, mb, segs[1:], low[1:], immutable)
        except NotFound as e:
            return graph_error(404, "ErrorItemNotFound", f"The specified object was not found in the store. ({e})")
        except GraphError as e:
            return graph_error(e.status, e.code, e.message)
        return graph_error(400, "BadRequest", "Unsupported segment.")

    # folders --------------------------------------------------------------------------------------------
    def folder_list(self, request: web.Request, mb: Mailbox, parent: str) -> web.Response:
        top = min(int(request.query.get("$top", "10")), 999)
        skip = int(request.query.get("$skip", "0") or 0)
        with mb.lock:
            kids = sorted(mb.children(parent), key=lambda f: f.id)
            counts = mb.folder_counts()
            page = [_select(mb.folder_json(f, counts), request.query.get("$select")) for f in kids[skip:skip + top]]
        body: dict[str, Any] = {"value": page}
        if skip + top < len(kids):
            body["@odata.nextLink"] = f"{self.base_url}{request.path}?$top={top}&$skip={skip + top}"
        return web.json_response(body)

    def folder_delta(self, request: web.Request, mb: Mailbox) -> web.Response:
        tok = request.query.get("$deltatoken") or request.query.get("$skiptoken")
        try:
            state = self.model.decode_token(mb, "__folders__", tok) if tok else None
        except TokenError as e:
            return self._sync_state_not_found(mb, e)
        with mb.lock:
            changed, gone, nxt = mb.folder_delta(state)
            counts = mb.folder_counts()
            value = [mb.folder_json(f, counts) for f in changed]
        value += [{"id": fid, "@removed": {"reason": "deleted"}} for fid in gone]
        link = self.model.encode_token(mb, "__folders__", nxt, True)
        return web.json_response({
            "value": value,
            "@odata.deltaLink": f"{self.base_url}/v1.0/users/{mb.user.id}/mailFolders/delta()?$deltatoken={link}",
        })

    # messages -------------------------------------------------------------------------------------------
    def _rest_id(self, m: Msg, immutable: bool) -> str:
        if immutable:
            return m.id
        return hashlib.sha256(m.folder.encode()).hexdigest()[:8] + "." + m.id

    def _resolve(self, mb: Mailbox, mid: str) -> Msg:
        with mb.lock:
            if "." in mid:
                fh, imm = mid.split(".", 1)
                m = mb.msgs.get(imm)
                if m is None or hashlib.sha256(m.folder.encode()).hexdigest()[:8] != fh:
                    raise NotFound(mid)  # a moved message's old REST id is gone
                return m
            m = mb.msgs.get(mid)
            if m is None:
                raise NotFound(mid)
            return m

    def _sync_state_not_found(self, mb: Mailbox, e: Exception) -> web.Response:
        """An unusable delta token: 410 ``SyncStateNotFound`` with a ``Location`` (the documented answer), or,
        with ``expired_token_status``, the 400 / 404 Graph also sends for the same condition."""
        st = self.faults.expired_token_status
        code, message = _TOKEN_ERRORS[st]
        if st != 410:
            self.injected[mb.user.id][f"token_{st}"] += 1
            return graph_error(st, code, message.format(e))
        return graph_error(410, code, message.format(e), {"Location": f"{self.base_url}/v1.0/"})

    def _page_size(self, request: web.Request) -> int:
        n = self.limits.default_page_size
        m = re.search(r"odata\.maxpagesize=(\d+)", request.headers.get("Prefer", ""), re.I)
        if m:
            n = int(m.group(1))
        elif request.query.get("$top"):
            n = int(request.query["$top"])
        return max(1, min(n, self.limits.max_page_size))

    async def message_delta(self, request: web.Request, mb: Mailbox, fid: str, immutable: bool) -> web.Response:
        tok = request.query.get("$skiptoken") or request.query.get("$deltatoken")
        select = request.query.get("$select")
        state = None
        if tok:
            try:
                body = self.model.decode_token(mb, fid, tok)
            except TokenError as e:
                return self._sync_state_not_found(mb, e)
            immutable = bool(body.pop("i")) or immutable
            select = body.pop("s", None)
            state = {k: body[k] for k in ("w", "hi", "ph", "c") if k in body}
        base = f"{self.base_url}/v1.0/users/{mb.user.id}/mailFolders('{fid}')/messages/delta()"
        if state is not None and "hi" in state and self.rng.random() < self.faults.p_empty_page:
            nxt = self.model.encode_token(mb, fid, {**state, **({"s": select} if select else {})}, immutable)
            self.injected[mb.user.id]["empty_page"] += 1
            return web.json_response({"value": [], "@odata.nextLink": f"{base}?$skiptoken={nxt}"})
        with mb.lock:
            upserts, removed, nxt_state = mb.delta_page(fid, state, self._page_size(request))
            value = [_select(mb.message_json(m, self._rest_id(m, immutable)), select, keep=("id",))
                     for m in upserts]
        if self.faults.p_item_without_id:
            for v in value:
                if self.rng.random() < self.faults.p_item_without_id:
                    del v["id"]
                    self.injected[mb.user.id]["item_without_id"] += 1
        value += [{"id": self._rest_id_removed(mid, immutable), "@removed": {"reason": "deleted"}} for mid in removed]
        extra = {"s": select} if select else {}
        link = self.model.encode_token(mb, fid, {**nxt_state, **extra}, immutable)
        out: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(message)", "value": value}
        if "hi" in nxt_state:
            out["@odata.nextLink"] = f"{base}?$skiptoken={link}"
        else:
            out["@odata.deltaLink"] = f"{base}?$deltatoken={link}"
        return web.json_response(out)

    def _rest_id_removed(self, mid: str, immutable: bool) -> str:
        return mid  # Graph reports removals with the id the client knew; with immutable ids that is this one

    def message_list(self, request: web.Request, mb: Mailbox, fid: str | None, immutable: bool) -> web.Response:
        """A folder's messages (``fid``) or the whole mailbox's, newest first, with ``$top``/``$skip`` paging,
        ``$select``, ``$filter`` (the collision lookups: :func:`posted.parse_filter`) and ``$expand`` of
        extended properties."""
        q = request.query
        top = min(int(q.get("$top", "10")), 1000)
        skip = int(q.get("$skip", "0") or 0)
        pred, hint = posted.parse_filter(q["$filter"]) if q.get("$filter") else (None, None)
        expand = q.get("$expand")
        want = posted.parse_expand(expand) if expand else None
        with mb.lock:
            cands = mb.candidates(**hint) if hint else mb.msgs.values()
            msgs = sorted((m for m in cands if (fid is None or m.folder == fid) and (pred is None or pred(mb, m))),
                          key=lambda m: (m.received, m.id), reverse=True)
            page = [self._message_out(mb, m, immutable, q.get("$select"), expand is not None, want)
                    for m in msgs[skip:skip + top]]
        body: dict[str, Any] = {"value": page}
        if skip + top < len(msgs):
            extra = "".join(f"&{k}={quote(q[k], safe='')}" for k in ("$select", "$filter", "$expand") if q.get(k))
            body["@odata.nextLink"] = f"{self.base_url}{request.path}?$top={top}&$skip={skip + top}{extra}"
        return web.json_response(body)

    def _message_out(self, mb: Mailbox, m: Msg, immutable: bool, select: str | None, expand: bool,
                     want: set[str] | None) -> dict[str, Any]:
        """A message's JSON with ``$select`` applied and, when ``expand``, the wanted extended properties
        (``want``; None: all). Graph leaves ``singleValueExtendedProperties`` out when none matches."""
        d = _select(mb.message_json(m, self._rest_id(m, immutable)), select)
        if expand:
            vals = [{"id": pid, "value": v} for pid, v in sorted(mb.ext_props(m).items())
                    if want is None or pid in want]
            if vals:
                d["singleValueExtendedProperties"] = vals
        return d

    async def message_route(self, request: web.Request, mb: Mailbox, segs: list[str], low: list[str],
                            immutable: bool) -> web.StreamResponse:
        m = self._resolve(mb, segs[0])
        if m.id in self.faults.fail_messages:
            return _item_error(int(self.faults.fail_messages[m.id]), "Injected failure for this item.")
        if len(segs) == 1:
            expand = request.query.get("$expand")
            want = posted.parse_expand(expand) if expand else None
            with mb.lock:
                d = self._message_out(mb, m, immutable, request.query.get("$select"), expand is not None, want)
            return web.json_response(d)
        if low[1] == "$value" and len(segs) == 2:
            faulty = self._value_fault(mb, m)
            if faulty is not None:
                return faulty
            data = await asyncio.get_running_loop().run_in_executor(None, mb.mime, m) \
                if m.huge else mb.mime(m)
            self.mime_downloads[mb.user.id][m.id] += 1
            if m.id in self.faults.trickle_values:
                return await self._trickle(request, mb, m.id, data, "text/plain")
            return await self._send_bytes(request, mb, data, "text/plain", watch=m.id)
        if low[1] == "attachments":
            atts = self._attachment_list(mb, m)
            if len(segs) == 2:
                return web.json_response({"value": [_att_json(i, a, with_bytes=len(a[2]) < 3_000_000)
                                                    for i, a in enumerate(atts)]})
            idx = _att_index(segs[2], len(atts))
            if len(segs) == 3:
                return web.json_response(_att_json(idx, atts[idx], with_bytes=True))
            if len(segs) == 4 and low[3] == "$value":
                return await self._send_bytes(request, mb, atts[idx][2], atts[idx][1])
        return graph_error(400, "BadRequest", "Unsupported segment.")

    def _value_fault(self, mb: Mailbox, m: Msg) -> web.Response | None:
        """The answer of an injected ``$value`` fault other than a slow body, or ``None`` (serve the item).

        Deterministic faults first (``fail_values``, ``bad_values``), then the random ones, each drawing from
        the RNG only when its probability is not 0."""
        f, inj = self.faults, self.injected[mb.user.id]
        if m.id in f.fail_values:
            inj["fail_value"] += 1
            return _item_error(int(f.fail_values[m.id]), "Injected failure for this item's content.")
        if f.p_404_value and self.rng.random() < f.p_404_value:
            inj["404_value"] += 1
            return _item_error(404, "The specified object was not found in the store. (injected, transient)")
        bad = f.bad_values.get(m.id)
        if bad is None and f.p_html_value and self.rng.random() < f.p_html_value:
            bad = "html"
        if bad is None and f.p_empty_value and self.rng.random() < f.p_empty_value:
            bad = "empty"
        if bad is None:
            return None
        inj[f"{bad}_value"] += 1
        body, ctype = _BAD_BODIES[bad]
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _send_bytes(self, request: web.Request, mb: Mailbox, data: bytes, ctype: str,
                          watch: str | None = None) -> web.StreamResponse:
        """Send ``data``: at once, in 1 MB pieces when big, or in 10 pieces with pauses (``p_slow_body``).

        A slow body of item ``watch`` stops with an aborted connection if the item is deleted meanwhile."""
        self.bytes_served[mb.user.id] += len(data)
        f = self.faults
        slow = f.p_slow_body and self.rng.random() < f.p_slow_body
        if not slow and len(data) < 4 * 1024 * 1024:
            return web.Response(body=data, content_type=ctype)
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Content-Length": str(len(data))})
        await resp.prepare(request)
        pieces = 10 if slow else max(1, len(data) // (1024 * 1024))
        step = max(1, -(-len(data) // pieces))
        if slow:
            self.injected[mb.user.id]["slow_body"] += 1
        try:
            for i in range(0, len(data), step):
                if slow and i:
                    self._abort_if_deleted(mb, watch)
                await resp.write(data[i:i + step])
                if slow:
                    await asyncio.sleep(f.slow_body_ms / 1000 / pieces)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away: nothing to send it, nothing to report
        return resp

    async def _trickle(self, request: web.Request, mb: Mailbox, mid: str, data: bytes,
                       ctype: str) -> web.StreamResponse:
        """``trickle_values``: the headers with the full ``Content-Length``, then 1 byte every
        ``trickle_interval_s`` (a broken or hostile server: a client without a deadline for the whole body
        waits for hours). Stops quietly when the client disconnects, aborts when the item is deleted."""
        self.bytes_served[mb.user.id] += len(data)
        self.injected[mb.user.id]["trickle_value"] += 1
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Content-Length": str(len(data))})
        try:
            await resp.prepare(request)
            for i in range(len(data)):
                # sleep in short steps so that a client that gave up frees its mailbox slot at once
                deadline = time.monotonic() + self.faults.trickle_interval_s
                while (left := deadline - time.monotonic()) > 0:
                    if request.transport is None or request.transport.is_closing():
                        return resp
                    await asyncio.sleep(min(left, 0.05))
                self._abort_if_deleted(mb, mid)
                await resp.write(data[i:i + 1])
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    def _abort_if_deleted(self, mb: Mailbox, mid: str | None) -> None:
        """Between two pieces of a slow body: if the item was deleted meanwhile (``mutate`` ``delete`` or
        ``delete_folder``), drop the connection, so the client sees an incomplete body (``deleted_mid_body``)."""
        if mid is not None and mid not in mb.msgs:
            self.injected[mb.user.id]["deleted_mid_body"] += 1
            raise Reset()

    # the write API (restore) ---------------------------------------------------------------------------------
    async def write_route(self, request: web.Request, mb: Mailbox, segs: list[str], low: list[str],
                          immutable: bool) -> web.StreamResponse:
        """POST/PATCH/DELETE of the write API. The body is read (413 above Graph's 4 MB), charged to the
        mailbox's upload budget (429 beyond it), then the change goes through the model's mutation log."""
        method = request.method
        raw = b""
        if method in ("POST", "PATCH", "PUT"):
            raw, n = await read_body(request, MAX_REQUEST_BYTES)
            if raw is None:
                return too_large(n)
            refused = self._charge_upload(mb.user.id, n)
            if refused is not None:
                return refused
        folder_ref = "drafts"  # POST /messages creates in Drafts
        if low[0] == "mailfolders":
            if len(low) == 1 and method == "POST":
                return await self.create_folder(request, mb, mb.root_id, raw)
            if len(low) == 3 and low[2] == "childfolders" and method == "POST":
                return await self.create_folder(request, mb, mb.folder_id(segs[1]), raw)
            if len(low) >= 3 and low[2] == "messages":
                folder_ref = segs[1]
                segs, low = segs[2:], low[2:]
        if low[0] == "messages":
            if len(low) == 1 and method == "POST":
                return await self.create_message(request, mb, raw, immutable, mb.folder_id(folder_ref))
            if len(low) >= 2:
                return await self.message_write(request, mb, segs[1:], low[1:], raw, immutable)
        return graph_error(405, "ErrorInvalidRequest", f"The simulator does not support {method} on this resource.")

    def _charge_upload(self, uid: str, n: int) -> web.Response | None:
        """Charge ``n`` request-body bytes to the mailbox's upload budget (sliding ``upload_window_seconds``);
        beyond ``upload_bytes``: 429 with ``Retry-After`` = seconds until enough of the budget frees. A request
        when nothing is charged in the window is always admitted (so one bigger than the budget can pass)."""
        if n <= 0:
            return None
        c, lim = self.counters[uid], self.limits
        now = time.monotonic()
        while c.uploads and c.uploads[0][0] <= now - lim.upload_window_seconds:
            c.upload_sum -= c.uploads.popleft()[1]
        if c.uploads and c.upload_sum + n > lim.upload_bytes:
            need, freed, wait = c.upload_sum + n - lim.upload_bytes, 0, 0.0
            for t, k in c.uploads:
                freed += k
                wait = t + lim.upload_window_seconds - now
                if freed >= need:
                    break
            self.throttled[uid] += 1
            self.upload_throttled[uid] += 1
            return graph_error(429, "ApplicationThrottled",
                               f"Application is over its MailboxUploadLimit limit ({lim.upload_bytes} bytes of "
                               f"request bodies per {lim.upload_window_seconds:g} s).",
                               {"Retry-After": str(max(1, math.ceil(wait)))})
        c.uploads.append((now, n))
        c.upload_sum += n
        self.uploaded_bytes[uid] += n
        return None

    async def _apply(self, mb: Mailbox, ops: list[dict[str, Any]], big: bool = False) -> list[Any]:
        """Apply (and log, with ``state_dir``) ops through the model; big ones off the event loop."""
        if big:
            return await asyncio.get_running_loop().run_in_executor(None, self.model.mutate, mb.user.id, ops)
        return self.model.mutate(mb.user.id, ops)

    async def create_folder(self, request: web.Request, mb: Mailbox, parent: str, raw: bytes) -> web.Response:
        body = _json_body(raw)
        for k in body:
            if k not in ("displayName", "isHidden") and not k.startswith("@odata."):
                raise posted._no_such_property(k, "microsoft.graph.mailFolder")
        name = body.get("displayName")
        if not isinstance(name, str) or not name.strip():
            raise GraphError(400, "ErrorInvalidRequest", "A folder needs a non-empty 'displayName'.")
        with mb.lock:  # the check and the creation at once (no await in between)
            if any(f.name.casefold() == name.casefold() for f in mb.children(parent)):
                return graph_error(409, "ErrorFolderExists", "A folder with the specified name already exists.")
            fid = self.model.mutate(mb.user.id, [{"op": "create_folder", "parent": parent, "name": name}])[0]
            d = mb.folder_json(mb.folders[fid], mb.folder_counts())
        self.created_folders[mb.user.id] += 1
        return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#users('{mb.user.id}')/"
                                                    "mailFolders/$entity", **d}, status=201)

    async def create_message(self, request: web.Request, mb: Mailbox, raw: bytes, immutable: bool,
                             folder: str) -> web.Response:
        """POST a message JSON (Exchange's rules: :mod:`mailpipe.sim.posted`) → 201 with the new item."""
        if request.content_type == "text/plain":
            raise GraphError(400, "ErrorInvalidRequest", "The simulator does not implement creating a message from "
                             "base64 MIME (Content-Type: text/plain; Exchange makes such an item a draft): post the "
                             "message as JSON.")
        content = posted.parse_message(_json_body(raw))
        op = {"op": "post_message", "folder": folder, "message": content, "at": _now()}
        mid = (await self._apply(mb, [op], big=len(raw) > 1024 * 1024))[0]
        self.created_messages[mb.user.id] += 1
        self.attachments_added[mb.user.id] += len(content["attachments"])
        with mb.lock:
            d = mb.message_json(mb.msgs[mid], self._rest_id(mb.msgs[mid], immutable))
        return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#users('{mb.user.id}')/"
                                                    "messages/$entity", **d}, status=201)

    async def message_write(self, request: web.Request, mb: Mailbox, segs: list[str], low: list[str], raw: bytes,
                            immutable: bool) -> web.StreamResponse:
        m = self._resolve(mb, segs[0])
        if m.id in self.faults.fail_messages:
            return _item_error(int(self.faults.fail_messages[m.id]), "Injected failure for this item.")
        method, rest = request.method, low[1:]
        uid = mb.user.id
        if not rest and method == "PATCH":
            return await self.update_message(mb, m, _json_body(raw), immutable)
        if (not rest and method == "DELETE") or (len(rest) == 1 and rest[0] in _DELETE_ACTIONS and method == "POST"):
            await self._apply(mb, [{"op": "delete", "ids": [m.id]}])
            self.deleted_messages[uid] += 1
            return web.Response(status=204)
        if rest == ["attachments"] and method == "POST":
            _need_posted(m)
            att = posted.parse_attachment(_json_body(raw))
            aid = (await self._apply(mb, [{"op": "add_attachment", "id": m.id, "attachment": att, "at": _now()}],
                                     big=len(raw) > 1024 * 1024))[0]
            self.attachments_added[uid] += 1
            with mb.lock:
                idx = _att_index(aid, len(m.posted.attachments))
                a = m.posted.attachments[idx]
                d = _att_json(idx, _att_tuple(mb, m, idx), with_bytes=a.kind == "file")
            d["lastModifiedDateTime"] = posted.iso(a.modified)
            return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#users('{uid}')/messages"
                                                        f"('{segs[0]}')/attachments/$entity", **d}, status=201)
        if len(rest) == 2 and rest[0] == "attachments" and rest[1] in _WRITE_ACTIONS and method == "POST":
            _need_posted(m)
            return self.create_upload_session(mb, m, segs[0], _json_body(raw))
        return graph_error(405, "ErrorInvalidRequest", f"The simulator does not support {method} on this resource.")

    async def update_message(self, mb: Mailbox, m: Msg, body: dict[str, Any], immutable: bool) -> web.Response:
        """PATCH: isRead, flag, categories, importance and extended properties on any item; subject, body,
        internetMessageId and the addresses only on a draft (a non-draft: 400
        ``ErrorInvalidPropertyUpdateSentMessage``, as Exchange answers)."""
        changes = posted.parse_message(body, patch=True)
        draft_only = sorted(k for k in body if k in posted.PATCH_DRAFT_ONLY)
        if draft_only and not m.is_draft:
            raise GraphError(400, "ErrorInvalidPropertyUpdateSentMessage",
                             f"Update operation is not allowed on a sent (non-draft) message for the property "
                             f"'{draft_only[0]}'.")
        if draft_only and m.posted is None:
            raise GraphError(400, "ErrorInvalidRequest", "The simulator cannot change the content of its seeded "
                             "drafts through PATCH (use /_sim/mutate edit_draft).")
        await self._apply(mb, [{"op": "update_message", "id": m.id, "changes": changes, "at": _now()}])
        self.updated_messages[mb.user.id] += 1
        with mb.lock:
            d = mb.message_json(m, self._rest_id(m, immutable))
        return web.json_response(d)

    def create_upload_session(self, mb: Mailbox, m: Msg, rest_id: str, body: dict[str, Any]) -> web.Response:
        """``attachments/createUploadSession``: an upload URL on the other origin carrying its own token."""
        item = next((v for k, v in body.items() if k.lower() == "attachmentitem"), None)
        if not isinstance(item, dict):
            raise GraphError(400, "ErrorInvalidRequest", "createUploadSession needs an 'AttachmentItem'.")
        if str(item.get("attachmentType", "file")).lower() != "file":
            raise GraphError(400, "ErrorInvalidRequest", "The simulator only creates upload sessions for file "
                             "attachments (attachmentType 'file').")
        size, name = item.get("size"), item.get("name")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(name, str):
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem needs 'name' and a positive 'size'.")
        if size < posted.UPLOAD_SESSION_MIN_BYTES:
            raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                             f"Attachment size should not be less than {posted.UPLOAD_SESSION_MIN_BYTES} bytes: POST "
                             "a smaller file as a fileAttachment instead.")
        if size > posted.UPLOAD_SESSION_MAX_BYTES:
            raise GraphError(400, "ErrorAttachmentSizeLimitExceeded",
                             f"Attachment size should not be more than {posted.UPLOAD_SESSION_MAX_BYTES} bytes.")
        inline = item.get("isInline", False)
        if not isinstance(inline, bool):
            raise GraphError(400, "ErrorInvalidRequest", "'isInline' must be true or false.")
        self._expire_sessions()
        sid = "AAMkAS" + secrets.token_urlsafe(24)
        life = self.limits.upload_session_seconds
        expires_iso = posted.iso(datetime.now(timezone.utc) + timedelta(seconds=life))
        sess = _UploadSession(sid, secrets.token_urlsafe(32), mb.user.id, m.id, name, size,
                              posted.clean_content_type(item.get("contentType")), inline,
                              posted._cid(item.get("contentId")), time.monotonic() + life, expires_iso)
        self.upload_sessions[sid] = sess
        self.upload_session_info[mb.user.id][sid] = {"message_id": m.id, "name": name, "size": size,
                                                     "received": 0, "state": "open", "attachment_id": None}
        self.upload_ranges[mb.user.id][sid] = []
        url = (f"{self.upload_base_url}/api/v2.0/Users('{mb.user.id}@{self.model.tenant_id}')/Messages('{rest_id}')"
               f"/AttachmentSessions('{sid}')?authtoken={sess.token}")
        return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#microsoft.graph.uploadSession",
                                  "uploadUrl": url, "expirationDateTime": expires_iso,
                                  "nextExpectedRanges": ["0-"]}, status=201)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid, sess in list(self.upload_sessions.items()):
            if sess.expires <= now:
                del self.upload_sessions[sid]
                self.upload_session_info[sess.user_id][sid]["state"] = "expired"

    def _attachment_list(self, mb: Mailbox, m: Msg) -> list[tuple[str, str, bytes, bool, str | None]]:
        if m.posted is None:
            return _attachments(mb.mime(m))
        return [_att_tuple(mb, m, i) for i in range(len(m.posted.attachments))]

    # the upload origin ---------------------------------------------------------------------------------------
    async def handle_upload(self, request: web.Request) -> web.StreamResponse:
        """PUT/DELETE on an upload URL (the second listener). Its token is in the URL: a request that also
        carries an ``Authorization`` header is refused (401, ``upload_with_bearer``): a client must not send
        its Graph token to another origin. Admitted under the mailbox's limits and faults like a Graph request
        (kind ``upload``); every PUT's body is charged to the upload budget."""
        self.last_request = time.monotonic()
        from urllib.parse import unquote

        path = unquote(re.sub(r"/+", "/", request.rel_url.raw_path))
        mi = export_api.IMPORT_PATH.fullmatch(path)
        if mi:
            try:
                return await self.x_handle_import(request, mi.group(1))
            except Reset:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError() from None
        mt = re.fullmatch(r"/api/v2\.0/Users\('([^']*)'\)/Messages\('([^']*)'\)/AttachmentSessions\('([^']*)'\)/?",
                          path, re.I)
        self._expire_sessions()
        sess = self.upload_sessions.get(mt.group(3)) if mt else None
        who = sess.user_id if sess else "_unknown"
        try:
            if "Authorization" in request.headers:
                self.upload_with_bearer[who] += 1
                await read_body(request, 0)
                return graph_error(401, "InvalidAudience", "This upload URL is pre-authenticated (authtoken): "
                                   "requests to it must not carry an Authorization header.")
            if sess is None or not mt.group(1).lower().startswith(sess.user_id):
                await read_body(request, 0)
                return graph_error(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
            if not secrets.compare_digest(request.query.get("authtoken", ""), sess.token):
                await read_body(request, 0)
                return graph_error(401, "InvalidAuthenticationToken", "The upload URL's token is not valid.")
            user = self.model.user(sess.user_id)
            self.total += 1
            self.requests[user.id]["upload"] += 1
            return await self._limited(user, lambda: self._upload(request, sess))
        except Reset:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError() from None

    async def _upload(self, request: web.Request, sess: _UploadSession) -> web.StreamResponse:
        uid, info = sess.user_id, self.upload_session_info[sess.user_id][sess.id]
        if request.method == "DELETE":
            self.upload_sessions.pop(sess.id, None)
            info["state"] = "cancelled"
            return web.Response(status=204)
        if request.method != "PUT":
            return graph_error(405, "ErrorInvalidRequest", "An upload URL takes PUT (a byte range) or DELETE.")
        self.upload_puts[uid] += 1
        data, n = await read_body(request, MAX_REQUEST_BYTES)
        if data is None:
            return too_large(n)
        refused = self._charge_upload(uid, n)
        if refused is not None:
            return refused
        cr = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", request.headers.get("Content-Range", ""))
        if cr is None:
            return graph_error(400, "ErrorInvalidRequest", "A PUT needs 'Content-Range: bytes {start}-{end}/{total}'.")
        a, b, total = (int(x) for x in cr.groups())
        if total != sess.size or b < a or b >= total or b - a + 1 != len(data):
            return graph_error(400, "ErrorInvalidRequest", f"Content-Range bytes {a}-{b}/{total} does not match the "
                               f"session (size {sess.size}) or the body ({len(data)} bytes).")
        if sess.id not in self.upload_sessions:  # cancelled or expired while the body was read
            return graph_error(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        nxt = len(sess.buf)
        if a > nxt:
            return graph_error(416, "ErrorInvalidRequest", f"Bytes must be uploaded in order: the next expected "
                               f"byte is {nxt}, this range starts at {a}.")
        self.upload_ranges[uid][sess.id].append([a, b])
        if b >= nxt:
            sess.buf += data[nxt - a:]
            info["received"] = len(sess.buf)
        if len(sess.buf) < sess.size:
            return web.json_response({
                "@odata.context": f"{self.upload_base_url}/api/v2.0/$metadata#Users('{uid}')/Messages("
                                  f"'{sess.message_id}')/AttachmentSessions/$entity",
                "ExpirationDateTime": sess.expires_iso, "nextExpectedRanges": [str(len(sess.buf))]})
        # complete: the attachment is created, the session ends
        self.upload_sessions.pop(sess.id, None)
        mb = self.model.mailbox(uid)
        if sess.message_id not in mb.msgs:
            info["state"] = "orphaned"
            return graph_error(404, "ErrorItemNotFound", "The message of this upload session no longer exists.")
        att = {"kind": "file", "name": sess.name, "content_type": sess.content_type, "is_inline": sess.is_inline,
               "content_id": sess.content_id, "content_b64": base64.b64encode(bytes(sess.buf)).decode()}
        aid = (await self._apply(mb, [{"op": "add_attachment", "id": sess.message_id, "attachment": att,
                                       "at": _now()}], big=True))[0]
        self.attachments_added[uid] += 1
        info.update(state="done", attachment_id=aid)
        loc = (f"{self.upload_base_url}/api/v2.0/Users('{uid}@{self.model.tenant_id}')/Messages('{sess.message_id}')"
               f"/Attachments('{aid}')")
        return web.Response(status=201, headers={"Location": loc})

    # admin ------------------------------------------------------------------------------------------------
    async def admin(self, request: web.Request, segs: list[str]) -> web.StreamResponse:
        what = "/".join(segs)
        body = await request.json() if request.method == "POST" and request.can_read_body else {}
        try:
            if what == "stats" and request.method == "GET":
                return web.json_response(self.stats())
            if what == "stats/reset":
                self.reset_stats()
                return web.json_response({"ok": True})
            if what == "truth":
                loop = asyncio.get_running_loop()
                user = request.query.get("user")
                hashes = request.query.get("hashes", "1") != "0"
                sem = request.query.get("semantic", "0").lower() in ("1", "true")
                fid = request.query.get("fidelity", "0").lower() in ("1", "true")
                return web.json_response(await loop.run_in_executor(None, self.model.truth, user, hashes, sem, fid))
            if segs[:1] == ["mime"] and len(segs) == 3:
                mb = self.model.mailbox(segs[1])
                m = mb.msgs.get(segs[2])
                if m is None:
                    raise NotFound(segs[2])
                return web.Response(body=mb.mime(m), content_type="message/rfc822")
            if what == "mutate":
                mb = self.model.mailbox(body["user"])
                ops = body.get("ops") or (mb.random_ops(int(body.get("random", 0)), int(body.get("seed", 0)))
                                          + mb.x_random_ops(int(body.get("random_items", 0)),
                                                                int(body.get("seed", 0))))
                applied = self.model.mutate(body["user"], ops)
                return web.json_response({"applied": applied, "ops": ops})
            if what == "faults":
                self.faults = FaultConfig.from_dict(body)
                return web.json_response(asdict(self.faults))
            if what == "limits":
                self.limits = LimitConfig.from_dict(body)
                return web.json_response(asdict(self.limits))
            if what == "expire_delta_tokens":
                self.model.mutate(body["user"], [{"op": "expire_delta_tokens"}])
                return web.json_response({"ok": True})
            if what == "expire_import_sessions":
                return web.json_response({"expired": self.x_expire_sessions(body["user"])})
            if what == "revoke_tokens":
                self.revoke_tokens()
                return web.json_response({"ok": True})
            if what == "config":
                return web.json_response({"tenant": self.model.cfg.tenant, "tenant_id": self.model.tenant_id,
                                          "users": [asdict(u) for u in self.model.users]})
        except NotFound as e:
            return web.json_response({"error": f"not found: {e}"}, status=404)
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        return web.json_response({"error": f"no admin route {request.method} /_sim/{what}"}, status=404)


def _json_body(raw: bytes) -> dict[str, Any]:
    import json

    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        raise GraphError(400, "RequestBodyRead", f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise GraphError(400, "RequestBodyRead", "The request body must be a JSON object.")
    return body


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _need_posted(m: Msg) -> None:
    if m.posted is None:
        raise GraphError(400, "ErrorInvalidRequest", "The simulator adds attachments only to messages created "
                         "through the API (its seeded messages' content is generated).")


def _att_tuple(mb: Mailbox, m: Msg, i: int) -> tuple[str, str, bytes, bool, str | None]:
    """Attachment ``i`` of a posted message in the shape of :func:`_attachments` (an item: its MIME)."""
    a = m.posted.attachments[i]
    if a.kind == "file":
        return a.name, a.content_type, a.data, a.is_inline, a.content_id
    inner = posted.render(a.item, f"{m.id}/att{i}", is_draft=a.item.is_draft,
                          importance=a.item.content["importance"], owner=None)
    return a.name, "message/rfc822", inner, False, None


def quote_unescape(s: str) -> str:
    from urllib.parse import unquote

    return unquote(s)


_WRITE_ACTIONS = {"createuploadsession", "microsoft.graph.createuploadsession"}
_DELETE_ACTIONS = {"permanentdelete", "microsoft.graph.permanentdelete"}


def _kind(low: list[str], method: str = "GET", filtered: bool = False) -> str:
    """The request kind counted in ``/_sim/stats`` ``requests``."""
    if not low:
        return "other"
    if method not in ("GET", "HEAD"):
        return _write_kind(low, method)
    if low == ["settings", "exchange"]:
        return "settings"
    if filtered and (low == ["messages"] or (low[0] == "mailfolders" and low[2:] == ["messages"])):
        return "lookup"
    if low[0] == "mailfolders":
        if len(low) >= 2 and low[1] == "delta":
            return "folder_delta"
        if "messages" in low:
            i = low.index("messages")
            rest = low[i + 1:]
            if rest == ["delta"]:
                return "delta"
            low = ["messages", *rest]
        else:
            return "folders"
    if low[0] == "messages":
        if len(low) >= 3 and low[2] == "attachments":
            return "attachments"
        if len(low) >= 3 and low[2] == "$value":
            return "mime"
        return "message"
    return "other"


def _write_kind(low: list[str], method: str) -> str:
    if low[0] == "mailfolders":
        if "messages" not in low:
            return "create_folder" if method == "POST" and (len(low) == 1 or low[2:] == ["childfolders"]) else "other"
        low = low[low.index("messages"):]
    if low[0] != "messages":
        return "other"
    rest = low[2:]
    if len(low) == 1 and method == "POST":
        return "create_message"
    if not rest:
        return {"PATCH": "update_message", "DELETE": "delete_message"}.get(method, "other")
    if rest[0] in _DELETE_ACTIONS and method == "POST":
        return "delete_message"
    if rest == ["attachments"] and method == "POST":
        return "add_attachment"
    if rest[:1] == ["attachments"] and rest[1:2] and rest[1] in _WRITE_ACTIONS:
        return "upload_session"
    return "other"


def _select(d: dict[str, Any], select: str | None, keep: tuple[str, ...] = ("id",)) -> dict[str, Any]:
    if not select:
        return d
    want = {s.strip() for s in select.split(",")} | set(keep)
    return {k: v for k, v in d.items() if k in want or k.startswith("@")}


def _attachments(data: bytes) -> list[tuple[str, str, bytes, bool, str | None]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        disp = (part.get("Content-Disposition") or "").lower()
        if not disp.startswith(("attachment", "inline")):
            continue
        if part.get_content_type() == "message/rfc822":
            payload = part.get_payload()
            raw = payload[0].as_bytes() if isinstance(payload, list) else bytes(str(payload), "utf-8")
        else:
            raw = part.get_payload(decode=True) or b""
        cid = part.get("Content-ID")
        out.append((part.get_filename() or "attachment", part.get_content_type(), raw, disp.startswith("inline"),
                    cid.strip("<>") if cid else None))
    return out


def _att_index(aid: str, n: int) -> int:
    m = re.fullmatch(r"AAMkATT(\d+)=", aid)
    if not m or int(m.group(1)) >= n:
        raise NotFound(aid)
    return int(m.group(1))


def _att_json(i: int, a: tuple[str, str, bytes, bool, str | None], with_bytes: bool) -> dict[str, Any]:
    name, ctype, raw, inline, cid = a
    d: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.itemAttachment" if ctype == "message/rfc822"
        else "#microsoft.graph.fileAttachment",
        "id": f"AAMkATT{i}=", "name": name, "contentType": ctype, "size": len(raw), "isInline": inline,
    }
    if d["@odata.type"].endswith("fileAttachment"):
        d["contentId"] = cid
        if with_bytes:
            d["contentBytes"] = base64.b64encode(raw).decode()
    return d
