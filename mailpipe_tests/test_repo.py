"""The repository on both stores (a local folder, and S3 through moto's server over a real socket)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from mailpipe.config import AuthConfig, S3Config, TenantConfig
from mailpipe.repo import IntegrityError, LocalStore, RepositoryError, S3Store, mailbox_dir, open_repository
from mailpipe_tests.damage import corrupt_chunk, delete_chunk, delete_pack_of
from mailpipe_tests.helpers import S3Errors
from mailpipe.repo import chunking
from mailpipe.repo.export import export_snapshot, safe_name
from mailpipe.repo.store import make_s3_client

USER = "12eb4e78-d55e-4213-9427-547d7fd3576c"


def tenant(storage: str, s3: S3Config | None = None, name: str = "t1") -> TenantConfig:
    return TenantConfig(name=name, tenant_id="11111111-2222-3333-4444-555555555555",
                        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
                        storage=storage, graph_url="http://127.0.0.1:1/v1.0", s3=s3 or S3Config())


@pytest.fixture(params=["local", "s3"])
def repo_and_tenant(request, tmp_path):
    if request.param == "local":
        t = tenant(str(tmp_path / "repo"))
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        t = tenant(f"s3://{bucket}/tenants/t1", S3Config(endpoint_url=endpoint, region="us-east-1"))
    return open_repository(t), t


def b64_attachment(data: bytes) -> bytes:
    import base64

    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def message(i: int, attachment: bytes | None = None, *, boundary: str | None = None,
            encoded: bytes | None = None) -> bytes:
    b = (boundary or f"b{i}").encode()
    head = (f"From: a{i}@example.com\r\nTo: x@example.com\r\nSubject: message {i}\r\n"
            f"Message-ID: <{i}@example.com>\r\nMIME-Version: 1.0\r\n").encode()
    if attachment is None:
        return head + b"Content-Type: text/plain\r\n\r\nhello " + str(i).encode() + b"\r\n"
    return (head + b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b +
            b"\r\nContent-Type: text/plain\r\n\r\nsee attached " + os.urandom(8).hex().encode() + b"\r\n--" + b +
            b"\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" +
            (encoded or b64_attachment(attachment)) + b"--" + b + b"--\r\n")


TRICKY = {
    "empty": b"",
    "crlf": b"Subject: x\r\n\r\nline1\r\nline2\r\n",
    "bare-lf": b"Subject: x\n\nline1\nline2\n",
    "mixed-endings": b"Subject: x\r\n\nline1\rline2\n\r\n",
    "8bit": "Subject: Grüße aus Köln — 東京\r\n\r\nÄÖÜ ß €\r\n".encode("utf-8") + b"\xe4\xf6\xfc latin-1\r\n",
    "binary": bytes(range(256)) * 64,
    "no-final-newline": b"Subject: x\r\n\r\nbody without newline",
    "fake-boundaries": b"Subject: x\r\n\r\n--\r\n--a\n\n--\r\n\r\n" * 50_000,
}


def test_byte_exact_round_trip_of_tricky_mime(repo_and_tenant):
    repo, _ = repo_and_tenant
    rng = random.Random(5)
    cases = dict(TRICKY)
    cases["30mb-attachment"] = message(1, rng.randbytes(30 * 1024 * 1024))
    for name, data in cases.items():
        st = repo.put_content(data)
        assert st.size == len(data) and st.sha256 == hashlib.sha256(data).hexdigest()
        assert repo.read_content(st.sha256, st.chunks, st.size, item=name) == data, name
        assert b"".join(repo.iter_content(st.sha256, st.chunks, st.size)) == data
    big = repo.put_content(cases["30mb-attachment"])
    assert len(big.chunks) > 30 and big.new_chunks == 0  # chunked, and nothing uploaded twice


def test_chunking_is_exact_and_small_messages_stay_one_chunk():
    rng = random.Random(1)
    for n in (0, 1, 100, chunking.SINGLE_CHUNK):
        data = rng.randbytes(n)
        assert chunking.split(data) == [data]
    for _ in range(30):  # arbitrary bytes with MIME-ish structure: always reassembles exactly
        parts = [rng.choice([b"\r\n--b\r\n", b"\n\n", b"\r\n\r\n", rng.randbytes(rng.randint(0, 300_000))])
                 for _ in range(rng.randint(1, 40))]
        data = b"".join(parts)
        chunks = chunking.split(data)
        assert b"".join(chunks) == data and all(len(c) <= chunking.MAX_CHUNK for c in chunks)


def test_shared_attachment_in_50_messages_of_5_mailboxes_costs_about_one_copy(repo_and_tenant):
    repo, _ = repo_and_tenant
    attachment = random.Random(2).randbytes(5 * 1024 * 1024)
    encoded = b64_attachment(attachment)
    one = message(0, attachment, encoded=encoded)
    first = repo.put_content(one)
    first_cost = first.new_stored_bytes
    rest = 0
    for mailbox in range(5):
        for i in range(10):
            # different headers, text and boundary in each message: only the attachment body is shared
            st = repo.put_content(message(mailbox * 100 + i + 1, attachment, boundary=f"=_mb{mailbox}_{i}",
                                          encoded=encoded))
            rest += st.new_stored_bytes
    assert first_cost > 5 * 1024 * 1024 * 0.9  # random bytes in base64: the first copy costs ~ its size
    assert rest < 0.02 * first_cost            # 50 more messages: headers and text only


def test_snapshots_commit_atomically_and_are_listed(repo_and_tenant):
    repo, _ = repo_and_tenant
    st = repo.put_content(TRICKY["crlf"])
    row = {"item_id": "AAMk1", "folder_id": "F1", "folder_path": ["Inbox", "A/B"], "subject": "x",
           "received_at": datetime(2025, 1, 2, tzinfo=timezone.utc), "is_read": True, "size": st.size,
           "sha256": st.sha256, "chunks": st.chunks, "first_snapshot_id": None, "categories": ["Blue"]}
    assert repo.latest_snapshot(USER) is None
    w = repo.begin_snapshot(USER, "adele@example.com")
    w.add_items([row])
    w.set_folders([{"folder_id": "F1", "parent_id": None, "display_name": "A/B", "path": ["Inbox", "A/B"]}])
    # written but not committed: invisible
    assert repo.list_snapshots(USER) == [] and repo.latest_snapshot(USER) is None
    info = w.commit(delta_links={"F1": "https://link"}, stats={"items_total": 1}, skipped=[])
    assert [s.snapshot_id for s in repo.list_snapshots(USER)] == [info.snapshot_id]
    latest = repo.latest_snapshot(USER)
    assert latest.delta_links == {"F1": "https://link"} and latest.items == 1 and latest.upn == "adele@example.com"
    rows = [r for b in repo.iter_manifest(USER, "latest") for r in b.to_pylist()]
    assert rows[0]["folder_path"] == ["Inbox", "A/B"] and rows[0]["received_at"].year == 2025
    assert repo.read_folders(USER, info.snapshot_id).num_rows == 1
    assert repo.list_mailboxes() == [(USER, "adele@example.com")] and repo.find_mailbox("ADELE@example.com") == USER
    # an aborted writer leaves nothing visible
    w2 = repo.begin_snapshot(USER, "adele@example.com")
    w2.add_items([row])
    w2.abort()
    assert len(repo.list_snapshots(USER)) == 1
    with pytest.raises(RepositoryError):
        repo.read_snapshot(USER, w2.snapshot_id)


def test_uncommitted_snapshot_files_are_invisible_and_interrupted_writes_never_look_valid(tmp_path):
    t = tenant(str(tmp_path / "repo"))
    repo = open_repository(t)
    root = tmp_path / "repo"
    # a crash after the manifest upload but before snapshot.json
    d = root / "mailboxes" / USER / "snapshots" / "20260101T000000Z-abcd"
    d.mkdir(parents=True)
    (d / "manifest.parquet").write_bytes(b"PAR1 garbage")
    # a crash in the middle of a pack write leaves only a temp file
    (root / "packs" / "ab").mkdir(parents=True)
    (root / "packs" / "ab" / ".tmp-x1y2").write_bytes(b"partial")
    assert repo.list_snapshots(USER) == [] and repo.list_mailboxes() == []
    assert not any(".tmp-" in k for k in repo.store.list("packs")) and list(repo.iter_chunk_names()) == []


def test_checkpoints(repo_and_tenant):
    repo, _ = repo_and_tenant
    st = repo.put_content(b"Subject: c\r\n\r\nx\r\n")
    rows = [{"item_id": f"id{i}", "change_key": "ck", "is_draft": False, "sha256": st.sha256, "chunks": st.chunks,
             "size": st.size} for i in range(3)]
    repo.write_checkpoint(USER, rows[:2])
    repo.write_checkpoint(USER, rows[2:])
    got = [r["item_id"] for b in repo.iter_checkpoint_rows(USER) for r in b.to_pylist()]
    assert sorted(got) == ["id0", "id1", "id2"] and len(repo.list_checkpoints(USER)) == 2
    repo.clear_checkpoints(USER)
    assert list(repo.iter_checkpoint_rows(USER)) == []


def test_corruption_and_missing_chunks_are_detected(tmp_path):
    repo = open_repository(tenant(str(tmp_path / "repo")))
    data = message(1, random.Random(3).randbytes(400_000))
    st = repo.put_content(data)
    undo = corrupt_chunk(repo, st.chunks[1])  # one flipped byte inside the stored blob
    with pytest.raises(IntegrityError, match=r"item-42.*corrupt"):
        repo.read_content(st.sha256, st.chunks, st.size, item="item-42")
    undo()
    assert repo.read_content(st.sha256, st.chunks, st.size) == data
    corrupt_chunk(repo, st.chunks[1], garbage=True)
    with pytest.raises(IntegrityError, match="item-42"):
        repo.read_content(st.sha256, st.chunks, st.size, item="item-42")
    delete_pack_of(repo, st.chunks[1])
    with pytest.raises(IntegrityError, match="missing"):
        repo.read_content(st.sha256, st.chunks, st.size, item="item-42")
    with pytest.raises(IntegrityError):  # a manifest pointing at the wrong content
        repo.read_content("0" * 64, st.chunks[:1], st.size, item="x")
    with pytest.raises(IntegrityError, match="invalid chunk name"):
        repo.read_content(st.sha256, ["../../etc/passwd"], st.size, item="x")


def test_hostile_names_stay_inside(tmp_path):
    repo = open_repository(tenant(str(tmp_path / "repo")))
    hostile = ["../../etc", "%2e%2e", "a\x00b", "x" * 5000, "ünï/cødé", "..", ".", "", " lead", "trail.",
               "CON", "a\\b", "%2F", "/abs"]
    for h in hostile:
        d = mailbox_dir(h)
        assert "/" not in d and ".." not in d and "\x00" not in d and len(d) <= 128
    names = {safe_name(h) for h in hostile}
    assert len(names) == len(hostile)  # injective
    for n in names:
        assert "/" not in n and "\x00" not in n and n not in (".", "..", "") and len(n.encode()) <= 200
    # a snapshot whose folder paths and ids are hostile exports strictly inside --out
    st = repo.put_content(b"Subject: x\r\n\r\ny\r\n")
    w = repo.begin_snapshot("../../evil", "evil@example.com")
    w.add_items([{"item_id": h or "e", "folder_id": "f", "folder_path": [h, "../.."], "size": st.size,
                  "sha256": st.sha256, "chunks": st.chunks} for h in hostile])
    w.commit(delta_links={}, stats={}, skipped=[])
    out = tmp_path / "out"
    res = export_snapshot(repo, "../../evil", "latest", str(out))
    assert res.items == len(hostile)
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            p = os.path.realpath(os.path.join(dirpath, f))
            assert p.startswith(str(tmp_path / "out")) or p.startswith(str(tmp_path / "repo")), p
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_repository_belongs_to_one_tenant(tmp_path):
    open_repository(tenant(str(tmp_path / "r"), name="alpha"))
    with pytest.raises(RepositoryError, match="belongs to tenant 'alpha'"):
        open_repository(tenant(str(tmp_path / "r"), name="beta"))
    with pytest.raises(RepositoryError, match="no mailpipe repository"):
        open_repository(tenant(str(tmp_path / "none")), create=False)
    info = json.loads((tmp_path / "r" / "mailpipe.json").read_text())
    info["version"] = 99
    (tmp_path / "r" / "mailpipe.json").write_text(json.dumps(info))
    with pytest.raises(RepositoryError, match="version 99"):
        open_repository(tenant(str(tmp_path / "r"), name="alpha"))


def test_s3_slowdown_is_retried(s3_bucket):
    import boto3
    from botocore.config import Config

    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(retries={"mode": "standard", "max_attempts": 1}))
    flaky = S3Errors(client, "PutObject", 2)
    store = S3Store(client, bucket, "p", base_delay=0.01)
    store.put_bytes("blobs/aa/x", b"data")
    assert flaky.seen == 3 and store.get_bytes("blobs/aa/x") == b"data"
    S3Errors(client, "GetObject", 10)
    from mailpipe.repo import StoreError

    with pytest.raises(StoreError, match="SlowDown"):
        store.get_bytes("blobs/aa/x")


def test_s3_prefix_isolation(s3_bucket):
    endpoint, bucket = s3_bucket
    client = make_s3_client(endpoint, "us-east-1")
    a, b = S3Store(client, bucket, "tenants/a"), S3Store(client, bucket, "tenants/ab")
    a.put_bytes("x/1", b"1")
    b.put_bytes("x/2", b"2")
    assert list(a.list("x")) == ["x/1"] and list(b.list("")) == ["x/2"]
    with pytest.raises(ValueError):
        a.put_bytes("../b/x", b"no")
    with pytest.raises(ValueError):
        LocalStore("/tmp").put_bytes("a/../../etc/x", b"no")


def acme_cli(tmp_path):
    """A tenants file with tenant 'acme' on a local repository: (the repository, run `mailpipe ARGS...`)."""
    from mailpipe.sim import write_tenants_file

    repo_dir = tmp_path / "repo"  # no Graph needed: these commands read the repository only
    tfile = write_tenants_file(tmp_path / "tenants.yaml", "acme", "http://127.0.0.1:9/v1.0", repo_dir)
    env = {**os.environ, "MAILPIPE_TENANTS": tfile}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mailpipe", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    return open_repository(tenant(str(repo_dir), name="acme")), run


def test_cli_snapshots_and_export(tmp_path):
    repo, run = acme_cli(tmp_path)
    data = TRICKY["mixed-endings"]
    st = repo.put_content(data)
    w = repo.begin_snapshot(USER, "adele@acme.example")
    w.add_items([{"item_id": "AAMk=1", "folder_id": "f", "folder_path": ["Inbox", "Sub/Dir"], "size": st.size,
                  "sha256": st.sha256, "chunks": st.chunks, "sender": "x@y"}])
    info = w.commit(delta_links={}, stats={"bytes_stored_new": 10}, skipped=[])
    r = run("snapshots", "acme")
    assert r.returncode == 0 and info.snapshot_id in r.stdout and "adele@acme.example" in r.stdout
    r = run("export", "acme", "adele@acme.example", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "Inbox" / "Sub%2FDir" / "AAMk=1.eml").read_bytes() == data
    r = run("export", "acme", "adele@acme.example", "--out", str(tmp_path / "mbox"), "--format", "mbox")
    assert r.returncode == 0 and (tmp_path / "mbox" / "Inbox" / "Sub%2FDir.mbox").read_bytes().startswith(b"From x@y ")
    r = run("export", "nope", "x", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "unknown tenant 'nope'" in r.stderr and "acme" in r.stderr
    r = run("export", "acme", "who@acme.example", "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and "no backup of mailbox" in r.stderr


def test_check_finds_missing_and_damaged_chunks_naming_the_items(repo_and_tenant, tmp_path):
    """`mailpipe check`: every snapshot of every mailbox; a missing chunk is found from the listing, a damaged
    one only by --read-data; each affected item (in every mailbox and snapshot sharing it) is named."""
    from mailpipe.repo.check import check_repository

    repo, _ = repo_and_tenant
    shared = random.Random(5).randbytes(300_000)
    users = {"11111111-0000-0000-0000-00000000000a": "a@x.example", "11111111-0000-0000-0000-00000000000b": "b@x.example"}
    for n, (uid, upn) in enumerate(users.items()):
        for round_ in range(2):  # two snapshots per mailbox
            rows = []
            for i in range(3):
                st = repo.put_content(message(10 * n + i, shared if i == 0 else None))
                rows.append({"item_id": f"{upn}-{i}", "folder_id": "F", "folder_path": ["Inbox"], "size": st.size,
                             "sha256": st.sha256, "chunks": st.chunks})
            w = repo.begin_snapshot(uid, upn)
            w.add_items(rows)
            w.set_folders([{"folder_id": "F", "parent_id": None, "display_name": "Inbox", "path": ["Inbox"]}])
            w.commit(delta_links={}, stats={}, skipped=[])
    everyone = repo.list_mailboxes()
    res = check_repository(repo, everyone)
    assert res.ok and (res.mailboxes, res.snapshots, res.items) == (2, 4, 12) and res.chunks >= 5
    full = check_repository(repo, everyone, read_data=True)
    assert full.ok and full.chunks_read == full.chunks == res.chunks and full.bytes_read > 300_000

    att = repo.put_content(message(0, shared)).chunks[1]  # a chunk of the shared attachment
    undo = corrupt_chunk(repo, att)
    assert check_repository(repo, everyone).ok  # present: the quick check cannot see inside
    bad = check_repository(repo, everyone, read_data=True)
    assert not bad.ok and bad.problem_count == 4  # item 0 of both mailboxes, in both snapshots
    assert any(att in p and "corrupt" in p for p in bad.problems)
    assert {p.split(" snapshot ")[0] for p in bad.problems} == set(users.values())
    undo()
    undo = delete_chunk(repo, att)
    gone = check_repository(repo, everyone, snapshot="latest")
    assert gone.problem_count == 2 and all("missing" in p and "-0:" in p for p in gone.problems)
    undo()
    assert check_repository(repo, everyone, read_data=True).ok


def test_cli_check(tmp_path):
    repo, mailpipe = acme_cli(tmp_path)
    st = repo.put_content(TRICKY["crlf"])
    w = repo.begin_snapshot(USER, "adele@acme.example")
    w.add_items([{"item_id": "AAMk=1", "folder_id": "f", "folder_path": ["Inbox"], "size": st.size,
                  "sha256": st.sha256, "chunks": st.chunks}])
    w.set_folders([{"folder_id": "f", "parent_id": None, "display_name": "Inbox", "path": ["Inbox"]}])
    w.commit(delta_links={}, stats={}, skipped=[])
    r = mailpipe("check", "acme", "--read-data")
    assert r.returncode == 0 and "1 mailboxes, 1 snapshots, 1 manifest rows" in r.stderr and "no problems" in r.stderr
    delete_pack_of(repo, st.chunks[0])
    r = mailpipe("check", "acme", "adele@acme.example")
    assert r.returncode == 3 and "AAMk=1" in r.stdout and "missing" in r.stdout and "1 PROBLEMS" in r.stderr


def test_snapshot_ids_sort_by_commit_even_within_one_second(tmp_path):
    repo = open_repository(tenant(str(tmp_path / "repo")))
    st = repo.put_content(b"Subject: x\r\n\r\n")
    row = {"item_id": "a", "folder_id": "f", "size": st.size, "sha256": st.sha256, "chunks": st.chunks}
    ids = []
    for _ in range(5):
        w = repo.begin_snapshot(USER, "u@example.com")
        w.add_items([row])
        ids.append(w.commit(delta_links={}, stats={}, skipped=[]).snapshot_id)
    assert ids == sorted(ids) and repo.latest_snapshot(USER).snapshot_id == ids[-1]
    from mailpipe.repo.repository import new_snapshot_id

    future = "29991231T235959.999999Z-abcdef"
    assert new_snapshot_id(after=future) > future  # a clock that stepped back cannot reorder snapshots


def test_checkpoint_compaction_keeps_every_row(repo_and_tenant):
    repo, _ = repo_and_tenant
    st = repo.put_content(b"Subject: c\r\n\r\nx\r\n")
    for part in range(5):
        repo.write_checkpoint(USER, [{"item_id": f"p{part}-{i}", "change_key": "ck", "is_draft": False,
                                      "sha256": st.sha256, "chunks": st.chunks, "size": st.size} for i in range(3)])
    assert repo.compact_checkpoints(USER) == 5
    assert len(repo.list_checkpoints(USER)) == 1
    got = sorted(r["item_id"] for b in repo.iter_checkpoint_rows(USER) for r in b.to_pylist())
    assert got == sorted(f"p{p}-{i}" for p in range(5) for i in range(3))


def test_checkpoints_carry_unpacked_blobs_and_compaction_reads_its_own_parts_locally(tmp_path, monkeypatch):
    """A checkpoint names chunks still in the open pack by carrying their blobs: a new process reading the
    parts gets the content back without any pack; compaction merges the parts this process wrote from its
    local copies (no download) into one part without blobs."""
    t = tenant(str(tmp_path / "repo"))
    repo = open_repository(t)
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(9)
    datas = [message(i, rng.randbytes(3000)) for i in range(6)]
    rows = []
    for i, d in enumerate(datas):
        st = repo.put_content(d)
        rows.append({"item_id": f"id{i}", "change_key": "ck", "is_draft": False, "sha256": st.sha256,
                     "chunks": st.chunks, "size": st.size})
    repo.write_checkpoint(USER, rows[:3], tmp_dir=str(work))
    repo.write_checkpoint(USER, rows[3:], tmp_dir=str(work))
    assert list(repo.store.list("packs")) == []  # nothing uploaded as a pack yet: the parts carry the blobs
    other = open_repository(t)  # a restarted backup
    got = [r["item_id"] for b in other.iter_checkpoint_rows(USER) for r in b.to_pylist()]
    assert sorted(got) == [f"id{i}" for i in range(6)]
    other.flush()
    for r, d in zip(rows, datas):
        assert other.read_content(r["sha256"], r["chunks"], r["size"]) == d
    downloads = []
    original = type(repo.store).get_file
    monkeypatch.setattr(type(repo.store), "get_file", lambda self, k, p: downloads.append(k) or original(self, k, p))
    assert repo.compact_checkpoints(USER, tmp_dir=str(work)) == 2 and downloads == []
    [part] = repo.list_checkpoints(USER)
    merged = [b for b in repo._iter_parquet(part, 100, None)]
    assert sum(b.num_rows for b in merged) == 6 and all(
        v is None for b in merged for v in b.column("blobs").to_pylist())


def test_the_local_journal_of_a_killed_backup_becomes_checkpoint_parts_and_a_torn_part_is_skipped(tmp_path):
    """Journal parts stay in the work dir (no upload); the next holder of the mailbox uploads the whole ones
    as checkpoint parts (with the blobs of chunks that were still in the open pack) and skips a torn one; an
    uploaded checkpoint part makes the journal parts before it redundant."""
    t = tenant(str(tmp_path / "repo"))
    repo = open_repository(t)
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(11)
    datas = [message(i, rng.randbytes(3000)) for i in range(6)]
    rows = []
    for i, d in enumerate(datas):
        st = repo.put_content(d)
        rows.append({"item_id": f"id{i}", "change_key": "ck", "is_draft": False, "sha256": st.sha256,
                     "chunks": st.chunks, "size": st.size})
    names = [repo.write_journal(rows[i:i + 2], tmp_dir=str(work)) for i in range(0, 6, 2)]
    assert repo.list_checkpoints(USER) == [] and list(repo.store.list("packs")) == []  # nothing uploaded
    torn = work / names[1]
    torn.write_bytes(torn.read_bytes()[:-40])  # killed in the middle of a write (or the disk lied)
    other = open_repository(t)  # the process that killed backup died; a new one holds the lease
    assert other.upload_journal(USER, str(work)) == 4
    got = sorted(r["item_id"] for b in other.iter_checkpoint_rows(USER) for r in b.to_pylist())
    assert got == ["id0", "id1", "id4", "id5"]
    other.flush()
    for i in (0, 1, 4, 5):
        assert other.read_content(rows[i]["sha256"], rows[i]["chunks"], rows[i]["size"]) == datas[i]
    assert open_repository(t).upload_journal(USER, str(tmp_path / "no-such-dir")) == 0
    repo.drop_journal(str(work))
    assert [n for n in os.listdir(work) if n.startswith("journal-")] == []
