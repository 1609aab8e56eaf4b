"""The Graph layer's client for the mailbox import/export API (mailpipe/graph/export.py), through the real
msgraph-sdk over real sockets against the simulator; and the tenants file's ``content`` mode."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from mailpipe.config import ConfigError, parse_tenants
from mailpipe.graph import ForbiddenError, GraphTenant, ResyncRequired, RetryPolicy
from mailpipe.graph.export import MailboxExport, missing_permissions, roles_from_token
from mailpipe.sim import FaultConfig
from mailpipe_tests.conftest import make_tenant

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


def users(sim):
    upns = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("shared")]
    return [(u, sim.model.user(u).id) for u in upns]


async def delta(ex, fid, link=None, page_size=4):
    ups, rem, last = {}, [], None
    async for p in ex.item_delta(fid, link, page_size=page_size):
        ups.update({i.id: i for i in p.upserts})
        rem += p.removed
        last = p
    return ups, rem, last.delta_link


def test_folders_deltas_and_batched_exports_equal_the_ground_truth(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=60, other_items=40, seed=5)
    (upn, uid), = users(sim)
    truth = sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]
    t = make_tenant(sim, str(tmp_path / "repo"))

    async def go():
        async with GraphTenant.from_config(t, policy=FAST) as g:
            ex = MailboxExport(g.mailbox(uid, upn))
            assert await ex.mailbox_id() == truth["mailbox_id"]
            folders = await ex.folders()
            items = {}
            links = {}
            for f in folders:
                ups, rem, links[f.id] = await delta(ex, f.id)
                assert not rem
                items.update({i: (f.id, v) for i, v in ups.items()})
            ids = sorted(items)
            streams = {}
            for k in range(0, len(ids), 20):
                for r in await ex.export_items(ids[k:k + 20]):
                    assert r.ok, r
                    streams[r.item_id] = r.data
            mbg = g.mailbox(uid, upn)
            return folders, items, streams, mbg.stats.by_kind, links

    folders, items, streams, kinds, links = asyncio.run(go())
    tf = {f["id"]: f for f in truth["folders"]}
    assert {f.id: (f.path, f.folder_class, f.parent_id) for f in folders} == {
        i: (tuple(f["path"]), f["type"], f["parent_id"]) for i, f in tf.items()}
    ti = {i["id"]: i for i in truth["items"]}
    assert set(items) == set(ti)
    for iid, (fid, info) in items.items():
        assert (fid, info.item_type, info.size, info.change_key) == (
            ti[iid]["folder_id"], ti[iid]["type"], ti[iid]["size"], ti[iid]["change_key"])
        assert hashlib.sha256(streams[iid]).hexdigest() == ti[iid]["sha256"]
    assert kinds["export"] == -(-len(ti) // 20)  # 20 items a request
    assert all(not link.startswith("http") and "$deltatoken=" in link for link in links.values())


def test_per_item_errors_are_results_and_whole_request_faults_are_retried(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20, other_items=10, seed=6)
    (upn, uid), = users(sim)
    ids = sorted(sim.model.mailbox(uid).xitems)[:5]
    sim.set_faults(FaultConfig(fail_exports={ids[0]: 500, ids[1]: 503, ids[2]: 404}, p_503=0.3, p_429=0.2,
                               retry_after_s=0.05))
    t = make_tenant(sim, str(tmp_path / "repo"))

    async def go():
        async with GraphTenant.from_config(t, policy=RetryPolicy(max_attempts=30, base_delay=0.01,
                                                                 max_delay=0.02)) as g:
            ex = MailboxExport(g.mailbox(uid, upn))
            out = []
            for _ in range(5):
                out.append(await ex.export_items([*ids, "AAkALxnosuchitem="]))
            return out, g.mailbox(uid, upn).stats

    outs, stats = asyncio.run(go())
    for res in outs:
        assert [r.item_id for r in res] == [*ids, "AAkALxnosuchitem="]
        assert res[0].permanent and not res[0].ok
        assert not res[1].permanent and not res[1].not_found and not res[1].ok  # transient: try again
        assert res[2].not_found and res[5].not_found
        assert res[3].ok and res[4].ok
    assert stats.retries > 0  # 429/503 of the whole request were retried under the limiter


def test_item_delta_resync_on_410_and_link_origin_rule(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=10, other_items=12, seed=7)
    (upn, uid), = users(sim)
    cal = sim.model.mailbox(uid).by_wk["calendar"]
    t = make_tenant(sim, str(tmp_path / "repo"))

    async def go():
        async with GraphTenant.from_config(t, policy=FAST) as g:
            ex = MailboxExport(g.mailbox(uid, upn))
            _, _, link = await delta(ex, cal)
            sim.expire_delta_tokens(upn)
            with pytest.raises(ResyncRequired):
                await delta(ex, cal, link)
            with pytest.raises(ResyncRequired):  # a saved link elsewhere is never followed: list again
                await delta(ex, cal, "https://evil.example.com/v1.0/admin/exchange/mailboxes/x/folders/y/items/delta")
            ups, _, _ = await delta(ex, cal, None)
            return ups

    ups = asyncio.run(go())
    assert set(ups) == {i for i, it in sim.model.mailbox(uid).xitems.items() if it.folder == cal}


def test_concurrent_exports_never_exceed_the_mailbox_limit(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40, other_items=40, seed=8)
    (upn, uid), = users(sim)
    sim.set_faults(FaultConfig(latency_ms=30))
    ids = sorted(sim.model.mailbox(uid).msgs)
    t = make_tenant(sim, str(tmp_path / "repo"))

    async def go():
        async with GraphTenant.from_config(t, policy=FAST) as g:
            ex = MailboxExport(g.mailbox(uid, upn))
            await ex.mailbox_id()
            await asyncio.gather(*(ex.export_items(ids[k:k + 5]) for k in range(0, len(ids), 5)))

    asyncio.run(go())
    st = sim.stats()
    assert st["max_concurrency"][upn] <= 4 and st.get("throttled", {}).get(upn, 0) == 0


def test_import_into_another_mailbox_sends_no_token_and_respects_the_upload_budget(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=10, other_items=8, seed=9)
    (a, aid), (b, bid) = users(sim)
    src = sorted(sim.model.mailbox(aid).xitems)[:3]
    t = make_tenant(sim, str(tmp_path / "repo"))
    dmb = sim.model.mailbox(bid)

    async def go():
        async with GraphTenant.from_config(t, policy=FAST) as g:
            exa, exb = MailboxExport(g.mailbox(aid, a)), MailboxExport(g.mailbox(bid, b))
            got = await exa.export_items(src)
            sess = await exb.create_import_session()
            made = []
            for r in got:
                cls = {"IPM.Appointment": "calendar", "IPM.Contact": "contacts", "IPM.Task": "tasks"}[
                    sim.model.mailbox(aid).xitems[r.item_id].type]
                made.append(await exb.import_item(sess, dmb.by_wk[cls], r.data))
            back = await exb.export_items([m[0] for m in made])
            await exb.aclose()
            return got, made, back

    got, made, back = asyncio.run(go())
    assert [x.data for x in back] == [x.data for x in got]
    assert [m[1] for m in made] == [x.change_key for x in back]
    st = sim.stats()
    assert st["imported_items"][b] == 3 and not st["upload_with_bearer"].get(b)
    assert st["uploaded_bytes"][b] >= sum(len(base64.b64encode(x.data)) for x in got)


def test_a_missing_permission_is_named(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=5, roles=["Mail.Read", "User.Read.All"])
    (upn, uid), = users(sim)
    t = make_tenant(sim, str(tmp_path / "repo"))

    async def go():
        async with GraphTenant.from_config(t, policy=FAST) as g:
            with pytest.raises(ForbiddenError) as e:
                await MailboxExport(g.mailbox(uid, upn)).folders()
            return e.value

    e = asyncio.run(go())
    assert "MailboxItem.Export.All" in str(e) and e.kind == "forbidden"


def _jwt(payload):
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'RS256'})}.{enc(payload)}.sig"


def test_permissions_from_the_token():
    assert roles_from_token("sim-token") is None
    assert roles_from_token(_jwt({"roles": ["Mail.Read", "MailboxItem.Export.All"]})) == {
        "Mail.Read", "MailboxItem.Export.All"}
    assert roles_from_token(_jwt({"sub": "x"})) is None
    assert missing_permissions("mime", {"Mail.Read"}) is None
    assert missing_permissions("fidelity", None) is None
    assert missing_permissions("fidelity", {"MailboxItem.ImportExport.All"}) is None
    m = missing_permissions("both", {"Mail.Read"})
    assert "MailboxItem.Export.All" in m and "Mail.Read" in m
    r = missing_permissions("fidelity", {"MailboxItem.Export.All"}, restore=True)
    assert "MailboxItem.ImportExport.All" in r


def _doc(**extra):
    return {"tenants": [{"name": "c", "tenant_id": "11111111-2222-3333-4444-555555555555",
                         "client_id": "66666666-7777-8888-9999-000000000000",
                         "auth": {"client_secret_env": "C_SECRET"}, "storage": "/tmp/x", **extra}]}


def test_content_mode_in_the_tenants_file():
    assert parse_tenants(_doc())[0].content == "mime"
    for mode in ("mime", "fidelity", "both"):
        assert parse_tenants(_doc(content=mode))[0].content == mode
    with pytest.raises(ConfigError) as e:
        parse_tenants(_doc(content="eml"))
    assert "'content'" in str(e.value) and "mime, fidelity, both" in str(e.value)
