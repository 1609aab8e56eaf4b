"""``mailbox_restore_job``: a restore from the UI's Launchpad or ``dagster job execute``, its choices as run
config (the same as ``mailpipe restore``'s options). Thin: it builds a RestoreRequest, calls the restore
engine, logs its progress and ends with its summary as metadata — or fails naming what went wrong."""


import time
from datetime import datetime, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from mailpipe.defs.resources import MailpipeResource

PROGRESS_LOG_SECONDS = 10.0


class RestoreRun(dg.Config):
    """What to restore (see `mailpipe restore --help` and docs/RESTORE.md)."""

    tenant: str = Field(description="tenant name from the tenants file")
    mailbox: str = Field(description="the mailbox whose backup is restored (UPN or Entra object id)")
    snapshot: str = Field("latest", description="snapshot id, or latest")
    at: Optional[str] = Field(None, description="instead of snapshot: the newest committed at or before this "
                              "ISO time, e.g. 2026-11-01T00:00Z")
    to: Optional[str] = Field(None, description="the mailbox to restore into (default: the same)")
    folders: list[str] = Field([], description="only these folders and their subfolders, e.g. Inbox/Projects")
    items: list[str] = Field([], description="only these item ids")
    since: Optional[str] = Field(None, description="only items received at or after this ISO date/time")
    until: Optional[str] = Field(None, description="only items received before this ISO date/time")
    into: Optional[str] = Field(None, description="the folder the tree is recreated in (default: "
                                "'Restored <snapshot time>')")
    in_place: bool = Field(False, description="into the original folders instead (missing ones created)")
    collisions: str = Field("skip", description="an item already in the target folder: skip, copy or replace")
    dry_run: bool = Field(False, description="plan only: what would be restored, nothing written")


def _when(v: str | None, name: str) -> datetime | None:
    if not v:
        return None
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise dg.Failure(description=f"{name}: not an ISO date/time (e.g. 2026-11-01T00:00Z): {v!r}",
                         allow_retries=False) from None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


@dg.op(description="Restore a mailbox's snapshot (all of it, folders or items) into the same or another mailbox; "
       "resumable: running it again with the same config continues where it stopped.")
def restore_mailbox(context: dg.OpExecutionContext, config: RestoreRun, mailpipe: MailpipeResource):
    from mailpipe.errors import UserError
    from mailpipe.restore import RestoreRequest

    tenant = mailpipe.tenant(config.tenant)
    try:
        req = RestoreRequest(upn=config.mailbox, snapshot=config.snapshot if not config.at else "latest",
                             at=_when(config.at, "at"), to=config.to, folders=tuple(config.folders),
                             items=tuple(config.items), since=_when(config.since, "since"),
                             until=_when(config.until, "until"), into=config.into, in_place=config.in_place,
                             collisions=config.collisions, dry_run=config.dry_run)
    except UserError as e:  # e.g. into and in_place together
        raise dg.Failure(description=str(e), allow_retries=False) from None
    last = [0.0]

    def progress(p: dict) -> None:
        if p.get("phase") == "plan":
            context.log.info(f"snapshot {p['snapshot_id']}: {p['items']} items, {p['bytes']:,} bytes, "
                             + (f"into folder {p['target_root']!r}" if p.get("target_root") else "in place")
                             + f"; at least {p['expected_seconds']:.0f} s at Exchange's limits")
        elif time.monotonic() - last[0] >= PROGRESS_LOG_SECONDS or p["done"] == p["total"]:
            last[0] = time.monotonic()
            context.log.info(f"{p['done']}/{p['total']} items, {p['bytes_uploaded']:,} bytes uploaded, "
                             f"{p['throttled']} throttled, {p['upload_wait_seconds']:.0f} s paced, {p['failed']} failed")

    res = mailpipe.restore(tenant, req, progress=progress)
    md = {k: (dg.MetadataValue.float(float(v)) if isinstance(v, float) else dg.MetadataValue.int(int(v)))
          for k, v in res.metrics().items()}
    md.update({"restore_id": dg.MetadataValue.text(res.restore_id or ""),
               "snapshot_id": dg.MetadataValue.text(res.snapshot_id or ""),
               "target": dg.MetadataValue.text(res.target),
               "target_folder": dg.MetadataValue.text(res.target_root or "(in place)"),
               "summary": dg.MetadataValue.text(res.summary())})
    if res.failed:
        md["failed"] = dg.MetadataValue.json(res.failed[:200])
    if res.warnings:
        md["warnings"] = dg.MetadataValue.json(res.warnings)
    if res.losses:
        md["not_recreated"] = dg.MetadataValue.json(res.losses)
    if not res.ok:
        raise dg.Failure(description=res.error, metadata=md, allow_retries=False)
    if res.failed_count:
        raise dg.Failure(description=f"{res.failed_count} item(s) could not be restored (run the job again with the "
                         f"same config to retry them): {res.summary()}", metadata=md, allow_retries=False)
    context.log.info(res.summary())
    return dg.Output(None, metadata=md)


mailbox_restore_job = dg.GraphDefinition(name="mailbox_restore_job", node_defs=[restore_mailbox]).to_job(
    description="Restore a mailbox's backup into a mailbox (run config: tenant, mailbox, snapshot or at, to, "
    "folders, items, since, until, into or in_place, collisions, dry_run). Tag the run with restore=<tenant> to "
    "have it counted in the per-tenant restore limit (dagster.yaml).",
    executor_def=dg.in_process_executor,
    # a restore is paced by Exchange's upload budget (~43 GB a day per mailbox): longer than a backup run's
    # 12 h bound (dagster.yaml); it resumes where it stopped if it is stopped all the same
    run_tags={"dagster/max_runtime": str(7 * 24 * 3600)},
)
