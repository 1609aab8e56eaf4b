"""The tenants file: valid files load, bad ones give one clear error naming tenant and field."""

from __future__ import annotations

import pytest
import yaml

from mailpipe.config import EMBEDDED_SIM_URL, ConfigError, load_tenants, parse_tenants

GOOD = {
    "name": "contoso",
    "tenant_id": "11111111-2222-3333-4444-555555555555",
    "client_id": "66666666-7777-8888-9999-000000000000",
    "auth": {"client_secret_env": "CONTOSO_SECRET"},
    "storage": "s3://backups/contoso",
    "s3": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1"},
    "mailboxes": {"include": ["*@contoso.com"], "exclude": ["svc-*"]},
    "limits": {"concurrent_requests_per_mailbox": 4, "requests_per_10min_per_mailbox": 9600},
}


def one(**over):
    t = dict(GOOD)
    t.update(over)
    return {"tenants": [t]}


def test_good_file_loads(tmp_path, monkeypatch):
    p = tmp_path / "tenants.yaml"
    p.write_text(yaml.safe_dump(one()))
    monkeypatch.setenv("MAILPIPE_TENANTS", str(p))
    [t] = load_tenants()
    assert t.name == "contoso" and t.auth.kind == "client_secret" and t.storage_is_s3
    assert t.s3.region == "eu-west-1"
    assert t.mailboxes.matches("Adele@Contoso.com") and not t.mailboxes.matches("svc-backup@contoso.com")
    assert t.partition_key("Adele@Contoso.com") == "contoso:adele@contoso.com"


def test_demo_tenant_without_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MAILPIPE_TENANTS", raising=False)
    monkeypatch.setenv("MAILPIPE_HOME", str(tmp_path))
    [t] = load_tenants()
    assert t.name == "demo" and t.graph_url == EMBEDDED_SIM_URL and t.auth.simulator
    assert t.storage.startswith(str(tmp_path))


@pytest.mark.parametrize(
    "over, field",
    [
        ({"name": "Bad Name"}, "'name'"),
        ({"tenant_id": "nope"}, "'tenant_id'"),
        ({"auth": {}}, "'auth'"),
        ({"auth": {"client_secret_env": "CONTOSO_SECRET", "managed_identity": True}}, "'auth'"),
        ({"storage": "ftp://x/y"}, "'storage'"),
        ({"graph_url": "http://graph.example.com/v1.0"}, "'graph_url'"),
        ({"limits": {"concurrent_requests_per_mailbox": 0}}, "limits.concurrent_requests_per_mailbox"),
        ({"mailboxes": {"include": "x", "bogus": 1}}, "'mailboxes'"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "'ca_bundle'"),
        ({"shards": 0}, "'shards'"),
        ({"shards": 100}, "'shards'"),
        ({"shards": "4"}, "'shards'"),
    ],
)
def test_bad_fields_name_tenant_and_field(over, field):
    with pytest.raises(ConfigError) as e:
        parse_tenants(one(**over))
    msg = str(e.value)
    assert field in msg
    if "name" not in over:
        assert "'contoso'" in msg


def test_shards_default_to_one():
    assert parse_tenants(one())[0].shards == 1 and parse_tenants(one(shards=12))[0].shards == 12


def test_secret_pasted_in_place_of_env_name_is_not_echoed():
    secret = "Zx9~s3cr3t.value-with-dots"
    with pytest.raises(ConfigError) as e:
        parse_tenants(one(auth={"client_secret_env": secret}))
    assert secret not in str(e.value)
    assert "NAME of an environment variable" in str(e.value)


def test_duplicate_tenant_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="used twice"):
        parse_tenants({"tenants": [GOOD, GOOD]})
    p = tmp_path / "t.yaml"
    p.write_text("")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_tenants(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_tenants(tmp_path / "missing.yaml")
