"""The Dagster layer with a real Dagster instance, the real engine and the simulator over real sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from mailpipe.sim import FaultConfig, write_tenants_file

ROOT = Path(__file__).resolve().parents[1]
# on SQLite and on a real PostgreSQL (conftest): the tests whose instance does most (runs, events, partition
# statuses, the daemon and webserver); the others on SQLite only, to keep the suite's time
BOTH_BACKENDS = pytest.mark.backends("sqlite", "postgres")
KEY = dg.AssetKey(["mailbox_backup", "t1"])  # tenant t1's asset (one shard)


def use_storage(home: Path, storage: dict | None) -> None:
    """The home's dagster.yaml with ``storage`` (the conftest's Postgres database) in place of SQLite."""
    if storage:
        import yaml

        (home / "dagster.yaml").write_text(yaml.safe_dump(
            {**yaml.safe_load((ROOT / "dagster.yaml").read_text()), "storage": storage}))


@pytest.fixture
def env(tmp_path, monkeypatch, sim_factory, dagster_storage):
    """A simulated tenant 't1', a tenants file naming it, and a Dagster home with the project's dagster.yaml
    (SQLite under the home; with Postgres, its `storage:` naming a fresh database: see conftest)."""
    sim = sim_factory(users=3, messages_per_mailbox=30, seed=21)
    tfile = write_tenants_file(tmp_path / "tenants.yaml", "t1", sim.graph_url, tmp_path / "repo")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    use_storage(home, dagster_storage)
    vars_ = {"MAILPIPE_TENANTS": str(tfile), "DAGSTER_HOME": str(home), "MAILPIPE_GRAPH_RETRY_ATTEMPTS": "3",
             "MAILPIPE_GRAPH_RETRY_BASE_DELAY": "0.01", "MAILPIPE_HOME": str(tmp_path / "mp")}
    for k, v in vars_.items():
        monkeypatch.setenv(k, v)
    instance = dg.DagsterInstance.from_config(str(home))
    from mailpipe.definitions import defs as _  # noqa: F401  (loads with this env)
    from mailpipe.defs import build_definitions

    yield {"sim": sim, "home": home, "instance": instance, "defs": build_definitions(), "env": vars_,
           "tmp": tmp_path}
    instance.dispose()


def layout():
    from mailpipe.defs import current_layout

    return current_layout()


def register_all(e) -> list[str]:
    """Discover the tenant's mailboxes and register them (shard sets and routing index), as the sensor does."""
    from mailpipe.defs.discovery import discover_all, register
    from mailpipe.defs.resources import MailpipeResource

    reps = discover_all(MailpipeResource(), e["instance"])
    register(e["instance"], reps)
    return [k for r in reps for k in r.new_keys]


def statuses(e, keys):
    """{key: status value or None}, each read on its shard's asset."""
    by_shard: dict = {}
    for k in keys:
        by_shard.setdefault(layout().shard_of(k), []).append(k)
    out = {}
    for shard, ks in by_shard.items():
        st = e["instance"].get_status_by_partition(shard.asset_key, ks, shard.partitions_def) or {}  # None: no run
        out.update({k: (st[k].value if st.get(k) else None) for k in ks})
    return {k: out[k] for k in keys}


def run_job(e, tags):
    """Run the backup job of the shard of the tags' key(s) in process (as the schedule and sensors launch it)."""
    key = tags.get("dagster/partition") or tags["dagster/asset_partition_range_start"]
    job = e["defs"].resolve_job_def(layout().shard_of(key).backup_job_name)
    return job.execute_in_process(instance=e["instance"], tags=tags, raise_on_error=False)


def test_definitions_load_fast_and_bad_tenants_file_is_clear(tmp_path):
    code = "import sys; from mailpipe.definitions import defs; print('msgraph' in sys.modules, 'boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "MAILPIPE_TENANTS"})
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr
    bad = tmp_path / "t.yaml"
    bad.write_text("tenants:\n  - name: acme\n    tenant_id: nope\n    client_id: 66666666-7777-8888-9999-000000000000\n"
                   "    auth: {managed_identity: true}\n    storage: /tmp/x\n")
    out = subprocess.run([sys.executable, "-c", "import mailpipe.definitions"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "MAILPIPE_TENANTS": str(bad)})
    assert out.returncode != 0 and "tenant 'acme': field 'tenant_id'" in out.stderr


def test_instance_config_ships_in_the_wheel_and_is_what_ensure_dagster_home_writes(tmp_path):
    """mailpipe/defs/dagster.yaml is the one instance config: the repository's dagster.yaml is that file,
    it is in the wheel, and an installed mailpipe writes exactly it into .mailpipe/dagster_home."""
    import zipfile

    packaged = ROOT / "mailpipe" / "defs" / "dagster.yaml"
    assert (ROOT / "dagster.yaml").read_bytes() == packaged.read_bytes()
    assert (ROOT / "dagster.yaml").resolve() == packaged.resolve()  # a link, not a copy that can drift

    # A wheel, built as `pip install .` builds one (in an isolated environment: the venv's setuptools may
    # be older than the pyproject's requirement; this needs the index `make setup` used), from a copy of
    # the working tree so that no build/ or *.egg-info is left in it or read from it.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", ".mailpipe", "__pycache__", ".pytest_cache", "out"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No matching distribution found for setuptools" in out.stdout + out.stderr:
        pytest.skip("no package index offers the build backend (setuptools>=77) here")
    assert out.returncode == 0, out.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("mailpipe-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("mailpipe/defs/dagster.yaml") == packaged.read_bytes()
        z.extractall(tmp_path / "installed")  # what installing a pure-Python wheel amounts to

    # the installed package (not the checkout) writes the packaged yaml, and leaves an existing one alone
    code = ("import os, mailpipe.defs.cli as c; assert c.__file__.startswith(os.environ['TARGET']), c.__file__; "
            "print(c.ensure_dagster_home())")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env.update(PYTHONPATH=str(tmp_path / "installed"), TARGET=str(tmp_path / "installed"),
               MAILPIPE_HOME=str(tmp_path / "mp"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    written = Path(out.stdout.strip()) / "dagster.yaml"
    assert written == tmp_path / "mp" / "dagster_home" / "dagster.yaml"
    assert written.read_bytes() == packaged.read_bytes()
    written.write_text("# mine\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and written.read_text() == "# mine\n", out.stderr[-2000:]


@BOTH_BACKENDS
def test_discovery_sensor_adds_sorted_keys_and_reports_vanished(env):
    from mailpipe.defs.discovery import discover_all
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe.defs.sensors import discover_mailboxes

    inst = env["instance"]
    ctx = dg.build_sensor_context(instance=inst, resources={"mailpipe": MailpipeResource()})
    res = discover_mailboxes(ctx)
    [req, routing] = res.dynamic_partitions_requests  # the tenant's set, then the routing index
    assert req.partitions_def_name == "mailboxes__t1" and routing.partitions_def_name == "mailboxes"
    keys = list(req.partition_keys)
    assert keys == sorted(keys) and len(keys) == 4 and all(k.startswith("t1:") for k in keys)
    assert not any("nomailbox" in k for k in keys) and list(routing.partition_keys) == keys
    inst.add_dynamic_partitions("mailboxes__t1", keys + ["t1:left@company.example"])
    again = discover_mailboxes(dg.build_sensor_context(instance=inst, resources={"mailpipe": MailpipeResource()}))
    assert not again.dynamic_partitions_requests
    [rep] = discover_all(MailpipeResource(), inst)
    assert rep.vanished == ["t1:left@company.example"] and rep.known == 4
    assert "t1:left@company.example" in inst.get_dynamic_partitions("mailboxes__t1")  # never deleted
    out = subprocess.run([sys.executable, "-m", "mailpipe", "discover", "t1"], capture_output=True, text=True,
                         timeout=120, env={**os.environ})
    assert out.returncode == 0 and "0 new, 4 known, 1 vanished" in out.stdout


def run_as_if_launched(inst, status: dg.DagsterRunStatus, tags: dict[str, str],
                       job_name: str = "mailbox_backup_job__t1") -> dg.DagsterRun:
    """A run of t1's backup job in ``status``, with the code-location origin a run launched through the
    daemon has (queued runs need one). No public API makes such a run outside a workspace: this uses
    Dagster's test helper and origin classes; the daemon tests below use real ones."""
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test

    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("mailpipe"), "__repository__"),
                             job_name)
    return create_run_for_test(inst, job_name=job_name, status=status, tags=tags,
                               remote_job_origin=origin)


@BOTH_BACKENDS
def test_batched_run_fails_one_mailbox_and_retry_sensor_recovers_it_reusing_stored_work(env):
    from mailpipe.defs.partitions import KeyRange
    from mailpipe.defs.sensors import plan_retries

    retry_failed_mailboxes = env["defs"].get_sensor_def("retry_failed_mailboxes")
    sim, inst = env["sim"], env["instance"]
    keys = register_all(env)
    victim = keys[1]
    upn = victim.split(":", 1)[1]
    mbox = sim.model.mailbox(upn)
    bad_item = sorted(mbox.msgs)[len(mbox.msgs) // 2]
    sim.set_faults(FaultConfig(fail_messages={bad_item: 503}))  # a transient error that never heals (yet)
    result = run_job(env, KeyRange("t1", tuple(keys)).tags())
    assert not result.success
    st = statuses(env, keys)
    assert st[victim] == "FAILED" and all(st[k] == "MATERIALIZED" for k in keys if k != victim)
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert victim in failure.event_specific_data.error.message
    first = Counter(sim.stats()["mime_downloads"].get(upn, {}))
    assert first, "the failed attempt stored part of the mailbox"

    # the sensor: the first tick only schedules the retry (backoff); nothing runs while the key is busy
    ctx = dg.build_sensor_context(instance=inst, cursor=None)
    tick = retry_failed_mailboxes(ctx)
    assert not tick.run_requests and victim in json.loads(tick.cursor)
    busy = run_as_if_launched(inst, dg.DagsterRunStatus.QUEUED, {"dagster/asset_partition_range_start": keys[0],
                                                                  "dagster/asset_partition_range_end": keys[2]})
    reqs, _, _ = plan_retries(inst, {}, time.time(), max_attempts=3, backoff_s=0, per_tick=10, batch_size=25)
    assert reqs == []  # a queued range run covers the victim
    inst.delete_run(busy.run_id)
    # run retries are enabled (dagster.yaml), so Dagster marks the failed run for an automatic retry; but
    # an in-process run (like `dagster job execute` and `mailpipe demo`) has no code-location origin and
    # Dagster's retry daemon cannot re-launch it: the sensor does not wait for that retry
    failed_run = inst.get_run_by_id(result.run_id)
    assert failed_run.tags.get("dagster/will_retry") == "true" and failed_run.remote_job_origin is None
    reqs, cur, _ = plan_retries(inst, {}, time.time(), max_attempts=3, backoff_s=0, per_tick=10, batch_size=25)
    assert len(reqs) == 1 and reqs[0].tags["dagster/partition"] == victim and reqs[0].tags["tenant"] == "t1"
    exhausted, _, notes = plan_retries(inst, {victim: {"attempts": 3, "next_at": 0}}, time.time(), max_attempts=3,
                                       backoff_s=0, per_tick=10, batch_size=25)
    assert exhausted == [] and "giving up" in notes[0]

    sim.set_faults(FaultConfig())  # the fault is gone: the retry succeeds
    retry = run_job(env, reqs[0].tags)
    assert retry.success and statuses(env, [victim])[victim] == "MATERIALIZED"
    [mat] = retry.get_asset_materialization_events()
    md = {k: v.value for k, v in mat.event_specific_data.materialization.metadata.items()}
    assert md["items_reused"] >= len(first) * 0.5 and md["items_total"] == len(sim.model.mailbox(upn).msgs)
    both = Counter(sim.stats()["mime_downloads"][upn])
    assert max(both.values()) == 1, "an item stored by the failed attempt was downloaded again"
    # next tick: recovered, the cursor forgets it
    tick2 = retry_failed_mailboxes(dg.build_sensor_context(instance=inst, cursor=json.dumps(cur)))
    assert reqs[0].job_name == "mailbox_backup_job__t1"
    assert json.loads(tick2.cursor) == {}


@BOTH_BACKENDS
def test_retry_sensor_waits_only_for_a_run_retry_that_can_happen(env):
    """A failed run with a code-location origin (launched by the daemon, a backfill, the UI) is left to
    Dagster's run retry: until the retry run appears, for at most MAILPIPE_RUN_RETRY_GRACE after it
    failed; then the retry run's own status counts. Without an origin, nothing is waited for."""
    from mailpipe.defs.partitions import KeyRange
    from mailpipe.defs.sensors import plan_retries

    sim, inst = env["sim"], env["instance"]
    keys = register_all(env)
    victim = keys[0]
    sim.set_faults(FaultConfig(fail_users={victim.split(":", 1)[1]: 403}))
    assert not run_job(env, KeyRange("t1", (victim,)).tags()).success  # in-process: no origin
    assert statuses(env, [victim])[victim] == "FAILED"

    grace = 100
    plan = lambda now: plan_retries(inst, {}, now, max_attempts=3, backoff_s=0, per_tick=10,  # noqa: E731
                                    batch_size=25, run_retry_grace_s=grace)[0]
    assert len(plan(time.time())) == 1  # nothing to wait for

    # the same mailbox failed again, in a run the daemon launched
    tags = KeyRange("t1", tuple(keys[:2])).tags()
    run = run_as_if_launched(inst, dg.DagsterRunStatus.STARTED, tags)
    inst.report_run_failed(run)
    rec = inst.get_run_record_by_id(run.run_id)
    assert rec.dagster_run.tags.get("dagster/will_retry") == "true" and rec.end_time is not None
    assert plan(rec.end_time + 1) == []  # Dagster's retry is pending
    assert plan(rec.end_time + grace - 1) == []
    [late] = plan(rec.end_time + grace + 1)  # it never came: the sensor retries
    assert late.tags["dagster/partition"] == victim

    # the retry appears: then its own status counts, not its parent's
    child = run_as_if_launched(inst, dg.DagsterRunStatus.NOT_STARTED, {**tags, "dagster/parent_run_id": run.run_id})
    assert plan(rec.end_time + grace + 1) == []  # created by the retry daemon, about to be submitted
    inst.report_run_failed(child)
    inst.add_run_tags(child.run_id, {"dagster/will_retry": "false"})  # Dagster's retries are exhausted
    assert len(plan(rec.end_time + 1)) == 1  # the parent's retry happened: nothing left to wait for


@BOTH_BACKENDS
def test_retried_run_skips_mailboxes_committed_by_the_first_attempt(env):
    from mailpipe.defs.partitions import KeyRange

    sim = env["sim"]
    keys = register_all(env)
    victim = keys[0]
    sim.set_faults(FaultConfig(fail_users={victim.split(":", 1)[1]: 403}))
    first = run_job(env, KeyRange("t1", tuple(keys)).tags())
    assert not first.success
    sim.set_faults(FaultConfig())
    sim.reset_stats()
    retry = run_job(env, {**KeyRange("t1", tuple(keys)).tags(), "dagster/parent_run_id": first.run_id,
                          "dagster/root_run_id": first.run_id})
    assert retry.success
    mats = {m.event_specific_data.materialization.partition: m.event_specific_data.materialization
            for m in retry.get_asset_materialization_events()}
    assert set(mats) == set(keys)
    for k in keys:
        assert mats[k].metadata["already_committed"].value is (k != victim)
    st = sim.stats()
    assert sum(st["requests"].get(k.split(":", 1)[1], {}).get("delta", 0) for k in keys if k != victim) == 0


@pytest.fixture
def fleet(tmp_path, monkeypatch, sim_factory, dagster_storage):
    """Two tenants on one simulator: 'small' (one asset) and 'big-one' (shards: 3, three assets), a tenants
    file naming both, and a Dagster home with the project's dagster.yaml; every mailbox registered."""
    import yaml

    sim = sim_factory(users=6, messages_per_mailbox=4, seed=5)
    tenants = []
    for name, extra in (("small", {}), ("big-one", {"shards": 3})):
        f = write_tenants_file(tmp_path / f"{name}.yaml", name, sim.graph_url, tmp_path / f"repo-{name}", **extra)
        tenants += yaml.safe_load(open(f))["tenants"]
    tfile = tmp_path / "tenants.yaml"
    tfile.write_text(yaml.safe_dump({"tenants": tenants}))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    use_storage(home, dagster_storage)
    for k, v in {"MAILPIPE_TENANTS": str(tfile), "DAGSTER_HOME": str(home), "MAILPIPE_HOME": str(tmp_path / "mp"),
                 "MAILPIPE_GRAPH_RETRY_ATTEMPTS": "3", "MAILPIPE_GRAPH_RETRY_BASE_DELAY": "0.01"}.items():
        monkeypatch.setenv(k, v)
    instance = dg.DagsterInstance.from_config(str(home))
    from mailpipe.defs import build_definitions

    e = {"sim": sim, "home": home, "instance": instance, "defs": build_definitions(), "tmp": tmp_path}
    e["keys"] = register_all(e)
    yield e
    instance.dispose()


def statuses_by_asset(e) -> dict[str, dict[str, str]]:
    """{asset path: {key: status}} of every asset of the layout, for every registered key of every set."""
    out = {}
    for shard in layout().shards:
        keys = e["instance"].get_dynamic_partitions(shard.partitions_name)
        st = e["instance"].get_status_by_partition(shard.asset_key, keys, shard.partitions_def) or {}
        out[shard.asset_key.to_user_string()] = {k: (st[k].value if st.get(k) else None) for k in keys}
    return out


def cli(e, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=300, env={**os.environ}, cwd=cwd or e["tmp"])


@BOTH_BACKENDS
def test_launch_contracts_route_to_the_mailboxs_own_asset(fleet):
    """The three ways users launch a backup by key keep working for every tenant, sharded or not: the
    mailbox's status lands on the asset of its shard, and only there; the runs say what they cover."""
    from mailpipe.defs.partitions import MAILBOXES_TAG, RANGE_TAG, ROUTED_BY_TAG, shard_index

    e, inst = fleet, fleet["instance"]
    big = sorted(k for k in e["keys"] if k.startswith("big-one:"))
    small = sorted(k for k in e["keys"] if k.startswith("small:"))
    assert len(big) >= 6 and small
    # every set holds its shard's keys, sorted (so a block of them is one range run)
    sets = {s.partitions_name: inst.get_dynamic_partitions(s.partitions_name) for s in layout().shards}
    assert set(sets) == {"mailboxes__small", "mailboxes__big-one__s00of03", "mailboxes__big-one__s01of03",
                         "mailboxes__big-one__s02of03"}
    for name, keys in sets.items():
        assert keys == sorted(keys) and all(layout().shard_of(k).partitions_name == name for k in keys)
    assert {shard_index(k.split(":", 1)[1], 3) for k in big} == {0, 1, 2}  # the test spans every shard
    assert sorted(inst.get_dynamic_partitions("mailboxes")) == sorted(e["keys"])  # the routing index

    # 1. dagster job execute, one key of the sharded tenant
    one = big[2]
    out = cli(e, "dagster", "job", "execute", "-m", "mailpipe.definitions", "-j", "mailbox_backup_job",
              "--tags", json.dumps({"dagster/partition": one}))
    assert out.returncode == 0, out.stderr[-3000:]
    st = statuses_by_asset(e)
    home = layout().shard_of(one).asset_key.to_user_string()
    assert st[home][one] == "MATERIALIZED"
    assert [(a, k) for a, ks in st.items() for k, v in ks.items() if v] == [(home, one)]

    # 2. the range tags: every key of the tenant from start to end (sorted), over all three shards
    out = cli(e, "dagster", "job", "execute", "-m", "mailpipe.definitions", "-j", "mailbox_backup_job", "--tags",
              json.dumps({"dagster/asset_partition_range_start": big[0], "dagster/asset_partition_range_end": big[-2]}))
    assert out.returncode == 0, out.stderr[-3000:]
    st = statuses_by_asset(e)
    done = {k for ks in st.values() for k, v in ks.items() if v == "MATERIALIZED"}
    assert done == set(big[:-1])
    entry = [r for r in inst.get_run_records(dg.RunsFilter(job_name="mailbox_backup_job"))
             if "dagster/asset_partition_range_start" in r.dagster_run.tags]
    [entry] = entry
    assert entry.dagster_run.tags[MAILBOXES_TAG] == str(len(big) - 1)
    assert entry.dagster_run.tags[RANGE_TAG] == f"{big[0]} … {big[-2]}"
    shard_runs = inst.get_run_records(dg.RunsFilter(tags={ROUTED_BY_TAG: entry.dagster_run.run_id}))
    assert sorted(r.dagster_run.job_name for r in shard_runs) == [
        f"mailbox_backup_job__big_one__s{i:02d}of03" for i in range(3)]
    assert sum(int(r.dagster_run.tags[MAILBOXES_TAG]) for r in shard_runs) == len(big) - 1
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS and r.dagster_run.tags["tenant"] == "big-one"
               for r in shard_runs)

    # 3. dg launch --partition, for the other tenant
    out = cli(e, "dg", "launch", "--job", "mailbox_backup_job", "--partition", small[0], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert statuses_by_asset(e)["mailbox_backup/small"][small[0]] == "MATERIALIZED"
    # ... which checks the key first: an unknown one starts no run
    n = len(inst.get_run_records())
    out = cli(e, "dg", "launch", "--job", "mailbox_backup_job", "--partition", "small:nobody@x.example", cwd=ROOT)
    assert out.returncode != 0 and "small:nobody@x.example" in out.stderr + out.stdout
    assert len(inst.get_run_records()) == n


def test_shards_are_stable_and_sets_stay_under_the_limit():
    """A mailbox's shard is a pure function of its UPN and the tenant's shard count (the same on every
    machine, whatever the order of discovery); at 1M mailboxes in 12 shards every set stays under 100k."""
    from mailpipe.defs.partitions import MAX_KEYS_PER_SET, Layout, Shard, shard_index

    # fixed values: changing the hash would move every mailbox of a sharded tenant to another asset
    assert [shard_index(u, 16) for u in ("adele.vance@contoso.com", "ADELE.VANCE@contoso.com", "b@c", "x" * 60)] \
        == [shard_index("adele.vance@contoso.com", 16)] * 2 + [shard_index("b@c", 16), shard_index("x" * 60, 16)]
    assert (shard_index("adele.vance@contoso.com", 16), shard_index("b@c", 16), shard_index("b@c", 3)) == (9, 1, 0)
    assert shard_index("anything", 1) == 0
    lay = Layout({"contoso": 12, "fab-rikam": 1})
    assert lay.shard_of("contoso:adele.vance@contoso.com") == Shard("contoso", shard_index("adele.vance@contoso.com", 12), 12)
    assert lay.shard_of("nope:x@y") is None
    assert lay.shard_of("fab-rikam:x@y").asset_key == dg.AssetKey(["mailbox_backup", "fab-rikam"])
    assert Shard("fab-rikam", 3, 12).backup_job_name == "mailbox_backup_job__fab_rikam__s03of12"
    counts: Counter = Counter()
    for i in range(1_000_000):
        counts[shard_index(f"user{i:07d}@contoso.com", 12)] += 1
    assert len(counts) == 12 and max(counts.values()) < MAX_KEYS_PER_SET, counts
    assert max(counts.values()) - min(counts.values()) < 2_000  # an even spread


def test_discovery_refuses_to_overfill_a_set(fleet, monkeypatch):
    """A set that would pass the limit gets nothing, and the report says to give the tenant more shards."""
    from mailpipe.defs import discovery
    from mailpipe.defs.discovery import discover_all
    from mailpipe.defs.resources import MailpipeResource

    inst = fleet["instance"]
    small = inst.get_dynamic_partitions("mailboxes__small")
    for k in small:  # as if never registered
        inst.delete_dynamic_partition("mailboxes__small", k)
    monkeypatch.setattr(discovery, "MAX_KEYS_PER_SET", len(small) - 1)
    reps = {r.tenant: r for r in discover_all(MailpipeResource(), inst)}
    assert reps["small"].error and f"more than {len(small) - 1}" in reps["small"].error
    assert "shards" in reps["small"].error and not reps["small"].new_keys and not reps["small"].new_by_set
    assert reps["big-one"].error is None  # the other tenant is not held up
    monkeypatch.setattr(discovery, "MAX_KEYS_PER_SET", len(small))
    [rep] = discover_all(MailpipeResource(), inst, "small")
    assert rep.error is None and rep.new_keys == sorted(small)


def test_retry_sensor_orders_failed_keys_by_position_and_batches_contiguous_blocks():
    """Failed keys are taken in registration order (a key→position map, not sorted text, not list.index),
    cut into range runs over contiguous blocks of the shard's set, at most per_tick mailboxes a tick."""
    from mailpipe.defs.partitions import KeyCache, KeyIndex, Layout, Shard
    from mailpipe.defs.sensors import plan_retries

    shard = Shard("t1")
    # registered in two discovery batches: the second sorts before the first
    first = [f"t1:m{i:04d}@x" for i in range(300)]
    second = [f"t1:a{i:04d}@x" for i in range(100)]
    keys = first + second
    failing = set(keys[10:20] + keys[50:51] + keys[295:310])  # one block spans the two batches

    @dg.asset(key=shard.asset_key, partitions_def=shard.partitions_def,
              backfill_policy=dg.BackfillPolicy.multi_run(1000), output_required=False)
    def fake(context):
        for k in context.partition_keys:
            if k not in failing:
                yield dg.AssetMaterialization(asset_key=context.asset_key, partition=k)
        if failing & set(context.partition_keys):
            raise dg.Failure("some failed")

    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(shard.partitions_name, first)
        inst.add_dynamic_partitions(shard.partitions_name, second)
        job = dg.Definitions(assets=[fake], jobs=[dg.define_asset_job("j", [fake], partitions_def=shard.partitions_def)]
                             ).resolve_job_def("j")
        job.execute_in_process(instance=inst, raise_on_error=False, tags={
            "dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
        lay = Layout({"t1": 1})
        reqs, cur, _ = plan_retries(inst, {}, 1000.0, max_attempts=3, backoff_s=0, per_tick=20, batch_size=8,
                                    layout=lay)
        cache = KeyCache(inst, lay)
        got = [cache.keys_of_run(r.job_name, r.tags) for r in reqs]
        order = KeyIndex(keys)
        want = order.sort(failing)[:20]  # registration order: m0010.., m0050, m0295..m0299, a0000..
        assert [k for g in got for k in g] == want
        assert [len(g) for g in got] == [8, 2, 1, 8, 1]  # blocks of contiguous positions, at most 8
        assert got[3] == keys[295:303]  # across the two batches: contiguous in the set, not in sorted text
        assert all(r.job_name == "mailbox_backup_job__t1" and r.tags["tenant"] == "t1" for r in reqs)
        assert set(cur) == failing and all(cur[k]["attempts"] == 1 for k in want)
        assert all(cur[k]["attempts"] == 0 for k in failing - set(want))  # the next ticks' share


def test_migrating_an_instance_from_the_single_set_layout(env):
    """An instance of the pre-fleet layout (every key in `mailboxes`, the asset `mailbox_backup` on it, with
    its history): `mailpipe migrate-partitions` registers every key in its shard's set (sorted; vanished
    mailboxes too; unknown tenants left alone), the old history stays readable, and the new layout runs."""
    from mailpipe.defs.partitions import LEGACY_ASSET_KEY, routing_partitions
    from mailpipe.defs.sensors import plan_retries

    inst = env["instance"]
    from mailpipe.defs.discovery import discover_all
    from mailpipe.defs.resources import MailpipeResource

    [rep] = discover_all(MailpipeResource(), inst)
    keys = rep.new_keys
    old = keys[2:] + keys[:2] + ["t1:left@company.example", "gone:x@gone.example"]  # two discovery batches
    inst.add_dynamic_partitions("mailboxes", old)

    @dg.asset(name="mailbox_backup", partitions_def=routing_partitions)  # what the old release defined
    def legacy(context):
        if context.partition_key == keys[1]:
            raise dg.Failure("failed then")
        return dg.MaterializeResult(metadata={"snapshot_id": "20261101T020000Z-abcd"})

    assert dg.materialize([legacy], partition_key=keys[0], instance=inst).success
    assert not dg.materialize([legacy], partition_key=keys[1], instance=inst, raise_on_error=False).success

    out = cli(env, "mailpipe", "migrate-partitions", "--dry-run")
    assert out.returncode == 0 and "mailboxes__t1: 5 to register, 0 already there" in out.stdout, out.stderr
    assert inst.get_dynamic_partitions("mailboxes__t1") == []
    out = cli(env, "mailpipe", "migrate-partitions")
    assert out.returncode == 0, out.stderr
    assert "mailboxes__t1: 5 registered" in out.stdout and "tenant gone: 1 key(s)" in out.stdout
    assert "mailbox_backup keeps its history" in out.stdout
    assert inst.get_dynamic_partitions("mailboxes__t1") == sorted(keys + ["t1:left@company.example"])
    assert "0 registered, 5 already there" in cli(env, "mailpipe", "migrate-partitions").stdout  # idempotent

    # the old history, as before: statuses and materializations of mailbox_backup on `mailboxes`
    st = inst.get_status_by_partition(LEGACY_ASSET_KEY, keys[:2], routing_partitions)
    assert st == {keys[0]: dg.AssetPartitionStatus.MATERIALIZED, keys[1]: dg.AssetPartitionStatus.FAILED}
    [rec] = inst.fetch_materializations(dg.AssetRecordsFilter(asset_key=LEGACY_ASSET_KEY,
                                                              asset_partitions=[keys[0]]), limit=1).records
    assert rec.asset_materialization.metadata["snapshot_id"].value == "20261101T020000Z-abcd"
    assert inst.get_dynamic_partitions("mailboxes") == old  # the routing index is the old set, untouched

    # the new layout: nothing new to discover, the old failure is not retried (the new asset's own statuses
    # count; the next scheduled backup covers every mailbox), a backup lands on the new asset
    [rep] = discover_all(MailpipeResource(), inst)
    assert rep.new_keys == [] and rep.known == len(keys) and rep.vanished == ["t1:left@company.example"]
    assert plan_retries(inst, {}, time.time(), max_attempts=3, backoff_s=0, per_tick=10, batch_size=25)[0] == []
    res = run_job(env, {"dagster/partition": keys[1]})  # launched without the readable tags, as by hand
    assert res.success and statuses(env, keys[:2]) == {keys[0]: None, keys[1]: "MATERIALIZED"}
    tags = inst.get_run_by_id(res.run_id).tags  # the asset added them when the run started
    assert tags["mailpipe/mailboxes"] == "1" and tags["mailpipe/range"] == keys[1]


def test_registration_is_split_into_requests_sqlite_accepts():
    """One add of 300,000 keys fails on SQLite (too many SQL variables): discovery's requests carry at most
    ADD_CHUNK keys each, in order, for the shard sets and the routing index."""
    from mailpipe.defs.discovery import ADD_CHUNK, TenantDiscovery, registration_requests

    keys = [f"big:u{i:06d}@x" for i in range(2 * ADD_CHUNK + 1)]
    rep = TenantDiscovery("big", new_keys=keys, new_by_set={"mailboxes__big": keys})
    reqs = registration_requests([rep])
    assert [(r.partitions_def_name, len(r.partition_keys)) for r in reqs] == [
        ("mailboxes__big", ADD_CHUNK), ("mailboxes__big", ADD_CHUNK), ("mailboxes__big", 1),
        ("mailboxes", ADD_CHUNK), ("mailboxes", ADD_CHUNK), ("mailboxes", 1)]
    assert [k for r in reqs[:3] for k in r.partition_keys] == keys and ADD_CHUNK <= 100_000


@BOTH_BACKENDS
def test_schedule_sweeps_every_mailbox_in_runs_over_several_ticks_with_a_cursor(fleet):
    """backup_all_mailboxes: at the cron time a sweep begins; each tick launches at most N runs (none while N
    of the sweep's are still queued), each over a contiguous block of one shard; the cursor carries the
    position from tick to tick; every registered mailbox is covered once; the next cron time starts over."""
    from mailpipe.defs.partitions import KeyCache
    from mailpipe.defs.schedules import SWEEP_TAG, plan_sweep

    inst = fleet["instance"]
    extra = sorted(f"small:user{i:03d}@small.example" for i in range(45))
    inst.add_dynamic_partitions("mailboxes__small", extra)
    everything = {k for s in layout().shards for k in inst.get_dynamic_partitions(s.partitions_name)}
    t0 = datetime(2026, 11, 25, 2, 0, 30, tzinfo=timezone.utc).timestamp()
    # a new sensor starts nothing before the next cron time (as a schedule would)
    none, cursor, notes = plan_sweep(inst, layout(), {}, t0 - 3600, cron="0 2 * * *", batch_size=10, runs_per_tick=2)
    assert none == [] and "next cron time" in notes[0]
    assert plan_sweep(inst, layout(), cursor, t0 - 60, cron="0 2 * * *", batch_size=10, runs_per_tick=2)[0] == []
    covered: list[str] = []
    ticks = 0
    cache = KeyCache(inst, layout())
    while True:
        reqs, cursor, notes = plan_sweep(inst, layout(), json.loads(json.dumps(cursor)), t0 + ticks * 30,
                                         cron="0 2 * * *", batch_size=10, runs_per_tick=2)
        ticks += 1
        assert len(reqs) <= 2 and cursor["sweep"] == "2026-11-25T02:00:00+00:00"
        for r in reqs:
            keys = cache.keys_of_run(r.job_name, r.tags)
            assert 1 <= len(keys) <= 10 and int(r.tags["mailpipe/mailboxes"]) == len(keys)
            assert {layout().shard_of(k).backup_job_name for k in keys} == {r.job_name}
            assert r.tags[SWEEP_TAG] == cursor["sweep"] and r.tags["tenant"] == keys[0].split(":")[0]
            covered += keys
        if cursor.get("finished"):
            break
        assert reqs and ticks < 100
    assert sorted(covered) == sorted(everything) and len(covered) == len(everything)  # each once
    runs = sum(-(-len(inst.get_dynamic_partitions(s.partitions_name)) // 10) for s in layout().shards)
    assert ticks == -(-runs // 2)  # 2 runs a tick, every tick until the last
    # finished: nothing more until the next cron time, which starts a new sweep from the start
    again, cursor2, _ = plan_sweep(inst, layout(), cursor, t0 + 3600, cron="0 2 * * *", batch_size=10,
                                   runs_per_tick=2)
    assert again == [] and cursor2["finished"]
    nxt, cursor3, _ = plan_sweep(inst, layout(), cursor, t0 + 86400, cron="0 2 * * *", batch_size=10,
                                 runs_per_tick=2)
    assert len(nxt) == 2 and cursor3["sweep"] == "2026-11-26T02:00:00+00:00" and not cursor3.get("finished")
    # back-pressure: two runs of the sweep still queued, nothing added
    for r in nxt:
        run_as_if_launched(inst, dg.DagsterRunStatus.QUEUED, r.tags, r.job_name)
    held, cursor4, notes = plan_sweep(inst, layout(), cursor3, t0 + 86400 + 30, cron="0 2 * * *", batch_size=10,
                                      runs_per_tick=2)
    assert held == [] and cursor4["pos"] == cursor3["pos"] and "still queued" in notes[-1]
    # and the sensor itself (the definitions' tick) keeps its cursor
    sensor = fleet["defs"].get_sensor_def("backup_all_mailboxes")
    res = sensor(dg.build_sensor_context(instance=inst, cursor=None))
    assert json.loads(res.cursor)["sweep"] and (res.run_requests or res.skip_reason)


# ---------------------------------------------------------------------------------------------------------
# With a real daemon: the retry sensor, Dagster's run retries and run monitoring, as they run in production

BIN = Path(sys.executable).parent
# the sensor ticks as often as the daemon allows (its loop is ~5 s), a failed mailbox is due 1 s later
FAST_SENSOR = {"MAILPIPE_MAILBOX_RETRY_INTERVAL": "1", "MAILPIPE_MAILBOX_RETRY_BACKOFF": "1"}


@contextmanager
def dagster_daemon(e, extra_env: dict[str, str]):
    """``dagster-daemon run`` on the project's workspace.yaml, with the test's env plus ``extra_env`` (its
    code server, so the sensors and the runs it launches, inherit it); its log goes to daemon.log."""
    log = open(e["tmp"] / "daemon.log", "ab")
    proc = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                            env={**os.environ, **extra_env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not ended within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def dagster_webserver(extra_env: dict[str, str]):
    """``dagster-webserver`` on 127.0.0.1 and the project's workspace.yaml, up and answering: yields the
    URL of its GraphQL endpoint."""
    import urllib.request

    from mailpipe_tests.conftest import free_port

    port = free_port()
    web = subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w",
                            str(ROOT / "workspace.yaml")], env={**os.environ, **extra_env}, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "webserver did not start"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/graphql"
    finally:
        stop(web)


def graphql(url: str, query: str, variables: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["data"]


def wait_until(what: str, pred, timeout: float, e=None, every: float = 0.5):
    """Poll ``pred`` until it returns something truthy (returned); on timeout fail with the daemon's log."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            log = (e["tmp"] / "daemon.log").read_text(errors="replace")[-4000:] if e else ""
            pytest.fail(f"{what}: not within {timeout:.0f} s\n--- daemon log (tail) ---\n{log}")
        time.sleep(every)


def runs_for(e, key: str) -> list[dg.RunRecord]:
    """Every run that backed ``key`` up (single-key runs by tag; range runs by their range), oldest first:
    the shard job's runs and backfill runs (``__ASSET_JOB``) alike; not the entry-point job's runs, which
    only start the shard job's."""
    from mailpipe.defs.partitions import ENTRY_JOBS, KeyCache

    cache = KeyCache(e["instance"], layout())
    recs = e["instance"].get_run_records()
    return sorted((r for r in recs if r.dagster_run.job_name not in ENTRY_JOBS
                   and key in cache.keys_of_run(r.dagster_run.job_name, r.dagster_run.tags)),
                  key=lambda r: r.create_timestamp)


def settled(e, keys: list[str]) -> bool:
    """Every key MATERIALIZED and every run that covered one of them finished (a partition is MATERIALIZED
    as soon as its event is stored, a moment before its run ends)."""
    return (set(statuses(e, keys).values()) == {"MATERIALIZED"}
            and all(r.dagster_run.is_finished for k in keys for r in runs_for(e, k)))


def describe(runs: list[dg.RunRecord]) -> str:
    """One line per run, for assertion messages."""
    keep = ("dagster/parent_run_id", "dagster/sensor_name", "dagster/backfill", "dagster/will_retry",
            "dagster/partition", "dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
    return "\n".join(f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value} "
                     f"{ {k: v for k, v in r.dagster_run.tags.items() if k in keep} }" for r in runs)


def middle_item(sim, upn: str) -> str:
    msgs = sim.model.mailbox(upn).msgs
    return sorted(msgs)[len(msgs) // 2]


# (SQLite only: test_scale_out.py runs a UI backfill through a webserver and daemon on Postgres, with Celery)
def test_webserver_and_daemon_run_a_ui_backfill_in_batches_and_dagsters_run_retry_recovers_a_failure(env):
    """What a user does in the UI: launch a backfill over t1:* (the GraphQL mutation the UI sends);
    the daemon submits batched runs; each mailbox gets its own status. One mailbox fails after storing
    part of its items; the fault heals; Dagster's own run retry (the run has a code-location origin)
    backs it up again, reusing what was stored — and the retry sensor, ticking meanwhile, leaves it to
    that retry instead of launching a duplicate."""
    sim, inst = env["sim"], env["instance"]
    keys = register_all(env)
    victim = keys[2]
    upn = victim.split(":", 1)[1]
    bad = middle_item(sim, upn)
    sim.set_faults(FaultConfig(fail_values={bad: 503}))
    # The sensor would retry the failed mailbox at its next tick (backoff 0; it ticks every ~5 s). Dagster's
    # retry daemon looks for failed runs when the daemon starts and then every 60 s here (5 s by default):
    # the batch fails ~40 s in (the backfill daemon's first tick is at 30 s), so Dagster's retry stays
    # pending for ~20 s, over several ticks of the sensor, which must wait for it.
    extra = {**FAST_SENSOR, "MAILPIPE_MAILBOX_RETRY_BACKOFF": "0", "MAILPIPE_RUN_RETRY_GRACE": "120",
             "MAILPIPE_BATCH_SIZE": "2", "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "60"}
    with dagster_webserver(extra) as url, dagster_daemon(env, extra):
        mutation = """mutation Launch($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
        resp = graphql(url, mutation, {"p": {"partitionNames": keys, "assetSelection": [{"path": ["mailbox_backup", "t1"]}],
                                             "tags": [{"key": "tenant", "value": "t1"}]}})
        assert resp["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", resp

        failed = wait_until("the victim's batch run fails", lambda: [
            r for r in runs_for(env, victim) if r.dagster_run.status == dg.DagsterRunStatus.FAILURE], 180, env,
            every=0.2)[0]
        sim.set_faults(FaultConfig())  # healed before Dagster's retry starts (its daemon has not ticked)
        first = Counter(sim.stats()["mime_downloads"].get(upn, {}))
        assert first and bad not in first, "the failed attempt stored part of the mailbox"
        assert statuses(env, [victim])[victim] == "FAILED", describe(runs_for(env, victim))
        assert failed.dagster_run.remote_job_origin is not None  # a run Dagster can retry

        wait_until("every mailbox MATERIALIZED, its runs ended", lambda: settled(env, keys), 120, env)
    dup = inst.get_run_records(dg.RunsFilter(tags={"dagster/sensor_name": "retry_failed_mailboxes"}))
    assert not dup, f"the retry sensor launched a run while Dagster's run retry was pending:\n{describe(dup)}"
    runs = runs_for(env, victim)
    originals = [r for r in inst.get_run_records(dg.RunsFilter(tags={"tenant": "t1"}))
                 if "dagster/parent_run_id" not in r.dagster_run.tags]
    assert len(originals) == 2, describe(originals)  # batched: 4 mailboxes in runs of 2
    # the failed run, then exactly one more: Dagster's retry of it
    assert [r.dagster_run.run_id for r in runs] == [failed.dagster_run.run_id, runs[-1].dagster_run.run_id], \
        describe(runs)
    retry = runs[1]
    assert retry.dagster_run.tags.get("dagster/parent_run_id") == failed.dagster_run.run_id
    assert "dagster/sensor_name" not in retry.dagster_run.tags
    # the backfill's runs say what they cover (tagged by the asset when they started: a UI backfill's
    # runs are created by Dagster, without mailpipe's tags)
    for r in originals:
        t = inst.get_run_by_id(r.dagster_run.run_id).tags
        assert t["mailpipe/mailboxes"] == "2" and t["mailpipe/range"] == (
            f"{t['dagster/asset_partition_range_start']} … {t['dagster/asset_partition_range_end']}")
    assert retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    both = Counter(sim.stats()["mime_downloads"][upn])
    assert set(both) == set(sim.model.mailbox(upn).msgs)
    again = {i: n for i, n in both.items() if n > 1}
    assert not again, f"items stored by the failed attempt downloaded again: {again} (first: {dict(first)})"


def test_failed_dagster_job_execute_run_is_retried_by_the_sensor_under_a_real_daemon(env):
    """`dagster job execute` runs have no code-location origin: Dagster tags the failed run
    dagster/will_retry=true but its retry daemon cannot re-launch it. The sensor must retry the mailbox
    itself, reusing what the failed attempt stored."""
    sim, inst = env["sim"], env["instance"]
    keys = register_all(env)
    victim = keys[1]
    upn = victim.split(":", 1)[1]
    bad = middle_item(sim, upn)
    sim.set_faults(FaultConfig(fail_values={bad: 503}))  # part of the mailbox is stored, then it fails
    cmd = [str(BIN / "dagster"), "job", "execute", "-m", "mailpipe.definitions", "-j", "mailbox_backup_job",
           "--tags", json.dumps({"dagster/partition": victim, "tenant": "t1"})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=env["tmp"])
    assert out.returncode != 0 and statuses(env, [victim])[victim] == "FAILED", out.stderr[-2000:]
    [failed] = runs_for(env, victim)
    assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
    # the trap: marked for an automatic retry that Dagster cannot launch
    assert failed.dagster_run.tags.get("dagster/will_retry") == "true"
    assert failed.dagster_run.remote_job_origin is None
    first = Counter(sim.stats()["mime_downloads"].get(upn, {}))
    assert first and bad not in first, "the failed attempt stored part of the mailbox"
    sim.set_faults(FaultConfig())

    with dagster_daemon(env, {**FAST_SENSOR, "MAILPIPE_RUN_RETRY_GRACE": "5"}):
        wait_until("the sensor's retry materializes the mailbox", lambda: settled(env, [victim]), 150, env)
    runs = runs_for(env, victim)
    # the failed run, then exactly one more: the sensor's
    assert [r.dagster_run.run_id for r in runs] == [failed.dagster_run.run_id, runs[-1].dagster_run.run_id], \
        describe(runs)
    retry = runs[1]
    assert retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert retry.dagster_run.tags.get("dagster/sensor_name") == "retry_failed_mailboxes"
    assert retry.dagster_run.tags.get("mailpipe/retry_attempt") == "1"
    both = Counter(sim.stats()["mime_downloads"][upn])
    assert set(both) == set(sim.model.mailbox(upn).msgs)
    again = {i: n for i, n in both.items() if n > 1}
    assert not again, f"items stored by the failed attempt downloaded again: {again} (first: {dict(first)})"


def test_run_monitoring_fails_a_hung_run_and_the_sensor_retries_its_mailbox(env):
    """A run stuck on a Graph body that never ends (the engine's own time bounds set out of reach) is
    failed by the daemon's run monitoring after max_runtime_seconds; its mailbox ends FAILED, and once
    the fault is gone the retry sensor backs it up, reusing what the stuck run stored."""
    import yaml

    from mailpipe.settings import Settings

    sim, inst = env["sim"], env["instance"]
    project = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    mon = project["run_monitoring"]
    assert mon["enabled"] and mon["max_runtime_seconds"] > Settings().mailbox_deadline
    # this instance (its storage kept): the project's dagster.yaml with a 15 s maximum run time, checked every second
    here = yaml.safe_load((env["home"] / "dagster.yaml").read_text())
    (env["home"] / "dagster.yaml").write_text(yaml.safe_dump(
        {**here, "run_monitoring": {**mon, "max_runtime_seconds": 15, "poll_interval_seconds": 1}}))
    keys = register_all(env)
    victim = keys[1]
    upn = victim.split(":", 1)[1]
    slow = middle_item(sim, upn)
    sim.set_faults(FaultConfig(trickle_values=[slow]))  # its body drips 1 byte every 5 s
    out_of_reach = {"MAILPIPE_GRAPH_SLOW_BODY_GRACE": "3600", "MAILPIPE_MAILBOX_DEADLINE": "3600"}
    with dagster_daemon(env, {**FAST_SENSOR, **out_of_reach}):
        # through the instance's run queue and launcher, as schedules, sensors and backfills launch runs;
        # no automatic run retry for this one, so the retry sensor is what must take over
        # (t1's own job: the entry point mailbox_backup_job would run it inside its own run, and run
        # monitoring stop that outer run; docs/OPERATIONS.md)
        cmd = [str(BIN / "dagster"), "job", "launch", "-w", str(ROOT / "workspace.yaml"), "-j", "mailbox_backup_job__t1",
               "--tags", json.dumps({"dagster/partition": victim, "tenant": "t1", "dagster/max_retries": "0"})]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ}, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        [hung] = wait_until("the run starts", lambda: runs_for(env, victim), 60, env)
        hung_id = hung.dagster_run.run_id
        hung = wait_until("run monitoring fails the hung run", lambda: [
            r for r in [inst.get_run_record_by_id(hung_id)] if r.dagster_run.status == dg.DagsterRunStatus.FAILURE],
            180, env)[0]  # (the run may be slow to start on a loaded machine)
        assert statuses(env, [victim])[victim] == "FAILED"
        assert hung.end_time - hung.start_time >= 15
        assert any("maximum runtime" in (ev.message or "") for ev in inst.all_logs(hung_id))
        first = Counter(sim.stats()["mime_downloads"].get(upn, {}))
        assert slow in first and len(first) > 1, "the stuck run stored part of the mailbox"
        sim.set_faults(FaultConfig())
        wait_until("the sensor's retry materializes the mailbox", lambda: settled(env, [victim]), 120, env)
    runs = runs_for(env, victim)
    # the stuck run, then exactly one more: the sensor's
    assert [r.dagster_run.run_id for r in runs] == [hung_id, runs[-1].dagster_run.run_id], describe(runs)
    retry = runs[1]
    assert retry.dagster_run.tags.get("dagster/sensor_name") == "retry_failed_mailboxes"
    assert retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    both = Counter(sim.stats()["mime_downloads"][upn])
    assert set(both) == set(sim.model.mailbox(upn).msgs)
    assert both[slow] == 2  # the stuck run never got its whole body
    again = {i: n for i, n in both.items() if n > 1 and i != slow}
    assert not again, f"items stored by the stuck run downloaded again: {again}"
