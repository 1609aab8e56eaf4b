"""The Parquet schemas of the repository (the one place they are defined)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

MANIFEST = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),   # immutable Graph id
    pa.field("folder_id", pa.string(), nullable=False),
    pa.field("folder_path", pa.list_(pa.string())),     # display names from the root
    pa.field("internet_message_id", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("sender", pa.string()),
    pa.field("received_at", TS),
    pa.field("last_modified_at", TS),
    pa.field("created_at", TS),
    pa.field("change_key", pa.string()),
    pa.field("is_read", pa.bool_()),
    pa.field("is_draft", pa.bool_()),
    pa.field("flag_status", pa.string()),
    pa.field("categories", pa.list_(pa.string())),
    pa.field("has_attachments", pa.bool_()),
    pa.field("size", pa.int64(), nullable=False),       # MIME bytes
    pa.field("sha256", pa.string(), nullable=False),    # of the whole MIME
    pa.field("chunks", pa.list_(pa.string()), nullable=False),  # ordered chunk hashes
    pa.field("first_snapshot_id", pa.string()),         # the snapshot that first stored this content
], metadata={"mailpipe.table": "manifest", "mailpipe.version": "1"})

FOLDERS = pa.schema([
    pa.field("folder_id", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),
    pa.field("display_name", pa.string()),
    pa.field("path", pa.list_(pa.string())),
    pa.field("total_item_count", pa.int64()),
], metadata={"mailpipe.table": "folders", "mailpipe.version": "1"})

# full-fidelity streams of the mailbox export API (``content: fidelity|both``): one row per item of every type
# present at the snapshot (docs/FORMAT.md, "fidelity.parquet")
FIDELITY = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),   # the export API's item id
    pa.field("item_type", pa.string()),                 # message class: IPM.Note, IPM.Appointment, ...
    pa.field("folder_id", pa.string(), nullable=False),
    pa.field("folder_path", pa.list_(pa.string())),
    pa.field("folder_class", pa.string()),              # IPF.Note, IPF.Appointment, IPF.Contact, IPF.Task, ...
    pa.field("change_key", pa.string()),                # the version the stream is of
    pa.field("created_at", TS),
    pa.field("last_modified_at", TS),
    pa.field("categories", pa.list_(pa.string())),
    pa.field("size", pa.int64(), nullable=False),       # stream bytes
    pa.field("sha256", pa.string(), nullable=False),    # of the whole stream
    pa.field("chunks", pa.list_(pa.string()), nullable=False),
    pa.field("first_snapshot_id", pa.string()),
], metadata={"mailpipe.table": "fidelity", "mailpipe.version": "1"})

CHECKPOINT = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("change_key", pa.string()),
    pa.field("is_draft", pa.bool_()),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("chunks", pa.list_(pa.string()), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    # the stored blobs of chunks this item was the first to store that were not yet in an uploaded pack
    # when the part was written (a restarted backup puts them into its own pack: docs/FORMAT.md)
    pa.field("blobs", pa.list_(pa.struct([pa.field("chunk", pa.string()), pa.field("data", pa.binary())]))),
], metadata={"mailpipe.table": "checkpoint", "mailpipe.version": "2"})


def _ts(v: Any) -> datetime | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        v = datetime.fromisoformat(v.replace("Z", "+00:00"))
    if v.tzinfo is None:
        v = v.replace(tzinfo=timezone.utc)
    return v


def to_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Rows (dicts) → a record batch of ``schema``; missing optional columns are null."""
    cols = {}
    for f in schema:
        vals = [r.get(f.name) for r in rows]
        if not f.nullable and any(v is None for v in vals):
            raise ValueError(f"{schema.metadata.get(b'mailpipe.table', b'?').decode()}: column {f.name!r} "
                             "must not be null")
        if f.type == TS:
            vals = [_ts(v) for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.RecordBatch.from_pydict(cols, schema=schema)
