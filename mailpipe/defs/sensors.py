"""Sensors: discover mailboxes, and re-materialize failed ones with backoff."""


import hashlib
import json
import time
from datetime import datetime, timezone

import dagster as dg

from mailpipe.defs import settings
from mailpipe.defs.discovery import discover_all, registration_requests
from mailpipe.defs.partitions import KeyCache, Layout, contiguous_ranges
from mailpipe.defs.resources import MailpipeResource


@dg.sensor(
    name="discover_mailboxes", minimum_interval_seconds=settings.DISCOVERY_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for every new mailbox of every tenant to its shard's set (each set's new "
    "keys together, sorted) and to the routing index, and reports mailboxes that vanished; their partitions "
    "and backups are kept.",
)
def discover_mailboxes(context: dg.SensorEvaluationContext, mailpipe: MailpipeResource) -> dg.SensorResult:
    reports = discover_all(mailpipe, context.instance)
    for r in reports:
        (context.log.warning if (r.error or r.vanished) else context.log.info)(r.summary())
    requests = registration_requests(reports)
    if not requests:
        return dg.SensorResult(skip_reason="no new mailboxes")
    return dg.SensorResult(dynamic_partitions_requests=requests)


# Runs that will (or may still) back up the mailboxes they cover: the sensor never launches another run
# for those keys. Public statuses, listed explicitly: NOT_STARTED covers the moment between the run
# retry daemon creating a retry and submitting it; CANCELING runs may still be writing.
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
]


def run_retry_pending(instance: dg.DagsterInstance, rec: dg.RunRecord, now: float, grace_s: float) -> bool:
    """Whether Dagster's own run retry can and will re-run this failed run, so its mailboxes are left to it.

    ``dagster/will_retry=true`` alone is not enough: Dagster sets it on every failed run when run retries
    are enabled, but its retry daemon can only re-launch a run that has a code-location origin. A run
    started by ``dagster job execute`` or ``execute_in_process`` (``mailpipe demo``) has none; the daemon
    logs "Run does not have an external job origin" and never retries it, so waiting for that retry would
    leave its mailboxes FAILED for ever. And a retry that can happen may still not: the daemon skips a
    run whose backfill has ended or was canceled, or whose code location or job is gone. So the sensor
    waits only for a run with an origin, and only ``grace_s`` after it ended (the retry daemon normally
    acts within seconds); once the retry run exists, it is that run's status (active, failed or
    succeeded) that counts, not this one's."""
    run = rec.dagster_run
    if run.remote_job_origin is None:
        return False
    if instance.get_run_records(dg.RunsFilter(tags={"dagster/parent_run_id": run.run_id}), limit=1):
        return False  # the retry exists: busy while it is active, and judged on its own once it ends
    ended = rec.end_time if rec.end_time is not None else rec.update_timestamp.timestamp()
    return now - ended < grace_s


def _busy_keys(instance: dg.DagsterInstance, cache: KeyCache, now: float, grace_s: float) -> set[str]:
    """Keys covered by a queued/running run, or by a failed run whose automatic retry is pending."""
    busy: set[str] = set()
    for rec in instance.get_run_records(dg.RunsFilter(statuses=ACTIVE_STATUSES)):
        busy.update(cache.keys_of_run(rec.dagster_run.job_name, rec.dagster_run.tags))
    # only runs that ended within the grace period can have a pending retry; a run's update time is at or
    # after its end time, so this pre-filter (with a minute to spare) drops none of them, and keeps the
    # query small however many failed runs the instance holds
    recent_failed = instance.get_run_records(dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.FAILURE], tags={"dagster/will_retry": "true"},
        updated_after=datetime.fromtimestamp(now - grace_s - 60, tz=timezone.utc)))
    for rec in recent_failed:
        if run_retry_pending(instance, rec, now, grace_s):
            busy.update(cache.keys_of_run(rec.dagster_run.job_name, rec.dagster_run.tags))
    return busy


def plan_retries(instance: dg.DagsterInstance, cursor: dict, now: float, *, max_attempts: int, backoff_s: float,
                 per_tick: int, batch_size: int, run_retry_grace_s: float = settings.RUN_RETRY_GRACE_S,
                 layout: Layout | None = None) -> tuple[list[dg.RunRequest], dict, list[str]]:
    """(run requests, new cursor, log lines). Cursor: {key: {"attempts": n, "next_at": t}}.

    Per shard: its keys (one read of its set), their statuses, the failed ones in registration order (by
    a key→position map); due ones become range runs of the shard's job over contiguous blocks."""
    from mailpipe.defs import current_layout

    cache = KeyCache(instance, layout or current_layout())
    failed_by_shard = {}
    for shard in cache.layout.shards:
        index = cache.index(shard)
        if not index.keys:
            continue
        status = instance.get_status_by_partition(shard.asset_key, index.keys, shard.partitions_def) or {}
        failed = [k for k, s in status.items() if s == dg.AssetPartitionStatus.FAILED]
        if failed:
            failed_by_shard[shard] = index.sort(failed)
    all_failed = {k for ks in failed_by_shard.values() for k in ks}
    state = {k: v for k, v in cursor.items() if k in all_failed}  # recovered keys leave the cursor
    notes: list[str] = []
    busy = _busy_keys(instance, cache, now, run_retry_grace_s) if all_failed else set()
    due: dict = {}
    left = per_tick
    for shard, keys in failed_by_shard.items():
        for k in keys:
            st = state.setdefault(k, {"attempts": 0, "next_at": now + backoff_s})
            if k in busy:
                continue
            if st["attempts"] >= max_attempts:
                if not st.get("gave_up"):
                    st["gave_up"] = True
                    notes.append(f"{k}: still failing after {max_attempts} retries; giving up until it succeeds "
                                 "(launch it by hand, or it will be retried by the next scheduled backup)")
                continue
            if st["next_at"] <= now and left > 0:
                due.setdefault(shard, []).append(k)
                left -= 1
    requests = []
    for shard, keys in due.items():
        for rng in contiguous_ranges(cache.index(shard), keys, batch_size, shard):
            for k in rng.keys:
                state[k]["attempts"] += 1
                state[k]["next_at"] = now + backoff_s * 2 ** state[k]["attempts"]
            ident = hashlib.sha1(json.dumps([[k, state[k]["attempts"]] for k in rng.keys]).encode()).hexdigest()[:16]
            requests.append(dg.RunRequest(
                run_key=f"retry-{ident}", job_name=shard.backup_job_name,
                tags={**rng.tags(), "mailpipe/retry_attempt": str(max(state[k]["attempts"] for k in rng.keys))},
            ))
            notes.append(f"retrying {len(rng.keys)} mailbox(es) {rng.start} .. {rng.end}")
    return requests, state, notes


def build_retry_sensor(jobs: list) -> dg.SensorDefinition:
    """``retry_failed_mailboxes``, targeting every shard's backup job."""

    @dg.sensor(
        name="retry_failed_mailboxes", minimum_interval_seconds=settings.RETRY_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING, jobs=jobs or None,
        description=f"Re-materializes FAILED mailbox partitions with exponential backoff (first after "
        f"{settings.RETRY_BACKOFF_S}s, doubling), at most {settings.RETRY_MAX_ATTEMPTS} times each and "
        f"{settings.RETRY_PER_TICK} per tick, batched in contiguous ranges of each shard; never while a run for "
        "the mailbox is queued or running, nor while Dagster's automatic retry of its failed run is pending "
        f"(only for runs Dagster can retry, at most {settings.RUN_RETRY_GRACE_S}s after they failed).",
    )
    def retry_failed_mailboxes(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return retry_tick(context)

    return retry_failed_mailboxes


def retry_tick(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, state, notes = plan_retries(
        context.instance, cursor, time.time(), max_attempts=settings.RETRY_MAX_ATTEMPTS,
        backoff_s=settings.RETRY_BACKOFF_S, per_tick=settings.RETRY_PER_TICK, batch_size=settings.BATCH_SIZE,
        run_retry_grace_s=settings.RUN_RETRY_GRACE_S)
    for n in notes:
        context.log.info(n)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(state, sort_keys=True),
                           skip_reason=None if requests else "nothing to retry now")
