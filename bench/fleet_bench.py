"""1M mailboxes in the fleet layout, with generated keys, on a SQLite Dagster instance.

Tenants: one of ``--big`` mailboxes with ``shards: --shards`` and ``--tenants`` of ``--small`` each (1M in
all by default). Measures, each printed with its figure:
1. registering every key the way discovery does (each shard's set, then the routing index ``mailboxes``);
2. the UI's partition status query for the largest asset (``get_status_by_partition``, and the GraphQL
   the asset's Partitions tab sends, through a real webserver: time and response size), with part of its
   partitions materialized and failed;
3. a tick of the retry sensor's planning with ``--failed`` FAILED mailboxes across the big tenant's shards
   (and what the old ``list.index`` sort would cost at this size, measured on a sample);
4. a range run's key resolution: Dagster's on the shard's set (what it does when the run starts), the
   sensors' (:class:`KeyCache`), and for comparison the same on one set of every key (the old layout);
   the first tick of the backup schedule's sweep.
Run: `.venv/bin/python -m bench.fleet_bench [--big 600000 --shards 8 --tenants 40 --small 10000]`.
Most of its time (11–14 of 12–17 minutes on the shared 2-core machine) is Dagster recording the 50,000
failures it measures with (one event per failed partition, 13–17 ms each); `--failed 5000` leaves most of that out (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import line

ROOT = Path(__file__).resolve().parents[1]

PARTITIONS_QUERY = """query PartitionHealth($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) {
  ... on AssetNode { id partitionKeysByDimension { name partitionKeys }
    assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
      materializedPartitions materializingPartitions failedPartitions } } } } }"""


def _tenants_file(work: str, big: int, shards: int, tenants: int) -> str:
    rows = []
    for name, n in [("big", shards)] + [(f"t{i:03d}", 1) for i in range(tenants)]:
        rows.append({"name": name, "tenant_id": "11111111-2222-3333-4444-555555555555",
                     "client_id": "66666666-7777-8888-9999-000000000000", "auth": {"simulator": True},
                     "graph_url": "https://127.0.0.1:1", "storage": os.path.join(work, "repos", name), "shards": n})
    path = os.path.join(work, "tenants.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"tenants": rows}, f)
    return path


def _fake_run(instance, shard, keys: list[str], materialize: int) -> float:
    """A range run of a stand-in for the shard's asset (same key and set): the first ``materialize`` keys get
    a materialization, then it fails, so the rest end FAILED. Seconds."""
    import dagster as dg

    @dg.asset(key=shard.asset_key, partitions_def=shard.partitions_def,
              backfill_policy=dg.BackfillPolicy.multi_run(len(keys)), output_required=False)
    def stand_in(context):
        for k in context.partition_keys[:materialize]:
            yield dg.AssetMaterialization(asset_key=context.asset_key, partition=k)
        raise dg.Failure("bench: the others failed")

    job = dg.Definitions(assets=[stand_in], jobs=[dg.define_asset_job("bench", [stand_in])]).resolve_job_def("bench")
    t = time.perf_counter()
    job.execute_in_process(instance=instance, raise_on_error=False, run_config={
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}, tags={
        "dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--big", type=int, default=600_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tenants", type=int, default=40)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--failed", type=int, default=50_000)
    ap.add_argument("--materialized", type=int, default=500)
    ap.add_argument("--no-webserver", action="store_true")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    import warnings

    import dagster as dg
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)

    from mailpipe.config import load_tenants
    from mailpipe.defs.discovery import add_requests
    from mailpipe.defs.partitions import ROUTING_PARTITIONS, KeyCache, Layout, partition_key, routing_partitions
    from mailpipe.defs.schedules import plan_sweep
    from mailpipe.defs.sensors import plan_retries

    total = args.big + args.tenants * args.small
    print(f"fleet layout: {total:,} mailboxes — tenant 'big' {args.big:,} in {args.shards} shards, "
          f"{args.tenants} tenants of {args.small:,}; SQLite instance")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mailpipe-fleet-") as work:
        tfile = _tenants_file(work, args.big, args.shards, args.tenants)
        home = os.path.join(work, "dagster_home")
        os.makedirs(home)
        shutil.copyfile(ROOT / "dagster.yaml", os.path.join(home, "dagster.yaml"))
        os.environ.update({"MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home})
        layout = Layout.of(load_tenants(tfile))
        instance = dg.DagsterInstance.get()

        # 1. registration, as discovery does it: per shard set (sorted), then the routing index
        per_set: dict = {}
        for tenant, n in (("big", args.big), *((f"t{i:03d}", args.small) for i in range(args.tenants))):
            for i in range(n):
                k = partition_key(tenant, f"user{i:07d}@{tenant}.example")
                per_set.setdefault(layout.shard_of(k), []).append(k)
        def add(name, keys):  # as the discovery sensor's requests do (add_requests: chunks of 50,000)
            for req in add_requests(name, keys):
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))

        t0 = time.perf_counter()
        for shard in layout.shards:
            add(shard.partitions_name, sorted(per_set.get(shard, [])))
        t_sets = time.perf_counter() - t0
        t0 = time.perf_counter()
        every = [k for s in layout.shards for k in sorted(per_set.get(s, []))]
        add(ROUTING_PARTITIONS, every)
        t_routing = time.perf_counter() - t0
        biggest = max(layout.shards, key=lambda s: len(per_set.get(s, [])))
        sizes = sorted(len(v) for v in per_set.values())
        line(f"register {total:,} keys in {len(layout.shards)} sets (largest {sizes[-1]:,}, smallest {sizes[0]:,})",
             f"{t_sets:.1f} s")
        line(f"register them in the routing index '{ROUTING_PARTITIONS}' too", f"{t_routing:.1f} s")
        out.update(register_sets_s=t_sets, register_routing_s=t_routing, largest_set=sizes[-1])

        # history: part of the largest asset materialized, and --failed FAILED across the big tenant's shards
        big_shards = layout.shards_of("big")
        keys_big0 = instance.get_dynamic_partitions(biggest.partitions_name)
        m = min(args.materialized, len(keys_big0) // 2)
        t_mat = _fake_run(instance, biggest, keys_big0[:m + 1000], m)  # m materialized, 1000 failed
        per = args.failed // len(big_shards)
        failed_total = 1000
        t_fail = time.perf_counter()
        for s in big_shards:
            ks = instance.get_dynamic_partitions(s.partitions_name)
            lo = m + 1000 if s == biggest else 0
            n = min(per - (1000 if s == biggest else 0), len(ks) - lo)
            if n > 0:
                _fake_run(instance, s, ks[lo:lo + n], 0)
                failed_total += n
        t_fail = time.perf_counter() - t_fail
        line(f"(setup: {m:,} materialized + 1,000 failed on {biggest.asset_key.to_user_string()})", f"{t_mat:.1f} s")
        line(f"(setup: {failed_total - 1000:,} more FAILED: Dagster records each failed partition)",
             f"{t_fail:.1f} s, {t_fail / max(1, failed_total - 1000) * 1000:.1f} ms per mailbox")

        # 2. the status query for the largest asset
        for label in ("first (cache built)", "again (cached)"):
            t0 = time.perf_counter()
            keys = instance.get_dynamic_partitions(biggest.partitions_name)
            st = instance.get_status_by_partition(biggest.asset_key, keys, biggest.partitions_def)
            t_st = time.perf_counter() - t0
            counts = {v.value: 0 for v in st.values() if v}
            for v in st.values():
                if v:
                    counts[v.value] += 1
            line(f"status of {len(keys):,} partitions of {biggest.asset_key.to_user_string()}, {label}",
                 f"{t_st * 1000:.0f} ms {counts}")
        out["status_s"] = t_st
        if not args.no_webserver:
            out.update(_graphql(biggest, home, tfile))

        # 3. the retry sensor's planning with the failures above
        now = time.time()
        t0 = time.perf_counter()
        reqs, cur, _ = plan_retries(instance, {}, now, max_attempts=5, backoff_s=0, per_tick=100, batch_size=25,
                                    layout=layout)
        t_retry = time.perf_counter() - t0
        line(f"retry sensor tick: {len(cur):,} failed mailboxes, {len(reqs)} runs requested", f"{t_retry:.1f} s")
        t0 = time.perf_counter()
        plan_retries(instance, cur, now + 1, max_attempts=5, backoff_s=0, per_tick=100, batch_size=25, layout=layout)
        line(f"  next tick (cursor of {len(cur):,} entries)", f"{time.perf_counter() - t0:.1f} s")
        sample = sorted(cur)[:300]
        t0 = time.perf_counter()
        sorted(sample, key=every.index)  # the old way, on one list of every key
        per_key = (time.perf_counter() - t0) / len(sample)
        line(f"  (old: list.index over {len(every):,} keys: per failed key, for {len(cur):,})",
             f"{per_key * 1000:.1f} ms, {per_key * len(cur):.0f} s")
        out.update(retry_tick_s=t_retry, failed=len(cur), old_index_ms=per_key * 1000)

        # 4. a range run's key resolution
        # (Dagster's own call when a range run starts; its loading context is not exported)
        from dagster._core.definitions.partitions.context import partition_loading_context

        a, b = keys_big0[1000], keys_big0[1024]
        rng = dg.PartitionKeyRange(a, b)
        t0 = time.perf_counter()
        with partition_loading_context(dynamic_partitions_store=instance):
            got = biggest.partitions_def.get_partition_keys_in_range(rng)
        t_dag = time.perf_counter() - t0
        line(f"range run of {len(got)} keys: Dagster resolves it on its set ({len(keys_big0):,} keys)",
             f"{t_dag * 1000:.0f} ms")
        t0 = time.perf_counter()
        with partition_loading_context(dynamic_partitions_store=instance):
            old = routing_partitions.get_partition_keys_in_range(rng)
        t_old = time.perf_counter() - t0
        line(f"  the same on one set of every key (old layout, {len(every):,})", f"{t_old * 1000:.0f} ms")
        cache = KeyCache(instance, layout)
        t0 = time.perf_counter()
        mine = cache.keys_of_run(biggest.backup_job_name, {"dagster/asset_partition_range_start": a,
                                                           "dagster/asset_partition_range_end": b})
        t_cache = time.perf_counter() - t0
        assert mine == list(got) == list(old)
        line("  the sensors' resolution (KeyCache: one read of the set, a position map)", f"{t_cache * 1000:.0f} ms")
        t0 = time.perf_counter()
        between = cache.tenant_keys_between(partition_key("big", "user0000000@big.example"),
                                            partition_key("big", "user0000999@big.example"))
        line(f"  mailbox_backup_job's range over the sharded tenant ({len(between)} keys, reads its "
             f"{len(big_shards)} sets)", f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        armed = plan_sweep(instance, layout, {}, time.time() - 86400, cron="0 2 * * *", batch_size=25,
                           runs_per_tick=20)[1]  # the sensor's first tick, a day ago: the next cron time is due
        t0 = time.perf_counter()
        sweep, cur, _ = plan_sweep(instance, layout, armed, time.time(), cron="0 2 * * *", batch_size=25,
                                   runs_per_tick=20)
        line(f"backup schedule: a tick of the sweep ({len(sweep)} runs of 25 mailboxes)",
             f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        out.update(range_dagster_ms=t_dag * 1000, range_old_ms=t_old * 1000, range_cache_ms=t_cache * 1000)
        instance.dispose()
    line("(this benchmark's own run time)", f"{time.perf_counter() - started:.0f} s")
    return out


def _graphql(shard, home: str, tfile: str) -> dict:
    from mailpipe_tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home}
    web = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                            "-w", str(ROOT / "workspace.yaml")], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("webserver did not start") from None
                time.sleep(0.5)
        body = json.dumps({"query": PARTITIONS_QUERY, "variables": {"k": {"path": shard.asset_key.path}}}).encode()
        res = {}
        for label in ("first", "again"):
            t0 = time.perf_counter()
            raw = urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}),
                timeout=600).read()
            dt = time.perf_counter() - t0
            node = json.loads(raw)["data"]["assetNodeOrError"]
            n = len(node["partitionKeysByDimension"][0]["partitionKeys"])
            line(f"  UI Partitions tab query (GraphQL, {label}): {n:,} keys", f"{dt:.1f} s, {len(raw) / 1e6:.1f} MB")
            res[f"graphql_{label}_s"] = dt
            res["graphql_mb"] = len(raw) / 1e6
        return res
    finally:
        web.terminate()
        web.wait(60)


if __name__ == "__main__":
    main()
