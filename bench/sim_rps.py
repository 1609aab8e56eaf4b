"""How many requests/s the Graph simulator serves on one core, for MIME of typical size.

The simulator runs in its own process (single-threaded asyncio: one core); the client runs here with
64 concurrent keep-alive connections over 8 mailboxes, the per-mailbox limits raised so that only the
simulator's own speed counts. Run: `.venv/bin/python -m bench.sim_rps`.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp

from bench.common import cpu_seconds, line
from mailpipe.sim import LimitConfig, SimConfig, SimProcess

REQUESTS = 6000
CONCURRENCY = 64


async def hammer(sim, targets: list[tuple[str, str]]) -> tuple[int, int, float]:
    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    n_bytes = 0
    done = 0
    async with aiohttp.ClientSession(connector=conn, headers={"Authorization": "Bearer x"}) as s:
        async def worker(ids):
            nonlocal n_bytes, done
            for uid, mid in ids:
                async with s.get(f"{sim.graph_url}/users/{uid}/messages/{mid}/$value") as r:
                    body = await r.read()
                    assert r.status == 200, r.status
                    n_bytes += len(body)
                    done += 1

        per = [targets[i::CONCURRENCY] for i in range(CONCURRENCY)]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in per))
        return done, n_bytes, time.perf_counter() - t0


def main() -> dict:
    cfg = SimConfig(users=8, messages_per_mailbox=300, seed=3,
                    limits=LimitConfig(concurrent_per_mailbox=1000, window_requests=10**9))
    print("simulator throughput (MIME of typical size, one core)")
    with SimProcess(cfg) as sim:
        truth = sim.truth()
        typical = [(mb["id"], it["id"], it["size"]) for mb in truth["mailboxes"].values() for it in mb["items"]
                   if 20_000 <= it["size"] <= 80_000]
        rng = random.Random(1)
        warm = [(u, m) for u, m, _ in typical]
        asyncio.run(hammer(sim, warm))  # the simulator caches generated MIME, as it would after one pass
        targets = [rng.choice(warm) for _ in range(REQUESTS)]
        c0 = cpu_seconds(sim.pid)
        n, nbytes, secs = asyncio.run(hammer(sim, targets))
        cpu = cpu_seconds(sim.pid) - c0
    rps = n / secs
    line("typical messages (20-80 KB), mean size", f"{nbytes / n / 1024:.1f} KiB")
    line("requests served", f"{n} in {secs:.2f} s")
    line("requests/s", f"{rps:,.0f}")
    line("MB/s", f"{nbytes / secs / 1e6:.1f}")
    line("simulator CPU per request", f"{cpu / n * 1000:.2f} ms ({cpu / secs:.2f} cores busy)")
    line("requests/s per simulator core", f"{n / cpu:,.0f}")
    return {"sim_rps": rps, "sim_rps_per_core": n / cpu}


if __name__ == "__main__":
    main()
