"""Settings of the Dagster layer: read once, when the definitions load (:mod:`mailpipe.settings`).

Schedules and sensors need theirs at definition time (cron, tick intervals); the engine's settings become
the ``mailpipe`` resource's config (see :mod:`mailpipe.defs.resources`), so the UI shows what a run used.
"""

from __future__ import annotations

from mailpipe.settings import Settings

SETTINGS = Settings.from_env()

BATCH_SIZE = SETTINGS.batch_size                          # mailboxes per run (backfills, schedule, retries)
BACKUP_CRON = SETTINGS.backup_cron                        # UTC
BACKUP_RUNS_PER_TICK = SETTINGS.backup_runs_per_tick      # the schedule's sweep, per tick
BACKUP_SWEEP_INTERVAL_S = SETTINGS.backup_sweep_interval
DISCOVERY_INTERVAL_S = SETTINGS.discovery_interval
RETRY_INTERVAL_S = SETTINGS.mailbox_retry_interval
RETRY_MAX_ATTEMPTS = SETTINGS.mailbox_retry_max_attempts  # per failed partition
RETRY_BACKOFF_S = SETTINGS.mailbox_retry_backoff          # doubles with each attempt
RETRY_PER_TICK = SETTINGS.mailbox_retry_per_tick          # mailboxes re-launched per tick at most
RUN_RETRY_GRACE_S = SETTINGS.run_retry_grace              # wait this long for Dagster's own run retry
MAINTENANCE_CRON = SETTINGS.maintenance_cron              # UTC; forget + prune, one run per tenant
SAMPLE_CHECK_CRON = SETTINGS.sample_check_cron            # UTC; the content_sample asset check
SAMPLE_CHECK_DAYS = SETTINGS.sample_check_days            # slices: every chunk read once in this many days
