"""Sensors: discover mailboxes, and re-materialize failed ones with backoff."""


import hashlib
import json
import time

import dagster as dg
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from mailpipe.defs.assets import mailbox_backup, mailbox_backup_job
from mailpipe.defs.discovery import discover_all
from mailpipe.defs.partitions import PARTITIONS_NAME, contiguous_ranges, keys_of_run_tags, mailboxes_partitions
from mailpipe.defs.resources import MailpipeResource
from mailpipe.defs import settings


@dg.sensor(
    name="discover_mailboxes", minimum_interval_seconds=settings.DISCOVERY_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for every new mailbox of every tenant (each tenant's new keys together, "
    "sorted) and reports mailboxes that vanished; their partitions and backups are kept.",
)
def discover_mailboxes(context: dg.SensorEvaluationContext, mailpipe: MailpipeResource) -> dg.SensorResult:
    reports = discover_all(mailpipe, context.instance)
    new: list[str] = []
    for r in reports:
        (context.log.warning if (r.error or r.vanished) else context.log.info)(r.summary())
        new += r.new_keys
    if not new:
        return dg.SensorResult(skip_reason="no new mailboxes")
    return dg.SensorResult(dynamic_partitions_requests=[mailboxes_partitions.build_add_request(new)])


def _busy_keys(instance: dg.DagsterInstance, all_keys: list[str]) -> set[str]:
    """Keys covered by a queued/running run, or by a failed run whose automatic retry is still pending."""
    index = {k: i for i, k in enumerate(all_keys)}
    busy: set[str] = set()
    for rec in instance.get_run_records(dg.RunsFilter(statuses=list(IN_PROGRESS_RUN_STATUSES))):
        busy.update(keys_of_run_tags(rec.dagster_run.tags, all_keys, index))
    recent_failed = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], tags={"dagster/will_retry": "true"}), limit=200)
    for rec in recent_failed:
        children = instance.get_run_records(dg.RunsFilter(tags={"dagster/parent_run_id": rec.dagster_run.run_id}),
                                            limit=1)
        if not children:
            busy.update(keys_of_run_tags(rec.dagster_run.tags, all_keys, index))
    return busy


def plan_retries(instance: dg.DagsterInstance, cursor: dict, now: float, *, max_attempts: int, backoff_s: float,
                 per_tick: int, batch_size: int) -> tuple[list[dg.RunRequest], dict, list[str]]:
    """(run requests, new cursor, log lines). Cursor: {key: {"attempts": n, "next_at": t}}."""
    all_keys = instance.get_dynamic_partitions(PARTITIONS_NAME)
    status = instance.get_status_by_partition(mailbox_backup.key, all_keys, mailboxes_partitions) or {}
    failed = {k for k, s in status.items() if s == dg.AssetPartitionStatus.FAILED}
    state = {k: v for k, v in cursor.items() if k in failed}  # recovered keys leave the cursor
    notes: list[str] = []
    busy = _busy_keys(instance, all_keys) if failed else set()
    due: list[str] = []
    for k in sorted(failed, key=all_keys.index):
        st = state.setdefault(k, {"attempts": 0, "next_at": now + backoff_s})
        if k in busy:
            continue
        if st["attempts"] >= max_attempts:
            if not st.get("gave_up"):
                st["gave_up"] = True
                notes.append(f"{k}: still failing after {max_attempts} retries; giving up until it succeeds "
                             "(launch it by hand, or it will be retried by the next scheduled backup)")
            continue
        if st["next_at"] <= now:
            due.append(k)
    due = due[:per_tick]
    requests = []
    for rng in contiguous_ranges(all_keys, due, batch_size):
        for k in rng.keys:
            state[k]["attempts"] += 1
            state[k]["next_at"] = now + backoff_s * 2 ** state[k]["attempts"]
        ident = hashlib.sha1(json.dumps([[k, state[k]["attempts"]] for k in rng.keys]).encode()).hexdigest()[:16]
        requests.append(dg.RunRequest(
            run_key=f"retry-{ident}", job_name=mailbox_backup_job.name,
            tags={**rng.tags(), "mailpipe/retry_attempt": str(max(state[k]["attempts"] for k in rng.keys))},
        ))
        notes.append(f"retrying {len(rng.keys)} mailbox(es) {rng.start} .. {rng.end}")
    return requests, state, notes


@dg.sensor(
    name="retry_failed_mailboxes", minimum_interval_seconds=settings.RETRY_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING, job=mailbox_backup_job,
    description=f"Re-materializes FAILED mailbox partitions with exponential backoff (first after "
    f"{settings.RETRY_BACKOFF_S}s, doubling), at most {settings.RETRY_MAX_ATTEMPTS} times each and "
    f"{settings.RETRY_PER_TICK} per tick, batched in contiguous ranges; never while a run for the mailbox "
    "is queued or running or an automatic run retry is pending.",
)
def retry_failed_mailboxes(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, state, notes = plan_retries(
        context.instance, cursor, time.time(), max_attempts=settings.RETRY_MAX_ATTEMPTS,
        backoff_s=settings.RETRY_BACKOFF_S, per_tick=settings.RETRY_PER_TICK, batch_size=settings.BATCH_SIZE)
    for n in notes:
        context.log.info(n)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(state, sort_keys=True),
                           skip_reason=None if requests else "nothing to retry now")
