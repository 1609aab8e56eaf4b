"""Repository benchmark: write speed (local folder and an S3 server), and storage efficiency against restic.

The corpus is the simulator's realistic mail (median ~33 KB, long tail, attachments shared across
messages and mailboxes), generated deterministically: 6 mailboxes. It is written

- to a local repository and to an S3 repository on moto's server (127.0.0.1), timing `put_content`
  (chunking, hashing, compression, upload; 4 threads as the engine uses them);
- as .eml files backed up by restic (Debian's `restic`), whose stored size (`restic stats --mode raw-data`)
  is compared with ours.

Run: `.venv/bin/python -m bench.repo_bench [--mailboxes N] [--messages M]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import line
from mailpipe.config import AuthConfig, S3Config, TenantConfig
from mailpipe.repo import open_repository
from mailpipe.sim import SimConfig
from mailpipe.sim.model import TenantModel


def corpus(mailboxes: int, messages: int) -> list[tuple[str, str, bytes]]:
    model = TenantModel(SimConfig(users=mailboxes, messages_per_mailbox=messages, seed=42))
    out = []
    for mb in model.mailboxes.values():
        for m in mb.msgs.values():
            out.append((mb.user.upn, m.id, mb.mime(m)))
    return out


def tenant(storage: str, s3: S3Config | None = None) -> TenantConfig:
    return TenantConfig(name="bench", tenant_id="11111111-2222-3333-4444-555555555555",
                        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                        storage=storage, graph_url="http://127.0.0.1:1/v1.0", s3=s3 or S3Config())


def write(repo, items, threads: int = 4) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        stored = sum(s.new_stored_bytes for s in pool.map(lambda it: repo.put_content(it[2]), items))
    repo.flush()  # the open pack too: everything durable, as a backup leaves it before its commit
    return time.perf_counter() - t0, stored


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def content_bytes(root: str) -> int:
    """What a local repository spends on content (format 2): its packs and index files."""
    return du(os.path.join(root, "packs")) + du(os.path.join(root, "index"))


def restic_size(items, work: str) -> int | None:
    if not shutil.which("restic"):
        return None
    src = os.path.join(work, "eml")
    for upn, mid, data in items:
        d = os.path.join(src, upn)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, mid + ".eml"), "wb") as f:
            f.write(data)
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": os.path.join(work, "restic")}
    subprocess.run(["restic", "init", "--quiet"], env=env, check=True, capture_output=True)
    subprocess.run(["restic", "backup", "--quiet", "--compression", "auto", src], env=env, check=True,
                   capture_output=True)
    version = subprocess.run(["restic", "cat", "config"], env=env, capture_output=True, text=True).stdout
    line("restic repository", " ".join(version.split()))
    return du(os.path.join(work, "restic", "data"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mailboxes", type=int, default=6)
    ap.add_argument("--messages", type=int, default=150)
    args = ap.parse_args(argv)
    items = corpus(args.mailboxes, args.messages)
    raw = sum(len(d) for _, _, d in items)
    print(f"repository benchmark: {len(items)} messages, {raw / 1e6:.1f} MB raw MIME, {args.mailboxes} mailboxes")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as work:
        repo = open_repository(tenant(os.path.join(work, "local")))
        secs, _ = write(repo, items)
        stored = content_bytes(os.path.join(work, "local"))
        line("local folder: write", f"{raw / secs / 1e6:.1f} MB/s, {len(items) / secs:,.0f} items/s")
        secs2, _ = write(repo, items)
        line("local folder: same corpus again (all chunks known)", f"{raw / secs2 / 1e6:.1f} MB/s")
        line("stored bytes / raw bytes (dedup + zstd)", f"{stored / raw:.3f}  ({stored / 1e6:.1f} MB)")
        out.update(local_mb_s=raw / secs, ratio=stored / raw)

        from moto.server import ThreadedMotoServer

        from mailpipe.repo.store import make_s3_client
        from mailpipe_tests.conftest import free_port

        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
            os.environ.setdefault(k, v)
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            make_s3_client(endpoint, "us-east-1").create_bucket(Bucket="bench")
            s3repo = open_repository(tenant("s3://bench/t", S3Config(endpoint_url=endpoint, region="us-east-1")))
            secs3, _ = write(s3repo, items, threads=8)
            line("S3 (moto server on 127.0.0.1, same process): write",
                 f"{raw / secs3 / 1e6:.1f} MB/s, {len(items) / secs3:,.0f} items/s")
            out.update(s3_mb_s=raw / secs3)
        finally:
            server.stop()

        rs = restic_size(items, work)
        if rs is None:
            line("restic", "not installed (apt-get install restic): comparison skipped")
        else:
            line("restic 0.14 (same corpus as .eml files): stored / raw", f"{rs / raw:.3f}  ({rs / 1e6:.1f} MB)")
            line("mailpipe stored / restic stored", f"{stored / rs:.3f}")
            out.update(restic_ratio=rs / raw, vs_restic=stored / rs)
    return out


if __name__ == "__main__":
    main()
