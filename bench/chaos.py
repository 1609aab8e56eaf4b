"""Chaos run: rounds of mailbox changes under every fault at once, a SIGKILL at a random point of each
backup, damaged chunks between rounds — and after each round the latest snapshot of every mailbox must
equal the simulator's ground truth exactly, and ``mailpipe check --read-data`` must be clean.

Per round:
1. (after the first) random changes in every mailbox (new mail, reads, flags, moves, deletes, draft edits,
   folder renames/moves/deletes), then one chunk of an item that still exists is corrupted and another is
   deleted in the repository;
2. ``mailpipe backup`` (a real process, the simulator in another) is started and SIGKILLed after a random
   number of Graph requests; the simulator answers 429, 503, 504, connection resets and transient 404s on
   ``$value`` all along;
3. ``mailpipe backup`` is run again to completion (it takes the dead one's lease over, reuses what it
   stored, repairs the damaged chunks);
4. every mailbox's latest snapshot is compared with the ground truth (ids, folders, content hashes; every
   item's bytes read back), and ``mailpipe check --read-data`` runs over the whole repository.

Run: ``.venv/bin/python -m bench.chaos [--users 3] [--messages 150] [--rounds 4] [--seed 7]``; prints the
figures and exits 1 if an item was lost, wrong or extra, or the check found a problem. The test suite runs
a small one (``mailpipe_tests/test_chaos.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.common import line
from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, SimProcess, write_tenants_file

FAULTS = FaultConfig(latency_ms=4, jitter_ms=3, p_429=0.02, retry_after_s=0.2, p_503=0.02, p_504=0.01,
                     p_reset=0.01, p_404_value=0.01, p_empty_page=0.05)
ENV = {"MAILPIPE_GRAPH_RETRY_ATTEMPTS": "10", "MAILPIPE_GRAPH_RETRY_BASE_DELAY": "0.02",
       "MAILPIPE_GRAPH_RETRY_MAX_DELAY": "0.3", "MAILPIPE_ITEM_RETRY_DELAY": "0.1", "MAILPIPE_CHECKPOINT_SECONDS": "0.5"}


@dataclass
class Round:
    number: int
    items: int = 0
    lost: int = 0
    extra: int = 0
    wrong: int = 0
    killed_after: int = 0         # Graph requests of the killed backup
    downloads: int = 0            # $value downloads in the round (both backups)
    repeated: int = 0             # items downloaded more than once in the round
    repaired: int = 0
    skipped: int = 0
    check_problems: int = 0
    faults: dict[str, int] = field(default_factory=dict)


def _truth(sim) -> dict[str, dict[str, tuple[tuple[str, ...], str]]]:
    return {u: {i["id"]: (tuple(i["folder_path"]), i["sha256"]) for i in mb["items"]}
            for u, mb in sim.truth()["mailboxes"].items()}


def _damage(repo, truth_items: set[str], rng: random.Random) -> list[str]:
    """Corrupt one chunk and delete another, both used by items that still exist (and are not drafts:
    their content is what a re-download gives back)."""
    from mailpipe_tests.damage import corrupt_chunk, delete_chunk

    candidates = []
    for uid, _ in repo.list_mailboxes():
        for b in repo.iter_manifest(uid, "latest", columns=["item_id", "chunks", "is_draft"]):
            candidates += [r["chunks"][0] for r in b.to_pylist()
                           if r["item_id"] in truth_items and not r["is_draft"] and len(r["chunks"]) == 1]
    corrupt, delete = rng.sample(sorted(set(candidates)), 2)
    corrupt_chunk(repo, corrupt, at=rng.randrange(1 << 20))
    delete_chunk(repo, delete)
    return [corrupt, delete]


def _backup(cmd: list[str], env: dict[str, str], sim, kill_after: int | None) -> tuple[int, int, str]:
    """Run a backup process; SIGKILL it once the simulator has served ``kill_after`` more requests.
    Returns (exit status, requests it made, stdout)."""
    start = sim.stats()["total_requests"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        while p.poll() is None and sim.stats()["total_requests"] - start < kill_after:
            time.sleep(0.005)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    out, err = p.communicate(timeout=600)
    if kill_after is None and p.returncode != 0:
        raise SystemExit(f"backup failed after the kill:\n{out}\n{err[-3000:]}")
    return p.returncode, sim.stats()["total_requests"] - start, out


def run(users: int = 3, messages: int = 150, rounds: int = 4, seed: int = 7, work: str | None = None,
        verbose: bool = True) -> list[Round]:
    from mailpipe.config import AuthConfig, TenantConfig
    from mailpipe.repo import open_repository

    rng = random.Random(seed)
    work = work or tempfile.mkdtemp(prefix="mailpipe-chaos-")
    # pages of at most 20 items: deltas of many pages, so empty pages and nextLinks are exercised too
    cfg = SimConfig(users=users, messages_per_mailbox=messages, seed=seed, faults=FAULTS,
                    limits=LimitConfig(max_page_size=20))
    out: list[Round] = []
    with SimProcess(cfg) as sim:
        repo_dir = os.path.join(work, "repo")
        env = {**os.environ, **ENV, "MAILPIPE_WORK_DIR": os.path.join(work, "state"),
               "MAILPIPE_TENANTS": write_tenants_file(os.path.join(work, "tenants.yaml"), "chaos", sim.graph_url,
                                                      repo_dir)}
        tenant = TenantConfig(name="chaos", tenant_id="11111111-2222-3333-4444-555555555555",
                              client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                              storage=repo_dir, graph_url=sim.graph_url)
        upns = sorted(sim.truth(hashes=False)["mailboxes"])
        cmd = [sys.executable, "-m", "mailpipe", "backup", "chaos", *upns, "--json"]
        expected = sum(len(mb["items"]) for mb in sim.truth(hashes=False)["mailboxes"].values()) + 30 * len(upns)
        for n in range(rounds):
            r = Round(n + 1)
            sim.set_faults(FaultConfig())  # changes and damage are made on a quiet simulator
            if n:
                for u in upns:
                    sim.mutate(u, random=25, seed=seed * 100 + n)
                truth = _truth(sim)
                _damage(open_repository(tenant, create=False), {i for t in truth.values() for i in t}, rng)
            sim.set_faults(FAULTS)
            sim.reset_stats()
            _, r.killed_after, _ = _backup(cmd, env, sim, kill_after=rng.randint(1, max(2, int(expected * 0.9))))
            _, requests, stdout = _backup(cmd, env, sim, kill_after=None)
            expected = max(requests, 30 * len(upns))
            results = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
            r.repaired = sum(x.get("items_repaired", 0) for x in results)
            r.skipped = sum(x.get("items_skipped", 0) for x in results)
            st = sim.stats()
            counts = [c for per in st["mime_downloads"].values() for c in per.values()]
            r.downloads, r.repeated = sum(counts), sum(1 for c in counts if c > 1)
            r.faults = {k: sum(v.get(k, 0) for v in st["faults_injected"].values())
                        for k in ("429", "503", "504", "reset", "404_value", "empty_page")}
            sim.set_faults(FaultConfig())
            truth = _truth(sim)
            repo = open_repository(tenant, create=False)
            for uid, upn in repo.list_mailboxes():
                got = {}
                for b in repo.iter_manifest(uid, "latest"):
                    for row in b.to_pylist():
                        repo.read_content(row["sha256"], row["chunks"], row["size"], item=row["item_id"])
                        got[row["item_id"]] = (tuple(row["folder_path"]), row["sha256"])
                want = truth[upn]
                r.items += len(want)
                r.lost += len(set(want) - set(got))
                r.extra += len(set(got) - set(want))
                r.wrong += sum(1 for k in set(want) & set(got) if want[k] != got[k])
            chk = subprocess.run([sys.executable, "-m", "mailpipe", "check", "chaos", "--read-data"], env=env,
                                 capture_output=True, text=True, timeout=600)
            r.check_problems = 0 if chk.returncode == 0 else max(1, len(chk.stdout.splitlines()))
            out.append(r)
            if verbose:
                print(f"round {r.number}: {r.items} items, lost {r.lost}, extra {r.extra}, wrong {r.wrong}; killed after "
                      f"{r.killed_after} requests; {r.downloads} downloads ({r.repeated} repeated), {r.repaired} "
                      f"repaired, {r.skipped} skipped; check {'clean' if not r.check_problems else 'PROBLEMS'}; "
                      f"faults {r.faults}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--messages", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"chaos: {a.users} mailboxes x ~{a.messages} items, {a.rounds} rounds, seed {a.seed}")
    rounds = run(a.users, a.messages, a.rounds, a.seed)
    lost = sum(r.lost + r.extra + r.wrong for r in rounds)
    line("items lost, extra or wrong over all rounds (must be 0)", str(lost))
    line("rounds whose check --read-data found problems (must be 0)", str(sum(1 for r in rounds if r.check_problems)))
    line("items repaired by the completing backups (a killed one may repair first)", str(sum(r.repaired for r in rounds)))
    line("items downloaded more than once in a round (kill + restart)", str(sum(r.repeated for r in rounds)))
    line("faults injected", json.dumps({k: sum(r.faults.get(k, 0) for r in rounds) for k in rounds[0].faults}))
    line("seconds", f"{time.perf_counter() - t0:.1f}")
    return 1 if lost or any(r.check_problems for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
