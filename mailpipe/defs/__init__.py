"""The Dagster layer: partitions, the asset and its checks, the jobs, sensors, schedules and the resource.

Thin by design: it turns partitions into engine calls and engine results into materializations,
metadata and failures. Nothing heavy (msgraph, boto3) is imported when the definitions load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing dagster costs ~100 MB: not for `mailpipe backup` and friends
    import dagster as dg


def build_definitions() -> dg.Definitions:
    import dagster as dg

    from mailpipe.config import load_tenants
    from mailpipe.defs.assets import mailbox_backup, mailbox_backup_job
    from mailpipe.defs.checks import content_sample, content_sample_job, verify_content_sample
    from mailpipe.defs.maintenance import maintain_all_repositories, repository_maintenance
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe.defs.restore import mailbox_restore_job
    from mailpipe.defs.schedules import backup_all_mailboxes
    from mailpipe.defs.sensors import discover_mailboxes, retry_failed_mailboxes
    from mailpipe.defs.settings import SETTINGS

    load_tenants()  # a bad tenants file fails the code location now, with its clear message
    return dg.Definitions(
        assets=[mailbox_backup],
        asset_checks=[content_sample],  # (snapshot_structure is declared on the asset, which runs it)
        jobs=[mailbox_backup_job, mailbox_restore_job, content_sample_job, repository_maintenance],
        sensors=[discover_mailboxes, retry_failed_mailboxes],
        schedules=[backup_all_mailboxes, verify_content_sample, maintain_all_repositories],
        resources={"mailpipe": MailpipeResource.from_settings(SETTINGS)},
        # every job's default, UI backfills' implicit asset job included: a run has one step (the batch's
        # mailboxes run concurrently inside it), so the multiprocess executor's step process only adds
        # ~1–1.5 s per run (docs/OPERATIONS.md); and a Celery worker's pool process may not start one
        executor=dg.in_process_executor,
    )
