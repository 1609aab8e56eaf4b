"""The working state of one mailbox backup: an on-disk SQLite table, so memory stays flat in mailbox size.

One row per item the backup knows of: the previous snapshot's items (``state='prev'``), what the delta
queries report now (``'upsert'``), what they removed (``'removed'``) and what Graph could not serve
(``'skipped'``). Content columns (``sha256``, ``chunks``, ``size``) are filled from the previous snapshot,
from a checkpoint of an interrupted backup, or by a download. The new manifest is the rows that are
present (``prev``/``upsert``) in a folder that still exists, streamed out in bounded batches.

The merge rules (docs/ENGINE.md explains why):
- an upsert in folder F replaces whatever the row was, and moves the item to F;
- a removal reported by folder F removes the item only if the row is in F (an item moved to G and
  already upserted there is kept);
- a folder listed from scratch (new folder, or resync after 410) removes, at the end, the previous
  items of that folder that the listing did not report;
- items of folders that no longer exist leave the snapshot;
- content is reused, never downloaded again, when the item id is known (previous snapshot or checkpoint)
  and the content cannot have changed: a message that is not a draft (now and then) keeps its MIME
  forever; a draft's content is reused only if its changeKey is unchanged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Metadata columns carried from Graph's message objects into the manifest.
META_COLUMNS = (
    "internet_message_id", "subject", "sender", "received_at", "last_modified_at", "created_at",
    "change_key", "is_read", "is_draft", "flag_status", "categories", "has_attachments",
)
CONTENT_COLUMNS = ("sha256", "chunks", "size", "first_snapshot_id")

_SCHEMA = f"""
CREATE TABLE items (
    item_id TEXT PRIMARY KEY,
    folder_id TEXT,
    state TEXT NOT NULL,           -- prev | upsert | removed | skipped
    had_prev INTEGER NOT NULL DEFAULT 0,
    prev_folder_id TEXT,
    pending INTEGER NOT NULL DEFAULT 0,   -- a download is queued or running
    listed INTEGER,                       -- the from-scratch listing that reported it last
    reused INTEGER NOT NULL DEFAULT 0,
    skip_reason TEXT,
    {", ".join(f"{c}" for c in META_COLUMNS)},
    {", ".join(CONTENT_COLUMNS)}
) WITHOUT ROWID;
CREATE INDEX items_folder ON items(folder_id, state);
CREATE TABLE ckpt (
    item_id TEXT PRIMARY KEY, change_key TEXT, is_draft INTEGER, sha256 TEXT, chunks TEXT, size INTEGER
) WITHOUT ROWID;
"""


def _ts(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v)


@dataclass(frozen=True)
class Content:
    sha256: str
    chunks: list[str]
    size: int


class BackupState:
    """The merge table of one mailbox backup (single-threaded: used from the event loop only)."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("PRAGMA cache_size=-16000")  # 16 MB page cache: bounded memory
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements inside run as one SQLite transaction (one per delta page, one per stored batch),
        not one each. Nested: the outer one commits. An error commits what was done, as the statements
        would have one by one (the table has no journal to roll back: ``journal_mode=OFF``)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    # -- loading what is already known -------------------------------------------------------------
    def load_previous(self, rows: Iterable[dict[str, Any]]) -> int:
        """Rows of the previous snapshot's manifest (a batch at a time)."""
        cols = ("item_id", "folder_id", "state", "had_prev", "prev_folder_id", *META_COLUMNS, *CONTENT_COLUMNS)
        data = [
            (r["item_id"], r["folder_id"], "prev", 1, r["folder_id"],
             *(_meta_value(c, r.get(c)) for c in META_COLUMNS),
             r["sha256"], json.dumps(list(r["chunks"])), int(r["size"]), r.get("first_snapshot_id"))
            for r in rows
        ]
        self.db.executemany(
            f"INSERT OR REPLACE INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", data
        )
        return len(data)

    def load_checkpoint(self, rows: Iterable[dict[str, Any]]) -> int:
        """Rows an interrupted backup stored (their content is in the repository already), or what could
        be salvaged of a damaged snapshot's manifest: content known by item id, reused by the same rule."""
        data = [
            (r["item_id"], r.get("change_key"), int(bool(r.get("is_draft"))), r["sha256"],
             json.dumps(list(r["chunks"])), int(r["size"]))
            for r in rows if r.get("item_id") and r.get("sha256") and r.get("chunks") is not None
            and r.get("size") is not None
        ]
        self.db.executemany("INSERT OR REPLACE INTO ckpt VALUES (?,?,?,?,?,?)", data)
        return len(data)

    # -- what the delta queries say ----------------------------------------------------------------
    def upsert(self, folder_id: str, msg: dict[str, Any], listing: int | None = None) -> bool:
        """Record an item reported present in ``folder_id``. True when its content must be downloaded.

        ``listing``: the id of the from-scratch listing of the folder that reports it (see
        :meth:`finish_full_listing`), None for an incremental delta.
        """
        item_id = msg["item_id"]
        row = self.db.execute(
            "SELECT state, had_prev, is_draft, change_key, sha256, chunks, size, pending, first_snapshot_id, "
            "reused FROM items WHERE item_id=?", (item_id,),
        ).fetchone()
        meta = [_meta_value(c, msg.get(c)) for c in META_COLUMNS]
        is_draft = bool(msg.get("is_draft"))
        content: tuple | None = None
        first = None
        pending = 0
        reused = 0
        had_prev = 0
        if row is not None:
            state, had_prev, old_draft, old_ck, sha, chunks, size, pending, first, reused = row
            if sha is not None and _reusable(bool(old_draft), old_ck, is_draft, msg.get("change_key")):
                content = (sha, chunks, size)
                # content of the previous snapshot (also when the item came back after a removal in
                # another folder: a move), or downloaded earlier in this run (a repeated update)
                reused = 1 if state == "prev" or (state == "removed" and had_prev) else reused
            else:
                first = None
                reused = 0
            # (pending: a download for this item is already under way; when it lands it fills the row)
        if content is None and not pending:
            ck = self.db.execute(
                "SELECT change_key, is_draft, sha256, chunks, size FROM ckpt WHERE item_id=?", (item_id,)
            ).fetchone()
            if ck is not None and _reusable(bool(ck[1]), ck[0], is_draft, msg.get("change_key")):
                content = (ck[2], ck[3], ck[4])
                reused = 1
                first = None
        need_fetch = content is None and not pending
        if content is None:
            content = (None, None, None)
            first = None
        self.db.execute(
            f"INSERT INTO items (item_id, folder_id, state, had_prev, pending, reused, listed, "
            f"{', '.join(META_COLUMNS)}, sha256, chunks, size, first_snapshot_id) "
            f"VALUES (?,?,?,?,?,?,?,{', '.join('?' * len(META_COLUMNS))},?,?,?,?) "
            f"ON CONFLICT(item_id) DO UPDATE SET folder_id=excluded.folder_id, state='upsert', "
            f"pending=excluded.pending, reused=excluded.reused, skip_reason=NULL, listed=excluded.listed, "
            + ", ".join(f"{c}=excluded.{c}" for c in (*META_COLUMNS, *CONTENT_COLUMNS)),
            (item_id, folder_id, "upsert", had_prev, 1 if (need_fetch or pending) else 0, reused, listing,
             *meta, *content, first),
        )
        return need_fetch

    def remove(self, folder_id: str, item_id: str) -> None:
        self.db.execute(
            "UPDATE items SET state='removed', pending=0 WHERE item_id=? AND folder_id=? "
            "AND state IN ('prev','upsert')",
            (item_id, folder_id),
        )

    def finish_full_listing(self, folder_id: str, listing: int) -> int:
        """After from-scratch listing ``listing`` of a folder completed: every item still recorded in
        that folder that the listing did not report (previous items, or items an interrupted earlier
        listing reported) is gone."""
        cur = self.db.execute(
            "UPDATE items SET state='removed', pending=0 WHERE folder_id=? AND state IN ('prev','upsert') "
            "AND listed IS NOT ?",
            (folder_id, listing),
        )
        return cur.rowcount

    # -- downloads ----------------------------------------------------------------------------------
    def stored(self, item_id: str, content: Content) -> dict[str, Any] | None:
        """A download finished; returns the checkpoint row for it (None if the item left meanwhile)."""
        self.db.execute(
            "UPDATE items SET sha256=?, chunks=?, size=?, pending=0 WHERE item_id=?",
            (content.sha256, json.dumps(content.chunks), content.size, item_id),
        )
        row = self.db.execute("SELECT change_key, is_draft FROM items WHERE item_id=?", (item_id,)).fetchone()
        if row is None:
            return None
        return {"item_id": item_id, "change_key": row[0], "is_draft": bool(row[1]),
                "sha256": content.sha256, "chunks": content.chunks, "size": content.size}

    def gone(self, item_id: str) -> None:
        """Graph says the item no longer exists (404 while downloading)."""
        self.db.execute("UPDATE items SET state='removed', pending=0 WHERE item_id=?", (item_id,))

    def skip(self, item_id: str, reason: str) -> None:
        """Graph could not serve the item in this backup: it stays out of the snapshot, listed as skipped
        and as pending (the next backup fetches it whatever the delta says). An item that left meanwhile
        (removed, or its content arrived after all) is not skipped."""
        self.db.execute(
            "UPDATE items SET state='skipped', pending=0, skip_reason=? WHERE item_id=? "
            "AND state IN ('prev','upsert') AND sha256 IS NULL", (reason, item_id)
        )

    def wanted(self, item_id: str) -> bool:
        """Is the item's content still needed (present, and not stored yet)?"""
        row = self.db.execute("SELECT state, sha256 FROM items WHERE item_id=?", (item_id,)).fetchone()
        return row is not None and row[0] in ("prev", "upsert") and row[1] is None

    # -- self-heal: content whose chunks are damaged is downloaded again ------------------------------
    def carried_chunks(self, live_folders: set[str]) -> Iterator[tuple[str, list[str]]]:
        """(item id, chunk names) of every item whose stored content this backup carries forward (streamed:
        a separate cursor, so the table may be read elsewhere meanwhile)."""
        q = self.db.cursor().execute(
            "SELECT item_id, folder_id, chunks FROM items WHERE state='prev' AND sha256 IS NOT NULL")
        for item_id, folder_id, chunks in q:
            if folder_id in live_folders:
                yield item_id, json.loads(chunks)

    def count_carried(self) -> int:
        return self.db.execute("SELECT count(*) FROM items WHERE state='prev' AND sha256 IS NOT NULL").fetchone()[0]

    def invalidate(self, item_ids: Iterable[str]) -> None:
        """Forget the stored content of these items (its chunks are damaged): they are downloaded again."""
        self.db.executemany(
            "UPDATE items SET sha256=NULL, chunks=NULL, size=NULL, first_snapshot_id=NULL, pending=1 "
            "WHERE item_id=?", [(i,) for i in item_ids])

    def drop_checkpoint_rows_using(self, damaged: set[str]) -> int:
        """Checkpoint rows whose content uses a damaged chunk cannot stand for their item."""
        return self.drop_checkpoint_rows_where(lambda chunks: bool(damaged.intersection(chunks)))

    def drop_checkpoint_rows_where(self, unusable: Callable[[list[str]], bool]) -> int:
        """Drop the checkpoint rows whose chunk list ``unusable`` rejects; how many."""
        bad = [item_id for item_id, chunks in self.db.execute("SELECT item_id, chunks FROM ckpt")
               if unusable(json.loads(chunks))]
        self.db.executemany("DELETE FROM ckpt WHERE item_id=?", [(i,) for i in bad])
        return len(bad)

    def reset_previous(self) -> None:
        """Drop what was loaded of a base snapshot that turned out to be unreadable."""
        self.db.execute("DELETE FROM items")

    def item_folder(self, item_id: str) -> str | None:
        row = self.db.execute("SELECT folder_id FROM items WHERE item_id=?", (item_id,)).fetchone()
        return row[0] if row else None

    # -- the result ---------------------------------------------------------------------------------
    def counts(self, live_folders: set[str]) -> dict[str, int]:
        c: dict[str, int] = {"items_total": 0, "items_new": 0, "items_changed": 0, "items_removed": 0,
                             "items_skipped": 0, "items_reused": 0}
        q = self.db.execute("SELECT state, had_prev, folder_id, reused, sha256 IS NOT NULL FROM items")
        for state, had_prev, folder_id, reused, has_content in q:
            present = state in ("prev", "upsert") and folder_id in live_folders and has_content
            if present:
                c["items_total"] += 1
                if state == "upsert":
                    c["items_changed" if had_prev else "items_new"] += 1
                    c["items_reused"] += reused
            elif state == "skipped":
                c["items_skipped"] += 1
            elif had_prev:
                c["items_removed"] += 1
        return c

    def skipped(self) -> list[dict[str, Any]]:
        """Items Graph could not serve: id, folder, reason and their metadata (to retry them next time)."""
        cols = ("item_id", "folder_id", "skip_reason", *META_COLUMNS)
        out = []
        for r in self.db.execute(f"SELECT {', '.join(cols)} FROM items WHERE state='skipped' ORDER BY item_id"):
            d = dict(zip(cols, r))
            d["reason"] = d.pop("skip_reason")
            d["categories"] = json.loads(d["categories"]) if d["categories"] else []
            out.append(d)
        return out

    def iter_manifest(
        self, live_folders: set[str], snapshot_id: str, batch: int = 5000
    ) -> Iterator[list[dict[str, Any]]]:
        cols = ("item_id", "folder_id", *META_COLUMNS, *CONTENT_COLUMNS)
        q = self.db.execute(
            f"SELECT {', '.join(cols)} FROM items WHERE state IN ('prev','upsert') AND sha256 IS NOT NULL "
            "ORDER BY folder_id, received_at, item_id"
        )
        out: list[dict[str, Any]] = []
        for r in q:
            row = dict(zip(cols, r))
            if row["folder_id"] not in live_folders:
                continue
            row["chunks"] = json.loads(row["chunks"])
            row["categories"] = json.loads(row["categories"]) if row["categories"] else []
            for b in ("is_read", "is_draft", "has_attachments"):
                row[b] = None if row[b] is None else bool(row[b])
            row["first_snapshot_id"] = row["first_snapshot_id"] or snapshot_id
            out.append(row)
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out


def _meta_value(col: str, v: Any) -> Any:
    if col == "categories":
        return json.dumps(list(v)) if v else None
    if col in ("is_read", "is_draft", "has_attachments"):
        return None if v is None else int(bool(v))
    if col.endswith("_at"):
        return _ts(v)
    return v


def _reusable(old_draft: bool, old_ck: str | None, is_draft: bool, change_key: str | None) -> bool:
    """Can the stored content stand for the item as it is now? (the rule in the module docstring)"""
    if not old_draft and not is_draft:
        return True
    return old_ck is not None and old_ck == change_key
