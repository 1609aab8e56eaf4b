"""Fidelity backups (the mailbox export API, 20 items per request) vs MIME backups (one ``$value`` per message),
against the simulator in its own process with backup_bench's per-mailbox limits and latency.

Prints:
1. items/s of a ``content: fidelity`` backup of one large mailbox (``--items``, 50,000 by default: messages,
   plus calendar, contact and task items) and of a ``content: mime`` backup of a mailbox of ``--mime-items``
   messages (3,000: MIME's rate is bound by the request window, whatever the mailbox's size), and their ratio
   (target >= 10);
2. Graph requests per item of the fidelity backup (target <= 0.07), and of a no-change incremental;
3. aggregate items/s of 20 mailboxes backed up in fidelity mode in one call / (20 x one mailbox alone).

Run: `.venv/bin/python -m bench.fidelity_bench [--items 50000] [--mime-items 3000] [--mailboxes 20]
[--mailbox-items 1000]`. Takes ~5-10 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import replace

from bench.backup_bench import JITTER_MS, LATENCY_MS, OUR_WINDOW, WINDOW_REQ, WINDOW_S, realistic, run, tenant
from bench.common import cpu_seconds, line
from mailpipe.sim import SimProcess


def part1_2(work: str, items: int, mime_items: int) -> dict:
    print(f"1/2. one large mailbox, latency {LATENCY_MS}±{JITTER_MS} ms, ≤4 concurrent, {WINDOW_REQ} requests/"
          f"{WINDOW_S} s per mailbox")
    messages = int(items / 1.2)  # the simulator adds a fifth as many calendar, contact and task items
    cfg = realistic(users=0, mailbox_sizes={"big": messages, "mime": mime_items}, plain=True, seed=51)
    with SimProcess(cfg) as sim:
        big = next(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("big"))
        small = next(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("mime"))
        tm = tenant(sim, os.path.join(work, "mime"))
        [m], ms = run(tm, [small])
        mime_rate = m.items_total / ms
        line("mime: items, seconds, items/s", f"{m.items_total}, {ms:.1f} s, {mime_rate:.1f}")
        line("mime: Graph requests per item", f"{m.requests / m.items_total:.4f}")
        tf = replace(tenant(sim, os.path.join(work, "fidelity")), content="fidelity")
        c0 = cpu_seconds(sim.pid)
        [f], fs = run(tf, [big])
        cpu_sim = cpu_seconds(sim.pid) - c0
        rate = f.items_total / fs
        line("fidelity: items (by type), seconds", f"{f.items_total} ({f.items_by_type}), {fs:.1f} s")
        line("fidelity: items/s", f"{rate:.1f}")
        line("1. fidelity items/s / mime items/s (target >= 10)", f"{rate / mime_rate:.1f}")
        line("2. Graph requests per item, fidelity (target <= 0.07)", f"{f.requests / f.items_total:.4f} "
             f"({f.requests} requests)")
        line("   bytes fetched, stored (new, compressed)", f"{f.bytes_fetched:,}, {f.bytes_stored_new:,}")
        line("   simulator CPU", f"{cpu_sim:.1f} s")
        [inc], isecs = run(tf, [big])
        line("2. no-change incremental: requests, seconds", f"{inc.requests}, {isecs:.1f} s")
    return {"ratio": rate / mime_rate, "req_per_item": f.requests / f.items_total, "fidelity_rate": rate,
            "mime_rate": mime_rate}


def part3(work: str, n: int, size: int) -> dict:
    print(f"3. {n} mailboxes of ~{int(size * 1.2)} items in fidelity mode, in one call vs one alone")
    cfg = realistic(users=0, mailbox_sizes={f"m{i:02d}": size for i in range(n)}, plain=True, seed=52)
    with SimProcess(cfg) as sim:
        upns = sorted(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("m"))
        [one], s1 = run(replace(tenant(sim, os.path.join(work, "p3one"), OUR_WINDOW), content="fidelity"), upns[:1])
        r1 = one.items_total / s1
        res, sn = run(replace(tenant(sim, os.path.join(work, "p3all"), OUR_WINDOW), content="fidelity"), upns)
        items = sum(r.items_total for r in res)
        agg = items / sn
        line("one mailbox: items/s", f"{r1:.1f}")
        line(f"{n} mailboxes: items/s ({items} items in {sn:.1f} s)", f"{agg:.1f}")
        line("3. aggregate / (n x one)", f"{agg / (n * r1):.3f}")
    return {"ratio20": agg / (n * r1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=50_000, help="items of the large mailbox (fidelity)")
    ap.add_argument("--mime-items", type=int, default=3_000, help="messages of the mailbox backed up as MIME")
    ap.add_argument("--mailboxes", type=int, default=20)
    ap.add_argument("--mailbox-items", type=int, default=1_000, help="messages per mailbox of part 3")
    ap.add_argument("--only", default="1,3")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="mailpipe-fidelity-bench-")
    out: dict = {}
    try:
        if "1" in a.only:
            out.update(part1_2(work, a.items, a.mime_items))
        if "3" in a.only:
            out.update(part3(work, a.mailboxes, a.mailbox_items))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
