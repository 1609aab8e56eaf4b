"""Restore into mailboxes, end to end: simulator (real HTTP, Graph's write API) → msgraph-sdk → restore engine
→ the simulator's mailbox, then backed up again and compared, item by item, with what was backed up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest

from mailpipe.config import Limits
from mailpipe.repo import open_repository
from mailpipe.restore import RestoreRequest, restore_mailbox
from mailpipe.restore.convert import TAG_PROPERTY, convert
from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, SimProcess, write_tenants_file
from mailpipe.sim.semantic import html_to_text, summarize
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import FAST, TEST_SETTINGS, backup, mailbox_upns, snapshot_items, truth_items


def restore(t, *, settings=TEST_SETTINGS, **kw):
    return asyncio.run(restore_mailbox(t, RestoreRequest(**kw), settings=settings, graph_options=FAST))


def users(sim):
    return [u for u in mailbox_upns(sim) if not u.startswith("shared-")]


def rows_by_id(repo, uid, snapshot="latest"):
    return {r["item_id"]: r for b in repo.iter_manifest(uid, snapshot) for r in b.to_pylist()}


def content(repo, row):
    return repo.read_content(row["sha256"], row["chunks"], row["size"], item=row["item_id"])


def seen(summary):
    """What a person sees, less what Graph v1.0 cannot recreate: attachments inside an attached message."""
    s = dict(summary)
    s["attached_messages"] = [{**m, "attachments": [], "attached_messages": []} for m in s["attached_messages"]]
    return s


def assert_uploaded_once(stats, upn):
    """No byte range sent twice in an upload session, and each attachment completed by one session only."""
    for sid, ranges in stats["upload_ranges"].get(upn, {}).items():
        assert len(ranges) == len({tuple(r) for r in ranges}), sid
    done = Counter((s["message_id"], s["name"]) for s in stats["upload_sessions"].get(upn, {}).values()
                   if s["state"] == "done")
    assert max(done.values(), default=1) == 1


def assert_restored_equal(repo, a_uid, b_uid, root, a_snapshot="latest", only=None):
    """Every item of A's snapshot (or ``only``) is in B's latest snapshot under ``root`` (a path prefix), once,
    showing the same: headers, body, attachments' names and bytes, attached messages, read state, flag,
    categories, sent and received times, folder path; and is not a draft."""
    a = rows_by_id(repo, a_uid, a_snapshot)
    b = [r for r in rows_by_id(repo, b_uid).values() if tuple(r["folder_path"][:len(root)]) == root]
    by_mid = Counter(r["internet_message_id"] for r in b)
    assert max(by_mid.values(), default=1) == 1, "an item was restored twice"
    b_by_mid = {r["internet_message_id"]: r for r in b}
    want = [r for r in a.values() if only is None or r["item_id"] in only]
    assert len(b) == len(want)
    for ra in want:
        rb = b_by_mid[ra["internet_message_id"]]
        assert tuple(rb["folder_path"][len(root):]) == tuple(ra["folder_path"]), ra["item_id"]
        assert not rb["is_draft"], "restored as a draft"
        for k in ("is_read", "flag_status", "subject", "sender"):
            assert rb[k] == ra[k], (k, ra[k], rb[k])
        assert sorted(rb["categories"] or []) == sorted(ra["categories"] or [])
        assert rb["received_at"] == ra["received_at"]
        sa, sb = summarize(content(repo, ra)), summarize(content(repo, rb))
        assert seen(sb) == seen(sa), ra["item_id"]
    return b


def test_convert_keeps_what_a_reader_sees_on_the_seeded_corpus():
    """The JSON a message is recreated from carries what summarize() sees in its MIME."""
    from mailpipe.sim.model import TenantModel

    model = TenantModel(SimConfig(users=1, messages_per_mailbox=80, seed=9))
    mb = model.mailbox(model.users[0].upn)
    kinds = Counter()
    for m in list(mb.msgs.values()):
        data = mb.mime(m)
        s = summarize(data)
        rm = convert(data, received_at=m.received, is_read=True, flag_status="flagged", categories=["Blue"], tag="x:1")
        msg = rm.message
        assert msg["subject"] == s["subject"] and msg["internetMessageId"] == s["internet_message_id"]
        assert [r["emailAddress"]["address"].lower() for r in msg.get("toRecipients", [])] == s["to"]
        assert msg["from"]["emailAddress"]["address"].lower() == s["from"][0]
        body = html_to_text(msg["body"]["content"]) if msg["body"]["contentType"] == "html" else msg["body"]["content"]
        assert " ".join(body.split()) == s["body_text"]
        files = sorted((a.name, a.content_type, len(a.data), a.is_inline, a.content_id) for a in rm.attachments
                       if a.kind == "file")
        assert files == sorted((x["name"], x["content_type"], x["size"], x["is_inline"], x["content_id"])
                               for x in s["attachments"])
        assert [a.item["subject"] for a in rm.attachments if a.kind == "item"] == \
               [x["subject"] for x in s["attached_messages"]]
        props = {p["id"]: p["value"] for p in msg["singleValueExtendedProperties"]}
        assert int(props["Integer 0x0E07"]) & 0x8 == 0 and int(props["Integer 0x0E07"]) & 0x1 == 1  # sent, read
        assert props[TAG_PROPERTY] == "x:1" and props["SystemTime 0x0E06"].startswith(m.received.strftime("%Y-%m-%d"))
        kinds.update(a.kind + ("-inline" if a.is_inline else "") for a in rm.attachments)
    assert kinds["file"] and kinds["file-inline"] and kinds["item"]  # the corpus has each kind


def test_restore_into_another_mailbox_gives_back_every_item_as_it_was(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=40, seed=4, huge_attachments=True)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [ra] = backup(t, [a])
    sim.reset_stats()
    res = restore(t, upn=a, to=b)
    assert res.ok and res.restored == ra.items_total and not res.failed, res.summary()
    st = sim.stats()
    assert st["upload_with_bearer"].get(b, 0) == 0  # the upload URL carried its own authorisation, not our token
    assert_uploaded_once(st, b)
    assert max(len(r) for r in st["upload_ranges"][b].values()) >= 6  # the > 25 MB one went up in 4 MB pieces
    [rb] = backup(t, [b])
    root = (res.target_root,)
    assert_restored_equal(repo, ra.user_id, rb.user_id, root)
    a_folders = {tuple(f["path"]) for f in repo.read_folders(ra.user_id, "latest").to_pylist()}
    b_folders = {tuple(f["path"][1:]) for f in repo.read_folders(rb.user_id, "latest").to_pylist()
                 if tuple(f["path"][:1]) == root and len(f["path"]) > 1}
    assert b_folders == a_folders  # the whole tree, empty folders, unicode and "/" in names included
    big = max(rows_by_id(repo, ra.user_id).values(), key=lambda r: r["size"])
    assert big["size"] > 25_000_000
    # the same request again: everything is recorded done, nothing is created
    again = restore(t, upn=a, to=b)
    assert again.ok and again.restored == 0 and again.resumed == ra.items_total
    assert sim.stats()["created_messages"][b] == ra.items_total


def test_in_place_brings_back_what_was_lost_and_skips_what_is_there(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40, seed=6)
    [a] = users(sim)[:1]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [a])
    lost = sorted(sim.model.mailbox(a).msgs)[:4]
    sim.mutate(a, [{"op": "delete", "ids": lost}])
    res = restore(t, upn=a, in_place=True)
    assert res.ok and res.restored == 4 and res.skipped_present == r1.items_total - 4, res.summary()
    [r2] = backup(t, [a])
    before, after = rows_by_id(repo, r1.user_id, r1.snapshot_id), rows_by_id(repo, r2.user_id)
    assert len(after) == len(before)  # no duplicate: what was there was skipped
    by_mid = {r["internet_message_id"]: r for r in after.values()}
    for item in lost:
        old = before[item]
        new = by_mid[old["internet_message_id"]]
        assert new["folder_path"] == old["folder_path"] and new["item_id"] != item
        assert seen(summarize(content(repo, new))) == seen(summarize(content(repo, old)))


def test_in_place_into_another_mailbox_uses_its_well_known_folders(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=30, seed=7)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [ra] = backup(t, [a])
    [rb0] = backup(t, [b])
    res = restore(t, upn=a, to=b, in_place=True)
    assert res.ok and res.restored == ra.items_total and res.target_root is None, res.summary()
    [rb] = backup(t, [b])
    a_rows, b_rows = rows_by_id(repo, ra.user_id), rows_by_id(repo, rb.user_id)
    assert len(b_rows) == rb0.items_total + ra.items_total
    b_folder_ids = {tuple(f["path"]): f["folder_id"] for f in repo.read_folders(rb.user_id, "latest").to_pylist()}
    b0_folder_ids = {tuple(f["path"]): f["folder_id"] for f in repo.read_folders(rb0.user_id, rb0.snapshot_id).to_pylist()}
    assert b_folder_ids[("Inbox",)] == b0_folder_ids[("Inbox",)]  # B's own Inbox, not a new folder named Inbox
    by_mid = {r["internet_message_id"]: r for r in b_rows.values()}
    for r in a_rows.values():
        assert by_mid[r["internet_message_id"]]["folder_path"] == r["folder_path"]


def test_an_older_snapshot_one_folder_one_item_and_dates(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=40, seed=8)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [a])
    sim.mutate(a, [{"op": "new_mail", "count": 5, "folder": "inbox"}])
    [r2] = backup(t, [a])
    old = rows_by_id(repo, r1.user_id, r1.snapshot_id)
    # --at: the snapshot committed at or before a time between the two backups
    at = r1.committed_at + (r2.committed_at - r1.committed_at) / 2
    res = restore(t, upn=a, to=b, at=at, folders=("Inbox",), into="Old inbox")
    assert res.ok and res.snapshot_id == r1.snapshot_id
    inbox = {k for k, r in old.items() if r["folder_path"][:1] == ["Inbox"]}
    assert res.restored == len(inbox)
    one = sorted(k for k, r in old.items() if r["folder_path"] == ["Sent Items"])[0]
    res1 = restore(t, upn=a, to=b, snapshot=r1.snapshot_id, items=(one,), into="One")
    assert res1.ok and res1.restored == 1
    rows = sorted(old.values(), key=lambda r: r["received_at"])
    since, until = rows[5]["received_at"], rows[15]["received_at"]
    res2 = restore(t, upn=a, to=b, snapshot=r1.snapshot_id, since=since, until=until, into="Range")
    assert res2.ok and res2.restored == 10
    [rb] = backup(t, [b])
    assert_restored_equal(repo, r1.user_id, rb.user_id, ("Old inbox",), r1.snapshot_id, only=inbox)
    assert_restored_equal(repo, r1.user_id, rb.user_id, ("One",), r1.snapshot_id, only={one})
    assert_restored_equal(repo, r1.user_id, rb.user_id, ("Range",), r1.snapshot_id,
                          only={r["item_id"] for r in rows[5:15]})
    bad = restore(t, upn=a, folders=("No such folder",))
    assert not bad.ok and "no folder" in bad.error


@pytest.mark.parametrize("policy", ["copy", "replace"])
def test_collisions_copy_and_replace(sim_factory, tmp_path, policy):
    sim = sim_factory(users=2, messages_per_mailbox=20, seed=10)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [ra] = backup(t, [a])
    first = restore(t, upn=a, to=b, into="Here")
    assert first.ok and first.restored == ra.items_total
    [rb1] = backup(t, [b])
    ids1 = {r["item_id"] for r in rows_by_id(repo, rb1.user_id).values() if r["folder_path"][:1] == ["Here"]}
    skip = restore(t, upn=a, to=b, into="Here", collisions="skip", folders=("Inbox",))  # another request
    assert skip.ok and skip.restored == 0 and skip.skipped_present > 0
    again = restore(t, upn=a, to=b, into="Here", collisions=policy)
    assert again.ok and again.restored == ra.items_total
    [rb2] = backup(t, [b])
    here = [r for r in rows_by_id(repo, rb2.user_id).values() if r["folder_path"][:1] == ["Here"]]
    if policy == "copy":
        assert len(here) == 2 * ra.items_total
    else:
        assert again.replaced == ra.items_total and len(here) == ra.items_total
        assert not ids1 & {r["item_id"] for r in here}  # the old ones were deleted, only them
        assert_restored_equal(repo, ra.user_id, rb2.user_id, ("Here",))


def test_a_restore_killed_midway_resumes_without_duplicates(tmp_path):
    cfg = SimConfig(users=2, messages_per_mailbox=80, seed=12, faults=FaultConfig(latency_ms=15))
    with SimProcess(cfg) as sim:
        a, b = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("shared-")][:2]
        env = {**os.environ, "MAILPIPE_CHECKPOINT_SECONDS": "0.3",
               "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url, tmp_path / "repo")}
        out = subprocess.run([sys.executable, "-m", "mailpipe", "backup", "t1", a, "--json"], env=env,
                             capture_output=True, text=True, timeout=300)
        total = json.loads(out.stdout.splitlines()[-1])["items_total"]
        cmd = [sys.executable, "-m", "mailpipe", "restore", "t1", a, "--to", b, "--json"]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while sim.stats()["created_messages"].get(b, 0) < total // 2:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        created_before = sim.stats()["created_messages"][b]
        assert 0 < created_before < total
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        res = json.loads(done.stdout.splitlines()[-1])
        assert res["restored"] + res["resumed"] + res["completed"] == total
        assert res["resumed"] + res["completed"] >= created_before - 1  # (the one in flight may be redone)
        st = sim.stats()
        assert st["created_messages"][b] == total  # not one message created twice
        assert_uploaded_once(st, b)
        truth = sim.truth(b, semantic=True)["mailboxes"][b]["items"]
        mids = Counter(i["internet_message_id"] for i in truth if i["folder_path"][0].startswith("Restored "))
        assert len(mids) == total and max(mids.values()) == 1


def test_a_restore_that_hits_the_upload_budget_finishes_paced(sim_factory, tmp_path):
    """Exchange's 150 MB per 5 minutes, scaled down: 1.5 MB per 2 s, for a restore of > 3 MB. The client keeps
    a wider margin than in production: at a 2 s window, request-latency jitter under load is a real share."""
    sim = sim_factory(users=2, messages_per_mailbox=30, seed=14,
                      limits=LimitConfig(upload_bytes=1_500_000, upload_window_seconds=2.0))
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"), limits=Limits(upload_bytes_per_5min_per_mailbox=1_250_000))
    [ra] = backup(t, [a])
    res = asyncio.run(restore_mailbox(t, RestoreRequest(upn=a, to=b), settings=TEST_SETTINGS,
                                      graph_options={**FAST, "upload_window_seconds": 2.0}))
    assert res.ok and res.restored == ra.items_total and not res.failed, res.summary()
    assert res.upload_wait_seconds > 0 and res.bytes_uploaded > 3_000_000
    throttled = sim.stats()["upload_throttled"].get(b, 0)
    assert throttled == 0  # paced by its own budget, not by 429s (without it: one 429 per full window)
    [rb] = backup(t, [b])
    assert_restored_equal(open_repository(t), ra.user_id, rb.user_id, (res.target_root,))


def test_dry_run_plans_without_writing(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=30, seed=16)
    [a] = users(sim)[:1]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [ra] = backup(t, [a])
    sim.reset_stats()
    res = restore(t, upn=a, dry_run=True)
    assert res.ok and res.items_selected == ra.items_total and res.restored == 0
    assert sum(f.items for f in res.folders) == ra.items_total and res.expected_seconds > 0
    assert not any(k.startswith(("create", "add", "upload")) for k in sim.stats()["requests"].get(a, {}))


def test_the_restore_command(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=15, seed=18)
    a, b = users(sim)[:2]
    env = {**os.environ, "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url,
                                                                tmp_path / "repo")}
    subprocess.run([sys.executable, "-m", "mailpipe", "backup", "t1", a], env=env, check=True, timeout=300,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "mailpipe", "restore", "t1", a, "--to", b, "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "would be restored" in out.stdout and "Inbox" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mailpipe", "restore", "t1", a, "--to", b, "--folder", "Inbox"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " restored" in out.stdout and "at Exchange's limits" in out.stderr, out
    out = subprocess.run([sys.executable, "-m", "mailpipe", "restore", "t1", "nobody@x.example"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no backup of mailbox" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "mailpipe", "restore", "t1", a, "--into", "X", "--in-place"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


def test_the_same_restore_run_again_after_a_new_backup_creates_nothing_twice(sim_factory, tmp_path):
    """`latest` is resolved once: a restore run again (a retry, a relaunch) continues from the snapshot and
    the folder its first run chose, even when a backup committed a newer snapshot meanwhile."""
    sim = sim_factory(users=2, messages_per_mailbox=15, seed=20)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [ra] = backup(t, [a])
    first = restore(t, upn=a, to=b)
    sim.mutate(a, [{"op": "new_mail", "count": 3, "folder": "inbox"}])
    [ra2] = backup(t, [a])
    assert ra2.snapshot_id != ra.snapshot_id
    again = restore(t, upn=a, to=b)
    assert again.ok and again.restore_id == first.restore_id and again.snapshot_id == ra.snapshot_id
    assert again.target_root == first.target_root and again.restored == 0 and again.resumed == ra.items_total
    assert any("continuing restore" in w for w in again.warnings)
    assert sim.stats()["created_messages"][b] == ra.items_total


def test_replace_finishes_its_deletes_when_run_again(sim_factory, tmp_path, monkeypatch):
    from mailpipe.graph import TransientError
    from mailpipe.graph.write import MailboxWriter

    sim = sim_factory(users=2, messages_per_mailbox=10, seed=22)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [ra] = backup(t, [a])
    assert restore(t, upn=a, to=b, into="Here").restored == ra.items_total
    real = MailboxWriter.delete_message

    async def failing(self, message_id):
        raise TransientError("delete: connection failed (injected)")

    monkeypatch.setattr(MailboxWriter, "delete_message", failing)
    broken = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert broken.failed_count == ra.items_total  # created, but the old ones could not be deleted
    monkeypatch.setattr(MailboxWriter, "delete_message", real)
    fixed = restore(t, upn=a, to=b, into="Here", collisions="replace")
    assert fixed.ok and fixed.failed_count == 0 and fixed.completed == ra.items_total
    [rb] = backup(t, [b])
    assert_restored_equal(repo, ra.user_id, rb.user_id, ("Here",))  # one of each: the old copies are gone


def test_a_restore_does_not_stop_when_its_progress_cannot_be_recorded_for_a_while(sim_factory, tmp_path, monkeypatch):
    from mailpipe.repo.repository import Repository
    from mailpipe.repo.store import StoreError

    sim = sim_factory(users=2, messages_per_mailbox=30, seed=24)
    a, b = users(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [ra] = backup(t, [a])
    real = Repository.write_restore_progress
    calls = {"n": 0}

    def flaky(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] <= 12:  # more failures than the restore has workers
            raise StoreError("storage: unreachable (injected)")
        return real(self, *args, **kw)

    monkeypatch.setattr(Repository, "write_restore_progress", flaky)
    s = TEST_SETTINGS.replace(checkpoint_items=1)
    t0 = time.monotonic()
    res = restore(t, upn=a, to=b, settings=s)
    assert time.monotonic() - t0 < 60
    assert res.ok and res.restored == ra.items_total and res.failed_count == 0, res.summary()
    recorded = {r["source"] for r in open_repository(t).iter_restore_progress(_uid(t, b), res.restore_id)}
    assert len(recorded) == ra.items_total  # nothing recorded was lost with the failed writes


def _uid(t, upn):
    async def go():
        from mailpipe.graph import GraphTenant

        async with GraphTenant.from_config(t) as g:
            return (await g.resolve_mailbox(upn)).id

    return asyncio.run(go())
