"""A hostile reverse proxy in front of the Graph simulator, for tests of the Graph client.

The simulator plays a well-behaved Graph; real networks hold gateways, compromised or buggy proxies and
servers that answer links pointing elsewhere, redirects, endless paging and folder cycles. Links,
``Location`` headers and redirects are data from the network (``/work/shared/notes/graph.md``): the
client must not send its bearer token anywhere but its tenant's ``graph_url`` origin, nor loop forever.
This proxy produces those answers on purpose so that a test can check the client's reaction::

    sim = sim_factory(users=1)
    proxy = hostile_factory(sim, mode="foreign_next_link")   # or HostileProxy(sim).start() / with ...:
    client_under_test(graph_url=proxy.graph_url)             # the client only knows the proxy
    assert proxy.attacker.requests == []                     # nothing (no token) went to the attacker
    assert proxy.requests["delta"] < 50                      # a loop was cut

Everything binds to 127.0.0.1: the proxy, its upstream (a simulator) and the **attacker**, a second
server on another port (another origin) that records every request it receives
(``attacker.requests``: dicts with ``method``, ``path``, ``query`` (dict), ``url`` (path and query as
sent) and ``authorization`` (the ``Authorization`` header or ``None``)) and answers plausibly: a delta
request (a path containing ``delta``) gets a page with one fake message (id ``EVIL-1``, subject
``injected``) and a deltaLink on the attacker; any other path gets ``ATTACKER_BODY`` as ``text/plain``.

The proxy forwards every request (method, path and query as sent, headers including ``Authorization``
and ``Prefer``, body) to the upstream and returns its answer. It **always** rewrites the upstream origin
into its own in JSON bodies (anywhere in the text: ``@odata.nextLink``, ``@odata.deltaLink``...) and in
``Location`` headers, as a real reverse proxy must, so that legitimate links stay on the proxy. Other
bodies (``$value``) are streamed through as they come, with the upstream's ``Content-Length``: a slow,
trickled or aborted body upstream is slow, trickled or aborted here too.

``mode`` (``set_mode`` at run time; every mode touches only the requests it names, the rest passes):

=============================== =======================================================================
``pass``                        a plain reverse proxy (the origin rewrite only)
``foreign_next_link``           message delta answers (and the export API's item delta answers) that carry
                                an ``@odata.nextLink``: it points at the attacker (same path and query)
``foreign_delta_link``          message delta answers: ``@odata.deltaLink`` points at the attacker
``foreign_users_link``          ``/users`` listings: ``@odata.nextLink`` points at the attacker (one is
                                added, ``<attacker>/v1.0/users?$skiptoken=evil``, when upstream has none)
``redirect_value``              ``GET .../$value``: ``302`` with ``Location: <attacker origin><same path
                                and query>`` (upstream is not asked)
``redirect_value_same_origin``  ``GET .../$value``: ``302`` to the same URL on the proxy plus
                                ``redirected=1`` in the query; that request is served normally
``loop_next_link``              message delta answers: ``value`` emptied, no deltaLink, and
                                ``@odata.nextLink`` = the URL of the request itself, forever
``loop_users_link``             the same for ``/users`` listings
``endless_distinct_pages``      message delta: an empty page whose nextLink is new every time
                                (``...?$skiptoken=endless-<n>``), forever; answered by the proxy
                                itself (upstream would refuse those tokens)
``self_parent_folder``          ``mailFolders/{id}/childFolders`` of ``target_folder`` (default: the
                                first folder with children in a ``mailFolders`` listing, else the
                                first folder whose childFolders listing is not empty): the folder's
                                own object (as upstream gives it) is appended to its first page; in
                                every folder listing and folder GET its ``childFolderCount`` is one
                                more than upstream's (so ≥ 1, consistent with the extra child)
=============================== =======================================================================

Counters: ``proxy.requests`` (requests received, by kind: ``users``, ``user``, ``folders``,
``child_folders``, ``folder``, ``folder_delta``, ``delta``, ``messages``, ``message``, ``value``,
``attachments``, ``admin``, ``other``), ``proxy.seen`` (``"METHOD path?query"`` of every request, in
order), ``proxy.reset_counters()``.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
from collections import defaultdict
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

__all__ = ["ATTACKER_BODY", "MODES", "Attacker", "HostileProxy", "hostile_factory"]

MODES = ("pass", "foreign_next_link", "foreign_delta_link", "foreign_users_link", "redirect_value",
         "redirect_value_same_origin", "loop_next_link", "loop_users_link", "endless_distinct_pages",
         "self_parent_folder")

ATTACKER_BODY = b"From: evil@example.com\r\nSubject: injected\r\n\r\nstolen\r\n"

# not forwarded either way: per-connection headers, and those the proxy sets itself
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "content-encoding", "date",
        "server"}


def _kind(raw_path: str) -> str:
    """The kind of a request (``proxy.requests``), from its path normalised as the simulator does."""
    path = re.sub(r"/+", "/", raw_path.split("?", 1)[0])
    path = re.sub(r"\('([^']*)'\)", lambda m: "/" + m.group(1), path)
    path = re.sub(r"(?i)/delta\(\)", "/delta", path).rstrip("/")
    low = [unquote(s).lower() for s in path.split("/")[1:]]
    if low[:1] == ["_sim"]:
        return "admin"
    if low[1:4] == ["admin", "exchange", "mailboxes"] and low[-2:] == ["items", "delta"]:
        return "delta"  # the mailbox export API's item delta: a delta like the message one
    if low[:1] != ["v1.0"] or low[1:2] != ["users"]:
        return "other"
    rest = low[3:]
    if len(low) == 2:
        return "users"
    if not rest:
        return "user"
    if rest[-1] == "$value":
        return "value"
    if "attachments" in rest:
        return "attachments"
    if rest[0] == "mailfolders":
        if rest[1:] == ["delta"]:
            return "folder_delta"
        if len(rest) == 1:
            return "folders"
        if rest[2:] == ["childfolders"]:
            return "child_folders"
        if len(rest) == 2:
            return "folder"
        rest = rest[2:]
    if rest[:1] == ["messages"]:
        if rest[1:] == ["delta"]:
            return "delta"
        return "messages" if len(rest) == 1 else "message"
    return "other"


class _Loop:
    """An event loop on a background thread, shared by a proxy and its attacker."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class Attacker:
    """A foreign origin on 127.0.0.1 that records what reaches it (above all: an ``Authorization``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.base_url = ""
        self.graph_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner, port = await _serve(self.app)
        self.base_url = f"http://127.0.0.1:{port}"
        self.graph_url = f"{self.base_url}/v1.0"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"method": request.method, "path": request.path, "query": dict(request.query),
                              "url": request.raw_path, "authorization": request.headers.get("Authorization")})
        if "delta" in request.path.lower():
            return web.json_response({
                "@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(message)",
                "value": [{
                    "id": "EVIL-1", "subject": "injected", "parentFolderId": "EVIL-FOLDER",
                    "changeKey": "CQAAABYAAAEVIL", "createdDateTime": "2024-01-01T00:00:00Z",
                    "lastModifiedDateTime": "2024-01-01T00:00:00Z", "receivedDateTime": "2024-01-01T00:00:00Z",
                    "sentDateTime": "2024-01-01T00:00:00Z", "internetMessageId": "<evil-1@example.com>",
                    "from": {"emailAddress": {"name": "Evil", "address": "evil@example.com"}},
                    "sender": {"emailAddress": {"name": "Evil", "address": "evil@example.com"}},
                    "isRead": False, "isDraft": False, "flag": {"flagStatus": "notFlagged"}, "categories": [],
                    "hasAttachments": False, "importance": "normal",
                }],
                "@odata.deltaLink": f"{self.base_url}{request.path}?$deltatoken=evil",
            })
        return web.Response(body=ATTACKER_BODY, content_type="text/plain")


class HostileProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (a simulator, or its base URL), with an
    :class:`Attacker` next to it; ``mode`` one of :data:`MODES` (see the module docstring)."""

    def __init__(self, upstream: Any, mode: str = "pass", *, target_folder: str | None = None,
                 ca_file: str | None = None) -> None:
        self.upstream = str(getattr(upstream, "base_url", upstream)).rstrip("/")
        ca_file = ca_file or getattr(upstream, "ca_file", None)
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.mode = "pass"
        self.target_folder = target_folder
        self.set_mode(mode, target_folder=target_folder)
        self.attacker = Attacker()
        self.requests: dict[str, int] = defaultdict(int)
        self.seen: list[str] = []
        self.base_url = ""
        self.graph_url = ""
        self._endless = 0
        self._session: ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._loop: _Loop | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    # life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> HostileProxy:
        self._loop = _Loop("mailpipe-hostile")

        async def boot() -> int:
            self._session = ClientSession(connector=TCPConnector(limit=0, ssl=self._ssl or True),
                                          timeout=ClientTimeout(total=None, connect=10), auto_decompress=False)
            await self.attacker.start()
            self._runner, port = await _serve(self.app)
            return port

        port = self._loop.run(boot())
        self.base_url = f"http://127.0.0.1:{port}"
        self.graph_url = f"{self.base_url}/v1.0"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            await self.attacker.stop()
            if self._session is not None:
                await self._session.close()

        self._loop.run(down())
        self._loop.stop()
        self._loop = None

    def __enter__(self) -> HostileProxy:
        return self if self._loop is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # knobs ------------------------------------------------------------------------------------------------------
    def set_mode(self, mode: str, *, target_folder: str | None = None) -> None:
        """Switch the hostile behaviour (takes effect with the next request); ``target_folder`` for
        ``self_parent_folder`` (else the one chosen before, else the first folder with children)."""
        if mode not in MODES:
            raise ValueError(f"unknown hostile mode {mode!r}; one of {', '.join(MODES)}")
        self.mode = mode
        if target_folder is not None:
            self.target_folder = target_folder

    def reset_counters(self) -> None:
        self.requests.clear()
        self.seen.clear()

    # the proxy ----------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        kind = _kind(raw)
        self.requests[kind] += 1
        self.seen.append(f"{request.method} {raw}")
        mode = self.mode
        if kind == "value" and request.method == "GET":
            if mode == "redirect_value":
                return web.Response(status=302, headers={"Location": f"{self.attacker.base_url}{raw}"})
            if mode == "redirect_value_same_origin" and "redirected=1" not in request.query_string:
                sep = "&" if "?" in raw else "?"
                return web.Response(status=302, headers={"Location": f"{self.base_url}{raw}{sep}redirected=1"})
        if kind == "delta" and mode == "endless_distinct_pages":
            self._endless += 1
            path = raw.split("?", 1)[0]
            return web.json_response({"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(message)",
                                      "value": [],
                                      "@odata.nextLink": f"{self.base_url}{path}?$skiptoken=endless-{self._endless}"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read() if request.can_read_body else None
        try:
            async with self._session.request(request.method, URL(self.upstream + raw, encoded=True),
                                             headers=headers, data=body, allow_redirects=False) as up:
                out_headers = {k: v.replace(self.upstream, self.base_url) if k.lower() == "location" else v
                               for k, v in up.headers.items() if k.lower() not in _HOP}
                if up.content_type == "application/json":
                    text = (await up.read()).decode("utf-8").replace(self.upstream, self.base_url)
                    if up.status == 200:
                        text = await self._hostile(request, kind, mode, text)
                    return web.Response(status=up.status, body=text.encode("utf-8"), headers=out_headers)
                return await self._stream(request, up, out_headers)
        except ClientError:
            # upstream dropped the connection (the simulator's p_reset): drop this one too, transparently
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502)

    async def _stream(self, request: web.Request, up: Any, headers: dict[str, str]) -> web.StreamResponse:
        """Pass a non-JSON body through as it comes (a slow body stays slow, a broken one stays broken)."""
        if up.content_length is not None:
            headers["Content-Length"] = str(up.content_length)
        resp = web.StreamResponse(status=up.status, headers=headers)
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except (ClientError, ConnectionError):
            # upstream broke off (or the client left): break this connection off too
            if request.transport is not None:
                request.transport.abort()
        return resp

    async def _hostile(self, request: web.Request, kind: str, mode: str, text: str) -> str:
        """Apply ``mode`` to a 200 JSON answer (already rewritten to the proxy's origin)."""
        if mode == "pass":
            return text
        body = json.loads(text)
        if not isinstance(body, dict):
            return text
        here = f"{self.base_url}{request.raw_path}"
        foreign = self.attacker.base_url
        if kind == "delta":
            if mode == "foreign_next_link" and "@odata.nextLink" in body:
                body["@odata.nextLink"] = body["@odata.nextLink"].replace(self.base_url, foreign, 1)
            elif mode == "foreign_delta_link" and "@odata.deltaLink" in body:
                body["@odata.deltaLink"] = body["@odata.deltaLink"].replace(self.base_url, foreign, 1)
            elif mode == "loop_next_link":
                body["value"] = []
                body.pop("@odata.deltaLink", None)
                body["@odata.nextLink"] = here
            else:
                return text
        elif kind == "users":
            if mode == "foreign_users_link":
                link = body.get("@odata.nextLink") or f"{self.base_url}/v1.0/users?$skiptoken=evil"
                body["@odata.nextLink"] = link.replace(self.base_url, foreign, 1)
            elif mode == "loop_users_link":
                body["@odata.nextLink"] = here
            else:
                return text
        elif mode == "self_parent_folder" and kind in ("folders", "child_folders", "folder"):
            await self._self_parent(request, kind, body)
        else:
            return text
        return json.dumps(body)

    async def _self_parent(self, request: web.Request, kind: str, body: dict[str, Any]) -> None:
        """``self_parent_folder``: the target folder lists itself as its own child."""
        listing = body.get("value") if kind != "folder" else [body]
        if self.target_folder is None and kind == "folders":
            self.target_folder = next((f["id"] for f in listing if f.get("childFolderCount")), None)
        if kind == "child_folders" and int(request.query.get("$skip", "0") or 0) == 0:
            # the listed folder's own object (its path may name it by a well-known name, "inbox")
            me = await self._folder(request)
            if me is not None and self.target_folder is None and listing:
                self.target_folder = me.get("id")
            if me is not None and me.get("id") == self.target_folder:
                listing.append(me)
        for f in listing:
            if f.get("id") == self.target_folder and isinstance(f.get("childFolderCount"), int):
                f["childFolderCount"] += 1

    async def _folder(self, request: web.Request) -> dict[str, Any] | None:
        """The object of the folder whose childFolders are asked, from upstream, with the client's headers."""
        path = re.sub(r"(?i)/childfolders/*$", "", request.raw_path.split("?", 1)[0])
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.get(URL(self.upstream + path, encoded=True), headers=headers,
                                     allow_redirects=False) as up:
            if up.status != 200:
                return None
            return json.loads((await up.read()).decode("utf-8").replace(self.upstream, self.base_url))


@pytest.fixture
def hostile_factory():
    """Start hostile proxies (``hostile_factory(sim, mode="...", target_folder=None)``); all are stopped at
    the end of the test. Import it in a test module: ``from mailpipe_tests.hostile import hostile_factory``."""
    started: list[HostileProxy] = []

    def start(upstream: Any, mode: str = "pass", **kw: Any) -> HostileProxy:
        proxy = HostileProxy(upstream, mode, **kw).start()
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()
