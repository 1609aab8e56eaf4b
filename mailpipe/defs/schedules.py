"""The backup schedule: every mailbox of every tenant once per ``MAILPIPE_BACKUP_CRON``, as a *sweep*.

One tick creating a run per batch of every mailbox (40,000 runs at 1M mailboxes) swamps the run queue, so
``backup_all_mailboxes`` is a sensor with a cursor: at each cron time a new sweep starts, and every tick
(``MAILPIPE_BACKUP_SWEEP_INTERVAL``) launches the next ``MAILPIPE_BACKUP_RUNS_PER_TICK`` runs of
``MAILPIPE_BATCH_SIZE`` mailboxes — fewer while earlier runs of the sweep are still queued — walking each
shard's partition set in registration order (contiguous ranges of one shard's job). The cursor holds the
sweep (its cron time) and the position reached in each shard: ``{"sweep": ISO time, "pos": {set: next
index}, "done": [sets finished]}``. A sweep not finished when the next cron time comes is abandoned (the
new one starts from the beginning; its mailboxes are in it) and the log says so. Like a schedule, a new
sensor (no cursor) starts with the next cron time, not the last one.
"""


import json
from datetime import datetime, timezone

import dagster as dg

from mailpipe.defs import settings
from mailpipe.defs.partitions import KeyRange, Layout

SWEEP_TAG = "mailpipe/sweep"  # the sweep (cron time) a run belongs to


def sweep_time(cron: str, now: float) -> str:
    """The sweep ``now`` belongs to: the latest cron time at or before it (UTC), ISO."""
    # Dagster's own cron iterator (the one its schedules use; not exported, and Dagster is pinned)
    from dagster._utils.schedules import get_latest_completed_cron_tick

    return get_latest_completed_cron_tick(cron, datetime.fromtimestamp(now, tz=timezone.utc), "UTC").isoformat()


def plan_sweep(instance: dg.DagsterInstance, layout: Layout, cursor: dict, now: float, *, cron: str,
               batch_size: int, runs_per_tick: int) -> tuple[list[dg.RunRequest], dict, list[str]]:
    """(run requests, new cursor, log lines) of one tick of the sweep."""
    notes: list[str] = []
    sweep = sweep_time(cron, now)
    if not cursor.get("sweep"):  # a new sensor, like a new schedule, waits for the next cron time
        notes.append(f"the first sweep begins at the next cron time ({cron} UTC) after {sweep}")
        return [], {"sweep": sweep, "pos": {}, "done": [], "finished": True}, notes
    if cursor.get("sweep") != sweep:
        if cursor.get("sweep") and not cursor.get("finished"):
            notes.append(f"sweep {cursor['sweep']} had not finished when sweep {sweep} began: the new sweep "
                         "starts from the first mailbox")
        cursor = {"sweep": sweep, "pos": {}, "done": []}
    else:
        cursor = {"sweep": sweep, "pos": dict(cursor.get("pos", {})), "done": list(cursor.get("done", [])),
                  **({"finished": True} if cursor.get("finished") else {})}
    if cursor.get("finished"):
        return [], cursor, notes
    queued = instance.get_runs_count(dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED], tags={SWEEP_TAG: sweep}))
    budget = runs_per_tick - queued
    if budget <= 0:
        notes.append(f"sweep {sweep}: {queued} of its runs still queued; none added this tick")
        return [], cursor, notes
    requests: list[dg.RunRequest] = []
    done = set(cursor["done"])
    for shard in layout.shards:
        if budget <= 0:
            break
        name = shard.partitions_name
        if name in done:
            continue
        keys = instance.get_dynamic_partitions(name)
        pos = cursor["pos"].get(name, 0)
        while pos < len(keys) and budget > 0:
            chunk = tuple(keys[pos: pos + batch_size])
            tags = {**KeyRange(shard.tenant, chunk, shard).tags(), SWEEP_TAG: sweep}
            requests.append(dg.RunRequest(run_key=f"{sweep}:{name}:{pos}", job_name=shard.backup_job_name, tags=tags))
            pos += len(chunk)
            budget -= 1
        cursor["pos"][name] = pos
        if pos >= len(keys):
            done.add(name)
    cursor["done"] = sorted(done)
    if all(s.partitions_name in done for s in layout.shards):
        cursor["finished"] = True
        total = sum(cursor["pos"].values())
        notes.append(f"sweep {sweep}: every registered mailbox launched ({total:,})")
    if requests:
        n = sum(int(r.tags["mailpipe/mailboxes"]) for r in requests)
        notes.append(f"sweep {sweep}: {len(requests)} run(s), {n} mailbox(es)")
    return requests, cursor, notes


def build_backup_sweep(jobs: list) -> dg.SensorDefinition:
    @dg.sensor(
        name="backup_all_mailboxes", minimum_interval_seconds=settings.BACKUP_SWEEP_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING, jobs=jobs or None,
        description=f"The backup schedule: at {settings.BACKUP_CRON} UTC (MAILPIPE_BACKUP_CRON) a sweep over every "
        f"registered mailbox of every tenant begins; each tick (every {settings.BACKUP_SWEEP_INTERVAL_S}s) launches "
        f"up to {settings.BACKUP_RUNS_PER_TICK} runs (MAILPIPE_BACKUP_RUNS_PER_TICK, fewer while the sweep's runs "
        f"are queued) of {settings.BATCH_SIZE} mailboxes (MAILPIPE_BATCH_SIZE), each over one shard, tagged with "
        "the tenant; the cursor says how far the sweep is.",
    )
    def backup_all_mailboxes(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return sweep_tick(context)

    return backup_all_mailboxes


def sweep_tick(context: dg.SensorEvaluationContext, now: "float | None" = None) -> dg.SensorResult:
    import time

    from mailpipe.defs import current_layout

    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, cursor, notes = plan_sweep(
        context.instance, current_layout(), cursor, time.time() if now is None else now,
        cron=settings.BACKUP_CRON, batch_size=settings.BATCH_SIZE, runs_per_tick=settings.BACKUP_RUNS_PER_TICK)
    for n in notes:
        context.log.info(n)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True),
                           skip_reason=None if requests else (notes[-1] if notes else "sweep finished"))
