"""Repository format 2 benchmark (packs, index, encryption, prune): docs/FORMAT.md.

Prints:
1. S3 cost of a full backup of small messages (the simulator's plain mail, ~25 KB MIME, ~4 KB stored),
   one mailbox, into moto's S3 server (its own process, on 127.0.0.1), the simulator in its own process:
   - S3 requests per backed-up item — every request the repository's client sends, by operation (botocore
     ``before-send`` hook on the client handed to ``backup_mailboxes``), cross-checked with the count the
     server saw (target <= 0.05);
   - the mean size of the objects under ``packs/`` at the end (target >= 4 MB, MB = 10^6 bytes), the mean
     over all objects, and the count and mean size per prefix; the PUTs (count, MB) by prefix, checkpoint
     parts included (they are deleted at the commit, so the final listing does not show them).
   A pack is uploaded when it reaches 8 MiB, at the commit, and every 64 checkpoint parts (when they are
   merged); a checkpoint part (every MAILPIPE_CHECKPOINT_SECONDS=2 s or MAILPIPE_CHECKPOINT_ITEMS=30 items)
   carries the blobs of its items' chunks still in the open pack. So packs are large whatever the cadence,
   and checkpoints cost about one PUT per 30 items plus an upload of the new bytes a second time. Runs:
   (a) the limits of backup_bench (60 ms latency, 30 requests/s per mailbox, ~29 items/s) with the default
   cadence and with 10 s / 1,000 items (format 2's first cadence: a pack per checkpoint), (b) no latency
   or limits, (c) 8 mailboxes at once under (a)'s limits (one open pack for the process).
2. stored bytes ÷ restic's on repo_bench's corpus (realistic mail, shared attachments; restic 0.14 with
   compression, `apt-get install restic`): mailpipe's packs + index vs restic's data/, plain and encrypted
   (restic always encrypts), written by one thread. Target: no worse than format 1's 0.50 (README).
   restic's own figure moves from run to run (its chunker polynomial is random per repository), so
   stored ÷ raw is printed too (format 1: 0.324). Also: the chunks stored twice when 8 threads write
   (a race between concurrent ``put_content`` calls and a pack upload; target 0).
3. restore read speed: every item of a snapshot read back with ``repo.read_content`` (as export does, one
   thread, a new Repository object with an empty index cache), from a local folder and from moto S3, for
   small messages and for realistic mail: MB/s of MIME and items/s (no target: the baseline for restores).
4. prune time and peak RSS for repositories of 100k, 300k and 1M chunks (each a tiny random piece, so its
   id is a random 64-hex SHA-256, in packs of 2,000 chunks as checkpoints make them), half of them
   referenced by manifests (every other chunk; 4 mailboxes × 2 snapshots that overlap). Each pass of
   ``prune(repo, safety_seconds=0, clock_margin=0)`` runs in a child process with an empty index cache:
   pass 1 plans, pass 2 copies the live half and deletes. Printed: index sync, each pass's seconds, peak
   RSS (VmHWM), and per chunk (µs per chunk, KB of RSS per chunk above the child's baseline). Target:
   linear time, flat memory, the 1M-chunk run within ~3 minutes. Pass 2's RSS grows with the chunks of the
   pack it fills (~1 KB each while a pack is built and indexed): these tiny blobs put up to ~250k chunks in
   one 8 MiB pack, real ones (~4 KB) ~2k, so that part is bounded by the pack size, not the repository.
5. encryption's cost: MB/s of ``put_content`` (chunk + hash + compress + seal + pack + flush) and of
   ``read_content`` over the same data, plain and encrypted, one thread, local folder, best of 3 runs
   (no target: the cost).

Run: `.venv/bin/python -m bench.format_bench [--only 1,2,3,4,5] [--items 3000] [--checkpoints 2/30,10/1000]
[--prune 100000,300000,1000000]` (--checkpoints: the cadences of run 1a, seconds/items).
Takes ~7 minutes on 2 cores: part 1 ~4 (two 3,000-item backups at the limits' pace), part 4 ~2.5.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from bench.common import line
from mailpipe.config import AuthConfig, EncryptionConfig, S3Config, TenantConfig

MB = 1e6
PASSPHRASE_ENV = "MAILPIPE_BENCH_PASSPHRASE"


# -- moto's S3 server in a child process, counting the requests it serves ------------------------------------
def _kind(environ: dict) -> str:
    """``METHOD area`` of an S3 request: area is the repository's top-level prefix (packs, index, mailboxes…)
    of the key, or of the listed prefix; keys are ``<bucket>/<run>/<area>/…``."""
    method = environ.get("REQUEST_METHOD", "?")
    parts = environ.get("PATH_INFO", "").strip("/").split("/")
    if len(parts) == 1:  # the bucket: a listing (or a bucket operation)
        q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        prefix = (q.get("prefix") or [""])[0].split("/")
        return f"{'LIST' if method == 'GET' else method} {prefix[1] if len(prefix) > 1 else 'bucket'}"
    return f"{method} {parts[2] if len(parts) > 2 else parts[1]}"


def moto_server(port: int) -> None:
    """Child process: moto's S3 server (as ThreadedMotoServer runs it), plus /_bench/counts and /_bench/reset."""
    import logging

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    inner = DomainDispatcherApplication(create_backend_app)
    counts: Counter = Counter()
    lock = threading.Lock()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_bench/"):
            with lock:
                body = json.dumps(dict(counts)).encode()
                if path == "/_bench/reset":
                    counts.clear()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        kind = _kind(environ)
        with lock:
            counts[kind] += 1
            counts["bytes " + kind] += int(environ.get("CONTENT_LENGTH") or 0)
        return inner(environ, start_response)

    server = make_server("127.0.0.1", port, app, True, request_handler=MotoRequestHandler)
    print("ready", flush=True)
    server.serve_forever()


class Moto:
    def __enter__(self) -> Moto:
        from mailpipe_tests.conftest import free_port

        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
            os.environ.setdefault(k, v)
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.format_bench", "--moto-server", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("moto server did not start")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client().create_bucket(Bucket="bench")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def client(self):
        from mailpipe.repo.store import make_s3_client

        return make_s3_client(self.endpoint, "us-east-1")

    def counts(self, reset: bool = False) -> Counter:
        with urllib.request.urlopen(f"{self.endpoint}/_bench/{'reset' if reset else 'counts'}", timeout=30) as r:
            return Counter(json.loads(r.read()))

    def objects(self, prefix: str) -> dict[str, list[int]]:
        """Sizes of the objects under ``prefix``/, by area (packs, index, mailboxes…)."""
        out: dict[str, list[int]] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                out.setdefault(o["Key"].split("/")[1], []).append(o["Size"])
        return out


class OpCounter:
    """Every request a boto3 client sends (retries included), by operation."""

    def __init__(self, client) -> None:
        self.ops: Counter = Counter()
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, event_name: str, **_kw) -> None:
        with self._lock:
            self.ops[event_name.rsplit(".", 1)[-1]] += 1

    def total(self) -> int:
        return sum(self.ops.values())


def bench_tenant(storage: str, *, encrypted: bool = False, s3: S3Config | None = None) -> TenantConfig:
    return TenantConfig(name="bench", tenant_id="11111111-2222-3333-4444-555555555555",
                        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                        storage=storage, graph_url="http://127.0.0.1:1/v1.0", s3=s3 or S3Config(),
                        encryption=EncryptionConfig(PASSPHRASE_ENV) if encrypted else None)


def _fmt_sizes(sizes: list[int]) -> str:
    return f"{len(sizes)} (mean {sum(sizes) / len(sizes) / MB:.3f} MB)" if sizes else "0"


# -- 1. S3 requests and object sizes of a full backup ----------------------------------------------------------
def _backup_s3(work: str, moto: Moto, sim, upns: list[str], run: str, cadence: tuple[float, int] | None,
               window: int) -> dict:
    from bench.backup_bench import WINDOW_S, tenant
    from mailpipe.backup import backup_mailboxes
    from mailpipe.settings import Settings

    client = moto.client()
    ops = OpCounter(client)
    t = dataclasses.replace(tenant(sim, f"s3://bench/{run}", window),
                            s3=S3Config(endpoint_url=moto.endpoint, region="us-east-1"))
    settings = Settings(work_dir=os.path.join(work, f"state-{run}"))
    if cadence is not None:
        settings = dataclasses.replace(settings, checkpoint_seconds=cadence[0], checkpoint_items=cadence[1])
    moto.counts(reset=True)
    t0 = time.perf_counter()
    res = asyncio.run(backup_mailboxes(t, upns, settings=settings, graph_options={"window_seconds": WINDOW_S},
                                       s3_client=client))
    secs = time.perf_counter() - t0
    bad = [r for r in res if not r.ok]
    if bad:
        raise SystemExit(f"backup failed: {bad[0].error}")
    server = moto.counts()
    items = sum(r.items_total for r in res)
    objs = moto.objects(run)
    every = [s for v in objs.values() for s in v]
    packs = objs.get("packs", [])
    line("items, seconds, items/s", f"{items}, {secs:.1f} s, {items / secs:.1f}")
    requests = sum(v for k, v in server.items() if not k.startswith("bytes "))
    line("1. S3 requests per item (target <= 0.05)",
         f"{ops.total() / items:.4f}  ({ops.total()} requests; the server counted {requests})")
    line("   by operation", ", ".join(f"{k} {v}" for k, v in ops.ops.most_common()))
    line("   PUTs by area (server): count, MB", ", ".join(
        f"{k.split()[1]} {v}, {server['bytes ' + k] / MB:.1f}" for k, v in sorted(server.items())
        if k.startswith("PUT ")))
    line("1. mean object size under packs/ (target >= 4 MB)", f"{sum(packs) / max(1, len(packs)) / MB:.2f} MB "
         f"({len(packs)} packs, {items / max(1, len(packs)):.0f} items per pack, "
         f"{sum(packs) / items / 1e3:.1f} KB stored per item)")
    line("   mean size of all objects", f"{sum(every) / len(every) / MB:.3f} MB ({len(every)} objects)")
    line("   objects by area: count (mean size)", "; ".join(f"{k} {_fmt_sizes(v)}" for k, v in sorted(objs.items())))
    put_mb = sum(v for k, v in server.items() if k.startswith("bytes PUT ")) / MB
    line("   MB uploaded ÷ MB stored (packs + index at the end)",
         f"{put_mb / ((sum(packs) + sum(objs.get('index', []))) / MB):.2f}")
    return {"items": items, "secs": secs, "requests_per_item": ops.total() / items,
            "pack_mb": sum(packs) / max(1, len(packs)) / MB, "object_mb": sum(every) / len(every) / MB}


def part1(work: str, items: int, cadences: list[tuple[float, int]]) -> dict:
    from bench.backup_bench import LATENCY_MS, OUR_WINDOW, WINDOW_REQ, WINDOW_S, realistic
    from mailpipe.settings import Settings
    from mailpipe.sim import LimitConfig, SimConfig, SimProcess

    d = Settings()
    out = {}
    with Moto() as moto:
        with SimProcess(realistic(users=0, mailbox_sizes={"solo": items}, seed=7, plain=True)) as sim:
            upn = next(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("solo"))
            for cs, ci in cadences:
                print(f"1a. one mailbox of {items} small messages, {LATENCY_MS} ms latency, {WINDOW_REQ} requests/"
                      f"{WINDOW_S} s; a checkpoint every {cs:g} s or {ci} items"
                      + (" (the defaults)" if (cs, ci) == (d.checkpoint_seconds, d.checkpoint_items) else ""))
                out[f"limits_{cs:g}s_{ci}"] = _backup_s3(work, moto, sim, [upn], f"a{cs:g}-{ci}", (cs, ci), OUR_WINDOW)
        cfg = SimConfig(users=0, mailbox_sizes={"solo": items}, seed=7, plain=True,
                        limits=LimitConfig(window_requests=10**9))
        with SimProcess(cfg) as sim:
            upn = next(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("solo"))
            print("1b. the same mailbox, no latency or limits; the default checkpoint cadence")
            out["unthrottled"] = _backup_s3(work, moto, sim, [upn], "b", None, 10**6)
        n, size = 8, items // 4
        cfg = realistic(users=0, mailbox_sizes={f"m{i}": size for i in range(n)}, seed=9, plain=True)
        with SimProcess(cfg) as sim:
            upns = sorted(u for u in sim.truth(hashes=False)["mailboxes"] if u.startswith("m"))
            print(f"1c. {n} mailboxes of {size} small messages at once, 1a's limits; the default checkpoint cadence")
            out["mailboxes_8"] = _backup_s3(work, moto, sim, upns, "c", None, OUR_WINDOW)
    return out


# -- corpora, snapshots, reading -------------------------------------------------------------------------------
def small_corpus(n: int) -> list[tuple[str, str, bytes]]:
    from mailpipe.sim import SimConfig
    from mailpipe.sim.model import TenantModel

    model = TenantModel(SimConfig(users=0, mailbox_sizes={"solo": n}, seed=7, plain=True))
    return [(mb.user.upn, m.id, mb.mime(m)) for mb in model.mailboxes.values() for m in mb.msgs.values()]


def user_id(upn: str) -> str:
    return str(uuid.UUID(hashlib.md5(upn.encode()).hexdigest()))


def store_snapshots(repo, items, threads: int = 4) -> tuple[float, list[str]]:
    """put_content every item (``threads`` at once), then flush, then one snapshot per mailbox:
    (seconds of put_content + flush, user ids)."""
    t0 = time.perf_counter()
    if threads == 1:
        stored = [repo.put_content(d) for _, _, d in items]
    else:
        with ThreadPoolExecutor(threads) as pool:
            stored = list(pool.map(lambda it: repo.put_content(it[2]), items))
    repo.flush()
    secs = time.perf_counter() - t0
    rows: dict[str, list[dict]] = {}
    for (upn, mid, _), s in zip(items, stored):
        rows.setdefault(upn, []).append({"item_id": mid, "folder_id": "inbox", "folder_path": ["Inbox"],
                                         "size": s.size, "sha256": s.sha256, "chunks": s.chunks})
    for upn, rs in rows.items():
        w = repo.begin_snapshot(user_id(upn), upn)
        for i in range(0, len(rs), 5000):
            w.add_items(rs[i:i + 5000])
        w.set_folders([{"folder_id": "inbox", "display_name": "Inbox", "path": ["Inbox"], "total_item_count": len(rs)}])
        w.commit(delta_links={}, stats={}, skipped=[])
    return secs, [user_id(u) for u in rows]


def read_snapshots(repo, uids: list[str]) -> tuple[float, int, int]:
    """Read every item of each mailbox's latest snapshot (``read_content``, verified): (seconds, items, bytes)."""
    n = total = 0
    t0 = time.perf_counter()
    for uid in uids:
        for batch in repo.iter_manifest(uid, "latest", columns=["item_id", "size", "sha256", "chunks"]):
            for row in batch.to_pylist():
                total += len(repo.read_content(row["sha256"], row["chunks"], row["size"], item=row["item_id"]))
                n += 1
    return time.perf_counter() - t0, n, total


def _reopen(t: TenantConfig, work: str, client=None):
    """A new Repository object with an empty index cache (as a new process has), its index synced."""
    from mailpipe.repo import open_repository

    repo = open_repository(t, tmp_dir=tempfile.mkdtemp(dir=work), s3_client=client)
    t0 = time.perf_counter()
    repo.sync_index()
    return repo, time.perf_counter() - t0


# -- 2. stored bytes vs restic -----------------------------------------------------------------------------------
def duplicates(repo) -> tuple[int, int]:
    """(blobs, bytes) stored more than once: index entries beyond the first copy of each chunk."""
    first: dict[str, int] = {}
    n = size = 0
    for pid in repo.index.packs():
        for h, _, length in repo.index.pack_blobs(pid):
            if h in first:
                n, size = n + 1, size + length
            else:
                first[h] = length
    return n, size


def part2(work: str) -> dict:
    from bench import repo_bench
    from mailpipe.repo import open_repository

    items = repo_bench.corpus(6, 150)
    raw = sum(len(d) for _, _, d in items)
    print(f"2. stored bytes vs restic: repo_bench's corpus, {len(items)} messages, {raw / MB:.1f} MB raw MIME")
    out = {}
    for enc in (False, True):  # one writer thread: concurrent writers may store a chunk twice (below)
        root = os.path.join(work, f"p2-{'enc' if enc else 'plain'}")
        repo = open_repository(bench_tenant(root, encrypted=enc), tmp_dir=work)
        assert (repo.cipher is not None) == enc
        store_snapshots(repo, items, threads=1)
        stored = repo_bench.content_bytes(root)
        label = "encrypted" if enc else "plain"
        line(f"mailpipe ({label}): packs + index / raw", f"{stored / raw:.4f}  ({stored / MB:.2f} MB)")
        out[f"{label}_ratio"] = stored / raw
        out[f"{label}_stored"] = stored
    dups = []
    for i in range(3):
        root = os.path.join(work, f"p2-threads-{i}")
        repo = open_repository(bench_tenant(root), tmp_dir=work)
        store_snapshots(repo, items, threads=8)
        dups.append(duplicates(repo))
    line("   8 writer threads, 3 runs: chunks stored twice (MB)", ", ".join(f"{n} ({b / MB:.2f})" for n, b in dups))
    rs = repo_bench.restic_size(items, os.path.join(work, "p2-restic"))
    if rs is None:
        line("restic", "not installed (apt-get install restic): comparison skipped")
        return out
    line("restic 0.14 --compression auto: data/ / raw", f"{rs / raw:.3f}  ({rs / MB:.1f} MB)")
    line("2. mailpipe ÷ restic, plain (format 1: 0.50; must not be worse)", f"{out['plain_stored'] / rs:.3f}")
    line("2. mailpipe ÷ restic, encrypted", f"{out['encrypted_stored'] / rs:.3f}")
    out.update(vs_restic=out["plain_stored"] / rs, vs_restic_encrypted=out["encrypted_stored"] / rs)
    return out


# -- 3. restore read speed ---------------------------------------------------------------------------------------
def part3(work: str, small_items: int) -> dict:
    from bench import repo_bench
    from mailpipe.repo import open_repository

    out = {}
    corpora = {"small messages": small_corpus(small_items), "realistic mail": repo_bench.corpus(2, 150)}
    with Moto() as moto:
        for name, items in corpora.items():
            raw = sum(len(d) for _, _, d in items)
            print(f"3. read back every item of the snapshots, one thread: {name}, {len(items)} items, "
                  f"{raw / MB:.1f} MB")
            for where in ("local", "s3"):
                tag = f"p3-{name.split()[0]}-{where}"
                if where == "local":
                    t, client = bench_tenant(os.path.join(work, tag)), None
                else:
                    t = bench_tenant(f"s3://bench/{tag}", s3=S3Config(endpoint_url=moto.endpoint, region="us-east-1"))
                    client = moto.client()
                _, uids = store_snapshots(open_repository(t, tmp_dir=work, s3_client=client), items)
                counter = OpCounter(client) if client is not None else None
                repo, sync = _reopen(t, work, client)
                secs, n, total = read_snapshots(repo, uids)
                extra = ""
                if counter is not None:
                    gets = counter.ops.get("GetObject", 0)
                    extra = f"; {gets / n:.2f} GETs per item"
                line(f"3. {where}: MB/s, items/s",
                     f"{total / secs / MB:.1f} MB/s, {n / secs:,.0f} items/s (index sync {sync:.2f} s{extra})")
                out[f"{name.split()[0]}_{where}"] = {"mb_s": total / secs / MB, "items_s": n / secs}
    return out


# -- 4. prune at scale ----------------------------------------------------------------------------------------------
PER_PACK = 2000


def build_prune_repo(root: str, n: int, mailboxes: int = 4) -> float:
    """A repository of ``n`` chunks in packs of PER_PACK, half of them referenced by 2 snapshots of each mailbox."""
    import zstandard

    from mailpipe.repo import open_repository

    t0 = time.perf_counter()
    repo = open_repository(bench_tenant(root), tmp_dir=os.path.dirname(root))
    zc = zstandard.ZstdCompressor(level=3)
    rnd = random.Random(n)
    refs: list[str] = []
    for i in range(n):
        piece = rnd.randbytes(24)
        h = hashlib.sha256(piece).hexdigest()
        repo._add_blob(h, zc.compress(piece), False)
        if i % 2 == 0:
            refs.append(h)
        if (i + 1) % PER_PACK == 0:
            repo.flush()
    repo.flush()
    for m in range(mailboxes):
        mine = refs[m::mailboxes]
        third = len(mine) // 3
        for s, part in enumerate((mine[:2 * third], mine[third:])):  # two snapshots; together all of them
            uid = user_id(f"user{m}")
            w = repo.begin_snapshot(uid, f"user{m}@bench")
            for i in range(0, len(part), 5000):
                w.add_items([{"item_id": f"i{m}-{j}", "folder_id": "inbox", "folder_path": ["Inbox"], "size": 24,
                              "sha256": h, "chunks": [h]} for j, h in enumerate(part[i:i + 5000], start=i)])
            w.set_folders([{"folder_id": "inbox", "display_name": "Inbox", "path": ["Inbox"]}])
            w.commit(delta_links={}, stats={}, skipped=[])
    return time.perf_counter() - t0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(field + ":")) / 1024


def prune_child(root: str) -> None:
    """Child process: one prune run on ``root`` with an empty index cache; prints figures as JSON. Peak RSS is
    VmHWM (getrusage's ru_maxrss survives exec on Linux: it would report the parent's peak)."""
    from mailpipe.repo import open_repository
    from mailpipe.repo.prune import prune

    base = _status_mb("VmRSS")
    work = tempfile.mkdtemp(dir=os.path.dirname(root))
    repo = open_repository(bench_tenant(root), tmp_dir=work)
    t0 = time.perf_counter()
    repo.sync_index()
    sync = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = prune(repo, safety_seconds=0, clock_margin=0)
    secs = time.perf_counter() - t0
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM"),
                      "sync": sync, "secs": secs, "result": res.to_dict()}))


def part4(work: str, sizes: list[int]) -> dict:
    out = {}
    print(f"4. prune: half of n chunks referenced (packs of {PER_PACK:,} chunks, 4 mailboxes × 2 snapshots); "
          "each pass in a child process, empty index cache")
    for n in sizes:
        root = os.path.join(work, f"p4-{n}", "repo")
        os.makedirs(os.path.dirname(root))
        build = build_prune_repo(root, n)
        figs = []
        for p in (1, 2):
            r = subprocess.run([sys.executable, "-m", "bench.format_bench", "--prune-child", root],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"prune pass {p} failed: {r.stderr[-2000:]}")
            figs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        (a, b) = figs
        line(f"{n:,} chunks: build; index sync (cold)", f"{build:.0f} s; {a['sync']:.1f} s")
        line("   pass 1 (plan): seconds, peak RSS (child at start)",
             f"{a['secs']:.1f} s, {a['peak_mb']:.0f} MB ({a['base_mb']:.0f} MB); planned "
             f"{a['result']['planned_packs']} packs, {a['result']['referenced_chunks']:,} chunks referenced")
        line("   pass 2 (copy + delete): seconds, peak RSS",
             f"{b['secs']:.1f} s, {b['peak_mb']:.0f} MB; deleted {b['result']['deleted_packs']} packs, copied "
             f"{b['result']['repacked_chunks']:,} chunks")
        per = {k: 1e6 * f["secs"] / n for k, f in (("p1", a), ("p2", b))}
        line("4. per chunk: µs (pass 1, pass 2); KB of RSS above start",
             f"{per['p1']:.1f}, {per['p2']:.1f}; {1024 * (a['peak_mb'] - a['base_mb']) / n:.3f}, "
             f"{1024 * (b['peak_mb'] - b['base_mb']) / n:.3f}")
        out[n] = {"build": build, "sync": a["sync"], "pass1": a["secs"], "pass2": b["secs"],
                  "rss1": a["peak_mb"], "rss2": b["peak_mb"], "base": a["base_mb"]}
        subprocess.run(["rm", "-rf", os.path.dirname(root)], check=True)
    return out


# -- 5. encryption ---------------------------------------------------------------------------------------------------
def part5(work: str, small_items: int) -> dict:
    from bench import repo_bench
    from mailpipe.repo import open_repository

    out = {}
    corpora = {"small messages": small_corpus(small_items), "realistic mail": repo_bench.corpus(2, 150)}
    for name, items in corpora.items():
        raw = sum(len(d) for _, _, d in items)
        print(f"5. encryption's cost, local folder, one thread: {name}, {len(items)} items, {raw / MB:.1f} MB")
        figs = {}
        for enc in (False, True):
            puts, gets = [], []
            for i in range(3):  # best of 3: other work on the machine only slows a run down
                t = bench_tenant(os.path.join(work, f"p5-{name.split()[0]}-{enc}-{i}"), encrypted=enc)
                repo = open_repository(t, tmp_dir=work)
                assert (repo.cipher is not None) == enc
                put, uids = store_snapshots(repo, items, threads=1)
                repo, _ = _reopen(t, work)
                get, _, total = read_snapshots(repo, uids)
                puts.append(raw / put / MB)
                gets.append(total / get / MB)
            figs[enc] = (max(puts), max(gets))
            line(f"{'encrypted' if enc else 'plain'}: put_content MB/s, read_content MB/s (best of 3)",
                 f"{figs[enc][0]:.1f}, {figs[enc][1]:.1f}")
        line("5. encrypted ÷ plain speed: put, read", f"{figs[True][0] / figs[False][0]:.2f}, "
             f"{figs[True][1] / figs[False][1]:.2f}")
        out[name.split()[0]] = figs
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="1,2,3,4,5", help="parts to run")
    ap.add_argument("--items", type=int, default=3000, help="small messages of parts 1, 3 and 5")
    ap.add_argument("--checkpoints", default="2/30,10/1000", help="checkpoint cadences of part 1a: seconds/items")
    ap.add_argument("--prune", default="100000,300000,1000000", help="chunk counts of part 4")
    ap.add_argument("--moto-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prune-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.moto_server:
        moto_server(args.moto_server)
        return {}
    if args.prune_child:
        prune_child(args.prune_child)
        return {}
    os.environ.setdefault(PASSPHRASE_ENV, "correct horse battery staple")
    parts = set(args.only.split(","))
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as work:
        if "1" in parts:
            cadences = [(float(c.split("/")[0]), int(c.split("/")[1])) for c in args.checkpoints.split(",")]
            out["1"] = part1(work, args.items, cadences)
        if "2" in parts:
            out["2"] = part2(work)
        if "3" in parts:
            out["3"] = part3(work, args.items)
        if "4" in parts:
            out["4"] = part4(work, [int(x) for x in args.prune.split(",")])
        if "5" in parts:
            out["5"] = part5(work, args.items)
    return out


if __name__ == "__main__":
    main()
