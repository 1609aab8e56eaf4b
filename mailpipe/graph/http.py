"""The HTTP floor under msgraph-sdk: where the origin rule and the time bounds are enforced.

Every request the SDK sends — built by a request builder, following a ``nextLink``, or re-sent by any
middleware — ends in :class:`GuardedTransport`, the innermost httpx transport. It

- refuses any URL outside the tenant's ``graph_url`` (same scheme, host and port, and under its path
  prefix), before a byte or a token leaves the process (:class:`GraphOrigin`);
- bounds the time to the response headers (``response_timeout``, connection included), and
- bounds the body: from the headers on, it must arrive at ``min_transfer_rate`` bytes/s on average once
  ``slow_body_grace`` seconds have passed — a server that trickles one byte every few seconds fails
  the request (``httpx.ReadTimeout``, retried like any timeout) instead of holding a backup for ever.

Redirects are not followed at all (kiota's RedirectHandler is switched off, httpx's too): a ``3xx`` is
answered to the caller, which treats it as an error (docs/GRAPH.md, "the link-origin rule").
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from mailpipe.graph.errors import UnsafeLinkError

_DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedURL(Exception):
    """Raised by :class:`GuardedTransport` for a URL outside graph_url (the caller names the context)."""


@dataclass(frozen=True)
class RequestTimeouts:
    response_timeout: float = 120.0   # request sent → response headers, connection included
    min_transfer_rate: int = 4096     # bytes/s, averaged over the body once the grace period is over
    slow_body_grace: float = 30.0     # seconds a body may take whatever its rate
    connect_timeout: float = 15.0


class GraphOrigin:
    """The tenant's ``graph_url`` as the only place our requests (and our token) may go.

    Links from the network (``@odata.nextLink``, ``@odata.deltaLink``, ``Location``) are data: they are
    used only when they have the same scheme, host and port as ``graph_url`` and lie under its path
    (e.g. ``/v1.0/``). Saved links are stored *relative* to ``graph_url`` (:meth:`relative`) so that a
    changed ``graph_url`` (a proxy in front of Graph, a simulator on a new port) keeps them usable.
    """

    def __init__(self, graph_url: str) -> None:
        u = urlsplit(graph_url.rstrip("/"))
        if u.scheme not in _DEFAULT_PORTS or not u.hostname:
            raise ValueError(f"graph_url must be an http(s) URL: {graph_url!r}")
        self.url = graph_url.rstrip("/")
        self.scheme = u.scheme
        self.host = u.hostname.lower()
        self.port = u.port or _DEFAULT_PORTS[u.scheme]
        self.prefix = u.path.rstrip("/") + "/"   # "/v1.0/"
        # the canonical spelling of graph_url: a URL that starts with it needs no parsing (see allows)
        self._canonical = f"{self.scheme}://{_netloc(self)}{self.prefix}"
        self._path_at = len(self._canonical) - len(self.prefix)

    def describe(self, url: str) -> str:
        """Scheme, host and port of ``url`` — what an error names (never the query: it may hold tokens)."""
        try:
            u = urlsplit(url)
            return f"{u.scheme}://{u.hostname}:{u.port or _DEFAULT_PORTS.get(u.scheme, '?')}{_short(u.path)}"
        except ValueError:
            return "<unparsable URL>"

    def allows(self, url: str) -> bool:
        # the common case (every $value URL): graph_url's own spelling, nothing urlsplit would strip; the same
        # answer as below without parsing
        if url.startswith(self._canonical) and not any(c in url for c in "\t\r\n"):
            path = url[self._path_at:].split("?", 1)[0].split("#", 1)[0]
            return "/../" not in path + "/" and "\\" not in path
        try:
            u = urlsplit(url)
            port = u.port or _DEFAULT_PORTS.get(u.scheme)
        except ValueError:
            return False
        path = u.path if u.path.endswith("/") else u.path + "/"
        return (u.scheme == self.scheme and (u.hostname or "").lower() == self.host and port == self.port
                and path.startswith(self.prefix) and "/../" not in path and "\\" not in u.path)

    def check(self, url: str, what: str) -> str:
        """``url`` if our requests may go there, else :class:`UnsafeLinkError` naming where it pointed."""
        if not self.allows(url):
            raise UnsafeLinkError(
                f"{what}: refused to follow a link to {self.describe(url)}, outside graph_url {self.url} "
                "(no request sent, no token given; nothing from it is committed)")
        return url

    def relative(self, url: str) -> str:
        """A link as it is saved: relative to ``graph_url`` (``users/…/delta()?$deltatoken=…``)."""
        u = urlsplit(url)
        rel = u.path[len(self.prefix):] if u.path.startswith(self.prefix) else u.path.lstrip("/")
        return rel + (f"?{u.query}" if u.query else "")

    def resolve_saved(self, link: str) -> str | None:
        """A saved link made absolute on *today's* ``graph_url``; ``None`` when it cannot be used.

        Relative links (how they are saved) are joined to ``graph_url``. Absolute links (older snapshots)
        are rebased onto ``graph_url`` when their path lies under the same prefix (``/v1.0/``): they were
        issued by the same API behind another address. Anything else cannot be used: that folder is
        listed from scratch.
        """
        if not link:
            return None
        if "://" not in link:
            return f"{self.url}/{link.lstrip('/')}"
        try:
            u = urlsplit(link)
        except ValueError:
            return None
        if not u.path.startswith(self.prefix):
            return None
        return f"{self.scheme}://{_netloc(self)}{u.path}" + (f"?{u.query}" if u.query else "")


def _netloc(o: GraphOrigin) -> str:
    host = f"[{o.host}]" if ":" in o.host else o.host
    return host if o.port == _DEFAULT_PORTS[o.scheme] else f"{host}:{o.port}"


def _short(path: str) -> str:
    return path if len(path) <= 60 else path[:57] + "..."


class _RateGuardedStream(httpx.AsyncByteStream):
    """A response body that must keep up ``rate`` bytes/s on average after ``grace`` seconds."""

    def __init__(self, inner: httpx.AsyncByteStream, started: float, rate: int, grace: float, url: str) -> None:
        self.inner = inner
        self.started = started
        self.rate = rate
        self.grace = grace
        self.url = url

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        it = self.inner.__aiter__()
        while True:
            # by now, `received` bytes may have taken grace + received / rate seconds
            budget = self.started + self.grace + received / self.rate - time.monotonic()
            try:
                async with asyncio.timeout(max(budget, 0.001)):
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise httpx.ReadTimeout(
                    f"response body slower than {self.rate} bytes/s ({received} bytes in "
                    f"{time.monotonic() - self.started:.0f} s)") from None
            received += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """The innermost transport of a Graph client (see the module docstring)."""

    def __init__(self, origin: GraphOrigin, timeouts: RequestTimeouts, *, verify: Any,
                 limits: httpx.Limits) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self.inner = httpx.AsyncHTTPTransport(verify=verify, limits=limits, trust_env=False,
                                              proxy=_env_proxy(origin))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if not self.origin.allows(url):
            raise RefusedURL(f"refused a request to {self.origin.describe(url)}, outside graph_url "
                             f"{self.origin.url} (nothing sent, no token given)")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeouts.response_timeout):
                response = await self.inner.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no response within {self.timeouts.response_timeout:g} s",
                                    request=request) from None
        response.stream = _RateGuardedStream(response.stream, started, self.timeouts.min_transfer_rate,
                                             self.timeouts.slow_body_grace, str(request.url))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _env_proxy(origin: GraphOrigin) -> str | None:
    """The proxy the environment asks for (``HTTPS_PROXY``/``NO_PROXY``…) to reach graph_url — the
    only origin this transport ever talks to."""
    if urllib.request.proxy_bypass(origin.host):
        return None
    return urllib.request.getproxies().get(origin.scheme)


def client_timeout(t: RequestTimeouts) -> httpx.Timeout:
    # httpx's per-read timeout is a backstop; the body's real bound is the rate guard above
    return httpx.Timeout(t.response_timeout, connect=t.connect_timeout)
