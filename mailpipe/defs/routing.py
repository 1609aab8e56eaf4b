"""The entry-point jobs ``mailbox_backup_job`` and ``content_sample_job``: what users launch by key.

A Dagster job has one partition set, and each shard's asset has its own (:mod:`mailpipe.defs.partitions`),
so these two jobs are partitioned by the routing index ``mailboxes`` (every key; ``dg launch --partition``
looks the key up there, one row) and run one op that starts the shard's own job for the keys:

- ``dagster job execute -m mailpipe.definitions -j mailbox_backup_job --tags '{"dagster/partition": KEY}'``
- the same with ``dagster/asset_partition_range_start`` / ``_end``: every registered key of that tenant
  from start to end **in sorted order** (it may span shards: one run per shard's contiguous block)
- ``dg launch --job mailbox_backup_job --partition KEY``

The shard runs are executed in this run's process (``execute_in_process``), so every launch path works,
with or without a daemon; each is an ordinary run of the shard's job (statuses, checks and materializations
land on the shard's asset), tagged ``mailpipe/routed_by=<this run>``. This run fails when one of them
fails, naming it; its run retry (when Dagster can retry it) starts new shard runs that skip the mailboxes
committed since this run's original attempt.
"""


import dagster as dg

from mailpipe.defs.partitions import (
    ENTRY_JOBS, MAILBOXES_TAG, RANGE_TAG, RETRY_OF_TAG, ROUTED_BY_TAG, SHARD_TAG, KeyCache, KeyRange, Shard,
    contiguous_ranges, range_tags, routing_partitions,
)
from mailpipe.defs.resources import MailpipeResource

FAMILIES = {
    # family: (entry job, attribute of Shard naming the shard's job, retried by Dagster when it fails)
    "backup": (ENTRY_JOBS[0], "backup_job_name", True),
    "sample": (ENTRY_JOBS[1], "sample_job_name", False),
}
# the entry run's own tags that describe it, not what its shard runs should carry
_NOT_PASSED = {"tenant", MAILBOXES_TAG, RANGE_TAG, SHARD_TAG, ROUTED_BY_TAG}


def plan_routes(cache: KeyCache, entry_job: str, tags: dict[str, str]) -> tuple[list[KeyRange], list[str]]:
    """(one KeyRange per shard run, problems) for an entry-point run's partition tags."""
    keys = cache.keys_of_run(entry_job, tags)
    if not keys:
        return [], ["the run names no mailbox: tag it dagster/partition=<tenant>:<upn>, or "
                    "dagster/asset_partition_range_start and _end (two keys of one tenant)"]
    problems: list[str] = []
    by_shard: dict[Shard, list[str]] = {}
    for k in keys:
        try:
            shard = cache.layout.shard_of(k)
        except ValueError as e:
            problems.append(str(e))
            continue
        if shard is None:
            problems.append(f"{k}: tenant {k.partition(':')[0]!r} is not in the tenants file")
            continue
        by_shard.setdefault(shard, []).append(k)
    routes: list[KeyRange] = []
    for shard in sorted(by_shard, key=str):
        index = cache.index(shard)
        ks = by_shard[shard]
        missing = [k for k in ks if k not in index.pos]
        if missing:
            problems.append(f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}: not registered in "
                            f"{shard.partitions_name} (run `mailpipe discover`; an instance from before the "
                            "fleet layout: `mailpipe migrate-partitions`)")
        routes += contiguous_ranges(index, ks, max(1, len(ks)), shard)
    return routes, problems


def route(context: dg.OpExecutionContext, mailpipe: MailpipeResource, family: str) -> None:
    from mailpipe.defs import current_definitions, current_layout

    entry, attr, retry = FAMILIES[family]
    tags = dict(context.run.tags)
    routes, problems = plan_routes(KeyCache(context.instance, current_layout()), entry, tags)
    if problems:
        raise dg.Failure(description="\n".join(problems), allow_retries=False)
    keys = [k for r in routes for k in r.keys]
    if MAILBOXES_TAG not in tags:
        context.instance.add_run_tags(context.run_id, range_tags(sorted(keys)))
    passed = {k: v for k, v in tags.items() if not k.startswith("dagster/") and k not in _NOT_PASSED}
    retry_of = tags.get("dagster/root_run_id") or tags.get("dagster/parent_run_id") or tags.get(RETRY_OF_TAG)
    # the shard runs use this run's resource config (a Launchpad override applies to them too)
    resource_config = {k: v for k, v in mailpipe.model_dump().items() if v is not None}
    run_config = {"resources": {"mailpipe": {"config": resource_config}}}
    defs = current_definitions()
    failed: list[str] = []
    for r in routes:
        run_tags = {**passed, **r.tags(), ROUTED_BY_TAG: context.run_id}
        if retry_of:
            run_tags[RETRY_OF_TAG] = retry_of
        job = defs.resolve_job_def(getattr(r.shard, attr))
        context.log.info(f"{job.name}: {len(r.keys)} mailbox(es) {run_tags.get(RANGE_TAG, '')}")
        res = job.execute_in_process(instance=context.instance, tags=run_tags, run_config=run_config,
                                     raise_on_error=False)
        if res.success:
            context.log.info(f"{job.name}: run {res.run_id} succeeded")
        else:
            failed.append(f"run {res.run_id} of {job.name} ({len(r.keys)} mailbox(es) {run_tags.get(RANGE_TAG, '')})")
            context.log.error(f"{job.name}: run {res.run_id} failed")
    if failed:
        raise dg.Failure(description=f"{len(failed)} of {len(routes)} shard run(s) failed (each mailbox's status "
                         "is on its shard's asset):\n" + "\n".join(f"- {f}" for f in failed), allow_retries=retry)


def build_entry_job(family: str) -> dg.JobDefinition:
    entry, _, _ = FAMILIES[family]
    what = "back up (and check) the mailboxes" if family == "backup" else "run the content_sample check of the mailboxes"

    @dg.op(name=f"route_{family}", description=f"Start the shard job(s) that {what} of this run's key or key range.")
    def _route(context: dg.OpExecutionContext, mailpipe: MailpipeResource) -> None:
        route(context, mailpipe, family)

    return dg.GraphDefinition(name=entry, node_defs=[_route]).to_job(
        partitions_def=routing_partitions,
        executor_def=dg.in_process_executor,
        description=f"Entry point by key: {what} of the run's key (dagster/partition) or key range "
        "(dagster/asset_partition_range_start/_end: the tenant's keys between them, sorted), through each "
        "shard's own job, run in this run's process. For `dagster job execute`, `dg launch --partition` and "
        "scripts; the schedule, sensors and UI backfills use the shard jobs and assets directly.",
    )
