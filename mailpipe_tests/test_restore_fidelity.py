"""Fidelity restores: a ``content: fidelity`` snapshot put back through import sessions (simulator over real
sockets, msgraph-sdk, the restore engine), compared item for item with the source (type, folder, properties,
bytes: the simulator's stream carries every property, and an item and its import export the same bytes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

from mailpipe.repo import open_repository
from mailpipe.restore import RestoreRequest, restore_mailbox
from mailpipe.sim import FaultConfig, write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import FAST, TEST_SETTINGS, backup, mailbox_upns


def restore(t, **kw):
    return asyncio.run(restore_mailbox(t, RestoreRequest(**kw), settings=TEST_SETTINGS, graph_options=FAST))


def fid_truth(sim, upn):
    return sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]


def snapshot_rows(repo, uid):
    return [r for b in repo.iter_fidelity(uid, "latest") for r in b.to_pylist()]


def test_restore_into_another_mailbox_equals_the_source_item_for_item(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=40, other_items=30, seed=41,
                      faults=FaultConfig(p_503=0.02, p_429=0.02, retry_after_s=0.1))
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    assert ra.ok
    repo = open_repository(t)
    src = snapshot_rows(repo, ra.user_id)
    before = {i["id"] for i in fid_truth(sim, b)["items"]}
    res = restore(t, upn=a, to=b, into="Restored here")
    assert res.ok, res.error
    assert res.restored == len(src) == res.items_selected and res.failed_count == 0
    after = fid_truth(sim, b)
    new = [i for i in after["items"] if i["id"] not in before]
    # every item came back once, in the same folder (under the restore folder), as the same item
    assert Counter((i["type"], tuple(i["folder_path"]), i["sha256"]) for i in new) == Counter(
        (r["item_type"], ("Restored here", *r["folder_path"]), r["sha256"]) for r in src)
    # with the source folder's class: events in calendar folders, contacts in contact folders...
    cls = {f["id"]: f["type"] for f in after["folders"]}
    assert all(cls[i["folder_id"]] == r_cls for i, r_cls in
               ((i, {"IPM.Note": "IPF.Note", "IPM.Appointment": "IPF.Appointment", "IPM.Contact": "IPF.Contact",
                     "IPM.Task": "IPF.Task"}[i["type"]]) for i in new))
    # messages are received messages again in the mail API, with their original MIME
    mail_a = {i["sha256"] for i in sim.truth(a)["mailboxes"][a]["items"]}
    mail_new = [i for i in sim.truth(b)["mailboxes"][b]["items"] if i["folder_path"][:1] == ["Restored here"]]
    assert {i["sha256"] for i in mail_new} == mail_a and len(mail_new) == len(mail_a)
    st = sim.stats()
    assert not st["upload_with_bearer"].get(b) and st["import_sessions"][b] >= 1
    # the same restore again creates nothing (its progress), and a new one with skip finds everything present
    again = restore(t, upn=a, to=b, into="Restored here")
    assert again.ok and again.restored == 0 and again.resumed == len(src)
    assert len(fid_truth(sim, b)["items"]) == len(after["items"])


def test_in_place_restore_after_losses_brings_back_only_what_is_missing(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=30, other_items=24, seed=42)
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    truth = fid_truth(sim, a)
    mb = sim.model.mailbox(a)
    lost_x = sorted(mb.xitems)[:5]
    lost_m = sorted(mb.msgs)[:3]
    sim.mutate(a, [{"op": "delete_item", "ids": lost_x}, {"op": "delete", "ids": lost_m}])
    res = restore(t, upn=a, in_place=True)
    assert res.ok, res.error
    assert res.restored == len(lost_x) + len(lost_m)
    assert res.skipped_present == len(truth["items"]) - res.restored
    now = fid_truth(sim, a)
    assert Counter((i["type"], tuple(i["folder_path"]), i["sha256"]) for i in now["items"]) == Counter(
        (i["type"], tuple(i["folder_path"]), i["sha256"]) for i in truth["items"])


def test_mailpipe_restore_command_restores_a_fidelity_snapshot(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=10, other_items=8, seed=43)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    tf = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo", content="fidelity")
    t = make_tenant(sim, str(tmp_path / "repo"), name="t1", content="fidelity")
    ra, = backup(t, [a])
    env = {**os.environ, "MAILPIPE_TENANTS": tf, "MAILPIPE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "mailpipe", "restore", "t1", a, "--to", b, "--into", "CLI"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    new = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["CLI"]]
    assert len(new) == ra.items_total and f"{ra.items_total} restored" in out.stdout + out.stderr


def test_a_fidelity_restore_needs_the_import_permission(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=5, other_items=4, seed=44,
                      roles=["Mail.Read", "MailboxItem.Export.All", "MailboxFolder.ReadWrite.All"])
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    assert backup(t, [a])[0].ok
    res = restore(t, upn=a, into="X")
    assert not res.ok and res.error_kind == "forbidden" and "MailboxItem.ImportExport.All" in res.error


def test_mailbox_restore_job_restores_a_fidelity_snapshot(tmp_path, monkeypatch, sim_factory):
    """``mailbox_restore_job`` from ``dagster job execute`` on a ``content: fidelity`` tenant: the run config of
    MIME restores, import sessions underneath."""
    import json
    import shutil

    import dagster as dg
    import yaml

    from mailpipe_tests.test_defs import BIN, ROOT

    sim = sim_factory(users=2, messages_per_mailbox=12, other_items=10, seed=45)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    tfile = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo", content="fidelity")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "MAILPIPE_TENANTS": str(tfile), "DAGSTER_HOME": str(home),
           "MAILPIPE_HOME": str(tmp_path / "mp")}
    t = make_tenant(sim, str(tmp_path / "repo"), name="t1", content="fidelity")
    ra, = backup(t, [a])
    cfg = tmp_path / "restore.yaml"
    cfg.write_text(yaml.safe_dump({"ops": {"restore_mailbox": {"config": {
        "tenant": "t1", "mailbox": a, "to": b, "into": "From Dagster"}}}}))
    out = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "mailpipe.definitions", "-j",
                          "mailbox_restore_job", "-c", str(cfg), "--tags", json.dumps({"restore": "t1"})],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    new = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["From Dagster"]]
    assert len(new) == ra.items_total
    assert Counter(i["type"] for i in new) == Counter(ra.items_by_type)
    inst = dg.DagsterInstance.from_config(str(home))
    [run] = inst.get_run_records(dg.RunsFilter(job_name="mailbox_restore_job"))
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    inst.dispose()


def test_an_expired_import_session_is_replaced(sim_factory, tmp_path):
    """Import URLs carry their own short-lived token. A restore replaces its session before it expires, and
    when its URL answers 401 (here: every session of the mailbox expired mid-restore) it gets a new one and
    goes on — nothing fails, nothing is imported twice."""
    import threading
    import time

    sim = sim_factory(users=2, messages_per_mailbox=30, other_items=12, seed=46, faults=FaultConfig(latency_ms=100))
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])

    def expire_midway() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sim.stats()["imported_items"].get(b, 0) >= 5:
                sim.expire_import_sessions(b)
                return
            time.sleep(0.005)

    th = threading.Thread(target=expire_midway, daemon=True)
    th.start()
    res = restore(t, upn=a, to=b, into="Late")
    th.join(5)
    assert res.ok and res.failed_count == 0 and res.restored == ra.items_total, (res.error, res.failed[:3])
    st = sim.stats()
    assert st["import_expired"][b] >= 1 and st["import_sessions"][b] >= 2
    new = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Late"]]
    assert len(new) == ra.items_total


# collision policies: skip, replace, copy — each idempotent ----------------------------------------------------
def _key(i):
    return (i["type"], tuple(i["folder_path"]), i["sha256"])


def test_replace_in_place_brings_changed_items_back_as_backed_up_keeping_their_ids(sim_factory, tmp_path):
    """In place, an item changed since the backup is the same item (its id): ``skip`` leaves the user's version,
    ``replace`` imports the backed-up stream over it (update mode: same id, nothing deleted). Items restored by
    the skip run (new ids, recorded in its progress) are recognised too when changed again afterwards."""
    sim = sim_factory(users=1, messages_per_mailbox=30, other_items=24, seed=47)
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    truth = fid_truth(sim, a)
    mb = sim.model.mailbox(a)
    xs, ms = sorted(mb.xitems), sorted(mb.msgs)
    edited_x, cat_m = xs[:4], ms[:3]
    gone_x, gone_m = xs[4:6], ms[3:5]
    sim.mutate(a, [{"op": "edit_item", "ids": edited_x}, {"op": "categorize", "ids": cat_m},
                   {"op": "delete_item", "ids": gone_x}, {"op": "delete", "ids": gone_m}])
    changed = {i["id"]: i["sha256"] for i in fid_truth(sim, a)["items"] if i["id"] in {*edited_x, *cat_m}}
    before_sha = {i["id"]: i["sha256"] for i in truth["items"]}
    assert all(changed[i] != before_sha[i] for i in changed)  # the edits changed the streams

    skip = restore(t, upn=a, in_place=True)
    assert skip.ok and skip.restored == 4 and skip.replaced == 0
    now = {i["id"]: i["sha256"] for i in fid_truth(sim, a)["items"]}
    assert all(now[i] == changed[i] for i in changed)  # skip kept the user's versions
    # an item the skip run brought back, changed again by the user
    back = sorted(set(now) - set(before_sha))
    assert len(back) == 4
    sim.mutate(a, [{"op": "edit_item", "ids": [b for b in back if b in sim.model.mailbox(a).xitems][:1]},
                   {"op": "categorize", "ids": [b for b in back if b in sim.model.mailbox(a).msgs][:1]}])

    rep = restore(t, upn=a, in_place=True, collisions="replace")
    assert rep.ok and rep.failed_count == 0, rep.failed[:3]
    assert rep.replaced == rep.restored == len(changed) + 2
    assert rep.skipped_present == len(truth["items"]) - rep.replaced
    after = fid_truth(sim, a)
    assert Counter(_key(i) for i in after["items"]) == Counter(_key(i) for i in truth["items"])
    ids_after = {i["id"] for i in after["items"]}
    assert set(changed) <= ids_after and set(back) <= ids_after  # updated where they were, not recreated
    assert not sim.stats()["requests"].get(a, {}).get("mailbox_item_delete")
    again = restore(t, upn=a, in_place=True, collisions="replace")
    assert again.ok and again.restored == 0 and again.resumed == len(truth["items"])


def test_replace_after_copies_keeps_one_of_each_item_as_backed_up(sim_factory, tmp_path):
    """Two copies of every item (a skip restore, then a copy restore) into another mailbox, some changed there:
    ``replace`` leaves exactly one of each, as backed up — an unchanged copy kept, or a changed one updated —
    and soft-deletes the other copies those restores made."""
    sim = sim_factory(users=2, messages_per_mailbox=16, other_items=14, seed=48)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    src = snapshot_rows(open_repository(t), ra.user_id)
    want = Counter((r["item_type"], ("Here", *r["folder_path"]), r["sha256"]) for r in src)
    first = restore(t, upn=a, to=b, into="Here")
    assert first.ok and first.restored == len(src)
    ids_first = {i["id"] for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]}
    second = restore(t, upn=a, to=b, into="Here", collisions="copy")
    assert second.ok and second.restored == len(src)
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]
    assert Counter(_key(i) for i in here) == Counter({k: 2 * n for k, n in want.items()})
    # change both copies of some items, one copy of others
    mbb = sim.model.mailbox(b)
    by_sha: dict[str, list[str]] = {}
    for i in here:
        by_sha.setdefault(i["sha256"], []).append(i["id"])
    pairs = sorted(v for v in by_sha.values() if len(v) == 2)
    x_pairs = [p for p in pairs if p[0] in mbb.xitems][:4]
    m_pairs = [p for p in pairs if p[0] in mbb.msgs][:4]
    both = x_pairs[:2] + m_pairs[:2]
    one = x_pairs[2:] + m_pairs[2:]
    edit = [i for p in both for i in p] + [p[0] for p in one]
    sim.mutate(b, [{"op": "edit_item", "ids": [i for i in edit if i in mbb.xitems]},
                   {"op": "categorize", "ids": [i for i in edit if i in mbb.msgs]}])

    rep = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert rep.ok and rep.failed_count == 0, rep.failed[:3]
    assert rep.replaced == rep.restored == len(both)
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]
    assert Counter(_key(i) for i in here) == want  # one of each, as backed up
    assert {i["id"] for i in here} <= ids_first | {i for p in pairs for i in p}  # kept or updated, none new
    assert sim.stats()["imported_items"][b] == 2 * len(src) + len(both)
    again = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert again.ok and again.restored == 0 and again.resumed == len(src)


def test_a_copy_restore_killed_before_recording_progress_imports_nothing_twice(sim_factory, tmp_path):
    """``copy`` into a folder that already holds a copy of every item; the restore is killed before it records
    any progress. Started again, it recognises what it imported (new since its first run, the same stream) and
    imports only the rest: two copies of each in the end, not three — and the copies that were there before are
    not taken for its own."""
    import json
    import signal
    import time

    sim = sim_factory(users=2, messages_per_mailbox=40, other_items=30, seed=49, faults=FaultConfig(latency_ms=15))
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    tf = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo", content="fidelity")
    t = make_tenant(sim, str(tmp_path / "repo"), name="t1", content="fidelity")
    ra, = backup(t, [a])
    total = ra.items_total
    assert restore(t, upn=a, to=b, into="Here").restored == total
    base = sim.stats()["imported_items"][b]
    env = {**os.environ, "MAILPIPE_TENANTS": tf, "MAILPIPE_HOME": str(tmp_path / "home"),
           "MAILPIPE_CHECKPOINT_SECONDS": "3600", "MAILPIPE_CHECKPOINT_ITEMS": "100000"}
    cmd = [sys.executable, "-m", "mailpipe", "restore", "t1", a, "--to", b, "--into", "Here", "--collisions",
           "copy", "--json"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while sim.stats()["imported_items"].get(b, 0) < base + total // 2:
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    imported_before = sim.stats()["imported_items"][b] - base
    assert 0 < imported_before < total
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout.splitlines()[-1])
    assert res["resumed"] == 0  # nothing was recorded before the kill
    imported = sim.stats()["imported_items"][b] - base
    assert imported == total  # not one item imported twice
    assert res["completed"] == imported_before and res["restored"] == total - imported_before
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]
    src = snapshot_rows(open_repository(t), ra.user_id)
    assert Counter(_key(i) for i in here) == Counter(
        {(r["item_type"], ("Here", *r["folder_path"]), r["sha256"]): 2 for r in src})


def test_an_import_whose_answer_is_lost_is_not_confused_with_a_copy_already_there(sim_factory, tmp_path):
    """Under ``copy`` the target already holds the same stream; imports are applied but their answers lost
    (the connection dropped after the item was made). The restore must find *its* new item, not take the old
    copy for it — and must not import it a second time either."""
    sim = sim_factory(users=2, messages_per_mailbox=20, other_items=12, seed=50)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    total = ra.items_total
    assert restore(t, upn=a, to=b, into="Here").restored == total
    there = {i["id"] for i in fid_truth(sim, b)["items"]}
    base = sim.stats()["imported_items"][b]
    sim.server.faults.p_lost_import = 0.3
    res = restore(t, upn=a, to=b, into="Here", collisions="copy")
    sim.server.faults.p_lost_import = 0.0
    assert res.ok and res.failed_count == 0 and res.restored == total, (res.error, res.failed[:3])
    assert sim.stats()["faults_injected"][b]["lost_import"] > 0
    assert sim.stats()["imported_items"][b] - base == total  # found, not imported again
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]
    assert len(here) == 2 * total and len({i["sha256"] for i in here}) == len(here) // 2
    # and what it recorded as made is what it made: a later replace or resume relies on these ids
    made = [r["created"] for r in open_repository(t).iter_restore_progress(sim.model.user(b).id, res.restore_id)]
    assert len(set(made)) == total and not set(made) & there


def test_replace_without_the_delete_permission_fails_those_items_by_name_and_a_later_run_finishes(sim_factory,
                                                                                                  tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=8, other_items=6, seed=51,
                      roles=["Mail.Read", "MailboxItem.ImportExport.All", "MailboxFolder.ReadWrite.All"])
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    assert restore(t, upn=a, to=b, into="Here").restored == ra.items_total
    assert restore(t, upn=a, to=b, into="Here", collisions="copy").restored == ra.items_total
    rep = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert rep.failed_count == ra.items_total  # each had a copy to delete
    assert all("MailboxItem.ReadWrite.All" in f["reason"] for f in rep.failed)
    assert len([i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]) == 2 * ra.items_total
    sim.model.cfg.roles = None  # the permission granted
    fixed = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert fixed.ok and fixed.failed_count == 0 and fixed.skipped_present == ra.items_total
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"]]
    assert len(here) == ra.items_total and sim.stats()["deleted_items"][b] == ra.items_total


def test_an_update_whose_change_key_went_stale_is_sent_again_with_the_new_one(sim_factory, tmp_path, monkeypatch):
    """Between the folder's listing and the update, the user changes the item again: Exchange refuses the stale
    change key (400 ErrorIrresolvableConflict); the restore lists the folder again and updates with the new key."""
    from mailpipe.graph.export import MailboxExport

    sim = sim_factory(users=1, messages_per_mailbox=6, other_items=6, seed=52)
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    truth = fid_truth(sim, a)
    x = sorted(sim.model.mailbox(a).xitems)[0]
    sim.mutate(a, [{"op": "edit_item", "ids": [x]}])
    real = MailboxExport.import_item
    raced = []

    async def racing(self, session, folder_id, data, **kw):
        if kw.get("mode") == "update" and not raced:
            raced.append(kw["item_id"])
            sim.mutate(a, [{"op": "edit_item", "ids": [kw["item_id"]], "category": "Red category"}])
        return await real(self, session, folder_id, data, **kw)

    monkeypatch.setattr(MailboxExport, "import_item", racing)
    rep = restore(t, upn=a, in_place=True, collisions="replace")
    assert raced == [x] and rep.ok and rep.failed_count == 0 and rep.replaced == 1, rep.failed
    assert sim.stats()["requests"][a]["import"] == 2 and sim.stats()["imported_items"][a] == 1  # refused, then sent
    assert Counter(_key(i) for i in fid_truth(sim, a)["items"]) == Counter(_key(i) for i in truth["items"])


def test_replace_in_place_never_deletes_the_users_own_items(sim_factory, tmp_path):
    """In place after a ``copy`` restore (an exact copy of every item beside it) and edits of some originals:
    ``replace`` keeps every original — updated where it changed, as it is where it did not — and deletes only
    the copies the restore made. (A review found the originals deleted whenever a copy was picked to keep.)"""
    sim = sim_factory(users=1, messages_per_mailbox=12, other_items=10, seed=53)
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    truth = fid_truth(sim, a)
    originals = {i["id"] for i in truth["items"]}
    assert restore(t, upn=a, in_place=True, collisions="copy").restored == len(originals)
    mb = sim.model.mailbox(a)
    edited = sorted(i for i in originals if i in mb.xitems)[:3] + sorted(i for i in originals if i in mb.msgs)[:2]
    sim.mutate(a, [{"op": "edit_item", "ids": edited[:3]}, {"op": "categorize", "ids": edited[3:]}])
    rep = restore(t, upn=a, in_place=True, collisions="replace")
    assert rep.ok and rep.failed_count == 0, rep.failed[:3]
    after = fid_truth(sim, a)
    assert originals <= {i["id"] for i in after["items"]}  # not one of the user's items deleted
    assert Counter(_key(i) for i in after["items"]) == Counter(_key(i) for i in truth["items"])
    assert rep.replaced == rep.restored == len(edited)
    assert sim.stats()["deleted_items"][a] == len(originals)  # the copies, and only them


def test_identical_source_items_each_get_their_own_copy_under_skip(sim_factory, tmp_path):
    """Two items of a folder with the same stream (the simulator's import of one item twice): restored into an
    empty folder under ``skip``, both come back — a copy this restore just made serves one source item only."""
    import base64

    sim = sim_factory(users=2, messages_per_mailbox=4, other_items=6, seed=54)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    mb = sim.model.mailbox(a)
    x = sorted(mb.xitems)[0]
    data = base64.b64encode(mb.x_stream(mb.xitems[x])).decode()
    sim.mutate(a, [{"op": "import_item", "folder": mb.xitems[x].folder, "data": data, "at": "2026-01-05T08:00:00+00:00"}])
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    src = snapshot_rows(open_repository(t), ra.user_id)
    assert len({r["sha256"] for r in src}) == len(src) - 1  # one stream twice
    res = restore(t, upn=a, to=b, into="Twice")
    assert res.ok and res.restored == len(src)
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Twice"]]
    assert Counter(_key(i) for i in here) == Counter(
        (r["item_type"], ("Twice", *r["folder_path"]), r["sha256"]) for r in src)



def test_a_resumed_copy_restore_never_takes_another_restores_items_for_its_own(sim_factory, tmp_path, monkeypatch):
    """A ``copy`` restore imports everything but records nothing (its progress cannot be written: as if killed
    before each record); the user deletes some of those copies, and a ``skip`` restore of the same source puts
    them back. Started again, the copy restore adopts its own remaining imports — not the skip restore's, which
    are exact copies too and new since its baseline — and imports again the ones the user deleted."""
    from mailpipe.repo.repository import Repository
    from mailpipe.repo.store import StoreError

    sim = sim_factory(users=2, messages_per_mailbox=10, other_items=8, seed=55)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    total = ra.items_total
    real = Repository.write_restore_progress

    def refused(self, *args, **kw):
        raise StoreError("the repository is away (injected)")

    monkeypatch.setattr(Repository, "write_restore_progress", refused)
    lost = restore(t, upn=a, to=b, into="Here", collisions="copy")
    assert not lost.ok and "injected" in lost.error
    monkeypatch.setattr(Repository, "write_restore_progress", real)
    made = sorted(i["id"] for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Here"])
    assert len(made) == total
    mbb = sim.model.mailbox(b)
    gone = made[:6]
    sim.mutate(b, [{"op": "delete_item", "ids": [i for i in gone if i in mbb.xitems]},
                   {"op": "delete", "ids": [i for i in gone if i in mbb.msgs]}])
    skip = restore(t, upn=a, to=b, into="Here")
    assert skip.ok and skip.restored == 6 and skip.skipped_present == total - 6
    again = restore(t, upn=a, to=b, into="Here", collisions="copy")
    assert again.ok and again.failed_count == 0, again.error
    assert again.completed == total - 6 and again.restored == 6
    uid_b = sim.model.user(b).id
    mine = {r["created"] for r in open_repository(t).iter_restore_progress(uid_b, again.restore_id)}
    theirs = {r["created"] for r in open_repository(t).iter_restore_progress(uid_b, skip.restore_id)
              if r["status"] == "created"}
    assert len(mine) == total and len(theirs) == 6 and not mine & theirs


def test_an_import_in_flight_is_not_taken_for_another_items_lost_import(sim_factory, tmp_path, monkeypatch):
    """Two source items with the same stream, imported at once: the first import fails before Exchange made
    anything (a 503) while the second has been made but not answered yet. Looking for the first one's import,
    the restore must not take the second's item for it (a review found one item lost, reported restored)."""
    import base64
    import hashlib

    from mailpipe.graph import TransientError
    from mailpipe.graph.export import MailboxExport

    sim = sim_factory(users=2, messages_per_mailbox=4, other_items=6, seed=56)
    a, b = [u for u in mailbox_upns(sim) if not u.startswith("shared")][:2]
    mb = sim.model.mailbox(a)
    x = sorted(mb.xitems)[0]
    twice = mb.x_stream(mb.xitems[x])
    sim.mutate(a, [{"op": "import_item", "folder": mb.xitems[x].folder, "data": base64.b64encode(twice).decode(),
                    "at": "2026-01-05T08:00:00+00:00"}])
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    src = snapshot_rows(open_repository(t), ra.user_id)
    real = MailboxExport.import_item
    calls: list[int] = []
    made = asyncio.Event()

    async def racing(self, session, folder_id, data, **kw):
        if hashlib.sha256(data).digest() != hashlib.sha256(twice).digest():
            return await real(self, session, folder_id, data, **kw)
        calls.append(1)
        if len(calls) == 1:  # the first: fails once the other one is made (or after 2 s)
            try:
                await asyncio.wait_for(made.wait(), 2.0)
            except TimeoutError:
                pass
            raise TransientError("import: 503 Service Unavailable (injected)")
        out = await real(self, session, folder_id, data, **kw)
        if len(calls) == 2:  # the second: made, answered late
            made.set()
            await asyncio.sleep(1.0)
        return out

    monkeypatch.setattr(MailboxExport, "import_item", racing)
    res = restore(t, upn=a, to=b, into="Twice")
    assert res.ok and res.failed_count == 0 and res.restored == len(src), (res.error, res.failed)
    rows = list(open_repository(t).iter_restore_progress(sim.model.user(b).id, res.restore_id))
    assert len(rows) == len(src) and len({r["created"] for r in rows}) == len(src)
    here = [i for i in fid_truth(sim, b)["items"] if i["folder_path"][:1] == ["Twice"]]
    assert Counter(_key(i) for i in here) == Counter(
        (r["item_type"], ("Twice", *r["folder_path"]), r["sha256"]) for r in src)


def test_an_item_deleted_while_it_is_replaced_fails_saying_so(sim_factory, tmp_path, monkeypatch):
    """The user deletes the item ``replace`` is about to update: the update is refused, the folder listed again,
    and the item fails with the reason — not retried against an item that is gone."""
    from mailpipe.graph.export import MailboxExport

    sim = sim_factory(users=1, messages_per_mailbox=4, other_items=6, seed=57)
    a = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    ra, = backup(t, [a])
    x = sorted(sim.model.mailbox(a).xitems)[0]
    sim.mutate(a, [{"op": "edit_item", "ids": [x]}])
    real = MailboxExport.import_item

    async def deleting(self, session, folder_id, data, **kw):
        if kw.get("mode") == "update":
            sim.mutate(a, [{"op": "delete_item", "ids": [kw["item_id"]]}])
        return await real(self, session, folder_id, data, **kw)

    monkeypatch.setattr(MailboxExport, "import_item", deleting)
    rep = restore(t, upn=a, in_place=True, collisions="replace")
    assert rep.failed_count == 1 and rep.failed[0]["item_id"] == x
    assert "left the target folder" in rep.failed[0]["reason"]
    assert sim.stats()["requests"][a]["import"] == 1
