"""The backup repository of one tenant: deduplicated content, Parquet manifests, atomic snapshots.

Layout and guarantees are documented in docs/FORMAT.md. In short:

- ``packs/<p[:2]>/<p>`` and ``index/<i[:2]>/<i>``: chunks (named by the SHA-256 of their raw bytes, or by
  a keyed HMAC in an encrypted repository), zstd-compressed, many per pack; the index says where each is
  (:mod:`mailpipe.repo.packs`). A stored chunk is not uploaded again.
- ``keys/<id>``: in an encrypted repository, the master key wrapped by each passphrase
  (:mod:`mailpipe.repo.crypto`); every other object is sealed with AES-256-GCM.
- ``mailboxes/<user>/snapshots/<id>/{manifest,folders}.parquet`` then ``snapshot.json``, last: the
  commit. A snapshot without ``snapshot.json`` does not exist for readers; a committed one never changes.
- ``mailboxes/<user>/checkpoints/<part>.parquet``: items an unfinished backup already stored.
- ``mailboxes/<user>/lease.json``: who is backing the mailbox up now (conditional writes, with expiry).
- ``damaged/<h>``: a chunk found missing or corrupt; the next backup that meets an item using it
  downloads the item again and rewrites the chunk (self-heal).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
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
from mailpipe.repo import chunking, crypto
from mailpipe.repo.packs import (
    PACK_TARGET,
    ChunkIndex,
    OpenPack,
    PackFormatError,
    decode_header,
    decode_index,
    decode_trailer,
    encode_index,
    index_cache_path,
    index_key,
    pack_key,
)
from mailpipe.repo.schema import CHECKPOINT, FIDELITY, FOLDERS, MANIFEST, to_batch
from mailpipe.repo.store import (
    KeyNotFound,
    LocalStore,
    ObjectLocked,
    ObjectStore,
    PreconditionFailed,
    S3Store,
    StoreError,
    make_s3_client,
)

FORMAT = "mailpipe-repository"
VERSION = 2
ZSTD_LEVEL = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SNAP_ID = re.compile(r"^\d{8}T\d{6}(\.\d{6})?Z-[0-9a-f]{4,8}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")


class RepositoryError(UserError):
    """A repository that cannot be used as asked (wrong tenant, unknown format, missing snapshot)."""


class IntegrityError(Exception):
    """Stored data does not match its hash, or a chunk is missing, or a file cannot be parsed: never
    return wrong bytes."""


class LeaseBusy(UserError):
    """Another backup of the mailbox holds its lease."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


# What a Parquet reader raises for a damaged file (pyarrow's ArrowException is an OSError or ValueError)
PARQUET_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError)
JOURNAL_PREFIX = "journal-"  # local checkpoint parts in a backup's work dir (Repository.write_journal)


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
    delta_links: dict[str, str] = field(default_factory=dict)   # folder id → link relative to graph_url
    skipped: list[dict[str, Any]] = field(default_factory=list)  # what was left out, and why (for people)
    pending: list[dict[str, Any]] | None = None  # items the next backup fetches whatever the delta says
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {sha256, size} of the Parquet files
    base: dict[str, Any] = field(default_factory=dict)  # what this backup started from (and what it skipped)
    # the export API's part (content: fidelity): {items, size_bytes, by_type, delta_links, folders, pending}
    fidelity: dict[str, Any] = field(default_factory=dict)

    def pending_items(self) -> list[dict[str, Any]]:
        """Items the next backup must fetch: ``pending``, or for format-1 records the skipped items."""
        if self.pending is not None:
            return list(self.pending)
        return [s for s in self.skipped if s.get("item_id") and s.get("folder_id")]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["version"] = VERSION
        d["started_at"] = self.started_at.isoformat() if self.started_at else None
        d["committed_at"] = self.committed_at.isoformat()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotInfo:
        def of(name: str, kind: type) -> Any:
            v = d.get(name)
            if v is not None and not isinstance(v, kind):
                raise ValueError(f"field {name!r} is not a {kind.__name__}")
            return v

        return cls(
            snapshot_id=str(d["snapshot_id"]), user_id=str(d["user_id"]), upn=str(d["upn"]),
            started_at=datetime.fromisoformat(d["started_at"]) if d.get("started_at") else None,
            committed_at=datetime.fromisoformat(d["committed_at"]), items=int(d["items"]),
            size_bytes=int(d["size_bytes"]), stats=of("stats", dict) or {}, delta_links=of("delta_links", dict) or {},
            skipped=of("skipped", list) or [], pending=of("pending", list), files=of("files", dict) or {},
            base=of("base", dict) or {}, fidelity=of("fidelity", dict) or {},
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


class Repository:
    def __init__(self, store: ObjectStore, tenant: str, info: dict[str, Any], *, tmp_dir: str | None = None,
                 cipher: crypto.Cipher | None = None) -> None:
        self.store = store
        self.tenant = tenant
        self.info = info
        self.repo_id = str(info["id"])
        self.cipher = cipher  # None: a repository without encryption
        self.tmp_dir = tmp_dir  # local temporary files (Parquet in transit, the index cache); None: the system's
        self._known: OrderedDict[str, None] = OrderedDict()  # chunks known to exist (bounded LRU)
        self._known_max = 200_000  # ~40 MB: the hot set of shared attachments, not every chunk ever seen
        self._lock = threading.Lock()
        self._tls = threading.local()
        self.damaged: set[str] = set()  # chunks to rewrite when their bytes come by (see load_damaged)
        self.index = ChunkIndex(index_cache_path(tmp_dir, self.repo_id))
        self._index_synced = False
        self.excluded: frozenset[str] = frozenset()  # packs a prune plans to delete: never reused (docs/FORMAT.md)
        self.index_problems: list[str] = []  # index files that could not be read (check reports them)
        self._pack = OpenPack()
        self._pack_repairs: set[str] = set()
        self._pack_cv = threading.Condition()  # guards _pack, _pack_repairs, _uploading
        self._uploading = 0
        self._inflight: list[set[str]] = []  # chunk ids of the packs being uploaded (not yet indexed)
        self._requeued = False  # an upload failed and its blobs went back into the open pack
        self.packs_written = 0
        self.pack_bytes_written = 0

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, store: ObjectStore, tenant: str, *, create: bool = True, tmp_dir: str | None = None,
             passphrase: str | None = None, encrypt_new: bool = False) -> Repository:
        """Open (or create, with ``create``) the repository. ``passphrase``: the tenant's, when its
        configuration has one; a new repository is encrypted when ``encrypt_new`` (then it must be given)."""
        try:
            raw = store.get_bytes("mailpipe.json")
        except KeyNotFound:
            if not create:
                raise RepositoryError(f"no mailpipe repository at {store.describe()}") from None
            cls._create(store, tenant, passphrase if encrypt_new else None)
            raw = store.get_bytes("mailpipe.json")
        try:
            info = json.loads(raw)
        except ValueError:
            raise RepositoryError(f"{store.describe()}: mailpipe.json is damaged (not JSON)") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise RepositoryError(f"{store.describe()} is not a mailpipe repository")
        if info.get("version") == 1:
            raise RepositoryError(
                f"{store.describe()}: repository format version 1 (one object per chunk); this mailpipe reads and "
                f"writes version {VERSION} (packs, encryption). Convert it once with `mailpipe migrate "
                f"{tenant}` (docs/FORMAT.md, \"Migrating from version 1\"), with no backup running.")
        if info.get("version") != VERSION:
            raise RepositoryError(f"{store.describe()}: repository format version {info.get('version')} is not "
                                  f"supported by this mailpipe (it reads version {VERSION})")
        if info.get("tenant") != tenant:
            raise RepositoryError(f"{store.describe()} belongs to tenant {info.get('tenant')!r}, not {tenant!r}: "
                                  "one repository per tenant")
        cipher = None
        if info.get("encryption"):
            if not passphrase:
                raise RepositoryError(f"{store.describe()} is encrypted: configure the tenant's "
                                      "encryption.passphrase_env (docs/CONFIG.md)")
            cipher = crypto.Cipher.from_master(cls._unlock(store, passphrase), str(info["id"]))
        elif encrypt_new:
            raise RepositoryError(f"{store.describe()} was created without encryption, and encryption is chosen "
                                  "when a repository is created: back up into a new repository to encrypt")
        return cls(store, tenant, info, tmp_dir=tmp_dir, cipher=cipher)

    @staticmethod
    def _create(store: ObjectStore, tenant: str, passphrase: str | None) -> None:
        info: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "tenant": tenant, "id": secrets.token_hex(16),
            "created_at": datetime.now(timezone.utc).isoformat(), "hash": "sha256",
            "compression": {"algorithm": "zstd", "level": ZSTD_LEVEL}, "chunking": chunking.PARAMS,
            "packs": {"target_bytes": PACK_TARGET}, "encryption": None}
        if passphrase:
            info["encryption"] = {"algorithm": crypto.ALGORITHM, "kdf": "scrypt", "chunk_id": "HMAC-SHA256",
                                  "key_derivation": "HKDF-SHA256"}
            key_id, key_file = crypto.make_key_file(crypto.new_master_key(), passphrase, note="created with the repository")
            store.put_bytes(f"keys/{key_id}", key_file)  # before mailpipe.json: a repository never lacks its key
        try:
            store.put_if_absent("mailpipe.json", json.dumps(info, indent=2).encode())
        except PreconditionFailed:  # another process created it first: use theirs
            pass

    @staticmethod
    def _unlock(store: ObjectStore, passphrase: str) -> bytes:
        names = list(crypto.iter_key_ids(store.list("keys")))
        for key_id in names:
            try:
                master = crypto.open_key_file(store.get_bytes(f"keys/{key_id}"), passphrase)
            except KeyNotFound:
                continue
            if master is not None:
                return master
        if not names:
            raise RepositoryError(f"{store.describe()} is encrypted but has no key file (keys/ is empty): "
                                  "its data cannot be read")
        raise RepositoryError(f"{store.describe()}: wrong passphrase (no key file of the repository opens with it)")

    # -- keys (mailpipe key add|passwd|list|remove) ------------------------------------------------------------
    def list_keys(self) -> list[dict[str, Any]]:
        return [{**crypto.key_file_info(self.store.get_bytes(f"keys/{k}")), "id": k}
                for k in crypto.iter_key_ids(self.store.list("keys"))]

    def add_key(self, master_passphrase: str, new_passphrase: str, note: str = "") -> str:
        """Wrap the master key under one more passphrase (no data is re-encrypted); its key id."""
        if self.cipher is None:
            raise RepositoryError(f"{self.store.describe()} is not encrypted: it has no keys")
        master = self._unlock(self.store, master_passphrase)
        key_id, key_file = crypto.make_key_file(master, new_passphrase, note=note)
        self.store.put_bytes(f"keys/{key_id}", key_file)
        return key_id

    def remove_key(self, key_id: str, passphrase: str) -> None:
        """Remove a key file, unless no other key file would be left that ``passphrase`` opens."""
        keys = [k["id"] for k in self.list_keys()]
        if key_id not in keys:
            raise RepositoryError(f"no key {key_id!r} in {self.store.describe()} (keys: {', '.join(keys) or 'none'})")
        others = [k for k in keys if k != key_id]
        if not any(crypto.open_key_file(self.store.get_bytes(f"keys/{k}"), passphrase) for k in others):
            raise RepositoryError(f"removing key {key_id} would leave no key that the current passphrase opens; "
                                  "add another key first (mailpipe key add)")
        self.store.delete(f"keys/{key_id}")

    # -- objects: sealed with the object's key as associated data in an encrypted repository ------------------
    def _seal(self, data: bytes, aad: str) -> bytes:
        return self.cipher.seal(data, aad) if self.cipher else data

    def _unseal(self, blob: bytes, aad: str) -> bytes:
        if self.cipher is None:
            return blob
        try:
            return self.cipher.open(blob, aad)
        except crypto.DecryptError as e:
            raise IntegrityError(str(e)) from None

    def put_object(self, key: str, data: bytes) -> None:
        self.store.put_bytes(key, self._seal(data, key))

    def get_object(self, key: str) -> bytes:
        """An object's bytes, opened and authenticated; damage → :class:`IntegrityError`."""
        return self._unseal(self.store.get_bytes(key), key)

    def write_json(self, key: str, doc: Any, *, indent: int | None = 1) -> None:
        self.put_object(key, json.dumps(doc, indent=indent, default=str,
                                        separators=None if indent else (",", ":")).encode())

    def read_json(self, key: str) -> Any:
        raw = self.get_object(key)
        try:
            return json.loads(raw)
        except ValueError:
            raise IntegrityError(f"{key}: not JSON") from None

    def _json_dict(self, key: str) -> dict[str, Any] | None:
        """A JSON object's document, or None when it is missing, damaged or not an object."""
        try:
            doc = self.read_json(key)
        except (KeyNotFound, IntegrityError):
            return None
        return doc if isinstance(doc, dict) else None

    def _put_local_file(self, key: str, path: str) -> None:
        if self.cipher is None:
            self.store.put_file(key, path)
            return
        sealed = path + ".sealed"
        try:
            self.cipher.seal_file(path, sealed, key)
            self.store.put_file(key, sealed)
        finally:
            if os.path.exists(sealed):
                os.unlink(sealed)

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

    def chunk_id(self, piece: bytes) -> str:
        """A chunk's name: SHA-256 of its raw bytes, or HMAC-SHA256 with the repository's id key."""
        return self.cipher.chunk_id(piece) if self.cipher else hashlib.sha256(piece).hexdigest()

    def put_content(self, data: bytes) -> StoredContent:
        """Store one item's MIME (thread-safe). Chunks that are stored are not uploaded again — unless they
        are known to be damaged (:attr:`damaged`): then these bytes, whose id is the chunk's name, are
        stored again and the damage marker is removed once they are in the repository (self-heal). New
        chunks go into the open pack; they are durable after :meth:`flush` (or when the pack fills)."""
        self.ensure_index()
        hashes: list[str] = []
        new_chunks = new_bytes = 0
        for piece in chunking.split(data):
            h = self.chunk_id(piece)
            hashes.append(h)
            if self._is_known(h):
                continue
            repair = h in self.damaged
            if repair or not self.index.has(h, self.excluded):
                blob = self._seal(self._zc().compress(piece), h)
                if self._add_blob(h, blob, repair):
                    new_chunks += 1
                    new_bytes += len(blob)
            self._remember(h)
        whole = hashes[0] if len(hashes) == 1 and self.cipher is None else hashlib.sha256(data).hexdigest()
        return StoredContent(whole, len(data), hashes, new_chunks, new_bytes)

    # -- packs ----------------------------------------------------------------------------------------------
    def _add_blob(self, h: str, blob: bytes, repair: bool) -> bool:
        with self._pack_cv:
            if h in self._pack.ids or any(h in ids for ids in self._inflight):
                return False  # on its way already (a thread storing the same attachment at the same time)
            self._pack.add(h, blob)
            if repair:
                self._pack_repairs.add(h)
            if self._pack.size < PACK_TARGET:
                return True
            full, repairs = self._take_pack()
        self._upload(full, repairs)
        return True

    def _take_pack(self) -> tuple[OpenPack, set[str]]:
        """(under ``_pack_cv``) the open pack, replaced by an empty one; counted as uploading."""
        full, repairs = self._pack, self._pack_repairs
        self._pack, self._pack_repairs = OpenPack(), set()
        self._uploading += 1
        self._inflight.append(full.ids)
        return full, repairs

    def _upload(self, pack: OpenPack, repairs: set[str]) -> None:
        """Upload a pack, then its index file (the chunks exist for readers from then on). On failure the
        blobs go back into the open pack, so that a later flush stores them: no chunk is ever lost between a
        pack and its index."""
        try:
            data = pack.finish(self._seal)
            pid = secrets.token_hex(32)  # random: a pack written again with the same chunks gets a new name
            self.store.put_bytes(pack_key(pid), data)
            doc = [{"id": pid, "size": len(data), "blobs": pack.entries,
                    "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
            raw = encode_index(doc, self._seal)
            iid = hashlib.sha256(raw).hexdigest()
            self.store.put_bytes(index_key(iid), raw)
            self.index.add_file(iid, decode_index(raw, self._unseal))
        except BaseException:
            with self._pack_cv:
                for (h, _, _), blob in zip(pack.entries, pack.blobs):
                    if h not in self._pack.ids:
                        self._pack.add(h, blob)
                self._pack_repairs |= repairs
                self._requeued = True
                self._inflight.remove(pack.ids)
                self._uploading -= 1
                self._pack_cv.notify_all()
            raise
        for h in repairs:
            self.repaired(h)
        with self._pack_cv:
            self.packs_written += 1
            self.pack_bytes_written += len(data)
            self._inflight.remove(pack.ids)
            self._uploading -= 1
            self._pack_cv.notify_all()

    def flush(self) -> None:
        """Make every chunk stored so far durable: upload the open pack (and its index file) and wait for
        packs other threads are uploading. Backups call it before every checkpoint and before the commit:
        a checkpoint or a manifest never names a chunk that is not in the repository."""
        for _ in range(2):
            with self._pack_cv:
                pack = None
                if self._pack.entries:
                    pack, repairs = self._take_pack()
            if pack is not None:
                self._upload(pack, repairs)
            with self._pack_cv:
                while self._uploading:
                    self._pack_cv.wait()
                if not self._requeued:
                    return
                self._requeued = False  # another thread's upload failed: its blobs are in the open pack now
        raise StoreError(f"{self.store.describe()}: a pack could not be uploaded; its chunks are kept for the "
                         "next attempt")

    def pending_bytes(self) -> int:
        """Bytes in the open pack (not yet durable)."""
        with self._pack_cv:
            return self._pack.size

    # -- the index --------------------------------------------------------------------------------------------
    def ensure_index(self) -> None:
        if not self._index_synced:
            self.sync_index()

    def sync_index(self) -> None:
        """Bring the local index in step with ``index/`` (new files read, removed ones dropped), and read
        the prune plans (their packs are never reused: docs/FORMAT.md, "Prune")."""
        names = {k.rsplit("/", 1)[-1] for k in self.store.list("index")}
        known = self.index.known_files()
        gone = known - names
        if gone:
            self.index.drop_files(gone)
        problems = []
        for name in sorted(names - known):
            if not _HEX64.match(name):
                continue
            try:
                raw = self.store.get_bytes(index_key(name))
                if hashlib.sha256(raw).hexdigest() != name:
                    raise PackFormatError("its content does not match its name")
                self.index.add_file(name, decode_index(raw, self._unseal))
            except KeyNotFound:
                continue  # removed by a prune meanwhile
            except (PackFormatError, IntegrityError) as e:
                problems.append(f"index file {name}: {e}")
        self.index_problems = problems
        self.excluded = frozenset(p for plan in self.prune_plans() for p in plan.get("packs", ()))
        self._index_synced = True

    def refresh_for_backup(self) -> None:
        """Called by each mailbox backup once it holds its lease: the index and prune plans are read again,
        and if a plan appeared since, the known-chunk cache forgets everything (it may hold chunks of packs
        the plan will delete, which this backup must not reuse)."""
        before = self.excluded
        self.sync_index()  # also: chunks a killed attempt of this mailbox packed are reused, not fetched again
        if self.excluded - before:
            with self._lock:
                self._known.clear()

    def chunk_is_reusable(self, h: str) -> bool:
        """Is chunk ``h`` stored in a pack that no prune plans to delete (or in this process's open pack)?"""
        if self.index.has(h, self.excluded):
            return True
        with self._pack_cv:
            return h in self._pack.ids or any(h in ids for ids in self._inflight)

    def prune_plans(self) -> list[dict[str, Any]]:
        """The prune plans waiting for their second pass (``prune/<id>.json``)."""
        plans = []
        for key in self.store.list("prune"):
            if key.endswith(".json") and (plan := self._json_dict(key)) is not None:
                plans.append({**plan, "key": key})
        return plans

    def _chunk(self, h: str, item: str) -> bytes:
        if not _HEX64.match(h):
            raise IntegrityError(f"{item}: invalid chunk name {h!r} in the manifest")
        self.ensure_index()
        locs = self.index.locations(h)
        if not locs:
            self.sync_index()  # stored since we looked, or moved by a prune
            locs = self.index.locations(h)
        if not locs:
            with self._pack_cv:
                blob = self._pack.blob(h)
            if blob is not None:
                return self._piece(h, blob, item)
            raise IntegrityError(f"{item}: chunk {h} is missing from the repository")
        corrupt: IntegrityError | None = None
        for attempt in range(2):
            for pid, off, n in locs:
                try:
                    return self._piece(h, self.store.get_range(pack_key(pid), off, n), item)
                except KeyNotFound:
                    continue
                except IntegrityError as e:
                    corrupt = e  # another copy may be good
            if corrupt is not None or attempt:
                break
            self.sync_index()  # every pack it was in is gone: a prune may have repacked it, look again once
            locs = self.index.locations(h)
        raise corrupt or IntegrityError(f"{item}: chunk {h} is missing from the repository")

    def _piece(self, h: str, blob: bytes, item: str) -> bytes:
        try:
            piece = self._zd().decompress(self._unseal(blob, h))
        except IntegrityError:
            raise IntegrityError(f"{item}: chunk {h} is corrupt (does not decrypt)") from None
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{item}: chunk {h} is corrupt ({e})") from None
        if self.chunk_id(piece) != h:
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

    def has_chunk(self, h: str) -> bool:
        """Is chunk ``h`` in a pack that exists (looked up again: index synced, the pack asked for)?"""
        if not _HEX64.match(h):
            return False
        self.ensure_index()
        if not self.index.locations(h):
            self.sync_index()  # stored since the index was read?
        return any(self.store.exists(pack_key(p)) for p, _, _ in self.index.locations(h))

    def pack_header_problem(self, pid: str) -> str | None:
        """Read pack ``pid``'s header (two ranged GETs) and compare it with what the index lists: None when it
        is whole and agrees, else what is wrong. The header is what the index could be rebuilt from."""
        key = pack_key(pid)
        try:
            info = self.index.pack_info(pid)
            size = info[0] if info else None
            if not size:
                return None
            n = decode_trailer(self.store.get_range(key, size - 8, 8))
            if n + 8 > size:
                return f"pack {pid}: header damaged (length out of range)"
            entries = decode_header(self.store.get_range(key, size - 8 - n, n), self._unseal)
        except KeyNotFound:
            return None  # a lost pack: its chunks are reported (per item) where no other copy exists
        except (PackFormatError, IntegrityError) as e:
            return f"pack {pid}: header damaged ({e})"
        listed = set(entries)
        if not all(b in listed for b in self.index.pack_blobs(pid)):
            return f"pack {pid}: header damaged (it does not list the blobs the index says it holds)"
        return None

    def iter_chunk_names(self) -> Iterator[str]:
        """Every chunk the index lists in a pack that exists (one listing of ``index/`` and ``packs/``)."""
        self.sync_index()
        present = {k.rsplit("/", 1)[-1] for k in self.store.list("packs")}
        missing = frozenset(p for p in self.index.packs() if p not in present)
        yield from self.index.iter_chunks(missing)

    def read_content(self, sha256: str, chunks: list[str], size: int, *, item: str = "item") -> bytes:
        return b"".join(self.iter_content(sha256, chunks, size, item=item))

    # -- damage: found by check or by a backup's verification, repaired by the next backup -----------
    def mark_damaged(self, h: str, reason: str) -> None:
        """Record that chunk ``h`` is missing or corrupt: ``damaged/<h>``. Backups that meet an item using
        it download the item again; :meth:`put_content` then rewrites the chunk and removes the marker."""
        if not _HEX64.match(h):
            return
        with self._lock:
            self.damaged.add(h)
            self._known.pop(h, None)
        self.write_json(f"damaged/{h}", {"chunk": h, "reason": reason[:300],
                                         "found_at": datetime.now(timezone.utc).isoformat()})

    def load_damaged(self) -> set[str]:
        """The chunks marked damaged (one listing of ``damaged/``, usually empty); kept in :attr:`damaged`."""
        found = {k.rsplit("/", 1)[-1] for k in self.store.list("damaged")}
        with self._lock:
            self.damaged = {h for h in found if _HEX64.match(h)}
            for h in self.damaged:
                self._known.pop(h, None)
            return set(self.damaged)

    def repaired(self, h: str) -> None:
        """Chunk ``h`` was just rewritten from bytes whose hash is its name: no longer damaged."""
        with self._lock:
            self.damaged.discard(h)
        self.store.delete(f"damaged/{h}")

    # -- snapshots -----------------------------------------------------------------------------------
    def _snap_prefix(self, user_id: str) -> str:
        return f"mailboxes/{mailbox_dir(user_id)}/snapshots"

    def begin_snapshot(self, user_id: str, upn: str, *, after: str | None = None,
                       tmp_dir: str | None = None) -> SnapshotWriter:
        """A writer for the mailbox's next snapshot; ``after``: the id of its latest snapshot (looked up
        when not given), which the new id sorts after."""
        if after is None:
            ids = self.snapshot_ids(user_id)
            after = ids[-1] if ids else None
        return SnapshotWriter(self, user_id, upn, after=after, tmp_dir=tmp_dir or self.tmp_dir)

    def snapshot_ids(self, user_id: str) -> list[str]:
        """Ids of the mailbox's committed snapshots (those with a ``snapshot.json``), oldest first."""
        ids = [k.split("/")[-2] for k in self.store.list(self._snap_prefix(user_id))
               if k.endswith("/snapshot.json") and _SNAP_ID.match(k.split("/")[-2])]
        return sorted(ids)

    def scan_snapshots(self, user_id: str) -> list[tuple[str, SnapshotInfo | None, str | None]]:
        """Every committed snapshot: (id, its record or None, why it cannot be read or None)."""
        out: list[tuple[str, SnapshotInfo | None, str | None]] = []
        for sid in self.snapshot_ids(user_id):
            try:
                out.append((sid, self._read_info(f"{self._snap_prefix(user_id)}/{sid}/snapshot.json"), None))
            except IntegrityError as e:
                out.append((sid, None, str(e)))
        return out

    def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        """The mailbox's readable snapshots, oldest first (``check`` reports the unreadable ones)."""
        return [info for _, info, _ in self.scan_snapshots(user_id) if info is not None]

    def _read_info(self, key: str) -> SnapshotInfo:
        raw = self.get_object(key)
        try:
            info = SnapshotInfo.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{key}: the commit record is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
        if info.snapshot_id != key.split("/")[-2]:
            raise IntegrityError(f"{key}: the commit record names another snapshot ({info.snapshot_id})")
        return info

    def latest_snapshot(self, user_id: str) -> SnapshotInfo | None:
        ids = self.snapshot_ids(user_id)
        if not ids:
            return None
        return self.read_snapshot(user_id, ids[-1])

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
        except IntegrityError as e:
            raise RepositoryError(f"snapshot {snapshot_id} of mailbox {user_id} is damaged: {e}") from None

    def _local_tmp(self, tmp_dir: str | None, suffix: str) -> str:
        fd, tmp = tempfile.mkstemp(prefix="mailpipe-", suffix=suffix, dir=tmp_dir or self.tmp_dir)
        os.close(fd)
        return tmp

    def _parquet(self, key: str, expect: dict[str, Any] | None, tmp_dir: str | None) -> tuple[pq.ParquetFile, str | None]:
        """Open a Parquet file of the repository, verified: against the size and sha256 its commit record
        gives (``expect``), and page by page against its page checksums. Damage → :class:`IntegrityError`."""
        tmp = sealed = None
        try:
            try:
                if isinstance(self.store, LocalStore):
                    path = self.store.local_path(key)
                else:
                    path = tmp = self._local_tmp(tmp_dir, ".parquet")
                    self.store.get_file(key, tmp)
            except KeyNotFound:
                raise IntegrityError(f"{key}: missing from the repository") from None
            if expect:
                size, digest = _file_digest(path)
                if size != expect.get("size") or digest != expect.get("sha256"):
                    raise IntegrityError(f"{key}: damaged ({size} bytes, sha256 {digest[:12]}…; the commit record "
                                         f"says {expect.get('size')} bytes, {str(expect.get('sha256'))[:12]}…)")
            if self.cipher is not None:
                sealed, path = path, self._local_tmp(tmp_dir, ".parquet")
                try:
                    with open(sealed, "rb") as fin, open(path, "wb") as fout:
                        self.cipher.open_file(fin, fout, key)
                except crypto.DecryptError as e:
                    os.unlink(path)
                    raise IntegrityError(str(e)) from None
                if tmp:
                    os.unlink(tmp)
                tmp = path
            try:
                return pq.ParquetFile(path, page_checksum_verification=True), tmp
            except PARQUET_ERRORS as e:
                raise IntegrityError(f"{key}: unreadable Parquet ({_short_error(e)})") from None
        except BaseException:
            if tmp:
                os.unlink(tmp)
            raise

    def _iter_parquet(self, key: str, batch_size: int, columns: list[str] | None, *,
                      expect: dict[str, Any] | None = None, tmp_dir: str | None = None) -> Iterator[pa.RecordBatch]:
        pf, tmp = self._parquet(key, expect, tmp_dir)
        try:
            it = pf.iter_batches(batch_size=batch_size, columns=columns)
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except PARQUET_ERRORS as e:
                    raise IntegrityError(f"{key}: unreadable Parquet ({_short_error(e)})") from None
                yield batch
        finally:
            pf.close()
            if tmp:
                os.unlink(tmp)

    def iter_manifest(self, user_id: str, snapshot_id: str, *, batch_size: int = 10_000,
                      columns: list[str] | None = None, tmp_dir: str | None = None) -> Iterator[pa.RecordBatch]:
        """The snapshot's manifest, batch by batch, verified (:meth:`_parquet`); damage raises
        :class:`IntegrityError` — possibly after some batches were yielded."""
        snap = self.read_snapshot(user_id, snapshot_id)  # committed snapshots only
        return self._iter_parquet(f"{self._snap_prefix(user_id)}/{snap.snapshot_id}/manifest.parquet",
                                  batch_size, columns, expect=snap.files.get("manifest.parquet"), tmp_dir=tmp_dir)

    def iter_fidelity(self, user_id: str, snapshot_id: str, *, batch_size: int = 10_000,
                      columns: list[str] | None = None, tmp_dir: str | None = None) -> Iterator[pa.RecordBatch]:
        """The snapshot's ``fidelity.parquet`` (the export API's streams), verified like the manifest; nothing
        for a snapshot without one."""
        snap = self.read_snapshot(user_id, snapshot_id)
        if "fidelity.parquet" not in snap.files:
            return iter(())
        return self._iter_parquet(f"{self._snap_prefix(user_id)}/{snap.snapshot_id}/fidelity.parquet",
                                  batch_size, columns, expect=snap.files["fidelity.parquet"], tmp_dir=tmp_dir)

    def read_folders(self, user_id: str, snapshot_id: str, *, tmp_dir: str | None = None) -> pa.Table:
        snap = self.read_snapshot(user_id, snapshot_id)
        batches = list(self._iter_parquet(f"{self._snap_prefix(user_id)}/{snap.snapshot_id}/folders.parquet",
                                          65536, None, expect=snap.files.get("folders.parquet"), tmp_dir=tmp_dir))
        return pa.Table.from_batches(batches, schema=FOLDERS)

    def salvage_content(self, user_id: str, snapshot_id: str, *, tmp_dir: str | None = None) -> Iterator[list[dict]]:
        """What can still be read of a damaged snapshot's manifest: the content columns of every row group
        that decodes (and passes its page checksums). Used as known content — like a checkpoint — so a
        backup whose base is damaged does not download again what the repository holds."""
        key = f"{self._snap_prefix(user_id)}/{snapshot_id}/manifest.parquet"
        try:
            pf, tmp = self._parquet(key, None, tmp_dir)
        except (IntegrityError, KeyNotFound, StoreError):
            return
        cols = [c for c in CHECKPOINT.names if c in pf.schema_arrow.names]
        try:
            for i in range(pf.num_row_groups):
                try:
                    rows = pf.read_row_group(i, columns=cols).to_pylist()
                except PARQUET_ERRORS:
                    continue
                yield [r for r in rows if _HEX64.match(str(r.get("sha256") or ""))
                       and r.get("item_id") and r.get("chunks") and all(_HEX64.match(str(h)) for h in r["chunks"])]
        finally:
            pf.close()
            if tmp:
                os.unlink(tmp)

    def list_mailboxes(self) -> list[tuple[str, str]]:
        """(user id, upn of its latest readable snapshot) for every mailbox with a committed snapshot."""
        dirs: dict[str, list[str]] = {}
        for key in self.store.list("mailboxes"):
            parts = key.split("/")
            if len(parts) == 5 and parts[2] == "snapshots" and parts[4] == "snapshot.json" and _SNAP_ID.match(parts[3]):
                dirs.setdefault(parts[1], []).append(parts[3])
        out = []
        for d, sids in sorted(dirs.items()):
            for sid in sorted(sids, reverse=True):
                try:
                    info = self._read_info(f"mailboxes/{d}/snapshots/{sid}/snapshot.json")
                except IntegrityError:
                    continue
                out.append((info.user_id, info.upn))
                break
            else:
                out.append((d, f"(mailbox {d}: no readable snapshot)"))
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

    def write_checkpoint(self, user_id: str, rows: list[dict[str, Any]], *, tmp_dir: str | None = None) -> str:
        """A new checkpoint part listing items already stored (atomic: whole or absent). A chunk of these
        items that is not yet in an uploaded pack travels inside the part (column ``blobs``): a restarted
        backup puts it into its own pack instead of downloading the item again. So checkpoints can be
        frequent (little work is lost to a kill) while packs stay large (few, big objects)."""
        rows = self._with_pending_blobs(rows)
        name = new_snapshot_id() + secrets.token_hex(2) + ".parquet"
        tmp = self._local_tmp(tmp_dir, ".parquet")
        try:
            pq.write_table(pa.Table.from_batches([to_batch(rows, CHECKPOINT)]), tmp, **CHECKPOINT_PARQUET_OPTIONS)
            self._put_local_file(f"{self._ckpt_prefix(user_id)}/{name}", tmp)
            if tmp_dir:  # a local copy (private work dir): compaction merges it without downloading it again
                os.replace(tmp, _local_ckpt(tmp_dir, name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return name

    def list_checkpoints(self, user_id: str) -> list[str]:
        return sorted(k for k in self.store.list(self._ckpt_prefix(user_id)) if k.endswith(".parquet"))

    def _with_pending_blobs(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` with, for each, the blobs of its chunks still in the open pack (uploads in flight are
        waited for first: a chunk is then either in an uploaded pack or in the open one)."""
        seen: set[str] = set()
        out = []
        with self._pack_cv:
            while self._uploading:
                self._pack_cv.wait()
            pack = self._pack  # only the blobs these rows need are copied, not the whole open pack
            for r in rows:
                blobs = []
                for h in r["chunks"]:
                    if h in pack.ids and h not in seen:
                        seen.add(h)
                        blobs.append({"chunk": h, "data": pack.blob(h)})
                out.append({**r, "blobs": blobs or None})
        return out

    # -- the local journal: checkpoint parts between two uploaded ones, in the backup's work dir ------------
    def write_journal(self, rows: list[dict[str, Any]], *, tmp_dir: str) -> str:
        """A checkpoint part written only to the backup's private work dir (atomic: whole or absent): cheap
        enough to write every few items, so a restart on the same host loses only the last few. Uploaded
        by the next backup of the mailbox (:meth:`upload_journal`) or dropped once an uploaded part covers
        it (:meth:`drop_journal`)."""
        rows = self._with_pending_blobs(rows)
        name = f"{JOURNAL_PREFIX}{new_snapshot_id()}{secrets.token_hex(2)}.arrow"
        tmp = os.path.join(tmp_dir, ".tmp-" + name)
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, CHECKPOINT) as w:  # Arrow IPC: ~5× cheaper than Parquet
            w.write_batch(to_batch(rows, CHECKPOINT))
        os.replace(tmp, os.path.join(tmp_dir, name))
        return name

    @staticmethod
    def _journal_parts(tmp_dir: str) -> list[str]:
        try:
            names = os.listdir(tmp_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(JOURNAL_PREFIX) and n.endswith(".arrow"))

    def drop_journal(self, tmp_dir: str) -> None:
        for name in self._journal_parts(tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp_dir, name))

    def upload_journal(self, user_id: str, tmp_dir: str) -> int:
        """Upload, as checkpoint parts, the journal a killed backup of this mailbox left in ``tmp_dir``
        (call it holding the mailbox's lease, before the directory is cleaned); a part that does not
        read whole is skipped (it only saves downloads). Returns the rows uploaded."""
        n = 0
        for name in self._journal_parts(tmp_dir):
            tmp = self._local_tmp(tmp_dir, ".parquet")
            try:
                with pa.memory_map(os.path.join(tmp_dir, name)) as f:
                    table = pa.ipc.open_file(f).read_all()
                table.validate(full=True)
                pq.write_table(table, tmp, **CHECKPOINT_PARQUET_OPTIONS)
            except (*PARQUET_ERRORS, pa.ArrowException):
                os.unlink(tmp)
                continue
            try:
                self._put_local_file(f"{self._ckpt_prefix(user_id)}/{name[len(JOURNAL_PREFIX):-6]}.parquet", tmp)
            finally:
                os.unlink(tmp)
            n += table.num_rows
        return n

    def iter_checkpoint_rows(self, user_id: str, *, tmp_dir: str | None = None) -> Iterator[pa.RecordBatch]:
        """Rows of every checkpoint part (without their blobs); a damaged part is skipped (it only saves
        downloads). Blobs the parts carry are verified and put into the open pack, unless stored already."""
        for key in self.list_checkpoints(user_id):
            try:
                for batch in self._iter_parquet(key, 500, None, tmp_dir=tmp_dir):
                    if "blobs" in batch.schema.names:
                        self._adopt_blobs(batch.column("blobs").to_pylist())
                        batch = batch.drop_columns(["blobs"])
                    yield batch
            except IntegrityError:
                continue

    def _adopt_blobs(self, per_row: list[list[dict[str, Any]] | None]) -> None:
        for blobs in per_row:
            for b in blobs or ():
                h, data = b.get("chunk"), b.get("data")
                if not h or data is None or not _HEX64.match(h) or self.chunk_is_reusable(h):
                    continue
                try:
                    self._piece(h, data, "checkpoint")  # only what verifies (and opens with our key)
                except IntegrityError:
                    continue
                self._add_blob(h, data, h in self.damaged)

    def compact_checkpoints(self, user_id: str, *, tmp_dir: str | None = None) -> int:
        """Merge the checkpoint parts into one (streaming: bounded memory); returns the parts merged.
        The merged part is written before the old ones are deleted: a crash in between leaves duplicate
        rows, which readers tolerate (same item, same content)."""
        keys = self.list_checkpoints(user_id)
        if len(keys) < 2:
            return 0
        self.flush()  # the blobs the parts carry are in packs now: the merged part needs none
        name = new_snapshot_id() + secrets.token_hex(2) + ".parquet"
        tmp = self._local_tmp(tmp_dir, ".parquet")
        try:
            with pq.ParquetWriter(tmp, CHECKPOINT, **CHECKPOINT_PARQUET_OPTIONS) as w:
                for key in keys:
                    local = _local_ckpt(tmp_dir, key.rsplit("/", 1)[-1]) if tmp_dir else ""
                    try:
                        batches = (pq.ParquetFile(local).iter_batches(batch_size=500) if local and os.path.exists(local)
                                   else self._iter_parquet(key, 500, None, tmp_dir=tmp_dir))
                        for batch in batches:
                            if "blobs" in batch.schema.names:
                                batch = batch.drop_columns(["blobs"])
                            w.write_batch(to_batch(batch.to_pylist(), CHECKPOINT))
                    except (IntegrityError, *PARQUET_ERRORS):
                        continue
            self._put_local_file(f"{self._ckpt_prefix(user_id)}/{name}", tmp)
            if tmp_dir:
                os.replace(tmp, _local_ckpt(tmp_dir, name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.store.delete_many(keys)
        if tmp_dir:
            for key in keys:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_local_ckpt(tmp_dir, key.rsplit("/", 1)[-1]))
        return len(keys)

    def clear_checkpoints(self, user_id: str) -> None:
        self.store.delete_many(self.list_checkpoints(user_id))

    # -- leftovers of backups that died ----------------------------------------------------------------
    def clean_mailbox(self, user_id: str, *, older_than: float) -> int:
        """Remove what dead backups of this mailbox left in the repository: snapshot folders that were
        never committed (no ``snapshot.json``), and temporary files / incomplete uploads older than
        ``older_than`` seconds. Call it holding the mailbox's lease (nobody else writes its snapshots)."""
        prefix = self._snap_prefix(user_id)
        by_dir: dict[str, list[str]] = {}
        for key in self.store.list(prefix):
            by_dir.setdefault(key.rsplit("/", 1)[0], []).append(key)
        removed = 0
        for d, keys in by_dir.items():
            if not any(k.endswith("/snapshot.json") for k in keys):
                for k in keys:
                    try:
                        self.store.delete(k)
                        removed += 1
                    except ObjectLocked:
                        pass  # Object Lock: invisible to readers, removed by a later backup once its date passes
                self.store.remove_empty(d)
        removed += self.store.clean_leftovers(f"mailboxes/{mailbox_dir(user_id)}", older_than)
        return removed

    def delete_snapshot(self, user_id: str, snapshot_id: str) -> None:
        """Forget one committed snapshot: its ``snapshot.json`` goes first (the snapshot stops existing for
        every reader at that moment), then its other files. Its chunks stay until ``prune``."""
        if not _SNAP_ID.match(snapshot_id):
            raise RepositoryError(f"not a snapshot id: {snapshot_id!r}")
        prefix = f"{self._snap_prefix(user_id)}/{snapshot_id}"
        self.store.delete(f"{prefix}/snapshot.json")
        for key in list(self.store.list(prefix)):
            self.store.delete(key)
        self.store.remove_empty(prefix)

    def unfinished_restores(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """Plans of restores that have not finished (no ``result.json``), into any mailbox: each dict holds
        ``source_user_id`` and ``snapshot_id`` (the snapshot the restore reads, which forget must keep),
        ``target_user_id`` and ``restore_id``. ``user_id``: only those reading that mailbox."""
        by_dir: dict[str, set[str]] = {}
        for key in self.store.list("mailboxes"):
            parts = key.split("/")
            if len(parts) == 5 and parts[2] == "restores" and parts[4] in ("plan.json", "result.json"):
                by_dir.setdefault("/".join(parts[:4]), set()).add(parts[4])
        out = []
        for d, names in sorted(by_dir.items()):
            if "result.json" in names or "plan.json" not in names:
                continue
            plan = self._json_dict(f"{d}/plan.json")
            if plan is None or not plan.get("source") or not plan.get("snapshot_id"):
                continue
            if user_id is not None and mailbox_dir(str(plan["source"])) != mailbox_dir(user_id):
                continue
            out.append({**plan, "source_user_id": plan["source"], "target_user_id": plan.get("target"),
                        "restore_id": d.rsplit("/", 1)[-1]})
        return out

    def delete_finished_restores(self, user_id: str) -> int:
        """Remove the records of the finished restores into this mailbox (those with a ``result.json``);
        how many objects were deleted."""
        prefix = f"mailboxes/{mailbox_dir(user_id)}/restores"
        by_restore: dict[str, list[str]] = {}
        for key in self.store.list(prefix):
            by_restore.setdefault(key[len(prefix) + 1:].split("/", 1)[0], []).append(key)
        n = 0
        for keys in by_restore.values():
            if any(k.endswith("/result.json") for k in keys):
                for k in sorted(keys, key=lambda k: k.endswith("/result.json")):  # the result last
                    self.store.delete(k)
                    n += 1
        return n

    # -- restores: their progress, so that a restore started again resumes ----------------------------------
    def _restore_prefix(self, user_id: str, restore_id: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{8,64}", restore_id):
            raise ValueError(f"not a restore id: {restore_id!r}")
        return f"mailboxes/{mailbox_dir(user_id)}/restores/{restore_id}"

    def read_restore_plan(self, user_id: str, restore_id: str) -> dict[str, Any] | None:
        try:
            return self.read_json(f"{self._restore_prefix(user_id, restore_id)}/plan.json")
        except KeyNotFound:
            return None
        except IntegrityError:
            return {}

    def write_restore_plan(self, user_id: str, restore_id: str, plan: dict[str, Any]) -> None:
        self.write_json(f"{self._restore_prefix(user_id, restore_id)}/plan.json", plan)

    def write_restore_progress(self, user_id: str, restore_id: str, rows: list[dict[str, Any]]) -> None:
        """A part of a restore's progress: rows ``{source, created, folder, status}`` (written whole)."""
        name = new_snapshot_id() + secrets.token_hex(2) + ".json"
        self.write_json(f"{self._restore_prefix(user_id, restore_id)}/progress/{name}", rows, indent=None)

    def iter_restore_progress(self, user_id: str, restore_id: str) -> Iterator[dict[str, Any]]:
        for key in sorted(self.store.list(f"{self._restore_prefix(user_id, restore_id)}/progress")):
            try:
                rows = self.read_json(key)
            except (IntegrityError, KeyNotFound):
                continue  # a damaged part only costs a lookup in the mailbox (tagged items are found there)
            yield from (r for r in rows if isinstance(r, dict))

    def compact_restore_progress(self, user_id: str, restore_id: str) -> int:
        """Merge a restore's progress parts into one (written before the old ones go: a crash in between
        leaves duplicate rows, which readers tolerate)."""
        keys = sorted(self.store.list(f"{self._restore_prefix(user_id, restore_id)}/progress"))
        if len(keys) < 2:
            return 0
        rows = list(self.iter_restore_progress(user_id, restore_id))
        self.write_restore_progress(user_id, restore_id, rows)
        self.store.delete_many(keys)
        return len(keys)

    def read_restore_baseline(self, user_id: str, restore_id: str) -> dict[str, list[str]] | None:
        """What the target folders held before a fidelity restore under ``collisions: copy`` imported anything
        (folder id → item ids), or None when it has not been written."""
        try:
            d = self.read_json(f"{self._restore_prefix(user_id, restore_id)}/baseline.json")
        except KeyNotFound:
            return None
        return d if isinstance(d, dict) else None

    def write_restore_baseline(self, user_id: str, restore_id: str, baseline: dict[str, list[str]]) -> None:
        self.write_json(f"{self._restore_prefix(user_id, restore_id)}/baseline.json", baseline, indent=None)

    def restores_into(self, user_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(restore id, plan) of every restore recorded into this mailbox, finished or not (a damaged or missing
        plan is left out)."""
        prefix = f"mailboxes/{mailbox_dir(user_id)}/restores"
        out = []
        for key in sorted(self.store.list(prefix)):
            rest = key[len(prefix) + 1:].split("/")
            if len(rest) == 2 and rest[1] == "plan.json" and (plan := self._json_dict(key)) is not None:
                out.append((rest[0], plan))
        return out

    def write_restore_result(self, user_id: str, restore_id: str, result: dict[str, Any]) -> None:
        self.write_json(f"{self._restore_prefix(user_id, restore_id)}/result.json", result)

    # -- the mailbox lease ---------------------------------------------------------------------------------
    def _lease_key(self, user_id: str, name: str = "lease.json") -> str:
        return f"mailboxes/{mailbox_dir(user_id)}/{name}"

    def acquire_lease(self, user_id: str, upn: str, seconds: float, *, name: str = "lease.json",
                      what: str = "backup of this mailbox", key: str | None = None) -> Lease:
        """Take the mailbox's backup lease for ``seconds`` (renew it with :meth:`Lease.renew`), or raise
        :class:`LeaseBusy` naming the holder. A conditional create takes a free lease; an expired one is
        taken over with a conditional replace of exactly the version that was read, so of two backups
        racing for it one wins. No lock service is needed; the store's conditional writes are the lock.
        ``name``/``what``: another lease of the mailbox (a restore's)."""
        key = key or self._lease_key(user_id, name)
        me = {"holder": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _process_start(os.getpid()), "upn": upn, "what": what,
              "acquired_at": datetime.now(timezone.utc).isoformat()}
        for _ in range(3):
            body = self._seal(_lease_body(me, seconds), key)
            try:
                version = self.store.put_if_absent(key, body)
                return Lease(self, key, me, seconds, version)
            except PreconditionFailed:
                pass
            try:
                raw, version = self.store.get_versioned(key)
            except KeyNotFound:
                continue  # released meanwhile: try again
            try:
                cur = json.loads(self._unseal(raw, key))
                expires = datetime.fromisoformat(cur["expires_at"])
            except (ValueError, KeyError, TypeError, IntegrityError):
                cur, expires = {"holder": "?"}, datetime.min.replace(tzinfo=timezone.utc)  # unreadable: expired
            if cur.get("holder") == me["holder"]:
                return Lease(self, key, me, seconds, version)  # ours: the answer to our write was lost, not the write
            if expires > datetime.now(timezone.utc) and not _holder_dead(cur):
                raise LeaseBusy(
                    f"another {cur.get('what') or what} is running (host {cur.get('host')}, pid {cur.get('pid')}, "
                    f"since {str(cur.get('acquired_at'))[:19]} UTC; its lease expires {str(cur.get('expires_at'))[:19]} "
                    "UTC unless renewed)", cur)
            try:
                version = self.store.put_if_version(key, body, version)
                return Lease(self, key, me, seconds, version)
            except (PreconditionFailed, KeyNotFound):
                continue  # someone else took it over first (or released it), or our write landed: look again
        raise LeaseBusy(f"another {what} is taking its lease at the same time", {})

    def live_leases(self) -> list[dict[str, Any]]:
        """Every mailbox lease (backups', restores', forgets') that has not expired, with its ``key``."""
        out = []
        now = datetime.now(timezone.utc)
        for key in self.store.list("mailboxes"):
            if not key.endswith("lease.json"):
                continue
            try:
                doc = json.loads(self.get_object(key))
                if datetime.fromisoformat(doc["expires_at"]) > now and not _holder_dead(doc):
                    out.append({**doc, "key": key})
            except (KeyNotFound, IntegrityError, ValueError, KeyError, TypeError):
                continue  # gone, or unreadable: an unreadable lease is an expired one (acquire_lease)
        return out


def _proc_stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell a live holder from a reused pid."""
    fields = _proc_stat(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def _holder_dead(lease: dict[str, Any]) -> bool:
    """A lease held by a process of *this* host that no longer runs (killed: no chance to release it) is
    free at once; on other hosts only its expiry tells."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    pid = lease["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    fields = _proc_stat(pid)
    if fields and fields[0] == b"Z":
        return True  # killed, not yet reaped
    start = fields[19].decode() if fields and len(fields) > 19 else None
    return bool(start and lease.get("pid_start") and start != lease["pid_start"])


def _lease_body(me: dict[str, Any], seconds: float) -> bytes:
    now = datetime.now(timezone.utc)
    return json.dumps({**me, "renewed_at": now.isoformat(),
                       "expires_at": (now + timedelta(seconds=seconds)).isoformat()}).encode()


class Lease:
    """A held mailbox lease: :meth:`renew` before it expires (every third of its length), :meth:`release`
    at the end. :meth:`renew` raises :class:`LeaseBusy` when the lease was lost (it expired and another
    backup took it over): the holder must stop without committing."""

    def __init__(self, repo: Repository, key: str, me: dict[str, Any], seconds: float, version: str) -> None:
        self.repo = repo
        self.key = key
        self.me = me
        self.seconds = seconds
        self.version = version
        self._lock = threading.Lock()  # renewals from two threads (the timer, the commit) go one at a time
        self._valid_until = time.monotonic() + seconds

    def renew(self) -> None:
        with self._lock:
            if time.monotonic() > self._valid_until:
                # expired by our own clock: others may have treated it as free (a prune's second pass, a
                # takeover) even if nobody replaced it, so it is lost, whatever the store still holds
                raise LeaseBusy("this lease was lost: it expired before it was renewed (the process was "
                                "stalled); stopped without committing", {})
            body = self.repo._seal(_lease_body(self.me, self.seconds), self.key)
            try:
                self.version = self.repo.store.put_if_version(self.key, body, self.version)
                self._valid_until = time.monotonic() + self.seconds
                return
            except (PreconditionFailed, KeyNotFound):
                pass
            try:  # the write may have landed and only its answer been lost (a retried PUT then sees 412)
                raw, version = self.repo.store.get_versioned(self.key)
                if json.loads(self.repo._unseal(raw, self.key)).get("holder") == self.me["holder"]:
                    self.version = version
                    self._valid_until = time.monotonic() + self.seconds
                    return
            except (KeyNotFound, ValueError, AttributeError, IntegrityError):
                pass
            raise LeaseBusy("this lease was lost (it expired and another run took it over); stopped without "
                            "committing", {})

    def release(self) -> None:
        with self._lock:
            try:
                self.repo.store.delete_if_version(self.key, self.version)
            except (PreconditionFailed, StoreError):
                pass  # not ours any more, or the store is gone: it expires by itself


def _local_ckpt(tmp_dir: str, name: str) -> str:
    """The local copy of checkpoint part ``name`` in a backup's private work dir."""
    return os.path.join(tmp_dir, "ckpt-" + name)


def _file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


# Parquet files are written with page checksums (CRC32 per page), which readers verify: a flipped byte
# that still decompresses is found too, page by page.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}
# checkpoint parts: the blobs they carry are zstd frames already (and sealed when encrypted): compressing
# them again, or building a dictionary of them, costs CPU and saves nothing (~6 → ~3 ms for 30 items of
# 100 KB). The other columns as everywhere.
_CKPT_COLUMNS = ["item_id", "change_key", "is_draft", "sha256", "chunks.list.element", "size",
                 "blobs.list.element.chunk"]
CHECKPOINT_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": {**{c: "zstd" for c in _CKPT_COLUMNS}, "blobs.list.element.data": "none"},
    "use_dictionary": _CKPT_COLUMNS, "write_page_checksum": True}


class SnapshotWriter:
    """Streams a snapshot's manifest to a local temporary Parquet file (row group by row group), then
    uploads it, the folders table, and finally ``snapshot.json`` (with the size and sha256 of both
    files): the commit."""

    def __init__(self, repo: Repository, user_id: str, upn: str, after: str | None = None,
                 tmp_dir: str | None = None) -> None:
        self.repo = repo
        self.user_id = user_id
        self.upn = upn
        self.snapshot_id = new_snapshot_id(after=after if after and _SNAP_ID.match(after) and "." in after else None)
        self._dir = tempfile.mkdtemp(prefix="mailpipe-snap-", dir=tmp_dir)
        self._manifest_path = os.path.join(self._dir, "manifest.parquet")
        self._writer = pq.ParquetWriter(self._manifest_path, MANIFEST, **PARQUET_OPTIONS)
        self._folders: list[dict[str, Any]] = []
        self.items = 0
        self.size_bytes = 0
        self._fidelity_writer: pq.ParquetWriter | None = None  # fidelity.parquet, opened by the first row
        self.fidelity_items = 0
        self.fidelity_bytes = 0
        self._done = False

    def add_items(self, rows: list[dict[str, Any]] | pa.RecordBatch) -> None:
        batch = rows if isinstance(rows, pa.RecordBatch) else to_batch(rows, MANIFEST)
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.items += batch.num_rows
            self.size_bytes += int(pc.sum(batch.column("size")).as_py() or 0)

    def set_folders(self, rows: list[dict[str, Any]]) -> None:
        self._folders = list(rows)

    def add_folders(self, rows: list[dict[str, Any]]) -> None:
        """More rows of ``folders.parquet``: those whose ``folder_id`` is not listed yet."""
        have = {r["folder_id"] for r in self._folders}
        self._folders += [r for r in rows if r["folder_id"] not in have]

    def add_fidelity_items(self, rows: list[dict[str, Any]]) -> None:
        """Rows of ``fidelity.parquet`` (:data:`FIDELITY`): the full-fidelity streams of the export API."""
        if self._fidelity_writer is None:
            self._fidelity_writer = pq.ParquetWriter(os.path.join(self._dir, "fidelity.parquet"), FIDELITY,
                                                     **PARQUET_OPTIONS)
        batch = to_batch(rows, FIDELITY)
        if batch.num_rows:
            self._fidelity_writer.write_batch(batch)
            self.fidelity_items += batch.num_rows
            self.fidelity_bytes += int(pc.sum(batch.column("size")).as_py() or 0)

    def commit(self, *, delta_links: dict[str, str], stats: dict[str, Any], skipped: list[dict[str, Any]],
               started_at: datetime | None = None, pending: list[dict[str, Any]] | None = None,
               base: dict[str, Any] | None = None, before_commit: Any = None,
               fidelity: dict[str, Any] | None = None) -> SnapshotInfo:
        """Upload the files, then ``snapshot.json``. ``before_commit``: called right before the commit
        record is written (the engine renews its lease there: a backup that lost it never commits)."""
        if self._done:
            raise RuntimeError("snapshot already committed or aborted")
        self.repo.flush()  # every chunk the manifest names is in the repository before the manifest is
        self._writer.close()
        prefix = f"{self.repo._snap_prefix(self.user_id)}/{self.snapshot_id}"
        folders_path = os.path.join(self._dir, "folders.parquet")
        pq.write_table(pa.Table.from_batches([to_batch(self._folders, FOLDERS)]), folders_path, **PARQUET_OPTIONS)
        files = {}
        parts = [("manifest.parquet", self._manifest_path), ("folders.parquet", folders_path)]
        if self._fidelity_writer is not None:
            self._fidelity_writer.close()
            self._fidelity_writer = None
            parts.append(("fidelity.parquet", os.path.join(self._dir, "fidelity.parquet")))
        for name, path in parts:
            key = f"{prefix}/{name}"
            if self.repo.cipher is not None:
                sealed = path + ".sealed"
                self.repo.cipher.seal_file(path, sealed, key)
                os.unlink(path)
                path = sealed
            size, digest = _file_digest(path)
            files[name] = {"size": size, "sha256": digest}
            self.repo.store.put_file(key, path)
        info = SnapshotInfo(
            snapshot_id=self.snapshot_id, user_id=self.user_id, upn=self.upn, started_at=started_at,
            committed_at=datetime.now(timezone.utc), items=self.items, size_bytes=self.size_bytes,
            stats=dict(stats), delta_links=dict(delta_links), skipped=list(skipped),
            pending=list(pending or []), files=files, base=dict(base or {}),
        )
        if fidelity is not None or "fidelity.parquet" in files:
            # a snapshot's items: the messages' MIME rows, or, with the export API, every item's stream
            info.fidelity = {**(fidelity or {}), "items": self.fidelity_items, "size_bytes": self.fidelity_bytes,
                             "manifest_items": self.items}
            info.items = max(self.items, self.fidelity_items)
            info.size_bytes = self.size_bytes + self.fidelity_bytes
        if before_commit is not None:
            before_commit()
        self.repo.write_json(f"{prefix}/snapshot.json", info.to_json())
        self._cleanup()
        return info

    def abort(self) -> None:
        """Nothing was committed: drop the local files (uploaded Parquet files, if any, stay invisible
        until the next backup of the mailbox removes them)."""
        if not self._done:
            for w in (self._writer, self._fidelity_writer):
                try:
                    if w is not None:
                        w.close()
                except Exception:
                    pass
            self._cleanup()

    def _cleanup(self) -> None:
        self._done = True
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)


def open_store(tenant: TenantConfig, *, s3_client: Any = None) -> ObjectStore:
    """The object store behind the tenant's ``storage``: ``s3://bucket/prefix`` or a local folder."""
    storage = tenant.storage
    if storage.startswith("s3://"):
        bucket, _, prefix = storage[5:].partition("/")
        client = s3_client or make_s3_client(tenant.s3.endpoint_url, tenant.s3.region)
        return S3Store(client, bucket, prefix, object_lock=tenant.s3.object_lock)
    path = storage[7:] if storage.startswith("file://") else storage
    return LocalStore(os.path.expanduser(path))


def open_repository(tenant: TenantConfig, *, s3_client: Any = None, create: bool = True,
                    tmp_dir: str | None = None) -> Repository:
    """The tenant's repository: ``s3://bucket/prefix`` or a local folder (path or ``file://`` URL).
    A store that cannot be used raises a one-line :class:`UserError` naming the tenant and the storage."""
    try:
        store = open_store(tenant, s3_client=s3_client)
        passphrase = (crypto.passphrase_from_env(tenant.encryption.passphrase_env, tenant.name)
                      if tenant.encryption else None)
        return Repository.open(store, tenant.name, create=create, tmp_dir=tmp_dir, passphrase=passphrase,
                               encrypt_new=tenant.encryption is not None)
    except UserError as e:
        text = str(e)
        raise type(e)(f"tenant {tenant.name}: {text}" if not text.startswith("tenant ") else text) from None
