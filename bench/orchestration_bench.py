"""Orchestration overhead of a UI backfill, and runs per minute, on SQLite and Postgres, with Dagster's default
run launcher and with Celery.

Each scenario gets a fresh Dagster home (the project's dagster.yaml; with Postgres, its storage on a
throwaway PostgreSQL server; with Celery, CeleryRunLauncher on a throwaway Redis and a real Celery worker),
a fresh repository, and a webserver + daemon on 127.0.0.1. Then:

1. **Backfill**: the GraphQL mutation the UI sends (`launchPartitionBackfill`) over N small mailboxes,
   batches of `--batch`, tagged `tenant` like the schedule's runs; timed until every partition is
   MATERIALIZED (or FAILED).
   - *pickup*: from the launch to the first run the backfill daemon creates — its fixed 30 s tick, not ours;
   - *work*: the same batches backed up by the engine alone, as many at once as the backfill runs at once
     (the per-tenant run limit), each batch one `backup_mailboxes` call in an already-started process;
   - **overhead per mailbox** = (backfill wall − pickup − work) / N: what Dagster adds (run queue, launch,
     process start and code load, event storage, status), pickup excluded; also shown with it.
2. **Runs per minute**: `--runs` one-mailbox runs of the tenant's `mailbox_backup_job__<tenant>` launched at once through the
   GraphQL `launchRun` mutation (the UI's Launchpad), tagged `tenant`; R ÷ (last run's end − first launch).
   The mailboxes were backed up by the backfill, so each run is a no-change incremental (~20 Graph requests):
   this measures the launcher, not the engine.

The machine is shared (2 cores, other load): each scenario is repeated `--repeat` times and the medians
are printed. Run: `.venv/bin/python -m bench.orchestration_bench [--mailboxes 200] [--repeat 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.common import line

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TENANT = "b"


def _warm(_: int) -> None:
    import mailpipe.backup  # noqa: F401  (the imports a run's process pays for too: not the work)

    time.sleep(0.5)  # every worker process started before the clock starts


def _backup_batch(tfile: str, upns: list[str]) -> int:
    from mailpipe.backup import backup_mailboxes
    from mailpipe.config import load_tenants

    [tenant] = load_tenants(tfile)
    res = asyncio.run(backup_mailboxes(tenant, upns))
    bad = [r.error for r in res if not r.ok]
    assert not bad, bad[:3]
    return len(res)


def engine_alone(tfile: str, batches: list[list[str]], parallel: int) -> float:
    """Seconds to back up ``batches`` through the engine, ``parallel`` batches at a time, in started processes."""
    with ProcessPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(_warm, range(parallel)))
        t0 = time.perf_counter()
        n = sum(pool.map(_backup_batch, [tfile] * len(batches), batches))
        took = time.perf_counter() - t0
    assert n == sum(map(len, batches))
    return took


def discovered_upns(tfile: str) -> list[str]:
    """The UPNs discovery finds in the tenant, sorted (what the backfill's batches hold, in that order)."""
    from mailpipe.config import load_tenants
    from mailpipe.defs.resources import MailpipeResource

    [tenant] = load_tenants(tfile)
    return sorted(m.upn.lower() for m in MailpipeResource().discover(tenant).mailboxes)


def graphql(url: str, query: str, variables: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.3)


BACKFILL = """mutation L($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
LAUNCH = """mutation L($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
    ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def scenario(name: str, sim_url: str, work: str, pg, redis, args) -> dict:
    """One fresh instance: the backfill, then the runs-per-minute burst. Returns its figures."""
    import dagster as dg
    import yaml

    from mailpipe.defs.discovery import discover_all, register
    from mailpipe.defs.partitions import Shard
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe.sim import write_tenants_file
    from mailpipe_tests.servers import CeleryWorker, free_port

    os.makedirs(work)
    tfile = write_tenants_file(os.path.join(work, "tenants.yaml"), TENANT, sim_url, os.path.join(work, "repo"),
                               mailboxes={"include": ["u*"]})
    home = os.path.join(work, "dagster_home")
    os.makedirs(home)
    cfg = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    db = None
    if pg is not None:
        db = pg.create_database("bench")
        cfg["storage"] = pg.storage_config(db)
    if redis is not None:
        cfg["run_launcher"] = {"module": "dagster_celery.launcher", "class": "CeleryRunLauncher",
                               "config": {"broker": f"{redis.url}/0", "backend": f"{redis.url}/1"}}
    Path(home, "dagster.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home, "MAILPIPE_BATCH_SIZE": str(args.batch),
           "MAILPIPE_HOME": os.path.join(work, "mp")}
    saved = {k: os.environ.get(k) for k in ("MAILPIPE_TENANTS", "DAGSTER_HOME")}
    os.environ.update({"MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home})
    procs: list[subprocess.Popen] = []
    worker = None
    instance = dg.DagsterInstance.from_config(home)
    try:
        [rep] = discover_all(MailpipeResource(), instance)
        register(instance, [rep])  # the tenant's set and the routing index, as the discovery sensor does
        shard = Shard(TENANT)  # one asset: the tenant is not sharded
        keys = rep.new_keys
        if redis is not None:
            worker = CeleryWorker(redis.url, work, env, concurrency=args.celery_concurrency).start(cwd=str(ROOT))
        port = free_port()
        logs = open(os.path.join(work, "servers.log"), "ab")
        procs.append(subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w",
                                       str(ROOT / "workspace.yaml")], env=env, cwd=ROOT, stdout=logs,
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                                      env=env, cwd=ROOT, stdout=logs, stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{port}/server_info")
        url = f"http://127.0.0.1:{port}/graphql"
        time.sleep(5)  # the daemon's threads up and its code server loaded, as on a running deployment

        # 1. the backfill
        t0 = time.time()
        r = graphql(url, BACKFILL, {"p": {"partitionNames": keys, "assetSelection": [{"path": shard.asset_key.path}],
                                          "tags": [{"key": "tenant", "value": TENANT}]}})
        assert r["data"]["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", r
        backfill_id = r["data"]["launchPartitionBackfill"]["backfillId"]
        asset = shard.asset_key
        first_run = None
        deadline = time.monotonic() + args.timeout
        while True:
            if first_run is None:
                recs = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
                if recs:
                    first_run = min(x.create_timestamp.timestamp() for x in recs)
            st = instance.get_status_by_partition(asset, keys, shard.partitions_def) or {}
            done = sum(1 for v in st.values() if v == dg.AssetPartitionStatus.MATERIALIZED)
            failed = sum(1 for v in st.values() if v == dg.AssetPartitionStatus.FAILED)
            if done + failed == len(keys):
                break
            assert time.monotonic() < deadline, f"{name}: backfill not done in {args.timeout} s ({done} done)"
            time.sleep(0.25)
        wall = time.time() - t0
        recs = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        if first_run is None:
            first_run = min(x.create_timestamp.timestamp() for x in recs)
        runs = len(recs)

        # 2. runs per minute: one-mailbox runs launched at once
        burst = keys[: args.runs]
        t1 = time.time()
        ids = []
        for k in burst:
            r = graphql(url, LAUNCH, {"p": {
                "selector": {"repositoryLocationName": "mailpipe", "repositoryName": "__repository__",
                             "jobName": shard.backup_job_name},
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": k},
                                               {"key": "tenant", "value": TENANT}]}}})
            assert r["data"]["launchRun"]["__typename"] == "LaunchRunSuccess", r
            ids.append(r["data"]["launchRun"]["run"]["runId"])
        deadline = time.monotonic() + args.timeout
        while True:
            recs_b = [instance.get_run_record_by_id(i) for i in ids]
            if all(x.dagster_run.is_finished for x in recs_b):
                break
            assert time.monotonic() < deadline, f"{name}: runs not done in {args.timeout} s"
            time.sleep(0.25)
        ok = sum(1 for x in recs_b if x.dagster_run.status == dg.DagsterRunStatus.SUCCESS)
        span = max(x.end_time for x in recs_b) - t1
        return {"wall": wall, "pickup": first_run - t0, "runs": runs, "done": done, "failed": failed,
                "burst_ok": ok, "burst_n": len(ids), "runs_per_min": len(ids) / span * 60, "n": len(keys)}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if worker is not None:
            worker.stop()
        instance.dispose()
        if db is not None:
            pg.drop_database(db)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", type=int, default=200)
    ap.add_argument("--messages", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="mailboxes per run (default: MAILPIPE_BATCH_SIZE's)")
    ap.add_argument("--runs", type=int, default=24, help="one-mailbox runs for the runs-per-minute figure")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--celery-concurrency", type=int, default=4)
    ap.add_argument("--only", default="sqlite,postgres,celery",
                    help="scenarios, comma-separated: sqlite, postgres (default launcher), celery (Postgres)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    import yaml

    if args.batch is None:
        from mailpipe.defs.settings import BATCH_SIZE

        args.batch = BATCH_SIZE

    from mailpipe.sim import SimConfig, SimProcess, write_tenants_file
    from mailpipe_tests.servers import PostgresServer, RedisServer

    only = args.only.split(",")
    limits = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]["runs"]
    tenant_limit = next(x["limit"] for x in limits["tag_concurrency_limits"] if x["key"] == "tenant")
    parallel = min(tenant_limit, limits["max_concurrent_runs"])
    print(f"orchestration: UI backfill of {args.mailboxes} mailboxes × {args.messages} items, batches of "
          f"{args.batch}, ≤ {parallel} runs at once (per-tenant limit); {args.runs} one-mailbox runs; "
          f"medians of {args.repeat} (shared 2-core machine)")
    cfg = SimConfig(users=0, plain=True, seed=2,
                    mailbox_sizes={f"u{i:04d}": args.messages for i in range(args.mailboxes)})
    figures: dict[str, list[dict]] = {s: [] for s in only}
    engine: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mailpipe-orch-") as tmp, SimProcess(cfg) as sim, \
            PostgresServer() as pg, RedisServer() as redis:
        saved_home = os.environ.get("MAILPIPE_HOME")
        os.environ["MAILPIPE_HOME"] = os.path.join(tmp, "mp")  # the engine's working state, out of the checkout
        for rep in range(args.repeat):
            # the work itself: the backfill's batches through the engine alone, as many at once
            tfile = write_tenants_file(os.path.join(tmp, f"alone{rep}.yaml"), TENANT, sim.graph_url,
                                       os.path.join(tmp, f"alone{rep}"), mailboxes={"include": ["u*"]})
            upns = discovered_upns(tfile)
            assert len(upns) == args.mailboxes, len(upns)
            batches = [upns[i:i + args.batch] for i in range(0, len(upns), args.batch)]
            engine.append(engine_alone(tfile, batches, parallel))
            for s in only:
                f = scenario(s, sim.graph_url, os.path.join(tmp, f"{s}{rep}"),
                             pg if s in ("postgres", "celery") else None, redis if s == "celery" else None, args)
                figures[s].append(f)
                print(f"    ({rep + 1}/{args.repeat} {s}: engine {engine[-1]:.1f} s, backfill {f['wall']:.1f} s, "
                      f"pickup {f['pickup']:.1f} s, {f['runs_per_min']:.0f} runs/min)", flush=True)
        if saved_home is None:
            os.environ.pop("MAILPIPE_HOME", None)
        else:
            os.environ["MAILPIPE_HOME"] = saved_home
    med = statistics.median
    t_engine = med(engine)
    n = args.mailboxes
    line("the work: engine alone, same batches, same parallelism", f"{t_engine:.1f} s ({t_engine / n * 1000:.0f} ms "
         f"per mailbox; runs {', '.join(f'{x:.1f}' for x in engine)})")
    out = {"engine_s": t_engine}
    labels = {"sqlite": "SQLite, default launcher", "postgres": "Postgres, default launcher",
              "celery": "Postgres, CeleryRunLauncher + Redis"}
    for s in only:
        fs = figures[s]
        wall, pickup = med(f["wall"] for f in fs), med(f["pickup"] for f in fs)
        over = med((f["wall"] - f["pickup"] - t_engine) / f["n"] * 1000 for f in fs)
        over_all = med((f["wall"] - t_engine) / f["n"] * 1000 for f in fs)
        rpm = med(f["runs_per_min"] for f in fs)
        bad = sum(f["failed"] for f in fs) + sum(f["burst_n"] - f["burst_ok"] for f in fs)
        print(f"  {labels[s]}:")
        line("  backfill wall (runs)", f"{wall:.1f} s ({fs[0]['runs']} runs); each: "
             + ", ".join(f"{f['wall']:.1f}" for f in fs))
        line("  pickup: launch → first run (backfill daemon's 30 s tick)", f"{pickup:.1f} s; each: "
             + ", ".join(f"{f['pickup']:.1f}" for f in fs))
        line("  overhead per mailbox, pickup excluded", f"{over:.0f} ms (target ≤ 150 on SQLite)")
        line("  overhead per mailbox, pickup included", f"{over_all:.0f} ms")
        line(f"  runs per minute ({args.runs} one-mailbox runs)", f"{rpm:.0f}; each: "
             + ", ".join(f"{f['runs_per_min']:.0f}" for f in fs))
        if bad:
            line("  FAILED partitions or runs", str(bad))
        out[s] = {"wall_s": wall, "pickup_s": pickup, "overhead_ms": over, "overhead_with_pickup_ms": over_all,
                  "runs_per_min": rpm, "failures": bad}
    return out


if __name__ == "__main__":
    main()
