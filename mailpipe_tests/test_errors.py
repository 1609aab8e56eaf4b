"""Clear errors, not tracebacks: every failure a user can cause or meet is one line naming the tenant, the
storage or mailbox and what to do, with a non-zero exit and no secret echoed. And the mailbox lease."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from mailpipe.config import S3Config
from mailpipe.errors import UserError
from mailpipe.repo import open_repository
from mailpipe.repo.repository import LeaseBusy
from mailpipe.repo.store import S3Store, make_s3_client
from mailpipe.sim import write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import S3Errors, backup, mailbox_upns

SECRET = "S3cr3t-MUST-NOT-LEAK-9f8e7d"


def mailpipe(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mailpipe", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "MAILPIPE_GRAPH_RETRY_ATTEMPTS": "1",
                               **(env or {})})


def one_clear_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    err = out.stderr.strip()
    assert out.returncode != 0, out
    assert "Traceback" not in err and SECRET not in out.stdout + err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("mailpipe: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- storage --------------------------------------------------------------------------------------------------
def test_local_storage_that_is_a_file_or_read_only(sim_factory, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=3)
    upn = mailbox_upns(sim)[0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for storage, what in ((blocker / "repo", "a path component is a file"), ("/sys/mailpipe-repo", "permission denied")):
        env = {"MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url, storage)}
        line = one_clear_line(mailpipe("backup", "t1", upn, env=env), "tenant t1", str(storage), what,
                              "`storage` in the tenants file")
        assert line.count("mailpipe: error:") == 1


def test_s3_bucket_that_does_not_exist(sim_factory, s3_server, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=3)
    upn = mailbox_upns(sim)[0]
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    env = {"MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url, f"s3://{bucket}/p",
                                                  s3={"endpoint_url": s3_server, "region": "us-east-1"})}
    one_clear_line(mailpipe("backup", "t1", upn, env=env), "tenant t1", f"s3://{bucket}/p",
                   "bucket does not exist", "create it")
    one_clear_line(mailpipe("snapshots", "t1", env=env), "bucket does not exist")


def test_s3_without_credentials(sim_factory, s3_bucket, tmp_path):
    sim = sim_factory(users=1, messages_per_mailbox=3)
    endpoint, bucket = s3_bucket
    empty = tmp_path / "empty"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                "MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", sim.graph_url, f"s3://{bucket}/p",
                                                       s3={"endpoint_url": endpoint})})
    out = subprocess.run([sys.executable, "-m", "mailpipe", "backup", "t1", mailbox_upns(sim)[0]], capture_output=True,
                         text=True, timeout=120, env=env)
    one_clear_line(out, "tenant t1", "no AWS credentials found", "AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize("code,status,needle", [
    ("InvalidAccessKeyId", 403, "access key id is not known"),
    ("SignatureDoesNotMatch", 403, "secret key does not match"),
    ("AccessDenied", 403, "s3:PutObject"),
])
def test_s3_credential_and_permission_errors(s3_bucket, code, status, needle):
    endpoint, bucket = s3_bucket
    client = make_s3_client(endpoint, "us-east-1")
    S3Errors(client, "GetObject", 99, code=code, status=status,
             message=f"The request failed. AWSAccessKeyId testing, secret {SECRET}")
    t = make_tenant(type("S", (), {"graph_url": "http://127.0.0.1:9/v1.0", "authority": None})(),
                    f"s3://{bucket}/p", s3=S3Config(endpoint_url=endpoint))
    with pytest.raises(UserError) as e:
        open_repository(t, s3_client=client)
    text = str(e.value)
    assert text.startswith(f"tenant t1: storage s3://{bucket}/p: ") and needle in text and code in text
    assert SECRET not in text and "\n" not in text


def test_disk_full_fails_the_mailbox_in_one_line(sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=1, messages_per_mailbox=10)
    upn = mailbox_upns(sim)[0]
    t = make_tenant(sim, str(tmp_path / "repo"))
    open_repository(t)  # the repository exists; then the disk fills up
    import mailpipe.repo.store as store

    real = store.os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(store.os, "fsync", full)
    [r] = backup(t, [upn])
    assert not r.ok and r.error_kind == "storage" and "\n" not in r.error
    assert r.error == f"{upn}: storage {tmp_path / 'repo'}: disk full — free space on that file system or change " \
                      "`storage` in the tenants file"


# -- Graph, export, the tenants file ---------------------------------------------------------------------------
def test_backup_of_a_whole_tenant_when_graph_is_unreachable(tmp_path):
    env = {"MAILPIPE_TENANTS": write_tenants_file(tmp_path / "t.yaml", "t1", "http://127.0.0.1:9/v1.0",
                                                  tmp_path / "repo")}
    one_clear_line(mailpipe("backup", "t1", env=env), "tenant t1: cannot list its mailboxes", "connection failed",
                   "check graph_url")


def test_export_to_a_read_only_place_or_onto_a_file(tmp_path):
    from mailpipe_tests.test_repo import TRICKY, USER, tenant

    tfile = write_tenants_file(tmp_path / "t.yaml", "acme", "http://127.0.0.1:9/v1.0", tmp_path / "repo")
    repo = open_repository(tenant(str(tmp_path / "repo"), name="acme"))
    st = repo.put_content(TRICKY["crlf"])
    w = repo.begin_snapshot(USER, "adele@acme.example")
    w.add_items([{"item_id": "AAMk=1", "folder_id": "f", "folder_path": ["Inbox"], "size": st.size,
                  "sha256": st.sha256, "chunks": st.chunks}])
    w.commit(delta_links={}, stats={}, skipped=[])
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    env = {"MAILPIPE_TENANTS": tfile}
    one_clear_line(mailpipe("export", "acme", "adele@acme.example", "--out", "/sys/mailpipe-export", env=env),
                   "cannot export to /sys/mailpipe-export", "permission denied", "--out")
    one_clear_line(mailpipe("export", "acme", "adele@acme.example", "--out", str(a_file), env=env),
                   f"cannot export to {a_file}", "a file is in the way")
    assert a_file.read_text() == "keep me"


def test_a_yaml_syntax_error_names_the_position_never_the_text(tmp_path):
    p = tmp_path / "tenants.yaml"
    p.write_text("tenants:\n  - name: acme\n    auth: {client_secret_env: " + SECRET + "\n    storage: /x\n")
    out = mailpipe("snapshots", "acme", env={"MAILPIPE_TENANTS": str(p)})
    line = one_clear_line(out, str(p), "not valid YAML", "line ")
    assert SECRET not in line and "client_secret_env" not in line


def test_settings_with_a_bad_value_or_a_retired_name(tmp_path):
    one_clear_line(mailpipe("snapshots", "demo", env={"MAILPIPE_CHECKPOINT_ITEMS": "lots"}),
                   "MAILPIPE_CHECKPOINT_ITEMS must be a whole number")
    one_clear_line(mailpipe("snapshots", "demo", env={"MAILPIPE_RETRY_MAX_ATTEMPTS": "3"}),
                   "MAILPIPE_RETRY_MAX_ATTEMPTS", "MAILPIPE_GRAPH_RETRY_ATTEMPTS", "MAILPIPE_MAILBOX_RETRY_MAX_ATTEMPTS")


def test_operations_doc_lists_every_setting():
    from pathlib import Path

    from mailpipe.settings import table_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md").read_text()
    assert table_markdown() in doc


# -- the mailbox lease ------------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def any_repo(request, tmp_path):
    if request.param == "local":
        storage, s3, client = str(tmp_path / "repo"), S3Config(), None
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        storage, s3, client = f"s3://{bucket}/p", S3Config(endpoint_url=endpoint), make_s3_client(endpoint, "us-east-1")
    t = make_tenant(type("S", (), {"graph_url": "http://127.0.0.1:9/v1.0", "authority": None})(), storage, s3=s3)
    return open_repository(t, s3_client=client)


def test_the_lease_excludes_a_second_holder_expires_and_is_taken_over_once(any_repo):
    repo = any_repo
    uid = "11111111-0000-0000-0000-0000000000aa"
    a = repo.acquire_lease(uid, "a@x.example", 30)
    with pytest.raises(LeaseBusy, match=f"another backup of this mailbox is running .*pid {os.getpid()}"):
        repo.acquire_lease(uid, "a@x.example", 30)
    a.renew()
    a.release()
    b = repo.acquire_lease(uid, "a@x.example", 0.5)  # free again
    time.sleep(0.7)  # b is alive but stopped renewing: its lease expires
    c = repo.acquire_lease(uid, "a@x.example", 30)
    with pytest.raises(LeaseBusy, match="lost"):
        b.renew()  # the expired holder learns it lost the lease, before it could commit
    b.release()  # a no-op: not b's any more
    with pytest.raises(LeaseBusy):
        repo.acquire_lease(uid, "a@x.example", 30)
    c.release()


def test_a_lease_left_by_a_killed_process_of_this_host_is_free_at_once(any_repo):
    repo = any_repo
    uid = "11111111-0000-0000-0000-0000000000bb"
    code = ("import sys, os; from mailpipe.repo import open_repository; from mailpipe_tests.conftest import make_tenant;"
            "from mailpipe.config import S3Config; from mailpipe.repo.store import make_s3_client;"
            "ep = sys.argv[2] or None;"
            "t = make_tenant(type('S', (), {'graph_url': 'http://127.0.0.1:9/v1.0', 'authority': None})(), sys.argv[1],"
            " s3=S3Config(endpoint_url=ep));"
            "r = open_repository(t, s3_client=make_s3_client(ep, 'us-east-1') if ep else None);"
            f"r.acquire_lease('{uid}', 'x@x', 3600); os._exit(0)")  # dies holding it, without releasing
    ep = repo.store.client.meta.endpoint_url if isinstance(repo.store, S3Store) else ""
    storage = f"s3://{repo.store.bucket}/{repo.store.prefix}" if ep else repo.store.describe()
    subprocess.run([sys.executable, "-c", code, storage, ep], check=True, timeout=60,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    repo.acquire_lease(uid, "x@x", 30).release()  # not 3600 s later


def test_a_lease_write_whose_answer_was_lost_is_still_ours(tmp_path, monkeypatch):
    """S3 applies a conditional PUT, the answer is lost, botocore retries it and gets 412 (the version is
    already ours): the holder must not conclude that it lost its lease."""
    from mailpipe.repo.store import LocalStore, PreconditionFailed

    t = make_tenant(type("S", (), {"graph_url": "http://127.0.0.1:9/v1.0", "authority": None})(), str(tmp_path / "r"))
    repo = open_repository(t)
    lease = repo.acquire_lease("11111111-0000-0000-0000-0000000000cc", "x@x", 30)
    real = LocalStore.put_if_version

    def applied_then_412(self, key, data, version):
        real(self, key, data, version)
        raise PreconditionFailed(f"{key} changed")

    monkeypatch.setattr(LocalStore, "put_if_version", applied_then_412)
    lease.renew()  # no LeaseBusy
    monkeypatch.setattr(LocalStore, "put_if_version", real)
    lease.renew()
    lease.release()
