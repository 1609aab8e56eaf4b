"""Asset checks on each ``mailbox_backup/<tenant>[/<shard>]`` asset, one result per mailbox (partition):
what ``mailpipe check`` finds, shown where users look.

- ``snapshot_structure``: after each mailbox's materialization, the structural check of the snapshot just
  committed (commit record, manifest and folder table read and validated whole, every chunk they name
  present; no content read). Run inside the asset's step, by :func:`snapshot_structure_evaluations`.
- ``content_sample``: a rotating ``--read-data`` check: each day's run reads and verifies the chunks in
  one slice of ``MAILPIPE_SAMPLE_CHECK_DAYS`` (30) that the mailboxes' snapshots reference, so every chunk
  is read once a cycle. Its own jobs (one per shard, and the entry point ``content_sample_job``) and daily
  schedule, one run per tenant; a problem fails the check (ERROR) and the run.

Both are *partitioned* checks (Dagster 1.13 shows a partitioned check's status per partition: the asset's
Checks tab → the check → its partitions, each with its latest evaluation and metadata). A batched run
covers a range of mailboxes, and ``AssetCheckResult`` can only name the step's single partition, so each
mailbox's result is an ``AssetCheckEvaluation`` naming its partition and the materialization it checks.
"""


import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from mailpipe.defs import settings
from mailpipe.defs.partitions import KeyRange, Layout, Shard, group_by_tenant
from mailpipe.defs.resources import MailpipeResource
from mailpipe.errors import UserError

# partitioned asset checks are "preview" in 1.13; they are what shows a result per mailbox, and we pin Dagster
warnings.filterwarnings("ignore", message=".*partitions_def.*", category=dg.PreviewWarning)

SNAPSHOT_STRUCTURE = "snapshot_structure"
CONTENT_SAMPLE = "content_sample"
PROBLEMS_SHOWN = 20  # per mailbox, in the evaluation's metadata (problem_count counts them all)
SAMPLE_TAG = "mailpipe/sample"  # "k/n": the slice a content_sample run reads (the schedule sets it)
SAMPLE_LIMIT_TAG = "sample_check"  # = tenant; dagster.yaml runs one content_sample run per tenant at a time
SAMPLE_JOB = "content_sample_job"  # the entry point (routing.py); each shard has its own content_sample_job__<shard>


def snapshot_structure_spec(shard: Shard) -> dg.AssetCheckSpec:
    """The ``snapshot_structure`` check of one shard's asset (declared on the asset, which runs it)."""
    return dg.AssetCheckSpec(
        SNAPSHOT_STRUCTURE, asset=shard.asset_key, partitions_def=shard.partitions_def, blocking=False,
        description="The snapshot this materialization committed is restorable as far as can be seen without "
        "reading content: its commit record, manifest and folder table are read and validated whole, and every "
        "chunk they name is in the repository. Fails (ERROR) listing the first problems; missing chunks are "
        "marked for repair by the next backup.",
    )


def _target(instance: dg.DagsterInstance, asset_key: dg.AssetKey, key: str) -> Any:
    """The partition's latest materialization, which an evaluation must name to count as its current
    result (else the UI drops it). ``AssetCheckResult`` fills this in for single-partition steps only; the
    type is not exported by dagster 1.13.27, hence the private import."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    recs = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key]),
                                           limit=1).records
    if not recs:
        return None
    return AssetCheckEvaluationTargetMaterializationData(storage_id=recs[0].storage_id, run_id=recs[0].run_id,
                                                         timestamp=recs[0].timestamp)


def _evaluation(instance: dg.DagsterInstance, asset_key: dg.AssetKey, check: str, key: str, passed: bool,
                description: str, metadata: dict[str, Any]) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset_key, check_name=check, passed=passed, partition=key, metadata=metadata,
        severity=dg.AssetCheckSeverity.ERROR, description=description, blocking=False,
        target_materialization_data=_target(instance, asset_key, key))


def _findings(mb: Any) -> tuple[bool, dict[str, Any]]:
    """(passed, metadata) of one mailbox's :class:`mailpipe.repo.check.MailboxCheck`."""
    md: dict[str, Any] = {"snapshots_checked": dg.MetadataValue.int(mb.snapshots),
                          "items": dg.MetadataValue.int(mb.items),
                          "problem_count": dg.MetadataValue.int(mb.problem_count)}
    if mb.problems:
        md["problems"] = dg.MetadataValue.json(mb.problems[:PROBLEMS_SHOWN])
    return mb.ok, md


def _first(mb: Any) -> str:
    more = f" (+{mb.problem_count - 1} more)" if mb.problem_count > 1 else ""
    return f"{mb.problems[0][:300]}{more}" if mb.problems else f"{mb.problem_count} problem(s)"


def snapshot_structure_evaluations(context: dg.AssetExecutionContext, mailpipe: MailpipeResource, tenant: Any,
                                   committed: list[Any]) -> Iterator[dg.AssetCheckEvaluation]:
    """The ``snapshot_structure`` result of each committed mailbox (engine results with ``ok``): one check of
    their snapshots together (one listing of the repository's chunks), one evaluation per partition."""
    try:
        res = mailpipe.check_snapshots(tenant, [(r.user_id, r.upn, r.snapshot_id) for r in committed])
    except Exception as e:  # the check could not run (the repository unreachable…): said on each mailbox
        for r in committed:
            yield _evaluation(context.instance, context.asset_key, SNAPSHOT_STRUCTURE, f"{tenant.name}:{r.upn}", False,
                              f"the check could not run: {str(e)[:300]}",
                              {"snapshot_id": dg.MetadataValue.text(r.snapshot_id or ""),
                               "error": dg.MetadataValue.text(f"{type(e).__name__}: {e}"[:1000])})
        return
    for r in committed:
        key = f"{tenant.name}:{r.upn}"
        mb = res.by_mailbox[r.upn]
        passed, md = _findings(mb)
        md = {"snapshot_id": dg.MetadataValue.text(r.snapshot_id or ""), **md}
        if passed:
            text = (f"snapshot {r.snapshot_id}: {mb.items} items; commit record, manifest, folders and every "
                    "chunk they name are in order")
        else:
            text = f"snapshot {r.snapshot_id}: {_first(mb)}"
            context.log.error(f"{key}: {SNAPSHOT_STRUCTURE} failed: {text}")
        yield _evaluation(context.instance, context.asset_key, SNAPSHOT_STRUCTURE, key, passed, text, md)


# -- content_sample ---------------------------------------------------------------------------------------

def run_sample(tags: dict[str, str], today: datetime) -> tuple[int, int]:
    """(k, n) of a content_sample run: its ``mailpipe/sample`` tag ("k/n"), or today's slice of
    MAILPIPE_SAMPLE_CHECK_DAYS (a run launched from the UI)."""
    from mailpipe.repo.check import day_slice

    raw = tags.get(SAMPLE_TAG)
    if raw is None:
        n = settings.SAMPLE_CHECK_DAYS
        return day_slice(today.date(), n), n
    try:
        k, n = (int(x) for x in raw.split("/"))
        if n < 1 or not 0 <= k < n:
            raise ValueError
    except ValueError:
        raise dg.Failure(description=f"run tag {SAMPLE_TAG}={raw!r}: expected k/n with 0 <= k < n (e.g. 7/30)",
                         allow_retries=False) from None
    return k, n


def build_content_sample(shard: Shard) -> dg.AssetChecksDefinition:
    """The ``content_sample`` check of one shard's asset."""

    @dg.asset_check(
        asset=shard.asset_key, name=CONTENT_SAMPLE, partitions_def=shard.partitions_def, blocking=False,
        description="A rotating `mailpipe check --read-data`: reads and verifies (decompress, SHA-256) the chunks "
        "in today's slice of the mailbox's snapshots (all of them), so every chunk is read once every "
        f"MAILPIPE_SAMPLE_CHECK_DAYS days ({settings.SAMPLE_CHECK_DAYS}). Fails (ERROR) listing the first "
        "problems, and fails its run; damaged chunks are marked for repair by the next backup.",
    )
    def _check(context: dg.AssetCheckExecutionContext, mailpipe: MailpipeResource):
        yield from sample_partitions(context, mailpipe, shard.asset_key)

    return _check


def sample_partitions(context: dg.AssetCheckExecutionContext, mailpipe: MailpipeResource, asset_key: dg.AssetKey):
    # (In a run that also backs mailboxes up — a UI backfill selects every check of the asset — Dagster skips
    # this step: it follows the asset's output, which the backup asset never yields. It reads in its own runs.)
    oc = context.op_execution_context
    keys = list(oc.partition_keys)
    k, n = run_sample(oc.run.tags, datetime.now(timezone.utc))
    failed: dict[str, str] = {}
    for tenant_name, upns in group_by_tenant(keys).items():
        try:
            tenant = mailpipe.tenant(tenant_name)
            res = mailpipe.sample_check(tenant, upns, (k, n))
        except UserError as e:  # a tenant no longer configured, a repository that cannot be opened
            for u in upns:
                failed[f"{tenant_name}:{u}"] = str(e)
                yield _evaluation(context.instance, asset_key, CONTENT_SAMPLE, f"{tenant_name}:{u}", False,
                                  f"the check could not run: {str(e)[:300]}",
                                  {"sample": dg.MetadataValue.text(f"{k}/{n}")})
            continue
        oc.log.info(f"tenant {tenant_name}: slice {k}/{n}: {res.chunks_read} chunks read and verified "
                    f"({res.bytes_read:,} bytes) for {res.mailboxes} mailbox(es), {res.problem_count} problem(s)")
        if res.mark_error:
            oc.log.warning(f"tenant {tenant_name}: damaged chunks could not be marked for repair: {res.mark_error}")
        for u in upns:
            key = f"{tenant_name}:{u}"
            mb = res.by_mailbox.get(u)
            if mb is None:  # no backup yet: nothing to read (the partition's check ends SKIPPED)
                continue
            passed, md = _findings(mb)
            md = {"sample": dg.MetadataValue.text(f"{k}/{n}"), **md}
            text = f"slice {k}/{n}: " + ("every chunk read is intact" if passed else _first(mb))
            if not passed:
                failed[key] = _first(mb)
            yield _evaluation(context.instance, asset_key, CONTENT_SAMPLE, key, passed, text, md)
    yield dg.Output(None)
    if failed:
        lines = "\n".join(f"- {key}: {why}" for key, why in sorted(failed.items())[:50])
        raise dg.Failure(description=f"{len(failed)} mailbox(es) failed the content sample (slice {k}/{n}):\n{lines}",
                         metadata={"failed": dg.MetadataValue.json(failed)}, allow_retries=False)


def build_sample_job(shard: Shard, check: dg.AssetChecksDefinition):
    return dg.define_asset_job(
        shard.sample_job_name, selection=dg.AssetSelection.checks(check), partitions_def=shard.partitions_def,
        description=f"The content_sample check of {shard.asset_key.to_user_string()} over the run's mailbox key or "
        f"key range (slice from the run tag {SAMPLE_TAG}=k/n, else today's).",
        # a failed sample is damage found, not a transient error: run it again and it reads the same slice again
        tags={"dagster/max_retries": "0"},
    )


def sample_run_requests(instance: dg.DagsterInstance, layout: Layout, when: datetime, n: int) -> list[dg.RunRequest]:
    """One ``content_sample_job`` run per tenant, over all its registered mailboxes (the work is one slice
    of its chunks; the job starts one run per shard), reading slice ``day number mod n`` of ``when``;
    tagged ``sample_check=<tenant>``, not ``tenant``, so that it does not hold up the tenant's backups."""
    from mailpipe.repo.check import day_slice

    k = day_slice(when.date(), n)
    out = []
    for tenant in sorted(layout.counts):
        first = last = None
        count = 0
        for shard in layout.shards_of(tenant):
            keys = instance.get_dynamic_partitions(shard.partitions_name)
            if keys:
                count += len(keys)
                lo, hi = min(keys), max(keys)
                first = lo if first is None or lo < first else first
                last = hi if last is None or hi > last else last
        if not count:
            continue
        r = KeyRange(tenant, (first,) if first == last else (first, last))
        tags = {t: v for t, v in r.tags().items() if t != "tenant"}
        tags.update({"mailpipe/mailboxes": str(count), SAMPLE_LIMIT_TAG: tenant, SAMPLE_TAG: f"{k}/{n}"})
        out.append(dg.RunRequest(run_key=f"{when.isoformat()}:{tenant}", job_name=SAMPLE_JOB, tags=tags))
    return out


def build_sample_schedule(layout: Layout, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="verify_content_sample", cron_schedule=settings.SAMPLE_CHECK_CRON, job=job,
        execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Daily ({settings.SAMPLE_CHECK_CRON} UTC, MAILPIPE_SAMPLE_CHECK_CRON): the content_sample "
        f"check of every registered mailbox, slice (day number mod {settings.SAMPLE_CHECK_DAYS}) "
        "(MAILPIPE_SAMPLE_CHECK_DAYS), one run per tenant (content_sample_job: one run per shard inside it).",
    )
    def verify_content_sample(context: dg.ScheduleEvaluationContext):
        reqs = sample_run_requests(context.instance, layout, context.scheduled_execution_time,
                                   settings.SAMPLE_CHECK_DAYS)
        if not reqs:
            return dg.SkipReason("no mailboxes registered yet (the discover_mailboxes sensor adds them)")
        return reqs

    return verify_content_sample
