"""The tenants file: what mailpipe backs up, from where, to where.

``MAILPIPE_TENANTS`` names a YAML file (format in ``docs/CONFIG.md``). When it is unset, the built-in
**demo** tenant is used: a simulated Graph tenant (started on demand, see :mod:`mailpipe.sim`) and a
local repository under ``.mailpipe/`` in the working directory, so everything runs on a fresh machine
with no credentials.

Every error names the tenant and the field; secrets are never read here (only the *name* of the
environment variable that holds one) and never echoed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mailpipe.errors import UserError
from mailpipe.retention import RetentionConfig, parse_retention

TENANTS_ENV = "MAILPIPE_TENANTS"
HOME_ENV = "MAILPIPE_HOME"  # where the demo keeps its repository and simulator state
DEMO_TENANT = "demo"
GRAPH_URL = "https://graph.microsoft.com/v1.0"
AUTHORITY = "https://login.microsoftonline.com"
# The graph_url of a tenant whose Graph is the embedded simulator, started on demand.
EMBEDDED_SIM_URL = "sim://embedded"

_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(UserError, ValueError):
    """A tenants file that cannot be used. The message names the file, the tenant and the field."""


@dataclass(frozen=True)
class AuthConfig:
    client_secret_env: str | None = None
    certificate_path: str | None = None
    managed_identity: bool = False
    simulator: bool = False

    @property
    def kind(self) -> str:
        if self.client_secret_env:
            return "client_secret"
        if self.certificate_path:
            return "certificate"
        if self.managed_identity:
            return "managed_identity"
        return "simulator"


@dataclass(frozen=True)
class EncryptionConfig:
    """Client-side encryption of a new repository (docs/FORMAT.md, "Encryption"): the passphrase is read
    from the environment variable ``passphrase_env`` (never from the file)."""
    passphrase_env: str


@dataclass(frozen=True)
class RestoreConfig:
    """Write credentials for restores: a separate app registration (``Mail.ReadWrite``), so that the backup
    app can stay read-only. ``client_id`` defaults to the tenant's."""
    auth: AuthConfig
    client_id: str | None = None


@dataclass(frozen=True)
class ObjectLockConfig:
    """S3 Object Lock on what the repository writes once (content, indexes, keys, committed snapshots):
    each such object is locked in ``mode`` for ``days`` from its upload (docs/CONFIG.md, "Object Lock")."""
    mode: str  # "GOVERNANCE" or "COMPLIANCE"
    days: int

    MODES = ("GOVERNANCE", "COMPLIANCE")
    MAX_DAYS = 36500


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = None
    region: str | None = None
    object_lock: ObjectLockConfig | None = None  # None: objects are written without a retention date


@dataclass(frozen=True)
class MailboxFilter:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def matches(self, upn: str) -> bool:
        u = upn.lower()
        return any(fnmatch.fnmatchcase(u, p.lower()) for p in self.include) and not any(
            fnmatch.fnmatchcase(u, p.lower()) for p in self.exclude
        )


@dataclass(frozen=True)
class Limits:
    concurrent_requests_per_mailbox: int = 4
    requests_per_10min_per_mailbox: int = 9600
    # restores: request bodies per mailbox per 5 minutes (Exchange: 150 MB; a margin under it)
    upload_bytes_per_5min_per_mailbox: int = 152_000_000


@dataclass(frozen=True)
class TenantConfig:
    name: str
    tenant_id: str
    client_id: str
    auth: AuthConfig
    storage: str
    graph_url: str = GRAPH_URL
    authority: str = AUTHORITY
    ca_bundle: str | None = None
    s3: S3Config = field(default_factory=S3Config)
    mailboxes: MailboxFilter = field(default_factory=MailboxFilter)
    limits: Limits = field(default_factory=Limits)
    # Options of the embedded simulator (only for graph_url == EMBEDDED_SIM_URL), e.g. {"users": 8}.
    simulator: dict[str, Any] = field(default_factory=dict)
    restore: RestoreConfig | None = None  # write credentials for restores (default: the tenant's own)
    retention: RetentionConfig | None = None  # which snapshots `forget` keeps (None: all of them)
    encryption: EncryptionConfig | None = None  # client-side encryption (chosen when the repository is created)
    # what a backup stores of each item: "mime" ($value of messages), "fidelity" (the mailbox export API: every
    # item type, full fidelity; MailboxItem.Export.All), "both" (docs/CONFIG.md)
    content: str = "mime"
    # Dagster assets (and partition sets) the tenant's mailboxes are spread over, by a hash of the UPN:
    # more than 1 only past ~80,000 mailboxes (docs/OPERATIONS.md, "Fleet layout"); chosen once
    shards: int = 1

    @property
    def uses_embedded_simulator(self) -> bool:
        return self.graph_url == EMBEDDED_SIM_URL

    @property
    def storage_is_s3(self) -> bool:
        return self.storage.startswith("s3://")

    def partition_key(self, upn: str) -> str:
        return f"{self.name}:{upn.lower()}"

    def for_restore(self) -> TenantConfig:
        """This tenant with the credentials restores write with (``restore:``, else its own)."""
        from dataclasses import replace

        if self.restore is None:
            return self
        return replace(self, auth=self.restore.auth, client_id=self.restore.client_id or self.client_id)


def mailpipe_home() -> Path:
    """Where the demo keeps its data: ``$MAILPIPE_HOME`` or ``./.mailpipe``."""
    return Path(os.environ.get(HOME_ENV) or ".mailpipe").absolute()


def demo_tenant() -> TenantConfig:
    home = mailpipe_home()
    return TenantConfig(
        name=DEMO_TENANT,
        tenant_id="00000000-0000-4000-8000-00000000d3e0",
        client_id="00000000-0000-4000-8000-0000000c11e7",
        auth=AuthConfig(simulator=True),
        storage=str(home / "repos" / DEMO_TENANT),
        graph_url=EMBEDDED_SIM_URL,
        authority=EMBEDDED_SIM_URL,
        simulator={"state_dir": str(home / "sim" / DEMO_TENANT)},
    )


def load_tenants(path: str | os.PathLike[str] | None = None) -> list[TenantConfig]:
    """The configured tenants: from ``path``, else ``$MAILPIPE_TENANTS``, else the demo tenant."""
    if path is None:
        path = os.environ.get(TENANTS_ENV) or None
    if path is None:
        return [demo_tenant()]
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the tenants file ({e.strerror or e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
    return parse_tenants(doc, source=str(p))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where (line, column) — never the offending text: the line may hold a pasted secret."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or type(e).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def find_tenant(name: str, path: str | os.PathLike[str] | None = None) -> TenantConfig:
    """The configured tenant called ``name`` (see :func:`load_tenants`); a :class:`UserError` naming the
    configured ones when there is none."""
    tenants = load_tenants(path)
    for t in tenants:
        if t.name == name:
            return t
    raise UserError(f"unknown tenant {name!r}; configured: {', '.join(t.name for t in tenants)}")


def parse_tenants(doc: Any, source: str = "<tenants>") -> list[TenantConfig]:
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), list) or not doc["tenants"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty list 'tenants:'")
    unknown = set(doc) - {"tenants"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field(s): {', '.join(sorted(map(str, unknown)))}")
    tenants: list[TenantConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["tenants"]):
        t = _parse_tenant(raw, f"{source}: tenants[{i}]")
        if t.name in seen:
            raise ConfigError(f"{source}: tenant {t.name!r}: the name is used twice")
        seen.add(t.name)
        tenants.append(t)
    return tenants


# content modes (docs/CONFIG.md): MIME $value, the mailbox export API, or both
CONTENT_MODES = ("mime", "fidelity", "both")

_TENANT_FIELDS = {
    "name", "tenant_id", "client_id", "auth", "graph_url", "authority", "ca_bundle", "storage", "s3",
    "mailboxes", "limits", "simulator", "restore", "encryption", "retention", "content", "shards",
}


def _parse_tenant(raw: Any, where: str) -> TenantConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: field 'name' must match [a-z0-9-]+ (got {name!r})")
    where = f"{where.split(':')[0]}: tenant {name!r}"

    def err(fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: field {fld!r}: {msg}")

    unknown = set(raw) - _TENANT_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s): {', '.join(sorted(map(str, unknown)))}")

    def guid(fld: str) -> str:
        v = raw.get(fld)
        try:
            return str(uuid.UUID(str(v)))
        except (ValueError, TypeError):
            raise err(fld, "must be a GUID") from None

    graph_url = _url(raw.get("graph_url", GRAPH_URL), "graph_url", err, allow_sim=True)
    authority = _url(raw.get("authority", AUTHORITY), "authority", err, allow_sim=True)
    auth = _parse_auth(raw.get("auth"), err)
    if auth.simulator and graph_url.startswith("https://graph.microsoft"):
        raise err("auth", "'simulator: true' only works with a simulator graph_url")

    storage = raw.get("storage")
    if not isinstance(storage, str) or not storage.strip():
        raise err("storage", "required: s3://bucket/prefix, a local path or a file:// URL")
    storage = storage.strip()
    if storage.startswith("s3://"):
        if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", storage):
            raise err("storage", f"not a valid s3://bucket/prefix URL: {storage!r}")
    elif "://" in storage and not storage.startswith("file://"):
        raise err("storage", f"unsupported scheme in {storage!r} (use s3://, file:// or a path)")

    ca_bundle = raw.get("ca_bundle")
    if ca_bundle is not None and (not isinstance(ca_bundle, str) or not Path(ca_bundle).is_file()):
        raise err("ca_bundle", f"not a readable file: {ca_bundle!r}")

    s3_raw = _mapping(raw.get("s3"), "s3", err, {"endpoint_url", "region", "object_lock"})
    s3 = S3Config(
        endpoint_url=_opt_str(s3_raw.get("endpoint_url"), "s3.endpoint_url", err),
        region=_opt_str(s3_raw.get("region"), "s3.region", err),
        object_lock=_object_lock(s3_raw.get("object_lock"), storage, err),
    )
    mb_raw = _mapping(raw.get("mailboxes"), "mailboxes", err, {"include", "exclude"})
    mailboxes = MailboxFilter(
        include=_globs(mb_raw.get("include", ["*"]), "mailboxes.include", err),
        exclude=_globs(mb_raw.get("exclude", []), "mailboxes.exclude", err),
    )
    lim_raw = _mapping(
        raw.get("limits"), "limits", err,
        {"concurrent_requests_per_mailbox", "requests_per_10min_per_mailbox", "upload_bytes_per_5min_per_mailbox"},
    )
    limits = Limits(
        concurrent_requests_per_mailbox=_pos_int(
            lim_raw.get("concurrent_requests_per_mailbox", 4), "limits.concurrent_requests_per_mailbox", err, 16
        ),
        requests_per_10min_per_mailbox=_pos_int(
            lim_raw.get("requests_per_10min_per_mailbox", 9600), "limits.requests_per_10min_per_mailbox", err,
            1_000_000,
        ),
        upload_bytes_per_5min_per_mailbox=_pos_int(
            lim_raw.get("upload_bytes_per_5min_per_mailbox", Limits.upload_bytes_per_5min_per_mailbox),
            "limits.upload_bytes_per_5min_per_mailbox", err, 10**12,
        ),
    )
    content = raw.get("content", "mime")
    if content not in CONTENT_MODES:
        raise err("content", f"must be one of {', '.join(CONTENT_MODES)} (got {content!r})")
    sim = raw.get("simulator") or {}
    if not isinstance(sim, dict):
        raise err("simulator", "expected a mapping of simulator options")
    restore = None
    encryption = None
    if raw.get("encryption") is not None:
        e_raw = _mapping(raw.get("encryption"), "encryption", err, {"passphrase_env"})
        env_name = e_raw.get("passphrase_env")
        if not isinstance(env_name, str) or not _ENV_NAME_RE.match(env_name):
            raise err("encryption.passphrase_env", "must name an environment variable (the passphrase itself "
                      "never goes in this file)")
        encryption = EncryptionConfig(passphrase_env=env_name)
    if raw.get("restore") is not None:
        r_raw = _mapping(raw.get("restore"), "restore", err, {"auth", "client_id"})

        def r_err(fld: str, msg: str) -> ConfigError:
            return err(f"restore.{fld}", msg)

        r_client = r_raw.get("client_id")
        if r_client is not None:
            try:
                r_client = str(uuid.UUID(str(r_client)))
            except (ValueError, TypeError):
                raise r_err("client_id", "must be a GUID") from None
        restore = RestoreConfig(auth=_parse_auth(r_raw.get("auth"), r_err), client_id=r_client)
    return TenantConfig(
        name=name, tenant_id=guid("tenant_id"), client_id=guid("client_id"), auth=auth, storage=storage,
        graph_url=graph_url, authority=authority, ca_bundle=ca_bundle, s3=s3, mailboxes=mailboxes,
        limits=limits, simulator=dict(sim), restore=restore,
        retention=parse_retention(raw.get("retention"), err), encryption=encryption, content=content,
        shards=_pos_int(raw.get("shards", 1), "shards", err, 99),
    )


def _parse_auth(raw: Any, err) -> AuthConfig:
    if not isinstance(raw, dict) or not raw:
        raise err("auth", "required: exactly one of client_secret_env, certificate_path, managed_identity, simulator")
    unknown = set(raw) - {"client_secret_env", "certificate_path", "managed_identity", "simulator"}
    if unknown:
        # Do not echo values: a secret pasted into the wrong field must not end up in a log.
        raise err("auth", f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    chosen = [k for k, v in raw.items() if v not in (None, False, "")]
    if len(chosen) != 1:
        raise err("auth", f"exactly one of client_secret_env, certificate_path, managed_identity, simulator "
                          f"must be set (got: {', '.join(sorted(chosen)) or 'none'})")
    k = chosen[0]
    v = raw[k]
    if k == "client_secret_env":
        if not isinstance(v, str) or not _ENV_NAME_RE.match(v):
            raise err("auth.client_secret_env", "must be the NAME of an environment variable holding the "
                                                "secret, not the secret itself")
        return AuthConfig(client_secret_env=v)
    if k == "certificate_path":
        if not isinstance(v, str):
            raise err("auth.certificate_path", "must be a path to a PEM file")
        return AuthConfig(certificate_path=v)
    if v is not True:
        raise err(f"auth.{k}", "must be true")
    return AuthConfig(managed_identity=True) if k == "managed_identity" else AuthConfig(simulator=True)


def _object_lock(v: Any, storage: str, err) -> ObjectLockConfig | None:
    if v is None:
        return None
    fld = "s3.object_lock"
    if not storage.startswith("s3://"):
        raise err(fld, "S3 Object Lock needs an s3:// storage; a local repository cannot be locked "
                       "(remove object_lock, or use an S3 bucket created with Object Lock enabled)")
    raw = _mapping(v, fld, err, {"mode", "days"})
    mode = raw.get("mode")
    if not isinstance(mode, str) or mode.upper() not in ObjectLockConfig.MODES:
        raise err(f"{fld}.mode", f"expected GOVERNANCE or COMPLIANCE (got {mode!r})")
    if "days" not in raw:
        raise err(f"{fld}.days", "required: how many days each object stays locked after it is written")
    days = _pos_int(raw["days"], f"{fld}.days", err, ObjectLockConfig.MAX_DAYS)
    return ObjectLockConfig(mode=mode.upper(), days=days)


def _url(v: Any, fld: str, err, allow_sim: bool) -> str:
    if not isinstance(v, str) or not re.match(r"^https?://[^\s/]+", v):
        if allow_sim and v == EMBEDDED_SIM_URL:
            return v
        raise err(fld, f"must be an http(s) URL (got {v!r})")
    if v.startswith("http://") and not re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)", v):
        raise err(fld, "plain http is only allowed for 127.0.0.1/localhost (a simulator)")
    return v.rstrip("/")


def _mapping(v: Any, fld: str, err, allowed: set[str]) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise err(fld, "expected a mapping")
    unknown = set(v) - allowed
    if unknown:
        raise err(fld, f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    return v


def _opt_str(v: Any, fld: str, err) -> str | None:
    if v is None or isinstance(v, str):
        return v or None
    raise err(fld, "expected a string")


def _globs(v: Any, fld: str, err) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise err(fld, "expected a list of glob patterns")
    return tuple(v)


def _pos_int(v: Any, fld: str, err, maximum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= maximum:
        raise err(fld, f"expected a whole number from 1 to {maximum} (got {v!r})")
    return v
