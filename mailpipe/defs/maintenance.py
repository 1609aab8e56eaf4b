"""``repository_maintenance``: a tenant's repository, forget (its retention) then prune, on a weekly schedule.

Thin: the op calls :func:`mailpipe.repo.forget.forget` and :func:`mailpipe.repo.prune.prune` (through the
``mailpipe`` resource) and publishes their figures. Never two at once for a tenant: every run carries the
tag ``maintenance=<tenant>``, which dagster.yaml limits to one run per value; the op refuses a run without
it (a Launchpad run must be tagged by hand), so the limit cannot be side-stepped by accident.
"""


import json
import time
from typing import Any

import dagster as dg
from pydantic import Field

from mailpipe.defs import settings
from mailpipe.defs.resources import MailpipeResource
from mailpipe.errors import UserError

TAG = "maintenance"
PROGRESS_LOG_SECONDS = 10.0


class MaintenanceRun(dg.Config):
    """Which repository (docs/OPERATIONS.md, "Repository maintenance")."""

    tenant: str = Field(description="tenant name from the tenants file")
    dry_run: bool = Field(False, description="report what forget and prune would delete; delete nothing")


def _json(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))  # figures only; a date becomes its ISO text


def _metadata(forgotten: Any, pruned: Any) -> dict[str, dg.MetadataValue]:
    md: dict[str, dg.MetadataValue] = {}
    for name, res in (("forget", forgotten), ("prune", pruned)):
        figures = _json(res.to_dict())
        md[name] = dg.MetadataValue.json(figures)
        md[f"{name}_summary"] = dg.MetadataValue.text(res.summary())
        for k, v in figures.items() if isinstance(figures, dict) else ():
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # plotted over time by the UI
                md[f"{name}_{k}"] = (dg.MetadataValue.float(float(v)) if isinstance(v, float)
                                     else dg.MetadataValue.int(v))
    return md


@dg.op(description="Forget the snapshots the tenant's retention no longer keeps, then prune what no snapshot "
       "references (two-phase: a run plans, a later run deletes).")
def maintain_repository(context: dg.OpExecutionContext, config: MaintenanceRun, mailpipe: MailpipeResource):
    tag = context.run.tags.get(TAG)
    if tag != config.tenant:
        raise dg.Failure(description=f"a repository_maintenance run of tenant {config.tenant!r} must carry the tag "
                         f"{TAG}={config.tenant} (it has {TAG}={tag!r}): that tag is what keeps two maintenance "
                         "runs of one tenant from running at once (dagster.yaml)", allow_retries=False)
    last = [time.monotonic()]

    def progress(step: str) -> None:  # prune's steps (a mailbox read, a plan done): at most every 10 s
        if time.monotonic() - last[0] >= PROGRESS_LOG_SECONDS:
            last[0] = time.monotonic()
            context.log.info(f"prune: {step}")

    try:
        tenant = mailpipe.tenant(config.tenant)
        forgotten, pruned = mailpipe.maintain(tenant, dry_run=config.dry_run, progress=progress)
    except UserError as e:  # unknown tenant, a repository that cannot be opened, a busy lease...
        raise dg.Failure(description=str(e)) from None
    context.log.info(forgotten.summary())
    context.log.info(pruned.summary())
    md = _metadata(forgotten, pruned)
    bad = [f"{name}: {res.summary()}" for name, res in (("forget", forgotten), ("prune", pruned))
           if not getattr(res, "ok", True)]
    if bad:  # e.g. deletions that failed: the figures stay on the failed run, for the alert
        raise dg.Failure(description="repository maintenance did not complete:\n" + "\n".join(bad), metadata=md)
    return dg.Output(None, metadata=md)


repository_maintenance = dg.GraphDefinition(name="repository_maintenance", node_defs=[maintain_repository]).to_job(
    description="Forget, then prune, one tenant's repository (run config: tenant, dry_run; run tag "
    f"{TAG}=<tenant>, one run per tenant at a time).",
    executor_def=dg.in_process_executor,
)


def maintenance_run_requests(tenants: list[str], when: str) -> list[dg.RunRequest]:
    return [dg.RunRequest(run_key=f"{when}:{name}", job_name=repository_maintenance.name, tags={TAG: name},
                          run_config={"ops": {"maintain_repository": {"config": {"tenant": name}}}})
            for name in tenants]


@dg.schedule(
    name="maintain_all_repositories", cron_schedule=settings.MAINTENANCE_CRON, job=repository_maintenance,
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Forget + prune every tenant's repository ({settings.MAINTENANCE_CRON} UTC, "
    f"MAILPIPE_MAINTENANCE_CRON): one run per tenant, tagged {TAG}=<tenant>.",
)
def maintain_all_repositories(context: dg.ScheduleEvaluationContext, mailpipe: MailpipeResource):
    names = [t.name for t in mailpipe.tenants()]
    if not names:
        return dg.SkipReason("no tenants configured")
    return maintenance_run_requests(names, context.scheduled_execution_time.isoformat())
