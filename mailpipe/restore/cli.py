"""``mailpipe restore``: a snapshot (or part of it) back into a mailbox."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone


def _when(value: str) -> datetime:
    try:
        d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or time (ISO 8601, e.g. 2026-11-01T00:00Z): {value!r}") from None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="restore a backup into a mailbox (the same or another)",
        description="Restore UPN's backup of TENANT into a mailbox: the whole snapshot, some folders or some "
        "items, into a new folder 'Restored <snapshot time>' (default, with the original folder tree beneath it) "
        "or --in-place into the original folders. Messages are recreated as received items (not drafts), with "
        "their read state, flag, categories, dates and attachments (docs/RESTORE.md lists what a recreated "
        "message keeps and loses; `mailpipe export` gives the byte-exact MIME). Resumable: the same command "
        "started again continues where it stopped and creates nothing twice. Paced by Exchange's limits "
        "(4 requests at a time, the request window, 150 MB of uploads per 5 minutes). Exit status 0: every "
        "item restored or already present; 1: some items failed (listed); 2: nothing could be done.")
    p.add_argument("tenant", help="tenant name from the tenants file (demo without one)")
    p.add_argument("upn", help="the mailbox whose backup is restored (UPN or Entra object id)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--snapshot", default="latest", help="snapshot id, or latest (default)")
    when.add_argument("--at", type=_when, metavar="TIME",
                      help="the newest snapshot committed at or before TIME (e.g. 2026-11-01T00:00Z)")
    p.add_argument("--to", metavar="UPN", help="restore into this mailbox (default: the same one)")
    p.add_argument("--folder", action="append", default=[], metavar="PATH",
                   help="only this folder and its subfolders, e.g. 'Inbox/Projects' (repeatable)")
    p.add_argument("--item", action="append", default=[], metavar="ITEM_ID", help="only this item (repeatable)")
    p.add_argument("--since", type=_when, metavar="DATE", help="only items received at or after DATE")
    p.add_argument("--until", type=_when, metavar="DATE", help="only items received before DATE")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--into", metavar="NAME", help="the folder to recreate the tree in (default: 'Restored <time>')")
    where.add_argument("--in-place", action="store_true", help="into the original folders (missing ones created)")
    p.add_argument("--collisions", choices=("skip", "copy", "replace"), default="skip",
                   help="an item already in the target folder (MIME: the same internetMessageId; fidelity: the same "
                   "stream, or the same item changed since): skip it (default), restore a copy, or replace it "
                   "(MIME: the new item is created, then the old one deleted; fidelity: one copy kept or updated "
                   "as backed up, the other copies restores made deleted)")
    p.add_argument("--dry-run", action="store_true", help="print what would be restored; write nothing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_restore)


def _restore(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mailpipe.config import find_tenant
    from mailpipe.restore import RestoreRequest, restore_mailbox, run
    from mailpipe.sim.embedded import resolve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    tenant = resolve(find_tenant(args.tenant))
    req = RestoreRequest(upn=args.upn, snapshot=args.snapshot if args.at is None else "latest", at=args.at,
                         to=args.to, folders=tuple(args.folder), items=tuple(args.item), since=args.since,
                         until=args.until, into=args.into, in_place=args.in_place, collisions=args.collisions,
                         dry_run=args.dry_run)
    bar: list = []

    def progress(p: dict) -> None:
        if p.get("phase") == "plan":
            where = f"into folder {p['target_root']!r}" if p.get("target_root") else "in place"
            print(f"snapshot {p['snapshot_id']}: {p['items']} items, {p['bytes']:,} bytes, {where}; at least "
                  f"{_duration(p['expected_seconds'])} at Exchange's limits", file=sys.stderr)
            if not args.dry_run and p["items"]:
                bar.append(tqdm(total=p["items"], unit="item", desc="restore", file=sys.stderr,
                                disable=not sys.stderr.isatty()))
            return
        if bar:
            bar[0].n = p["done"]
            bar[0].set_postfix_str(f"{p['bytes_uploaded']:,} B, {p['throttled']} throttled, "
                                   f"{p['upload_wait_seconds']:.0f} s paced")
            bar[0].refresh()

    res = run(restore_mailbox(tenant, req, settings=args.settings, progress=progress))
    if bar:
        bar[0].close()
    if not res.ok and not args.json:
        print(f"mailpipe: error: {res.error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**res.metrics(), "ok": res.ok, "error": res.error, "restore_id": res.restore_id,
                          "snapshot_id": res.snapshot_id, "target_root": res.target_root, "failed": res.failed,
                          "losses": res.losses, "warnings": res.warnings}))
    elif res.ok and res.dry_run:
        print(f"{'folder':48} {'restored into':48} {'items':>7} {'bytes':>14}")
        for f in res.folders:
            print(f"{'/'.join(f.path)[:48]:48} {'/'.join(f.target)[:48]:48} {f.items:7d} {f.bytes:14,d}")
        print(res.summary())
    else:
        print(res.summary())
        for w in res.warnings:
            print(f"  note: {w}")
        for f in res.failed[:50]:
            print(f"  failed {f['item_id']} in /{'/'.join(f.get('folder_path') or [])}: {f['reason']}")
        for loss, n in sorted(res.losses.items()):
            print(f"  not recreated: {loss} ({n} items; `mailpipe export` has the original MIME)")
    if not res.ok:
        return 2
    return 1 if res.failed_count else 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
