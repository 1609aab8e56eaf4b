"""CPU per item in the backup process, and bench part 2a's ratio.

Prints:
1. CPU ms per backed-up item spent by the backup process (user + system CPU of this process ÷ items),
   for plain messages and for the simulator's attachment mix, into a local repository and into S3 (moto's
   server in its own process, so its CPU is not counted). The simulator runs in its own process with no
   latency and no request window (the backup runs as fast as its CPU allows). One warm-up mailbox first
   (imports, the first model deserialisation); then three mailboxes, one after the other, each a whole
   full backup (resolve, folders, deltas, downloads, checkpoints, commit: per-mailbox costs included)
   measured alone: the median and the three runs are printed (other load on the machine makes single
   figures noisy). Targets: ≤ 1.0 ms per plain item locally, ≤ 1.5 ms on S3.
2. bench part 2a (``bench.backup_bench``): 20 mailboxes in one call ÷ (20 × one), 30 requests/s per
   mailbox (target ≥ 0.8).

Run: `.venv/bin/python -m bench.cpu_bench [--only 1,2] [--items 1500] [--kinds plain,attach] [--where local,s3]
[--profile DIR]` (~3 minutes for part 1, ~1 for part 2). ``--profile`` writes a cProfile of each measured
backup there, event-loop thread only, in CPU time (``python -m pstats`` to read it; the store pool's threads
are not in it: `py-spy record --threads` sees them); profiling inflates the figures it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import statistics
import tempfile
import time

from bench.common import line
from mailpipe.backup import backup_mailboxes
from mailpipe.config import AuthConfig, Limits, S3Config, TenantConfig
from mailpipe.sim import LimitConfig, SimConfig, SimProcess

RUNS = 3


def _tenant(sim, storage: str, s3: S3Config | None = None) -> TenantConfig:
    return TenantConfig(name="bench", tenant_id="11111111-2222-3333-4444-555555555555",
                        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                        storage=storage, graph_url=sim.graph_url, limits=Limits(4, 10**9), s3=s3 or S3Config())


def _backup(t: TenantConfig, upn: str, profile: str | None = None) -> tuple[float, int]:
    """(CPU seconds of this process, items) for one mailbox's full backup."""
    prof = cProfile.Profile(time.thread_time) if profile else None  # CPU time of the event loop's thread
    c0 = time.process_time()
    if prof:
        prof.enable()
    [r] = asyncio.run(backup_mailboxes(t, [upn]))
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    cpu = time.process_time() - c0
    if not r.ok:
        raise SystemExit(f"backup of {upn} failed: {r.error}")
    return cpu, r.items_total


def part1(work: str, items: int, profile_dir: str | None, kinds: str = "plain,attach",
          wheres: str = "local,s3") -> dict:
    print(f"1. CPU per item of the backup process (median of {RUNS} mailboxes of {items} items; noisy when the "
          "machine has other load)")
    out: dict = {}
    from bench.format_bench import Moto  # moto's S3 server in its own process: its CPU is not the backup's

    with Moto() as moto:  # (creates the bucket)
        for kind, plain, n in (("plain", True, items), ("attach", False, max(100, items * 2 // 5))):
            if kind not in kinds.split(","):
                continue
            sizes = {"warm": 100, **{f"m{i}": n for i in range(RUNS)}}
            cfg = SimConfig(users=0, mailbox_sizes=sizes, seed=11, plain=plain,
                            limits=LimitConfig(window_requests=10**9))
            with SimProcess(cfg) as sim:
                truth = sim.truth(hashes=False)["mailboxes"]
                upns = {k: next(u for u in truth if u.startswith(k)) for k in sizes}
                for where in wheres.split(","):
                    if where == "local":
                        t = _tenant(sim, os.path.join(work, f"{kind}-local"))
                    else:
                        t = _tenant(sim, f"s3://bench/{kind}", S3Config(endpoint_url=moto.endpoint,
                                                                        region="us-east-1"))
                    _backup(t, upns["warm"])
                    per_item = []
                    for i in range(RUNS):
                        prof = os.path.join(profile_dir, f"{kind}-{where}-{i}.prof") if profile_dir else None
                        cpu, got = _backup(t, upns[f"m{i}"], prof)
                        per_item.append(1000 * cpu / got)
                    med = statistics.median(per_item)
                    target = {"local": 1.0, "s3": 1.5}[where] if plain else None
                    label = f"CPU ms per item, {'plain messages' if plain else 'attachment mix'}, " \
                            f"{'local folder' if where == 'local' else 'moto S3'}"
                    if target:
                        label += f" (target <= {target})"
                    line(label, f"{med:.2f}  (runs: {', '.join(f'{x:.2f}' for x in per_item)}; {n} items each)")
                    out[f"cpu_ms_{kind}_{where}"] = med
    return out


def part2a(work: str) -> dict:
    from bench import backup_bench

    return {"ratio2a": backup_bench.part2(work, tags="a")["ratio2a"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="1,2", help="parts to run")
    ap.add_argument("--items", type=int, default=1500, help="plain items per measured mailbox (attachment mix: 2/5)")
    ap.add_argument("--kinds", default="plain,attach", help="part 1: plain, attach or both")
    ap.add_argument("--where", default="local,s3", help="part 1: local, s3 or both")
    ap.add_argument("--profile", default=None, help="a directory for cProfile output of each measured backup")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    parts = set(args.only.split(","))
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as work:
        if "1" in parts:
            out.update(part1(work, args.items, args.profile, args.kinds, args.where))
        if "2" in parts:
            out.update(part2a(work))
    return out


if __name__ == "__main__":
    main()
