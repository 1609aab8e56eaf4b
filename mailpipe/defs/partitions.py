"""One dynamic partition per tenant × mailbox: keys ``<tenant>:<upn lowercased>``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import dagster as dg

PARTITIONS_NAME = "mailboxes"
mailboxes_partitions = dg.DynamicPartitionsDefinition(name=PARTITIONS_NAME)

# characters that break Dagster's key handling (UI selection '|', IO paths '/', CLI ranges '...',
# control characters); a mailbox whose UPN has them is reported, not registered
_BAD_KEY = re.compile(r"[|/\x00-\x1f\x7f]|\.\.\.")


def partition_key(tenant: str, upn: str) -> str:
    return f"{tenant}:{upn.lower()}"


def split_key(key: str) -> tuple[str, str]:
    tenant, sep, upn = key.partition(":")
    if not sep or not tenant or not upn:
        raise ValueError(f"not a mailbox partition key (<tenant>:<upn>): {key!r}")
    return tenant, upn


def valid_key(key: str) -> bool:
    return not _BAD_KEY.search(key)


def group_by_tenant(keys: Iterable[str]) -> dict[str, list[str]]:
    """{tenant: [upn, …]} of partition keys, in their order."""
    out: dict[str, list[str]] = {}
    for k in keys:
        tenant, upn = split_key(k)
        out.setdefault(tenant, []).append(upn)
    return out


@dataclass(frozen=True)
class KeyRange:
    tenant: str
    keys: tuple[str, ...]

    @property
    def start(self) -> str:
        return self.keys[0]

    @property
    def end(self) -> str:
        return self.keys[-1]

    def tags(self) -> dict[str, str]:
        if len(self.keys) == 1:
            return {"dagster/partition": self.start, "tenant": self.tenant}
        return {"dagster/asset_partition_range_start": self.start, "dagster/asset_partition_range_end": self.end,
                "tenant": self.tenant}


def contiguous_ranges(all_keys: list[str], wanted: Iterable[str], batch_size: int) -> Iterator[KeyRange]:
    """Runs of ``wanted`` keys that are contiguous in partition order (what a range run can cover), one
    tenant each, at most ``batch_size`` long."""
    want = set(wanted)
    cur: list[str] = []
    cur_tenant = None
    for k in all_keys:
        t = k.partition(":")[0]
        if k in want and (not cur or (t == cur_tenant and len(cur) < batch_size)):
            cur.append(k)
            cur_tenant = t
            continue
        if cur:
            yield KeyRange(cur_tenant, tuple(cur))
            cur = []
        if k in want:
            cur, cur_tenant = [k], t
    if cur:
        yield KeyRange(cur_tenant, tuple(cur))


def keys_of_run_tags(tags: dict[str, str], all_keys: list[str], index: dict[str, int] | None = None) -> list[str]:
    """The mailbox keys a run covers, from its partition tags (single key or range)."""
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    s, e = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    if s is None or e is None:
        return []
    index = index if index is not None else {k: i for i, k in enumerate(all_keys)}
    if s not in index or e not in index:
        return [k for k in (s, e) if k]
    return all_keys[index[s]: index[e] + 1]
