"""``mailpipe discover`` and ``mailpipe demo``: the Dagster layer from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("discover", help="register the mailboxes of a tenant (or all) as Dagster partitions",
                       description="List the tenant's mailboxes through Graph and register new ones as "
                       "partitions of the mailbox_backup asset, in the Dagster instance of $DAGSTER_HOME "
                       "(default: .mailpipe/dagster_home). Same code as the discover_mailboxes sensor.")
    d.add_argument("tenant", nargs="?", help="one tenant (default: all)")
    d.set_defaults(func=_discover)
    g = sub.add_parser("migrate-partitions", help="register every mailbox of the routing index in its shard's "
                       "partition set (an instance from before the fleet layout, or a tenant re-sharded)",
                       description="Every key of the Dagster set `mailboxes` (every mailbox ever registered, "
                       "vanished ones too) whose tenant is configured is added to its shard's partition set "
                       "(mailboxes__<tenant>[__sKKofNN]), each set's new keys sorted. Idempotent. The old asset "
                       "`mailbox_backup` and its history stay in the instance, readable as before "
                       "(docs/OPERATIONS.md, \"Fleet layout\").")
    g.add_argument("--dry-run", action="store_true", help="say what would be registered; register nothing")
    g.set_defaults(func=_migrate)
    m = sub.add_parser("demo", help="back up the demo tenant twice through Dagster, and print a summary",
                       description="On the built-in demo tenant (simulated Graph, local storage under "
                       ".mailpipe): discover its mailboxes, back them up with mailbox_backup_job in batched "
                       "runs, change the simulated mailboxes, back up again incrementally, and print a summary. "
                       "The runs are recorded in the Dagster instance of $DAGSTER_HOME "
                       "(default .mailpipe/dagster_home), so they show in the UI.")
    m.add_argument("--changes", type=int, default=20, help="random changes per mailbox between the two backups")
    m.set_defaults(func=_demo)


def packaged_dagster_yaml() -> bytes:
    """mailpipe's Dagster instance config, as shipped in the package (``mailpipe/defs/dagster.yaml``;
    the repository's top-level ``dagster.yaml`` links to it). Read through :mod:`importlib.resources`,
    so it is found in an installed wheel as in a checkout."""
    from importlib.resources import files

    return files("mailpipe.defs").joinpath("dagster.yaml").read_bytes()


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, or .mailpipe/dagster_home holding mailpipe's dagster.yaml.

    The yaml written is always the packaged one: without it an instance runs with no per-tenant run
    limit, no run retries and no run monitoring, and nothing would say so — so a broken install fails
    here instead of falling back to another config. An existing dagster.yaml is left as it is."""
    from mailpipe.config import mailpipe_home

    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    p = mailpipe_home() / "dagster_home"
    p.mkdir(parents=True, exist_ok=True)
    yaml_path = p / "dagster.yaml"
    if not yaml_path.exists():
        tmp = yaml_path.with_name(f".dagster.yaml.{os.getpid()}")
        tmp.write_bytes(packaged_dagster_yaml())
        os.replace(tmp, yaml_path)  # never a half-written instance config
    os.environ["DAGSTER_HOME"] = str(p)
    return p


def _discover(args: argparse.Namespace) -> int:
    import dagster as dg

    from mailpipe.defs.discovery import discover_all, register as register_keys
    from mailpipe.defs.resources import MailpipeResource

    home = ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    failed = False
    for r in discover_all(MailpipeResource.from_settings(args.settings), instance, args.tenant):
        register_keys(instance, [r])
        print(r.summary())
        failed |= r.error is not None
    print(f"(Dagster instance: {home})", file=sys.stderr)
    return 1 if failed else 0


def migrate_partitions(instance, layout, dry_run: bool = False) -> list[str]:
    """Register every key of the routing index in its shard's set; one line per set (and per unknown tenant)."""
    from mailpipe.defs.discovery import add_requests
    from mailpipe.defs.partitions import MAX_KEYS_PER_SET, ROUTING_PARTITIONS, KeyCache, split_key

    cache = KeyCache(instance, layout)
    by_set: dict = {}
    unknown: dict[str, int] = {}
    for k in instance.get_dynamic_partitions(ROUTING_PARTITIONS):
        shard = layout.shard_of(k)
        if shard is None:
            t = split_key(k)[0]
            unknown[t] = unknown.get(t, 0) + 1
            continue
        by_set.setdefault(shard, []).append(k)
    lines = []
    for shard in layout.shards:
        index = cache.index(shard)
        new = sorted(k for k in by_set.get(shard, []) if k not in index.pos)
        if len(index) + len(new) > MAX_KEYS_PER_SET:
            lines.append(f"{shard.partitions_name}: would hold {len(index) + len(new):,} keys (more than "
                         f"{MAX_KEYS_PER_SET:,}): give tenant {shard.tenant} more shards; nothing registered")
            continue
        if new and not dry_run:
            for req in add_requests(shard.partitions_name, new):
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        lines.append(f"{shard.partitions_name}: {len(new)} {'to register' if dry_run else 'registered'}, "
                     f"{len(index)} already there (asset {shard.asset_key.to_user_string()})")
    for t, n in sorted(unknown.items()):
        lines.append(f"tenant {t}: {n} key(s) in {ROUTING_PARTITIONS}, not in the tenants file: left as they are")
    return lines


def _migrate(args: argparse.Namespace) -> int:
    import dagster as dg

    from mailpipe.config import load_tenants
    from mailpipe.defs.partitions import LEGACY_ASSET_KEY, Layout

    home = ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    lines = migrate_partitions(instance, Layout.of(load_tenants()), args.dry_run)
    for line in lines:
        print(line)
    if instance.get_latest_materialization_event(LEGACY_ASSET_KEY) is not None:
        print(f"the pre-fleet asset {LEGACY_ASSET_KEY.to_user_string()} keeps its history (partition set "
              "mailboxes); it is no longer backed up")
    print(f"(Dagster instance: {home})", file=sys.stderr)
    return 1 if any("nothing registered" in line for line in lines) else 0


# the demo prints its own summary; Dagster's step-by-step log stays in the run's log (the UI shows it)
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _run_batches(instance, keys: list[str]) -> dict[str, dict]:
    """Execute mailbox_backup_job over ``keys`` in batched runs; {key: metadata or {"error": ...}}."""
    from mailpipe.defs import current_definitions, current_layout
    from mailpipe.defs.partitions import KeyCache, contiguous_ranges
    from mailpipe.defs.settings import BATCH_SIZE

    defs, cache = current_definitions(), KeyCache(instance, current_layout())
    out: dict[str, dict] = {}
    by_shard: dict = {}
    for k in keys:
        by_shard.setdefault(cache.layout.shard_of(k), []).append(k)
    ranges = [r for shard, ks in by_shard.items() for r in contiguous_ranges(cache.index(shard), ks, BATCH_SIZE, shard)]
    for rng in ranges:
        job = defs.resolve_job_def(rng.shard.backup_job_name)
        res = job.execute_in_process(instance=instance, tags={**rng.tags(), "mailpipe/source": "demo"},
                                     raise_on_error=False, run_config=QUIET)
        for ev in res.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            out[mat.partition] = {k: v.value for k, v in mat.metadata.items()}
        for k in rng.keys:
            out.setdefault(k, {"error": f"run {res.run_id} failed"})
    return out


def _summary(label: str, results: dict[str, dict], seconds: float) -> None:
    ok = {k: v for k, v in results.items() if "error" not in v}
    tot = lambda f: sum(int(v.get(f, 0)) for v in ok.values())  # noqa: E731
    print(f"\n{label}: {len(ok)}/{len(results)} mailboxes in {seconds:.1f}s")
    print(f"  items       {tot('items_total'):>10,}   (+{tot('items_new')} new, ~{tot('items_changed')} changed, "
          f"-{tot('items_removed')} removed, {tot('items_reused')} reused without download)")
    print(f"  fetched     {tot('bytes_fetched'):>10,} bytes from Graph in {tot('requests'):,} requests")
    print(f"  stored      {tot('bytes_stored_new'):>10,} bytes newly written (compressed, deduplicated)")
    for k, v in sorted(results.items()):
        if "error" in v:
            print(f"  FAILED {k}: {v['error']}")


def _demo(args: argparse.Namespace) -> int:
    import dagster as dg

    from mailpipe.config import DEMO_TENANT, TENANTS_ENV, demo_tenant
    from mailpipe.defs.discovery import discover_tenant, register as register_keys
    from mailpipe.defs.partitions import Layout
    from mailpipe.defs.resources import MailpipeResource
    from mailpipe.sim import _Endpoint
    from mailpipe.sim.embedded import ensure_running

    if os.environ.pop(TENANTS_ENV, None):
        print(f"note: the demo uses the built-in demo tenant; {TENANTS_ENV} is ignored", file=sys.stderr)
    t0 = time.monotonic()
    home = ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    tenant = demo_tenant()
    print(f"mailpipe demo — tenant '{DEMO_TENANT}' (simulated Graph), repository {tenant.storage}")
    rep = discover_tenant(MailpipeResource.from_settings(args.settings), instance, tenant)
    if rep.error:
        print(f"discovery failed: {rep.error}", file=sys.stderr)
        return 1
    register_keys(instance, [rep])
    print(rep.summary())
    keys = sorted(k for s in Layout.of([tenant]).shards for k in instance.get_dynamic_partitions(s.partitions_name)
                  if k not in rep.vanished)
    t1 = time.monotonic()
    first = _run_batches(instance, keys)
    _summary("backup 1", first, time.monotonic() - t1)

    opts = dict(tenant.simulator)
    ep = _Endpoint()
    info = ensure_running(opts.pop("state_dir"), opts)
    ep.base_url, ep.ca_file = info.base_url, info.ca_file
    seed = int(time.time())
    for k in keys:
        ep.mutate(k.split(":", 1)[1], random=args.changes, seed=seed)
    print(f"\nchanged the simulated mailboxes: {args.changes} random changes each (new mail, read/flag, moves, "
          "deletes, folder renames/moves)")
    t2 = time.monotonic()
    second = _run_batches(instance, keys)
    _summary("backup 2 (incremental)", second, time.monotonic() - t2)

    upn = keys[0].split(":", 1)[1] if keys else "<upn>"
    print(f"""
done in {time.monotonic() - t0:.1f}s. Snapshots are in {tenant.storage}
  list them:     mailpipe snapshots {DEMO_TENANT}
  export one:    mailpipe export {DEMO_TENANT} {upn} --out /tmp/mailpipe-export
  check them:    mailpipe check {DEMO_TENANT} --read-data
  open the UI:   DAGSTER_HOME={home} .venv/bin/dagster dev -m mailpipe.definitions -h 127.0.0.1 -p 3000""")
    failed = [k for r in (first, second) for k, v in r.items() if "error" in v]
    return 1 if failed else 0
