"""The Dagster layer: partitions, the assets and their checks, the jobs, sensors, schedules and the resource.

Thin by design: it turns partitions into engine calls and engine results into materializations,
metadata and failures. Nothing heavy (msgraph, boto3) is imported when the definitions load.

The assets, their jobs and their partition sets are generated from the tenants file: one per tenant, or
per shard of a tenant configured with ``shards`` (:mod:`mailpipe.defs.partitions`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing dagster costs ~100 MB: not for `mailpipe backup` and friends
    import dagster as dg

    from mailpipe.defs.partitions import Layout

_CURRENT: dict[str, object] = {}


def build_definitions() -> dg.Definitions:
    import dagster as dg

    from mailpipe.config import load_tenants
    from mailpipe.defs.assets import build_backup_asset, build_backup_job
    from mailpipe.defs.checks import build_content_sample, build_sample_job, build_sample_schedule
    from mailpipe.defs.maintenance import maintain_all_repositories, repository_maintenance
    from mailpipe.defs.partitions import Layout
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe.defs.restore import mailbox_restore_job
    from mailpipe.defs.routing import build_entry_job
    from mailpipe.defs.schedules import build_backup_sweep
    from mailpipe.defs.sensors import build_retry_sensor, discover_mailboxes
    from mailpipe.defs.settings import SETTINGS

    layout = Layout.of(load_tenants())  # a bad tenants file fails the code location now, with its clear message
    assets, checks, backup_jobs, sample_jobs = [], [], [], []
    for shard in layout.shards:
        asset, check = build_backup_asset(shard), build_content_sample(shard)
        assets.append(asset)
        checks.append(check)  # (snapshot_structure is declared on the asset, which runs it)
        backup_jobs.append(build_backup_job(shard, asset))
        sample_jobs.append(build_sample_job(shard, check))
    backup_entry, sample_entry = build_entry_job("backup"), build_entry_job("sample")
    defs = dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[backup_entry, sample_entry, *backup_jobs, *sample_jobs, mailbox_restore_job, repository_maintenance],
        sensors=[discover_mailboxes, build_retry_sensor(backup_jobs), build_backup_sweep(backup_jobs)],
        schedules=[build_sample_schedule(layout, sample_entry), maintain_all_repositories],
        resources={"mailpipe": MailpipeResource.from_settings(SETTINGS)},
        # every job's default, UI backfills' implicit asset job included: a run has one step (the batch's
        # mailboxes run concurrently inside it), so the multiprocess executor's step process only adds
        # ~1–1.5 s per run (docs/OPERATIONS.md); and a Celery worker's pool process may not start one
        executor=dg.in_process_executor,
    )
    _CURRENT.update(defs=defs, layout=layout)
    return defs


def current_definitions() -> dg.Definitions:
    """The definitions this process loaded last (the entry-point jobs run the shards' jobs from them)."""
    if "defs" not in _CURRENT:
        build_definitions()
    return _CURRENT["defs"]  # type: ignore[return-value]


def current_layout() -> Layout:
    """The partition layout of :func:`current_definitions`."""
    current_definitions()
    return _CURRENT["layout"]  # type: ignore[return-value]
