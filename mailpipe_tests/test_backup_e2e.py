"""The backup engine end to end: simulator (real HTTP) → msgraph-sdk → engine → repository, over rounds of
changes and injected faults, checked against the simulator's ground truth."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow as pa
import pytest

from mailpipe.repo import open_repository
from mailpipe.sim import FaultConfig, SimConfig, SimProcess, write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import backup, commit_record, downloads, mailbox_upns, snapshot_items, truth_items


def test_rounds_of_changes_and_faults_match_ground_truth(sim_factory, tmp_path):
    sim = sim_factory(users=3, messages_per_mailbox=50, seed=11,
                      faults=FaultConfig(p_503=0.03, p_504=0.02, p_reset=0.02, p_429=0.02, retry_after_s=0.2,
                                         p_empty_page=0.1))
    t = make_tenant(sim, str(tmp_path / "repo"))
    upns = mailbox_upns(sim)
    repo = open_repository(t)
    history: list[tuple[dict, dict]] = []  # (snapshot id per upn, truth) per round
    for rnd in range(4):
        before = downloads(sim)
        prev_truth = sim.truth()
        expected_downloads = {u: set() for u in upns}
        if rnd:
            for u in upns:
                out = sim.mutate(u, random=25, seed=rnd)
                for op, applied in zip(out["ops"], out["applied"]):
                    if op["op"] == "new_mail":
                        expected_downloads[u] |= set(applied)
                    elif op["op"] == "edit_draft":
                        expected_downloads[u] |= set(applied)
            if rnd == 2:
                sim.expire_delta_tokens(upns[0])  # every folder of that mailbox resyncs from scratch
        truth = sim.truth()
        results = backup(t, upns)
        assert all(r.ok for r in results), [r.error for r in results]
        after = downloads(sim)
        for r in results:
            got = snapshot_items(repo, r.user_id)
            want = truth_items(truth, r.upn)
            assert got == want, f"round {rnd} {r.upn}: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
            assert r.items_total == len(want)
            if rnd:
                fetched = set((after.get(r.upn, Counter()) - before.get(r.upn, Counter())).keys())
                # nothing already stored is downloaded again: only new mail and edited drafts
                assert fetched <= expected_downloads[r.upn], fetched - expected_downloads[r.upn]
                gone = set(truth_items(prev_truth, r.upn)) - set(want)
                assert r.items_removed == len(gone)
        history.append(({r.upn: (r.user_id, r.snapshot_id) for r in results}, truth))
    # earlier snapshots still export exactly what was there at their time
    for snaps, truth in history:
        for upn, (uid, sid) in snaps.items():
            assert snapshot_items(repo, uid, sid, verify=False) == truth_items(truth, upn)
    # and the whole repository passes `mailpipe check --read-data` (every snapshot, every chunk)
    from mailpipe.repo.check import check_repository

    chk = check_repository(repo, repo.list_mailboxes(), read_data=True)
    assert chk.ok and chk.snapshots == 4 * len(upns), chk.problems[:5]
    assert sum(sum(v.values()) for v in sim.stats()["faults_injected"].values()) > 0


def test_no_change_incremental_costs_a_constant_per_folder(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=120)
    t = make_tenant(sim, str(tmp_path / "repo"))
    upn = mailbox_upns(sim)[0]
    [full] = backup(t, [upn])
    [inc] = backup(t, [upn])
    folders = len(sim.truth()["mailboxes"][upn]["folders"])
    assert full.ok and inc.ok and inc.items_total == full.items_total
    assert inc.items_new == inc.items_changed == inc.items_removed == 0 and inc.bytes_fetched == 0
    assert full.requests <= full.items_total * 1.05 + 2 * folders + 2
    assert inc.requests <= 2 * folders + 2  # folder listing + one delta page per folder


def test_permanent_item_failure_is_skipped_then_retried(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=30)
    upn = mailbox_upns(sim)[0]
    bad = sorted(sim.model.mailbox(upn).msgs)[3]
    sim.set_faults(FaultConfig(fail_messages={bad: 500}))
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r] = backup(t, [upn])
    assert r.ok and r.items_skipped == 1 and r.skipped[0]["item_id"] == bad
    assert "ErrorCorruptData" in r.skipped[0]["reason"] and r.skipped[0]["folder_path"]
    repo = open_repository(t)
    assert repo.latest_snapshot(r.user_id).skipped[0]["item_id"] == bad
    assert bad not in snapshot_items(repo, r.user_id)
    sim.set_faults(FaultConfig())
    [r2] = backup(t, [upn])  # the skipped item is tried again, although its folder's delta has moved on
    assert r2.ok and r2.items_skipped == 0
    assert snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)


def test_a_failing_mailbox_fails_alone_and_skip_if_committed(sim_factory, tmp_path):
    sim = sim_factory(users=3, messages_per_mailbox=20)
    upns = mailbox_upns(sim)
    sim.set_faults(FaultConfig(fail_users={upns[1]: 403}))
    t = make_tenant(sim, str(tmp_path / "repo"))
    results = backup(t, upns)
    ok = {r.upn: r for r in results}
    assert not ok[upns[1]].ok and ok[upns[1]].error_kind == "forbidden" and upns[1] in ok[upns[1]].error
    assert all(ok[u].ok for u in upns if u != upns[1])
    # a retried batch skips what it already committed, and does the rest
    from datetime import datetime, timedelta, timezone

    sim.set_faults(FaultConfig())
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    again = {r.upn: r for r in backup(t, upns, skip_if_committed_since=since)}
    assert again[upns[1]].ok and not again[upns[1]].already_committed
    assert again[upns[0]].already_committed and again[upns[0]].snapshot_id == ok[upns[0]].snapshot_id
    assert again[upns[0]].requests <= 1  # resolving the user only
    assert again[upns[0]].items_total == ok[upns[0]].items_total


def test_unknown_mailbox_fails_clearly(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=5)
    t = make_tenant(sim, str(tmp_path / "repo"))
    nomb = next(u.upn for u in sim.model.users if u.kind == "nomailbox")
    [a, b] = backup(t, ["ghost@nowhere.example", nomb])
    assert not a.ok and a.error_kind == "not-found" and "ghost@nowhere.example" in a.error
    assert not b.ok and b.error_kind == "no-mailbox"


@pytest.mark.parametrize("where", ["journal", "checkpoints", "both_other_host"])
def test_sigkill_mid_backup_then_restart_downloads_only_what_was_not_stored(tmp_path, where):
    """Every item the killed run made durable is reused, none downloaded again: ``journal`` — no checkpoint
    is uploaded before the kill (a long cadence), the restart on the same host finds the killed run's local
    journal in its work dir; ``checkpoints`` — no journal, only the uploaded checkpoint parts;
    ``both_other_host`` — the defaults, and the restart runs where the work dir is not (another host).
    Beyond those, only the last window (5 items of the journal, 30 of a checkpoint) and what was in flight
    (6 downloads, a store batch pending and one being stored: ≤ 64 items each) is downloaded again."""
    cfg = SimConfig(users=1, messages_per_mailbox=700, seed=5, faults=FaultConfig(latency_ms=15, jitter_ms=5))
    cadence = {"journal": {"MAILPIPE_CHECKPOINT_ITEMS": "100000", "MAILPIPE_CHECKPOINT_SECONDS": "3600"},
               "checkpoints": {"MAILPIPE_JOURNAL_ITEMS": "0"}, "both_other_host": {}}[where]
    with SimProcess(cfg) as sim:
        upn = next(iter(sim.truth()["mailboxes"]))
        total = len(sim.truth()["mailboxes"][upn]["items"])
        repo_dir = tmp_path / "repo"
        env = {**os.environ, **cadence, "MAILPIPE_WORK_DIR": str(tmp_path / "work"),
               "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, repo_dir)}
        cmd = [sys.executable, "-m", "mailpipe", "backup", "t1", upn, "--json"]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            n = sum(sim.stats()["mime_downloads"].get(upn, {}).values())
            if n >= total * 0.5:
                break
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        t = make_tenant(sim, str(repo_dir), name="t1")
        repo = open_repository(t, create=False)
        uid = sim.truth()["mailboxes"][upn]["id"]
        checkpointed = {r["item_id"] for b in repo.iter_checkpoint_rows(uid) for r in b.to_pylist()}
        journaled = {i for part in (tmp_path / "work").rglob("journal-*.arrow")
                     for i in pa.ipc.open_file(pa.memory_map(str(part))).read_all().column("item_id").to_pylist()}
        assert repo.latest_snapshot(uid) is None  # nothing committed by the killed run
        if where == "journal":
            assert not checkpointed and len(journaled) >= 0.3 * total
        elif where == "checkpoints":
            assert not journaled and len(checkpointed) >= 0.3 * total
        else:
            assert len(checkpointed) >= 0.3 * total
            shutil.rmtree(tmp_path / "work")  # the restart runs where the killed run's work dir is not
            journaled = set()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        durable = checkpointed | journaled
        assert res["ok"] and res["items_total"] == total and res["items_reused"] >= len(durable)
        both = Counter(sim.stats()["mime_downloads"][upn])
        again = {i for i, n in both.items() if n > 1}
        assert not (again & durable), "an item made durable before the kill was downloaded again"
        assert len(again) <= (5 if where == "journal" else 30) + 6 + 2 * 64, len(again)
        assert snapshot_items(repo, uid) == truth_items(sim.truth(), upn)
        assert list(repo.iter_checkpoint_rows(uid)) == []  # cleaned up after the commit


def _heal_after(sim, kind: str, upn: str, times: int = 1) -> threading.Thread:
    """Clear the simulator's faults once ``kind`` was injected ``times`` for ``upn`` (a fault that heals)."""
    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sim.stats()["faults_injected"].get(upn, {}).get(kind, 0) >= times:
                sim.set_faults(FaultConfig())
                return
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_one_off_404_on_a_live_item_keeps_it_in_this_snapshot(sim_factory, tmp_path):
    """Exchange answers 404 for items that exist (replication lag, an item being moved). Such an item is
    confirmed with a metadata GET (it exists), tried again later in the same backup, and is in the snapshot."""
    sim = sim_factory(users=1, messages_per_mailbox=20)
    upn = mailbox_upns(sim)[0]
    live = sorted(sim.model.mailbox(upn).msgs)[2]
    sim.set_faults(FaultConfig(fail_values={live: 404}))
    watcher = _heal_after(sim, "fail_value", upn)
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r] = backup(t, [upn])
    watcher.join(5)
    assert sim.stats()["faults_injected"][upn]["fail_value"] >= 1
    assert r.ok and r.items_skipped == 0, r.skipped
    assert snapshot_items(open_repository(t), r.user_id) == truth_items(sim.truth(), upn)
    assert sim.stats()["requests"][upn].get("message", 0) >= 1  # the 404 was checked with a metadata GET


def test_a_404_lasting_the_whole_backup_is_skipped_pending_and_fetched_once_it_heals(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    upn = mailbox_upns(sim)[0]
    live = sorted(sim.model.mailbox(upn).msgs)[4]
    sim.set_faults(FaultConfig(fail_values={live: 404}))
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r] = backup(t, [upn])
    assert r.ok and r.items_skipped == 1 and r.skipped[0]["item_id"] == live and r.skipped[0]["pending"]
    assert "not-found" in r.skipped[0]["reason"] and "exists" in r.skipped[0]["reason"]
    assert downloads(sim)[upn][live] == 0 and sim.stats()["faults_injected"][upn]["fail_value"] == 4  # 1 + 3 passes
    got = snapshot_items(repo, r.user_id)
    assert live not in got and got == {k: v for k, v in truth_items(sim.truth(), upn).items() if k != live}
    rec = commit_record(repo, r.user_id)
    assert [p["item_id"] for p in rec["pending"]] == [live] and rec["skipped"][0]["item_id"] == live
    # healed: the delta does not mention the item again, but it is pending, so the next backup fetches it
    sim.set_faults(FaultConfig())
    [r2] = backup(t, [upn])
    assert r2.ok and r2.items_skipped == 0 and r2.items_new == 1
    assert snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)
    assert commit_record(repo, r2.user_id)["pending"] == []
    assert downloads(sim)[upn][live] == 1


def test_an_item_really_deleted_while_downloading_is_gone(sim_factory, tmp_path):
    """Deleted while its body is on the wire: the transfer breaks, the retry gets 404, a metadata GET
    confirms it (twice): the item leaves the snapshot, and it is not counted as skipped."""
    sim = sim_factory(users=1, messages_per_mailbox=20, mailbox_sizes={"tiny": 3},
                      faults=FaultConfig(p_slow_body=1.0, slow_body_ms=1500))
    upn = next(u for u in mailbox_upns(sim) if u.startswith("tiny@"))
    victim = sorted(sim.model.mailbox(upn).msgs)[1]

    def delete_mid_body() -> None:
        deadline = time.monotonic() + 30
        while sim.stats()["faults_injected"].get(upn, {}).get("slow_body", 0) < 3:  # all 3 bodies on the wire
            assert time.monotonic() < deadline
            time.sleep(0.005)
        sim.mutate(upn, [{"op": "delete", "ids": [victim]}])

    th = threading.Thread(target=delete_mid_body, daemon=True)
    th.start()
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r] = backup(t, [upn])
    th.join(5)
    assert sim.stats()["faults_injected"][upn].get("deleted_mid_body", 0) == 1
    assert r.ok and r.items_skipped == 0 and r.items_total == 2
    got = snapshot_items(open_repository(t), r.user_id)  # the slow bodies arrived whole (verified)
    assert victim not in got and got == truth_items(sim.truth(), upn)
