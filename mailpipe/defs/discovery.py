"""Discovery: the same code for the ``discover_mailboxes`` sensor and ``mailpipe discover``."""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from mailpipe.config import TenantConfig
from mailpipe.defs.partitions import PARTITIONS_NAME, partition_key, split_key, valid_key
from mailpipe.defs.resources import MailpipeResource


@dataclass
class TenantDiscovery:
    tenant: str
    new_keys: list[str] = field(default_factory=list)      # to register, sorted
    known: int = 0                                         # already registered and still there
    vanished: list[str] = field(default_factory=list)      # registered, no longer in the tenant (kept)
    skipped: list[str] = field(default_factory=list)       # users without a mailbox, bad keys
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return f"tenant {self.tenant}: discovery failed: {self.error}"
        s = f"tenant {self.tenant}: {len(self.new_keys)} new, {self.known} known"
        if self.vanished:
            s += f", {len(self.vanished)} vanished (backups kept): {', '.join(self.vanished[:10])}"
        if self.skipped:
            s += f", {len(self.skipped)} skipped: {'; '.join(self.skipped[:10])}"
        return s


def discover_tenant(resource: MailpipeResource, instance: dg.DagsterInstance, tenant: TenantConfig) -> TenantDiscovery:
    """New mailbox keys of ``tenant`` (sorted, so ``tenant:*`` stays contiguous), and the vanished ones."""
    out = TenantDiscovery(tenant.name)
    try:
        found = resource.discover(tenant)
    except Exception as e:  # one tenant's failure must not stop the others
        out.error = f"{type(e).__name__}: {e}"
        return out
    registered = {k for k in instance.get_dynamic_partitions(PARTITIONS_NAME) if split_key(k)[0] == tenant.name}
    current = set()
    for m in found.mailboxes:
        key = partition_key(tenant.name, m.upn)
        if not valid_key(key):
            out.skipped.append(f"{m.upn}: characters unusable in a partition key")
            continue
        current.add(key)
    out.skipped += [f"{s.upn}: {s.reason}" for s in found.skipped]
    out.new_keys = sorted(current - registered)
    out.known = len(current & registered)
    out.vanished = sorted(registered - current)
    return out


def discover_all(resource: MailpipeResource, instance: dg.DagsterInstance, only: str | None = None
                 ) -> list[TenantDiscovery]:
    tenants = resource.tenants() if only is None else [resource.tenant(only)]
    return [discover_tenant(resource, instance, t) for t in tenants]
