"""Shared fixtures: the Graph simulator, an S3-compatible server (moto) and tenant configs, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

import pytest

from mailpipe.config import AuthConfig, Limits, S3Config, TenantConfig

# nothing in the tests may reach a real service: proxies off for loopback, fake AWS credentials
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ["no_proxy"] = os.environ["NO_PROXY"]
for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[k] = v
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("MAILPIPE_TENANTS", None)
# working state (and the demo's data) of everything the tests run, in-process or not, out of the checkout
os.environ["MAILPIPE_HOME"] = tempfile.mkdtemp(prefix="mailpipe-tests-home-")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tenant(sim, storage: str, *, name: str = "t1", s3: S3Config | None = None,
                limits: Limits | None = None, **kw) -> TenantConfig:
    fields = dict(
        name=name, tenant_id="11111111-2222-3333-4444-555555555555",
        client_id="66666666-7777-8888-9999-000000000000", auth=AuthConfig(simulator=True),
        storage=storage, graph_url=sim.graph_url, authority=sim.authority or "https://127.0.0.1:1",
        s3=s3 or S3Config(), limits=limits or Limits(),
    )
    fields.update(kw)
    return TenantConfig(**fields)


def client_certificate(directory, name):
    """An RSA key and a self-signed certificate, as an admin makes for an Entra app registration: returns
    (PEM file with key + certificate for the credential, PEM of the public certificate for the tenant)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mailpipe {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path = directory / f"{name}.pem"
    path.write_bytes(key_pem + cert_pem)
    return str(path), cert_pem.decode(), key_pem.decode()


@pytest.fixture
def sim_factory():
    """Start simulators in this process; all are stopped at the end of the test."""
    from mailpipe.sim import SimConfig, start_simulator

    started = []

    def start(**kw):
        sim = start_simulator(SimConfig(**kw))
        started.append(sim)
        return sim

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on a real socket (127.0.0.1)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns (endpoint_url, bucket)."""
    from mailpipe.repo.store import make_s3_client

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_server, "us-east-1").create_bucket(Bucket=bucket)
    return s3_server, bucket


# -- Dagster instance storage: SQLite, and a real PostgreSQL ----------------------------------------------
# Tests that use the `env` fixture of test_defs (a Dagster home) run on SQLite; those marked
# `@pytest.mark.backends("sqlite", "postgres")` run on both, on a fresh database of a throwaway PostgreSQL
# server (one per test process, mailpipe_tests/servers.py).

def pytest_generate_tests(metafunc):
    if "dagster_storage" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("dagster_storage", list(marker.args) if marker else ["sqlite"], indirect=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (initdb + pg_ctl under a temp dir, 127.0.0.1, fsync off)."""
    from mailpipe_tests.servers import PostgresServer

    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="session")
def redis_server():
    """A throwaway redis-server (127.0.0.1, no persistence)."""
    from mailpipe_tests.servers import RedisServer

    with RedisServer() as r:
        yield r


@pytest.fixture
def dagster_storage(request):
    """The instance's storage: None for SQLite under $DAGSTER_HOME (the project's dagster.yaml as it is), or
    the `storage:` section of a dagster.yaml naming a fresh PostgreSQL database (dropped afterwards)."""
    if request.param == "sqlite":
        yield None
        return
    assert request.param == "postgres", request.param
    pg = request.getfixturevalue("postgres_server")
    db = pg.create_database()
    yield pg.storage_config(db)
    pg.drop_database(db)
