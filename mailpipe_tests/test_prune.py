"""Prune: frees exactly what no snapshot needs, safely while backups run, and survives being killed."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from mailpipe.backup import backup_mailboxes
from mailpipe.config import S3Config, TenantConfig
from mailpipe.repo import open_repository
from mailpipe.repo.check import check_repository
from mailpipe.repo.packs import pack_key
from mailpipe.repo.prune import prune
from mailpipe.repo.repository import Repository
from mailpipe.repo.store import ObjectLocked
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.helpers import FAST, TEST_SETTINGS, backup, mailbox_upns, snapshot_items, truth_items

FAST_PRUNE = {"safety_seconds": 0, "clock_margin": 0}  # both passes in one test: no waiting for the clock


def _tenant(where, tmp_path, request) -> TenantConfig:
    from mailpipe.config import AuthConfig

    if where == "local":
        storage, s3 = str(tmp_path / "repo"), S3Config()
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        storage, s3 = f"s3://{bucket}/r", S3Config(endpoint_url=endpoint, region="us-east-1")
    return TenantConfig(name="t1", tenant_id="11111111-1111-1111-1111-111111111111",
                        client_id="22222222-2222-2222-2222-222222222222", auth=AuthConfig(simulator=True),
                        storage=storage, s3=s3)


def _users(sim) -> list[str]:
    return [u for u in mailbox_upns(sim) if not u.startswith(("shared-", "nomailbox"))]


def _msg(i: int, rng: random.Random, size: int = 6000) -> bytes:
    return (f"Subject: m{i}\r\nMessage-ID: <{i}@x>\r\n\r\n".encode() + rng.randbytes(size).hex().encode())


def _snapshot(repo: Repository, uid: str, upn: str, items: dict[str, bytes]) -> str:
    rows = []
    for item_id, data in items.items():
        st = repo.put_content(data)
        rows.append({"item_id": item_id, "folder_id": "F", "folder_path": ["Inbox"], "size": st.size,
                     "sha256": st.sha256, "chunks": st.chunks})
    w = repo.begin_snapshot(uid, upn)
    w.add_items(rows)
    w.set_folders([{"folder_id": "F", "parent_id": None, "display_name": "Inbox", "path": ["Inbox"]}])
    return w.commit(delta_links={}, stats={}, skipped=[]).snapshot_id


def _chunks_of(repo: Repository, items: dict[str, bytes]) -> set[str]:
    from mailpipe.repo import chunking

    return {repo.chunk_id(p) for d in items.values() for p in chunking.split(d)}


def _whole(repo: Repository) -> None:
    res = check_repository(repo, repo.list_mailboxes(), read_data=True, mark_damaged=False)
    assert res.ok, res.problems[:5]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prune_frees_exactly_the_unreferenced_chunks_in_two_passes(where, tmp_path, request):
    repo = open_repository(_tenant(where, tmp_path, request))
    rng = random.Random(1)
    shared = {f"s{i}": _msg(i, rng) for i in range(5)}
    only_old = {f"o{i}": _msg(100 + i, rng) for i in range(30)}
    newer = {f"n{i}": _msg(200 + i, rng) for i in range(10)}
    old_sid = _snapshot(repo, "u1", "a@x", {**shared, **only_old})
    _snapshot(repo, "u1", "a@x", {**shared, **newer})
    _snapshot(repo, "u2", "b@x", shared)
    before = set(repo.iter_chunk_names())
    assert _chunks_of(repo, {**shared, **only_old, **newer}) <= before
    repo.delete_snapshot("u1", old_sid)  # what forget does

    first = prune(repo, **FAST_PRUNE)
    assert first.planned_packs >= 1 and first.deleted_packs == 0 and first.plan_id
    assert set(repo.iter_chunk_names()) == before  # the first pass deletes nothing
    second = prune(repo, **FAST_PRUNE)
    assert second.deleted_packs >= 1 and second.freed_bytes > 0 and not second.waiting
    after = set(repo.iter_chunk_names())
    assert after == _chunks_of(repo, {**shared, **newer})  # exactly the referenced ones are left
    assert first.plan_id not in {p["id"] for p in repo.prune_plans()}  # carried out, and removed
    _whole(repo)
    # with no safety age, the same run may already plan to merge the small packs its copies made: carrying
    # such plans out never loses a referenced chunk nor keeps an unreferenced one
    for _ in range(3):
        prune(repo, **FAST_PRUNE)
        assert set(repo.iter_chunk_names()) == after
    _whole(repo)


def test_dry_run_writes_nothing(tmp_path, request):
    repo = open_repository(_tenant("local", tmp_path, request))
    rng = random.Random(2)
    sid = _snapshot(repo, "u1", "a@x", {f"o{i}": _msg(i, rng) for i in range(10)})
    _snapshot(repo, "u1", "a@x", {"n": _msg(99, rng)})
    repo.delete_snapshot("u1", sid)
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "repo").rglob("*") if p.is_file())
    res = prune(repo, dry_run=True, **FAST_PRUNE)
    assert res.planned_packs >= 1 and res.dry_run and "would plan" in res.summary()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "repo").rglob("*") if p.is_file()) == files


def test_the_second_pass_waits_for_the_safety_delay_and_for_backups_older_than_the_plan(tmp_path, request):
    repo = open_repository(_tenant("local", tmp_path, request))
    rng = random.Random(3)
    sid = _snapshot(repo, "u1", "a@x", {f"o{i}": _msg(i, rng) for i in range(10)})
    _snapshot(repo, "u1", "a@x", {"n": _msg(99, rng)})
    repo.delete_snapshot("u1", sid)
    lease = repo.acquire_lease("u2", "b@x", 60)  # a backup of another mailbox, started before the plan
    assert prune(repo, safety_seconds=0, clock_margin=0).plan_id
    held = prune(repo, safety_seconds=0, clock_margin=0)
    assert held.deleted_packs == 0 and any("b@x" in w for w in held.waiting), held.waiting
    lease.release()
    assert prune(repo, safety_seconds=3600, clock_margin=0).deleted_packs == 0  # not yet: the safety delay
    assert prune(repo, safety_seconds=0, clock_margin=0).deleted_packs >= 1
    _whole(repo)


def test_a_process_that_knew_a_chunk_stores_it_again_once_a_plan_names_its_pack(tmp_path, request):
    """The known-chunk cache of a long-lived process cannot be fooled: a mailbox backup that starts after a
    plan (refresh_for_backup, called once its lease is held) never reuses a chunk of a planned pack."""
    t = _tenant("local", tmp_path, request)
    repo = open_repository(t)
    rng = random.Random(4)
    data = _msg(1, rng)
    sid = _snapshot(repo, "u1", "a@x", {"a": data})
    _snapshot(repo, "u1", "a@x", {"b": _msg(2, rng)})
    repo.delete_snapshot("u1", sid)
    assert repo.put_content(data).new_chunks == 0  # known: stored
    prune(open_repository(t), **FAST_PRUNE)  # another process plans that pack
    repo.refresh_for_backup()
    assert repo.put_content(data).new_chunks == 1  # stored again, in a pack no plan names
    repo.flush()
    assert prune(open_repository(t), **FAST_PRUNE).deleted_packs >= 1
    assert repo.read_content(repo.put_content(data).sha256, repo.put_content(data).chunks, len(data)) == data


class _Pause:
    """Pause a backup inside put_content, once, right after an item for which ``when(stored)`` is true
    (e.g. all its chunks were already stored: the window prune must respect), until released."""

    def __init__(self, monkeypatch, when) -> None:
        self.found = threading.Event()
        self.go = threading.Event()
        original = Repository.put_content
        pause = self

        def put_content(repo, data):
            res = original(repo, data)
            if when(res) and not pause.found.is_set():
                pause.found.set()
                assert pause.go.wait(120), "the test never released the backup"
            return res

        monkeypatch.setattr(Repository, "put_content", put_content)


def _run_backup_in_thread(t, upn, out: list) -> threading.Thread:
    runner = threading.Thread(target=lambda: out.append(asyncio.run(backup_mailboxes(
        t, [upn], settings=TEST_SETTINGS, graph_options=FAST))))
    runner.start()
    return runner


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_prune_racing_a_running_backup_leaves_a_whole_repository(where, sim_factory, tmp_path, request,
                                                                     monkeypatch):
    """A backup finds a chunk "already stored" (its only snapshot was just forgotten) and pauses; prune plans
    that chunk's pack and runs its second pass to completion; the backup resumes and commits. The next
    prune completes the plan: the chunks the backup reused are kept (copied), and check --read-data is
    clean. Then the other order: a plan first, then a backup that is running while the packs are deleted."""
    sim = sim_factory(users=1, messages_per_mailbox=30, seed=21)
    upn = _users(sim)[0]
    base = _tenant(where, tmp_path, request)
    t = make_tenant(sim, base.storage, s3=base.s3)
    [r1] = backup(t, [upn])
    repo = open_repository(t)
    for sid in repo.snapshot_ids(r1.user_id):
        repo.delete_snapshot(r1.user_id, sid)  # forgotten: every chunk is unreferenced now
    with monkeypatch.context() as m:
        pause = _Pause(m, lambda res: res.new_chunks == 0)
        out: list = []
        runner = _run_backup_in_thread(t, upn, out)
        assert pause.found.wait(120), "the backup never met a stored chunk"
        first = prune(open_repository(t), **FAST_PRUNE)  # plans every pack (none is referenced)
        assert first.planned_packs >= 1
        second = prune(open_repository(t), **FAST_PRUNE)  # runs to completion; the backup is older: waits
        assert second.deleted_packs == 0 and second.waiting, second.summary()
        pause.go.set()
        runner.join(300)
    [r2] = out[0]
    assert r2.ok, r2.error
    third = prune(open_repository(t), **FAST_PRUNE)
    assert third.deleted_packs >= 1 and third.repacked_chunks >= 1, third.summary()  # what it reused: copied
    repo = open_repository(t)
    _whole(repo)
    assert snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)

    # the other order: the plan first; a backup that starts now cannot reuse the planned packs
    for sid in repo.snapshot_ids(r1.user_id):
        repo.delete_snapshot(r1.user_id, sid)
    assert prune(open_repository(t), **FAST_PRUNE).planned_packs >= 1
    with monkeypatch.context() as m:
        pause = _Pause(m, lambda res: True)
        out = []
        runner = _run_backup_in_thread(t, upn, out)
        assert pause.found.wait(120)
        done = prune(open_repository(t), **FAST_PRUNE)  # its lease is younger than the plan: deleted now
        assert done.deleted_packs >= 1 and not done.waiting, done.summary()
        pause.go.set()
        runner.join(300)
    [r3] = out[0]
    assert r3.ok and r3.bytes_stored_new > 0, r3.error
    repo = open_repository(t)
    _whole(repo)
    assert snapshot_items(repo, r3.user_id) == truth_items(sim.truth(), upn)


class _Killed(Exception):
    pass


def test_a_prune_killed_at_any_point_leaves_a_whole_repository(tmp_path, request, monkeypatch):
    """The second pass is stopped after its 1st, 2nd, … store operation (as a SIGKILL would stop it);
    after each, the repository is whole, and a later prune finishes the job."""
    t = _tenant("local", tmp_path, request)
    repo = open_repository(t)
    rng = random.Random(5)
    shared = {f"s{i}": _msg(i, rng) for i in range(8)}
    gone = {f"g{i}": _msg(50 + i, rng) for i in range(8)}
    sid = _snapshot(repo, "u1", "a@x", {**shared, **gone})
    _snapshot(repo, "u1", "a@x", shared)  # the pack holds live and dead chunks: repack, not just delete
    repo.delete_snapshot("u1", sid)
    assert prune(open_repository(t), **FAST_PRUNE).planned_packs >= 1
    store_cls = type(repo.store)
    ops = ("put_bytes", "put_file", "delete")
    n = 1
    while True:
        calls = {"n": 0}
        originals = {op: getattr(store_cls, op) for op in ops}

        def counting(op):
            def f(self, *a, **kw):
                calls["n"] += 1
                if calls["n"] == n:
                    raise _Killed(f"killed at store operation {n} ({op})")
                return originals[op](self, *a, **kw)
            return f

        for op in ops:
            monkeypatch.setattr(store_cls, op, counting(op))
        try:
            prune(open_repository(t), **FAST_PRUNE)
            finished = True
        except _Killed:
            finished = False
        for op in ops:
            monkeypatch.setattr(store_cls, op, originals[op])
        fresh = open_repository(t)
        _whole(fresh)
        assert set(fresh.iter_chunk_names()) >= _chunks_of(fresh, shared)
        if finished:
            break
        n += 1
    assert n > 3  # it was stopped at every step of a real second pass
    final = open_repository(t)
    for _ in range(3):  # the pass that finished may have planned the small pack its copies made: complete it
        if not final.prune_plans():
            break
        prune(final, **FAST_PRUNE)
    assert final.prune_plans() == []
    assert set(final.iter_chunk_names()) == _chunks_of(final, shared)
    _whole(final)


def test_erasing_a_mailbox_leaves_no_chunk_only_it_referenced(tmp_path, request):
    from mailpipe.repo.forget import forget

    t = _tenant("local", tmp_path, request)
    repo = open_repository(t)
    rng = random.Random(6)
    shared = {f"s{i}": _msg(i, rng) for i in range(4)}
    mine = {f"m{i}": _msg(40 + i, rng) for i in range(12)}
    _snapshot(repo, "u1", "leaver@x", {**shared, **mine})
    _snapshot(repo, "u1", "leaver@x", {**shared, **mine, "m99": _msg(99, rng)})
    _snapshot(repo, "u2", "stays@x", shared)
    repo.write_restore_plan("u1", "ab" * 8, {"source": "u2", "snapshot_id": "x", "target": "u1"})
    repo.write_restore_result("u1", "ab" * 8, {"restored": 3})  # a finished restore into the leaver
    res = forget(repo, t, "leaver@x", erase=True)
    assert res.ok, res.summary()
    assert list(repo.store.list("mailboxes/u1")) == []  # nothing of the mailbox is left but its chunks
    prune(repo, **FAST_PRUNE)
    prune(repo, **FAST_PRUNE)
    left = set(repo.iter_chunk_names())
    assert left == _chunks_of(repo, shared)
    # not even in a pack file: the leaver's bytes are gone from the store
    for pid in repo.index.packs():
        data = repo.store.get_bytes(pack_key(pid))
        assert all(body.split(b"\r\n\r\n", 1)[1][:64] not in data for body in mine.values())
    _whole(repo)


def test_leftovers_of_dead_writers_are_collected(tmp_path, request):
    t = _tenant("local", tmp_path, request)
    repo = open_repository(t)
    rng = random.Random(7)
    _snapshot(repo, "u1", "a@x", {"a": _msg(1, rng)})
    # a backup that died: an uncommitted snapshot folder, a checkpoint older than the latest commit, and a
    # pack uploaded without its index
    repo.store.put_bytes("mailboxes/u1/snapshots/20200101T000000.000000Z-abcdef/manifest.parquet", b"PAR1")
    repo.store.put_bytes("mailboxes/u1/checkpoints/20200101T000000.000000Z-abcdef12.parquet", b"PAR1")
    repo.store.put_bytes(pack_key("ab" * 32), b"orphan")
    res = prune(repo, **FAST_PRUNE)
    assert res.orphan_packs_deleted == 1 and res.leftovers_removed >= 2, res.summary()
    assert not repo.store.exists(pack_key("ab" * 32))
    assert list(repo.store.list("mailboxes/u1/checkpoints")) == []
    _whole(repo)


def test_packs_under_object_lock_survive_prune_and_deletes(sim_factory, request):
    from mailpipe.config import ObjectLockConfig

    endpoint, bucket, raw = request.getfixturevalue("lock_bucket")
    sim = sim_factory(users=1, messages_per_mailbox=15, seed=9)
    upn = _users(sim)[0]
    t = make_tenant(sim, f"s3://{bucket}/p", s3=S3Config(endpoint_url=endpoint, region="us-east-1",
                                                         object_lock=ObjectLockConfig("GOVERNANCE", 30)))
    [r] = backup(t, [upn])
    repo = open_repository(t)
    repo.sync_index()
    packs = list(repo.index.packs())
    assert packs
    with pytest.raises(ObjectLocked):
        repo.store.delete(pack_key(packs[0]))
    with pytest.raises(ObjectLocked):
        repo.delete_snapshot(r.user_id, r.snapshot_id)  # forget cannot remove a locked snapshot either
    prune(repo, **FAST_PRUNE)
    res2 = prune(repo, **FAST_PRUNE)
    assert res2.deleted_packs == 0
    assert all(repo.store.exists(pack_key(p)) for p in packs)
    _whole(repo)


from mailpipe_tests.test_object_lock import lock_bucket  # noqa: E402,F401  (fixture)


def test_a_version_1_repository_is_refused_clearly_then_migrated_whole(tmp_path, request):
    """A version-1 repository (one object per chunk under blobs/) is refused with the command that converts
    it; `mailpipe migrate` converts it; every snapshot then reads back byte-exact."""
    import json
    import os
    import subprocess
    import sys

    from mailpipe.repo.migrate import migrate_v1
    from mailpipe.repo.repository import RepositoryError

    t = _tenant("local", tmp_path, request)
    repo = open_repository(t)
    rng = random.Random(8)
    items = {f"i{i}": _msg(i, rng) for i in range(12)}
    _snapshot(repo, "u1", "a@x", items)
    # rewrite it as version 1 wrote it: blobs/<h[:2]>/<h> (a zstd frame each), no packs, no index
    for h in repo.iter_chunk_names():
        pid, off, n = repo.index.locations(h)[0]
        repo.store.put_bytes(f"blobs/{h[:2]}/{h}", repo.store.get_range(pack_key(pid), off, n))
    for prefix in ("packs", "index"):
        for key in list(repo.store.list(prefix)):
            repo.store.delete(key)
    info = json.loads(repo.store.get_bytes("mailpipe.json"))
    for k in ("id", "packs", "encryption"):
        info.pop(k)
    repo.store.put_bytes("mailpipe.json", json.dumps({**info, "version": 1}).encode())
    with pytest.raises(RepositoryError, match="mailpipe migrate t1"):
        open_repository(t)
    tfile = tmp_path / "tenants.yaml"
    tfile.write_text(f"tenants:\n  - name: t1\n    tenant_id: {t.tenant_id}\n    client_id: {t.client_id}\n"
                     f"    auth: {{simulator: true}}\n    graph_url: http://127.0.0.1:9/v1.0\n    storage: {t.storage}\n")
    env = {**os.environ, "MAILPIPE_TENANTS": str(tfile), "MAILPIPE_WORK_DIR": str(tmp_path / "work")}
    out = subprocess.run([sys.executable, "-m", "mailpipe", "snapshots", "t1"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "mailpipe migrate t1" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "mailpipe", "migrate", "t1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "migrated to format version 2" in out.stderr, out.stderr
    assert "nothing to do" in migrate_v1(t)
    repo = open_repository(t)
    assert list(repo.store.list("blobs")) == []
    sid = repo.snapshot_ids("u1")[-1]
    for b in repo.iter_manifest("u1", sid):
        for r in b.to_pylist():
            assert repo.read_content(r["sha256"], r["chunks"], r["size"]) == items[r["item_id"]]
    _whole(repo)
    out = subprocess.run([sys.executable, "-m", "mailpipe", "prune", "t1", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "dry run" in out.stdout and "nothing to prune" in out.stdout, out
