"""Verification where users look: the asset checks on each mailbox_backup/<tenant> asset (snapshot_structure after each
materialization, content_sample on a rotating slice), and the repository_maintenance job — with a real
Dagster instance (in-process runs, `dagster job execute`, a webserver answering the UI's queries), the real
engine and repository, and the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import Counter
from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest
import yaml

from mailpipe.repo import open_repository
from mailpipe.repo.check import check_repository, chunk_slice, day_slice
from mailpipe.sim import write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import backup
from mailpipe_tests.test_defs import (  # noqa: F401  (env: the fixture)
    BIN,
    BOTH_BACKENDS,
    ROOT,
    dagster_webserver,
    env,
    graphql,
    register_all,
    run_job,
)

KEY = dg.AssetKey(["mailbox_backup", "t1"])


# -- check_repository(sample=...) ------------------------------------------------------------------------

def referenced_chunks(repo) -> dict[str, set[str]]:
    """{chunk: the upns whose snapshots (any) reference it}, read from the manifests."""
    out: dict[str, set[str]] = {}
    for uid, upn in repo.list_mailboxes():
        for sid, info, _ in repo.scan_snapshots(uid):
            for b in repo.iter_manifest(uid, sid, columns=["chunks"]):
                for names in b.column("chunks").to_pylist():
                    for h in names:
                        out.setdefault(h, set()).add(upn)
    return out


def one_copy(repo, chunks: list[str]) -> str:
    """The first of ``chunks`` stored once: a chunk two backups stored at the same time has two copies, and a
    reader falls back to the good one (damage to one copy is not damage)."""
    from mailpipe_tests.damage import chunk_location

    chunk_location(repo, chunks[0])  # (flushes and syncs the index)
    return next(h for h in chunks if len(repo.index.locations(h)) == 1)


def test_sample_slices_read_every_chunk_exactly_once_and_find_damage_in_their_slice(sim_factory, tmp_path,
                                                                                     monkeypatch):
    from mailpipe_tests.damage import corrupt_chunk

    sim = sim_factory(users=2, messages_per_mailbox=25, seed=7)
    t = make_tenant(sim, str(tmp_path / "repo"))
    upns = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("nomailbox")][:2]
    backup(t, upns)
    for i, u in enumerate(upns):
        sim.mutate(u, random=8, seed=i)  # new mail, moves, deletions: the snapshots differ
    backup(t, upns)
    repo = open_repository(t, create=False)
    mailboxes = repo.list_mailboxes()
    refs = referenced_chunks(repo)
    assert len(refs) > 40 and all(len(repo.scan_snapshots(uid)) == 2 for uid, _ in mailboxes)
    full = check_repository(repo, mailboxes, read_data=True)
    assert full.ok and full.chunks_read == len(refs)

    read: Counter[str] = Counter()
    real = repo.verify_chunk

    def spy(h, *, item="item"):
        read[h] += 1
        return real(h, item=item)

    monkeypatch.setattr(repo, "verify_chunk", spy)
    n = 7
    per_slice = []
    for k in range(n):
        before = set(read)
        res = check_repository(repo, mailboxes, read_data=True, sample=(k, n))
        got = set(read) - before
        assert res.ok and res.sample == (k, n) and res.chunks_read == len(got)
        assert all(chunk_slice(h, n) == k for h in got)
        assert res.items == full.items and res.snapshots == full.snapshots  # manifests are still read whole
        per_slice.append(len(got))
    assert set(read) == set(refs) and set(read.values()) == {1}, "a chunk was read twice, or never"
    assert sum(per_slice) == full.chunks_read and all(per_slice)  # every slice holds some
    assert [day_slice(date(1970, 1, 1) + timedelta(days=d), 30) for d in (0, 29, 30, 31)] == [0, 29, 0, 1]
    assert {day_slice(date(2026, 11, 25) + timedelta(days=d), 30) for d in range(30)} == set(range(30))
    with pytest.raises(ValueError):
        check_repository(repo, mailboxes, sample=(7, 7))

    # damage in one slice is found by that slice only, on the mailboxes that use the chunk
    monkeypatch.undo()
    h = one_copy(repo, sorted(refs)[len(refs) // 2:])
    corrupt_chunk(repo, h, garbage=True)
    repo = open_repository(t, create=False)
    hit = chunk_slice(h, n)
    assert check_repository(repo, mailboxes, read_data=True, sample=((hit + 1) % n, n), mark_damaged=False).ok
    bad = check_repository(repo, mailboxes, read_data=True, sample=(hit, n), mark_damaged=False)
    assert not bad.ok and any(h in p for p in bad.problems)
    assert {u for u, mb in bad.by_mailbox.items() if not mb.ok} == refs[h]
    assert all(any(h in p for p in mb.problems) for mb in bad.by_mailbox.values() if not mb.ok)


def test_a_snapshot_forgotten_while_it_is_checked_is_not_damage(sim_factory, tmp_path, monkeypatch):
    """forget (maintenance) may delete a snapshot between the check's listing and its reading: that snapshot
    is counted as gone, not reported; the same failure on a snapshot that still exists is a problem."""
    from mailpipe.repo.repository import RepositoryError

    sim = sim_factory(users=1, messages_per_mailbox=10, seed=5)
    t = make_tenant(sim, str(tmp_path / "repo"))
    upn = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("nomailbox")][0]
    backup(t, [upn])
    backup(t, [upn])
    repo = open_repository(t, create=False)
    [(uid, _)] = repo.list_mailboxes()
    old_sid = repo.list_snapshots(uid)[0].snapshot_id
    real = repo.iter_manifest

    def reading(user_id, sid, **kw):
        if sid == old_sid:
            if forget_it:
                repo.delete_snapshot(user_id, sid)  # as forget does, while the check was about to read it
            raise RepositoryError(f"snapshot {sid}: manifest.parquet is missing")
        return real(user_id, sid, **kw)

    monkeypatch.setattr(repo, "iter_manifest", reading)
    forget_it = False
    res = check_repository(repo, [(uid, upn)])
    assert not res.ok and res.by_mailbox[upn].problem_count == 1 and "manifest.parquet is missing" in res.problems[0]
    forget_it = True
    res = check_repository(repo, [(uid, upn)])
    assert res.ok and res.snapshots_gone == 1 and res.by_mailbox[upn].snapshots == 2


# -- the checks in Dagster ---------------------------------------------------------------------------------

def evaluations(events, check: str) -> dict[str, dg.AssetCheckEvaluation]:
    """{partition: evaluation} of ``check`` among a run's events (the last one per partition)."""
    out = {}
    for e in events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = e.event_specific_data
            if ev.check_name == check:
                out[ev.partition] = ev
    return out


def run_events(inst, run_id: str):
    return [e.dagster_event for e in inst.all_logs(run_id) if e.dagster_event]


def md(ev) -> dict:
    return {k: v.value for k, v in ev.metadata.items()}


def repository(e):
    from mailpipe.config import find_tenant

    return open_repository(find_tenant("t1"), create=False, tmp_dir=str(e["tmp"] / "checks-tmp"))


def snapshot_file(repo, sid: str, name: str) -> str:
    [key] = [k for k in repo.store.list("mailboxes") if k.endswith(f"/snapshots/{sid}/{name}")]
    return key


CHECKS_QUERY = """query Checks($k: AssetKeyInput!) { assetNodes(assetKeys: [$k]) { assetChecksOrError {
    __typename ... on AssetChecks { checks { name partitionStatuses { __typename
      ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions executionFailedPartitions
                                                  skippedPartitions inProgressPartitions } } } } } } }"""
EXECUTIONS_QUERY = """query Executions($k: AssetKeyInput!, $c: String!, $p: String) {
  assetCheckExecutions(assetKey: $k, checkName: $c, partition: $p, limit: 1) { status partition
    evaluation { severity description metadataEntries { label
      ... on JsonMetadataEntry { jsonString } ... on TextMetadataEntry { text }
      ... on IntMetadataEntry { intValue } } } } }"""


@BOTH_BACKENDS
def test_checks_show_per_mailbox_pass_and_fail_with_their_problems(env, monkeypatch):
    """snapshot_structure runs per partition after each materialization and passes; a snapshot damaged
    before the next materialization reports it (ERROR, the problems in the metadata): a retried run that
    reports the committed snapshot again, and a backup whose new manifest is damaged as it is stored.
    content_sample reads only its slice: damage outside it passes, inside it fails the check and the run.
    The webserver answers the UI's queries with each mailbox's status and problems."""
    from mailpipe.defs.checks import SAMPLE_TAG
    from mailpipe.defs.partitions import RETRY_OF_TAG, KeyRange
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe_tests.damage import corrupt_chunk

    inst = env["instance"]
    keys = register_all(env)
    a, b, c = keys[0], keys[1], keys[2]
    first = run_job(env, KeyRange("t1", tuple(keys)).tags())
    assert first.success
    mats = {m.event_specific_data.materialization.partition: md(m.event_specific_data.materialization)
            for m in first.get_asset_materialization_events()}
    evs = evaluations(first.all_events, "snapshot_structure")
    assert set(evs) == set(keys)
    planned = [e.event_specific_data for e in run_events(inst, first.run_id)
               if e.event_type_value == "ASSET_CHECK_EVALUATION_PLANNED"]
    assert [p.check_name for p in planned] == ["snapshot_structure"]  # content_sample has its own job
    assert set(planned[0].partitions_subset.get_partition_keys()) == set(keys)  # one result per mailbox
    for k, ev in evs.items():
        assert ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
        assert md(ev)["snapshot_id"] == mats[k]["snapshot_id"] and md(ev)["problem_count"] == 0
        assert md(ev)["items"] == mats[k]["items_total"] and "problems" not in md(ev)

    # (1) a's latest manifest disappears; a retry of the run (through the entry-point job, which runs t1's
    # job for the range and hands it the retried run) reports the committed snapshots again
    repo = repository(env)
    key_a = snapshot_file(repo, mats[a]["snapshot_id"], "manifest.parquet")
    good_a = repo.store.get_bytes(key_a)
    repo.store.delete(key_a)
    cmd = [str(BIN / "dagster"), "job", "execute", "-m", "mailpipe.definitions", "-j", "mailbox_backup_job",
           "--tags", json.dumps({**KeyRange("t1", tuple(keys)).tags(), "dagster/root_run_id": first.run_id,
                                 "dagster/parent_run_id": first.run_id})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=env["tmp"])
    assert out.returncode == 0, out.stderr[-3000:]  # the check failing does not fail the backup
    [entry] = inst.get_run_records(dg.RunsFilter(tags={"dagster/root_run_id": first.run_id}))
    assert entry.dagster_run.job_name == "mailbox_backup_job"
    [retry] = inst.get_run_records(dg.RunsFilter(tags={RETRY_OF_TAG: first.run_id}))
    assert retry.dagster_run.job_name == "mailbox_backup_job__t1"
    evs = evaluations(run_events(inst, retry.dagster_run.run_id), "snapshot_structure")
    assert set(evs) == set(keys)
    assert not evs[a].passed and evs[a].severity == dg.AssetCheckSeverity.ERROR
    assert md(evs[a])["problem_count"] >= 1 and md(evs[a])["snapshot_id"] == mats[a]["snapshot_id"]
    assert any("manifest" in p for p in md(evs[a])["problems"]), md(evs[a])
    assert "manifest" in evs[a].description
    assert all(evs[k].passed for k in keys if k != a)
    repo.store.put_bytes(key_a, good_a)

    # (2) b's new manifest is damaged as it is stored (the backup itself succeeds)
    real_backup = MailpipeResource.backup
    saved = {}

    def backup_then_damage(self, tenant, upns, **kw):
        results = real_backup(self, tenant, upns, **kw)
        r = repository(env)
        for res in results:
            k = snapshot_file(r, res.snapshot_id, "manifest.parquet")
            saved[k] = data = r.store.get_bytes(k)
            r.store.put_bytes(k, data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
        return results

    monkeypatch.setattr(MailpipeResource, "backup", backup_then_damage)
    second = run_job(env, KeyRange("t1", (b,)).tags())
    monkeypatch.setattr(MailpipeResource, "backup", real_backup)
    assert second.success
    [ev] = evaluations(second.all_events, "snapshot_structure").values()
    assert ev.partition == b and not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
    assert any("manifest" in p for p in md(ev)["problems"]), md(ev)
    for k, data in saved.items():
        repo.store.put_bytes(k, data)

    # a run that backs a mailbox up with every check of the asset selected (as a UI backfill does): the
    # structure check runs; content_sample's step is skipped (it reads in its own job)
    from mailpipe.defs.assets import build_backup_asset
    from mailpipe.defs.checks import build_content_sample
    from mailpipe.defs.partitions import Shard

    d = keys[3]
    both = dg.materialize([build_backup_asset(Shard("t1")), build_content_sample(Shard("t1"))], partition_key=d,
                          instance=inst, resources={"mailpipe": MailpipeResource()})
    assert both.success and set(evaluations(both.all_events, "snapshot_structure")) == {d}
    assert evaluations(both.all_events, "content_sample") == {}
    steps = {e.step_key: e.event_type_value for e in both.all_events if e.step_key and e.is_step_event
             and e.event_type_value in ("STEP_SUCCESS", "STEP_SKIPPED", "STEP_FAILURE")}
    assert steps == {"mailbox_backup__t1": "STEP_SUCCESS", "mailbox_backup__t1_content_sample": "STEP_SKIPPED"}

    # (3) content_sample: a damaged chunk of c; a slice without it passes, the slice with it fails
    refs = referenced_chunks(repo)
    cu = c.split(":", 1)[1]
    h = one_copy(repo, sorted(x for x, users in refs.items() if cu in users))
    users = refs[h]
    corrupt_chunk(repo, h, garbage=True)
    n = 30
    job = env["defs"].resolve_job_def("content_sample_job__t1")  # the shard's own (the schedule's runs start it)
    other = job.execute_in_process(instance=inst, raise_on_error=False, tags={
        **KeyRange("t1", tuple(keys)).tags(), SAMPLE_TAG: f"{(chunk_slice(h, n) + 1) % n}/{n}"})
    assert other.success
    evs = evaluations(other.all_events, "content_sample")
    assert set(evs) == set(keys) and all(ev.passed for ev in evs.values())
    assert {md(ev)["sample"] for ev in evs.values()} == {f"{(chunk_slice(h, n) + 1) % n}/{n}"}
    hit = job.execute_in_process(instance=inst, raise_on_error=False, tags={
        **KeyRange("t1", tuple(keys)).tags(), SAMPLE_TAG: f"{chunk_slice(h, n)}/{n}"})
    assert not hit.success  # the alert: a failed run (not retried: dagster/max_retries=0)
    assert inst.get_run_by_id(hit.run_id).tags["dagster/max_retries"] == "0"
    failure = [e for e in hit.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert c in failure.event_specific_data.error.message
    evs = evaluations(hit.all_events, "content_sample")
    failed = {k for k, ev in evs.items() if not ev.passed}
    assert failed == {f"t1:{u}" for u in users} and c in failed
    for k in failed:
        assert evs[k].severity == dg.AssetCheckSeverity.ERROR and any(h in p for p in md(evs[k])["problems"])
    assert h in repository(env).load_damaged()  # marked: the next backup of c repairs it

    # what the UI shows: each check's status per mailbox, and a mailbox's latest result with its problems
    with dagster_webserver({}) as url:
        data = graphql(url, CHECKS_QUERY, {"k": {"path": ["mailbox_backup", "t1"]}})
        checks = {ch["name"]: ch["partitionStatuses"] for ch in data["assetNodes"][0]["assetChecksOrError"]["checks"]}
        assert set(checks) == {"snapshot_structure", "content_sample"}
        st = checks["snapshot_structure"]
        assert set(st["failedPartitions"]) == {a, b} and set(st["succeededPartitions"]) == set(keys) - {a, b}
        sample = checks["content_sample"]
        assert set(sample["failedPartitions"]) == failed
        assert set(sample["succeededPartitions"]) == set(keys) - failed
        [ex] = graphql(url, EXECUTIONS_QUERY, {"k": {"path": ["mailbox_backup", "t1"]}, "c": "snapshot_structure",
                                               "p": a})["assetCheckExecutions"]
        assert ex["status"] == "FAILED" and ex["partition"] == a and ex["evaluation"]["severity"] == "ERROR"
        entries = {m["label"]: m for m in ex["evaluation"]["metadataEntries"]}
        assert any("manifest" in p for p in json.loads(entries["problems"]["jsonString"]))
        [ex] = graphql(url, EXECUTIONS_QUERY, {"k": {"path": ["mailbox_backup", "t1"]}, "c": "content_sample",
                                               "p": c})["assetCheckExecutions"]
        assert ex["status"] == "FAILED" and ex["evaluation"]["severity"] == "ERROR"
        entries = {m["label"]: m for m in ex["evaluation"]["metadataEntries"]}
        assert any(h in p for p in json.loads(entries["problems"]["jsonString"]))
        assert entries["sample"]["text"] == f"{chunk_slice(h, n)}/{n}"


def test_sample_schedule_reads_todays_slice_one_run_per_tenant(env):
    """verify_content_sample: one content_sample_job run per tenant over all its mailboxes (its shards' sets),
    today's slice; the entry job runs each shard's check job for them, results on the shard's asset."""
    from mailpipe.defs import settings
    from mailpipe.defs.checks import SAMPLE_LIMIT_TAG, SAMPLE_TAG, sample_run_requests
    from mailpipe.defs.partitions import ROUTED_BY_TAG, Layout

    with dg.instance_for_test() as inst:
        lay = Layout({"alpha": 3, "beta": 1, "gamma": 1})
        alpha = sorted(f"alpha:user{i:03d}@alpha.example" for i in range(60))
        for k in alpha + ["alpha:late@alpha.example"]:
            inst.add_dynamic_partitions(lay.shard_of(k).partitions_name, [k])
        inst.add_dynamic_partitions("mailboxes__beta", ["beta:b@beta.example", "beta:a@beta.example"])
        when = datetime(2026, 11, 25, 8, tzinfo=timezone.utc)
        reqs = sample_run_requests(inst, lay, when, settings.SAMPLE_CHECK_DAYS)
    n = settings.SAMPLE_CHECK_DAYS
    k = (when.date() - date(1970, 1, 1)).days % n
    assert [r.tags["dagster/asset_partition_range_start"] for r in reqs] == ["alpha:late@alpha.example",
                                                                          "beta:a@beta.example"]
    assert [r.tags["dagster/asset_partition_range_end"] for r in reqs] == [alpha[-1], "beta:b@beta.example"]
    assert [r.tags["mailpipe/mailboxes"] for r in reqs] == ["61", "2"]  # gamma has none yet: no run
    assert [r.tags[SAMPLE_LIMIT_TAG] for r in reqs] == ["alpha", "beta"]
    assert all(r.tags[SAMPLE_TAG] == f"{k}/{n}" and "tenant" not in r.tags and r.job_name == "content_sample_job"
               for r in reqs)
    assert len({r.run_key for r in reqs}) == 2
    limits = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": SAMPLE_LIMIT_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits

    # the schedule's run, end to end on t1: the entry job routes to t1's check job
    inst = env["instance"]
    keys = register_all(env)
    assert run_job(env, {"dagster/asset_partition_range_start": keys[0],
                         "dagster/asset_partition_range_end": keys[-1]}).success
    sched = env["defs"].get_schedule_def("verify_content_sample")
    [req] = sched.evaluate_tick(dg.build_schedule_context(instance=inst, scheduled_execution_time=when)).run_requests
    entry = env["defs"].resolve_job_def("content_sample_job").execute_in_process(instance=inst, tags=req.tags,
                                                                                 raise_on_error=False)
    assert entry.success
    [child] = inst.get_run_records(dg.RunsFilter(tags={ROUTED_BY_TAG: entry.run_id}))
    assert child.dagster_run.job_name == "content_sample_job__t1" and child.dagster_run.tags[SAMPLE_TAG] == f"{k}/{n}"
    evs = evaluations(run_events(inst, child.dagster_run.run_id), "content_sample")
    assert set(evs) == set(keys) and all(ev.passed and ev.asset_key == KEY for ev in evs.values())


# -- repository_maintenance -----------------------------------------------------------------------------

class Figures:
    def __init__(self, name: str, ok: bool = True, **figures) -> None:
        self.name, self.ok, self.figures = name, ok, figures

    def summary(self) -> str:
        return f"{self.name}: " + ", ".join(f"{k} {v}" for k, v in self.figures.items())

    def to_dict(self) -> dict:
        return dict(self.figures)


@pytest.fixture
def two_tenants(tmp_path, monkeypatch):
    """A tenants file with tenants acme and globex (local repositories, created), as MAILPIPE_TENANTS."""
    path = tmp_path / "tenants.yaml"
    tenants = []
    for name in ("acme", "globex"):
        write_tenants_file(tmp_path / f"{name}.yaml", name, "https://127.0.0.1:1", tmp_path / f"repo-{name}")
        tenants += yaml.safe_load((tmp_path / f"{name}.yaml").read_text())["tenants"]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    monkeypatch.setenv("MAILPIPE_TENANTS", str(path))
    from mailpipe.config import find_tenant

    for name in ("acme", "globex"):
        open_repository(find_tenant(name), create=True)
    return path


def fake_engine(monkeypatch, calls: list, forget_ok: bool = True) -> None:
    """forget and prune (mailpipe.repo.forget / .prune) replaced by fakes that record their calls."""
    def forget(repo, tenant_cfg, user=None, *, dry_run=False, erase=False, now=None, lease_seconds=300.0):
        calls.append(("forget", repo.tenant, tenant_cfg.name, dry_run))
        return Figures("forget", ok=forget_ok, mailboxes=3, forgotten=5, kept=12, busy=[])

    def prune(repo, *, dry_run=False, now=None, safety_seconds=3600.0, clock_margin=None, lease_seconds=600.0,
              progress=None):
        calls.append(("prune", repo.tenant, dry_run, safety_seconds))
        return Figures("prune", packs_deleted=2, bytes_freed=123456, planned=7)

    monkeypatch.setitem(sys.modules, "mailpipe.repo.forget", types.SimpleNamespace(forget=forget))
    monkeypatch.setitem(sys.modules, "mailpipe.repo.prune", types.SimpleNamespace(prune=prune))


def maintenance_run(tenant: str, tags: dict, dry_run: bool = False):
    from mailpipe.defs.maintenance import repository_maintenance
    from mailpipe.defs.resources import MailpipeResource

    with dg.instance_for_test() as inst:
        return repository_maintenance.execute_in_process(
            run_config={"ops": {"maintain_repository": {"config": {"tenant": tenant, "dry_run": dry_run}}}},
            instance=inst, tags=tags, resources={"mailpipe": MailpipeResource()}, raise_on_error=False)


def output_metadata(result) -> dict:
    [out] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in out.event_specific_data.metadata.items()}


def test_maintenance_job_forgets_then_prunes_and_shows_their_figures(two_tenants, monkeypatch):
    calls: list = []
    fake_engine(monkeypatch, calls)
    res = maintenance_run("globex", {"maintenance": "globex"})
    assert res.success
    assert calls == [("forget", "globex", "globex", False), ("prune", "globex", False, 3600.0)]
    m = output_metadata(res)
    assert m["forget"] == {"mailboxes": 3, "forgotten": 5, "kept": 12, "busy": []}
    assert m["prune"] == {"packs_deleted": 2, "bytes_freed": 123456, "planned": 7}
    assert m["forget_forgotten"] == 5 and m["prune_bytes_freed"] == 123456  # plotted per run
    assert m["forget_summary"].startswith("forget: ") and m["prune_summary"].startswith("prune: ")
    calls.clear()
    assert maintenance_run("acme", {"maintenance": "acme"}, dry_run=True).success
    assert calls == [("forget", "acme", "acme", True), ("prune", "acme", True, 3600.0)]  # MAILPIPE_PRUNE_SAFETY

    # without its tag (the per-tenant limit would not count it): refused before anything is touched
    calls.clear()
    res = maintenance_run("acme", {})
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert not res.success and calls == [] and "maintenance=acme" in failure.event_specific_data.error.message
    res = maintenance_run("nope", {"maintenance": "nope"})
    assert not res.success and calls == []
    # forget did not complete: prune still runs, the run fails with both results' figures
    calls.clear()
    fake_engine(monkeypatch, calls, forget_ok=False)
    res = maintenance_run("acme", {"maintenance": "acme"})
    assert not res.success and [c[0] for c in calls] == ["forget", "prune"]
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "forget: forget: mailboxes 3" in failure.event_specific_data.error.message
    assert failure.event_specific_data.user_failure_data.metadata["forget"].value["forgotten"] == 5


def test_maintenance_schedule_one_run_per_tenant_tagged_and_limited(two_tenants):
    from mailpipe.defs.maintenance import maintain_all_repositories
    from mailpipe.defs.resources import MailpipeResource

    with dg.instance_for_test() as inst:
        ctx = dg.build_schedule_context(instance=inst, resources={"mailpipe": MailpipeResource()},
                                        scheduled_execution_time=datetime(2026, 11, 29, 4, tzinfo=timezone.utc))
        reqs = list(maintain_all_repositories(ctx))
    assert [r.tags for r in reqs] == [{"maintenance": "acme"}, {"maintenance": "globex"}]
    assert [r.run_config["ops"]["maintain_repository"]["config"]["tenant"] for r in reqs] == ["acme", "globex"]
    assert all(r.job_name == "repository_maintenance" for r in reqs) and len({r.run_key for r in reqs}) == 2
    limits = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "maintenance", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    from mailpipe.defs import settings

    assert maintain_all_repositories.cron_schedule == settings.MAINTENANCE_CRON == "0 4 * * 0"  # weekly


def test_maintenance_end_to_end_with_the_real_forget_and_prune(sim_factory, tmp_path, monkeypatch):
    """The job on a real repository: three snapshots, a policy keeping the last one, forget then prune."""
    pytest.importorskip("mailpipe.repo.forget")
    pytest.importorskip("mailpipe.repo.prune")
    sim = sim_factory(users=1, messages_per_mailbox=15, seed=3)
    tfile = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo",
                               retention={"keep": {"last": 1}})
    monkeypatch.setenv("MAILPIPE_TENANTS", tfile)
    from mailpipe.config import find_tenant

    t = find_tenant("t1")
    upn = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("nomailbox")][0]
    for _ in range(3):
        backup(t, [upn])
    res = maintenance_run("t1", {"maintenance": "t1"})
    assert res.success
    m = output_metadata(res)
    assert m["forget"]["forgotten"] == 2 and m["forget"]["deleted"] == 2 and m["forget"]["kept"] == 1
    assert m["prune"]["mailboxes"] == 1 and m["prune"]["snapshots"] == 1  # prune ran after forget
    assert m["forget_deleted"] == 2 and m["forget_summary"].startswith("forget: ") and "prune" in m["prune_summary"]
    repo = open_repository(t, create=False)
    [(uid, _)] = repo.list_mailboxes()
    assert len(repo.list_snapshots(uid)) == 1
    assert check_repository(repo, repo.list_mailboxes(), read_data=True).ok
