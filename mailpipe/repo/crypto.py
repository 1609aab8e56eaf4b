"""Client-side encryption of a repository (docs/FORMAT.md, "Encryption").

The design follows restic's and kopia's: a random 32-byte **master key**, never stored in the clear,
wrapped in one or more **key files** (``keys/<id>``), each by a key derived from a passphrase with scrypt
and a random salt — so a passphrase can be added, changed or removed without re-encrypting any data.
From the master key, HKDF-SHA256 derives two subkeys:

- the **chunk-id key**: a chunk's name is HMAC-SHA256(key, raw bytes), so a stored name reveals nothing
  about the content (nobody without the key can test whether a given message is stored), and dedup
  still works across every mailbox of the tenant;
- the **data key**: every object (chunks, index files, manifests, folder tables, commit records,
  checkpoints, leases, restore progress) is sealed with AES-256-GCM, a fresh random 96-bit nonce per
  object, and the object's identity (its key in the store, or the chunk's id) as associated data: an
  object moved, swapped or altered fails to open.

Files (Parquet manifests can be large) are sealed as a stream of 1 MiB segments, each its own AES-GCM
message whose nonce counts the segments and whose associated data marks the last one, so a reordered,
truncated or extended file fails too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALGORITHM = "AES-256-GCM"
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}  # ~32 MiB and ~0.1 s per try: slow for guessing, fine for opening
NONCE = 12
TAG = 16
SEGMENT = 1 << 20
_STREAM_MAGIC = b"MPS1"


class DecryptError(Exception):
    """An object that does not open with this repository's key: altered, swapped, or another key's."""


class WrongPassphrase(Exception):
    """No key file of the repository opens with the passphrase."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def _kdf(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=int(params["n"]), r=int(params["r"]),
                          p=int(params["p"]), maxmem=256 << 20, dklen=32)


def _hkdf(master: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)


def new_master_key() -> bytes:
    return secrets.token_bytes(32)


_KEY_FILE_FIELDS = ("id", "kdf", "n", "r", "p", "salt", "created_at", "note")


def _key_file_aad(doc: dict[str, Any]) -> bytes:
    """What a key file's wrapped key is bound to: every other field of the file (id, kdf and its
    parameters, salt, date, note), so that none of them — `key list` shows the date and the note, and
    people choose the key to remove by them — can be altered unnoticed."""
    fields = {k: doc[k] for k in _KEY_FILE_FIELDS}
    return b"mailpipe-key:" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def make_key_file(master: bytes, passphrase: str, *, note: str = "") -> tuple[str, bytes]:
    """A key file wrapping ``master`` under ``passphrase``: (its id, its bytes)."""
    salt = secrets.token_bytes(16)
    kek = _kdf(passphrase, salt, SCRYPT)
    key_id = secrets.token_hex(8)
    nonce = secrets.token_bytes(NONCE)
    doc: dict[str, Any] = {"id": key_id, "kdf": "scrypt", **SCRYPT, "salt": _b64(salt),
                           "created_at": datetime.now(timezone.utc).isoformat(), "note": note[:100]}
    wrapped = AESGCM(kek).encrypt(nonce, master, _key_file_aad(doc))
    doc["wrapped"] = _b64(nonce + wrapped)
    return key_id, json.dumps(doc, indent=1).encode()


def open_key_file(raw: bytes, passphrase: str) -> bytes | None:
    """The master key this key file wraps, or None when the passphrase is not its own (or the file was
    altered: any field)."""
    try:
        doc = json.loads(raw)
        if doc["kdf"] != "scrypt":
            return None
        kek = _kdf(passphrase, _unb64(doc["salt"]), doc)
        blob = _unb64(doc["wrapped"])
        return AESGCM(kek).decrypt(blob[:NONCE], blob[NONCE:], _key_file_aad(doc))
    except InvalidTag:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def key_file_info(raw: bytes) -> dict[str, Any]:
    """What ``mailpipe key list`` shows of a key file (nothing secret is in it)."""
    try:
        doc = json.loads(raw)
        return {"id": doc.get("id"), "created_at": doc.get("created_at"), "note": doc.get("note", ""),
                "kdf": f"{doc.get('kdf')} n={doc.get('n')} r={doc.get('r')} p={doc.get('p')}"}
    except ValueError:
        return {"id": None, "created_at": None, "note": "(unreadable key file)", "kdf": ""}


@dataclass(frozen=True)
class Cipher:
    """The repository's keys, derived from its master key and its id (the HKDF salt)."""

    id_key: bytes
    data_key: bytes

    @classmethod
    def from_master(cls, master: bytes, repo_id: str) -> Cipher:
        salt = repo_id.encode()
        return cls(_hkdf(master, salt, b"mailpipe chunk-id v1"), _hkdf(master, salt, b"mailpipe data v1"))

    def __repr__(self) -> str:  # never print keys
        return "Cipher(AES-256-GCM, keys hidden)"

    def chunk_id(self, data: bytes) -> str:
        return hmac.new(self.id_key, data, hashlib.sha256).hexdigest()

    def seal(self, data: bytes, aad: str) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return nonce + AESGCM(self.data_key).encrypt(nonce, data, aad.encode())

    def open(self, blob: bytes, aad: str) -> bytes:
        if len(blob) < NONCE + TAG:
            raise DecryptError(f"{aad}: too short to be an encrypted object")
        try:
            return AESGCM(self.data_key).decrypt(blob[:NONCE], blob[NONCE:], aad.encode())
        except InvalidTag:
            raise DecryptError(f"{aad}: does not decrypt (altered, swapped, or not this repository's)") from None

    # -- files: a stream of segments -----------------------------------------------------------------------
    def _seg_nonce(self, prefix: bytes, i: int) -> bytes:
        return prefix + struct.pack(">I", i)

    def seal_file(self, src: str, dst: str, aad: str) -> None:
        aead = AESGCM(self.data_key)
        prefix = secrets.token_bytes(8)
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(_STREAM_MAGIC + prefix)
            i = 0
            cur = fin.read(SEGMENT)
            while True:
                nxt = fin.read(SEGMENT)
                last = not nxt
                ad = f"{aad}|{i}|{'last' if last else 'more'}".encode()
                fout.write(aead.encrypt(self._seg_nonce(prefix, i), cur, ad))
                if last:
                    break
                cur, i = nxt, i + 1

    def open_file(self, src: BinaryIO, dst: BinaryIO, aad: str) -> None:
        """Decrypt a sealed stream from ``src`` into ``dst``; any damage raises :class:`DecryptError`."""
        aead = AESGCM(self.data_key)
        head = src.read(len(_STREAM_MAGIC) + 8)
        if len(head) != len(_STREAM_MAGIC) + 8 or not head.startswith(_STREAM_MAGIC):
            raise DecryptError(f"{aad}: not an encrypted file of this format")
        prefix = head[len(_STREAM_MAGIC):]
        i = 0
        cur = src.read(SEGMENT + TAG)
        while True:
            nxt = src.read(SEGMENT + TAG)
            last = not nxt
            ad = f"{aad}|{i}|{'last' if last else 'more'}".encode()
            try:
                dst.write(aead.decrypt(self._seg_nonce(prefix, i), cur, ad))
            except InvalidTag:
                raise DecryptError(f"{aad}: does not decrypt (segment {i}: altered, truncated, swapped, "
                                   "or not this repository's)") from None
            if last:
                return
            cur, i = nxt, i + 1


def iter_key_ids(names: Iterator[str]) -> Iterator[str]:
    for key in names:
        name = key.rsplit("/", 1)[-1]
        if len(name) == 16 and all(c in "0123456789abcdef" for c in name):
            yield name


def passphrase_from_env(var: str, tenant: str) -> str:
    """The passphrase in environment variable ``var`` (never echoed), or a one-line error."""
    from mailpipe.errors import UserError

    value = os.environ.get(var)
    if not value:
        raise UserError(f"tenant {tenant}: the repository passphrase is read from the environment variable {var}, "
                        "which is not set (or empty)")
    return value
