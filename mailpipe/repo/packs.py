"""Pack files and the chunk index (docs/FORMAT.md, "Packs" and "Index").

A **pack** (``packs/<p[:2]>/<p>``, ``p`` = 32 random bytes in hex: never a content hash, so a pack written
again with the same chunks, after a prune planned the first, can never share its name) is many chunks'
blobs back to back,
then a header listing them, then the header's length and a magic number::

    blob 0 | blob 1 | … | header | u32 little-endian header length | b"MPK2"

A blob is a chunk's zstd frame (sealed with the chunk id as associated data in an encrypted repository);
the header is the zstd-compressed (and sealed) JSON list ``[[chunk id, offset, length], …]``. The header
makes a pack self-describing: the index can be rebuilt from the packs alone.

An **index file** (``index/<i[:2]>/<i>``, ``i`` = SHA-256 of its bytes, which carry a random nonce so that
no two index files are ever equal) lists packs and their blobs: zstd-compressed (and sealed) JSON
``{"packs": [{"id": p, "size": n, "written_at": t, "blobs": [[chunk, offset, length], …]}], "nonce": r}``.
A backup writes one per pack it uploads, right after it; prune writes consolidated ones. A chunk may be
listed more than once (two backups stored it at the same time, a repaired chunk, a repack): every listed
copy is valid, readers take the newest and fall back to the others.

Readers load the index into :class:`ChunkIndex`, an SQLite table (on disk in the work directory, so a
tenant with millions of chunks does not need their index in memory), synced incrementally: index files
are immutable, so only the names not seen before are downloaded.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

PACK_MAGIC = b"MPK2"
PACK_TARGET = 8 << 20  # a pack is uploaded when it reaches this many bytes (or at a checkpoint)
_HEX = frozenset("0123456789abcdef")


def is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in _HEX for c in s)


def pack_key(p: str) -> str:
    return f"packs/{p[:2]}/{p}"


def index_key(i: str) -> str:
    return f"index/{i[:2]}/{i}"


class PackFormatError(Exception):
    pass


def encode_header(entries: list[tuple[str, int, int]], seal: Callable[[bytes, str], bytes]) -> bytes:
    raw = zstandard.ZstdCompressor(level=3).compress(json.dumps(entries, separators=(",", ":")).encode())
    return seal(raw, "pack-header")


def decode_trailer(tail: bytes) -> int:
    """The header's length, from the pack's last 8 bytes."""
    if len(tail) < 8 or tail[-4:] != PACK_MAGIC:
        raise PackFormatError("not a mailpipe pack (no trailer)")
    return struct.unpack("<I", tail[-8:-4])[0]


def decode_header(blob: bytes, open_: Callable[[bytes, str], bytes]) -> list[tuple[str, int, int]]:
    try:
        entries = json.loads(zstandard.ZstdDecompressor().decompress(open_(blob, "pack-header")))
        return [(str(c), int(o), int(n)) for c, o, n in entries]
    except (ValueError, TypeError, zstandard.ZstdError) as e:
        raise PackFormatError(f"pack header unreadable ({e})") from None


def read_pack_entries(data: bytes, open_: Callable[[bytes, str], bytes]) -> list[tuple[str, int, int]]:
    n = decode_trailer(data[-8:])
    if n + 8 > len(data):
        raise PackFormatError("pack header length out of range")
    return decode_header(data[-8 - n:-8], open_)


def encode_index(packs: list[dict], seal: Callable[[bytes, str], bytes]) -> bytes:
    doc = {"packs": packs, "nonce": secrets.token_hex(8)}
    raw = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())
    return seal(raw, "index")


def decode_index(data: bytes, open_: Callable[[bytes, str], bytes]) -> list[dict]:
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(open_(data, "index")))
        packs = doc["packs"]
        for p in packs:
            if not is_hex64(p["id"]):
                raise ValueError("bad pack id")
            p["blobs"] = [(str(c), int(o), int(n)) for c, o, n in p["blobs"]]
        return packs
    except (ValueError, TypeError, KeyError, zstandard.ZstdError) as e:
        raise PackFormatError(f"index file unreadable ({type(e).__name__}: {str(e)[:100]})") from None


@dataclass
class OpenPack:
    """Blobs waiting to be uploaded as one pack. The blobs are kept as they are (a list, no growing buffer to
    copy into): a checkpoint takes one by reference, and :meth:`finish` joins them once."""
    blobs: list[bytes] = field(default_factory=list)
    entries: list[tuple[str, int, int]] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)  # chunk → its index in blobs/entries
    size: int = 0

    def add(self, chunk: str, blob: bytes) -> None:
        self.ids[chunk] = len(self.blobs)
        self.entries.append((chunk, self.size, len(blob)))
        self.blobs.append(blob)
        self.size += len(blob)

    def blob(self, chunk: str) -> bytes | None:
        i = self.ids.get(chunk)
        return None if i is None else self.blobs[i]

    def finish(self, seal: Callable[[bytes, str], bytes]) -> bytes:
        """The pack's bytes: blobs, header, trailer (one copy)."""
        header = encode_header(self.entries, seal)
        return b"".join([*self.blobs, header, struct.pack("<I", len(header)), PACK_MAGIC])


class ChunkIndex:
    """chunk id → where its blob is: an SQLite table kept in step with the repository's ``index/`` files.
    Thread-safe (one connection, one lock: every call is a few microseconds)."""

    def __init__(self, path: str | None) -> None:
        self.path = path or ":memory:"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS files(name TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS packs(no INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, size INTEGER,
                                             written_at TEXT);
            CREATE TABLE IF NOT EXISTS blobs(chunk BLOB NOT NULL, pack INTEGER NOT NULL, off INTEGER NOT NULL,
                                             len INTEGER NOT NULL, file TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS blobs_chunk ON blobs(chunk);
            CREATE INDEX IF NOT EXISTS blobs_file ON blobs(file);
            CREATE INDEX IF NOT EXISTS blobs_pack ON blobs(pack);
        """)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- keeping in step with index/ ------------------------------------------------------------------------
    def known_files(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM files")}

    def add_file(self, name: str, packs: list[dict]) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM files WHERE name=?", (name,)).fetchone():
                    db.execute("COMMIT")
                    return
                for p in packs:
                    db.execute("INSERT OR IGNORE INTO packs(id, size, written_at) VALUES (?, ?, ?)",
                               (p["id"], p.get("size"), p.get("written_at")))
                    no = db.execute("SELECT no FROM packs WHERE id=?", (p["id"],)).fetchone()[0]
                    db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?, ?)",
                                   ((bytes.fromhex(c), no, o, n, name) for c, o, n in p["blobs"]))
                db.execute("INSERT INTO files VALUES (?)", (name,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def drop_files(self, names: Iterable[str]) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            for name in names:
                db.execute("DELETE FROM blobs WHERE file=?", (name,))
                db.execute("DELETE FROM files WHERE name=?", (name,))
            db.execute("DELETE FROM packs WHERE no NOT IN (SELECT DISTINCT pack FROM blobs)")
            db.execute("COMMIT")

    # -- lookups ---------------------------------------------------------------------------------------------
    def locations(self, chunk: str) -> list[tuple[str, int, int]]:
        """Every (pack id, offset, length) of ``chunk``, newest first."""
        with self._lock:
            return [(r[0], r[1], r[2]) for r in self._db.execute(
                "SELECT p.id, b.off, b.len FROM blobs b JOIN packs p ON p.no=b.pack WHERE b.chunk=? "
                "ORDER BY b.rowid DESC", (bytes.fromhex(chunk),))]

    def has(self, chunk: str, excluded: frozenset[str] = frozenset()) -> bool:
        if not excluded:  # the common case: one index probe, no join, no sort
            with self._lock:
                return self._db.execute("SELECT 1 FROM blobs WHERE chunk=? LIMIT 1",
                                        (bytes.fromhex(chunk),)).fetchone() is not None
        locs = self.locations(chunk)
        return any(p not in excluded for p, _, _ in locs)

    def chunk_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(DISTINCT chunk) FROM blobs").fetchone()[0]

    def iter_chunks(self, excluded: frozenset[str] = frozenset(), page: int = 20_000) -> Iterator[str]:
        """Every indexed chunk id (once, in id order), except those only in ``excluded`` packs. Read a page at
        a time along the chunk index, so memory stays flat (all rows at once: ~300 bytes per chunk)."""
        skip = json.dumps(sorted(excluded))
        after = b""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT DISTINCT b.chunk FROM blobs b JOIN packs p ON p.no=b.pack WHERE b.chunk > ? "
                    "AND p.id NOT IN (SELECT value FROM json_each(?)) ORDER BY b.chunk LIMIT ?",
                    (after, skip, page)).fetchall()
            for (chunk,) in rows:
                yield chunk.hex()
            if len(rows) < page:
                return
            after = rows[-1][0]

    def packs(self) -> dict[str, int | None]:
        with self._lock:
            return {r[0]: r[1] for r in self._db.execute("SELECT id, size FROM packs")}

    def pack_info(self, pack: str) -> tuple[int | None, str | None] | None:
        """(size, written_at) of one indexed pack, or None when no index file lists it."""
        with self._lock:
            row = self._db.execute("SELECT size, written_at FROM packs WHERE id=?", (pack,)).fetchone()
        return (row[0], row[1]) if row else None

    def pack_blobs(self, pack: str) -> list[tuple[str, int, int]]:
        with self._lock:
            return [(r[0].hex(), r[1], r[2]) for r in self._db.execute(
                "SELECT DISTINCT b.chunk, b.off, b.len FROM blobs b JOIN packs p ON p.no=b.pack WHERE p.id=? "
                "ORDER BY b.off", (pack,))]

    def files_of_packs(self, packs: Iterable[str]) -> set[str]:
        with self._lock:
            out: set[str] = set()
            for p in packs:
                out.update(r[0] for r in self._db.execute(
                    "SELECT DISTINCT b.file FROM blobs b JOIN packs p ON p.no=b.pack WHERE p.id=?", (p,)))
            return out


def index_cache_path(work_dir: str | None, repo_id: str) -> str | None:
    """Where the index cache of repository ``repo_id`` lives: ``<work dir>/.index-cache/<id>.v2.sqlite`` (a name
    no mailbox work dir can have: those never start with a dot)."""
    if not work_dir:
        return None
    d = os.path.join(work_dir, ".index-cache")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, f"{repo_id}.v2.sqlite")  # v2: packs carry written_at
