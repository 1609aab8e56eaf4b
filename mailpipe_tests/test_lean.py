"""The lean ``$value`` path (mailpipe/graph/lean.py) over real sockets: the same origin rule, redirects,
TLS settings, token handling, time bounds and error classes as the SDK path."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from aiohttp import web
from azure.core.credentials import AccessToken

from mailpipe.config import AuthConfig
from mailpipe.graph import GraphTenant, RetryPolicy
from mailpipe.graph.errors import GraphError, TransientError, UnsafeLinkError
from mailpipe.graph.http import GraphOrigin, RefusedURL, RequestTimeouts
from mailpipe.graph.lean import LeanSession, TokenCache
from mailpipe.sim import SimConfig, start_simulator
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.hostile import hostile_factory  # noqa: F401 - fixture

FAST = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
SECRET_TOKEN = "eyJsecret.token-value.never-shown"


def first_user(sim):
    upn = next(u for u in sim.truth()["mailboxes"] if not u.startswith("shared"))
    return upn, sim.model.user(upn).id


class CountingCredential:
    def __init__(self, lifetime: float) -> None:
        self.calls = 0
        self.lifetime = lifetime

    async def get_token(self, *scopes, **kw):
        self.calls += 1
        return AccessToken(f"{SECRET_TOKEN}-{self.calls}", int(time.time() + self.lifetime))


def test_value_downloads_use_the_lean_path_not_the_sdk(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=8)
    upn, uid = first_user(sim)
    mbm = sim.model.mailbox(upn)

    async def go():
        async with GraphTenant.from_config(make_tenant(sim, str(tmp_path)), policy=FAST) as g:
            mb = g.mailbox(uid, upn)
            for m in mbm.msgs.values():
                assert await mb.get_mime(m.id) == mbm.mime(m)
            return g._lean.requests, mb._client, mb.stats

    lean_requests, sdk_client, stats = asyncio.run(go())
    assert lean_requests == len(mbm.msgs) == stats.by_kind["mime"]
    assert sdk_client is None  # no kiota client was even built for the mailbox


def test_the_lean_path_refuses_urls_outside_graph_url(sim_factory, hostile_factory, tmp_path):  # noqa: F811
    sim = sim_factory(users=1, messages_per_mailbox=3)
    proxy = hostile_factory(sim, "pass")
    upn, uid = first_user(sim)
    mid = sorted(sim.model.mailbox(upn).msgs)[0]
    attacker = proxy.attacker.base_url

    async def go():
        async with GraphTenant.from_config(make_tenant(sim, str(tmp_path), graph_url=proxy.graph_url),
                                           policy=FAST) as g:
            mb = g.mailbox(uid, upn)
            for url in (f"{attacker}/v1.0/users/{uid}/messages/{mid}/$value",       # another origin
                        f"{proxy.base_url}/beta/users/{uid}/messages/{mid}/$value",  # outside the path prefix
                        f"{proxy.graph_url}/../beta/users/{uid}/$value",
                        proxy.graph_url.replace("http://", "https://") + f"/users/{uid}/$value"):
                with pytest.raises(RefusedURL):
                    await g._lean.get(url, "w")
                with pytest.raises(UnsafeLinkError) as e:
                    await mb._caller.call("mime", lambda url=url: mb._get_raw(url, "w"))
                assert e.value.kind == "unsafe-link" and "$deltatoken" not in str(e.value)
            return g._lean.requests

    assert asyncio.run(go()) == 0  # nothing sent
    assert proxy.attacker.requests == [] and proxy.requests["value"] == 0


@pytest.mark.parametrize("mode", ["redirect_value", "redirect_value_same_origin"])
def test_the_lean_path_never_follows_a_redirect(sim_factory, hostile_factory, tmp_path, mode):  # noqa: F811
    sim = sim_factory(users=1, messages_per_mailbox=3)
    proxy = hostile_factory(sim, mode)
    upn, uid = first_user(sim)
    mid = sorted(sim.model.mailbox(upn).msgs)[0]

    async def go():
        async with GraphTenant.from_config(make_tenant(sim, str(tmp_path), graph_url=proxy.graph_url),
                                           policy=FAST) as g:
            with pytest.raises(UnsafeLinkError) as e:
                await g.mailbox(uid, upn).get_mime(mid)
            return e.value

    err = asyncio.run(go())
    assert err.status == 302 and "not followed" in str(err)
    assert proxy.requests["value"] == 1  # not retried, not followed
    assert proxy.attacker.requests == [] and not any("redirected=1" in s for s in proxy.seen)


def test_the_lean_path_honours_ca_bundle_and_takes_the_token_from_the_credential(tmp_path, monkeypatch):
    secret = "Zx9~lean.secret-value_7"
    client_id = "66666666-7777-8888-9999-000000000000"
    cfg = SimConfig(users=1, messages_per_mailbox=4, tls=True, clients={client_id: secret},
                    state_dir=str(tmp_path / "sim"))
    with start_simulator(cfg) as sim:
        monkeypatch.setenv("LEAN_SECRET", secret)
        upn, uid = first_user(sim)
        mbm = sim.model.mailbox(upn)
        t = make_tenant(sim, str(tmp_path), auth=AuthConfig(client_secret_env="LEAN_SECRET"), ca_bundle=sim.ca_file,
                        tenant_id=sim.model.tenant_id, client_id=client_id)

        async def go():
            async with GraphTenant.from_config(t, policy=FAST) as g:
                mb = g.mailbox(uid, upn)
                # https with the simulator's own CA (in no system trust store), and a token the simulator's
                # token endpoint issued to this credential (it refuses any other: 401)
                for m in mbm.msgs.values():
                    assert await mb.get_mime(m.id) == mbm.mime(m)
                assert g._lean.requests == len(mbm.msgs)
                # the same session without the tenant's CA: a TLS failure, classified like the SDK path's
                bare = LeanSession(g.origin, g.timeouts, ssl.create_default_context(), g._lean.tokens)
                try:
                    m = next(iter(mbm.msgs))
                    with pytest.raises(TransientError) as e:
                        await bare.get(f"{mb._messages_url}/{m}/$value", "w")
                    assert "connection failed" in str(e.value)
                finally:
                    await bare.aclose()

        before = sim.stats()["requests"].get(upn, {}).get("mime", 0)
        asyncio.run(go())
        assert sim.stats()["requests"][upn]["mime"] - before == len(mbm.msgs)  # the bare session sent nothing
        tokens = sim.stats()["requests"]["_tenant"]["token"]
        assert 1 <= tokens <= 2  # cached: not one token request per download


def test_token_cache_reuses_and_refreshes_and_never_shows_the_token():
    async def go():
        fresh = CountingCredential(3600)
        tc = TokenCache(fresh, "scope")
        toks = {await tc.get() for _ in range(50)}
        assert fresh.calls == 1 and len(toks) == 1
        tc.forget()
        await tc.get()
        assert fresh.calls == 2
        short = CountingCredential(120)  # inside the refresh margin: asked again every time
        tc2 = TokenCache(short, "scope")
        await asyncio.gather(*(tc2.get() for _ in range(5)))
        await tc2.get()
        assert short.calls >= 2
        assert SECRET_TOKEN not in repr(tc) and SECRET_TOKEN not in str(vars(tc).get("_scope"))

    asyncio.run(go())


# -- error classes: the lean path and the SDK path answer the same server the same way -------------------------
ANSWERS = {
    "item404": (404, {}, b'{"error":{"code":"ErrorItemNotFound","message":"The item was not found."}}'),
    "nomailbox": (404, {}, b'{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"REST API is not enabled."}}'),
    "throttled": (429, {"Retry-After": "7"}, b'{"error":{"code":"ApplicationThrottled","message":"over limit"}}'),
    "gateway": (503, {"Content-Type": "text/html"}, b"<html><body>Service Unavailable</body></html>"),
    "corrupt": (500, {}, b'{"error":{"code":"ErrorCorruptData","message":"cannot convert"}}'),
    "gone": (410, {}, b'{"error":{"code":"SyncStateNotFound","message":"sync state gone"}}'),
    "denied": (403, {}, b'{"error":{"code":"ErrorAccessDenied","message":"Access is denied."}}'),
    "echo401": (401, {}, b'{"error":{"code":"InvalidAuthenticationToken","message":"bad Bearer %TOKEN%"}}'),
    "redirect": (302, {"Location": "http://127.0.0.1:9/v1.0/x?$skiptoken=secret"}, b""),
    "bad": (400, {}, b"not json at all"),
}


async def _server(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1.0"


def test_the_lean_path_maps_every_answer_to_the_same_error_as_the_sdk_path(tmp_path):
    seen_auth: list[str] = []

    async def handler(request):
        seen_auth.append(request.headers.get("Authorization", ""))
        status, headers, body = ANSWERS[request.path.rsplit("/", 2)[-2]]
        body = body.replace(b"%TOKEN%", request.headers.get("Authorization", "").encode())
        return web.Response(status=status, headers=headers, body=body,
                            content_type=None if "Content-Type" in headers else "application/json")

    class Sim:  # what make_tenant needs
        authority = None

    async def go():
        runner, graph_url = await _server(handler)
        try:
            Sim.graph_url = graph_url
            async with GraphTenant.from_config(make_tenant(Sim, str(tmp_path)), policy=FAST) as g:
                mb = g.mailbox("u1", "u1@x")
                out = {}
                for name in ANSWERS:
                    url = f"{graph_url}/users/u1/messages/{name}/$value"
                    errs = []
                    for path in ("lean", "sdk"):
                        try:
                            if path == "lean":
                                await mb._get_raw(url, "w")
                            else:
                                await g.send(g.client.users.with_url(url), g._config(), "w")
                        except GraphError as e:
                            errs.append(e)
                        except Exception as e:  # noqa: BLE001 - the caller's classification, as _Caller does
                            from mailpipe.graph.client import classify
                            errs.append(classify(e, "w"))
                    out[name] = errs
                return out
        finally:
            await runner.cleanup()

    out = asyncio.run(go())
    for name, (lean, sdk) in out.items():
        assert (type(lean), lean.kind, lean.status, lean.code, lean.retry_after) == \
               (type(sdk), sdk.kind, sdk.status, sdk.code, sdk.retry_after), name
        assert str(lean) == str(sdk), name
        assert "mailpipe-simulator-static-token" not in str(lean)  # the token, echoed by the server
    assert out["throttled"][0].kind == "throttled" and out["throttled"][0].retry_after == 7
    assert out["redirect"][0].kind == "unsafe-link" and "secret" not in str(out["redirect"][0])
    assert out["corrupt"][0].kind == "permanent" and out["gateway"][0].kind == "transient"
    assert out["item404"][0].kind == "not-found" and out["nomailbox"][0].kind == "no-mailbox"
    assert all(a == "Bearer mailpipe-simulator-static-token" for a in seen_auth)


def test_the_lean_path_time_bounds_and_broken_connections(tmp_path):
    async def handler(request):
        kind = request.path.rsplit("/", 2)[-2]
        if kind == "silent":  # never answers
            await asyncio.sleep(30)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain", "Content-Length": "100000"})
        await resp.prepare(request)
        if kind == "trickle":
            for _ in range(40):
                await resp.write(b"x")
                await asyncio.sleep(0.1)
        else:  # "cut": half the body, then the connection drops
            await resp.write(b"y" * 50000)
            request.transport.close()
        return resp

    class Sim:
        authority = None

    async def go():
        runner, graph_url = await _server(handler)
        try:
            Sim.graph_url = graph_url
            timeouts = RequestTimeouts(response_timeout=0.5, min_transfer_rate=1000, slow_body_grace=0.5)
            async with GraphTenant.from_config(make_tenant(Sim, str(tmp_path)), policy=FAST,
                                               timeouts=timeouts) as g:
                mb = g.mailbox("u1", "u1@x")
                out = {}
                for kind in ("silent", "trickle", "cut"):
                    t0 = time.monotonic()
                    with pytest.raises(TransientError) as e:
                        await mb.get_mime(kind)
                    out[kind] = (str(e.value), time.monotonic() - t0)
                return out
        finally:
            await runner.cleanup()

    out = asyncio.run(go())
    assert "no response within 0.5 s" in out["silent"][0] and "gave up after 2 attempts" in out["silent"][0]
    assert "slower than 1000 bytes/s" in out["trickle"][0] and "item trickle" in out["trickle"][0]
    assert "connection failed" in out["cut"][0]
    assert all(secs < 10 for _, secs in out.values())


def test_graph_origin_is_what_the_lean_path_checks():
    o = GraphOrigin("http://127.0.0.1:8080/v1.0")
    cred = CountingCredential(3600)
    s = LeanSession(o, RequestTimeouts(), None, TokenCache(cred, "x"))

    async def go():
        with pytest.raises(RefusedURL):
            await s.get("http://127.0.0.2:8080/v1.0/users/u/messages/m/$value", "w")
        await s.aclose()

    asyncio.run(go())
    assert cred.calls == 0  # refused before a token was even asked for


def test_graph_origin_fast_path_answers_like_the_full_parse():
    """GraphOrigin.allows skips urlsplit for URLs spelled like graph_url (every $value URL): random URLs made
    of the pieces that matter must get the same answer as the parsing rule."""
    import random
    from urllib.parse import urlsplit

    def parsed(o, url):
        try:
            u = urlsplit(url)
            port = u.port or {"http": 80, "https": 443}.get(u.scheme)
        except ValueError:
            return False
        path = u.path if u.path.endswith("/") else u.path + "/"
        return (u.scheme == o.scheme and (u.hostname or "").lower() == o.host and port == o.port
                and path.startswith(o.prefix) and "/../" not in path and "\\" not in u.path)

    rnd = random.Random(3)
    pieces = ["/", ".", "..", "a", "?", "#", "\\", "\t", "\n", "%2e", "v1.0", "@", ":", "x=1", "/../", "//"]
    for base in ("http://127.0.0.1:8080/v1.0", "https://graph.microsoft.com/v1.0", "http://[::1]:9/v1.0",
                 "https://Graph.Example.com:443/beta"):
        o = GraphOrigin(base)
        for _ in range(5000):
            url = o._canonical + "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8)))
            assert o.allows(url) == parsed(o, url), (base, url)
    o = GraphOrigin("http://127.0.0.1:8080/v1.0")
    assert not o.allows("http://127.0.0.1:8080/v1.0/users/../../x") and not o.allows("http://127.0.0.1:8080/v1.0/a\\b")
    assert o.allows("http://127.0.0.1:8080/v1.0/users/u/messages/m/$value")


def test_token_cache_and_session_survive_a_new_event_loop(sim_factory, tmp_path):
    """A GraphTenant used from two event loops one after the other (asyncio.run twice): the session and the
    token lock are made again for the new loop instead of failing."""
    sim = sim_factory(users=1, messages_per_mailbox=3)
    upn, uid = first_user(sim)
    mbm = sim.model.mailbox(upn)
    short = CountingCredential(120)  # always inside the refresh margin: the lock is taken on every request
    g = GraphTenant.from_config(make_tenant(sim, str(tmp_path)), policy=FAST)
    g._lean.tokens = TokenCache(short, "scope")
    m = next(iter(mbm.msgs.values()))

    async def one():
        return await g.mailbox(uid, upn).get_mime(m.id)

    assert asyncio.run(one()) == mbm.mime(m)
    assert asyncio.run(one()) == mbm.mime(m)
    asyncio.run(g.aclose())
    assert short.calls == 2
