"""Scale-out as docs/OPERATIONS.md configures it: Postgres storage and dagster-celery's CeleryRunLauncher,
with a real PostgreSQL, a real Redis broker and a real Celery worker process (``dagster-celery worker
start``), a webserver receiving the UI's backfill mutation and the daemon submitting its runs."""

from __future__ import annotations

import os
from contextlib import contextmanager

import dagster as dg
import pytest
import yaml

from mailpipe_tests.test_defs import (  # noqa: F401  (env: the fixture)
    BIN,
    ROOT,
    dagster_daemon,
    dagster_webserver,
    env,
    graphql,
    register_all,
    runs_for,
    settled,
    statuses,
    wait_until,
)

TASK_ID_TAG = "dagster-celery/task_id"  # dagster_celery.tags.DAGSTER_CELERY_TASK_ID_TAG


def celery_launcher_config(redis_url: str) -> dict:
    """The run_launcher section docs/OPERATIONS.md gives for Celery (broker and result backend on Redis)."""
    return {"module": "dagster_celery.launcher", "class": "CeleryRunLauncher",
            "config": {"broker": f"{redis_url}/0", "backend": f"{redis_url}/1"}}


@contextmanager
def celery_worker(e, redis_url: str, concurrency: int = 2):
    """A real Celery worker (mailpipe_tests.servers.CeleryWorker) with the test's env; log in celery.log."""
    from mailpipe_tests.servers import CeleryWorker

    worker = CeleryWorker(redis_url, str(e["tmp"]), {**os.environ}, concurrency=concurrency).start(cwd=str(ROOT))
    try:
        yield worker
    finally:
        worker.stop()


@pytest.mark.backends("postgres")
def test_ui_backfill_runs_on_a_celery_worker_with_postgres_and_redis(env, redis_server):
    inst = env["instance"]
    home_yaml = env["home"] / "dagster.yaml"
    cfg = yaml.safe_load(home_yaml.read_text())
    assert "postgres" in cfg["storage"]
    home_yaml.write_text(yaml.safe_dump({**cfg, "run_launcher": celery_launcher_config(redis_server.url)}))
    launcher = dg.DagsterInstance.from_config(str(env["home"])).run_launcher
    assert type(launcher).__module__ == "dagster_celery.launcher" and type(launcher).__name__ == "CeleryRunLauncher"

    keys = register_all(env)
    extra = {"MAILPIPE_BATCH_SIZE": "2"}
    with celery_worker(env, redis_server.url), dagster_webserver(extra) as url, dagster_daemon(env, extra):
        mutation = """mutation Launch($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
        resp = graphql(url, mutation, {"p": {"partitionNames": keys, "assetSelection": [{"path": ["mailbox_backup", "t1"]}],
                                             "tags": [{"key": "tenant", "value": "t1"}]}})
        assert resp["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", resp
        wait_until("every mailbox MATERIALIZED, its runs ended", lambda: settled(env, keys), 240, env)
    assert set(statuses(env, keys).values()) == {"MATERIALIZED"}
    runs = inst.get_run_records(dg.RunsFilter(tags={"tenant": "t1"}))
    assert len(runs) == 2, [r.dagster_run.tags for r in runs]  # 4 mailboxes in batches of 2
    worker_log = (env["tmp"] / "celery.log").read_text(errors="replace")
    for r in runs:
        run = r.dagster_run
        assert run.status == dg.DagsterRunStatus.SUCCESS
        task_id = run.tags[TASK_ID_TAG]  # launched as a Celery task...
        assert f"Task execute_job[{task_id}] succeeded" in worker_log, worker_log[-3000:]  # ...run by the worker
        messages = [ev.message for ev in inst.all_logs(run.run_id)]
        assert "[CeleryRunLauncher] Celery task has been forwarded to the broker." in messages, messages
