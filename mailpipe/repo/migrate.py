"""``mailpipe migrate``: a version-1 repository (one object per chunk under ``blobs/``) to version 2 (packs).

Chunk names do not change (SHA-256 of the raw bytes: a version-2 repository without encryption names
chunks the same way), so manifests, checkpoints and snapshots stay as they are; only where chunks live
changes. Order, so that an interruption loses nothing and a second run finishes the job: every chunk
is read, verified and written into packs (with their index); then ``mailpipe.json`` says version 2; then
``blobs/`` is deleted. A chunk that does not verify is not copied: it is marked damaged, and the next
backup of a mailbox that uses it downloads the item again (docs/ENGINE.md, "Self-heal").
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timezone
from typing import Any

import zstandard

from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.repo.packs import PACK_TARGET, is_hex64
from mailpipe.repo.repository import FORMAT, VERSION, Repository, RepositoryError, open_store
from mailpipe.repo.store import KeyNotFound


def migrate_v1(tenant: TenantConfig, *, tmp_dir: str | None = None, s3_client: Any = None) -> str:
    store = open_store(tenant, s3_client=s3_client)
    try:
        info = json.loads(store.get_bytes("mailpipe.json"))
    except KeyNotFound:
        raise RepositoryError(f"tenant {tenant.name}: no mailpipe repository at {store.describe()}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise RepositoryError(f"tenant {tenant.name}: {store.describe()} is not a mailpipe repository")
    if info.get("version") == VERSION:
        return f"{store.describe()} is already format version {VERSION}: nothing to do"
    if info.get("version") != 1:
        raise RepositoryError(f"tenant {tenant.name}: cannot migrate format version {info.get('version')}")
    if info.get("tenant") != tenant.name:
        raise RepositoryError(f"{store.describe()} belongs to tenant {info.get('tenant')!r}, not {tenant.name!r}")
    if tenant.encryption is not None:
        raise UserError(f"tenant {tenant.name}: a migrated repository is not encrypted (encryption is chosen when a "
                        "repository is created, and encrypting would rename every chunk): remove `encryption:` "
                        "for this tenant, or back up into a new, encrypted repository")
    new_info = {**info, "version": VERSION, "id": secrets.token_hex(16), "packs": {"target_bytes": PACK_TARGET},
                "encryption": None, "migrated_from": 1, "migrated_at": datetime.now(timezone.utc).isoformat()}
    repo = Repository(store, tenant.name, new_info, tmp_dir=tmp_dir)
    busy = repo.live_leases()
    if busy:
        raise UserError(f"tenant {tenant.name}: {len(busy)} backup(s) or restore(s) are running (e.g. "
                        f"{busy[0].get('upn')}): migrate with nothing running")
    repo.sync_index()  # packs of an interrupted migration are not written again
    copied = damaged = 0
    zd = zstandard.ZstdDecompressor()
    for key in list(store.list("blobs")):
        h = key.rsplit("/", 1)[-1]
        if not is_hex64(h) or repo.index.has(h):
            continue
        try:
            blob = store.get_bytes(key)
            ok = hashlib.sha256(zd.decompress(blob)).hexdigest() == h
        except (KeyNotFound, zstandard.ZstdError):
            ok, blob = False, b""
        if not ok:
            repo.mark_damaged(h, "found by mailpipe migrate (corrupt in the version-1 store)")
            damaged += 1
            continue
        repo._add_blob(h, blob, False)  # a version-1 chunk file is exactly a version-2 blob (unencrypted)
        copied += 1
    repo.flush()
    store.put_bytes("mailpipe.json", json.dumps(new_info, indent=2).encode())
    removed = 0
    for key in list(store.list("blobs")):
        store.delete(key)
        removed += 1
    return (f"{store.describe()}: migrated to format version {VERSION}: {copied} chunks copied into "
            f"{repo.packs_written} packs, {removed} version-1 chunk files removed"
            + (f", {damaged} corrupt chunks marked for repair by the next backups" if damaged else ""))
