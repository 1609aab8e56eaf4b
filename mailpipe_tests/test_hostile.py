"""The hostile reverse proxy (mailpipe_tests/hostile.py) does what it claims, checked with a plain HTTP
client; how the Graph client reacts to it is tested with the Graph client."""

from __future__ import annotations

import time

import httpx
import pytest

from mailpipe.sim import FaultConfig
from mailpipe_tests.hostile import ATTACKER_BODY, HostileProxy, hostile_factory  # noqa: F401

AUTH = "Bearer let-me-in"
H = {"Authorization": AUTH, "Prefer": 'IdType="ImmutableId", odata.maxpagesize=3'}


def get(url, headers=None, **kw):
    return httpx.get(url, headers={**H, **(headers or {})}, timeout=30, **kw)


def first_user(sim):
    upn = next(u for u in sim.truth()["mailboxes"] if not u.startswith("shared"))
    return upn, sim.model.user(upn).id


def delta_url(base, uid, folder="inbox"):
    return f"{base}/users/{uid}/mailFolders/{folder}/messages/delta()"


def run_delta(url, limit=100):
    """Follow a message delta to its deltaLink: (ids, nextLinks followed, deltaLink)."""
    ids, links = [], []
    for _ in range(limit):
        body = get(url).json()
        ids += [v["id"] for v in body["value"]]
        if "@odata.nextLink" not in body:
            return ids, links, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]
        links.append(url)
    raise AssertionError("no deltaLink")


def test_pass_forwards_everything_and_keeps_links_on_the_proxy(sim_factory, hostile_factory):
    sim = sim_factory(users=2, messages_per_mailbox=20)
    proxy = hostile_factory(sim)
    upn, uid = first_user(sim)
    assert proxy.graph_url.startswith("http://127.0.0.1:") and proxy.graph_url != sim.graph_url
    # users paging: nextLinks rewritten to the proxy, nothing of the upstream origin left in the text
    r = get(f"{proxy.graph_url}/users?$top=2")
    assert r.status_code == 200 and r.json()["@odata.nextLink"].startswith(proxy.graph_url + "/users?")
    assert sim.base_url not in r.text
    # delta (headers forwarded: Prefer's page size and immutable ids), links stay on the proxy
    ids, links, delta_link = run_delta(delta_url(proxy.graph_url, uid))
    direct, _, _ = run_delta(delta_url(sim.graph_url, uid))
    assert ids == direct and all("." not in i for i in ids) and len(links) >= 2
    assert all(u.startswith(proxy.graph_url) for u in [*links, delta_link])
    assert "mailFolders('" in links[0]  # the upstream's raw path form, as sent
    # Authorization forwarded: without it, the upstream's 401 comes through
    assert httpx.get(f"{proxy.graph_url}/users", timeout=10).status_code == 401
    # bodies forwarded (a POST), the content passed through byte for byte
    httpx.post(f"{proxy.base_url}/_sim/faults", json={"fail_values": {ids[0]: 503}}, timeout=10)
    assert sim.server.faults.fail_values == {ids[0]: 503}
    assert get(f"{proxy.graph_url}/users/{uid}/messages/{ids[0]}/$value").status_code == 503
    sim.set_faults(FaultConfig())
    mb = sim.model.mailbox(upn)
    r = get(f"{proxy.graph_url}/users/{uid}/messages/{ids[1]}/$value")
    assert r.content == mb.mime(mb.msgs[ids[1]]) and int(r.headers["content-length"]) == len(r.content)
    # Location headers rewritten (410 SyncStateNotFound carries one)
    sim.expire_delta_tokens(upn)
    r = get(delta_link)
    assert r.status_code == 410 and r.headers["Location"] == f"{proxy.graph_url}/"
    assert proxy.requests["users"] == 2 and proxy.requests["delta"] == len(links) + 2 and proxy.requests["value"] == 2
    assert proxy.attacker.requests == []


def test_bodies_stream_through_slow_and_broken(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim)
    upn, uid = first_user(sim)
    mb = sim.model.mailbox(upn)
    a, b = sorted(mb.msgs)[:2]
    sim.set_faults(FaultConfig(trickle_values=[a], trickle_interval_s=0.2))
    chunks, t0 = [], time.monotonic()
    with httpx.stream("GET", f"{proxy.graph_url}/users/{uid}/messages/{a}/$value", headers=H,
                      timeout=httpx.Timeout(10, read=2)) as r:
        assert int(r.headers["content-length"]) == len(mb.mime(mb.msgs[a]))
        for chunk in r.iter_raw():
            chunks.append(chunk)
            if len(chunks) == 3:
                break
    assert b"".join(chunks) == mb.mime(mb.msgs[a])[:3] and time.monotonic() - t0 < 2  # still a trickle
    sim.set_faults(FaultConfig(p_reset=1.0))
    with pytest.raises(httpx.TransportError):  # a reset upstream is a reset here
        get(f"{proxy.graph_url}/users/{uid}/messages/{b}/$value")
    sim.set_faults(FaultConfig())
    assert get(f"{proxy.graph_url}/users/{uid}/messages/{b}/$value").status_code == 200


def test_foreign_next_link_and_the_attacker(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, mode="foreign_next_link")
    _, uid = first_user(sim)
    body = get(delta_url(proxy.graph_url, uid)).json()
    link = body["@odata.nextLink"]
    evil = proxy.attacker.base_url
    assert link.startswith(f"{evil}/v1.0/users/{uid}/mailFolders('") and "$skiptoken=" in link
    # the same path and query as the legitimate link: on the proxy it is a valid next page
    assert get(proxy.base_url + link[len(evil):]).status_code == 200
    # what the attacker gets and answers
    r = get(link)
    page = r.json()
    assert [v["id"] for v in page["value"]] == ["EVIL-1"] and page["value"][0]["subject"] == "injected"
    assert page["@odata.deltaLink"].startswith(evil) and page["@odata.deltaLink"].endswith("$deltatoken=evil")
    seen = proxy.attacker.requests[-1]
    assert seen["authorization"] == AUTH and seen["method"] == "GET"
    assert seen["path"] == f"/v1.0/users/{uid}/mailFolders('{seen['path'].split(chr(39))[1]}')/messages/delta()"
    assert set(seen["query"]) == {"$skiptoken"} and seen["url"] == link[len(evil):]
    r = httpx.get(f"{evil}/anything/$value", timeout=10)  # no Authorization: recorded as None
    assert r.content == ATTACKER_BODY and r.headers["content-type"].startswith("text/plain")
    assert proxy.attacker.requests[-1]["authorization"] is None
    # a single-page delta has no nextLink: its deltaLink stays on the proxy
    body = get(delta_url(proxy.graph_url, uid), {"Prefer": 'IdType="ImmutableId", odata.maxpagesize=100'}).json()
    assert body["@odata.deltaLink"].startswith(proxy.graph_url)


def test_foreign_delta_link(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, mode="foreign_delta_link")
    _, uid = first_user(sim)
    _, links, delta_link = run_delta(delta_url(proxy.graph_url, uid))
    assert links and all(u.startswith(proxy.graph_url) for u in links)
    assert delta_link.startswith(proxy.attacker.graph_url + f"/users/{uid}/mailFolders('")
    assert "$deltatoken=" in delta_link
    # other JSON answers are untouched, e.g. the folder delta's own deltaLink
    assert get(f"{proxy.graph_url}/users/{uid}/mailFolders/delta()").json()["@odata.deltaLink"].startswith(
        proxy.graph_url)


def test_foreign_users_link(sim_factory, hostile_factory):
    sim = sim_factory(users=3, messages_per_mailbox=2)
    proxy = hostile_factory(sim, mode="foreign_users_link")
    evil = proxy.attacker.graph_url
    r = get(f"{proxy.graph_url}/users?$top=2&$select=id").json()
    assert r["@odata.nextLink"].startswith(f"{evil}/users?$top=2&$skiptoken=2")
    r = get(f"{proxy.graph_url}/users?$top=999").json()  # upstream has no next page: one is added
    assert len(r["value"]) == 5 and r["@odata.nextLink"] == f"{evil}/users?$skiptoken=evil"
    got = get(r["@odata.nextLink"])
    assert got.content == ATTACKER_BODY
    assert proxy.attacker.requests[-1] == {"method": "GET", "path": "/v1.0/users", "query": {"$skiptoken": "evil"},
                                           "url": "/v1.0/users?$skiptoken=evil", "authorization": AUTH}


def test_redirect_value(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=5)
    proxy = hostile_factory(sim, mode="redirect_value")
    upn, uid = first_user(sim)
    mid = sorted(sim.model.mailbox(upn).msgs)[0]
    path = f"/v1.0/users/{uid}/messages/{mid}/$value"
    r = get(proxy.base_url + path)
    assert r.status_code == 302 and r.headers["Location"] == proxy.attacker.base_url + path
    assert sim.stats()["requests"].get(upn, {}).get("mime", 0) == 0  # upstream not asked
    # the metadata GET is not redirected
    assert get(f"{proxy.graph_url}/users/{uid}/messages/{mid}").json()["id"] == mid
    r = get(proxy.base_url + path, follow_redirects=True)  # httpx drops Authorization across origins
    assert r.content == ATTACKER_BODY and proxy.attacker.requests[-1]["authorization"] is None
    assert proxy.attacker.requests[-1]["path"] == path


def test_redirect_value_same_origin(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=5)
    proxy = hostile_factory(sim, mode="redirect_value_same_origin")
    upn, uid = first_user(sim)
    mb = sim.model.mailbox(upn)
    mid = sorted(mb.msgs)[0]
    url = f"{proxy.graph_url}/users/{uid}/messages/{mid}/$value"
    r = get(url)
    assert r.status_code == 302 and r.headers["Location"] == url + "?redirected=1"
    r = get(url, follow_redirects=True)
    assert r.status_code == 200 and r.content == mb.mime(mb.msgs[mid]) and len(r.history) == 1
    assert proxy.requests["value"] == 3 and proxy.attacker.requests == []


def test_loop_next_link(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, mode="loop_next_link")
    _, uid = first_user(sim)
    url = first = delta_url(proxy.graph_url, uid)
    for _ in range(6):
        body = get(url).json()
        assert body["value"] == [] and "@odata.deltaLink" not in body
        assert body["@odata.nextLink"] == first
        url = body["@odata.nextLink"]
    assert proxy.requests["delta"] == 6
    proxy.set_mode("pass")
    ids, _, _ = run_delta(first)
    assert ids


def test_loop_users_link(sim_factory, hostile_factory):
    sim = sim_factory(users=3, messages_per_mailbox=2)
    proxy = hostile_factory(sim, mode="loop_users_link")
    url = first = f"{proxy.graph_url}/users?$top=2"
    for _ in range(5):
        body = get(url).json()
        assert len(body["value"]) == 2 and body["@odata.nextLink"] == first
        url = body["@odata.nextLink"]
    assert proxy.requests["users"] == 5
    # the single-page listing loops too
    assert get(f"{proxy.graph_url}/users?$top=999").json()["@odata.nextLink"] == f"{proxy.graph_url}/users?$top=999"


def test_endless_distinct_pages(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, mode="endless_distinct_pages")
    _, uid = first_user(sim)
    url, links = delta_url(proxy.graph_url, uid), []
    for _ in range(8):
        body = get(url).json()
        assert body["value"] == [] and "@odata.deltaLink" not in body
        url = body["@odata.nextLink"]
        links.append(url)
    assert len(set(links)) == 8 and all(u.startswith(proxy.graph_url) for u in links)
    assert "$skiptoken=endless-" in links[-1] and proxy.requests["delta"] == 8


def test_self_parent_folder(sim_factory, hostile_factory):
    sim = sim_factory(users=1, messages_per_mailbox=30)
    proxy = hostile_factory(sim, mode="self_parent_folder")
    upn, uid = first_user(sim)
    direct = {f["id"]: f for f in get(f"{sim.graph_url}/users/{uid}/mailFolders?$top=50").json()["value"]}
    top = get(f"{proxy.graph_url}/users/{uid}/mailFolders?$top=50").json()["value"]
    target = next(f["id"] for f in top if direct[f["id"]]["childFolderCount"])  # the first folder with children
    assert proxy.target_folder == target
    for f in top:
        assert f["childFolderCount"] == direct[f["id"]]["childFolderCount"] + (f["id"] == target)
    kids = get(f"{proxy.graph_url}/users/{uid}/mailFolders/{target}/childFolders").json()["value"]
    real = get(f"{sim.graph_url}/users/{uid}/mailFolders/{target}/childFolders").json()["value"]
    assert [k["id"] for k in kids] == [k["id"] for k in real] + [target]
    me = kids[-1]
    assert me["displayName"] == direct[target]["displayName"] and me["childFolderCount"] == len(kids)
    assert get(f"{proxy.graph_url}/users/{uid}/mailFolders/{target}").json()["childFolderCount"] == len(kids)
    # another folder's children are untouched
    other = next(k for k in real if k["childFolderCount"]) if any(k["childFolderCount"] for k in real) else None
    if other is not None:
        assert get(f"{proxy.graph_url}/users/{uid}/mailFolders/{other['id']}/childFolders").json()["value"] == \
            get(f"{sim.graph_url}/users/{uid}/mailFolders/{other['id']}/childFolders").json()["value"]
    # a chosen folder, named by its well-known name in the path
    inbox = sim.model.mailbox(upn).folder_id("inbox")
    proxy.set_mode("self_parent_folder", target_folder=inbox)
    kids = get(f"{proxy.graph_url}/users/{uid}/mailFolders/inbox/childFolders").json()["value"]
    assert kids[-1]["id"] == inbox and inbox not in [k["id"] for k in kids[:-1]]


def test_modes_are_checked_and_the_proxy_is_a_context_manager(sim_factory):
    sim = sim_factory(users=1, messages_per_mailbox=2)
    with HostileProxy(sim) as proxy:
        with pytest.raises(ValueError, match="unknown hostile mode"):
            proxy.set_mode("nasty")
        assert proxy.mode == "pass"
        assert get(f"{proxy.graph_url}/users").status_code == 200
        assert proxy.seen == ["GET /v1.0/users"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{proxy.graph_url}/users", timeout=5)
