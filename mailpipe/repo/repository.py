"""The backup repository of one tenant: deduplicated content, Parquet manifests, atomic snapshots.

Layout and guarantees are documented in docs/FORMAT.md. In short:

- ``blobs/<h[:2]>/<h>``: a chunk named by the sha256 of its raw bytes, stored as a zstd frame. Written
  once, never rewritten; an existing chunk is not uploaded again; racing writers write identical bytes.
- ``mailboxes/<user>/snapshots/<id>/{manifest,folders}.parquet`` then ``snapshot.json``, last: the
  commit. A snapshot without ``snapshot.json`` does not exist for readers; a committed one never changes.
- ``mailboxes/<user>/checkpoints/<part>.parquet``: items an unfinished backup already stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.repo import chunking
from mailpipe.repo.schema import CHECKPOINT, FOLDERS, MANIFEST, to_batch
from mailpipe.repo.store import KeyNotFound, LocalStore, ObjectStore, S3Store, make_s3_client

FORMAT = "mailpipe-repository"
VERSION = 1
ZSTD_LEVEL = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SNAP_ID = re.compile(r"^\d{8}T\d{6}(\.\d{6})?Z-[0-9a-f]{4,8}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")


class RepositoryError(UserError):
    """A repository that cannot be used as asked (wrong tenant, unknown format, missing snapshot)."""


class IntegrityError(Exception):
    """Stored data does not match its hash, or a chunk is missing: never return wrong bytes."""


@dataclass(frozen=True)
class StoredContent:
    sha256: str
    size: int
    chunks: list[str]
    new_chunks: int
    new_stored_bytes: int


@dataclass
class SnapshotInfo:
    snapshot_id: str
    user_id: str
    upn: str
    started_at: datetime | None
    committed_at: datetime
    items: int
    size_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)
    delta_links: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["version"] = VERSION
        d["started_at"] = self.started_at.isoformat() if self.started_at else None
        d["committed_at"] = self.committed_at.isoformat()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotInfo:
        return cls(
            snapshot_id=d["snapshot_id"], user_id=d["user_id"], upn=d["upn"],
            started_at=datetime.fromisoformat(d["started_at"]) if d.get("started_at") else None,
            committed_at=datetime.fromisoformat(d["committed_at"]), items=int(d["items"]),
            size_bytes=int(d["size_bytes"]), stats=d.get("stats") or {}, delta_links=d.get("delta_links") or {},
            skipped=d.get("skipped") or [],
        )


def mailbox_dir(user_id: str) -> str:
    """The key component for a mailbox: the Entra object id when it looks like one, else a hash of it
    (``h-…``), so no user id can address anything outside ``mailboxes/``."""
    if _SAFE_ID.match(user_id):
        return user_id.lower()
    return "h-" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def new_snapshot_id(now: datetime | None = None, after: str | None = None) -> str:
    """``YYYYMMDDTHHMMSS.ffffffZ-<random>``: sorts by time (to the microsecond), and — given the id of the
    mailbox's latest snapshot — always after it, even if the clock stepped back."""
    now = now or datetime.now(timezone.utc)
    sid = now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)
    if after is not None and sid[:23] <= after[:23]:
        prev = datetime.strptime(after[:22], "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc)
        sid = (prev + timedelta(microseconds=1)).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)
    return sid


def _blob_key(h: str) -> str:
    return f"blobs/{h[:2]}/{h}"


class Repository:
    def __init__(self, store: ObjectStore, tenant: str, info: dict[str, Any]) -> None:
        self.store = store
        self.tenant = tenant
        self.info = info
        self._known: OrderedDict[str, None] = OrderedDict()  # chunks known to exist (bounded LRU)
        self._known_max = 200_000  # ~40 MB: the hot set of shared attachments, not every chunk ever seen
        self._lock = threading.Lock()
        self._tls = threading.local()

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, store: ObjectStore, tenant: str, *, create: bool = True) -> Repository:
        try:
            info = json.loads(store.get_bytes("mailpipe.json"))
        except KeyNotFound:
            if not create:
                raise RepositoryError(f"no mailpipe repository at {store.describe()}") from None
            info = {"format": FORMAT, "version": VERSION, "tenant": tenant,
                    "created_at": datetime.now(timezone.utc).isoformat(), "hash": "sha256",
                    "compression": {"algorithm": "zstd", "level": ZSTD_LEVEL}, "chunking": chunking.PARAMS}
            store.put_bytes("mailpipe.json", json.dumps(info, indent=2).encode())
        if info.get("format") != FORMAT:
            raise RepositoryError(f"{store.describe()} is not a mailpipe repository")
        if info.get("version") != VERSION:
            raise RepositoryError(f"{store.describe()}: repository format version {info.get('version')} is not "
                                  f"supported by this mailpipe (it reads version {VERSION})")
        if info.get("tenant") != tenant:
            raise RepositoryError(f"{store.describe()} belongs to tenant {info.get('tenant')!r}, not {tenant!r}: "
                                  "one repository per tenant")
        return cls(store, tenant, info)

    # -- content -----------------------------------------------------------------------------------
    def _zc(self) -> zstandard.ZstdCompressor:
        c = getattr(self._tls, "zc", None)
        if c is None:
            c = self._tls.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c

    def _zd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._tls, "zd", None)
        if d is None:
            d = self._tls.zd = zstandard.ZstdDecompressor()
        return d

    def _is_known(self, h: str) -> bool:
        with self._lock:
            if h in self._known:
                self._known.move_to_end(h)
                return True
        return False

    def _remember(self, h: str) -> None:
        with self._lock:
            self._known[h] = None
            if len(self._known) > self._known_max:
                self._known.popitem(last=False)

    def put_content(self, data: bytes) -> StoredContent:
        """Store one item's MIME (thread-safe). Chunks that exist are not uploaded again."""
        hashes: list[str] = []
        new_chunks = new_bytes = 0
        for piece in chunking.split(data):
            h = hashlib.sha256(piece).hexdigest()
            hashes.append(h)
            if self._is_known(h):
                continue
            key = _blob_key(h)
            if not self.store.exists(key):
                blob = self._zc().compress(piece)
                self.store.put_bytes(key, blob)
                new_chunks += 1
                new_bytes += len(blob)
            self._remember(h)
        whole = hashes[0] if len(hashes) == 1 else hashlib.sha256(data).hexdigest()  # one chunk: same hash
        return StoredContent(whole, len(data), hashes, new_chunks, new_bytes)

    def _chunk(self, h: str, item: str) -> bytes:
        if not _HEX64.match(h):
            raise IntegrityError(f"{item}: invalid chunk name {h!r} in the manifest")
        try:
            blob = self.store.get_bytes(_blob_key(h))
        except KeyNotFound:
            raise IntegrityError(f"{item}: chunk {h} is missing from the repository") from None
        try:
            piece = self._zd().decompress(blob)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{item}: chunk {h} is corrupt ({e})") from None
        if hashlib.sha256(piece).hexdigest() != h:
            raise IntegrityError(f"{item}: chunk {h} is corrupt (hash mismatch)")
        return piece

    def iter_content(self, sha256: str, chunks: list[str], size: int, *, item: str = "item") -> Iterator[bytes]:
        """The item's bytes chunk by chunk; every chunk is verified, and the whole item at the end
        (the last piece is only yielded once the whole item's hash matches)."""
        total = hashlib.sha256()
        n = 0
        pending: bytes | None = None
        for h in chunks:
            piece = self._chunk(h, item)
            total.update(piece)
            n += len(piece)
            if pending is not None:
                yield pending
            pending = piece
        if n != size or total.hexdigest() != sha256:
            raise IntegrityError(f"{item}: reassembled content does not match its sha256/size "
                                 f"(got {n} bytes, expected {size})")
        if pending is not None:
            yield pending

    def verify_chunk(self, h: str, *, item: str = "item") -> int:
        """Download, decompress and hash one chunk: its length, or :class:`IntegrityError` naming ``item``."""
        return len(self._chunk(h, item))

    def iter_chunk_names(self) -> Iterator[str]:
        """Every chunk in the repository (one listing of ``blobs/``)."""
        for key in self.store.list("blobs"):
            name = key.rsplit("/", 1)[-1]
            if _HEX64.match(name):
                yield name

    def read_content(self, sha256: str, chunks: list[str], size: int, *, item: str = "item") -> bytes:
        return b"".join(self.iter_content(sha256, chunks, size, item=item))

    # -- snapshots -----------------------------------------------------------------------------------
    def _snap_prefix(self, user_id: str) -> str:
        return f"mailboxes/{mailbox_dir(user_id)}/snapshots"

    def begin_snapshot(self, user_id: str, upn: str, *, after: str | None = None) -> SnapshotWriter:
        """A writer for the mailbox's next snapshot; ``after``: the id of its latest snapshot (looked up
        when not given), which the new id sorts after."""
        if after is None:
            latest = self.latest_snapshot(user_id)
            after = latest.snapshot_id if latest else None
        return SnapshotWriter(self, user_id, upn, after=after)

    def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        out = []
        for key in self.store.list(self._snap_prefix(user_id)):
            parts = key.split("/")
            if parts[-1] == "snapshot.json" and _SNAP_ID.match(parts[-2]):
                out.append(self._read_info(key))
        return sorted(out, key=lambda s: s.snapshot_id)

    def _read_info(self, key: str) -> SnapshotInfo:
        return SnapshotInfo.from_json(json.loads(self.store.get_bytes(key)))

    def latest_snapshot(self, user_id: str) -> SnapshotInfo | None:
        ids = [k.split("/")[-2] for k in self.store.list(self._snap_prefix(user_id))
               if k.endswith("/snapshot.json") and _SNAP_ID.match(k.split("/")[-2])]
        if not ids:
            return None
        return self.read_snapshot(user_id, max(ids))

    def read_snapshot(self, user_id: str, snapshot_id: str) -> SnapshotInfo:
        if snapshot_id == "latest":
            s = self.latest_snapshot(user_id)
            if s is None:
                raise RepositoryError(f"mailbox {user_id} has no snapshot")
            return s
        if not _SNAP_ID.match(snapshot_id):
            raise RepositoryError(f"not a snapshot id: {snapshot_id!r}")
        try:
            return self._read_info(f"{self._snap_prefix(user_id)}/{snapshot_id}/snapshot.json")
        except KeyNotFound:
            raise RepositoryError(f"mailbox {user_id} has no committed snapshot {snapshot_id}") from None

    def _parquet(self, key: str) -> tuple[pq.ParquetFile, str | None]:
        if isinstance(self.store, LocalStore):
            return pq.ParquetFile(self.store.local_path(key)), None
        fd, tmp = tempfile.mkstemp(prefix="mailpipe-", suffix=".parquet")
        os.close(fd)
        self.store.get_file(key, tmp)
        return pq.ParquetFile(tmp), tmp

    def _iter_parquet(self, key: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        pf, tmp = self._parquet(key)
        try:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        finally:
            pf.close()
            if tmp:
                os.unlink(tmp)

    def iter_manifest(self, user_id: str, snapshot_id: str, *, batch_size: int = 10_000,
                      columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        snap = self.read_snapshot(user_id, snapshot_id)  # committed snapshots only
        return self._iter_parquet(f"{self._snap_prefix(user_id)}/{snap.snapshot_id}/manifest.parquet",
                                  batch_size, columns)

    def read_folders(self, user_id: str, snapshot_id: str) -> pa.Table:
        snap = self.read_snapshot(user_id, snapshot_id)
        batches = list(self._iter_parquet(f"{self._snap_prefix(user_id)}/{snap.snapshot_id}/folders.parquet",
                                          65536, None))
        return pa.Table.from_batches(batches, schema=FOLDERS)

    def list_mailboxes(self) -> list[tuple[str, str]]:
        """(user id, upn of its latest snapshot) for every mailbox with a committed snapshot."""
        latest: dict[str, str] = {}
        for key in self.store.list("mailboxes"):
            parts = key.split("/")
            if len(parts) == 5 and parts[2] == "snapshots" and parts[4] == "snapshot.json":
                if parts[3] > latest.get(parts[1], ""):
                    latest[parts[1]] = parts[3]
        out = []
        for d, sid in sorted(latest.items()):
            info = self._read_info(f"mailboxes/{d}/snapshots/{sid}/snapshot.json")
            out.append((info.user_id, info.upn))
        return sorted(out, key=lambda x: x[1])

    def find_mailbox(self, upn_or_id: str) -> str | None:
        q = upn_or_id.lower()
        for uid, upn in self.list_mailboxes():
            if q in (uid.lower(), upn.lower()):
                return uid
        return None

    # -- checkpoints ---------------------------------------------------------------------------------
    def _ckpt_prefix(self, user_id: str) -> str:
        return f"mailboxes/{mailbox_dir(user_id)}/checkpoints"

    def write_checkpoint(self, user_id: str, rows: list[dict[str, Any]]) -> str:
        """A new checkpoint part listing items already stored (atomic: whole or absent)."""
        name = new_snapshot_id() + secrets.token_hex(2) + ".parquet"
        fd, tmp = tempfile.mkstemp(prefix="mailpipe-ckpt-", suffix=".parquet")
        os.close(fd)
        try:
            pq.write_table(pa.Table.from_batches([to_batch(rows, CHECKPOINT)]), tmp, compression="zstd")
            self.store.put_file(f"{self._ckpt_prefix(user_id)}/{name}", tmp)
        finally:
            os.unlink(tmp)
        return name

    def list_checkpoints(self, user_id: str) -> list[str]:
        return sorted(k for k in self.store.list(self._ckpt_prefix(user_id)) if k.endswith(".parquet"))

    def iter_checkpoint_rows(self, user_id: str) -> Iterator[pa.RecordBatch]:
        for key in self.list_checkpoints(user_id):
            yield from self._iter_parquet(key, 10_000, None)

    def compact_checkpoints(self, user_id: str) -> int:
        """Merge the checkpoint parts into one (streaming: bounded memory); returns the parts merged.
        The merged part is written before the old ones are deleted: a crash in between leaves duplicate
        rows, which readers tolerate (same item, same content)."""
        keys = self.list_checkpoints(user_id)
        if len(keys) < 2:
            return 0
        name = new_snapshot_id() + secrets.token_hex(2) + ".parquet"
        fd, tmp = tempfile.mkstemp(prefix="mailpipe-ckpt-", suffix=".parquet")
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, CHECKPOINT, compression="zstd") as w:
                for key in keys:
                    for batch in self._iter_parquet(key, 10_000, None):
                        w.write_batch(batch)
            self.store.put_file(f"{self._ckpt_prefix(user_id)}/{name}", tmp)
        finally:
            os.unlink(tmp)
        for key in keys:
            self.store.delete(key)
        return len(keys)

    def clear_checkpoints(self, user_id: str) -> None:
        for key in self.list_checkpoints(user_id):
            self.store.delete(key)


class SnapshotWriter:
    """Streams a snapshot's manifest to a local temporary Parquet file (row group by row group), then
    uploads it, the folders table, and finally ``snapshot.json``: the commit."""

    def __init__(self, repo: Repository, user_id: str, upn: str, after: str | None = None) -> None:
        self.repo = repo
        self.user_id = user_id
        self.upn = upn
        self.snapshot_id = new_snapshot_id(after=after if after and _SNAP_ID.match(after) and "." in after else None)
        self._dir = tempfile.mkdtemp(prefix="mailpipe-snap-")
        self._manifest_path = os.path.join(self._dir, "manifest.parquet")
        self._writer = pq.ParquetWriter(self._manifest_path, MANIFEST, compression="zstd")
        self._folders: list[dict[str, Any]] = []
        self.items = 0
        self.size_bytes = 0
        self._done = False

    def add_items(self, rows: list[dict[str, Any]] | pa.RecordBatch) -> None:
        batch = rows if isinstance(rows, pa.RecordBatch) else to_batch(rows, MANIFEST)
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.items += batch.num_rows
            self.size_bytes += int(pc.sum(batch.column("size")).as_py() or 0)

    def set_folders(self, rows: list[dict[str, Any]]) -> None:
        self._folders = list(rows)

    def commit(self, *, delta_links: dict[str, str], stats: dict[str, Any], skipped: list[dict[str, Any]],
               started_at: datetime | None = None) -> SnapshotInfo:
        if self._done:
            raise RuntimeError("snapshot already committed or aborted")
        self._writer.close()
        prefix = f"{self.repo._snap_prefix(self.user_id)}/{self.snapshot_id}"
        folders_path = os.path.join(self._dir, "folders.parquet")
        pq.write_table(pa.Table.from_batches([to_batch(self._folders, FOLDERS)]), folders_path, compression="zstd")
        self.repo.store.put_file(f"{prefix}/manifest.parquet", self._manifest_path)
        self.repo.store.put_file(f"{prefix}/folders.parquet", folders_path)
        info = SnapshotInfo(
            snapshot_id=self.snapshot_id, user_id=self.user_id, upn=self.upn, started_at=started_at,
            committed_at=datetime.now(timezone.utc), items=self.items, size_bytes=self.size_bytes,
            stats=dict(stats), delta_links=dict(delta_links), skipped=list(skipped),
        )
        self.repo.store.put_bytes(f"{prefix}/snapshot.json", json.dumps(info.to_json(), indent=1,
                                                                        default=str).encode())
        self._cleanup()
        return info

    def abort(self) -> None:
        """Nothing was committed: drop the local files (uploaded Parquet files, if any, stay invisible)."""
        if not self._done:
            try:
                self._writer.close()
            except Exception:
                pass
            self._cleanup()

    def _cleanup(self) -> None:
        self._done = True
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)


def open_repository(tenant: TenantConfig, *, s3_client: Any = None, create: bool = True) -> Repository:
    """The tenant's repository: ``s3://bucket/prefix`` or a local folder (path or ``file://`` URL)."""
    storage = tenant.storage
    if storage.startswith("s3://"):
        bucket, _, prefix = storage[5:].partition("/")
        client = s3_client or make_s3_client(tenant.s3.endpoint_url, tenant.s3.region)
        store: ObjectStore = S3Store(client, bucket, prefix)
    else:
        path = storage[7:] if storage.startswith("file://") else storage
        store = LocalStore(os.path.expanduser(path))
    return Repository.open(store, tenant.name, create=create)
