"""Restore benchmark against the simulator in its own process, with realistic latency and Exchange's limits
(scaled in time so that a run takes a minute, not hours).

Prints, for one mailbox restored into another:
1. small messages (request-bound): items/s as a ratio of the ceiling the limits allow — the request window
   and 4 concurrent requests at the simulator's latency, one request per item at best (target >= 0.8) —
   and Graph requests per restored item (target <= 1.1);
2. messages with attachments (upload-bound): MB/s as a ratio of the upload budget (Exchange: 150 MB per
   5 minutes; here the same budget per 10 s, scaled) (target >= 0.8).

Run: `.venv/bin/python -m bench.restore_bench [--items 600]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from bench.common import line
from mailpipe.backup import backup_mailboxes
from mailpipe.config import AuthConfig, Limits, TenantConfig
from mailpipe.restore import RestoreRequest, restore_mailbox
from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, SimProcess

LATENCY_MS, JITTER_MS = 60, 15
WINDOW_REQ, WINDOW_S = 300, 10    # 30 requests/s per mailbox
UPLOAD_BYTES, UPLOAD_S = 15 * 1024 * 1024, 10.0   # 1.5 MB/s: Exchange's 150 MB / 5 min is 0.5 MB/s


def tenant(sim, storage: str) -> TenantConfig:
    return TenantConfig(name="bench", tenant_id="11111111-2222-3333-4444-555555555555",
                        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                        storage=storage, graph_url=sim.graph_url,
                        limits=Limits(4, int(WINDOW_REQ * 0.97), int(UPLOAD_BYTES * 0.97)))


def run_restore(work: str, cfg: SimConfig) -> tuple[object, float, dict, int]:
    """Back up the first mailbox, restore it into the second; (result, seconds, stats of the target, bytes)."""
    with SimProcess(cfg) as sim:
        a, b = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith(("shared-", "nomailbox"))][:2]
        t = tenant(sim, os.path.join(work, f"repo-{time.monotonic_ns()}"))
        opts = {"window_seconds": WINDOW_S, "upload_window_seconds": UPLOAD_S}
        [r] = asyncio.run(backup_mailboxes(t, [a], graph_options=opts))
        if not r.ok:
            raise SystemExit(f"backup failed: {r.error}")
        sim.reset_stats()
        t0 = time.perf_counter()
        res = asyncio.run(restore_mailbox(t, RestoreRequest(upn=a, to=b, into="Bench"), graph_options=opts))
        secs = time.perf_counter() - t0
        if not res.ok or res.failed:
            raise SystemExit(f"restore failed: {res.error or res.failed[:3]}")
        st = sim.stats()
        return res, secs, {k: v.get(b) for k, v in st.items() if isinstance(v, dict)}, r.bytes_fetched


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=600, help="messages of the small-message mailbox")
    args = ap.parse_args(argv)
    out = {}
    limits = LimitConfig(concurrent_per_mailbox=4, window_requests=WINDOW_REQ, window_seconds=WINDOW_S,
                         upload_bytes=UPLOAD_BYTES, upload_window_seconds=UPLOAD_S)
    faults = FaultConfig(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as work:
        print(f"1. small messages, latency {LATENCY_MS}±{JITTER_MS} ms, ≤4 concurrent, {WINDOW_REQ} requests/{WINDOW_S} s")
        cfg = SimConfig(users=2, mailbox_sizes={"adele.vance": args.items}, messages_per_mailbox=5, plain=True,
                        seed=5, faults=faults, limits=limits)
        res, secs, st, _ = run_restore(work, cfg)
        requests = sum((st["requests"] or {}).values())
        ceiling = min(WINDOW_REQ / WINDOW_S, 4 / (LATENCY_MS / 1000))  # requests/s, one request an item at best
        line("items, seconds", f"{res.restored}, {secs:.1f} s")
        line("items/s (ceiling allowed by the limits)", f"{res.restored / secs:.1f} ({ceiling:.1f})")
        line("1. ratio to the ceiling (target >= 0.8)", f"{res.restored / secs / ceiling:.3f}")
        line("1. Graph requests per restored item (target <= 1.1)", f"{requests / res.restored:.3f}")
        out.update(small_ratio=res.restored / secs / ceiling, requests_per_item=requests / res.restored)

        print(f"2. messages with attachments, upload budget {UPLOAD_BYTES / 2**20:.0f} MiB per {UPLOAD_S:.0f} s")
        cfg = SimConfig(users=2, messages_per_mailbox=400, seed=6, faults=faults, limits=limits)  # ~4 windows
        res, secs, st, _ = run_restore(work, cfg)
        uploaded = st.get("uploaded_bytes") or 0
        mb_ceiling = UPLOAD_BYTES / UPLOAD_S / 2**20
        line("items, MiB uploaded, seconds", f"{res.restored}, {uploaded / 2**20:.1f} MiB, {secs:.1f} s")
        line("MiB/s (ceiling: the upload budget)", f"{uploaded / 2**20 / secs:.2f} ({mb_ceiling:.2f})")
        line("2. ratio to the ceiling (target >= 0.8)", f"{uploaded / 2**20 / secs / mb_ceiling:.3f}")
        line("   time spent pacing for the budget; 429s", f"{res.upload_wait_seconds:.0f} s; {res.throttled}")
        out.update(upload_ratio=uploaded / 2**20 / secs / mb_ceiling)
    return out


if __name__ == "__main__":
    main()
