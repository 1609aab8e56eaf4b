"""The ``mailbox_backup/<tenant>[/<shard>]`` assets (one per shard of the layout, :mod:`mailpipe.defs.partitions`):
one run backs up its batch of mailboxes concurrently through the engine."""


import time
import warnings
from datetime import datetime, timezone

import dagster as dg

from mailpipe.defs.checks import snapshot_structure_evaluations, snapshot_structure_spec
from mailpipe.defs.partitions import MAILBOXES_TAG, RETRY_OF_TAG, Shard, group_by_tenant, range_tags
from mailpipe.defs.resources import MailpipeResource
from mailpipe.defs.settings import BATCH_SIZE
from mailpipe.errors import UserError

PROGRESS_LOG_SECONDS = 10.0
# BackfillPolicy is marked beta in 1.13; it is the documented way to batch backfills, and we pin Dagster
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)


def retry_since(context: dg.AssetExecutionContext) -> datetime | None:
    """For a retried or re-executed run: when the original run started. Mailboxes committed since then
    are not backed up again."""
    tags = context.run.tags
    # a run the entry-point job started for a retried run of its own carries that run's root (routing.py)
    root = tags.get("dagster/root_run_id") or tags.get("dagster/parent_run_id") or tags.get(RETRY_OF_TAG)
    if not root:
        return None
    rec = context.instance.get_run_record_by_id(root)
    ts = (rec.start_time or rec.create_timestamp.timestamp()) if rec else None
    return datetime.fromtimestamp(ts, tz=timezone.utc) if ts else None


def _metadata(r) -> dict[str, dg.MetadataValue]:
    md: dict[str, dg.MetadataValue] = {"snapshot_id": dg.MetadataValue.text(r.snapshot_id or "")}
    for k, v in r.metrics().items():
        md[k] = dg.MetadataValue.float(float(v)) if isinstance(v, float) else dg.MetadataValue.int(int(v))
    md["already_committed"] = dg.MetadataValue.bool(r.already_committed)
    if r.skipped:
        # no subjects: Dagster's database is not the mail's trust domain
        md["skipped"] = dg.MetadataValue.json([{k: s.get(k) for k in ("item_id", "folder_path", "reason", "pending")}
                                               for s in r.skipped[:100]])
    if r.warnings:
        md["warnings"] = dg.MetadataValue.json(r.warnings)
    if getattr(r, "items_by_type", None):  # content: fidelity|both — items per message class
        md["items_by_type"] = dg.MetadataValue.json(r.items_by_type)
    return md


def build_backup_asset(shard: Shard) -> dg.AssetsDefinition:
    """The backup asset of one shard: ``mailbox_backup/<tenant>[/<shard>]`` on the shard's partition set."""
    spec = snapshot_structure_spec(shard)

    @dg.asset(
        key=shard.asset_key,
        partitions_def=shard.partitions_def,
        backfill_policy=dg.BackfillPolicy.multi_run(BATCH_SIZE),
        output_required=False,
        group_name="mailpipe",
        kinds={"python"},
        check_specs=[spec],
        description=f"The Exchange Online mailboxes of tenant {shard.tenant}"
        + (f" (shard {shard.index} of {shard.count}: sha256(upn) mod {shard.count} = {shard.index})"
           if shard.count > 1 else "")
        + ", backed up into the tenant's repository: each materialization of a partition (one mailbox) is a "
        "committed point-in-time snapshot (incremental fetch, deduplicated content), checked right away "
        "(snapshot_structure). One run backs up a batch of mailboxes concurrently; each partition succeeds or "
        "fails on its own.",
    )
    def _asset(context: dg.AssetExecutionContext, mailpipe: MailpipeResource):
        yield from backup_partitions(context, mailpipe, spec)

    return _asset


def build_backup_job(shard: Shard, asset: dg.AssetsDefinition):
    spec = snapshot_structure_spec(shard)
    return dg.define_asset_job(
        shard.backup_job_name,
        # the asset and the check it runs itself; not content_sample (its own jobs and schedule, checks.py)
        selection=dg.AssetSelection.assets(asset).without_checks() | dg.AssetSelection.checks(spec.key),
        partitions_def=shard.partitions_def,
        tags={"tenant": shard.tenant},
        description=f"Back up the mailboxes of {shard.asset_key.to_user_string()} in the run's key or key range, "
        "and check each committed snapshot (the schedule, the retry sensor and mailbox_backup_job launch it).",
    )


def label_run(context: dg.AssetExecutionContext, keys: list[str]) -> None:
    """Readable Runs page: a run launched without them (a UI backfill) gets the tags saying how many
    mailboxes it covers and which range, when it starts."""
    if MAILBOXES_TAG not in context.run.tags:
        try:
            context.instance.add_run_tags(context.run_id, range_tags(keys))
        except Exception as e:  # a label: never worth failing a backup
            context.log.warning(f"could not tag the run: {e}")


def backup_partitions(context: dg.AssetExecutionContext, mailpipe: MailpipeResource, spec: dg.AssetCheckSpec):
    keys = list(context.partition_keys)
    label_run(context, keys)
    by_tenant = group_by_tenant(keys)
    check_structure = spec.key in context.selected_asset_check_keys
    since = retry_since(context)
    if since:
        context.log.info(f"retry of a run started {since.isoformat()}: mailboxes committed since are skipped")
    failures: dict[str, str] = {}
    done = 0
    last_log = [time.monotonic()]

    def progress(upn: str, fig: dict) -> None:
        if time.monotonic() - last_log[0] >= PROGRESS_LOG_SECONDS:
            last_log[0] = time.monotonic()
            context.log.info(f"{upn}: {fig.get('bytes_fetched', 0):,} bytes fetched, "
                             f"{fig.get('bytes_stored_new', 0):,} newly stored, {fig.get('queued', 0)} queued")

    for tenant_name, upns in by_tenant.items():
        try:
            tenant = mailpipe.tenant(tenant_name)
        except UserError as e:  # a partition of a tenant no longer in the tenants file
            for u in upns:
                failures[f"{tenant_name}:{u}"] = str(e)
            continue
        context.log.info(f"tenant {tenant_name}: backing up {len(upns)} mailbox(es)")
        try:
            results = mailpipe.backup(tenant, upns, skip_if_committed_since=since, progress=progress)
        except UserError as e:  # the tenant's repository cannot be used (missing bucket, bad credentials...)
            for u in upns:
                failures[f"{tenant_name}:{u}"] = str(e)
            context.log.error(str(e))
            continue
        committed = []
        for r in results:
            key = f"{tenant_name}:{r.upn}"
            if r.ok:
                done += 1
                committed.append(r)
                # yielded, not logged: stored before the check below names it as the materialization it checks
                yield dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=key, metadata=_metadata(r),
                    description="already committed by an earlier attempt" if r.already_committed else None)
                context.log.info(f"{key}: snapshot {r.snapshot_id}, {r.items_total} items (+{r.items_new} "
                                 f"~{r.items_changed} -{r.items_removed}, {r.items_skipped} skipped), "
                                 f"{r.bytes_fetched:,} B fetched, {r.bytes_stored_new:,} B stored, "
                                 f"{r.requests} requests, {r.seconds:.1f}s")
                for w in r.warnings:
                    context.log.warning(f"{key}: {w}")
            else:
                failures[key] = r.error or "failed"
                context.log.error(f"{key}: {r.error}")
        if check_structure and committed:
            yield from snapshot_structure_evaluations(context, mailpipe, tenant, committed)
    if check_structure:  # the check's output (its results are the evaluations above, one per mailbox)
        yield dg.Output(None, output_name=spec.get_python_identifier())
    if failures:
        lines = "\n".join(f"- {k}: {v}" for k, v in sorted(failures.items()))
        raise dg.Failure(
            description=f"{len(failures)} of {len(keys)} mailbox(es) failed (the {done} others are committed):\n{lines}",
            metadata={"failed": dg.MetadataValue.json(failures)},
        )
    # no output of the asset itself: each partition is materialized by its own event above

