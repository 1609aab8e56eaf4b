"""mailpipe: incremental, deduplicated backups of Exchange Online mailboxes through Microsoft Graph."""

import os

# pyarrow's default allocator (mimalloc in its wheels) keeps freed memory in per-thread heaps; with 8 store
# threads writing checkpoint parts that carry blobs, that held ~90 MB more at the peak than the system
# allocator (python -m bench.backup_bench --only 5). Parquet I/O here is not allocation-bound. Only takes
# effect when mailpipe is imported before pyarrow; set the variable yourself to choose otherwise.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
