"""Settings of the Dagster layer, read from the environment when the definitions load."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name} must be a whole number (got {v!r})") from None
    if n < 1:
        raise ValueError(f"{name} must be at least 1 (got {n})")
    return n


BATCH_SIZE = _int("MAILPIPE_BATCH_SIZE", 25)                      # mailboxes per run (backfills, schedule, retries)
BACKUP_CRON = os.environ.get("MAILPIPE_BACKUP_CRON", "0 2 * * *")  # UTC
DISCOVERY_INTERVAL_S = _int("MAILPIPE_DISCOVERY_INTERVAL", 3600)
RETRY_INTERVAL_S = _int("MAILPIPE_RETRY_INTERVAL", 60)
RETRY_MAX_ATTEMPTS = _int("MAILPIPE_RETRY_MAX_ATTEMPTS", 5)       # per failed partition
RETRY_BACKOFF_S = _int("MAILPIPE_RETRY_BACKOFF", 120)             # doubles with each attempt
RETRY_PER_TICK = _int("MAILPIPE_RETRY_PER_TICK", 100)             # mailboxes re-launched per tick at most
