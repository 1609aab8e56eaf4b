"""The lean download path: ``$value`` (one request per item) on a plain aiohttp session, not kiota.

msgraph-sdk stays for everything else (users, folders, deltas: about one request per 500 items). A
``$value`` download through kiota costs ~0.75–0.9 ms of CPU (request information, URI handling, nine
middleware handlers, httpx + httpcore); here it is one aiohttp request. What it keeps, exactly:

- **the link-origin rule**: a URL is used only when :class:`~mailpipe.graph.http.GraphOrigin` allows it
  (scheme, host, port of ``graph_url``, under its path), checked right before the request, whoever built
  it (:class:`~mailpipe.graph.http.RefusedURL`, classified ``unsafe-link`` like the guarded transport's);
  the token goes only there. **No redirect is followed** (``allow_redirects=False``): a ``3xx`` is
  answered to the caller, which raises ``unsafe-link``;
- **TLS**: the same SSL context as the SDK's client (``ca_bundle`` when the tenant has one);
- **the token** from the tenant's azure-identity credential, cached here and fetched again five
  minutes before it expires (one fetch at a time); never logged, never in an exception;
- **time bounds** (:class:`~mailpipe.graph.http.RequestTimeouts`): response headers within
  ``response_timeout`` (connection included; connect alone ``connect_timeout``), then the body at
  ``min_transfer_rate`` on average after ``slow_body_grace``; a timeout or a broken connection is a
  :class:`~mailpipe.graph.errors.TransientError` with the same text as on the SDK path;
- proxies: only the one the environment gives for ``graph_url`` (``HTTPS_PROXY``/``NO_PROXY``).

The limiter, the retries and the status → error mapping are the caller's (``_Caller.call`` and
``check_status`` in :mod:`mailpipe.graph.client`), shared with the SDK path.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailpipe.graph.errors import TransientError
from mailpipe.graph.http import GraphOrigin, RefusedURL, RequestTimeouts, _env_proxy

REFRESH_BEFORE = 300.0  # seconds before expiry a cached token is fetched again
_READ = 1 << 20  # what is buffered, up to this much, per read


@dataclass
class RawResponse:
    status: int
    headers: Mapping[str, str]   # case-insensitive
    content: bytes


class TokenCache:
    """A bearer token from an azure-identity (async) credential, reused until shortly before it expires."""

    def __init__(self, credential: Any, scope: str) -> None:
        self._credential = credential
        self._scope = scope
        self._token: str | None = None
        self._expires = 0.0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:  # never the token
        return f"TokenCache(scope={self._scope!r})"

    async def get(self) -> str:
        if self._token is not None and time.time() < self._expires - REFRESH_BEFORE:
            return self._token
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:  # a lock belongs to one event loop
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            if self._token is None or time.time() >= self._expires - REFRESH_BEFORE:
                at = await self._credential.get_token(self._scope)
                self._token, self._expires = at.token, float(at.expires_on)
        return self._token

    def forget(self) -> None:
        """After a 401: the next request fetches a new token."""
        self._token = None


class LeanSession:
    """One aiohttp session for a tenant's ``$value`` downloads (made on first use, in the running loop)."""

    def __init__(self, origin: GraphOrigin, timeouts: RequestTimeouts, ssl_context: ssl.SSLContext | None,
                 tokens: TokenCache) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self.ssl_context = ssl_context
        self.tokens = tokens
        self._proxy = _env_proxy(origin)
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0

    def _open(self) -> Any:
        import aiohttp

        self._loop = asyncio.get_running_loop()  # a session belongs to one event loop

        # no connection cap here: the per-mailbox limiters cap what is in flight
        conn = aiohttp.TCPConnector(limit=0, ssl=self.ssl_context if self.origin.scheme == "https" else False,
                                    keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=conn, trust_env=False, auto_decompress=True,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_timeout),
            headers={"Prefer": 'IdType="ImmutableId"', "User-Agent": "mailpipe"},
            skip_auto_headers=("Content-Type",))
        return self._session

    async def get(self, url: str, what: str) -> RawResponse:
        """GET ``url`` (on graph_url, or :class:`RefusedURL`) with the tenant's token; the whole body, read
        within the time bounds. Never follows a redirect."""
        import aiohttp
        from yarl import URL

        if not self.origin.allows(url):
            raise RefusedURL(f"refused a request to {self.origin.describe(url)}, outside graph_url "
                             f"{self.origin.url} (nothing sent, no token given)")
        session = self._session
        if session is None or self._loop is not asyncio.get_running_loop():
            session = self._open()
        token = await self.tokens.get()
        t = self.timeouts
        started = time.monotonic()
        self.requests += 1
        try:
            try:
                async with asyncio.timeout(t.response_timeout):
                    resp = await session.get(URL(url, encoded=True), allow_redirects=False, proxy=self._proxy,
                                             headers={"Authorization": f"Bearer {token}"})
            except TimeoutError:
                raise TransientError(f"{what}: timed out (no response within {t.response_timeout:g} s)") from None
            try:
                body = await self._body(resp, started, what)
            finally:
                resp.release()
            if resp.status == 401:
                self.tokens.forget()  # revoked or expired early: the next attempt asks the credential again
        except aiohttp.ClientError as e:
            raise TransientError(f"{what}: connection failed ({type(e).__name__})") from None
        except (ConnectionError, OSError) as e:
            raise TransientError(f"{what}: connection failed ({type(e).__name__})") from None
        return RawResponse(resp.status, resp.headers, body)

    async def _body(self, resp: Any, started: float, what: str) -> bytes:
        """The body, which must keep up ``min_transfer_rate`` bytes/s on average after the grace period."""
        t = self.timeouts
        parts: list[bytes] = []
        received = 0
        content = resp.content
        while True:
            chunk = content.read_nowait(-1)  # what has arrived already: no wait, no timer
            if chunk:
                parts.append(chunk)
                received += len(chunk)
                continue
            if content.at_eof():
                break
            budget = started + t.slow_body_grace + received / t.min_transfer_rate - time.monotonic()
            try:
                async with asyncio.timeout(max(budget, 0.001)):
                    chunk = await content.read(_READ)
            except TimeoutError:
                raise TransientError(
                    f"{what}: timed out (response body slower than {t.min_transfer_rate} bytes/s ({received} "
                    f"bytes in {time.monotonic() - started:.0f} s))") from None
            if not chunk:
                break
            parts.append(chunk)
            received += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        if self._session is not None:
            s, self._session = self._session, None
            await s.close()
