"""Export a snapshot: byte-exact ``.eml`` files in folders mirroring the mailbox, or one mbox per folder.

Folder names and item ids become file-system names through :func:`safe_name`, an injective escape
(percent-encoding of anything unsafe), so no name — ``..``, ``/``, NUL, very long, odd unicode — can
write outside ``--out`` or collide with another.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from mailpipe.repo.repository import Repository

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|%]")
MAX_NAME_BYTES = 200


def safe_name(name: str) -> str:
    """A file name for ``name``: NFC, unsafe characters percent-encoded, never ``.``/``..``/empty,
    at most 200 bytes (a hash suffix keeps long names distinct)."""
    s = unicodedata.normalize("NFC", name)
    s = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), s)
    if not s:
        return "%00"  # the empty name (a literal "%00" would have been escaped to "%2500")
    if s.endswith((" ", ".")):  # also turns "." and ".." into "%2E" and ".%2E"
        s = s[:-1] + f"%{ord(s[-1]):02X}"
    if s.startswith(" "):
        s = "%20" + s[1:]
    if len(s.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        cut = s.encode("utf-8")[: MAX_NAME_BYTES - 18].decode("utf-8", "ignore")
        s = f"{cut}~{digest}"
    return s


def _inside(root: str, path: str) -> str:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"refusing to write outside {root}: {path}")
    return path


@dataclass
class ExportResult:
    items: int
    bytes: int
    out: str


def export_snapshot(repo: Repository, user_id: str, snapshot_id: str, out: str, *, fmt: str = "eml",
                    progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write every item of the snapshot under ``out``; verifies every item's sha256 while reading."""
    snap = repo.read_snapshot(user_id, snapshot_id)
    os.makedirs(out, exist_ok=True)
    n = total = 0
    mboxes: dict[str, object] = {}
    try:
        for batch in repo.iter_manifest(user_id, snap.snapshot_id,
                                        columns=["item_id", "folder_path", "size", "sha256", "chunks",
                                                 "sender", "received_at"]):
            for row in batch.to_pylist():
                parts = [safe_name(p) for p in (row["folder_path"] or [])]
                item = f"item {row['item_id']} ({'/'.join(row['folder_path'] or [])})"
                if fmt == "eml":
                    d = _inside(out, os.path.join(out, *parts))
                    os.makedirs(d, exist_ok=True)
                    path = _inside(out, os.path.join(d, safe_name(row["item_id"]) + ".eml"))
                    tmp = path + ".part"
                    with open(tmp, "wb") as f:
                        for piece in repo.iter_content(row["sha256"], row["chunks"], row["size"], item=item):
                            f.write(piece)
                    os.replace(tmp, path)
                else:
                    key = os.path.join(*parts) if parts else "_root"
                    f = mboxes.get(key)
                    if f is None:
                        path = _inside(out, os.path.join(out, key + ".mbox"))
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        f = mboxes[key] = open(path, "wb")
                    data = repo.read_content(row["sha256"], row["chunks"], row["size"], item=item)
                    f.write(_mbox_entry(data, row.get("sender"), row.get("received_at")))
                n += 1
                total += row["size"]
                if progress:
                    progress(n, row["size"])
    finally:
        for f in mboxes.values():
            f.close()
    return ExportResult(n, total, out)


def _mbox_entry(data: bytes, sender: str | None, received) -> bytes:
    """mboxrd: a From_ line, ``>``-quoting of lines starting with (>*)From , LF line ends kept as they are.
    By nature not byte-exact (quoting); use eml for byte-exact copies."""
    when = received.strftime("%a %b %d %H:%M:%S %Y") if received else "Thu Jan  1 00:00:00 1970"
    body = re.sub(rb"(?m)^(>*From )", rb">\1", data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender or 'MAILER-DAEMON'} {when}\n".encode() + body + b"\n"


def tqdm_progress(total_items: int, label: str):
    """A progress bar on stderr (only when stderr is a terminal or the export is long)."""
    from tqdm import tqdm

    bar = tqdm(total=total_items, unit="item", desc=label, file=sys.stderr,
               disable=not sys.stderr.isatty() and total_items < 1000, mininterval=0.5)

    def update(n: int, size: int) -> None:
        bar.update(1)

    return bar, update
