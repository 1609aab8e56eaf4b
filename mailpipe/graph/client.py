"""Typed Graph operations for backups, on msgraph-sdk, with our own limiter and retries.

Retries live in exactly one place: :meth:`_Caller.call`. The SDK's RetryHandler is configured with
``max_retries=0`` (kiota would otherwise retry 429/503/504 itself, outside our per-mailbox limiter, and
silently give up on a Retry-After ≥ 180 s). Every attempt goes through the mailbox's limiter, so the
concurrency cap holds for retries too; a 429 raises that mailbox's Retry-After fence; 503/504, 500,
timeouts and connection errors back off exponentially with full jitter, within a bounded number of
attempts. Each attempt counts as one request in :class:`GraphStats`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from mailpipe.config import TenantConfig
from mailpipe.graph.errors import (
    BadContentError,
    GraphError,
    NoMailboxError,
    NotFoundError,
    ProtocolError,
    ResyncRequired,
    ThrottledError,
    TransientError,
    UnsafeLinkError,
    from_status,
)
from mailpipe.graph.http import GraphOrigin, GuardedTransport, RefusedURL, RequestTimeouts, client_timeout
from mailpipe.graph.lean import LeanSession, TokenCache
from mailpipe.graph.limiter import MailboxLimiter

log = logging.getLogger("mailpipe.graph")
T = TypeVar("T")

MESSAGE_SELECT = [
    "id", "parentFolderId", "changeKey", "subject", "internetMessageId", "sender", "from", "receivedDateTime",
    "lastModifiedDateTime", "createdDateTime", "isRead", "isDraft", "flag", "categories", "hasAttachments",
]
FOLDER_SELECT = ["id", "displayName", "parentFolderId", "childFolderCount", "totalItemCount"]
NATIONAL_CLOUDS = {"graph.microsoft.us", "dod-graph.microsoft.us", "microsoftgraph.chinacloudapi.cn"}
USER_SELECT = ["id", "userPrincipalName", "displayName", "mail", "userType"]
# Paging bounds (a server that never ends a listing must not hold a backup for ever)
MAX_USER_PAGES = 100_000        # 999 users a page
MAX_FOLDER_PAGES = 10_000       # per folder listing
MAX_FOLDERS = 100_000           # Exchange recommends fewer than 10,000 folders per mailbox
MIN_DELTA_PAGES = 1_000         # a folder's delta may take this many pages + 2 per item it holds
_HTML_START = re.compile(rb"\A\s*<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.I)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6            # for 5xx, timeouts, connection errors
    max_throttled_attempts: int = 12  # 429s are normal: wait for them longer
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 600.0   # a longer Retry-After fails the call (throttled) instead of sleeping

    @classmethod
    def from_settings(cls, s: Any) -> RetryPolicy:
        """From :class:`mailpipe.settings.Settings` (``graph_retry_*``)."""
        return cls(max_attempts=s.graph_retry_attempts, base_delay=s.graph_retry_base_delay,
                   max_delay=s.graph_retry_max_delay)

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** attempt)))


@dataclass(frozen=True)
class Mailbox:
    id: str
    upn: str
    display_name: str | None = None
    mail: str | None = None


@dataclass(frozen=True)
class SkippedUser:
    upn: str
    id: str
    reason: str


@dataclass
class MailboxListing:
    mailboxes: list[Mailbox]
    skipped: list[SkippedUser]


@dataclass(frozen=True)
class Folder:
    id: str
    parent_id: str | None
    display_name: str
    path: tuple[str, ...]
    total_item_count: int | None = None
    child_folder_count: int | None = None


@dataclass(frozen=True)
class MessageInfo:
    id: str
    folder_id: str | None
    change_key: str | None
    subject: str | None
    internet_message_id: str | None
    sender: str | None
    received_at: datetime | None
    last_modified_at: datetime | None
    created_at: datetime | None
    is_read: bool | None
    is_draft: bool | None
    flag_status: str | None
    categories: tuple[str, ...]
    has_attachments: bool | None


@dataclass
class DeltaPage:
    upserts: list[MessageInfo]
    removed: list[str]
    next_link: str | None
    delta_link: str | None            # relative to graph_url: how it is saved
    invalid: list[dict[str, Any]] = field(default_factory=list)  # entries that cannot be items: {reason, …}


@dataclass
class GraphStats:
    requests: int = 0
    throttled: int = 0
    retries: int = 0
    bytes_received: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class _Caller:
    """Runs one SDK call with limiter + retries + error classification."""

    def __init__(self, limiter: MailboxLimiter | None, stats: GraphStats, policy: RetryPolicy, what: str) -> None:
        self.limiter = limiter
        self.stats = stats
        self.policy = policy
        self.what = what

    async def call(self, kind: str, fn: Callable[[], Awaitable[T]], what: str | None = None, *,
                   idempotent: bool = True) -> T:
        """``fn()`` through the limiter, retried as the module docstring says. A request that is not
        ``idempotent`` (creating a message or an attachment) is retried only after a 429 — Graph did not
        process it; after a timeout, a reset or a 5xx it may have been applied, so the error is raised
        for the caller to find out (and not create a duplicate)."""
        what = what or self.what
        attempt = throttled = 0
        while True:
            try:
                if self.limiter is not None:
                    async with self.limiter:
                        self._count(kind)
                        return await fn()
                self._count(kind)
                return await fn()
            except BaseException as exc:  # noqa: BLE001 - classified right below
                if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise
                err = classify(exc, what)
            if isinstance(err, ThrottledError):
                self.stats.throttled += 1
                throttled += 1
                wait = err.retry_after if err.retry_after is not None else self.policy.backoff(throttled)
                if throttled >= self.policy.max_throttled_attempts or wait > self.policy.max_retry_after:
                    raise err
                if self.limiter is not None:
                    self.limiter.fence(wait)  # the whole mailbox waits, nobody else does
                else:
                    await asyncio.sleep(wait)
            elif isinstance(err, TransientError):
                if not idempotent:
                    raise err
                attempt += 1
                if attempt >= self.policy.max_attempts:
                    raise TransientError(f"{err.args[0]} (gave up after {attempt} attempts)", status=err.status,
                                         code=err.code) from None
                await asyncio.sleep(self.policy.backoff(attempt))
            else:
                raise err
            self.stats.retries += 1
            log.debug("%s: retrying after %s", what, err)

    def _count(self, kind: str) -> None:
        self.stats.requests += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1


def classify(exc: BaseException, what: str) -> GraphError:
    """Any exception from the SDK/httpx → a :class:`GraphError` of the right kind."""
    if isinstance(exc, GraphError):
        return exc
    if isinstance(exc, RefusedURL):
        return UnsafeLinkError(f"{what}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        detail = str(exc) if "slower than" in str(exc) or "no response within" in str(exc) else type(exc).__name__
        return TransientError(f"{what}: timed out ({detail})")
    if isinstance(exc, httpx.TransportError):
        return TransientError(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientError(f"{what}: {type(exc).__name__}")
    name = type(exc).__name__
    if name == "ClientAuthenticationError":  # azure-identity: bad secret, unknown tenant...
        return _auth_error(exc, what)
    return GraphError(f"{what}: unexpected {name}: {str(exc)[:300]}")


def json_object(resp: httpx.Response, what: str) -> dict[str, Any]:
    """The body as a JSON object; anything else (a proxy's HTML page answered with 200) is transient."""
    try:
        data = json.loads(resp.content) if resp.content else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TransientError(f"{what}: the answer is not a JSON object "
                             f"({resp.headers.get('content-type') or 'no content type'}, {len(resp.content)} bytes)")
    return data


def raise_for_status(resp: httpx.Response, what: str, origin: GraphOrigin) -> None:
    """A response that is not a success → the :class:`GraphError` for it. Redirects are errors: no
    redirect is ever followed with our credentials (docs/GRAPH.md, the link-origin rule)."""
    check_status(resp.status_code, resp.headers, resp.content, what, origin)


def check_status(status: int, headers: Any, content: bytes, what: str, origin: GraphOrigin) -> None:
    """:func:`raise_for_status` for any response (the SDK path's httpx one, the lean path's):
    ``headers`` is a case-insensitive mapping."""
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        where = origin.describe(headers.get("location", "")) if headers.get("location") else "nowhere"
        raise UnsafeLinkError(f"{what}: the server answered {status}, a redirect to {where}: not followed "
                              "(mailpipe never follows redirects)", status=status)
    code = message = None
    try:
        err = json.loads(content).get("error")
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
    except (ValueError, AttributeError, TypeError):
        message = f"HTTP {status} ({headers.get('content-type', 'no content type')})"
    ra = headers.get("retry-after")
    try:
        retry_after = float(ra) if ra is not None else None
    except ValueError:
        retry_after = None
    raise from_status(status, code if isinstance(code, str) else None,
                      message if isinstance(message, str) else f"HTTP {status}", what=what,
                      retry_after=retry_after)


def _auth_error(exc: BaseException, what: str) -> GraphError:
    from mailpipe.graph.errors import ForbiddenError

    msg = getattr(exc, "message", None) or str(exc)
    # azure-identity messages name the AADSTS code; keep the first line only (no request bodies)
    first = msg.strip().splitlines()[0][:300] if msg else "authentication failed"
    return ForbiddenError(f"{what}: authentication failed: {first}")


def _parse_dt(v: Any) -> datetime | None:
    if not v or not isinstance(v, str):
        return None
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None


def _address(recipient: Any) -> str | None:
    if not isinstance(recipient, dict) or not isinstance(recipient.get("emailAddress"), dict):
        return None
    return _str(recipient["emailAddress"].get("address"))


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _message_info(m: dict[str, Any]) -> MessageInfo:
    """A delta entry → :class:`MessageInfo`; fields of the wrong type (a broken or hostile server) are
    read as absent rather than trusted."""
    flag = m.get("flag")
    cats = m.get("categories")
    return MessageInfo(
        id=m["id"], folder_id=_str(m.get("parentFolderId")), change_key=_str(m.get("changeKey")),
        subject=_str(m.get("subject")), internet_message_id=_str(m.get("internetMessageId")),
        sender=_address(m.get("sender")) or _address(m.get("from")),
        received_at=_parse_dt(m.get("receivedDateTime")), last_modified_at=_parse_dt(m.get("lastModifiedDateTime")),
        created_at=_parse_dt(m.get("createdDateTime")), is_read=_bool(m.get("isRead")),
        is_draft=_bool(m.get("isDraft")),
        flag_status=_str(flag.get("flagStatus")) if isinstance(flag, dict) else None,
        categories=tuple(c for c in cats if isinstance(c, str)) if isinstance(cats, list) else (),
        has_attachments=_bool(m.get("hasAttachments")),
    )


class GraphTenant:
    """One tenant's Graph access: the SDK client, credentials, and one limiter per mailbox."""

    def __init__(self, tenant: TenantConfig, graph_url: str, authority: str, ca_bundle: str | None,
                 *, policy: RetryPolicy | None = None, window_seconds: float = 600.0,
                 upload_window_seconds: float = 300.0, timeouts: RequestTimeouts | None = None) -> None:
        from kiota_authentication_azure.azure_identity_authentication_provider import (
            AzureIdentityAuthenticationProvider,
        )
        from mailpipe.graph.credentials import make_credential

        self.tenant = tenant
        self.origin = GraphOrigin(graph_url)
        self.graph_url = self.origin.url
        self.policy = policy or RetryPolicy()
        self.window_seconds = window_seconds
        self.upload_window_seconds = upload_window_seconds  # Exchange's upload budget window (restores)
        self.timeouts = timeouts or RequestTimeouts()
        self.credential = make_credential(tenant, authority, ca_bundle)
        # one TLS context for both paths (the SDK's httpx clients and the lean $value session): ca_bundle when
        # configured (then only it is trusted), else what httpx trusts by default (certifi)
        self._verify: ssl.SSLContext = (ssl.create_default_context(cafile=ca_bundle) if ca_bundle
                                        else httpx.create_ssl_context())
        host = self.origin.host
        # national clouds have their own resource; the public one for everything else (incl. test servers)
        scope = f"https://{host}/.default" if host in NATIONAL_CLOUDS else "https://graph.microsoft.com/.default"
        # the token is attached for graph_url's host only (the transport refuses every other URL anyway)
        self._auth = AzureIdentityAuthenticationProvider(self.credential, scopes=[scope], allowed_hosts=[host])
        # $value downloads: the lean path (mailpipe/graph/lean.py), same credential, origin rule, TLS, bounds
        self._lean = LeanSession(self.origin, self.timeouts, self._verify, TokenCache(self.credential, scope))
        self._http_clients: list[httpx.AsyncClient] = []
        lim = tenant.limits
        self.client = self._new_client(16)  # tenant-level calls: users, discovery probes
        self._limits = (lim.concurrent_requests_per_mailbox, lim.requests_per_10min_per_mailbox)
        self._mailboxes: dict[str, MailboxGraph] = {}
        self.stats = GraphStats()  # tenant-level calls (users)
        self._tenant_caller = _Caller(None, self.stats, self.policy, f"tenant {tenant.name}")

    def _new_client(self, connections: int) -> Any:
        """A GraphServiceClient on its own connection pool.

        One pool per mailbox (sized to its limiter), not one for the tenant: httpcore scans every pooled
        connection on each request (``_assign_requests_to_connections`` → ``has_expired`` polls each
        socket), which cost ~1 ms per request with 20 mailboxes' connections in one pool.
        """
        from kiota_http.middleware.options import RedirectHandlerOption, RetryHandlerOption
        from msgraph import GraphRequestAdapter, GraphServiceClient
        from msgraph_core import GraphClientFactory

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        raw = httpx.AsyncClient(
            transport=GuardedTransport(self.origin, self.timeouts, verify=self._verify, limits=limits),
            timeout=client_timeout(self.timeouts), follow_redirects=False, trust_env=False,
        )
        self._http_clients.append(raw)
        # kiota's own retries off: ours are the only ones (see module docstring); its redirects off: a
        # redirect is an error, never followed with our token (docs/GRAPH.md)
        http = GraphClientFactory.create_with_default_middleware(
            client=raw,
            options={RetryHandlerOption.get_key(): RetryHandlerOption(delay=0, max_retries=0, should_retry=False),
                     RedirectHandlerOption.get_key(): RedirectHandlerOption(should_redirect=False)},
        )
        adapter = GraphRequestAdapter(self._auth, client=http)
        adapter.base_url = self.graph_url
        client = GraphServiceClient(request_adapter=adapter)
        client._mailpipe_http = raw  # closed by release()/aclose()
        return client

    @classmethod
    def from_config(cls, tenant: TenantConfig, settings: Any = None, **kw: Any) -> GraphTenant:
        """The tenant's Graph access; ``settings`` (:class:`mailpipe.settings.Settings`) gives the retry
        policy and request time bounds unless ``policy``/``timeouts`` are passed."""
        if settings is not None:
            kw.setdefault("policy", RetryPolicy.from_settings(settings))
            kw.setdefault("timeouts", RequestTimeouts(
                response_timeout=settings.graph_response_timeout, min_transfer_rate=settings.graph_min_transfer_rate,
                slow_body_grace=settings.graph_slow_body_grace))
        if tenant.uses_embedded_simulator:
            raise ValueError(f"tenant {tenant.name}: graph_url sim://embedded must be resolved to the simulator's "
                             "address first (mailpipe.sim.embedded.resolve, done by the CLI and the Dagster layer)")
        graph_url, authority, ca = tenant.graph_url, tenant.authority, tenant.ca_bundle
        return cls(tenant, graph_url, authority, ca, **kw)

    async def __aenter__(self) -> GraphTenant:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def release(self, user_id: str) -> None:
        """Done with a mailbox: close its connection pool (thousands of mailboxes, few open sockets)."""
        mb = self._mailboxes.pop(user_id, None)
        if mb is not None and mb._client is not None:
            raw = mb._client._mailpipe_http
            self._http_clients.remove(raw)
            await raw.aclose()

    async def aclose(self) -> None:
        await self._lean.aclose()
        for c in self._http_clients:
            await c.aclose()
        self._http_clients.clear()
        close = getattr(self.credential, "close", None)
        if close is not None:
            await close()

    def mailbox(self, user_id: str, upn: str | None = None) -> MailboxGraph:
        mb = self._mailboxes.get(user_id)
        if mb is None:
            c, w = self._limits
            mb = MailboxGraph(self, user_id, upn or user_id, MailboxLimiter(c, w, self.window_seconds))
            self._mailboxes[user_id] = mb
        return mb

    def _config(self, query: Any = None, headers: dict[str, str] | None = None) -> Any:
        from kiota_abstractions.base_request_configuration import RequestConfiguration

        cfg = RequestConfiguration(query_parameters=query)
        cfg.headers.add("Prefer", 'IdType="ImmutableId"')
        for k, v in (headers or {}).items():
            cfg.headers.add(k, v)
        return cfg

    async def send(self, builder: Any, config: Any, what: str) -> httpx.Response:
        """Send a GET built by an SDK request builder (auth, middleware: all the SDK's) and return the
        raw response, its status already checked (:func:`raise_for_status`).

        The response is taken raw (kiota's ``NativeResponseHandler``), not deserialised: we need its
        status, ``Location`` and ``Content-Type`` to refuse redirects and error pages, and parsing JSON
        ourselves is cheap where msgraph's models are not (~12 ms of CPU per ``message`` object in
        msgraph-sdk 1.65: ``Entity.get_field_deserializers`` rebuilds a map of ~1,000 subtypes per object).
        """
        from kiota_abstractions.native_response_handler import NativeResponseHandler
        from kiota_http.middleware.options import ResponseHandlerOption

        info = builder.to_get_request_information(config)
        info.add_request_options([ResponseHandlerOption(NativeResponseHandler())])
        resp = await builder.request_adapter.send_primitive_async(info, "bytes", None)
        raise_for_status(resp, what, self.origin)
        return resp

    async def request(self, adapter: Any, method: str, url: str, what: str, *, body: bytes | None = None,
                      content_type: str = "application/json", headers: dict[str, str] | None = None
                      ) -> httpx.Response:
        """Any request to a URL on graph_url (writes: POST, PATCH, DELETE), through the SDK's adapter (auth,
        middleware, the guarded transport), its status checked; the raw response."""
        from kiota_abstractions.method import Method
        from kiota_abstractions.native_response_handler import NativeResponseHandler
        from kiota_abstractions.request_information import RequestInformation
        from kiota_http.middleware.options import ResponseHandlerOption

        info = RequestInformation(Method(method))
        info.url = self.origin.check(url, what)
        info.headers.add("Prefer", 'IdType="ImmutableId"')
        for k, v in (headers or {}).items():
            info.headers.add(k, v)
        if body is not None:
            info.set_stream_content(body, content_type)
        info.add_request_options([ResponseHandlerOption(NativeResponseHandler())])
        resp = await adapter.send_primitive_async(info, "bytes", None)
        raise_for_status(resp, what, self.origin)
        return resp

    async def get_json(self, builder: Any, config: Any, what: str = "Graph request") -> dict[str, Any]:
        """:meth:`send`, and the body as a JSON object (anything else is a transient error: a proxy's
        error page answered with 200)."""
        return json_object(await self.send(builder, config, what), what)

    async def list_mailboxes(self, probe_concurrency: int = 16) -> MailboxListing:
        """Every user with a mailbox, filtered by the tenant's globs; users without one are reported."""
        from msgraph.generated.users.users_request_builder import UsersRequestBuilder

        what = "list users"
        q = UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(select=USER_SELECT, top=999)
        users: list[dict[str, Any]] = []
        paging = Paging(self.origin, what, MAX_USER_PAGES)
        resp = await self._tenant_caller.call(
            "users", lambda: self.get_json(self.client.users, self._config(q), what), what)
        while True:
            page = _values(resp, what)
            users += [u for u in page if isinstance(u, dict)]
            link = resp.get("@odata.nextLink")
            if not link:
                break
            url = paging.follow(link, empty_page=not page)
            resp = await self._tenant_caller.call(
                "users", lambda: self.get_json(self.client.users.with_url(url), self._config(), what), what)
        candidates = [u for u in users if isinstance(u.get("userPrincipalName"), str) and u.get("id")
                      and self.tenant.mailboxes.matches(u["userPrincipalName"])]
        sem = asyncio.Semaphore(probe_concurrency)
        mailboxes: list[Mailbox] = []
        skipped: list[SkippedUser] = []

        async def probe(u: dict[str, Any]) -> None:
            uid, upn = u["id"], u["userPrincipalName"].lower()
            async with sem:
                try:
                    await self.mailbox(uid, upn).probe()
                except NoMailboxError as e:
                    skipped.append(SkippedUser(upn, uid, f"no mailbox ({e.code})"))
                    return
                except NotFoundError as e:
                    skipped.append(SkippedUser(upn, uid, f"not found ({e.code})"))
                    return
                mailboxes.append(Mailbox(uid, upn, u.get("displayName"), u.get("mail")))

        await asyncio.gather(*(probe(u) for u in candidates))
        mailboxes.sort(key=lambda m: m.upn)
        skipped.sort(key=lambda s: s.upn)
        return MailboxListing(mailboxes, skipped)

    async def resolve_mailbox(self, upn_or_id: str) -> Mailbox:
        """``GET /users/{upn}``: the user's object id (the repository directory) and UPN."""
        from msgraph.generated.users.item.user_item_request_builder import UserItemRequestBuilder

        what = f"user {upn_or_id}"
        q = UserItemRequestBuilder.UserItemRequestBuilderGetQueryParameters(select=USER_SELECT)
        u = await self._tenant_caller.call(
            "users", lambda: self.get_json(self.client.users.by_user_id(upn_or_id), self._config(q), what), what)
        if not isinstance(u.get("id"), str) or not u["id"]:
            raise NotFoundError(f"user {upn_or_id}: not found")
        upn = u.get("userPrincipalName")
        return Mailbox(u["id"], (upn if isinstance(upn, str) else upn_or_id).lower(), u.get("displayName"),
                       u.get("mail"))


class Paging:
    """The links of one listing, followed safely: each must lie on graph_url (:class:`GraphOrigin`), a link
    may not come back (a paging loop — except that an *empty* page may hand back the very link it was
    fetched with, up to :attr:`MAX_STALLS` times in a row: Exchange does that when it made no progress),
    and there are at most ``max_pages`` pages (a server that invents new links for ever). Each violation
    is a clear error naming the listing, never a hang."""

    MAX_STALLS = 20

    def __init__(self, origin: GraphOrigin, what: str, max_pages: int) -> None:
        self.origin = origin
        self.what = what
        self.max_pages = max_pages
        self.pages = 1
        self._seen: set[str] = set()
        self._last: str | None = None
        self._stalls = 0

    def follow(self, link: Any, kind: str = "nextLink", *, empty_page: bool = False) -> str:
        if not isinstance(link, str):
            raise TransientError(f"{self.what}: a {kind} that is not a string")
        self.origin.check(link, f"{self.what}: {kind}")
        if link in self._seen:
            self._stalls = self._stalls + 1 if (empty_page and link == self._last) else self.MAX_STALLS + 1
            if self._stalls > self.MAX_STALLS:
                raise ProtocolError(f"{self.what}: the server keeps sending a {kind} it sent before (a paging "
                                    f"loop); stopped after {self.pages} pages")
        else:
            self._stalls = 0
        self.pages += 1
        if self.pages > self.max_pages:
            raise ProtocolError(f"{self.what}: more than {self.max_pages:,} pages, more than the listing can hold; "
                                "stopped (a server that never ends its listing)")
        self._seen.add(link)
        self._last = link
        return link


async def walk_delta(t: Any, what: str, max_pages: int, get: Callable[[str | None], Awaitable[dict[str, Any]]],
                     link: str | None, upsert: Callable[[dict[str, Any]], Any],
                     describe: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                     ) -> AsyncIterator[tuple[list[Any], list[str], str | None, str | None, list[dict[str, Any]]]]:
    """A delta listing, page by page: ``(upserts, removed ids, next link, delta link, invalid entries)``, from
    ``link`` (a saved delta link, relative to graph_url) or from scratch (``get(None)``: the first request).

    Every nextLink is followed (pages may be empty) through :class:`Paging` (links on graph_url only, never
    repeating, at most ``max_pages``) until the deltaLink, which the last page carries and which is returned
    relative to graph_url (how it is saved) — only once it is known to be followable. :class:`ResyncRequired`
    when Graph no longer knows the sync state: 410 and friends (raised by ``get``), a saved link that cannot be
    used with today's graph_url, or a 400/404 answered to a link Graph issued. ``upsert`` turns an entry into
    the caller's item; an entry that is not an object, or has no id and is not a removal, is listed as invalid
    (with ``describe(entry)`` to say which), never dropped silently."""

    async def follow(url: str) -> dict[str, Any]:
        try:
            return await get(url)
        except GraphError as e:
            if e.status in (400, 404) and not isinstance(e, NoMailboxError):
                # a token Graph issued and no longer accepts (some answer 400/404 instead of 410)
                raise ResyncRequired(f"{what}: the delta link was refused ({e}); listing the folder again",
                                     status=e.status, code=e.code) from None
            raise

    paging = Paging(t.origin, what, max_pages)
    if link is None:
        resp = await get(None)
    else:
        url = t.origin.resolve_saved(link)
        if url is None:
            raise ResyncRequired(f"{what}: the saved delta link does not belong to graph_url {t.graph_url}; "
                                 "listing the folder again")
        resp = await follow(url)
    while True:
        upserts, removed, invalid = [], [], []
        for m in _values(resp, what):
            if not isinstance(m, dict):
                invalid.append({"reason": "Graph returned an entry that is not an object"})
            elif not isinstance(m.get("id"), str) or not m["id"]:
                if "@removed" not in m:
                    invalid.append({"reason": "Graph returned an item without an id",
                                    **(describe(m) if describe else {})})
            elif "@removed" in m:
                removed.append(m["id"])
            else:
                upserts.append(upsert(m))
        nxt, dl = resp.get("@odata.nextLink"), resp.get("@odata.deltaLink")
        if not nxt and not dl:
            raise TransientError(f"{what}: a page without nextLink or deltaLink")
        if nxt:
            url = paging.follow(nxt, empty_page=not (upserts or removed or invalid))
            yield upserts, removed, url, None, invalid
            resp = await follow(url)
            continue
        paging.follow(dl, "deltaLink")  # never save a link we would not follow
        yield upserts, removed, None, t.origin.relative(dl), invalid
        return


def _values(resp: dict[str, Any], what: str) -> list[Any]:
    v = resp.get("value")
    if v is None:
        return []
    if not isinstance(v, list):
        raise TransientError(f"{what}: a page whose 'value' is not a list")
    return v


def looks_like_content(ctype: str, data: bytes) -> str | None:
    """Why a ``$value`` body cannot be an item's MIME, or None when it can be.

    Exchange serves MIME as ``text/plain`` (sometimes ``message/rfc822`` or octet-stream); an empty body,
    an HTML page (a proxy's or gateway's error page answered with 200) or JSON is never a message.
    """
    base = ctype.split(";", 1)[0].strip().lower()
    if not data:
        return "an empty body"
    if base == "text/html" or base == "application/xhtml+xml":
        return f"an HTML page ({base}, {len(data)} bytes)"
    if base == "application/json" or base.endswith("+json"):
        return f"a JSON document ({base}, {len(data)} bytes)"
    if _HTML_START.match(data[:512]):
        return f"an HTML page ({base or 'no content type'}, {len(data)} bytes)"
    return None


class MailboxGraph:
    """Graph operations on one mailbox, all through that mailbox's limiter."""

    def __init__(self, tenant: GraphTenant, user_id: str, upn: str, limiter: MailboxLimiter) -> None:
        self.t = tenant
        self.user_id = user_id
        self.upn = upn
        self.limiter = limiter
        self.stats = GraphStats()
        self._caller = _Caller(limiter, self.stats, tenant.policy, f"mailbox {upn}")
        self._client: Any = None  # its own connection pool, made on first use (see GraphTenant._new_client)
        self._messages_url = f"{tenant.graph_url}/users/{quote(user_id, safe='')}/messages"

    @property
    def _user(self) -> Any:
        if self._client is None:
            self._client = self.t._new_client(self.limiter.concurrency + 4)
            self._user_builder = self._client.users.by_user_id(self.user_id)
        return self._user_builder

    async def _get_raw(self, url: str, what: str) -> Any:
        """One GET on the lean path (:mod:`mailpipe.graph.lean`), its status checked like the SDK path's."""
        resp = await self.t._lean.get(url, what)
        check_status(resp.status, resp.headers, resp.content, what, self.t.origin)
        return resp

    async def probe(self) -> None:
        """One cheap request that fails with NoMailboxError for users without a mailbox."""
        from msgraph.generated.users.item.mail_folders.item.mail_folder_item_request_builder import (
            MailFolderItemRequestBuilder,
        )

        q = MailFolderItemRequestBuilder.MailFolderItemRequestBuilderGetQueryParameters(select=["id"])
        b = self.t.client.users.by_user_id(self.user_id).mail_folders.by_mail_folder_id("inbox")  # the shared pool
        await self._caller.call("folders", lambda: self.t.get_json(b, self.t._config(q), f"mailbox {self.upn}"))

    async def get_folder(self, folder_id: str) -> dict[str, Any]:
        """One folder's metadata (``NotFoundError`` when it no longer exists)."""
        from msgraph.generated.users.item.mail_folders.item.mail_folder_item_request_builder import (
            MailFolderItemRequestBuilder,
        )

        what = f"mailbox {self.upn} folder {folder_id}"
        q = MailFolderItemRequestBuilder.MailFolderItemRequestBuilderGetQueryParameters(select=["id", "displayName"])
        b = self._user.mail_folders.by_mail_folder_id(folder_id)
        return await self._caller.call("folders", lambda: self.t.get_json(b, self.t._config(q), what), what)

    async def get_message(self, message_id: str) -> dict[str, Any]:
        """One message's metadata by immutable id (``NotFoundError`` when Graph says it does not exist):
        how a 404 on ``$value`` is told apart from a deleted item."""
        from msgraph.generated.users.item.messages.item.message_item_request_builder import (
            MessageItemRequestBuilder,
        )

        what = f"mailbox {self.upn} item {message_id}"
        q = MessageItemRequestBuilder.MessageItemRequestBuilderGetQueryParameters(select=["id", "parentFolderId"])
        b = self._user.messages.by_message_id(message_id)
        return await self._caller.call("message", lambda: self.t.get_json(b, self.t._config(q), what), what)

    async def list_folders(self) -> list[Folder]:
        """The whole folder tree, paths from the root.

        Top-level folders, then ``childFolders`` only of folders whose ``childFolderCount`` is not 0:
        one request per folder that has children (leaves cost nothing), each with ``$top=999``. A folder
        met twice (listed inside itself, or under two parents) is a :class:`ProtocolError`: the tree must
        be a tree, or the walk would never end.
        """
        from msgraph.generated.users.item.mail_folders.mail_folders_request_builder import (
            MailFoldersRequestBuilder,
        )

        what = f"mailbox {self.upn} folders"
        q = MailFoldersRequestBuilder.MailFoldersRequestBuilderGetQueryParameters(select=FOLDER_SELECT, top=999)

        async def pages(builder: Any, config: Any) -> list[dict[str, Any]]:
            paging = Paging(self.t.origin, what, MAX_FOLDER_PAGES)
            resp = await self._caller.call("folders", lambda: self.t.get_json(builder, config, what), what)
            page = _values(resp, what)
            out = [f for f in page if isinstance(f, dict)]
            while resp.get("@odata.nextLink"):
                url = paging.follow(resp["@odata.nextLink"], empty_page=not page)
                resp = await self._caller.call(
                    "folders", lambda: self.t.get_json(builder.with_url(url), self.t._config(), what), what)
                page = _values(resp, what)
                out += [f for f in page if isinstance(f, dict)]
            return out

        top = await pages(self._user.mail_folders, self.t._config(q))
        result: list[Folder] = []
        seen: set[str] = set()
        queue: list[tuple[dict[str, Any], tuple[str, ...]]] = [(f, ()) for f in top]
        while queue:
            level = queue
            queue = []
            for f, parent_path in level:
                fid, name = f.get("id"), f.get("displayName") or ""
                if not isinstance(fid, str) or not fid:
                    raise ProtocolError(f"{what}: a folder without an id under /{'/'.join(parent_path)}")
                if fid in seen:
                    raise ProtocolError(f"{what}: folder {name!r} ({fid}) appears twice in the tree (listed "
                                        "inside itself or under two parents); stopped")
                seen.add(fid)
                if len(seen) > MAX_FOLDERS:
                    raise ProtocolError(f"{what}: more than {MAX_FOLDERS:,} folders; stopped")
                result.append(Folder(fid, f.get("parentFolderId"), name, (*parent_path, name),
                                     f.get("totalItemCount"), f.get("childFolderCount")))
            parents = [(f, (*pp, f.get("displayName") or "")) for f, pp in level
                       if isinstance(f.get("childFolderCount"), int) and f["childFolderCount"] > 0]

            async def kids(f: dict[str, Any], path: tuple[str, ...]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
                b = self._user.mail_folders.by_mail_folder_id(f["id"]).child_folders
                from msgraph.generated.users.item.mail_folders.item.child_folders.child_folders_request_builder import (  # noqa: E501
                    ChildFoldersRequestBuilder,
                )

                cq = ChildFoldersRequestBuilder.ChildFoldersRequestBuilderGetQueryParameters(
                    select=FOLDER_SELECT, top=999)
                return [(c, path) for c in await pages(b, self.t._config(cq))]

            for chunk in await asyncio.gather(*(kids(f, p) for f, p in parents)):
                queue += chunk
        return result

    async def message_delta(self, folder_id: str, link: str | None, *, page_size: int = 200,
                            expected_items: int | None = None) -> AsyncIterator[DeltaPage]:
        """One folder's message delta, page by page, from ``link`` (a saved delta link) or from scratch.

        Follows every nextLink (pages may be empty) until the deltaLink, which the last page carries and
        which is returned *relative to graph_url* (how it is saved). Links must lie on graph_url and may not
        repeat; a listing may take at most 1,000 + 2 × ``expected_items`` pages (the folder's item count).
        Raises :class:`ResyncRequired` when Graph no longer knows the sync state: 410 and friends, a saved
        link that cannot be used with today's graph_url, or a 400/404 answered to a link Graph issued.
        """
        from msgraph.generated.users.item.mail_folders.item.messages.delta.delta_request_builder import (
            DeltaRequestBuilder,
        )

        builder = self._user.mail_folders.by_mail_folder_id(folder_id).messages.delta
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        what = f"mailbox {self.upn} folder {folder_id} delta"
        first = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=MESSAGE_SELECT)

        async def get(url: str | None) -> dict[str, Any]:
            b, q = (builder, first) if url is None else (builder.with_url(url), None)
            return await self._caller.call("delta", lambda: self.t.get_json(b, self.t._config(q, headers), what), what)

        async for page in walk_delta(self.t, what, MIN_DELTA_PAGES + 2 * max(0, expected_items or 0), get, link,
                                     _message_info, lambda m: {"subject": _str(m.get("subject"))}):
            yield DeltaPage(*page)

    async def get_mime(self, message_id: str) -> bytes:
        """The item's raw MIME (``/messages/{id}/$value``), byte-exact.

        A body that cannot be a message — empty, an HTML page, JSON — raises :class:`BadContentError`: it
        is never stored as the item's content. Sent on the lean path (:mod:`mailpipe.graph.lean`: aiohttp,
        not kiota; same limiter, retries, origin rule, TLS, time bounds and error classes). Buffered: memory
        per mailbox is bounded by its in-flight downloads.
        """
        what = f"mailbox {self.upn} item {message_id}"
        url = f"{self._messages_url}/{quote(message_id, safe='')}/$value"
        resp = await self._caller.call("mime", lambda: self._get_raw(url, what), what)
        data = resp.content
        self.stats.bytes_received += len(data)
        bad = looks_like_content(resp.headers.get("content-type", ""), data)
        if bad:
            raise BadContentError(f"{what}: Graph answered {bad} instead of the message")
        return data


__all__ = [
    "DeltaPage", "Folder", "GraphStats", "GraphTenant", "Mailbox", "MailboxGraph", "MailboxListing",
    "MessageInfo", "Paging", "ResyncRequired", "RetryPolicy", "SkippedUser", "classify", "looks_like_content",
]
