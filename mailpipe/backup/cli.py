"""``mailpipe backup``: run the engine without Dagster (scripts, debugging, the kill/resume test)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup",
        help="back up mailboxes of a tenant now (without Dagster)",
        description="Back up mailboxes of TENANT directly with the engine, concurrently, and print one "
        "line per mailbox. Exit status 1 if any mailbox failed (one that another backup is running for "
        "fails at once with 'another backup of this mailbox is running'), 2 if the tenant cannot be used "
        "at all (its repository or Graph). Settings come from MAILPIPE_* variables (docs/OPERATIONS.md). "
        "Orchestrated backups (schedules, retries, the UI) go through Dagster instead: see the README.",
    )
    p.add_argument("tenant", help="tenant name from the tenants file (demo without one)")
    p.add_argument("upns", nargs="*", metavar="UPN", help="mailboxes to back up (default: all, via discovery)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="mailboxes backed up at the same time (default: MAILPIPE_PARALLEL_MAILBOXES, 32)")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_backup)


def _backup(args: argparse.Namespace) -> int:
    from mailpipe.backup import backup_mailboxes, discover_mailboxes, run
    from mailpipe.config import find_tenant
    from mailpipe.errors import UserError
    from mailpipe.graph.errors import GraphError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from mailpipe.sim.embedded import resolve

    settings = args.settings
    tenant = resolve(find_tenant(args.tenant))
    upns = [u.lower() for u in args.upns]
    if not upns:
        try:
            upns = [m.upn for m in run(discover_mailboxes(tenant, settings)).mailboxes]
        except GraphError as e:
            raise UserError(f"tenant {tenant.name}: cannot list its mailboxes: {e} — check graph_url, the "
                            "credentials and the app's permissions (User.Read.All), or name the mailboxes") from None

    def progress(upn: str, fig: dict) -> None:
        if args.verbose:
            print(f"  {upn}: {fig}", file=sys.stderr)

    results = run(backup_mailboxes(tenant, upns, settings=settings, progress=progress,
                                   max_parallel_mailboxes=args.parallel))
    for r in results:
        if args.json:
            d = r.metrics() | {"upn": r.upn, "ok": r.ok, "error": r.error, "error_kind": r.error_kind,
                               "snapshot_id": r.snapshot_id, "warnings": r.warnings,
                               "skipped": [{k: s.get(k) for k in ("item_id", "reason", "pending")} for s in r.skipped]}
            print(json.dumps(d), flush=True)
        elif r.ok:
            print(f"ok    {r.upn}  snapshot {r.snapshot_id}  items {r.items_total} (+{r.items_new} "
                  f"~{r.items_changed} -{r.items_removed}, {r.items_skipped} skipped)  fetched "
                  f"{r.bytes_fetched:,} B  stored {r.bytes_stored_new:,} B  requests {r.requests}  "
                  f"{r.seconds:.1f}s")
            for s in r.skipped[:20]:
                print(f"      skipped {s.get('item_id') or '(no id)'} in /{'/'.join(s.get('folder_path') or [])}: "
                      f"{s['reason']}")
            for w in r.warnings:
                print(f"      warning: {w}")
        else:
            print(f"FAIL  {r.upn}  {r.error}")
    return 0 if all(r.ok for r in results) else 1
