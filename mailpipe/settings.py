"""Every tunable of mailpipe, in one table, read once from the environment.

Settings are not configuration of *what* is backed up (that is the tenants file, :mod:`mailpipe.config`)
but of *how*: retry budgets, time bounds, checkpoint cadence, batch sizes. Each has exactly one
environment variable and one meaning. They are read once — by the CLI when it starts, by the Dagster
definitions when they load — and passed down as a :class:`Settings` value; the engine and the Graph
layer never read the environment themselves. In Dagster the engine's settings are the ``mailpipe``
resource's config, so the UI shows the values a run used.

docs/OPERATIONS.md lists them (generated from :data:`TABLE`, checked by a test).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mailpipe.errors import UserError


@dataclass(frozen=True)
class Setting:
    field: str          # a field of :class:`Settings` (which holds its type and default)
    env: str
    minimum: float | None
    meaning: str

    @property
    def default(self) -> Any:
        return Settings.__dataclass_fields__[self.field].default

    @property
    def kind(self) -> type:
        return type(self.default)


# (field, environment variable, minimum, meaning): the one list of settings; types and defaults are
# those of the :class:`Settings` fields below.
TABLE: tuple[Setting, ...] = tuple(Setting(*row) for row in (
    # -- Graph requests (per request; docs/GRAPH.md)
    ("graph_retry_attempts", "MAILPIPE_GRAPH_RETRY_ATTEMPTS", 1,
     "attempts per Graph request on 5xx, timeouts and connection errors"),
    ("graph_retry_base_delay", "MAILPIPE_GRAPH_RETRY_BASE_DELAY", 0,
     "first backoff between attempts, seconds (doubles, full jitter)"),
    ("graph_retry_max_delay", "MAILPIPE_GRAPH_RETRY_MAX_DELAY", 0,
     "longest backoff between attempts, seconds"),
    ("graph_response_timeout", "MAILPIPE_GRAPH_RESPONSE_TIMEOUT", 0.1,
     "seconds from sending a request to its response headers (connection included)"),
    ("graph_min_transfer_rate", "MAILPIPE_GRAPH_MIN_TRANSFER_RATE", 1,
     "slowest acceptable body, bytes/s averaged from the headers on (after the grace period)"),
    ("graph_slow_body_grace", "MAILPIPE_GRAPH_SLOW_BODY_GRACE", 0,
     "seconds a body may take regardless of its rate"),
    # -- one mailbox backup (docs/ENGINE.md)
    ("checkpoint_seconds", "MAILPIPE_CHECKPOINT_SECONDS", 0,
     "a checkpoint of stored items at least this often, seconds"),
    ("checkpoint_items", "MAILPIPE_CHECKPOINT_ITEMS", 1,
     "a checkpoint at least every this many stored items"),
    ("journal_items", "MAILPIPE_JOURNAL_ITEMS", 0,
     "between checkpoints, stored items also go to a local journal in the work dir at least every this many "
     "(0: no journal); a restart on the same host then downloads again at most these + the downloads in flight"),
    ("journal_seconds", "MAILPIPE_JOURNAL_SECONDS", 0,
     "a journal part at least this often, seconds"),
    ("mailbox_deadline", "MAILPIPE_MAILBOX_DEADLINE", 1,
     "a mailbox backup that runs longer fails (its checkpoints are kept), seconds"),
    ("item_retry_delay", "MAILPIPE_ITEM_RETRY_DELAY", 0,
     "first wait before an item Graph could not serve is tried again in the same backup (doubles, 3 passes)"),
    ("verify_min_chunks", "MAILPIPE_VERIFY_MIN_CHUNKS", 0,
     "chunks of carried-forward items that each backup reads back and verifies, at least"),
    ("verify_cycle", "MAILPIPE_VERIFY_CYCLE", 0,
     "every carried-forward chunk is read back at least once every this many backups; 0 here and 0 above: no "
     "read-back (damage that `mailpipe check` finds is still repaired)"),
    ("lease_seconds", "MAILPIPE_LEASE_SECONDS", 1,
     "a mailbox's backup lease expires this long after its holder's last renewal"),
    ("prune_safety", "MAILPIPE_PRUNE_SAFETY", 0,
     "prune: packs younger than this are never deleted, and a prune plan is carried out no sooner, seconds"),
    ("work_dir", "MAILPIPE_WORK_DIR", None,
     "working state of running backups (mode 0700); default $MAILPIPE_HOME/work or ./.mailpipe/work"),
    ("max_parallel_mailboxes", "MAILPIPE_PARALLEL_MAILBOXES", 1,
     "mailboxes backed up at the same time in one process"),
    # -- Dagster (docs/OPERATIONS.md)
    ("batch_size", "MAILPIPE_BATCH_SIZE", 1,
     "mailboxes per run: backfills, the schedule, retries"),
    ("backup_cron", "MAILPIPE_BACKUP_CRON", None, "the backup schedule, cron, UTC"),
    ("backup_runs_per_tick", "MAILPIPE_BACKUP_RUNS_PER_TICK", 1,
     "backup runs the schedule's sweep launches per tick at most (and none while that many are still queued)"),
    ("backup_sweep_interval", "MAILPIPE_BACKUP_SWEEP_INTERVAL", 1,
     "seconds between ticks of the schedule's sweep"),
    ("discovery_interval", "MAILPIPE_DISCOVERY_INTERVAL", 1,
     "seconds between mailbox discovery sensor ticks"),
    ("mailbox_retry_interval", "MAILPIPE_MAILBOX_RETRY_INTERVAL", 1,
     "seconds between ticks of the sensor that retries failed mailboxes"),
    ("mailbox_retry_max_attempts", "MAILPIPE_MAILBOX_RETRY_MAX_ATTEMPTS", 0,
     "retries per failed mailbox before that sensor gives up on it"),
    ("mailbox_retry_backoff", "MAILPIPE_MAILBOX_RETRY_BACKOFF", 0,
     "seconds before a failed mailbox's first retry; doubles with each attempt"),
    ("mailbox_retry_per_tick", "MAILPIPE_MAILBOX_RETRY_PER_TICK", 1,
     "failed mailboxes re-launched per sensor tick at most"),
    ("run_retry_grace", "MAILPIPE_RUN_RETRY_GRACE", 0,
     "seconds the sensor waits for Dagster's automatic run retry to appear before retrying itself"),
    ("maintenance_cron", "MAILPIPE_MAINTENANCE_CRON", None,
     "the repository maintenance schedule (forget, then prune; one run per tenant), cron, UTC"),
    ("sample_check_cron", "MAILPIPE_SAMPLE_CHECK_CRON", None,
     "the schedule of the content sample check (reads one slice of every repository's chunks), cron, UTC"),
    ("sample_check_days", "MAILPIPE_SAMPLE_CHECK_DAYS", 1,
     "slices of the content sample: each day's run reads one, so every chunk is read once in this many days"),
))

# Names that meant something else once: refused with the new names, never silently ignored.
RENAMED = {
    "MAILPIPE_RETRY_MAX_ATTEMPTS": "MAILPIPE_GRAPH_RETRY_ATTEMPTS (attempts per Graph request) or "
                                   "MAILPIPE_MAILBOX_RETRY_MAX_ATTEMPTS (sensor retries per failed mailbox)",
    "MAILPIPE_RETRY_BASE_DELAY": "MAILPIPE_GRAPH_RETRY_BASE_DELAY",
    "MAILPIPE_RETRY_MAX_DELAY": "MAILPIPE_GRAPH_RETRY_MAX_DELAY",
    "MAILPIPE_RETRY_INTERVAL": "MAILPIPE_MAILBOX_RETRY_INTERVAL",
    "MAILPIPE_RETRY_BACKOFF": "MAILPIPE_MAILBOX_RETRY_BACKOFF",
    "MAILPIPE_RETRY_PER_TICK": "MAILPIPE_MAILBOX_RETRY_PER_TICK",
}


@dataclass(frozen=True)
class Settings:
    graph_retry_attempts: int = 6
    graph_retry_base_delay: float = 0.5
    graph_retry_max_delay: float = 30.0
    graph_response_timeout: float = 120.0
    graph_min_transfer_rate: int = 4096
    graph_slow_body_grace: float = 30.0
    checkpoint_seconds: float = 2.0
    checkpoint_items: int = 30
    journal_items: int = 5
    journal_seconds: float = 0.5
    mailbox_deadline: float = 6 * 3600.0
    item_retry_delay: float = 2.0
    verify_min_chunks: int = 2000
    verify_cycle: int = 30
    lease_seconds: float = 300.0
    prune_safety: float = 3600.0
    work_dir: str = ""
    max_parallel_mailboxes: int = 32
    batch_size: int = 50
    backup_cron: str = "0 2 * * *"
    backup_runs_per_tick: int = 20
    backup_sweep_interval: int = 30
    discovery_interval: int = 3600
    mailbox_retry_interval: int = 60
    mailbox_retry_max_attempts: int = 5
    mailbox_retry_backoff: int = 120
    mailbox_retry_per_tick: int = 100
    run_retry_grace: int = 180
    maintenance_cron: str = "0 4 * * 0"
    sample_check_cron: str = "0 8 * * *"
    sample_check_days: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from ``env`` (default: the process environment); a :class:`UserError` naming the
        variable for a bad value or a retired name."""
        env = os.environ if env is None else env
        for old, new in RENAMED.items():
            if env.get(old):
                raise UserError(f"{old} is no longer read (it meant two things); use {new}")
        return cls(**{s.field: parse(s, env.get(s.env)) for s in TABLE if env.get(s.env, "") != ""})

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (field names), each checked like an environment value."""
        by_field = {s.field: s for s in TABLE}
        vals = {k: getattr(self, k) for k in (f.name for f in fields(self))}
        for k, v in changes.items():
            if k not in by_field:
                raise UserError(f"unknown setting {k!r}")
            vals[k] = parse(by_field[k], v)
        return Settings(**vals)

    def work_root(self) -> str:
        """Where backups keep their working state (see ``work_dir``)."""
        if self.work_dir:
            return os.path.abspath(os.path.expanduser(self.work_dir))
        from mailpipe.config import mailpipe_home

        return str(mailpipe_home() / "work")

    def tenant_work_dir(self, tenant: str) -> str:
        """``<work root>/<tenant>``, created as directories only their owner can enter (0700): the place for
        anything local that holds mail data (merge tables, Parquet files in transit)."""
        return private_dir(os.path.join(private_dir(self.work_root()), tenant))


def private_dir(path: str) -> str:
    """``path`` as a directory only its owner can enter (0700), created if needed."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def parse(s: Setting, raw: Any) -> Any:
    """One setting's value from a string (or an already typed value), checked."""
    if s.kind is str:
        return "" if raw is None else str(raw)
    try:
        v = s.kind(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        v = None
    if v is None or v != v:  # not a number (NaN included)
        raise UserError(f"{s.env} must be a {'whole ' if s.kind is int else ''}number (got {raw!r})")
    if s.minimum is not None and v < s.minimum:
        raise UserError(f"{s.env} must be at least {s.minimum:g} (got {raw!r})")
    return v


def table_markdown() -> str:
    """The settings as a Markdown table (docs/OPERATIONS.md holds a copy; a test keeps them equal)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in TABLE:
        default = s.default if s.default != "" else "(see meaning)"
        if s.kind is float and float(default).is_integer():
            default = int(default)
        lines.append(f"| `{s.env}` | {default} | {s.meaning} |")
    return "\n".join(lines)
