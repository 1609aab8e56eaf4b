"""S3 Object Lock (issue 11, immutability): what the repository writes once is locked for `days` on the server;
what it must replace or delete is not; a locked object is never deleted, nor hidden behind a delete marker, by
mailpipe or by the writer's own credentials; readers and backups work on the versioned bucket Object Lock needs.

Everything is read back from a real S3-compatible server (moto's ThreadedMotoServer), through a separate client."""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from mailpipe.config import ConfigError, ObjectLockConfig, S3Config, parse_tenants
from mailpipe.errors import UserError
from mailpipe.repo import open_repository
from mailpipe.repo.repository import mailbox_dir
from mailpipe.repo.store import LocalStore, ObjectLocked, S3Store, StoreError, make_s3_client
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import S3Errors, backup, mailbox_upns, snapshot_items, truth_items

DAYS = 30
U = "11111111-0000-0000-0000-0000000000aa"


@pytest.fixture
def lock_bucket(s3_server):
    """A fresh bucket created with Object Lock enabled (which turns versioning on); (endpoint, bucket, client)."""
    client = make_s3_client(s3_server, "us-east-1")
    bucket = f"lk-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    assert client.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    return s3_server, bucket, client


def locked_store(lock_bucket, mode="GOVERNANCE", days=DAYS, prefix="p"):
    endpoint, bucket, _ = lock_bucket
    return S3Store(make_s3_client(endpoint, "us-east-1"), bucket, prefix,
                   object_lock=ObjectLockConfig(mode=mode, days=days))


def server_lock(client, bucket, key, version_id=None):
    """(mode, retain-until) of an object as the server reports it; (None, None) when it has none."""
    kw = {"VersionId": version_id} if version_id else {}
    h = client.head_object(Bucket=bucket, Key=key, **kw)
    return h.get("ObjectLockMode"), h.get("ObjectLockRetainUntilDate")


def versions_of(client, bucket, key):
    """(data version ids, delete-marker version ids) of exactly ``key``."""
    r = client.list_object_versions(Bucket=bucket, Prefix=key)
    return ([v["VersionId"] for v in r.get("Versions", []) if v["Key"] == key],
            [m["VersionId"] for m in r.get("DeleteMarkers", []) if m["Key"] == key])


def near(t: datetime, expected: datetime, slack: float = 120) -> bool:
    return abs((t - expected).total_seconds()) <= slack


# -- the tenants file -----------------------------------------------------------------------------------------------
BASE = {"name": "contoso", "tenant_id": "11111111-2222-3333-4444-555555555555",
        "client_id": "66666666-7777-8888-9999-000000000000", "auth": {"client_secret_env": "CONTOSO_SECRET"},
        "storage": "s3://backups/contoso"}


def tenant_with(**over):
    return parse_tenants({"tenants": [{**BASE, **over}]}, source="t.yaml")[0]


def test_object_lock_in_the_tenants_file():
    t = tenant_with(s3={"region": "eu-west-1", "object_lock": {"mode": "COMPLIANCE", "days": 365}})
    assert t.s3.object_lock == ObjectLockConfig(mode="COMPLIANCE", days=365) and t.s3.region == "eu-west-1"
    assert tenant_with(s3={"object_lock": {"mode": "governance", "days": 36500}}).s3.object_lock == \
        ObjectLockConfig(mode="GOVERNANCE", days=36500)
    assert tenant_with().s3.object_lock is None and tenant_with(s3={"region": "x"}).s3.object_lock is None


@pytest.mark.parametrize("over, needle", [
    ({"s3": {"object_lock": {"mode": "FOREVER", "days": 30}}},
     "'s3.object_lock.mode': expected GOVERNANCE or COMPLIANCE"),
    ({"s3": {"object_lock": {"days": 30}}}, "'s3.object_lock.mode'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE"}}}, "'s3.object_lock.days': required"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": 0}}},
     "'s3.object_lock.days': expected a whole number from 1 to 36500"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": -5}}}, "'s3.object_lock.days'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": 36501}}}, "'s3.object_lock.days'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": "30"}}}, "'s3.object_lock.days'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": 7.5}}}, "'s3.object_lock.days'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": True}}}, "'s3.object_lock.days'"),
    ({"s3": {"object_lock": {"mode": "GOVERNANCE", "days": 3, "years": 1}}},
     "'s3.object_lock': unknown field(s): years"),
    ({"s3": {"object_lock": "COMPLIANCE"}}, "'s3.object_lock': expected a mapping"),
    ({"storage": "/srv/backups/contoso", "s3": {"object_lock": {"mode": "GOVERNANCE", "days": 3}}},
     "'s3.object_lock': S3 Object Lock needs an s3:// storage"),
    ({"storage": "file:///srv/backups", "s3": {"object_lock": {"mode": "COMPLIANCE", "days": 3}}},
     "a local repository cannot be locked"),
])
def test_object_lock_config_errors(over, needle):
    with pytest.raises(ConfigError) as e:
        tenant_with(**over)
    assert str(e.value).startswith("t.yaml: tenant 'contoso': field ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# -- what is locked, what is not ------------------------------------------------------------------------------------
LOCKED = ["mailpipe.json", "packs/ab/ab12cd", "index/00ff", "keys/k-1.json",
          f"mailboxes/{U}/snapshots/S1/manifest.parquet", f"mailboxes/{U}/snapshots/S1/snapshot.json"]
NOT_LOCKED = [f"mailboxes/{U}/lease.json", f"mailboxes/{U}/checkpoints/c1.parquet", "damaged/ab12",
              f"mailboxes/{U}/restores/0123abcd/plan.json", f"mailboxes/{U}/restores/0123abcd/progress/p1.json",
              "prune/plan.json", "prune/lease.json"]


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
def test_write_once_keys_are_locked_on_the_server_others_are_not(lock_bucket, mode):
    _, bucket, raw = lock_bucket
    s = locked_store(lock_bucket, mode=mode)
    before = datetime.now(timezone.utc)
    for i, key in enumerate(LOCKED + NOT_LOCKED):
        if key.endswith("lease.json"):
            v = s.put_if_absent(key, b"lease 1")  # how leases are written: create, then replace
            s.put_if_version(key, b"lease 2", v)
        elif key == "mailpipe.json":
            s.put_if_absent(key, b"{}")
        elif key.endswith(".parquet"):
            path = os.path.join(os.environ["MAILPIPE_HOME"], f"f-{uuid.uuid4().hex}")
            with open(path, "wb") as f:
                f.write(os.urandom(1000 + i))
            s.put_file(key, path)
            os.unlink(path)
        else:
            s.put_bytes(key, f"object {i}".encode())
    for key in LOCKED:
        got_mode, until = server_lock(raw, bucket, f"p/{key}")
        assert got_mode == mode and near(until, before + timedelta(days=DAYS)), (key, got_mode, until)
        assert until >= before + timedelta(days=DAYS)
        assert near(s.retained_until(key), until, 1)
    for key in NOT_LOCKED:
        for vid in versions_of(raw, bucket, f"p/{key}")[0]:  # every version, e.g. both of the lease
            assert server_lock(raw, bucket, f"p/{key}", vid) == (None, None), key
        assert s.retained_until(key) is None
    # a conditional replace of a write-once key (a future index rewrite) is locked too
    _, v = s.get_versioned("index/00ff")
    s.put_if_version("index/00ff", b"index 2", v)
    assert server_lock(raw, bucket, "p/index/00ff")[0] == mode


def test_a_multipart_upload_is_locked(lock_bucket, tmp_path):
    _, bucket, raw = lock_bucket
    s = locked_store(lock_bucket)
    big = tmp_path / "pack"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # over boto3's 8 MiB multipart threshold
    before = datetime.now(timezone.utc)
    s.put_file("packs/9f/9f00", str(big))
    assert "-" in raw.head_object(Bucket=bucket, Key="p/packs/9f/9f00")["ETag"]  # it went up in parts
    mode, until = server_lock(raw, bucket, "p/packs/9f/9f00")
    assert mode == "GOVERNANCE" and until >= before + timedelta(days=DAYS)
    assert near(until, before + timedelta(days=DAYS))
    assert s.get_bytes("packs/9f/9f00") == big.read_bytes()
    s.put_file(f"mailboxes/{U}/checkpoints/big.parquet", str(big))  # large, but replaceable: not locked
    assert server_lock(raw, bucket, f"p/mailboxes/{U}/checkpoints/big.parquet") == (None, None)


# -- deleting -------------------------------------------------------------------------------------------------------
def test_a_locked_object_survives_store_delete_and_the_writers_raw_deletes(lock_bucket):
    _, bucket, _ = lock_bucket
    s = locked_store(lock_bucket)
    writer = s.client  # the credentials the backup writes with
    key, full = f"mailboxes/{U}/snapshots/S1/snapshot.json", f"p/mailboxes/{U}/snapshots/S1/snapshot.json"
    s.put_bytes(key, b"committed")
    until = s.retained_until(key)
    with pytest.raises(ObjectLocked) as e:
        s.delete(key)
    assert e.value.key == key and e.value.until == until and isinstance(e.value, StoreError)
    assert f"{key} is retained by S3 Object Lock until {until:%Y-%m-%d %H:%M:%S} UTC" in str(e.value)
    # nothing changed: still readable, still listed, no delete marker
    assert s.get_bytes(key) == b"committed" and key in list(s.list(f"mailboxes/{U}"))
    [vid], markers = versions_of(writer, bucket, full)
    assert markers == []
    # the writer's credentials cannot remove the data either
    with pytest.raises(ClientError) as ce:
        writer.delete_object(Bucket=bucket, Key=full, VersionId=vid)
    assert ce.value.response["Error"]["Code"] == "AccessDenied"
    r = writer.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": full, "VersionId": vid}]})
    assert [x["Code"] for x in r.get("Errors", [])] == ["AccessDenied"] and not r.get("Deleted")
    # a delete without a version id only hides it behind a marker: the data is still there
    writer.delete_object(Bucket=bucket, Key=full)
    writer.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": full}]})
    assert not s.exists(key) and key not in list(s.list(f"mailboxes/{U}"))  # readers see current versions only
    data_versions, markers = versions_of(writer, bucket, full)
    assert data_versions == [vid] and len(markers) == 2
    assert writer.get_object(Bucket=bucket, Key=full, VersionId=vid)["Body"].read() == b"committed"
    # mailpipe's delete still refuses (and leaves the markers: removing them would resurrect the object)
    with pytest.raises(ObjectLocked):
        s.delete(key)
    assert versions_of(writer, bucket, full) == (data_versions, markers)


def test_delete_frees_every_version_when_nothing_is_locked(lock_bucket):
    _, bucket, raw = lock_bucket
    s = locked_store(lock_bucket)
    lease = f"mailboxes/{U}/lease.json"
    v = s.put_if_absent(lease, b"1")
    v = s.put_if_version(lease, b"2", v)
    s.put_if_version(lease, b"3", v)
    raw.delete_object(Bucket=bucket, Key=f"p/{lease}")  # plus a delete marker, as a released lease leaves
    s.put_bytes(lease, b"4")
    assert [len(x) for x in versions_of(raw, bucket, f"p/{lease}")] == [4, 1]
    s.delete(lease)
    assert versions_of(raw, bucket, f"p/{lease}") == ([], [])  # really gone: no version, no marker
    s.delete(lease)  # a missing key is not an error
    s.delete("packs/00/never-written")
    # a write-once key whose retention has passed is deleted for real too (GOVERNANCE shortened by an admin)
    s.put_bytes("packs/ab/old", b"old pack")
    s.put_bytes("packs/ab/other", b"neighbour")  # same prefix, longer name: untouched
    s.put_bytes("packs/ab/old", b"old pack, rewritten")  # two versions, both locked
    for vid in versions_of(raw, bucket, "p/packs/ab/old")[0]:
        raw.put_object_retention(Bucket=bucket, Key="p/packs/ab/old", VersionId=vid, BypassGovernanceRetention=True,
                                 Retention={"Mode": "GOVERNANCE",
                                            "RetainUntilDate": datetime.now(timezone.utc) + timedelta(seconds=2)})
    with pytest.raises(ObjectLocked):
        s.delete("packs/ab/old")
    time.sleep(3)
    assert s.retained_until("packs/ab/old") is None  # the date has passed: nothing keeps it
    s.delete("packs/ab/old")
    assert versions_of(raw, bucket, "p/packs/ab/old") == ([], [])
    assert s.get_bytes("packs/ab/other") == b"neighbour"


def test_delete_keeps_the_visible_object_when_an_older_version_is_locked(lock_bucket):
    """Versions go oldest first: a locked old version stops the delete before the current one is touched."""
    _, bucket, raw = lock_bucket
    s = locked_store(lock_bucket)
    s.put_bytes("damaged/ab", b"old marker")  # a key mailpipe never locks ...
    raw.put_object(Bucket=bucket, Key="p/damaged/ab", Body=b"locked by someone", ObjectLockMode="GOVERNANCE",
                   ObjectLockRetainUntilDate=datetime.now(timezone.utc) + timedelta(days=1), ChecksumAlgorithm="CRC32")
    s.put_bytes("damaged/ab", b"current")  # ... with a locked version in the middle
    with pytest.raises(ObjectLocked):
        s.delete("damaged/ab")
    assert s.get_bytes("damaged/ab") == b"current"
    assert len(versions_of(raw, bucket, "p/damaged/ab")[0]) == 2  # only the unlocked oldest went


def test_access_denied_on_an_unlocked_object_is_a_permissions_error(lock_bucket):
    s = locked_store(lock_bucket)
    s.put_bytes(f"mailboxes/{U}/lease.json", b"x")
    S3Errors(s.client, "DeleteObject", 1, code="AccessDenied", status=403, message="Access Denied")
    with pytest.raises(StoreError) as e:
        s.delete(f"mailboxes/{U}/lease.json")
    assert not isinstance(e.value, ObjectLocked)
    text = str(e.value)
    assert "access denied (AccessDenied)" in text and "s3:DeleteObject " in text and "s3:DeleteObjectVersion" in text


# -- retention dates ------------------------------------------------------------------------------------------------
def test_extend_retention_extends_and_never_shortens(lock_bucket):
    _, bucket, raw = lock_bucket
    s = locked_store(lock_bucket, mode="COMPLIANCE", days=2)
    s.put_bytes("packs/cd/cd01", b"pack")
    first = s.retained_until("packs/cd/cd01")
    later = datetime.now(timezone.utc) + timedelta(days=40)
    s.extend_retention("packs/cd/cd01", later)
    mode, until = server_lock(raw, bucket, "p/packs/cd/cd01")
    assert mode == "COMPLIANCE" and until >= later and near(until, later, 2) and until > first
    s.extend_retention("packs/cd/cd01", datetime.now(timezone.utc) + timedelta(days=1))  # earlier: no change
    assert server_lock(raw, bucket, "p/packs/cd/cd01") == (mode, until)
    assert s.retained_until("packs/cd/cd01") == until
    with pytest.raises(ValueError):
        s.extend_retention("packs/cd/cd01", datetime(2100, 1, 1))  # naive: which time zone?
    from mailpipe.repo.store import KeyNotFound

    with pytest.raises(KeyNotFound):
        s.retained_until("packs/cd/missing")


def test_a_local_store_has_no_lock(tmp_path):
    s = LocalStore(str(tmp_path / "repo"))
    s.put_bytes("packs/ab/x", b"x")
    assert s.retained_until("packs/ab/x") is None
    assert s.extend_retention("packs/ab/x", datetime.now(timezone.utc) + timedelta(days=3)) is None
    s.delete("packs/ab/x")
    assert not s.exists("packs/ab/x")


def test_a_bucket_without_object_lock_is_a_clear_error(s3_bucket):
    endpoint, bucket = s3_bucket
    t = make_tenant(type("S", (), {"graph_url": "http://127.0.0.1:9/v1.0", "authority": None})(), f"s3://{bucket}/p",
                    s3=S3Config(endpoint_url=endpoint, object_lock=ObjectLockConfig("GOVERNANCE", 7)))
    with pytest.raises(UserError) as e:
        open_repository(t)
    assert str(e.value) == (f"tenant t1: storage s3://{bucket}/p: the bucket does not have S3 Object Lock enabled — "
                            "`s3.object_lock` needs a bucket created with Object Lock (docs/CONFIG.md), or remove "
                            "`s3.object_lock` from the tenants file")


# -- a whole backup -------------------------------------------------------------------------------------------------
SPEC_LOCKED = re.compile(r"^p/(packs|index|keys|blobs)/|^p/mailboxes/[^/]+/snapshots/")
SPEC_NEVER = re.compile(r"/lease\.json$|/checkpoints/|^p/damaged/|/restores/|^p/prune/")


def test_a_backup_into_an_object_lock_bucket_works_and_its_snapshots_are_locked(sim_factory, lock_bucket):
    from mailpipe.repo.check import check_repository

    endpoint, bucket, raw = lock_bucket
    sim = sim_factory(users=2, messages_per_mailbox=40, seed=5)
    upns = mailbox_upns(sim)
    t = make_tenant(sim, f"s3://{bucket}/p", s3=S3Config(endpoint_url=endpoint, region="us-east-1",
                                                         object_lock=ObjectLockConfig("GOVERNANCE", DAYS)))
    before = datetime.now(timezone.utc)
    for rnd in range(2):  # a full backup, then an incremental one after changes
        if rnd:
            for u in upns:
                sim.mutate(u, random=10, seed=3)
        truth = sim.truth()
        results = backup(t, upns)
        assert all(r.ok for r in results), [r.error for r in results]
        repo = open_repository(t, create=False)
        for r in results:
            assert snapshot_items(repo, r.user_id) == truth_items(truth, r.upn)
    # readers and `mailpipe check --read-data` see current versions only (leases leave versions and markers)
    chk = check_repository(repo, repo.list_mailboxes(), read_data=True)
    assert chk.ok and chk.snapshots == 2 * len(upns), chk.problems[:5]

    listing = raw.list_object_versions(Bucket=bucket, Prefix="p/")
    locked = unlocked = 0
    for v in listing.get("Versions", []):
        mode, until = server_lock(raw, bucket, v["Key"], v["VersionId"])
        if SPEC_LOCKED.match(v["Key"]):
            assert mode == "GOVERNANCE" and until >= before + timedelta(days=DAYS), v["Key"]
            locked += 1
        elif SPEC_NEVER.search(v["Key"]):
            assert (mode, until) == (None, None), v["Key"]
            unlocked += 1
    assert locked and unlocked  # content, manifests and commits; the leases' versions
    for r in results:
        for info in repo.list_snapshots(r.user_id):
            prefix = f"mailboxes/{mailbox_dir(r.user_id)}/snapshots/{info.snapshot_id}/"
            files = [k for k in repo.store.list(prefix)]
            assert prefix + "snapshot.json" in files and len(files) >= 2
            for k in files:
                assert server_lock(raw, bucket, f"p/{k}")[0] == "GOVERNANCE", k
                assert repo.store.retained_until(k) >= before + timedelta(days=DAYS)
        # checkpoints were cleared at commit, every version of them: they were never locked
        ckpt = f"p/mailboxes/{mailbox_dir(r.user_id)}/checkpoints/"
        left = raw.list_object_versions(Bucket=bucket, Prefix=ckpt)
        assert not left.get("Versions") and not left.get("DeleteMarkers")

    # forgetting a locked snapshot is refused; the snapshot stays whole
    r = results[0]
    first = repo.list_snapshots(r.user_id)[0]
    with pytest.raises(ObjectLocked):
        repo.delete_snapshot(r.user_id, first.snapshot_id)
    assert [s.snapshot_id for s in repo.list_snapshots(r.user_id)][0] == first.snapshot_id
    snapshot_items(repo, r.user_id, first.snapshot_id)


def test_a_backup_after_one_that_died_before_its_commit_works_in_an_object_lock_bucket(sim_factory, lock_bucket):
    """A backup killed after uploading a snapshot file, before ``snapshot.json``, leaves a locked file that
    no reader sees; the next backup of the mailbox must not fail on it (it stays until its retention ends)."""
    from mailpipe.repo.repository import new_snapshot_id

    endpoint, bucket, raw = lock_bucket
    sim = sim_factory(users=1, messages_per_mailbox=10, seed=2)
    upn = mailbox_upns(sim)[0]
    t = make_tenant(sim, f"s3://{bucket}/p", s3=S3Config(endpoint_url=endpoint, region="us-east-1",
                                                         object_lock=ObjectLockConfig("COMPLIANCE", DAYS)))
    [first] = backup(t, [upn])
    assert first.ok, first.error
    repo = open_repository(t, create=False)
    dead = f"mailboxes/{mailbox_dir(first.user_id)}/snapshots/{new_snapshot_id()}/manifest.parquet"
    repo.store.put_bytes(dead, b"PAR1 ... what a killed backup uploaded")
    assert repo.store.retained_until(dead) is not None
    sim.mutate(upn, random=5, seed=4)
    [second] = backup(t, [upn])
    assert second.ok, second.error
    assert [s.snapshot_id for s in repo.list_snapshots(first.user_id)] == [first.snapshot_id, second.snapshot_id]
    assert snapshot_items(repo, first.user_id) == truth_items(sim.truth(), upn)
    assert repo.store.get_bytes(dead).startswith(b"PAR1")  # still there, locked: removed once its date passes
