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
        "line per mailbox. Exit status 1 if any mailbox failed. Orchestrated backups (schedules, "
        "retries, the UI) go through Dagster instead: see the README.",
    )
    p.add_argument("tenant", help="tenant name from the tenants file (demo without one)")
    p.add_argument("upns", nargs="*", metavar="UPN", help="mailboxes to back up (default: all, via discovery)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="mailboxes backed up at the same time (default 32)")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_backup)


def _backup(args: argparse.Namespace) -> int:
    from mailpipe.backup import backup_mailboxes, discover_mailboxes, run
    from mailpipe.config import find_tenant

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    tenant = find_tenant(args.tenant)
    upns = [u.lower() for u in args.upns]
    if not upns:
        upns = [m.upn for m in run(discover_mailboxes(tenant)).mailboxes]

    def progress(upn: str, fig: dict) -> None:
        if args.verbose:
            print(f"  {upn}: {fig}", file=sys.stderr)

    results = run(backup_mailboxes(tenant, upns, progress=progress, max_parallel_mailboxes=args.parallel))
    for r in results:
        if args.json:
            d = r.metrics() | {"upn": r.upn, "ok": r.ok, "error": r.error, "snapshot_id": r.snapshot_id}
            print(json.dumps(d), flush=True)
        elif r.ok:
            print(f"ok    {r.upn}  snapshot {r.snapshot_id}  items {r.items_total} (+{r.items_new} "
                  f"~{r.items_changed} -{r.items_removed}, {r.items_skipped} skipped)  fetched "
                  f"{r.bytes_fetched:,} B  stored {r.bytes_stored_new:,} B  requests {r.requests}  "
                  f"{r.seconds:.1f}s")
        else:
            print(f"FAIL  {r.upn}  {r.error}")
    return 0 if all(r.ok for r in results) else 1
