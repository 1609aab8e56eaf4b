"""mailbox_restore_job: from `dagster job execute` with run config, and from the UI's Launchpad (the GraphQL
mutation the webserver receives), with a real instance, webserver and daemon, the simulator and the engine."""

from __future__ import annotations

import json
import os
import subprocess

import dagster as dg
import yaml

from mailpipe.repo import open_repository
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import backup
from mailpipe_tests.test_defs import (  # noqa: F401  (env: the fixture)
    BIN,
    BOTH_BACKENDS,
    dagster_daemon,
    dagster_webserver,
    env,
    graphql,
    wait_until,
)


def restore_config(tenant: str, source: str, target: str, into: str) -> dict:
    return {"ops": {"restore_mailbox": {"config": {"tenant": tenant, "mailbox": source, "to": target, "into": into}}}}


def created_in(sim, upn: str, root: str) -> int:
    items = sim.truth(upn, hashes=False)["mailboxes"][upn]["items"]
    return sum(1 for i in items if i["folder_path"][:1] == [root])


def test_restore_job_from_dagster_job_execute_with_run_config(env):
    sim = env["sim"]
    a, b = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith(("shared-", "nomailbox"))][:2]
    t = make_tenant(sim, str(env["tmp"] / "repo"), name="t1")
    [ra] = backup(t, [a])
    cfg = env["tmp"] / "restore.yaml"
    cfg.write_text(yaml.safe_dump(restore_config("t1", a, b, "From Dagster")))
    out = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "mailpipe.definitions", "-j",
                          "mailbox_restore_job", "-c", str(cfg), "--tags", json.dumps({"restore": "t1"})],
                         capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=env["tmp"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert created_in(sim, b, "From Dagster") == ra.items_total
    inst = dg.DagsterInstance.from_config(str(env["home"]))
    [run] = inst.get_run_records(dg.RunsFilter(job_name="mailbox_restore_job"))
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS and run.dagster_run.tags["restore"] == "t1"
    outputs = [e for e in inst.all_logs(run.dagster_run.run_id) if e.dagster_event and
               e.dagster_event.event_type_value == "STEP_OUTPUT"]
    md = {k: v.value for k, v in outputs[0].dagster_event.event_specific_data.metadata.items()}
    assert md["restored"] == ra.items_total and "failed" not in md
    assert "From Dagster" in md["target_folder"] and md["snapshot_id"] == ra.snapshot_id
    # a bad choice fails the run with the engine's one line
    cfg.write_text(yaml.safe_dump({"ops": {"restore_mailbox": {"config": {
        "tenant": "t1", "mailbox": a, "folders": ["No such folder"]}}}}))
    out = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "mailpipe.definitions", "-j",
                          "mailbox_restore_job", "-c", str(cfg)], capture_output=True, text=True, timeout=300,
                         env={**os.environ}, cwd=env["tmp"])
    assert out.returncode != 0 and "has no folder 'no such folder'" in out.stdout + out.stderr


@BOTH_BACKENDS
def test_restore_job_launched_as_the_ui_launchpad_does(env):
    sim = env["sim"]
    a, b = [u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith(("shared-", "nomailbox"))][:2]
    t = make_tenant(sim, str(env["tmp"] / "repo"), name="t1")
    [ra] = backup(t, [a])
    with dagster_webserver({}) as url, dagster_daemon(env, {}):  # the daemon dequeues the launched run
        mutation = """mutation Launch($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
            ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } } } }"""
        params = {"selector": {"repositoryLocationName": "mailpipe", "repositoryName": "__repository__",
                               "jobName": "mailbox_restore_job"},
                  "runConfigData": restore_config("t1", a, b, "From the UI"),
                  "executionMetadata": {"tags": [{"key": "restore", "value": "t1"}]}}
        resp = graphql(url, mutation, {"p": params})["launchRun"]
        assert resp["__typename"] == "LaunchRunSuccess", resp
        run_id = resp["run"]["runId"]
        inst = env["instance"]
        run = wait_until("the restore run ends", lambda: (r := inst.get_run_by_id(run_id)) and r.is_finished and r,
                         180, env)
        assert run.status == dg.DagsterRunStatus.SUCCESS
    assert created_in(sim, b, "From the UI") == ra.items_total
    [rb] = backup(t, [b])
    restored = [r for bt in open_repository(t).iter_manifest(rb.user_id, "latest") for r in bt.to_pylist()
                if r["folder_path"][:1] == ["From the UI"]]
    assert len(restored) == ra.items_total and not any(r["is_draft"] for r in restored)
