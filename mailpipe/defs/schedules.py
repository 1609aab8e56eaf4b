"""The schedule: every mailbox of every tenant, as batched runs."""


import dagster as dg

from mailpipe.defs import settings
from mailpipe.defs.assets import mailbox_backup_job
from mailpipe.defs.partitions import PARTITIONS_NAME, contiguous_ranges


def batched_run_requests(instance: dg.DagsterInstance, run_key_prefix: str, batch_size: int) -> list[dg.RunRequest]:
    keys = instance.get_dynamic_partitions(PARTITIONS_NAME)
    return [
        dg.RunRequest(run_key=f"{run_key_prefix}:{r.start}", job_name=mailbox_backup_job.name, tags=r.tags())
        for r in contiguous_ranges(keys, keys, batch_size)
    ]


@dg.schedule(
    name="backup_all_mailboxes", cron_schedule=settings.BACKUP_CRON, job=mailbox_backup_job,
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Backs up every registered mailbox of every tenant ({settings.BACKUP_CRON} UTC, "
    f"MAILPIPE_BACKUP_CRON), in runs of up to {settings.BATCH_SIZE} mailboxes (MAILPIPE_BATCH_SIZE) tagged "
    "with their tenant.",
)
def backup_all_mailboxes(context: dg.ScheduleEvaluationContext):
    reqs = batched_run_requests(context.instance, context.scheduled_execution_time.isoformat(), settings.BATCH_SIZE)
    if not reqs:
        return dg.SkipReason("no mailboxes registered yet (the discover_mailboxes sensor adds them)")
    return reqs
