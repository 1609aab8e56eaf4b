"""Trust: nothing lost, nothing leaked, nothing hangs — under the faults real tenants and hostile servers
produce (the simulator's fault modes, and a hostile reverse proxy with an attacker host beside it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mailpipe.backup import discover_mailboxes
from mailpipe.config import Limits
from mailpipe.graph import GraphError, GraphTenant, RetryPolicy
from mailpipe.repo import open_repository
from mailpipe.repo.check import check_repository
from mailpipe.settings import Settings
from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, start_simulator, write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.damage import corrupt_chunk, delete_chunk
from mailpipe_tests.helpers import (
    TEST_SETTINGS,
    backup,
    commit_record,
    downloads,
    mailbox_upns,
    snapshot_items,
    truth_items,
)
from mailpipe_tests.hostile import hostile_factory  # noqa: F401  (fixture)

SECRET = "S3cr3t-MUST-NOT-LEAK-9f8e7d"


def user_mailboxes(sim):
    return [u for u in mailbox_upns(sim) if not u.startswith("shared-")]


def manifest_key(repo, user_id, snapshot_id="latest"):
    sid = repo.read_snapshot(user_id, snapshot_id).snapshot_id
    return f"{repo._snap_prefix(user_id)}/{sid}/manifest.parquet"


def zero_bytes_in_column(path: str, column: str, n: int = 64) -> None:
    """Overwrite ``n`` bytes in the middle of ``column``'s first data page (a column that a check reading
    only some columns never decodes)."""
    md = pq.ParquetFile(path).metadata
    col = next(md.row_group(0).column(i) for i in range(md.num_columns)
               if md.row_group(0).column(i).path_in_schema == column)
    start = col.data_page_offset + col.total_compressed_size // 2 - n // 2
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * n)


# -- 2. a damaged manifest -------------------------------------------------------------------------------------
def test_check_reads_every_column_and_reports_unreadable_commit_records(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r1] = backup(t, [upn])
    sim.mutate(upn, random=5, seed=1)
    [r2] = backup(t, [upn])
    repo = open_repository(t)
    assert check_repository(repo, repo.list_mailboxes(), read_data=True).ok
    zero_bytes_in_column(repo.store.local_path(manifest_key(repo, r2.user_id)), "subject")
    res = check_repository(repo, repo.list_mailboxes())  # without --read-data too
    assert not res.ok and any(r2.snapshot_id in p and "manifest.parquet" in p for p in res.problems), res.problems
    # an unparsable commit record is a problem of that snapshot, not an exception
    key = f"{repo._snap_prefix(r1.user_id)}/{r1.snapshot_id}/snapshot.json"
    repo.store.put_bytes(key, b'{"snapshot_id": "trunc')
    res = check_repository(repo, repo.list_mailboxes(), read_data=True)
    assert any(r1.snapshot_id in p and "unreadable" in p for p in res.problems), res.problems
    assert res.snapshots == 2


def test_check_validates_values_of_every_column(tmp_path):
    from mailpipe_tests.test_repo import USER, tenant

    repo = open_repository(tenant(str(tmp_path / "repo")))
    st = repo.put_content(b"Subject: x\r\n\r\nbody\r\n")
    w = repo.begin_snapshot(USER, "u@example.com")
    w.add_items([
        {"item_id": "ok", "folder_id": "F", "size": st.size, "sha256": st.sha256, "chunks": st.chunks},
        {"item_id": "bad-hash", "folder_id": "F", "size": st.size, "sha256": "not-a-hash", "chunks": st.chunks},
        {"item_id": "bad-size", "folder_id": "F", "size": -5, "sha256": st.sha256, "chunks": st.chunks},
        {"item_id": "bad-first", "folder_id": "F", "size": st.size, "sha256": st.sha256, "chunks": st.chunks,
         "first_snapshot_id": "yesterday"},
        {"item_id": "ok", "folder_id": "F", "size": st.size, "sha256": st.sha256, "chunks": st.chunks},
    ])
    w.set_folders([{"folder_id": "F", "parent_id": None, "display_name": "Inbox", "path": ["Inbox"]}])
    w.commit(delta_links={}, stats={}, skipped=[])
    res = check_repository(repo, repo.list_mailboxes())
    text = "\n".join(res.problems)
    assert res.problem_count == 4, text
    assert "bad-hash: sha256" in text and "bad-size: size -5" in text and "bad-first: first_snapshot_id" in text
    assert "item ok: listed twice" in text


def test_a_backup_whose_base_snapshot_is_damaged_falls_back_says_so_and_commits(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [upn])
    sim.mutate(upn, [{"op": "new_mail", "count": 3, "folder": "inbox"}])
    [r2] = backup(t, [upn])
    zero_bytes_in_column(repo.store.local_path(manifest_key(repo, r2.user_id)), "subject")
    out = sim.mutate(upn, [{"op": "new_mail", "count": 2, "folder": "inbox"}])
    before = downloads(sim)[upn]
    [r3] = backup(t, [upn])
    assert r3.ok, r3.error
    assert any(r2.snapshot_id in w and r1.snapshot_id in w for w in r3.warnings), r3.warnings
    assert snapshot_items(repo, r3.user_id) == truth_items(sim.truth(), upn)
    # what the damaged snapshot stored is salvaged (its content columns still read): only new mail downloaded
    fetched = set(downloads(sim)[upn] - before)
    assert fetched == set(out["applied"][0]), fetched
    base = commit_record(repo, r3.user_id)["base"]
    assert base["snapshot_id"] == r1.snapshot_id and [u["snapshot_id"] for u in base["unreadable"]] == [r2.snapshot_id]
    # no readable snapshot at all: a full rescan that downloads only what the repository lacks
    for sid in (r1.snapshot_id, r3.snapshot_id):
        repo.store.put_bytes(f"{repo._snap_prefix(r1.user_id)}/{sid}/snapshot.json", b"\0" * 40)
    before = downloads(sim)[upn]
    [r4] = backup(t, [upn])
    assert r4.ok and any("no readable snapshot" in w for w in r4.warnings), r4.warnings
    assert snapshot_items(repo, r4.user_id) == truth_items(sim.truth(), upn)
    assert sum((downloads(sim)[upn] - before).values()) == 0


# -- 3. self-heal of missing and corrupt chunks ------------------------------------------------------------------
def _damage(repo, user_id):
    """Delete the only chunk of one item and corrupt the chunk of another: (deleted item, corrupted item)."""
    rows = [r for b in repo.iter_manifest(user_id, "latest") for r in b.to_pylist() if len(r["chunks"]) == 1]
    a, b = rows[0], rows[1]
    delete_chunk(repo, a["chunks"][0])
    corrupt_chunk(repo, b["chunks"][0], at=100)
    return a["item_id"], b["item_id"]


def test_a_backup_repairs_deleted_and_corrupted_chunks(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [upn])
    deleted, corrupted = _damage(repo, r1.user_id)
    assert not check_repository(open_repository(t), repo.list_mailboxes(), read_data=True, mark_damaged=False).ok
    [r2] = backup(t, [upn])  # reads back what it carries forward (all of it: a small mailbox)
    assert r2.ok and r2.items_repaired == 2 and r2.chunks_verified >= r1.items_total
    assert downloads(sim)[upn][deleted] == 2 and downloads(sim)[upn][corrupted] == 2
    res = check_repository(open_repository(t), repo.list_mailboxes(), read_data=True)
    assert res.ok, res.problems  # both snapshots: the rewritten chunks heal the first one too
    assert list(repo.store.list("damaged")) == []


def test_check_marks_damage_and_the_next_backup_repairs_it(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40)
    upn = user_mailboxes(sim)[0]
    tfile = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo")
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [upn])
    deleted, corrupted = _damage(repo, r1.user_id)
    out = subprocess.run([sys.executable, "-m", "mailpipe", "check", "t1", "--read-data"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MAILPIPE_TENANTS": tfile})
    assert out.returncode == 3 and deleted in out.stdout and corrupted in out.stdout
    assert "next backup" in out.stderr and upn in out.stderr
    assert len(list(repo.store.list("damaged"))) == 2
    no_readback = TEST_SETTINGS.replace(verify_min_chunks=0, verify_cycle=0)
    [r2] = backup(t, [upn], settings=no_readback)
    assert r2.ok and r2.items_repaired == 2 and r2.chunks_verified == 0
    assert check_repository(open_repository(t), repo.list_mailboxes(), read_data=True).ok


# -- 4. HTML error pages and empty bodies ------------------------------------------------------------------------
def test_html_pages_and_empty_bodies_are_never_stored_as_mail(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    upn = user_mailboxes(sim)[0]
    html, empty = sorted(sim.model.mailbox(upn).msgs)[:2]
    sim.set_faults(FaultConfig(bad_values={html: "html", empty: "empty"}))
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r] = backup(t, [upn])
    assert r.ok and r.items_skipped == 2
    reasons = {s["item_id"]: s["reason"] for s in r.skipped}
    assert "HTML page" in reasons[html] and "empty body" in reasons[empty]
    assert all(s["pending"] for s in r.skipped)
    assert snapshot_items(repo, r.user_id) == {k: v for k, v in truth_items(sim.truth(), upn).items()
                                               if k not in (html, empty)}
    sim.set_faults(FaultConfig())
    [r2] = backup(t, [upn])
    assert r2.ok and r2.items_skipped == 0 and snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)


def test_a_one_off_html_page_is_retried_within_the_backup(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=40, faults=FaultConfig(p_html_value=0.1, p_empty_value=0.05))
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r] = backup(t, [upn])
    injected = sim.stats()["faults_injected"][upn]
    assert injected.get("html_value", 0) + injected.get("empty_value", 0) > 0
    assert r.ok and snapshot_items(open_repository(t), r.user_id) == truth_items(sim.truth(), upn), r.skipped


# -- 5. the bearer token follows no link ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["foreign_next_link", "foreign_delta_link"])
def test_delta_links_to_another_host_are_refused_and_nothing_is_committed(sim_factory, hostile_factory, tmp_path,
                                                                           mode):
    sim = sim_factory(users=1, messages_per_mailbox=30, limits=LimitConfig(max_page_size=5))
    proxy = hostile_factory(sim, mode)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url)
    [r] = backup(t, [upn])
    assert not r.ok and r.error_kind == "unsafe-link" and f"127.0.0.1:{proxy.attacker.base_url.rsplit(':', 1)[1]}" in r.error
    assert proxy.attacker.requests == []  # no request, so no token, ever reached the other host
    assert open_repository(t).latest_snapshot(r.user_id) is None


def test_discovery_refuses_a_users_link_to_another_host(sim_factory, hostile_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=5)
    proxy = hostile_factory(sim, "foreign_users_link")
    t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url)
    with pytest.raises(GraphError) as e:
        asyncio.run(discover_mailboxes(t, TEST_SETTINGS))
    assert e.value.kind == "unsafe-link" and proxy.attacker.requests == []


@pytest.mark.parametrize("mode", ["redirect_value", "redirect_value_same_origin"])
def test_redirects_are_never_followed(sim_factory, hostile_factory, tmp_path, mode):
    sim = sim_factory(users=1, messages_per_mailbox=10)
    proxy = hostile_factory(sim, mode)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url)
    [r] = backup(t, [upn])
    assert not r.ok and r.error_kind == "unsafe-link" and "302" in r.error, r.error
    assert proxy.attacker.requests == [] and proxy.requests["value"] >= 1
    assert not any("redirected=1" in s for s in proxy.seen)  # not even a same-origin redirect is followed
    repo = open_repository(t)
    assert repo.latest_snapshot(r.user_id) is None and list(repo.iter_chunk_names()) == []


def test_saved_links_are_relative_and_a_poisoned_saved_link_never_reaches_its_host(sim_factory, hostile_factory,
                                                                                   tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, "pass")
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [upn])
    rec = commit_record(repo, r1.user_id)
    assert rec["delta_links"] and not any("://" in v for v in rec["delta_links"].values())
    # a repository written by an older mailpipe that followed a hostile server: absolute links elsewhere
    rec["delta_links"] = {f: f"{proxy.attacker.graph_url}/{v}" for f, v in rec["delta_links"].items()}
    repo.store.put_bytes(f"{repo._snap_prefix(r1.user_id)}/{r1.snapshot_id}/snapshot.json", json.dumps(rec).encode())
    sim.mutate(upn, [{"op": "new_mail", "count": 2, "folder": "inbox"}])
    [r2] = backup(t, [upn])
    assert r2.ok and r2.items_new == 2 and proxy.attacker.requests == []  # rebased onto graph_url
    assert snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)


# -- 6. working state is private, and leftovers are cleaned ---------------------------------------------------------
def test_a_killed_backup_leaves_state_only_in_its_private_work_dir_and_the_next_one_cleans_up(tmp_path):
    from mailpipe.sim import SimProcess

    cfg = SimConfig(users=1, messages_per_mailbox=300, seed=5, faults=FaultConfig(latency_ms=20))
    with SimProcess(cfg) as sim:
        upn = next(iter(sim.truth()["mailboxes"]))
        uid = sim.truth()["mailboxes"][upn]["id"]
        work, repo_dir = tmp_path / "work", tmp_path / "repo"
        env = {**os.environ, "MAILPIPE_WORK_DIR": str(work), "TMPDIR": str(tmp_path / "tmp"),
               "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, repo_dir)}
        (tmp_path / "tmp").mkdir()
        cmd = [sys.executable, "-m", "mailpipe", "backup", "t1", upn]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(sim.stats()["mime_downloads"].get(upn, {}).values()) < 50:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        mailbox_work = work / "t1" / uid
        assert (mailbox_work / "state.sqlite").exists()
        for d in (work, work / "t1", mailbox_work):
            assert d.stat().st_mode & 0o777 == 0o700, d
        assert os.listdir(tmp_path / "tmp") == []  # nothing with subjects or senders in the system temp dir
        # what dead backups leave in the repository: an uncommitted snapshot, an old temporary file
        t = make_tenant(sim, str(repo_dir), name="t1")
        repo = open_repository(t)
        orphan = repo_dir / "mailboxes" / uid / "snapshots" / "20260101T000000.000000Z-abcdef"
        orphan.mkdir(parents=True)
        (orphan / "manifest.parquet").write_bytes(b"PAR1")
        stale = repo_dir / ".tmp" / "tmp-dead"
        stale.parent.mkdir(exist_ok=True)
        stale.write_bytes(b"partial")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert not mailbox_work.exists() and not orphan.exists() and not stale.exists()
        assert os.listdir(tmp_path / "tmp") == []
        assert list(repo.store.list(f"mailboxes/{uid}/checkpoints")) == []


# -- 7. nothing hangs ----------------------------------------------------------------------------------------
SHORT = TEST_SETTINGS.replace(graph_retry_attempts=2, graph_retry_base_delay=0.01, graph_slow_body_grace=1.0)


@pytest.mark.parametrize("mode,needle", [("loop_next_link", "paging loop"),
                                         ("endless_distinct_pages", "pages, more than"),
                                         ("self_parent_folder", "appears twice")])
def test_endless_listings_and_folder_cycles_fail_the_mailbox_clearly(sim_factory, hostile_factory, tmp_path,
                                                                    mode, needle):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    proxy = hostile_factory(sim, mode)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url)
    t0 = time.monotonic()
    [r] = backup(t, [upn], settings=SHORT)
    assert not r.ok and r.error_kind == "protocol" and needle in r.error, r.error
    assert time.monotonic() - t0 < 60
    if mode == "loop_next_link":
        assert proxy.requests["delta"] <= 2 * (1 + 21)  # two folders at a time, each cut after 20 stalls


def test_an_endless_users_listing_fails_discovery_clearly(sim_factory, hostile_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=5)
    proxy = hostile_factory(sim, "loop_users_link")
    t = make_tenant(sim, str(tmp_path / "repo"), graph_url=proxy.graph_url)
    with pytest.raises(GraphError, match="paging loop") as e:
        asyncio.run(discover_mailboxes(t, SHORT))
    assert e.value.kind == "protocol" and proxy.requests["users"] <= 25


def test_a_trickling_body_fails_its_mailbox_and_the_others_finish(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=15)
    slow, fine = user_mailboxes(sim)[:2]
    victim = sorted(sim.model.mailbox(slow).msgs)[0]
    sim.set_faults(FaultConfig(trickle_values=[victim], trickle_interval_s=0.5))
    t = make_tenant(sim, str(tmp_path / "repo"))
    t0 = time.monotonic()
    results = {r.upn: r for r in backup(t, [slow, fine], settings=SHORT)}
    assert time.monotonic() - t0 < 30
    assert not results[slow].ok and results[slow].error_kind == "transient"
    assert "slower than 4096 bytes/s" in results[slow].error and victim in results[slow].error
    assert results[fine].ok


def test_a_mailbox_deadline_fails_that_mailbox_and_keeps_its_work(sim_factory, tmp_path):
    sim = sim_factory(users=2, messages_per_mailbox=40)
    slow, fine = user_mailboxes(sim)[:2]
    t = make_tenant(sim, str(tmp_path / "repo"), limits=Limits(concurrent_requests_per_mailbox=1))
    sim.set_faults(FaultConfig(fail_users={}, latency_ms=0))
    # the slow mailbox: one request at a time, 100 ms each; a 1.5 s deadline cannot cover it
    sim.set_faults(FaultConfig(latency_ms=100))
    results = {r.upn: r for r in backup(t, [slow], settings=TEST_SETTINGS.replace(mailbox_deadline=1.5,
                                                                                  checkpoint_seconds=0.2))}
    r = results[slow]
    assert not r.ok and r.error_kind == "deadline" and "MAILPIPE_MAILBOX_DEADLINE" in r.error
    fetched = sum(downloads(sim)[slow].values())
    assert fetched >= 3
    sim.set_faults(FaultConfig())
    [again] = backup(t, [slow])
    assert again.ok and again.items_reused >= fetched - 2  # what the failed attempt stored was kept


# -- 8. a changed graph_url, and links Graph no longer accepts --------------------------------------------------
@pytest.mark.parametrize("status", [410, 400, 404])
def test_saved_links_survive_a_new_graph_url_and_refused_links_resync(tmp_path, status):
    state = tmp_path / "sim-state"
    cfg = SimConfig(users=1, messages_per_mailbox=30, seed=3, state_dir=str(state))
    sim = start_simulator(cfg)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    [r1] = backup(t, [upn])
    sim.stop()  # the demo's simulator stops after 15 idle minutes and comes back on another port
    sim = start_simulator(SimConfig(users=1, messages_per_mailbox=30, seed=3, state_dir=str(state)))
    try:
        t = make_tenant(sim, str(tmp_path / "repo"))
        sim.mutate(upn, [{"op": "new_mail", "count": 2, "folder": "inbox"}])
        [r2] = backup(t, [upn])
        assert r2.ok and r2.items_new == 2 and r2.items_reused == 0
        assert sim.stats()["requests"][upn]["delta"] == len(sim.truth()["mailboxes"][upn]["folders"])  # incremental
        repo = open_repository(t)
        assert snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)
        # Graph no longer accepts the saved links, answering 410, 400 or 404: each folder is listed again
        sim.set_faults(FaultConfig(expired_token_status=status))
        sim.expire_delta_tokens(upn)
        sim.mutate(upn, [{"op": "delete", "ids": [sorted(sim.model.mailbox(upn).msgs)[0]]}])
        before = downloads(sim)[upn]
        [r3] = backup(t, [upn])
        assert r3.ok and r3.items_removed == 1, r3.error
        assert snapshot_items(repo, r3.user_id) == truth_items(sim.truth(), upn)
        assert downloads(sim)[upn] == before  # listed again, nothing downloaded again
    finally:
        sim.stop()


def test_the_embedded_simulator_restarting_on_a_new_port_does_not_break_backups(tmp_path, monkeypatch):
    """`make demo` an hour apart: the demo tenant's simulator exits when idle and comes back elsewhere."""
    from mailpipe.config import demo_tenant
    from mailpipe.sim.embedded import resolve

    monkeypatch.setenv("MAILPIPE_HOME", str(tmp_path / "home"))
    t = demo_tenant()
    upn = "adele.vance@demo.example.com"
    [r1] = backup(resolve(t), [upn])
    assert r1.ok, r1.error
    server = json.loads(Path(t.simulator["state_dir"], "server.json").read_text())
    os.kill(server["pid"], signal.SIGTERM)  # what its idle timeout does
    deadline = time.monotonic() + 30
    while Path(t.simulator["state_dir"], "server.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [r2] = backup(resolve(t), [upn])  # what `mailpipe backup` and the Dagster resource do at each start
    assert r2.ok, r2.error
    new = json.loads(Path(t.simulator["state_dir"], "server.json").read_text())
    assert new["graph_url"] != server["graph_url"] and r2.items_new == 0 and r2.bytes_fetched == 0
    os.kill(new["pid"], signal.SIGTERM)


# -- 9. a delta entry without an id ------------------------------------------------------------------------------
def test_delta_items_without_an_id_are_skipped_with_a_reason_and_read_again_next_time(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=60, faults=FaultConfig(p_item_without_id=0.1))
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r] = backup(t, [upn])
    n = sim.stats()["faults_injected"][upn]["item_without_id"]
    assert r.ok and n > 0 and r.items_skipped == n
    assert all(s["item_id"] is None and "without an id" in s["reason"] and not s["pending"] for s in r.skipped)
    assert len(snapshot_items(repo, r.user_id)) == len(truth_items(sim.truth(), upn)) - n
    sim.set_faults(FaultConfig())
    [r2] = backup(t, [upn])  # those folders were listed again: the items are back
    assert r2.ok and snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)


# -- 10. one backup of a mailbox at a time -------------------------------------------------------------------------
def test_two_cli_backups_of_one_mailbox_one_runs_the_other_says_why(tmp_path):
    from mailpipe.sim import SimProcess

    # slow enough (200 items, 50 ms each, 4 at a time: ~3 s) that the second starts while the first runs
    with SimProcess(SimConfig(users=1, messages_per_mailbox=200, seed=8, faults=FaultConfig(latency_ms=50))) as sim:
        upn = next(iter(sim.truth()["mailboxes"]))
        env = {**os.environ, "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url,
                                                                    tmp_path / "repo")}
        cmd = [sys.executable, "-m", "mailpipe", "backup", "t1", upn]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not sim.stats()["mime_downloads"].get(upn):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "another backup of this mailbox is running" in second.stdout
        assert f"pid {first.pid}" in second.stdout
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert max(sim.stats()["mime_downloads"][upn].values()) == 1  # the work was done once


def test_concurrent_backups_that_wait_for_the_lease_do_the_work_once(sim_factory, tmp_path):
    """What two Dagster runs of one partition do: the second waits for the first's lease, then reports the
    snapshot the first committed (the partition ends MATERIALIZED, nothing is fetched twice)."""
    from mailpipe.backup import backup_mailboxes

    sim = sim_factory(users=1, messages_per_mailbox=60, faults=FaultConfig(latency_ms=10))
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    s = TEST_SETTINGS.replace(lease_seconds=3)

    async def both():
        return await asyncio.gather(*(backup_mailboxes(t, [upn], settings=s, wait_for_lease=True) for _ in range(2)))

    [[a], [b]] = asyncio.run(both())
    assert a.ok and b.ok and a.snapshot_id == b.snapshot_id
    assert sorted([a.already_committed, b.already_committed]) == [False, True]
    assert max(sim.stats()["mime_downloads"][upn].values()) == 1
    assert len(open_repository(t).snapshot_ids(a.user_id)) == 1


def test_a_base_snapshot_whose_manifest_is_missing_is_skipped_too(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=20)
    upn = user_mailboxes(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    repo = open_repository(t)
    [r1] = backup(t, [upn])
    [r2] = backup(t, [upn])
    repo.store.delete(manifest_key(repo, r2.user_id))  # a lifecycle rule, a hand that slipped
    [r3] = backup(t, [upn])
    assert r3.ok and any(r2.snapshot_id in w and "missing" in w for w in r3.warnings), r3.warnings
    assert snapshot_items(repo, r3.user_id) == truth_items(sim.truth(), upn)
