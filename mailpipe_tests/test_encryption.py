"""Client-side encryption (repository format 2), against real repositories: a local folder and S3 (moto's
server over a real socket), filled by end-to-end backups of the simulator.

What is proved, with expected values from the simulator's ground truth (never from what the code returns):
an encrypted backup round-trips byte-exact and still deduplicates; no subject, address, body text, UPN or
passphrase is readable in any stored object (the same scan finds them all in an unencrypted repository);
chunk names are keyed, not plain SHA-256; a wrong or missing passphrase is one clear line that never
echoes it; passphrases are changed without rewriting data; and any stored object altered or swapped is
an error, never wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mailpipe.config import EncryptionConfig, S3Config
from mailpipe.repo import IntegrityError, RepositoryError, open_repository
from mailpipe.repo.check import check_repository
from mailpipe.repo.export import safe_name
from mailpipe.repo.store import make_s3_client
from mailpipe.sim import SimConfig, start_simulator, write_tenants_file
from mailpipe_tests.conftest import make_tenant
from mailpipe_tests.damage import chunk_location, corrupt_chunk
from mailpipe_tests.helpers import backup, snapshot_items, truth_items

ENV = "MAILPIPE_TEST_REPO_PASSPHRASE"
PASS = "pp-Correct-Horse-7c1e9a5d"
OTHER = "pp-Other-Staple-41b2d0e8"
NEW = "pp-New-Battery-93ac55f1"
WRONG = "pp-Wrong-Guess-0a9f33c7"
PASSPHRASES = (PASS, OTHER, NEW, WRONG)
FAKE_USER = "22222222-0000-0000-0000-00000000e0e0"  # a mailbox written through the repository API


# -- where repositories live ---------------------------------------------------------------------------------
@dataclass
class Where:
    storage: str
    s3: S3Config
    s3_yaml: dict | None  # the tenants file's s3: block


def where(kind: str, request, tmp_path, name: str) -> Where:
    """A fresh repository location ``name``: a local folder, or a prefix of this test's S3 bucket."""
    if kind == "local":
        return Where(str(tmp_path / name), S3Config(), None)
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return Where(f"s3://{bucket}/{name}", S3Config(endpoint_url=endpoint, region="us-east-1"),
                 {"endpoint_url": endpoint, "region": "us-east-1"})


def tenant(sim, w: Where, *, encrypted: bool = True, env: str = ENV):
    return make_tenant(sim, w.storage, s3=w.s3, encryption=EncryptionConfig(env) if encrypted else None)


def tenants_file(tmp_path, sim, w: Where, *, encrypted: bool = True) -> str:
    extra: dict = {}
    if w.s3_yaml:
        extra["s3"] = w.s3_yaml
    if encrypted:
        extra["encryption"] = {"passphrase_env": ENV}
    return write_tenants_file(tmp_path / f"tenants-{uuid.uuid4().hex[:6]}.yaml", "t1", sim.graph_url, w.storage,
                              **extra)


def stored_objects(t, *, metadata: bool = False) -> dict[str, bytes]:
    """Every object of the tenant's storage, read around mailpipe: the files of the folder (dot files
    included), or every S3 object under the prefix; ``metadata``: the S3 objects' user metadata instead."""
    out: dict[str, bytes] = {}
    if t.storage.startswith("s3://"):
        bucket, _, prefix = t.storage[5:].partition("/")
        client = make_s3_client(t.s3.endpoint_url, "us-east-1")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                r = client.get_object(Bucket=bucket, Key=o["Key"])
                out[o["Key"][len(prefix) + 1:]] = json.dumps(r.get("Metadata") or {}).encode() if metadata \
                    else r["Body"].read()
        return out
    if metadata:
        return {}
    for dirpath, _, files in os.walk(t.storage):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, t.storage).replace(os.sep, "/")] = fh.read()
    return out


def snapshot_of_objects(t, prefix: str = "") -> dict[str, str]:
    """name → sha256 of every stored object whose name starts with ``prefix``."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in stored_objects(t).items() if k.startswith(prefix)}


# -- the plaintext scan ----------------------------------------------------------------------------------------
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def readable_forms(name: str, data: bytes) -> list[bytes]:
    """What anyone without the key can read of an object: its name, its bytes, every zstd frame anywhere in
    it decompressed (pack blobs and headers, index files), Parquet decoded (its pages are compressed), JSON
    with its \\u escapes undone."""
    forms = [name.encode(), data]
    view = memoryview(data)
    i = data.find(ZSTD_MAGIC)
    while i >= 0:
        try:
            forms.append(zstandard.ZstdDecompressor().decompressobj().decompress(view[i:]))
        except zstandard.ZstdError:
            pass
        i = data.find(ZSTD_MAGIC, i + 1)
    if data[:4] == b"PAR1":
        try:
            table = pq.read_table(pa.BufferReader(data))
            forms.append(json.dumps(table.to_pylist(), default=str, ensure_ascii=False).encode())
        except Exception:  # noqa: BLE001 - not readable as Parquet: its raw bytes were scanned
            pass
    try:
        forms.append(json.dumps(json.loads(data), ensure_ascii=False).encode())
    except ValueError:
        pass
    return forms


def body_needle(text: str, mime: bytes) -> bytes | None:
    """Five consecutive words of the body a person sees that are literally in the message's bytes."""
    words = text.split()
    for start in range(max(1, len(words) - 4)):
        cand = " ".join(words[start:start + 5]).encode()
        if len(cand) >= 16 and cand in mime:
            return cand
    return None


def plaintext_needles(sim, truth) -> dict[bytes, tuple[str, str]]:
    """needle → (kind, whose): every mailbox's UPN, and for every item its subject, every address and a
    piece of its body text (from the simulator's ground truth and its MIME), plus every passphrase."""
    needles: dict[bytes, tuple[str, str]] = {p.encode(): ("passphrase", "") for p in PASSPHRASES}
    for upn, mb in truth["mailboxes"].items():
        needles[upn.encode()] = ("upn", upn)
        model = sim.model.mailbox(upn)
        for it in mb["items"]:
            s = it["semantic"]
            if len(s["subject"]) >= 8:
                needles.setdefault(s["subject"].encode(), ("subject", it["id"]))
            for f in ("from", "sender", "to", "cc", "bcc", "reply_to"):
                for a in s[f]:
                    needles.setdefault(a.encode(), ("address", it["id"]))
            body = body_needle(s["body_text"], model.mime(model.msgs[it["id"]]))
            assert body, f"no body text of {it['id']} found in its MIME (test set-up)"
            needles.setdefault(body, ("body", it["id"]))
    return needles


def scan(t, needles) -> dict[bytes, list[str]]:
    """needle → the objects it is readable in."""
    hits: dict[bytes, list[str]] = {}
    meta = stored_objects(t, metadata=True)
    for name, data in stored_objects(t).items():
        forms = readable_forms(name, data) + [meta.get(name, b"")]
        for n in needles:
            if any(n in f for f in forms):
                hits.setdefault(n, []).append(name)
    return hits


# -- the command line ------------------------------------------------------------------------------------------
def cli(*args: str, tenants: str, passphrase: str | None = PASS, extra: dict | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update({"MAILPIPE_TENANTS": tenants, "MAILPIPE_GRAPH_RETRY_ATTEMPTS": "1", **(extra or {})})
    if passphrase is not None:
        env[ENV] = passphrase
    return subprocess.run([sys.executable, "-m", "mailpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def no_passphrase(text: str) -> None:
    for p in PASSPHRASES:
        assert p not in text, f"a passphrase is echoed: {text[:500]}"


def one_clear_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    err = out.stderr.strip()
    assert out.returncode != 0, out
    assert "Traceback" not in err, err
    no_passphrase(out.stdout + out.stderr)
    lines = [ln for ln in err.splitlines() if ln.startswith("mailpipe: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def mailbox_ids(truth) -> dict[str, str]:
    return {upn: mb["id"] for upn, mb in truth["mailboxes"].items()}


# == 1. round trip, incremental backups, export, check ==========================================================
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_an_encrypted_backup_round_trips_byte_exact(kind, request, sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=2, messages_per_mailbox=12, seed=3)
    monkeypatch.setenv(ENV, PASS)
    w = where(kind, request, tmp_path, "enc")
    t = tenant(sim, w)
    truth = sim.truth()
    upns = list(truth["mailboxes"])
    ids = mailbox_ids(truth)
    assert all(r.ok for r in backup(t, upns))
    info = json.loads(stored_objects(t)["mailpipe.json"])
    assert info["version"] == 2 and info["encryption"], info
    repo = open_repository(t, create=False)
    for upn in upns:
        assert snapshot_items(repo, ids[upn]) == truth_items(truth, upn)

    # nothing changed: nothing new is stored (every chunk is found by its keyed name)
    packs = snapshot_of_objects(t, "packs/")
    again = backup(t, upns)
    assert all(r.ok and r.bytes_stored_new == 0 for r in again), again
    assert snapshot_of_objects(t, "packs/") == packs

    # incremental: new mail, moves, deletes, flags
    for i, upn in enumerate(upns):
        sim.mutate(upn, random=6, seed=i + 1)
    truth2 = sim.truth()
    assert all(r.ok for r in backup(t, upns))
    repo = open_repository(t, create=False)
    for upn in upns:
        assert snapshot_items(repo, ids[upn]) == truth_items(truth2, upn)

    # `mailpipe export`: byte-identical .eml files, where the mailbox has them
    tf = tenants_file(tmp_path, sim, w)
    for upn in upns:
        out = tmp_path / f"export-{upn}"
        r = cli("export", "t1", upn, "--out", str(out), tenants=tf)
        assert r.returncode == 0, r.stderr
        no_passphrase(r.stdout + r.stderr)
        got = {}
        for dirpath, _, files in os.walk(out):
            for f in files:
                p = Path(dirpath, f)
                got[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
        want = {os.path.join(*[safe_name(x) for x in it["folder_path"]], safe_name(it["id"]) + ".eml"): it["sha256"]
                for it in truth2["mailboxes"][upn]["items"]}
        assert got == want

    # `mailpipe check --read-data`: clean
    r = cli("check", "t1", "--read-data", tenants=tf)
    no_passphrase(r.stdout + r.stderr)
    assert r.returncode == 0 and "no problems" in r.stderr, r.stdout + r.stderr


def test_dedup_across_mailboxes_still_works(sim_factory, tmp_path, monkeypatch):
    """A pool attachment two mailboxes hold is stored once: the same keyed chunks, one copy each, and the
    repository of both mailboxes is smaller than the two repositories of one mailbox by about its size."""
    sim = sim_factory(users=2, messages_per_mailbox=30, seed=3)
    monkeypatch.setenv(ENV, PASS)
    truth = sim.truth(semantic=True)
    holders: dict[tuple[str, int], dict[str, str]] = {}  # (attachment sha256, size) → upn → an item holding it
    for upn, mb in truth["mailboxes"].items():
        for it in mb["items"]:
            for a in it["semantic"]["attachments"]:
                holders.setdefault((a["sha256"], a["size"]), {}).setdefault(upn, it["id"])
    shared = {k: v for k, v in holders.items() if len(v) == 2 and k[1] >= 100_000}
    assert shared, "test set-up: the simulator (seed 3) shares a big pool attachment between two mailboxes"
    a_upn, b_upn = sorted(next(iter(shared.values())))
    shared = {k: v for k, v in shared.items() if set(v) == {a_upn, b_upn}}
    ids = mailbox_ids(truth)

    def pack_bytes(t) -> int:
        return sum(len(v) for k, v in stored_objects(t).items() if k.startswith("packs"))

    sizes = {}
    for name, upns in (("a", [a_upn]), ("b", [b_upn]), ("ab", [a_upn, b_upn])):
        t = make_tenant(sim, str(tmp_path / name), encryption=EncryptionConfig(ENV))
        assert all(r.ok for r in backup(t, upns))
        sizes[name] = pack_bytes(t)
    # base64 of random bytes compresses back to about the bytes' size: each shared one saves about that much
    saved = sizes["a"] + sizes["b"] - sizes["ab"]
    assert saved >= 0.9 * sum(size for _, size in shared), (sizes, shared)

    repo = open_repository(t, create=False)  # the repository of both
    rows = {}
    for upn in (a_upn, b_upn):
        for batch in repo.iter_manifest(ids[upn], "latest"):
            rows.update({r["item_id"]: r for r in batch.to_pylist()})
    for (_, size), items in shared.items():
        common = set(rows[items[a_upn]]["chunks"]) & set(rows[items[b_upn]]["chunks"])
        assert sum(repo.verify_chunk(h) for h in common) >= size * 4 // 3, "the attachment's chunks are shared"
        repo.sync_index()
        for h in common:
            assert len(repo.index.locations(h)) == 1, f"chunk {h} is stored more than once"


# == 2. nothing readable =====================================================================================
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_no_plaintext_in_any_stored_object(kind, request, sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=2, messages_per_mailbox=10, seed=5)
    monkeypatch.setenv(ENV, PASS)
    truth = sim.truth(semantic=True)
    upns = list(truth["mailboxes"])
    ids = mailbox_ids(truth)
    needles = plaintext_needles(sim, truth)
    kinds = [what for what, _ in needles.values()]
    assert all(kinds.count(k) >= 3 for k in ("upn", "subject", "address", "body", "passphrase")), kinds

    found = {}
    for encrypted in (True, False):
        t = tenant(sim, where(kind, request, tmp_path, "enc" if encrypted else "plain"), encrypted=encrypted)
        assert all(r.ok for r in backup(t, upns))
        repo = open_repository(t, create=False)
        # a backup is running: its lease (which names the mailbox's UPN) is in the store while we look
        leases = [repo.acquire_lease(ids[upn], upn, 120) for upn in upns]
        try:
            assert sum(k.endswith("/lease.json") for k in stored_objects(t)) == len(upns)
            found[encrypted] = scan(t, needles)
        finally:
            for lease in leases:
                lease.release()
    leaked = {needles[n]: where_ for n, where_ in found[True].items()}
    assert not leaked, f"readable in the encrypted repository: {dict(list(leaked.items())[:10])}"
    # the same scan finds everything in a repository without encryption (it can fail) — except passphrases
    missed = [what for n, what in needles.items() if n not in found[False] and what[0] != "passphrase"]
    assert not missed, missed[:10]


# == 3. chunk names ========================================================================================
def test_chunk_names_are_keyed_not_plain_sha256(sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=1, messages_per_mailbox=12, seed=3)
    truth = sim.truth()
    [upn] = list(truth["mailboxes"])[:1]
    uid = mailbox_ids(truth)[upn]

    def names_and_pieces(t):
        """(every chunk name the index lists, every chunk name the manifest lists, [(name, its bytes)])"""
        repo = open_repository(t, create=False)
        pairs = []
        listed = set()
        for batch in repo.iter_manifest(uid, "latest"):
            for r in batch.to_pylist():
                listed.update(r["chunks"])
                pieces = list(repo.iter_content(r["sha256"], r["chunks"], r["size"], item=r["item_id"]))
                assert len(pieces) == len(r["chunks"]) and hashlib.sha256(b"".join(pieces)).hexdigest() == r["sha256"]
                pairs += zip(r["chunks"], pieces)
        return set(repo.iter_chunk_names()), listed, pairs

    names = {}
    for label, pw, encrypted in (("one", PASS, True), ("two", OTHER, True), ("same-pass", PASS, True),
                                 ("plain", None, False)):
        if pw:
            monkeypatch.setenv(ENV, pw)
        t = make_tenant(sim, str(tmp_path / label), encryption=EncryptionConfig(ENV) if encrypted else None)
        assert all(r.ok for r in backup(t, [upn]))
        indexed, listed, pairs = names_and_pieces(t)
        assert listed <= indexed
        plain = {hashlib.sha256(p).hexdigest() for _, p in pairs}
        plain |= {i["sha256"] for i in truth["mailboxes"][upn]["items"]}
        if encrypted:
            assert not (indexed | listed) & plain, "a chunk is named by the plain SHA-256 of its content"
        else:  # the check can fail: without encryption a chunk's name is the SHA-256 of its bytes
            assert all(h == hashlib.sha256(p).hexdigest() for h, p in pairs)
        names[label] = listed
    # the same content, another repository: other names (another passphrase, or the same one)
    assert not names["one"] & names["two"]
    assert not names["one"] & names["same-pass"]
    assert len(names["one"]) == len(names["two"]) == len(names["plain"])


# == 4. wrong or missing passphrase ===========================================================================
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_wrong_or_missing_passphrase_is_one_clear_line(kind, request, sim_factory, tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    sim = sim_factory(users=1, messages_per_mailbox=4, seed=3)
    upn = list(sim.truth()["mailboxes"])[0]
    w = where(kind, request, tmp_path, "enc")
    t = tenant(sim, w)
    monkeypatch.setenv(ENV, PASS)
    assert all(r.ok for r in backup(t, [upn]))
    tf = tenants_file(tmp_path, sim, w)

    ok = cli("snapshots", "t1", tenants=tf)
    assert ok.returncode == 0 and upn in ok.stdout, ok.stderr
    no_passphrase(ok.stdout + ok.stderr)
    verbose = cli("backup", "t1", upn, "--verbose", tenants=tf)
    assert verbose.returncode == 0, verbose.stderr
    no_passphrase(verbose.stdout + verbose.stderr)

    one_clear_line(cli("snapshots", "t1", tenants=tf, passphrase=WRONG), "tenant t1", "wrong passphrase")
    one_clear_line(cli("backup", "t1", upn, tenants=tf, passphrase=WRONG), "tenant t1", "wrong passphrase")
    one_clear_line(cli("export", "t1", upn, "--out", str(tmp_path / "x"), tenants=tf, passphrase=WRONG),
                   "wrong passphrase")
    assert not (tmp_path / "x").exists()
    for missing in (None, ""):
        one_clear_line(cli("snapshots", "t1", tenants=tf, passphrase=missing), "tenant t1", ENV, "not set")

    monkeypatch.setenv(ENV, WRONG)
    with pytest.raises(RepositoryError) as e:
        open_repository(t, create=False)
    with pytest.raises(RepositoryError) as e2:
        backup(t, [upn])
    for err in (e.value, e2.value):
        text = "".join(traceback.format_exception(err)) + repr(err) + repr(err.__context__) + repr(err.__cause__)
        assert "wrong passphrase" in str(err) and "\n" not in str(err)
        no_passphrase(text)
    no_passphrase(caplog.text)
    # and no passphrase in the store
    assert not scan(t, {p.encode(): ("passphrase", "") for p in PASSPHRASES})


# == 5. passphrases: change, add, list, remove ============================================================
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_key_passwd_changes_the_passphrase_without_rewriting_data(kind, request, sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=1, messages_per_mailbox=6, seed=3)
    truth = sim.truth()
    upn = list(truth["mailboxes"])[0]
    w = where(kind, request, tmp_path, "enc")
    t = tenant(sim, w)
    monkeypatch.setenv(ENV, PASS)
    assert all(r.ok for r in backup(t, [upn]))
    tf = tenants_file(tmp_path, sim, w)
    before = snapshot_of_objects(t)

    r = cli("key", "passwd", "t1", "--new-passphrase-env", "MAILPIPE_TEST_NEW", tenants=tf,
            extra={"MAILPIPE_TEST_NEW": NEW})
    assert r.returncode == 0, r.stderr
    no_passphrase(r.stdout + r.stderr)
    after = snapshot_of_objects(t)
    keys_before = {k for k in before if k.startswith("keys/")}
    keys_after = {k for k in after if k.startswith("keys/")}
    assert len(keys_before) == len(keys_after) == 1 and keys_before != keys_after
    # not one data object rewritten: packs, index, snapshots… identical, names and bytes
    assert {k: v for k, v in after.items() if k not in keys_after} == {k: v for k, v in before.items()
                                                                        if k not in keys_before}
    assert any(k.startswith("packs/") for k in after)

    one_clear_line(cli("snapshots", "t1", tenants=tf, passphrase=PASS), "wrong passphrase")
    monkeypatch.setenv(ENV, PASS)
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        open_repository(t, create=False)
    monkeypatch.setenv(ENV, NEW)
    repo = open_repository(t, create=False)
    assert snapshot_items(repo, truth["mailboxes"][upn]["id"]) == truth_items(truth, upn)
    assert all(r.ok for r in backup(t, [upn]))  # and backups go on with the new one


def test_key_add_list_remove(sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(users=1, messages_per_mailbox=3, seed=3)
    truth = sim.truth()
    upn = list(truth["mailboxes"])[0]
    w = Where(str(tmp_path / "enc"), S3Config(), None)
    t = tenant(sim, w)
    monkeypatch.setenv(ENV, PASS)
    assert all(r.ok for r in backup(t, [upn]))
    tf = tenants_file(tmp_path, sim, w)
    data = {k: v for k, v in snapshot_of_objects(t).items() if not k.startswith("keys")}

    def key_ids(passphrase: str = PASS) -> list[str]:
        r = cli("key", "list", "t1", tenants=tf, passphrase=passphrase)
        assert r.returncode == 0, r.stderr
        no_passphrase(r.stdout + r.stderr)
        return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]

    [first] = key_ids()
    r = cli("key", "add", "t1", "--new-passphrase-env", "MAILPIPE_TEST_NEW", "--note", "in the safe", tenants=tf,
            extra={"MAILPIPE_TEST_NEW": OTHER})
    assert r.returncode == 0, r.stderr
    no_passphrase(r.stdout + r.stderr)
    ids = key_ids()
    assert len(ids) == 2 and first in ids
    [second] = [k for k in ids if k != first]
    listing = cli("key", "list", "t1", tenants=tf).stdout
    assert "in the safe" in [ln for ln in listing.splitlines() if ln.startswith(second)][0]
    for pw in (PASS, OTHER):  # both open it
        monkeypatch.setenv(ENV, pw)
        assert open_repository(t, create=False).list_snapshots(truth["mailboxes"][upn]["id"])

    # the only key the current passphrase opens is never removed
    one_clear_line(cli("key", "remove", "t1", first, tenants=tf, passphrase=PASS), first, "key add")
    one_clear_line(cli("key", "remove", "t1", "0123456789abcdef", tenants=tf), "no key")
    assert sorted(key_ids()) == sorted(ids)
    # with the other passphrase, the first key can go
    r = cli("key", "remove", "t1", first, tenants=tf, passphrase=OTHER)
    assert r.returncode == 0, r.stderr
    assert key_ids(OTHER) == [second]
    one_clear_line(cli("snapshots", "t1", tenants=tf, passphrase=PASS), "wrong passphrase")
    one_clear_line(cli("key", "remove", "t1", second, tenants=tf, passphrase=OTHER), second)
    assert key_ids(OTHER) == [second]
    assert {k: v for k, v in snapshot_of_objects(t).items() if not k.startswith("keys")} == data


# == 6. tampering ============================================================================================
@dataclass
class Built:
    t: object
    upns: list[str]
    ids: dict[str, str]
    expected: dict[tuple[str, str], dict[str, str]]  # (user id, snapshot id) → item id → sha256 (the truth)
    baseline: list[str]  # what `check --read-data` says of the untouched repository
    twins: tuple[str, str]  # two chunks of FAKE_USER's snapshot whose blobs have equal lengths, in one pack


@pytest.fixture(scope="module", params=["local", "s3"])
def built(request, tmp_path_factory):
    """An encrypted repository: two mailboxes with two snapshots each, plus a mailbox written through the
    repository API holding two items whose stored blobs have equal lengths, in one pack."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, PASS)
    sim = start_simulator(SimConfig(users=2, messages_per_mailbox=8, seed=3))
    try:
        if request.param == "local":
            w = Where(str(tmp_path_factory.mktemp("tamper") / "repo"), S3Config(), None)
        else:
            endpoint = request.getfixturevalue("s3_server")
            bucket = f"b-{uuid.uuid4().hex[:12]}"
            make_s3_client(endpoint, "us-east-1").create_bucket(Bucket=bucket)
            w = Where(f"s3://{bucket}/repo", S3Config(endpoint_url=endpoint, region="us-east-1"), None)
        t = tenant(sim, w)
        truth = sim.truth()
        upns = [u for u, mb in truth["mailboxes"].items() if mb["items"]][:2]
        ids = mailbox_ids(truth)
        expected = {}
        for round_ in range(2):
            if round_:
                for i, upn in enumerate(upns):
                    sim.mutate(upn, random=4, seed=10 + i)
                truth = sim.truth()
            for r in backup(t, upns):
                assert r.ok, r.error
                expected[(r.user_id, r.snapshot_id)] = {k: v[1] for k, v in truth_items(truth, r.upn).items()}
        repo = open_repository(t, create=False)
        a, b = os.urandom(5000), os.urandom(5000)
        rows = []
        for n, data in (("1", a), ("2", b)):
            st = repo.put_content(data)
            rows.append({"item_id": f"item-{n}", "folder_id": "inbox", "folder_path": ["Inbox"], "size": st.size,
                         "sha256": st.sha256, "chunks": st.chunks})
        wr = repo.begin_snapshot(FAKE_USER, "fake@x.example")
        wr.add_items(rows)
        wr.set_folders([{"folder_id": "inbox", "display_name": "Inbox", "path": ["Inbox"]}])
        info = wr.commit(delta_links={}, stats={}, skipped=[])
        expected[(FAKE_USER, info.snapshot_id)] = {"item-1": hashlib.sha256(a).hexdigest(),
                                                    "item-2": hashlib.sha256(b).hexdigest()}
        twins = (rows[0]["chunks"][0], rows[1]["chunks"][0])
        (p1, _, n1), (p2, _, n2) = chunk_location(repo, twins[0]), chunk_location(repo, twins[1])
        assert p1 == p2 and n1 == n2, "test set-up: two blobs of equal length in one pack"
        yield Built(t, upns, ids, expected, check_problems(t), twins)
    finally:
        sim.stop()
        mp.undo()


def check_problems(t) -> list[str]:
    repo = open_repository(t, create=False)
    return check_repository(repo, repo.list_mailboxes(), read_data=True, mark_damaged=False).problems


def read_everything(b: Built) -> int:
    """Read every item of every snapshot: each either raises (counted) or gives exactly the truth's bytes."""
    repo = open_repository(b.t, create=False)
    errors = 0
    for (uid, sid), want in b.expected.items():
        got: dict[str, str] = {}
        failed = 0
        try:
            repo.read_folders(uid, sid)
            for batch in repo.iter_manifest(uid, sid):
                for r in batch.to_pylist():
                    try:
                        data = repo.read_content(r["sha256"], r["chunks"], r["size"], item=r["item_id"])
                    except IntegrityError:
                        failed += 1
                        continue
                    got[r["item_id"]] = hashlib.sha256(data).hexdigest()
        except (IntegrityError, RepositoryError):
            failed += 1
        assert all(want.get(k) == v for k, v in got.items()), f"wrong bytes read from snapshot {sid}"
        if not failed:
            assert got == want, f"snapshot {sid} does not hold what the mailbox held"
        errors += failed
    return errors


def new_problems(b: Built) -> list[str]:
    return [p for p in check_problems(b.t) if p not in b.baseline]


def replace(store, key: str, data: bytes):
    good = store.get_bytes(key)
    store.put_bytes(key, data)
    return lambda: store.put_bytes(key, good)


def flip(store, key: str, at: float = 0.5):
    data = bytearray(store.get_bytes(key))
    data[int(len(data) * at) % len(data)] ^= 0x01
    return replace(store, key, bytes(data))


def snap_key(b: Built, upn_index: int, which: int, name: str) -> tuple[str, str]:
    """(key, snapshot id) of file ``name`` of snapshot ``which`` (0: first, -1: latest) of a mailbox."""
    repo = open_repository(b.t, create=False)
    uid = b.ids[b.upns[upn_index]]
    sid = repo.snapshot_ids(uid)[which]
    return f"{repo._snap_prefix(uid)}/{sid}/{name}", sid


def tampered(b: Built, undo) -> tuple[list[str], int]:
    """(the new check problems, read errors) while tampered; then undone (the original bytes put back)."""
    try:
        return new_problems(b), read_everything(b)
    finally:
        undo()


def test_the_untouched_repository_reads_and_checks_clean(built):
    assert read_everything(built) == 0
    assert built.baseline == []


def test_a_flipped_byte_in_a_pack_blob(built):
    repo = open_repository(built.t, create=False)
    h = built.twins[0]
    problems, errors = tampered(built, corrupt_chunk(repo, h))
    assert errors == 1 and any(h in p for p in problems), problems


def test_a_flipped_byte_in_a_pack_header(built):
    """The header is what an index is rebuilt from: `check --read-data` must notice it is damaged."""
    repo = open_repository(built.t, create=False)
    pid, off, n = chunk_location(repo, built.twins[0])
    key = f"packs/{pid[:2]}/{pid}"
    data = bytearray(repo.store.get_bytes(key))
    header_len = int.from_bytes(data[-8:-4], "little")
    data[len(data) - 8 - header_len // 2] ^= 0x01
    problems, errors = tampered(built, replace(repo.store, key, bytes(data)))
    assert errors == 0  # the blobs are intact: every item still reads right
    assert any(pid in p for p in problems), f"a damaged pack header goes unnoticed by check --read-data: {problems}"


def test_a_flipped_byte_in_an_index_file(built):
    repo = open_repository(built.t, create=False)
    pid, _, _ = chunk_location(repo, built.twins[0])
    [name] = repo.index.files_of_packs([pid])
    problems, errors = tampered(built, flip(repo.store, f"index/{name[:2]}/{name}"))
    assert errors >= 1 and any(built.twins[0] in p for p in problems), problems


@pytest.mark.parametrize("name,at", [("snapshot.json", 0.02), ("snapshot.json", 0.5), ("snapshot.json", 0.98),
                                     ("manifest.parquet", 0.02), ("manifest.parquet", 0.98), ("folders.parquet", 0.5)])
def test_a_flipped_byte_in_a_snapshot_file(built, name, at):
    """(nonce, ciphertext, tag; a sealed stream's header and last segment)"""
    repo = open_repository(built.t, create=False)
    key, sid = snap_key(built, 0, -1, name)
    problems, errors = tampered(built, flip(repo.store, key, at))
    assert errors >= 1 and any(sid in p for p in problems), problems


def test_swapped_blobs_inside_a_pack(built):
    repo = open_repository(built.t, create=False)
    (pid, o1, n), (_, o2, _) = chunk_location(repo, built.twins[0]), chunk_location(repo, built.twins[1])
    key = f"packs/{pid[:2]}/{pid}"
    data = bytearray(repo.store.get_bytes(key))
    data[o1:o1 + n], data[o2:o2 + n] = data[o2:o2 + n], data[o1:o1 + n]
    problems, errors = tampered(built, replace(repo.store, key, bytes(data)))
    assert errors == 2 and all(any(h in p for p in problems) for h in built.twins), problems


@pytest.mark.parametrize("name", ["snapshot.json", "manifest.parquet", "folders.parquet"])
@pytest.mark.parametrize("pair", ["two mailboxes", "two snapshots of a mailbox"])
def test_swapped_snapshot_files(built, name, pair):
    repo = open_repository(built.t, create=False)
    k1, s1 = snap_key(built, 0, -1, name)
    k2, s2 = snap_key(built, 1, -1, name) if pair == "two mailboxes" else snap_key(built, 0, 0, name)
    d1, d2 = repo.store.get_bytes(k1), repo.store.get_bytes(k2)
    undo1 = replace(repo.store, k1, d2)
    undo2 = replace(repo.store, k2, d1)

    def undo():
        undo1()
        undo2()

    problems, errors = tampered(built, undo)
    assert errors >= 2 and any(s1 in p for p in problems) and any(s2 in p for p in problems), problems


def test_a_snapshot_copied_into_another_mailbox(built):
    """A whole committed snapshot of one mailbox replayed as another's: unreadable there."""
    repo = open_repository(built.t, create=False)
    src = f"{repo._snap_prefix(built.ids[built.upns[0]])}/"
    dst_prefix = repo._snap_prefix(built.ids[built.upns[1]])
    copied = []
    for key in list(repo.store.list(src)):
        new = f"{dst_prefix}/{key[len(src):]}"
        repo.store.put_bytes(new, repo.store.get_bytes(key))
        copied.append(new)
    sids = {k.split("/")[-2] for k in copied}

    def undo():
        for k in copied:
            repo.store.delete(k)
        for sid in sids:
            repo.store.remove_empty(f"{dst_prefix}/{sid}")

    uid = built.ids[built.upns[1]]
    try:
        scanned = repo.scan_snapshots(uid)
        assert all(info is None for sid, info, _ in scanned if sid in sids) and sids <= {s for s, _, _ in scanned}
        for sid in sids:
            with pytest.raises(RepositoryError, match="damaged"):
                repo.read_snapshot(uid, sid)
        problems = new_problems(built)
        assert all(any(sid in p for p in problems) for sid in sids), problems
    finally:
        undo()
    assert read_everything(built) == 0


def test_a_damaged_or_swapped_checkpoint_part_is_never_read(built):
    repo = open_repository(built.t, create=False)
    uid0, uid1 = built.ids[built.upns[0]], built.ids[built.upns[1]]
    rows = [{k: r[k] for k in ("item_id", "change_key", "is_draft", "sha256", "chunks", "size")}
            for batch in repo.iter_manifest(uid0, "latest") for r in batch.to_pylist()]
    name = repo.write_checkpoint(uid0, rows)
    key = f"{repo._ckpt_prefix(uid0)}/{name}"
    try:
        assert sum(b.num_rows for b in repo.iter_checkpoint_rows(uid0)) == len(rows)
        undo = flip(repo.store, key)
        with pytest.raises(IntegrityError):
            list(repo._iter_parquet(key, 1000, None))
        assert not list(repo.iter_checkpoint_rows(uid0))  # skipped, not misread
        undo()
        # the part moved to another mailbox does not open there
        other = f"{repo._ckpt_prefix(uid1)}/{name}"
        repo.store.put_bytes(other, repo.store.get_bytes(key))
        try:
            with pytest.raises(IntegrityError):
                list(repo._iter_parquet(other, 1000, None))
            assert not list(repo.iter_checkpoint_rows(uid1))
        finally:
            repo.store.delete(other)
    finally:
        repo.clear_checkpoints(uid0)


def test_a_flipped_byte_anywhere_in_a_key_file(built):
    """Every byte of a key file counts (its kdf parameters, salt, id, date and note too: `key list` shows
    them, and someone choosing which key to remove trusts them)."""
    repo = open_repository(built.t, create=False)
    [key] = list(repo.store.list("keys"))
    good = repo.store.get_bytes(key)
    doc = json.loads(good)
    assert set(doc) >= {"id", "kdf", "n", "r", "p", "salt", "wrapped", "created_at", "note"}
    offsets = {0, len(good) - 1}  # every field's name, and the middle of its value
    for name, value in doc.items():
        at = good.index(f'"{name}":'.encode())
        v = json.dumps(value).encode()
        offsets |= {at + 1, good.index(v, at) + len(v) // 2}
    accepted = []
    try:
        for i in sorted(offsets):
            data = bytearray(good)
            data[i] ^= 0x01
            repo.store.put_bytes(key, bytes(data))
            try:
                open_repository(built.t, create=False)
                accepted.append(f"{i}: {good[max(0, i - 12):i + 12]!r}")
            except RepositoryError as e:
                assert "\n" not in str(e)
                no_passphrase(str(e))
    finally:
        repo.store.put_bytes(key, good)
    assert not accepted, f"a key file altered at these offsets still opens: {accepted[:5]}"
    assert read_everything(built) == 0


def test_encryption_must_match_the_repository(sim_factory, tmp_path, monkeypatch):
    """An encrypted repository opened without `encryption:`, an unencrypted one with it, and an encrypted one
    whose mailpipe.json was edited to say it is not: clear errors, never wrong bytes."""
    sim = sim_factory(users=1, messages_per_mailbox=4, seed=3)
    upn = list(sim.truth()["mailboxes"])[0]
    monkeypatch.setenv(ENV, PASS)
    enc, plain = Where(str(tmp_path / "enc"), S3Config(), None), Where(str(tmp_path / "plain"), S3Config(), None)
    assert all(r.ok for r in backup(tenant(sim, enc), [upn]))
    assert all(r.ok for r in backup(tenant(sim, plain, encrypted=False), [upn]))

    with pytest.raises(RepositoryError, match="is encrypted: configure the tenant's encryption.passphrase_env"):
        open_repository(tenant(sim, enc, encrypted=False), create=False)
    with pytest.raises(RepositoryError, match="created without encryption"):
        open_repository(tenant(sim, plain), create=False)
    one_clear_line(cli("snapshots", "t1", tenants=tenants_file(tmp_path, sim, enc, encrypted=False)),
                   "is encrypted", "encryption.passphrase_env")
    one_clear_line(cli("backup", "t1", upn, tenants=tenants_file(tmp_path, sim, plain)), "created without encryption")
    with pytest.raises(RepositoryError, match="is encrypted"):
        backup(tenant(sim, enc, encrypted=False), [upn])

    # mailpipe.json edited to drop the encryption: refused with it configured; without, nothing reads as data
    path = tmp_path / "enc" / "mailpipe.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "encryption": None}))
    with pytest.raises(RepositoryError, match="created without encryption"):
        open_repository(tenant(sim, enc), create=False)
    repo = open_repository(tenant(sim, enc, encrypted=False), create=False)
    uid = sim.truth()["mailboxes"][upn]["id"]
    scanned = repo.scan_snapshots(uid)
    assert scanned and all(info is None for _, info, _ in scanned)
