"""Retention and forget: the policy rules (restic's forget --keep-*, calendar periods in the tenant's time
zone), the tenants-file shape, and forget end to end on real repositories (local folder and moto S3).

Every expected value below is worked out by hand from the rules in docs/CONFIG.md ("Retention"): walk the
snapshots newest first; a count rule keeps a snapshot when it opens a period the rule has not seen yet and
the rule has counts left, and — restic ≥ 0.17 — the oldest snapshot when counts are left at the end;
``within`` keeps what was committed strictly after (newest − duration). The calendar facts used (ISO weeks,
DST dates, local times) were checked with GNU date, e.g. ``TZ=Europe/Berlin date -d 2026-03-29T01:00Z``.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest
import yaml

from mailpipe.config import ConfigError, S3Config, parse_tenants
from mailpipe.errors import UserError
from mailpipe.repo import open_repository, repository
from mailpipe.repo.forget import forget
from mailpipe.retention import Duration, KeepPolicy, decide, parse_retention
from mailpipe.repo.store import StoreError, make_s3_client
from mailpipe_tests.conftest import make_tenant


def utc(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=timezone.utc)


def policy(**rules) -> KeepPolicy:
    """A KeepPolicy from tenants-file rules (``within`` as text), through the real parser."""
    cfg = parse_retention({"keep": rules}, lambda f, m: ValueError(f"{f}: {m}"))
    return cfg.keep


# -- the rules ------------------------------------------------------------------------------------------------
# (name, time zone, rules, {snapshot: UTC time}, now or None, {kept snapshot: its reasons, in rule order})
PIN = "pinned by unfinished restore r1"
CASES = [
    ("last keeps the N newest", "UTC", {"last": 3},
     {"a": "2026-01-01T12:00", "b": "2026-01-02T12:00", "c": "2026-01-03T12:00", "d": "2026-01-04T12:00",
      "e": "2026-01-05T12:00"}, None,
     {"e": ("last 3",), "d": ("last 3",), "c": ("last 3",)}),
    ("daily keeps the newest of each day", "UTC", {"daily": 3},
     {"a": "2026-01-30T10:00", "b": "2026-01-31T09:00", "c": "2026-01-31T23:00", "d": "2026-02-01T00:30",
      "e": "2026-02-01T08:00"}, None,
     {"e": ("daily 2026-02-01",), "c": ("daily 2026-01-31",), "a": ("daily 2026-01-30",)}),
    ("counts left at the end keep the oldest too (restic 0.17)", "UTC", {"daily": 5},
     {"a": "2026-03-01T09:00", "b": "2026-03-01T12:00", "c": "2026-03-02T08:00", "d": "2026-03-02T10:00"}, None,
     {"d": ("daily 2026-03-02",), "b": ("daily 2026-03-01",), "a": ("oldest daily 2026-03-01",)}),
    ("no counts left at the end: the oldest goes", "UTC", {"daily": 2},
     {"a": "2026-03-01T09:00", "b": "2026-03-01T12:00", "c": "2026-03-02T08:00", "d": "2026-03-02T10:00"}, None,
     {"d": ("daily 2026-03-02",), "b": ("daily 2026-03-01",)}),
    ("month ends, non-leap February", "UTC", {"monthly": 2},
     {"a": "2027-01-31T23:59", "b": "2027-02-28T12:00", "c": "2027-03-01T00:00", "d": "2027-03-31T23:59"}, None,
     {"d": ("monthly 2027-03",), "b": ("monthly 2027-02",)}),
    ("leap day is a day and in February", "UTC", {"daily": 2, "monthly": 2},
     {"a": "2028-02-28T23:00", "b": "2028-02-29T01:00", "c": "2028-02-29T22:00", "d": "2028-03-01T00:10"}, None,
     {"d": ("daily 2028-03-01", "monthly 2028-03"), "c": ("daily 2028-02-29", "monthly 2028-02")}),
    ("ISO week 53 of 2026 runs from Mon 28 Dec to Sun 3 Jan 2027", "UTC", {"weekly": 3},
     {"a": "2026-12-27T12:00", "b": "2026-12-28T12:00", "c": "2026-12-31T12:00", "d": "2027-01-01T12:00",
      "e": "2027-01-03T12:00", "f": "2027-01-04T12:00"}, None,
     {"f": ("weekly 2027-W01",), "e": ("weekly 2026-W53",), "a": ("weekly 2026-W52",)}),
    ("yearly follows calendar years, not ISO years", "UTC", {"yearly": 2},
     {"a": "2026-12-27T12:00", "b": "2026-12-28T12:00", "c": "2026-12-31T12:00", "d": "2027-01-01T12:00",
      "e": "2027-01-03T12:00", "f": "2027-01-04T12:00"}, None,
     {"f": ("yearly 2027",), "c": ("yearly 2026",)}),
    # Berlin, spring forward on 29 March 2026 at 01:00 UTC; local dates differ from UTC dates after 23:00 UTC
    ("Berlin days across the spring DST change", "Europe/Berlin", {"daily": 3},
     {"a": "2026-03-28T22:30", "b": "2026-03-28T23:30", "c": "2026-03-29T21:30", "d": "2026-03-29T22:30"}, None,
     {"d": ("daily 2026-03-30",), "c": ("daily 2026-03-29",), "a": ("daily 2026-03-28",)}),
    ("the same snapshots in UTC", "UTC", {"daily": 3},
     {"a": "2026-03-28T22:30", "b": "2026-03-28T23:30", "c": "2026-03-29T21:30", "d": "2026-03-29T22:30"}, None,
     {"d": ("daily 2026-03-29",), "b": ("daily 2026-03-28",), "a": ("oldest daily 2026-03-28",)}),
    ("Berlin hours: 02:00 does not exist on 29 March", "Europe/Berlin", {"hourly": 3},
     {"a": "2026-03-29T00:30", "b": "2026-03-29T01:00", "c": "2026-03-29T01:30"}, None,
     {"c": ("hourly 2026-03-29 03:00",), "a": ("hourly 2026-03-29 01:00",)}),
    # New York, fall back on 1 November 2026: 01:00-02:00 local happens twice (EDT, then EST)
    ("New York: the repeated local hour is one period", "America/New_York", {"hourly": 5},
     {"a": "2026-11-01T04:30", "b": "2026-11-01T05:30", "c": "2026-11-01T06:30", "d": "2026-11-01T07:30"}, None,
     {"d": ("hourly 2026-11-01 02:00",), "c": ("hourly 2026-11-01 01:00",), "a": ("hourly 2026-11-01 00:00",)}),
    ("New York days: 04:30 UTC on the 24th is the 23rd", "America/New_York", {"daily": 2},
     {"a": "2026-11-24T03:00", "b": "2026-11-24T04:30", "c": "2026-11-24T05:30"}, None,
     {"c": ("daily 2026-11-24",), "b": ("daily 2026-11-23",)}),
    ("New York weeks: Monday 02:00 UTC is Sunday evening, ISO week 48", "America/New_York", {"weekly": 2},
     {"a": "2026-11-28T15:00", "b": "2026-11-30T02:00", "c": "2026-11-30T06:00"}, None,
     {"c": ("weekly 2026-W49",), "b": ("weekly 2026-W48",)}),
    ("Paris months: 31 October 23:30 UTC is 1 November", "Europe/Paris", {"monthly": 2},
     {"a": "2026-10-31T12:00", "b": "2026-10-31T23:30", "c": "2026-11-15T12:00"}, None,
     {"c": ("monthly 2026-11",), "a": ("monthly 2026-10",)}),
    ("Paris years: 31 December 23:30 UTC is 2027", "Europe/Paris", {"yearly": 2},
     {"a": "2026-06-01T12:00", "b": "2026-12-31T22:30", "c": "2026-12-31T23:30"}, None,
     {"c": ("yearly 2027",), "b": ("yearly 2026",)}),
    ("rules combine; each snapshot lists every rule that keeps it", "UTC",
     {"last": 1, "daily": 2, "weekly": 2, "monthly": 2},
     {"a": "2026-10-15T12:00", "b": "2026-11-02T12:00", "c": "2026-11-20T12:00", "d": "2026-11-23T09:00",
      "e": "2026-11-24T08:00", "f": "2026-11-24T18:00"}, None,
     {"f": ("last 1", "daily 2026-11-24", "weekly 2026-W48", "monthly 2026-11"), "d": ("daily 2026-11-23",),
      "c": ("weekly 2026-W47",), "a": ("monthly 2026-10",)}),
    ("unlimited keeps every period, and the oldest", "UTC", {"monthly": "unlimited"},
     {"a": "2026-01-10T12:00", "b": "2026-01-20T12:00", "c": "2026-02-05T12:00", "d": "2026-03-01T12:00",
      "e": "2026-03-15T12:00"}, None,
     {"e": ("monthly 2026-03",), "c": ("monthly 2026-02",), "b": ("monthly 2026-01",),
      "a": ("oldest monthly 2026-01",)}),
    # within: strictly after (newest - duration)
    ("within 36h: exactly 36 hours before is out", "UTC", {"within": "36h"},
     {"z": "2026-05-08T23:00", "x": "2026-05-09T00:00", "y": "2026-05-09T00:01", "n": "2026-05-10T12:00"}, None,
     {"n": ("within 36h",), "y": ("within 36h",)}),
    ("within 1d is one local calendar day: 23 hours across spring forward", "Europe/Berlin", {"within": "1d"},
     {"r": "2026-03-28T11:30", "q": "2026-03-28T12:30", "p": "2026-03-28T13:30", "n": "2026-03-29T12:00"}, None,
     {"n": ("within 1d",), "p": ("within 1d",)}),
    ("within 24h is 24 absolute hours", "Europe/Berlin", {"within": "24h"},
     {"r": "2026-03-28T11:30", "q": "2026-03-28T12:30", "p": "2026-03-28T13:30", "n": "2026-03-29T12:00"}, None,
     {"n": ("within 24h",), "p": ("within 24h",), "q": ("within 24h",)}),
    ("within 1m of 31 March reaches back to 28 February", "UTC", {"within": "1m"},
     {"q": "2027-02-28T09:00", "p": "2027-02-28T10:30", "n": "2027-03-31T10:00"}, None,
     {"n": ("within 1m",), "p": ("within 1m",)}),
    ("within 1y of a leap day reaches back to 28 February", "UTC", {"within": "1y"},
     {"q": "2027-02-28T11:00", "p": "2027-02-28T13:00", "n": "2028-02-29T12:00"}, None,
     {"n": ("within 1y",), "p": ("within 1y",)}),
    ("within 2w is 14 days", "UTC", {"within": "2w"},
     {"q": "2026-11-10T12:00:00", "p": "2026-11-10T12:00:01", "n": "2026-11-24T12:00"}, None,
     {"n": ("within 2w",), "p": ("within 2w",)}),
    ("within 6m of 31 August reaches back to 28 February", "UTC", {"within": "6m"},
     {"q": "2026-02-28T11:00", "p": "2026-02-28T12:30", "n": "2026-08-31T12:00"}, None,
     {"n": ("within 6m",), "p": ("within 6m",)}),
    ("within counts from the newest snapshot not in the future", "UTC", {"within": "1d"},
     {"q": "2026-05-09T10:00", "p": "2026-05-09T12:00", "n": "2026-05-10T11:00", "f": "2026-06-01T00:00"},
     "2026-05-10T12:00",
     {"f": ("within 1d",), "n": ("within 1d",), "p": ("within 1d",)}),
]


@pytest.mark.parametrize("name, tz, rules, snaps, now, expected", CASES, ids=[c[0] for c in CASES])
def test_policy(name, tz, rules, snaps, now, expected):
    out = decide([(k, utc(v)) for k, v in snaps.items()], policy(**rules), tz, now=utc(now or "2100-01-01T00:00"))
    assert [d.snapshot_id for d in out] == sorted(snaps, key=lambda k: snaps[k], reverse=True)  # newest first
    assert {d.snapshot_id: d.reasons for d in out if d.keep} == expected
    assert all(not d.reasons for d in out if not d.keep)


def test_a_pinned_snapshot_is_kept_and_the_rules_apply_as_if_it_were_not():
    snaps = [("a", utc("2026-01-01T12:00")), ("b", utc("2026-01-02T08:00")), ("c", utc("2026-01-02T12:00")),
             ("d", utc("2026-01-03T12:00"))]
    # daily 2 alone keeps d and c; the pin adds b; a still goes
    out = decide(snaps, policy(daily=2), "UTC", pinned={"b": PIN})
    assert {d.snapshot_id: d.reasons for d in out if d.keep} == {
        "d": ("daily 2026-01-03",), "c": ("daily 2026-01-02",), "b": (PIN,)}
    # a pinned snapshot the rules keep anyway lists both reasons
    out = decide(snaps, policy(daily=2), "UTC", pinned={"d": PIN})
    assert {d.snapshot_id: d.reasons for d in out if d.keep} == {
        "d": (PIN, "daily 2026-01-03"), "c": ("daily 2026-01-02",)}


@pytest.mark.parametrize("rules", [{"last": 1}, {"hourly": 1}, {"daily": 1}, {"weekly": 1}, {"monthly": 1},
                                   {"yearly": 1}, {"within": "1h"}])
def test_the_newest_snapshot_is_always_kept(rules):
    out = decide([("a", utc("2026-01-01T00:00")), ("b", utc("2026-06-01T00:00"))], policy(**rules), "UTC",
                 now=utc("2026-06-02T00:00"))
    assert [d.snapshot_id for d in out if d.keep] == ["b"]


def test_no_policy_and_keep_all_keep_everything():
    snaps = [("a", utc("2020-01-01T00:00")), ("b", utc("2026-01-01T00:00"))]
    assert [(d.keep, d.reasons) for d in decide(snaps, None)] == [(True, ("no retention policy",))] * 2
    assert [(d.keep, d.reasons) for d in decide(snaps, KeepPolicy(all=True))] == [(True, ("keep all",))] * 2
    assert decide([], policy(last=1)) == []


@pytest.mark.parametrize("text, want", [
    ("36h", Duration(hours=36)), ("30d", Duration(days=30)), ("2w", Duration(weeks=2)),
    ("6m", Duration(months=6)), ("1y", Duration(years=1)), ("1y6m", Duration(years=1, months=6)),
    ("1w2d12h", Duration(weeks=1, days=2, hours=12)),
])
def test_durations(text, want):
    assert Duration.parse(text) == want and str(want) == text


@pytest.mark.parametrize("text", ["", "30", "30 days", "1h30m", "0d", "-1d", "1.5d", "30D", 30, None])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="not a duration"):
        Duration.parse(text)


# -- the tenants file -----------------------------------------------------------------------------------------
TENANT = {
    "name": "contoso", "tenant_id": "11111111-2222-3333-4444-555555555555",
    "client_id": "66666666-7777-8888-9999-000000000000", "auth": {"client_secret_env": "CONTOSO_SECRET"},
    "storage": "s3://backups/contoso",
}


def tenant_with(retention):
    return parse_tenants({"tenants": [{**TENANT, "retention": retention}]})[0]


def test_retention_in_the_tenants_file():
    t = parse_tenants(yaml.safe_load("""
tenants:
  - name: contoso
    tenant_id: 11111111-2222-3333-4444-555555555555
    client_id: 66666666-7777-8888-9999-000000000000
    auth: {client_secret_env: CONTOSO_SECRET}
    storage: s3://backups/contoso
    retention:
      timezone: Europe/Paris
      keep: {last: 3, daily: 7, weekly: 5, monthly: 12, yearly: 10, within: 30d}
      mailboxes:
        - match: "ceo@*"
          keep: {monthly: unlimited, yearly: unlimited}
        - match: ["ceo@contoso.com", "legal-*"]
          keep: all
"""))[0]
    r = t.retention
    assert r.timezone == "Europe/Paris" and r.tz.key == "Europe/Paris"
    assert r.keep == KeepPolicy(last=3, daily=7, weekly=5, monthly=12, yearly=10, within=Duration(days=30))
    assert r.keep.describe() == "keep last 3, daily 7, weekly 5, monthly 12, yearly 10, within 30d"
    assert r.policy_for("CEO@Contoso.com") == KeepPolicy(monthly=-1, yearly=-1)  # the first match wins
    assert r.policy_for("legal-hold@contoso.com") == KeepPolicy(all=True)
    assert r.policy_for("adele@contoso.com") is r.keep
    assert parse_tenants({"tenants": [TENANT]})[0].retention is None  # no policy: forget keeps everything
    only = tenant_with({"mailboxes": [{"match": "x@*", "keep": {"last": 1}}]}).retention
    assert only.policy_for("y@contoso.com") is None and only.timezone == "UTC"


@pytest.mark.parametrize("retention, field, words", [
    ({"keep": {"dayly": 7}}, "'retention.keep'", "dayly"),
    ({"keep": {"daily": 7}, "zone": "UTC"}, "'retention'", "zone"),
    ({"keep": {"within": "30 days"}}, "'retention.keep.within'", "30 days"),
    ({"keep": {"within": "1h30m"}}, "'retention.keep.within'", "not a duration"),
    ({"keep": {"within": 30}}, "'retention.keep.within'", "not a duration"),
    ({"keep": {"daily": -1}}, "'retention.keep.daily'", "whole number"),
    ({"keep": {"daily": True}}, "'retention.keep.daily'", "whole number"),
    ({"keep": {"daily": "7"}}, "'retention.keep.daily'", "whole number"),
    ({"keep": {}}, "'retention.keep'", "no rule"),
    ({"keep": {"daily": 0}}, "'retention.keep'", "no rule"),
    ({"keep": "everything"}, "'retention.keep'", "expected a mapping"),
    ({"keep": {"daily": 7}, "timezone": "Mars/Olympus"}, "'retention.timezone'", "time zone"),
    ({"keep": {"daily": 7}, "timezone": "America"}, "'retention.timezone'", "time zone"),
    ({"keep": {"daily": 1}, "mailboxes": [{"match": "ceo@*", "keep": {"montly": 1}}]},
     "'retention.mailboxes[0].keep'", "montly"),
    ({"mailboxes": [{"match": "ceo@*"}]}, "'retention.mailboxes[0].keep'", "required"),
    ({"mailboxes": [{"keep": {"daily": 1}}]}, "'retention.mailboxes[0].match'", "glob"),
    ({"mailboxes": [{"match": "x", "keep": {"daily": 1}, "note": 1}]}, "'retention.mailboxes[0]'", "note"),
    ({"mailboxes": {"match": "x"}}, "'retention.mailboxes'", "list"),
    ({}, "'retention'", "set keep"),
    ("daily", "'retention'", "mapping"),
])
def test_bad_retention_names_tenant_and_field(retention, field, words):
    with pytest.raises(ConfigError) as e:
        tenant_with(retention)
    msg = str(e.value)
    assert "tenant 'contoso'" in msg and f"field {field}" in msg and words in msg, msg


# -- forget on a real repository ------------------------------------------------------------------------------
ADELE = ("11111111-0000-0000-0000-0000000000ad", "adele@contoso.example")
CEO = ("11111111-0000-0000-0000-0000000000ce", "ceo@contoso.example")
RETENTION = {"timezone": "Europe/Paris", "keep": {"daily": 2}, "mailboxes": [{"match": "ceo@*", "keep": {"last": 1}}]}
# adele, in Paris: 20 Nov, 22 Nov, 23 Nov 09:00, 23 Nov 23:30, 24 Nov 00:30 → daily 2 keeps the last two
ADELE_TIMES = ["2026-11-20T10:00", "2026-11-22T10:00", "2026-11-23T08:00", "2026-11-23T22:30", "2026-11-23T23:30"]
CEO_TIMES = ["2026-11-20T10:00", "2026-11-21T10:00", "2026-11-22T10:00"]  # last 1 keeps the last one


def repo_tenant(storage, retention=RETENTION, s3=None):
    sim = type("S", (), {"graph_url": "http://127.0.0.1:9/v1.0", "authority": None})()
    cfg = parse_retention(retention, lambda f, m: ValueError(f"{f}: {m}")) if retention else None
    return make_tenant(sim, storage, s3=s3 or S3Config(), name="contoso", retention=cfg)


@pytest.fixture(params=["local", "s3"])
def store_kind(request, tmp_path):
    """(storage, S3Config, s3 client) of an empty repository on a local folder or a moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "repo"), S3Config(), None
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/r", S3Config(endpoint_url=endpoint), make_s3_client(endpoint, "us-east-1")


def commit_at(repo, user, when: str, monkeypatch) -> str:
    """Commit a snapshot of one message whose commit time (and id) is ``when`` (UTC)."""
    frozen = utc(when)

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen.astimezone(tz) if tz else frozen.replace(tzinfo=None)

    uid, upn = user
    with monkeypatch.context() as m:
        m.setattr(repository, "datetime", Clock)
        st = repo.put_content(f"Subject: {upn} at {when}\r\nMessage-ID: <{when}@x>\r\n\r\nhello\r\n".encode())
        w = repo.begin_snapshot(uid, upn)
        w.add_items([{"item_id": f"m-{when}", "folder_id": "F", "folder_path": ["Inbox"], "size": st.size,
                      "sha256": st.sha256, "chunks": st.chunks}])
        w.set_folders([{"folder_id": "F", "parent_id": None, "display_name": "Inbox", "path": ["Inbox"]}])
        return w.commit(delta_links={}, stats={}, skipped=[]).snapshot_id


@pytest.fixture
def filled(store_kind, monkeypatch):
    """A repository with adele's 5 and the CEO's 3 snapshots: (repo, tenant, adele's ids, the CEO's ids)."""
    storage, s3, client = store_kind
    t = repo_tenant(storage, s3=s3)
    repo = open_repository(t, s3_client=client)
    a = [commit_at(repo, ADELE, w, monkeypatch) for w in ADELE_TIMES]
    c = [commit_at(repo, CEO, w, monkeypatch) for w in CEO_TIMES]
    return repo, t, a, c


def keys(repo):
    return sorted(repo.store.list(""))


def test_forget_applies_the_policy_per_mailbox(filled):
    from mailpipe.repo.check import check_repository

    repo, t, a, c = filled
    res = forget(repo, t)
    assert repo.snapshot_ids(ADELE[0]) == a[3:] and repo.snapshot_ids(CEO[0]) == c[2:]
    for sid in a[:3]:  # nothing of a forgotten snapshot is left behind
        assert list(repo.store.list(f"{repo._snap_prefix(ADELE[0])}/{sid}")) == []
    assert (res.snapshots, res.kept, res.forgotten, res.deleted, res.failed, res.ok) == (8, 3, 5, 5, 0, True)
    adele = next(m for m in res.mailboxes if m.upn == ADELE[1])
    assert adele.policy == "keep daily 2" and adele.status == "done"
    assert [(s.snapshot_id, s.action, s.reasons, s.deleted) for s in adele.snapshots] == [
        (a[4], "keep", ["daily 2026-11-24"], False), (a[3], "keep", ["daily 2026-11-23"], False),
        (a[2], "forget", [], True), (a[1], "forget", [], True), (a[0], "forget", [], True)]
    ceo = next(m for m in res.mailboxes if m.upn == CEO[1])
    assert ceo.policy == "keep last 1" and [s.reasons for s in ceo.snapshots if s.action == "keep"] == [["last 1"]]
    assert res.summary() == "forget: 2 mailboxes, 8 snapshots: forgot 5, kept 3"
    assert res.to_dict()["deleted"] == 5 and res.to_dict(detail=True)["per_mailbox"][0]["upn"] == ADELE[1]
    assert check_repository(repo, repo.list_mailboxes()).ok  # what is left is whole
    # the leases were released: a backup can take them
    repo.acquire_lease(ADELE[0], ADELE[1], 30).release()
    # a second run has nothing more to forget
    again = forget(repo, t)
    assert (again.forgotten, again.kept) == (0, 3)


def test_dry_run_deletes_nothing_and_writes_nothing(filled):
    repo, t, a, c = filled
    before = keys(repo)
    held = repo.acquire_lease(CEO[0], CEO[1], 60)  # a dry run takes no lease: a running backup is not in its way
    try:
        res = forget(repo, t, dry_run=True)
    finally:
        held.release()
    assert keys(repo) == before
    assert (res.forgotten, res.deleted, res.kept, res.busy) == (5, 0, 3, [])
    assert {m.status for m in res.mailboxes} == {"dry-run"}
    assert res.summary() == "forget: 2 mailboxes, 8 snapshots: would forget 5, kept 3"


def test_a_mailbox_being_backed_up_is_skipped_not_fatal(filled):
    repo, t, a, c = filled
    held = repo.acquire_lease(ADELE[0], ADELE[1], 60)  # a backup of adele is running
    try:
        res = forget(repo, t)
    finally:
        held.release()
    adele = next(m for m in res.mailboxes if m.upn == ADELE[1])
    assert adele.status == "busy" and f"pid {os.getpid()}" in adele.note and adele.snapshots == []
    assert repo.snapshot_ids(ADELE[0]) == a  # untouched
    assert repo.snapshot_ids(CEO[0]) == c[2:]  # the others go on
    assert res.ok and [m.upn for m in res.busy] == [ADELE[1]]
    assert res.summary().endswith("; 1 mailbox busy (skipped)")
    assert forget(repo, t).deleted == 3  # once the backup is done, the next run catches up


def test_a_snapshot_an_unfinished_restore_reads_is_kept(filled):
    repo, t, a, c = filled
    target, rid = "11111111-0000-0000-0000-0000000000ff", "0123456789abcdef"
    repo.write_restore_plan(target, rid, {"source": ADELE[0], "snapshot_id": a[1], "target": target,
                                          "started_at": "2026-11-25T00:00:00+00:00"})
    res = forget(repo, t, ADELE[1])
    assert [m.upn for m in res.mailboxes] == [ADELE[1]]
    assert repo.snapshot_ids(ADELE[0]) == [a[1], a[3], a[4]]
    pinned = next(s for s in res.mailboxes[0].snapshots if s.snapshot_id == a[1])
    assert pinned.action == "keep" and pinned.reasons == [f"pinned by unfinished restore {rid}"]
    repo.write_restore_result(target, rid, {"ok": True})  # the restore finished: the pin is gone
    assert forget(repo, t, ADELE[1]).deleted == 1 and repo.snapshot_ids(ADELE[0]) == a[3:]


def test_unreadable_records_are_never_forgotten_and_failures_are_reported(filled, monkeypatch):
    repo, t, a, c = filled
    bad = "20261121T100000.000000Z-abcdef"
    repo.store.put_bytes(f"{repo._snap_prefix(ADELE[0])}/{bad}/snapshot.json", b"{not json")
    real = type(repo).delete_snapshot

    def flaky(self, uid, sid):
        if sid == a[0]:  # refused before anything was deleted: the snapshot is still there
            raise StoreError("simulated: the store refused the delete")
        if sid == a[1]:  # the commit record went, then the connection broke: the snapshot is gone
            self.store.delete(f"{self._snap_prefix(uid)}/{sid}/snapshot.json")
            raise StoreError("simulated: connection lost")
        return real(self, uid, sid)

    monkeypatch.setattr(type(repo), "delete_snapshot", flaky)
    res = forget(repo, t, ADELE[1])
    m = res.mailboxes[0]
    assert [s.snapshot_id for s in m.snapshots if s.action == "unreadable"] == [bad]
    assert repo.snapshot_ids(ADELE[0]) == sorted([a[0], bad, a[3], a[4]])
    assert [(s.snapshot_id, s.error) for s in m.failed] == [(a[0], "simulated: the store refused the delete")]
    gone = next(s for s in m.snapshots if s.snapshot_id == a[1])
    assert gone.deleted and gone.error is None and "next backup" in gone.note
    assert not res.ok and (res.deleted, res.unreadable, res.failed) == (2, 1, 1)
    assert "1 unreadable (kept" in res.summary() and "1 deletions FAILED" in res.summary()


def test_snapshots_object_lock_still_retains_are_left_for_a_later_run(s3_server, monkeypatch):
    """A real Object Lock bucket (moto): the forgotten snapshots cannot be deleted yet; forget says so and
    does not fail — but an erasure that cannot complete does."""
    import uuid

    from mailpipe.config import ObjectLockConfig

    client = make_s3_client(s3_server, "us-east-1")
    bucket = f"lk-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    t = repo_tenant(f"s3://{bucket}/r", retention={"keep": {"last": 1}},
                    s3=S3Config(endpoint_url=s3_server, object_lock=ObjectLockConfig("GOVERNANCE", 1)))
    repo = open_repository(t)
    a = [commit_at(repo, ADELE, w, monkeypatch) for w in ADELE_TIMES[:3]]
    res = forget(repo, t)
    assert repo.snapshot_ids(ADELE[0]) == a
    assert res.ok and (res.forgotten, res.deleted, res.retained, res.failed) == (2, 0, 2, 0)
    assert all(s.retained.startswith("until ") for s in res.mailboxes[0].snapshots if s.action == "forget")
    assert res.summary().endswith("; 2 retained by S3 Object Lock (a later run deletes them)")
    erase = forget(repo, t, ADELE[1], erase=True)
    assert not erase.ok and erase.deleted == 0 and repo.snapshot_ids(ADELE[0]) == a


def test_erase_removes_one_mailbox_entirely(filled):
    repo, t, a, c = filled
    bad = "20261121T100000.000000Z-abcdef"
    repo.store.put_bytes(f"{repo._snap_prefix(ADELE[0])}/{bad}/snapshot.json", b"{not json")
    repo.write_checkpoint(ADELE[0], [{"item_id": "x", "sha256": "0" * 64, "chunks": ["0" * 64], "size": 1}])
    with pytest.raises(UserError, match="needs one mailbox"):
        forget(repo, t, erase=True)
    dry = forget(repo, t, ADELE[1], erase=True, dry_run=True)
    assert dry.forgotten == 6 and repo.snapshot_ids(ADELE[0]) == sorted([*a, bad])
    res = forget(repo, t, ADELE[1], erase=True)
    assert res.ok and res.deleted == 6 and res.mailboxes[0].checkpoints_removed == 1
    assert list(repo.store.list(f"mailboxes/{ADELE[0]}")) == []  # no snapshot, checkpoint or lease left
    assert [upn for _, upn in repo.list_mailboxes()] == [CEO[1]]
    assert repo.snapshot_ids(CEO[0]) == c  # the policy was not applied to anyone else
    assert res.summary() == "forget --all: erased 6 of 6 snapshots and 1 checkpoint parts"


def test_erase_keeps_a_snapshot_a_restore_reads_and_says_it_is_incomplete(filled):
    repo, t, a, c = filled
    target, rid = "11111111-0000-0000-0000-0000000000ff", "00000000aaaaaaaa"
    repo.write_restore_plan(target, rid, {"source": ADELE[0], "snapshot_id": a[2], "target": target})
    res = forget(repo, t, ADELE[1], erase=True)
    assert repo.snapshot_ids(ADELE[0]) == [a[2]] and not res.ok
    assert res.summary() == "forget --all: erased 4 of 5 snapshots and 0 checkpoint parts; 1 left"


def test_without_a_policy_forget_keeps_everything_and_says_so(store_kind, monkeypatch):
    storage, s3, client = store_kind
    t = repo_tenant(storage, retention=None, s3=s3)
    repo = open_repository(t, s3_client=client)
    a = [commit_at(repo, ADELE, w, monkeypatch) for w in ADELE_TIMES[:2]]
    held = repo.acquire_lease(ADELE[0], ADELE[1], 60)  # nothing to delete: no lease needed, not "busy"
    try:
        res = forget(repo, t)
    finally:
        held.release()
    assert repo.snapshot_ids(ADELE[0]) == a and res.ok and res.deleted == 0
    assert [m.status for m in res.mailboxes] == ["no policy"]
    assert "no retention policy for tenant 'contoso': nothing forgotten" in res.summary()


def test_forget_after_real_backups_leaves_a_chain_the_next_backup_continues(sim_factory, tmp_path):
    from mailpipe.repo.check import check_repository
    from mailpipe_tests.helpers import backup, mailbox_upns, snapshot_items, truth_items

    sim = sim_factory(users=1, messages_per_mailbox=20, seed=3)
    t = make_tenant(sim, str(tmp_path / "repo"),
                    retention=parse_retention({"keep": {"last": 1}}, lambda f, m: ValueError(m)))
    upn = mailbox_upns(sim)[0]
    repo = open_repository(t)
    for rnd in range(3):
        if rnd:
            sim.mutate(upn, random=5, seed=rnd)
        [r] = backup(t, [upn])
        assert r.ok, r.error
    res = forget(repo, t, upn)
    assert (res.deleted, res.kept) == (2, 1) and repo.snapshot_ids(r.user_id) == [r.snapshot_id]
    sim.mutate(upn, random=5, seed=9)
    [r2] = backup(t, [upn])
    assert r2.ok and snapshot_items(repo, r2.user_id) == truth_items(sim.truth(), upn)
    assert check_repository(repo, repo.list_mailboxes()).ok


# -- the command ----------------------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A tenants file with tenant 'contoso' (local repository, RETENTION) and adele's 5 snapshots:
    (run `mailpipe ARGS` → (exit status, stdout, stderr), adele's ids)."""
    from mailpipe.cli import main
    from mailpipe.config import find_tenant
    from mailpipe.sim import write_tenants_file

    path = write_tenants_file(tmp_path / "tenants.yaml", "contoso", "http://127.0.0.1:9/v1.0", tmp_path / "repo",
                              retention=RETENTION)
    monkeypatch.setenv("MAILPIPE_TENANTS", path)
    repo = open_repository(find_tenant("contoso"))
    a = [commit_at(repo, ADELE, w, monkeypatch) for w in ADELE_TIMES]

    def run(capsys, *args):
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run, repo, a


def test_cli_forget(cli, capsys):
    run, repo, a = cli
    code, out, err = run(capsys, "forget", "contoso", "--dry-run")
    assert code == 0 and repo.snapshot_ids(ADELE[0]) == a
    lines = out.splitlines()
    assert lines[0] == f"{ADELE[1]}: keep daily 2 (Europe/Paris)"
    assert lines[1].split() == ["keep", a[4], "2026-11-24", "00:30", "CET", "daily", "2026-11-24"]
    assert lines[2].split() == ["keep", a[3], "2026-11-23", "23:30", "CET", "daily", "2026-11-23"]
    assert lines[3].split() == ["would", "forget", a[2], "2026-11-23", "09:00", "CET"]
    assert err.strip() == "forget: 1 mailbox, 5 snapshots: would forget 3, kept 2"

    code, out, err = run(capsys, "forget", "contoso")
    assert code == 0 and repo.snapshot_ids(ADELE[0]) == a[3:]
    assert [ln.split()[:2] for ln in out.splitlines()[1:]] == [["keep", a[4]], ["keep", a[3]], ["forget", a[2]],
                                                               ["forget", a[1]], ["forget", a[0]]]
    assert err.strip() == "forget: 1 mailbox, 5 snapshots: forgot 3, kept 2"


def test_cli_forget_all_and_bad_input(cli, capsys):
    run, repo, a = cli
    code, out, err = run(capsys, "forget", "contoso", "--all")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--all" in err and "UPN" in err
    code, out, err = run(capsys, "forget", "contoso", "nobody@contoso.example")
    assert code == 2 and err == f"mailpipe: error: no backup of mailbox 'nobody@contoso.example' in " \
                                f"{repo.store.describe()}\n"
    code, out, err = run(capsys, "forget", "nope")
    assert code == 2 and "unknown tenant 'nope'" in err and err.count("\n") == 1
    assert repo.snapshot_ids(ADELE[0]) == a
    # a restore reads one snapshot: --all erases the rest and fails (3) naming what is left
    target, rid = "11111111-0000-0000-0000-0000000000ff", "00000000bbbbbbbb"
    repo.write_restore_plan(target, rid, {"source": ADELE[0], "snapshot_id": a[0], "target": target})
    code, out, err = run(capsys, "forget", "contoso", ADELE[1].upper(), "--all")
    assert code == 3 and repo.snapshot_ids(ADELE[0]) == [a[0]]
    assert f"keep         {a[0]}" in out and f"pinned by unfinished restore {rid}" in out
    assert "erased 4 of 5 snapshots" in err and "1 left" in err
    repo.write_restore_result(target, rid, {"ok": True})
    code, out, err = run(capsys, "forget", "contoso", ADELE[1], "--all")
    assert code == 0 and repo.snapshot_ids(ADELE[0]) == [] and "next prune" in err and "mailboxes:" in err


def test_cli_forget_help(capsys):
    from mailpipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["forget", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for words in ("TENANT's retention policy", "--dry-run", "--all", "Without a policy nothing is deleted",
                  "unfinished restore", "prune", "2: bad input", "3: some snapshots could not be deleted"):
        assert words in " ".join(out.split()), words
