"""Orchestration overhead: a UI-style batched backfill of N small mailboxes vs the engine alone.

Starts the webserver and the daemon on 127.0.0.1 with the project's dagster.yaml, launches a backfill
over all mailboxes through the GraphQL mutation the UI uses (batches of MAILPIPE_BATCH_SIZE), waits
until every partition is MATERIALIZED, and compares with one engine call backing up the same mailboxes
into a fresh repository. Run: `.venv/bin/python -m bench.dagster_bench [--mailboxes 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import line
from mailpipe.sim import SimConfig, SimProcess, write_tenants_file

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mailboxes", type=int, default=200)
    ap.add_argument("--messages", type=int, default=5)
    ap.add_argument("--batch", type=int, default=25)
    args = ap.parse_args(argv)
    import dagster as dg

    from mailpipe.backup import backup_mailboxes
    from mailpipe.config import load_tenants
    from mailpipe.defs.discovery import discover_all, register
    from mailpipe.defs.partitions import Shard
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe_tests.conftest import free_port

    print(f"orchestration overhead: backfill of {args.mailboxes} mailboxes × {args.messages} items, "
          f"batches of {args.batch}")
    cfg = SimConfig(users=0, plain=True, seed=2,
                    mailbox_sizes={f"u{i:04d}": args.messages for i in range(args.mailboxes)})
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as work, SimProcess(cfg) as sim:
        tfile = write_tenants_file(os.path.join(work, "tenants.yaml"), "b", sim.graph_url,
                                   os.path.join(work, "repo"), mailboxes={"include": ["u*"]})
        home = os.path.join(work, "dagster_home")
        os.makedirs(home)
        shutil.copyfile(ROOT / "dagster.yaml", os.path.join(home, "dagster.yaml"))
        env = {**os.environ, "MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home, "MAILPIPE_BATCH_SIZE": str(args.batch)}
        os.environ.update({"MAILPIPE_TENANTS": tfile, "DAGSTER_HOME": home})
        instance = dg.DagsterInstance.get()
        [rep] = discover_all(MailpipeResource(), instance)
        register(instance, [rep])
        keys = rep.new_keys

        # the engine alone, into a separate repository
        [tenant] = load_tenants()
        alone = tenant.__class__(**{**tenant.__dict__, "storage": os.path.join(work, "repo-alone")})
        t0 = time.perf_counter()
        res = asyncio.run(backup_mailboxes(alone, [k.split(":", 1)[1] for k in keys]))
        t_engine = time.perf_counter() - t0
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:3]

        port = free_port()
        bin_ = Path(sys.executable).parent
        web = subprocess.Popen([str(bin_ / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w",
                                str(ROOT / "workspace.yaml")], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon = subprocess.Popen([str(bin_ / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            q = """mutation L($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                __typename ... on PythonError { message } } }"""
            body = json.dumps({"query": q, "variables": {"p": {
                "partitionNames": keys, "assetSelection": [{"path": ["mailbox_backup", "b"]}],
                "tags": [{"key": "tenant", "value": "b"}]}}}).encode()
            t1 = time.perf_counter()
            r = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}),
                timeout=60).read())
            assert r["data"]["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", r
            shard = Shard("b")  # tenant b's asset (one shard)
            while True:
                st = instance.get_status_by_partition(shard.asset_key, keys, shard.partitions_def) or {}
                done = sum(1 for v in st.values() if v == dg.AssetPartitionStatus.MATERIALIZED)
                failed = sum(1 for v in st.values() if v == dg.AssetPartitionStatus.FAILED)
                if done + failed == len(keys):
                    break
                time.sleep(1)
            t_backfill = time.perf_counter() - t1
            runs = len(instance.get_run_records(dg.RunsFilter(tags={"tenant": "b"})))
        finally:
            for p in (daemon, web):
                p.terminate()
            for p in (daemon, web):
                p.wait(60)
    n = len(keys)
    line("engine alone: wall time, per mailbox", f"{t_engine:.1f} s, {t_engine / n * 1000:.0f} ms")
    line(f"backfill via daemon ({runs} runs, {done} MATERIALIZED, {failed} FAILED): wall, per mailbox",
         f"{t_backfill:.1f} s, {t_backfill / n * 1000:.0f} ms")
    line("orchestration overhead per mailbox", f"{(t_backfill - t_engine) / n * 1000:.0f} ms")
    return {"engine_s": t_engine, "backfill_s": t_backfill, "runs": runs}


if __name__ == "__main__":
    main()
