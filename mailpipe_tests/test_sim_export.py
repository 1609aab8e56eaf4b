"""The simulator's mailbox import/export API, spoken to through msgraph-sdk's own builders over real sockets
(``client.admin.exchange.mailboxes``, ``users/{id}/settings/exchange``) and, for the import URL (which has no
builder: it is an opaque URL on another origin), plain httpx."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import Counter

import httpx
import pytest

from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, start_simulator


class _StaticCredential:
    async def get_token(self, *scopes, **kw):
        from azure.core.credentials import AccessToken

        return AccessToken("sim-token", 2_000_000_000)

    async def close(self):
        pass


def sdk(sim):
    from kiota_authentication_azure.azure_identity_authentication_provider import (
        AzureIdentityAuthenticationProvider,
    )
    from kiota_http.middleware.options import RetryHandlerOption
    from msgraph import GraphRequestAdapter, GraphServiceClient
    from msgraph_core import GraphClientFactory

    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(timeout=60, trust_env=False),
        options={RetryHandlerOption.get_key(): RetryHandlerOption(delay=0, max_retries=0, should_retry=False)})
    auth = AzureIdentityAuthenticationProvider(_StaticCredential(), scopes=["https://graph.microsoft.com/.default"],
                                               allowed_hosts=["127.0.0.1"])
    adapter = GraphRequestAdapter(auth, client=http)
    adapter.base_url = sim.graph_url
    return GraphServiceClient(request_adapter=adapter)


def _cfg(page: int | None = None):
    from kiota_abstractions.base_request_configuration import RequestConfiguration

    c = RequestConfiguration()
    if page:
        c.headers.add("Prefer", f"odata.maxpagesize={page}")
    return c


async def mailbox_id(client, uid):
    s = await client.users.by_user_id(uid).settings.exchange.get()
    return s.primary_mailbox_id


async def all_folders(client, mbx, link=None):
    """The export API's folder delta to its deltaLink: (folders by id, removed ids, deltaLink)."""
    b = client.admin.exchange.mailboxes.by_mailbox_id(mbx).folders.delta
    r = await (b.with_url(link).get() if link else b.get())
    out, removed = {}, []
    while True:
        for f in r.value:
            if (f.additional_data or {}).get("@removed"):
                removed.append(f.id)
            else:
                out[f.id] = f
        if r.odata_next_link:
            r = await b.with_url(r.odata_next_link).get()
            continue
        return out, removed, r.odata_delta_link


async def item_delta(client, mbx, fid, link=None, page=7):
    """One folder's item delta to its deltaLink: (items by id, removed ids, deltaLink, pages)."""
    b = client.admin.exchange.mailboxes.by_mailbox_id(mbx).folders.by_mailbox_folder_id(fid).items.delta
    ups, rem, pages = {}, [], 0
    r = await (b.with_url(link).get(_cfg(page)) if link else b.get(_cfg(page)))
    while True:
        pages += 1
        for it in r.value:
            if (it.additional_data or {}).get("@removed"):
                rem.append(it.id)
            else:
                ups[it.id] = it
        if r.odata_next_link:
            r = await b.with_url(r.odata_next_link).get(_cfg(page))
            continue
        return ups, rem, r.odata_delta_link, pages


async def export(client, mbx, ids):
    from msgraph.generated.admin.exchange.mailboxes.item.export_items.export_items_post_request_body import (
        ExportItemsPostRequestBody,
    )

    r = await client.admin.exchange.mailboxes.by_mailbox_id(mbx).export_items.post(
        ExportItemsPostRequestBody(item_ids=list(ids)))
    return r.value


def first_user(sim):
    upn = next(u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("shared"))
    return upn, sim.model.user(upn).id


@pytest.fixture
def sim():
    s = start_simulator(SimConfig(users=2, messages_per_mailbox=40, other_items=30, seed=3))
    yield s
    s.stop()


def test_mailbox_discovery_folders_and_items_of_every_type_equal_the_ground_truth(sim):
    upn, uid = first_user(sim)
    truth = sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        assert mbx == truth["mailbox_id"] and mbx.startswith("MBX:")
        folders, removed, _ = await all_folders(client, mbx)
        assert not removed
        assert {f.id: (f.parent_folder_id, f.type, f.display_name) for f in folders.values()} == {
            f["id"]: (f["parent_id"], f["type"], f["path"][-1]) for f in truth["folders"]}
        items = {}
        for fid in folders:
            ups, rem, link, _ = await item_delta(client, mbx, fid)
            assert not rem and "$deltatoken=" in link
            for i in ups.values():
                items[i.id] = (fid, i.type, i.size, i.change_key)
        return items

    items = asyncio.run(go())
    assert items == {i["id"]: (i["folder_id"], i["type"], i["size"], i["change_key"]) for i in truth["items"]}
    kinds = Counter(t for _, t, _, _ in items.values())
    assert set(kinds) == {"IPM.Note", "IPM.Appointment", "IPM.Contact", "IPM.Task"}
    # the mail API never shows the calendar, contact and task folders
    mail = sim.truth(upn, hashes=False)["mailboxes"][upn]
    assert not {f["id"] for f in mail["folders"]} & {i for i, v in items.items() if v[1] != "IPM.Note"}
    assert len(mail["items"]) == kinds["IPM.Note"]
    st = sim.stats()["requests"][upn]
    assert st["settings"] == 1 and st["mailbox_folder_delta"] == 1 and st["mailbox_item_delta"] >= len(truth["folders"])


def test_item_delta_is_incremental_over_mutations_and_410_after_expiry(sim):
    upn, uid = first_user(sim)

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        cal = sim.model.mailbox(uid).by_wk["calendar"]
        ups, _, link, pages = await item_delta(client, mbx, cal, page=3)
        assert pages > 1
        before = set(ups)
        victim, edited = sorted(before)[:2]
        new = sim.mutate(upn, [{"op": "new_item", "folder": "calendar", "count": 2},
                               {"op": "delete_item", "ids": [victim]},
                               {"op": "edit_item", "ids": [edited]}])["applied"][0]
        ups2, rem2, link2, _ = await item_delta(client, mbx, cal, link)
        assert set(ups2) == {*new, edited} and rem2 == [victim]
        assert ups2[edited].change_key != ups[edited].change_key
        ups3, rem3, _, _ = await item_delta(client, mbx, cal, link2)
        assert not ups3 and not rem3
        sim.expire_delta_tokens(upn)
        from kiota_abstractions.api_error import APIError

        with pytest.raises(APIError) as e:
            await item_delta(client, mbx, cal, link2)
        assert e.value.response_status_code == 410

    asyncio.run(go())


def test_export_items_returns_the_stream_of_each_item_and_per_item_errors_inside_a_200(sim):
    upn, uid = first_user(sim)
    truth = {i["id"]: i for i in sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]["items"]}
    ids = sorted(truth)

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        got = await export(client, mbx, ids[:20])
        assert [g.item_id for g in got] == ids[:20]
        for g in got:
            assert g.error is None and g.change_key == truth[g.item_id]["change_key"]
            assert hashlib.sha256(g.data).hexdigest() == truth[g.item_id]["sha256"]
            assert len(g.data) == truth[g.item_id]["size"]
        from kiota_abstractions.api_error import APIError

        with pytest.raises(APIError) as e:  # the documented limit: 20 ids per request
            await export(client, mbx, ids[:21])
        assert e.value.response_status_code == 400
        sim.set_faults(FaultConfig(fail_exports={ids[1]: 500, ids[2]: 503}))
        got = await export(client, mbx, [ids[0], ids[1], ids[2], "AAkALgnosuchitem="])
        assert got[0].error is None and got[0].data
        assert [(g.error.code if g.error else None) for g in got] == [
            None, "ErrorCorruptData", "ErrorInternalServerTransientError", "ErrorItemNotFound"]
        assert all(g.data is None for g in got[1:])
        sim.set_faults(FaultConfig(p_503=1.0))
        with pytest.raises(APIError) as e:  # whole-request faults, as on every mailbox route
            await export(client, mbx, ids[:2])
        assert e.value.response_status_code == 503

    asyncio.run(go())
    st = sim.stats()
    assert st["export_downloads"][upn][ids[0]] == 2 and st["requests"][upn]["export"] == 4


def test_export_is_admitted_under_the_mailbox_concurrency_limit(sim):
    upn, uid = first_user(sim)
    sim.set_limits(LimitConfig(concurrent_per_mailbox=1))
    sim.set_faults(FaultConfig(latency_ms=200))
    ids = sorted(sim.model.mailbox(uid).xitems)[:2]

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        return await asyncio.gather(export(client, mbx, ids[:1]), export(client, mbx, ids[1:]),
                                    return_exceptions=True)

    res = asyncio.run(go())
    assert sum(isinstance(r, Exception) and getattr(r, "response_status_code", 0) == 429 for r in res) == 1
    assert sim.stats()["throttled"][upn] == 1


def test_import_into_another_mailbox_recreates_each_item_as_the_original(sim):
    upns = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("shared")]
    src, dst = upns[0], upns[1]
    suid, duid = sim.model.user(src).id, sim.model.user(dst).id
    st = {i["id"]: i for i in sim.truth(src, fidelity=True)["mailboxes"][src]["fidelity"]["items"]}
    picks = {}
    for i in st.values():
        picks.setdefault(i["type"], i)
    dmb = sim.model.mailbox(duid)
    target = {"IPM.Note": dmb.by_wk["inbox"], "IPM.Appointment": dmb.by_wk["calendar"],
              "IPM.Contact": dmb.by_wk["contacts"], "IPM.Task": dmb.by_wk["tasks"]}

    async def go():
        client = sdk(sim)
        smbx, dmbx = await mailbox_id(client, suid), await mailbox_id(client, duid)
        got = await export(client, smbx, [i["id"] for i in picks.values()])
        sess = await client.admin.exchange.mailboxes.by_mailbox_id(dmbx).create_import_session.post()
        assert sess.import_url.startswith(sim.upload_base_url) and "authtoken=" in sess.import_url
        assert sess.expiration_date_time is not None
        created = {}
        async with httpx.AsyncClient(timeout=60, trust_env=False) as h:
            one = got[0]
            body = {"FolderId": target[st[one.item_id]["type"]], "Mode": "create",
                    "Data": base64.b64encode(one.data).decode()}
            r = await h.post(sess.import_url, json=body, headers={"Authorization": "Bearer sim-token"})
            assert r.status_code == 401  # our Graph token never goes to the import URL
            r = await h.post(sess.import_url.replace("authtoken=", "authtoken=x"), json=body)
            assert r.status_code == 401
            r = await h.post(sess.import_url, json={**body, "ItemId": "x", "ChangeKey": "y"})
            assert r.status_code == 400  # create mode takes no ItemId
            r = await h.post(sess.import_url, json={**body, "Data": base64.b64encode(b"not a stream").decode()})
            assert r.status_code == 400
            for g in got:
                r = await h.post(sess.import_url, json={"FolderId": target[st[g.item_id]["type"]], "Mode": "create",
                                                        "Data": base64.b64encode(g.data).decode()})
                assert r.status_code == 200, r.text
                created[g.item_id] = r.json()
        back = await export(client, dmbx, [c["itemId"] for c in created.values()])
        return got, created, back

    got, created, back = asyncio.run(go())
    dt = {i["id"]: i for i in sim.truth(dst, fidelity=True)["mailboxes"][dst]["fidelity"]["items"]}
    assert set(picks) == {"IPM.Note", "IPM.Appointment", "IPM.Contact", "IPM.Task"}
    for g, b in zip(got, back):
        new = created[g.item_id]["itemId"]
        assert new not in st and dt[new]["type"] == st[g.item_id]["type"]
        assert dt[new]["folder_id"] == target[dt[new]["type"]]
        assert b.data == g.data  # the same item: type, properties and bytes
        assert created[g.item_id]["changeKey"] == dt[new]["change_key"]
    # an imported message is a received message in the mail API too, with the original MIME
    note = created[picks["IPM.Note"]["id"]]["itemId"]
    mail = {i["id"]: i for i in sim.truth(dst)["mailboxes"][dst]["items"]}
    orig = {i["id"]: i for i in sim.truth(src)["mailboxes"][src]["items"]}[picks["IPM.Note"]["id"]]
    assert mail[note]["sha256"] == orig["sha256"] and mail[note]["is_draft"] == orig["is_draft"]
    s = sim.stats()
    assert s["imported_items"][dst] == 4 and s["upload_with_bearer"][dst] == 1 and s["uploaded_bytes"][dst] > 0


def test_import_update_mode_needs_the_current_change_key(sim):
    upn, uid = first_user(sim)
    mb = sim.model.mailbox(uid)
    iid = sorted(i for i, it in mb.xitems.items() if it.type == "IPM.Task")[0]

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        g = (await export(client, mbx, [iid]))[0]
        sess = await client.admin.exchange.mailboxes.by_mailbox_id(mbx).create_import_session.post()
        sim.mutate(upn, [{"op": "edit_item", "ids": [iid]}])  # the item changed since: its key is stale
        body = {"FolderId": mb.xitems[iid].folder, "Mode": "update", "Data": base64.b64encode(g.data).decode(),
                "ItemId": iid, "ChangeKey": g.change_key}
        async with httpx.AsyncClient(timeout=60, trust_env=False) as h:
            r = await h.post(sess.import_url, json=body)
            assert r.status_code == 400
            now = (await export(client, mbx, [iid]))[0]
            assert now.data != g.data
            r = await h.post(sess.import_url, json={**body, "ChangeKey": now.change_key})
            assert r.status_code == 200 and r.json()["itemId"] == iid
        return g, (await export(client, mbx, [iid]))[0]

    before, after = asyncio.run(go())
    from mailpipe.sim import fidelity

    assert fidelity.decode(after.data)[1] == fidelity.decode(before.data)[1]  # the old content is back


def test_missing_permissions_are_refused_naming_the_permission(sim_factory):
    sim = sim_factory(users=1, messages_per_mailbox=10, roles=["Mail.Read", "MailboxItem.Export.All"])
    upn, uid = first_user(sim)

    async def go():
        from kiota_abstractions.api_error import APIError

        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        await all_folders(client, mbx)  # exporting is allowed
        with pytest.raises(APIError) as e:
            await client.admin.exchange.mailboxes.by_mailbox_id(mbx).create_import_session.post()
        return e.value

    e = asyncio.run(go())
    assert e.response_status_code == 403 and "MailboxItem.ImportExport.All" in e.error.message


def test_imports_survive_a_restart_with_state_dir(tmp_path):
    cfg = dict(users=2, messages_per_mailbox=10, other_items=8, state_dir=str(tmp_path))
    with start_simulator(SimConfig(**cfg)) as s1:
        upns = [u for u in s1.truth(hashes=False)["mailboxes"] if not u.startswith("shared")]
        a, b = s1.model.user(upns[0]).id, s1.model.user(upns[1]).id
        iid = sorted(s1.model.mailbox(a).xitems)[0]

        async def go():
            client = sdk(s1)
            g = (await export(client, await mailbox_id(client, a), [iid]))[0]
            sess = await client.admin.exchange.mailboxes.by_mailbox_id(await mailbox_id(client, b)) \
                .create_import_session.post()
            folder = s1.model.mailbox(b).by_wk[{"IPM.Appointment": "calendar", "IPM.Contact": "contacts",
                                                "IPM.Task": "tasks"}[s1.model.mailbox(a).xitems[iid].type]]
            async with httpx.AsyncClient(timeout=60, trust_env=False) as h:
                r = await h.post(sess.import_url, json={"FolderId": folder, "Mode": "create",
                                                        "Data": base64.b64encode(g.data).decode()})
            return r.json()["itemId"]

        new = asyncio.run(go())
        t1 = s1.truth(upns[1], fidelity=True)["mailboxes"][upns[1]]["fidelity"]
    with start_simulator(SimConfig(**cfg)) as s2:
        t2 = s2.truth(upns[1], fidelity=True)["mailboxes"][upns[1]]["fidelity"]
    assert new in {i["id"] for i in t2["items"]} and t1 == t2



def _item_url(sim, mbx, fid, iid):
    from urllib.parse import quote

    return f"{sim.graph_url}/admin/exchange/mailboxes/{quote(mbx, safe=':@')}/folders/{fid}/items/{iid}"


def test_delete_item_needs_a_disposal_type_and_its_permission(sim_factory):
    """``DELETE folders/{id}/items/{id}?disposalType=softDelete|hardDelete`` (msgraph-sdk's builder, the required
    query parameter on its URL): 204, the item leaves its folder's delta as removed; without disposalType or with
    another value, 400; an app without ``MailboxItem.ReadWrite.All``, 403 naming it."""
    from kiota_abstractions.api_error import APIError

    sim = sim_factory(users=1, messages_per_mailbox=10, other_items=8, seed=5)
    upn, uid = first_user(sim)
    mb = sim.model.mailbox(uid)
    xid, mid = sorted(mb.xitems)[0], sorted(mb.msgs)[0]
    xf, mf = mb.xitems[xid].folder, mb.msgs[mid].folder

    async def go():
        client = sdk(sim)
        mbx = await mailbox_id(client, uid)
        folders = client.admin.exchange.mailboxes.by_mailbox_id(mbx).folders
        _, _, link, _ = await item_delta(client, mbx, xf)
        for iid, fid in ((xid, xf), (mid, mf)):
            b = folders.by_mailbox_folder_id(fid).items.by_mailbox_item_id(iid)
            for q in ("", "?disposalType=moveToDeletedItems"):
                with pytest.raises(APIError) as e:
                    await b.with_url(_item_url(sim, mbx, fid, iid) + q).delete()
                assert e.value.response_status_code == 400
            await b.with_url(_item_url(sim, mbx, fid, iid) + "?disposalType=softDelete").delete()
        _, removed, _, _ = await item_delta(client, mbx, xf, link)
        return removed

    assert xid in asyncio.run(go())
    assert xid not in mb.xitems and mid not in mb.msgs
    items = sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]["items"]
    assert not any(i["id"] in (xid, mid) for i in items)
    assert sim.stats()["deleted_items"][upn] == 2

    ro = sim_factory(users=1, messages_per_mailbox=4, other_items=4, seed=5,
                     roles=["Mail.Read", "MailboxItem.ImportExport.All"])
    upn, uid = first_user(ro)
    mb = ro.model.mailbox(uid)
    xid = sorted(mb.xitems)[0]

    async def refused():
        client = sdk(ro)
        mbx = await mailbox_id(client, uid)
        b = client.admin.exchange.mailboxes.by_mailbox_id(mbx).folders.by_mailbox_folder_id(
            mb.xitems[xid].folder).items.by_mailbox_item_id(xid)
        with pytest.raises(APIError) as e:
            await b.with_url(_item_url(ro, mbx, mb.xitems[xid].folder, xid) + "?disposalType=softDelete").delete()
        return e.value

    e = asyncio.run(refused())
    assert e.response_status_code == 403 and "MailboxItem.ReadWrite.All" in e.error.message
    assert xid in mb.xitems
