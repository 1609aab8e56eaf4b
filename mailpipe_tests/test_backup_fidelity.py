"""Fidelity backups (``content: fidelity``) end to end: simulator (real HTTP) → msgraph-sdk → the export API's
client → engine → repository, over rounds of changes and injected faults, against the simulator's ground truth
(every item of every type, every folder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from mailpipe.repo import open_repository
from mailpipe.sim import FaultConfig, SimConfig, SimProcess, write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import backup, mailbox_upns


def fidelity_items(repo, user_id, snapshot_id="latest", verify=True):
    """{item_id: (type, folder_path, sha256)} of a snapshot's fidelity.parquet; with verify every stream is
    read back (read_content checks every chunk and the whole stream's sha256)."""
    out = {}
    for b in repo.iter_fidelity(user_id, snapshot_id):
        for r in b.to_pylist():
            if verify:
                data = repo.read_content(r["sha256"], r["chunks"], r["size"], item=r["item_id"])
                assert hashlib.sha256(data).hexdigest() == r["sha256"]
            assert r["item_id"] not in out, "duplicate item in a snapshot"
            out[r["item_id"]] = (r["item_type"], tuple(r["folder_path"]), r["sha256"])
    return out


def truth_fidelity(truth, upn):
    return {i["id"]: (i["type"], tuple(i["folder_path"]), i["sha256"])
            for i in truth["mailboxes"][upn]["fidelity"]["items"]}


def exports(sim) -> dict[str, Counter]:
    return {u: Counter(v) for u, v in sim.stats()["export_downloads"].items()}


def test_rounds_of_changes_and_faults_match_ground_truth_for_every_item_type(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=60, other_items=40, seed=21,
                      faults=FaultConfig(p_503=0.03, p_504=0.02, p_reset=0.02, p_429=0.02, retry_after_s=0.2,
                                         p_empty_page=0.1, p_export_item_error=0.05))
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    upns = mailbox_upns(sim)
    repo = open_repository(t)
    history = []
    for rnd in range(4):
        before = exports(sim)
        prev = sim.truth(fidelity=True)
        if rnd:
            for u in upns:
                sim.mutate(u, random=15, random_items=10, seed=rnd)
            if rnd == 2:
                sim.expire_delta_tokens(upns[0])  # every folder of that mailbox is listed again from scratch
        truth = sim.truth(fidelity=True)
        results = backup(t, upns)
        assert all(r.ok for r in results), [r.error for r in results]
        after = exports(sim)
        for r in results:
            got = fidelity_items(repo, r.user_id)
            want = truth_fidelity(truth, r.upn)
            assert got == want, f"round {rnd} {r.upn}: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
            assert r.items_total == len(want)
            assert r.items_by_type == dict(Counter(v[0] for v in want.values()))
            assert set(r.items_by_type) == {"IPM.Note", "IPM.Appointment", "IPM.Contact", "IPM.Task"}
            # the folder tree: every folder of every class, empty ones too
            folders = repo.read_folders(r.user_id, "latest").to_pylist()
            assert {f["folder_id"]: tuple(f["path"]) for f in folders} == {
                f["id"]: tuple(f["path"]) for f in truth["mailboxes"][r.upn]["fidelity"]["folders"]}
            if rnd:
                # nothing re-exported that is stored: only items whose changeKey moved since the last backup
                old = {i["id"]: i["change_key"] for i in prev["mailboxes"][r.upn]["fidelity"]["items"]}
                now = {i["id"]: i["change_key"] for i in truth["mailboxes"][r.upn]["fidelity"]["items"]}
                changed = {i for i, ck in now.items() if old.get(i) != ck}
                fetched = set((after.get(r.upn, Counter()) - before.get(r.upn, Counter())).keys())
                assert fetched <= changed, fetched - changed
                assert changed <= fetched  # and everything that changed was exported again
                assert r.items_removed == len(set(old) - set(now))
        history.append(({r.upn: (r.user_id, r.snapshot_id) for r in results}, truth))
        if rnd == 0:
            first = {u: dict(sim.stats()["requests"][u]) for u in upns}
    for snaps, truth in history:  # earlier snapshots still hold exactly what was there at their time
        for upn, (uid, sid) in snaps.items():
            assert fidelity_items(repo, uid, sid, verify=False) == truth_fidelity(truth, upn)
    # and `mailpipe check --read-data` reads every fidelity.parquet and every chunk its rows name
    from mailpipe.repo.check import check_repository

    chk = check_repository(repo, repo.list_mailboxes(), read_data=True)
    assert chk.ok and chk.snapshots == 4 * len(upns), chk.problems[:5]
    assert chk.items == sum(len(truth_fidelity(t_, u)) for _, t_ in history for u in upns)
    st = sim.stats()
    assert sum(st["faults_injected"][u].get("export_item_error", 0) for u in upns) > 0
    # 20 items per exportItems request: the first round exported every item in about 1/20 as many requests
    # (plus the retries of injected faults and of the items that got a per-item error)
    for u in upns:
        n = len(truth_fidelity(history[0][1], u))
        assert first[u]["export"] <= -(-n // 20) + 6, (n, first[u])  # + retry passes and faults


def test_a_failing_item_is_skipped_pending_and_exported_once_it_heals(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20, other_items=12, seed=22)
    upn = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    uid = sim.model.user(upn).id
    bad = sorted(sim.model.mailbox(uid).xitems)[0]
    sim.set_faults(FaultConfig(fail_exports={bad: 500}))
    r, = backup(t, [upn])
    assert r.ok and r.items_skipped == 1 and r.skipped[0]["item_id"] == bad and r.skipped[0]["pending"]
    assert "ErrorCorruptData" in r.skipped[0]["reason"]
    repo = open_repository(t)
    assert bad not in fidelity_items(repo, uid)
    sim.set_faults(FaultConfig())
    r2, = backup(t, [upn])  # the delta says nothing about it: the pending list brings it back
    assert r2.ok and r2.items_skipped == 0
    assert fidelity_items(repo, uid) == truth_fidelity(sim.truth(upn, fidelity=True), upn)


def test_a_not_found_answer_for_a_live_item_does_not_drop_it(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=10, other_items=8, seed=23)
    upn = mailbox_upns(sim)[0]
    uid = sim.model.user(upn).id
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    flaky = sorted(sim.model.mailbox(uid).msgs)[0]
    sim.set_faults(FaultConfig(fail_exports={flaky: 404}))  # exportItems says "not found", the item exists
    r, = backup(t, [upn])
    assert r.ok and any(s["item_id"] == flaky and s["pending"] for s in r.skipped)
    sim.set_faults(FaultConfig())
    r, = backup(t, [upn])
    assert r.ok and fidelity_items(open_repository(t), uid) == truth_fidelity(sim.truth(upn, fidelity=True), upn)


def test_missing_export_permission_fails_the_mailbox_naming_it(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=5, roles=["Mail.Read"])
    upn = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    r, = backup(t, [upn])
    assert not r.ok and r.error_kind == "forbidden" and "MailboxItem.Export.All" in r.error


@pytest.mark.parametrize("same_host", [True, False], ids=["same_host", "other_host"])
def test_sigkill_mid_backup_then_restart_exports_at_most_2_percent_again(tmp_path, same_host):
    """A fidelity backup killed (SIGKILL) halfway through, then run again: what the killed run stored and
    checkpointed (or journaled, on the same host) is never exported again; at most the batches in flight
    (4 × 20 items, and one whose journal part was being written) and, on another host, the last checkpoint window (≤ 2 batches) are: ≤ 2 % of a mailbox of
    more than ~6,000 items (the bound does not grow with the mailbox)."""
    cfg = SimConfig(users=1, messages_per_mailbox=6000, plain=True, seed=24,
                    faults=FaultConfig(latency_ms=15, jitter_ms=5))
    with SimProcess(cfg) as sim:
        upn = next(iter(sim.truth(hashes=False)["mailboxes"]))
        truth = sim.truth(upn, fidelity=True)
        total = len(truth["mailboxes"][upn]["fidelity"]["items"])
        repo_dir = tmp_path / "repo"
        env = {**os.environ, "MAILPIPE_CHECKPOINT_SECONDS": "0.5", "MAILPIPE_WORK_DIR": str(tmp_path / "work"),
               "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, repo_dir,
                                                      content="fidelity")}
        cmd = [sys.executable, "-m", "mailpipe", "backup", "t1", upn, "--json"]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            n = sum(sim.stats().get("export_downloads", {}).get(upn, {}).values())
            if n >= total * 0.5:
                break
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        t = make_tenant(sim, str(repo_dir), name="t1", content="fidelity")
        repo = open_repository(t, create=False)
        uid = truth["mailboxes"][upn]["id"]
        assert repo.latest_snapshot(uid) is None
        if not same_host:
            shutil.rmtree(tmp_path / "work")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["ok"] and res["items_total"] == total
        both = Counter(sim.stats()["export_downloads"][upn])
        again = {i for i, n in both.items() if n > 1}
        assert len(again) <= min(0.02 * total, (5 if same_host else 7) * 20), (len(again), total,
                                                                                res["items_reused"])
        assert res["items_reused"] >= 0.4 * total
        assert fidelity_items(repo, uid, verify=False) == truth_fidelity(sim.truth(upn, fidelity=True), upn)
        assert list(repo.iter_checkpoint_rows(uid)) == []
        print(f"\n{'same' if same_host else 'other'} host: {total} items, {len(again)} exported again "
              f"({100 * len(again) / total:.2f} %), {res['items_reused']} reused")


def test_snapshots_count_items_by_type_and_export_says_what_it_cannot_write(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=15, other_items=12, seed=25)
    upn = mailbox_upns(sim)[0]
    repo_dir = tmp_path / "repo"
    tf = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, repo_dir, content="fidelity")
    t = make_tenant(sim, str(repo_dir), name="t1", content="fidelity")
    r, = backup(t, [upn])
    assert r.ok
    want = Counter(i["type"] for i in sim.truth(upn, fidelity=True)["mailboxes"][upn]["fidelity"]["items"])
    env = {**os.environ, "MAILPIPE_TENANTS": tf, "MAILPIPE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "mailpipe", "snapshots", "t1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if upn[:32] in x)
    assert (f"fidelity: mail {want['IPM.Note']}, calendar {want['IPM.Appointment']}, contacts "
            f"{want['IPM.Contact']}, tasks {want['IPM.Task']}") in line
    assert f" {sum(want.values())} " in line
    out = subprocess.run([sys.executable, "-m", "mailpipe", "export", "t1", upn, "--out", str(tmp_path / "eml")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"not exported: {sum(want.values())} items" in out.stderr and "not MIME" in out.stderr


def test_both_mode_stores_byte_exact_mime_of_messages_and_the_stream_of_every_item(sim_factory, tmp_path):
    from mailpipe_tests.helpers import snapshot_items, truth_items

    sim = sim_factory(users=2, messages_per_mailbox=40, other_items=20, seed=26,
                      faults=FaultConfig(p_503=0.03, p_429=0.02, retry_after_s=0.1, p_export_item_error=0.05))
    upns = mailbox_upns(sim)
    t = make_tenant(sim, str(tmp_path / "repo"), content="both")
    repo = open_repository(t)
    for rnd in range(3):
        if rnd:
            for u in upns:
                sim.mutate(u, random=10, random_items=6, seed=rnd)
        truth = sim.truth(fidelity=True)
        before = sim.stats()["requests"]
        results = backup(t, upns)
        assert all(r.ok for r in results), [r.error for r in results]
        for r in results:
            assert snapshot_items(repo, r.user_id) == truth_items(truth, r.upn)  # MIME, byte-exact (verified)
            assert fidelity_items(repo, r.user_id) == truth_fidelity(truth, r.upn)  # every item's stream
            assert r.items_by_type == dict(Counter(v[0] for v in truth_fidelity(truth, r.upn).values()))
            snap = repo.read_snapshot(r.user_id, "latest")
            assert set(snap.files) == {"manifest.parquet", "folders.parquet", "fidelity.parquet"}
            assert snap.stats["content"] == "both" and snap.delta_links and snap.fidelity["delta_links"]
            if rnd == 0:  # a first backup: one $value per message, plus ~1/20 export request per item
                after = sim.stats()["requests"][r.upn]
                n_msg = len(truth["mailboxes"][r.upn]["items"])
                n_all = len(truth_fidelity(truth, r.upn))
                assert after["mime"] - before.get(r.upn, {}).get("mime", 0) >= n_msg
                assert after["export"] - before.get(r.upn, {}).get("export", 0) <= -(-n_all // 20) + 6
    # mailpipe export writes the .eml of every message, byte for byte
    from mailpipe.repo.export import export_snapshot

    r = results[0]
    out = export_snapshot(repo, r.user_id, "latest", str(tmp_path / "eml"), fmt="eml")
    assert out.items == len(truth["mailboxes"][r.upn]["items"])
    from mailpipe.repo.check import check_repository

    chk = check_repository(repo, repo.list_mailboxes(), read_data=True)
    assert chk.ok, chk.problems[:5]


def test_prune_keeps_every_chunk_a_fidelity_snapshot_names_and_frees_the_rest(sim_factory, tmp_path):
    from mailpipe.repo.check import check_repository
    from mailpipe.repo.prune import prune

    sim = sim_factory(users=1, messages_per_mailbox=30, other_items=20, seed=27)
    upn = mailbox_upns(sim)[0]
    uid = sim.model.user(upn).id
    t = make_tenant(sim, str(tmp_path / "repo"), content="fidelity")
    repo = open_repository(t)
    r1, = backup(t, [upn])
    mb = sim.model.mailbox(uid)
    # edit every calendar/contact/task item and delete two thirds of the messages: their old streams are only
    # in the first snapshot (enough of the packs to be repacked: prune's threshold is a quarter)
    sim.mutate(upn, [{"op": "edit_item", "ids": sorted(mb.xitems)},
                     {"op": "delete", "ids": [m for i, m in enumerate(sorted(mb.msgs)) if i % 3]}])
    r2, = backup(t, [upn])
    want = truth_fidelity(sim.truth(upn, fidelity=True), upn)
    before = set(repo.iter_chunk_names())
    repo.delete_snapshot(uid, r1.snapshot_id)  # what forget does
    for _ in range(3):
        prune(repo, safety_seconds=0, clock_margin=0)
    repo = open_repository(t)
    after = set(repo.iter_chunk_names())
    needed = {h for b in repo.iter_fidelity(uid, "latest") for r in b.to_pylist() for h in r["chunks"]}
    assert needed <= after and after < before  # every chunk still named is kept, the others are freed
    assert fidelity_items(repo, uid) == want  # and every stream reads back whole
    assert check_repository(repo, repo.list_mailboxes(), read_data=True).ok


@pytest.mark.parametrize("mode", ["foreign_next_link", "foreign_delta_link"])
def test_an_export_delta_link_to_another_host_is_never_followed(sim_factory, tmp_path, mode):
    from mailpipe.sim import LimitConfig
    from mailpipe_tests.hostile import HostileProxy

    sim = sim_factory(users=1, messages_per_mailbox=30, other_items=20, limits=LimitConfig(max_page_size=5))
    upn = mailbox_upns(sim)[0]
    with HostileProxy(sim, mode).start() as proxy:
        t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url, content="fidelity")
        r, = backup(t, [upn])
        assert not r.ok and r.error_kind == "unsafe-link"
        assert proxy.attacker.requests == []  # no request, so no token, ever reached the other host
        assert open_repository(t).latest_snapshot(r.user_id) is None
