"""Helpers shared by the engine's end-to-end tests: run backups, read snapshots, compare with the simulator's
ground truth."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from mailpipe.backup import backup_mailboxes
from mailpipe.graph import RetryPolicy
from mailpipe.settings import Settings

FAST = {"policy": RetryPolicy(max_attempts=8, base_delay=0.02, max_delay=0.2)}
# short pauses for the in-backup retries of items, and short leases (tests kill holders)
TEST_SETTINGS = Settings(item_retry_delay=0.05, lease_seconds=5)


def backup(t, upns, *, settings: Settings | None = None, **kw):
    kw.setdefault("graph_options", FAST)
    return asyncio.run(backup_mailboxes(t, upns, settings=settings or TEST_SETTINGS, **kw))


def snapshot_items(repo, user_id, snapshot_id="latest", verify=True):
    """{item_id: (folder_path, sha256)} of a snapshot; with verify, every item's bytes are read back and
    checked against its sha256 (read_content raises on any mismatch)."""
    out = {}
    for b in repo.iter_manifest(user_id, snapshot_id):
        for r in b.to_pylist():
            if verify:
                repo.read_content(r["sha256"], r["chunks"], r["size"], item=r["item_id"])
            assert r["item_id"] not in out, "duplicate item in a snapshot"
            out[r["item_id"]] = (tuple(r["folder_path"]), r["sha256"])
    return out


def truth_items(truth, upn):
    return {i["id"]: (tuple(i["folder_path"]), i["sha256"]) for i in truth["mailboxes"][upn]["items"]}


def downloads(sim) -> dict[str, Counter]:
    return {u: Counter(v) for u, v in sim.stats()["mime_downloads"].items()}


def mailbox_upns(sim):
    return list(sim.truth()["mailboxes"])


def commit_record(repo, user_id, snapshot_id="latest") -> dict[str, Any]:
    """The raw ``snapshot.json`` of a snapshot (what is on disk, not the parsed record)."""
    sid = repo.read_snapshot(user_id, snapshot_id).snapshot_id
    return json.loads(repo.store.get_bytes(f"{repo._snap_prefix(user_id)}/{sid}/snapshot.json"))


class S3Errors:
    """Make a real botocore client receive an S3 error (``code``, HTTP ``status``) for the next ``n``
    requests of operation ``op``, at its HTTP layer (the 'before-send' event): the client parses a real
    error document, as from S3. Used with botocore's own retries off, so what is left to retry is ours."""

    def __init__(self, client, op: str, n: int, code: str = "SlowDown", status: int = 503,
                 message: str = "Reduce your request rate.") -> None:
        self.left = n
        self.seen = 0
        self.body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.status = status
        client.meta.events.register(f"before-send.s3.{op}", self)

    def __call__(self, request, **kw):
        from botocore.awsrequest import AWSResponse

        self.seen += 1
        if self.left <= 0:
            return None
        self.left -= 1
        body = self.body

        class Raw:
            def stream(self, **k):
                yield body

        return AWSResponse(request.url, self.status, {}, Raw())
