"""The partition layout: keys ``<tenant>:<upn lowercased>``, one asset and one partition set per tenant shard.

Dagster advises at most ~100k partitions per asset (docs/OPERATIONS.md, "Fleet layout": past that the
UI's Partitions tab ships tens of MB, range runs load every key, the status cache is rebuilt whenever a key
is added). So every tenant gets its own asset ``mailbox_backup/<tenant>`` on its own dynamic partition set
``mailboxes__<tenant>``; a tenant configured with ``shards: N`` (N > 1) gets N of each,
``mailbox_backup/<tenant>/sKKofNN`` on ``mailboxes__<tenant>__sKKofNN``, and a mailbox lives in shard
``sha256(upn) mod N`` for ever (N is part of the names: a tenant re-sharded gets new sets and assets).

Every key is also registered in the set ``mailboxes``: the *routing index* of the two entry-point jobs
(``mailbox_backup_job``, ``content_sample_job``) that users launch by key (``dg launch --partition`` checks
the key against the job's set, one row looked up). No asset is partitioned by it; it is also the set the
pre-fleet layout used, so an existing instance already has it (migration: docs/OPERATIONS.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import dagster as dg

ROUTING_PARTITIONS = "mailboxes"        # every key: the routing index of the entry-point jobs (and the
                                        # pre-fleet layout's one set)
MAX_KEYS_PER_SET = 100_000              # Dagster's advice per asset; discovery refuses to go past it
ASSET_PREFIX = "mailbox_backup"
LEGACY_ASSET_KEY = dg.AssetKey(ASSET_PREFIX)  # the pre-fleet asset: its history stays in the event log
routing_partitions = dg.DynamicPartitionsDefinition(name=ROUTING_PARTITIONS)

# characters that break Dagster's key handling (UI selection '|', IO paths '/', CLI ranges '...',
# control characters); a mailbox whose UPN has them is reported, not registered
_BAD_KEY = re.compile(r"[|/\x00-\x1f\x7f]|\.\.\.")

# run tags that make the Runs page readable (set at launch, or at run start for UI backfills)
MAILBOXES_TAG = "mailpipe/mailboxes"    # how many mailboxes the run covers
RANGE_TAG = "mailpipe/range"            # "<first> … <last>" (or the one key)
SHARD_TAG = "mailpipe/shard"            # the partition set of the run's keys
ROUTED_BY_TAG = "mailpipe/routed_by"    # the entry-point run that started this run (routing.py)
RETRY_OF_TAG = "mailpipe/retry_of"      # ... when that run is a retry: the run it retries (its root)


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


def shard_index(upn: str, count: int) -> int:
    """The shard of a mailbox among ``count``: the first 8 bytes of sha256(lower-cased UPN), big-endian,
    mod ``count``. A pure function of the UPN: the same shard on every machine and every release."""
    if count <= 1:
        return 0
    h = hashlib.sha256(upn.lower().encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """One asset and its partition set: a whole tenant (``count == 1``) or one of its hash shards."""

    tenant: str
    index: int = 0
    count: int = 1

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f"s{self.index:02d}of{self.count:02d}"

    @property
    def partitions_name(self) -> str:
        return f"mailboxes__{self.tenant}" + (f"__{self.suffix}" if self.suffix else "")

    @property
    def asset_key(self) -> dg.AssetKey:
        return dg.AssetKey([ASSET_PREFIX, self.tenant] + ([self.suffix] if self.suffix else []))

    @property
    def ident(self) -> str:
        """A Python identifier for job names ('-' is not allowed there; tenant names have no '_')."""
        return self.tenant.replace("-", "_") + (f"__{self.suffix}" if self.suffix else "")

    @property
    def backup_job_name(self) -> str:
        return f"mailbox_backup_job__{self.ident}"

    @property
    def sample_job_name(self) -> str:
        return f"content_sample_job__{self.ident}"

    @property
    def partitions_def(self) -> dg.DynamicPartitionsDefinition:
        return _partitions_def(self.partitions_name)

    def __str__(self) -> str:
        return self.partitions_name


_DEFS: dict[str, dg.DynamicPartitionsDefinition] = {}


def _partitions_def(name: str) -> dg.DynamicPartitionsDefinition:
    if name not in _DEFS:
        _DEFS[name] = dg.DynamicPartitionsDefinition(name=name)
    return _DEFS[name]


@dataclass(frozen=True)
class Layout:
    """The shards of the configured tenants: ``{tenant: shard count}`` (the tenants file's ``shards``)."""

    counts: dict[str, int]

    @classmethod
    def of(cls, tenants: Iterable) -> Layout:
        return cls({t.name: max(1, int(getattr(t, "shards", 1) or 1)) for t in tenants})

    @cached_property
    def shards(self) -> list[Shard]:
        return [s for t in sorted(self.counts) for s in self.shards_of(t)]

    def shards_of(self, tenant: str) -> list[Shard]:
        n = self.counts.get(tenant)
        return [] if n is None else [Shard(tenant, i, n) for i in range(n)]

    def shard_of(self, key: str) -> Shard | None:
        """The shard that holds ``key``; None for a tenant that is not configured."""
        tenant, upn = split_key(key)
        n = self.counts.get(tenant)
        return None if n is None else Shard(tenant, shard_index(upn, n), n)



@dataclass(frozen=True)
class KeyRange:
    tenant: str
    keys: tuple[str, ...]
    shard: Shard | None = None

    @property
    def start(self) -> str:
        return self.keys[0]

    @property
    def end(self) -> str:
        return self.keys[-1]

    def tags(self) -> dict[str, str]:
        """Partition tags (one key, or a range) and the readable ones: tenant, count, range, shard."""
        info = {"tenant": self.tenant, **range_tags(self.keys)}
        if self.shard is not None:
            info[SHARD_TAG] = self.shard.partitions_name
        if len(self.keys) == 1:
            return {"dagster/partition": self.start, **info}
        return {"dagster/asset_partition_range_start": self.start, "dagster/asset_partition_range_end": self.end,
                **info}


def range_tags(keys: Sequence[str]) -> dict[str, str]:
    """``mailpipe/mailboxes`` and ``mailpipe/range`` of a run covering ``keys`` (in order)."""
    if not keys:
        return {MAILBOXES_TAG: "0"}
    rng = keys[0] if len(keys) == 1 else f"{keys[0]} … {keys[-1]}"
    return {MAILBOXES_TAG: str(len(keys)), RANGE_TAG: rng}


class KeyIndex:
    """A partition set's keys in registration order and their positions (a dict: ``list.index`` is O(n)
    per key, 3.7 ms per key at 1M keys)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.pos = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: str, end: str) -> list[str] | None:
        """The keys from ``start`` to ``end`` inclusive, as a range run covers them; None if either is not
        in the set (or end comes first)."""
        i, j = self.pos.get(start), self.pos.get(end)
        if i is None or j is None or j < i:
            return None
        return self.keys[i: j + 1]

    def sort(self, keys: Iterable[str]) -> list[str]:
        """``keys`` in registration order (keys not in the set are left out)."""
        return sorted((k for k in keys if k in self.pos), key=self.pos.__getitem__)


@dataclass
class KeyCache:
    """Partition sets read from the instance once per tick (sensors) or run (routing)."""

    instance: dg.DagsterInstance
    layout: Layout
    sets: dict[str, KeyIndex] = field(default_factory=dict)

    def index(self, shard: Shard) -> KeyIndex:
        name = shard.partitions_name
        if name not in self.sets:
            self.sets[name] = KeyIndex(self.instance.get_dynamic_partitions(name))
        return self.sets[name]

    def tenant_keys_between(self, start: str, end: str) -> list[str]:
        """Every registered key of ``start``'s tenant from ``start`` to ``end`` in sorted order (the meaning of
        a range given to the entry-point jobs, whose set is only a routing index): reads that tenant's
        shard sets, not the others'."""
        tenant = split_key(start)[0]
        if split_key(end)[0] != tenant or end < start:
            return []
        return sorted(k for s in self.layout.shards_of(tenant) for k in self.index(s).keys if start <= k <= end)

    def keys_of_run(self, job_name: str, tags: dict[str, str]) -> list[str]:
        """The mailbox keys a run covers, from its partition tags: one key; a range of a shard's set (runs
        of a shard's jobs, and UI backfills, which run as ``__ASSET_JOB``); or, for the entry-point jobs, the
        tenant's keys between the two ends."""
        if "dagster/partition" in tags:
            return [tags["dagster/partition"]]
        s, e = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
        if s is None or e is None:
            return []
        try:
            shard = self.layout.shard_of(s)
        except ValueError:
            return []
        if job_name in ENTRY_JOBS:
            return self.tenant_keys_between(s, e)
        if shard is None:
            return [s, e]
        got = self.index(shard).slice(s, e)
        return got if got is not None else [s, e]


ENTRY_JOBS = ("mailbox_backup_job", "content_sample_job")


def contiguous_ranges(index: KeyIndex, wanted: Iterable[str], batch_size: int, shard: Shard | None = None
                      ) -> Iterator[KeyRange]:
    """Runs of ``wanted`` keys that are contiguous in the set's order (what a range run can cover), one
    tenant each, at most ``batch_size`` long. Walks the wanted keys by position, not the whole set."""
    pos = sorted(index.pos[k] for k in set(wanted) if k in index.pos)
    cur: list[str] = []
    last = -2
    for p in pos:
        k = index.keys[p]
        t = k.partition(":")[0]
        if cur and (p != last + 1 or len(cur) >= batch_size or t != cur[0].partition(":")[0]):
            yield KeyRange(cur[0].partition(":")[0], tuple(cur), shard)
            cur = []
        cur.append(k)
        last = p
    if cur:
        yield KeyRange(cur[0].partition(":")[0], tuple(cur), shard)

