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
