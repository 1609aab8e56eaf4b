"""Discovery: the same code for the ``discover_mailboxes`` sensor and ``mailpipe discover``."""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from mailpipe.config import TenantConfig
from mailpipe.defs.partitions import (
    MAX_KEYS_PER_SET, ROUTING_PARTITIONS, Layout, partition_key, valid_key,
)
from mailpipe.defs.resources import MailpipeResource


@dataclass
class TenantDiscovery:
    tenant: str
    new_keys: list[str] = field(default_factory=list)      # to register, sorted
    new_by_set: dict[str, list[str]] = field(default_factory=dict)  # {shard's partition set: its new keys, sorted}
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
    """New mailbox keys of ``tenant``, per shard (each shard's sorted, so a shard's new block is contiguous),
    and the vanished ones. Only the tenant's own sets are read."""
    out = TenantDiscovery(tenant.name)
    try:
        found = resource.discover(tenant)
    except Exception as e:  # one tenant's failure must not stop the others
        out.error = f"{type(e).__name__}: {e}"
        return out
    layout = Layout.of([tenant])
    sets = {s.partitions_name: instance.get_dynamic_partitions(s.partitions_name) for s in layout.shards}
    registered = {k for keys in sets.values() for k in keys}
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
    for k in out.new_keys:
        out.new_by_set.setdefault(layout.shard_of(k).partitions_name, []).append(k)
    full = [f"{name} would hold {len(sets[name]) + len(ks):,} keys" for name, ks in out.new_by_set.items()
            if len(sets[name]) + len(ks) > MAX_KEYS_PER_SET]
    if full:  # nothing registered: raise the tenant's `shards` (docs/OPERATIONS.md, "Fleet layout")
        out.error = (f"more than {MAX_KEYS_PER_SET:,} mailboxes in one partition set ({'; '.join(full)}): give the "
                     f"tenant more shards (tenants file: shards, now {layout.counts[tenant.name]}) and run "
                     "`mailpipe migrate-partitions`")
        out.new_keys, out.new_by_set = [], {}
    return out


# Keys per add request: Dagster checks every key of one add in a single `IN (...)` query, and SQLite refuses
# more than 250,000 variables (the first discovery of a 300,000-mailbox tenant failed in one request).
ADD_CHUNK = 50_000


def add_requests(name: str, keys: list[str]) -> list[dg.AddDynamicPartitionsRequest]:
    """Requests adding ``keys`` to the set ``name``, in order, at most ADD_CHUNK keys each."""
    return [dg.AddDynamicPartitionsRequest(partitions_def_name=name, partition_keys=keys[i: i + ADD_CHUNK])
            for i in range(0, len(keys), ADD_CHUNK)]


def registration_requests(reports: list[TenantDiscovery]) -> list[dg.AddDynamicPartitionsRequest]:
    """Add requests for the reports' new keys: each shard's set, and the routing index (all of them)."""
    out = []
    for r in reports:
        for name, keys in sorted(r.new_by_set.items()):
            out += add_requests(name, keys)
    out += add_requests(ROUTING_PARTITIONS, [k for r in reports for k in r.new_keys])
    return out


def register(instance: dg.DagsterInstance, reports: list[TenantDiscovery]) -> int:
    """Register the reports' new keys (what the discovery sensor's requests do); how many."""
    n = 0
    for req in registration_requests(reports):
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        n += len(req.partition_keys) if req.partitions_def_name != ROUTING_PARTITIONS else 0
    return n


def discover_all(resource: MailpipeResource, instance: dg.DagsterInstance, only: str | None = None
                 ) -> list[TenantDiscovery]:
    tenants = resource.tenants() if only is None else [resource.tenant(only)]
    return [discover_tenant(resource, instance, t) for t in tenants]
