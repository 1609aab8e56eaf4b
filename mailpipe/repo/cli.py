"""``mailpipe snapshots`` and ``mailpipe export``."""

from __future__ import annotations

import argparse
import sys

from mailpipe.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshots", help="list a tenant's snapshots",
                       description="List committed snapshots of TENANT's repository, for one mailbox (UPN or "
                       "user id) or all: id, commit time, items, size, newly stored bytes.")
    p.add_argument("tenant")
    p.add_argument("upn", nargs="?", help="a mailbox (UPN or Entra object id); default: every mailbox")
    p.set_defaults(func=_snapshots)

    e = sub.add_parser("export", help="export a snapshot as .eml files or mbox",
                       description="Write every item of a snapshot under --out: byte-exact .eml files in "
                       "folders mirroring the mailbox (default), or one mboxrd file per folder (--format mbox; "
                       "mbox quoting makes it not byte-exact). Every item's sha256 is verified while reading.")
    e.add_argument("tenant")
    e.add_argument("upn", help="the mailbox (UPN or Entra object id)")
    e.add_argument("--snapshot", default="latest", help="snapshot id, or latest (default)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--format", choices=("eml", "mbox"), default="eml")
    e.set_defaults(func=_export)


def _repo(tenant_name: str):
    from mailpipe.backup.cli import find_tenant
    from mailpipe.repo import open_repository

    return open_repository(find_tenant(tenant_name), create=False)


def _user(repo, upn: str) -> str:
    uid = repo.find_mailbox(upn)
    if uid is None:
        raise UserError(f"no backup of mailbox {upn!r} in {repo.store.describe()}")
    return uid


def _snapshots(args: argparse.Namespace) -> int:
    repo = _repo(args.tenant)
    mailboxes = [(_user(repo, args.upn), args.upn)] if args.upn else repo.list_mailboxes()
    if not mailboxes:
        print(f"no snapshots in {repo.store.describe()}")
        return 0
    print(f"{'mailbox':32} {'snapshot':24} {'committed (UTC)':19} {'items':>8} {'size':>12} {'new bytes':>12}")
    for uid, upn in mailboxes:
        for s in repo.list_snapshots(uid):
            print(f"{s.upn[:32]:32} {s.snapshot_id:24} {s.committed_at.strftime('%Y-%m-%d %H:%M:%S'):19} "
                  f"{s.items:8d} {s.size_bytes:12,d} {int(s.stats.get('bytes_stored_new', 0)):12,d}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mailpipe.repo import IntegrityError
    from mailpipe.repo.export import export_snapshot, tqdm_progress

    repo = _repo(args.tenant)
    uid = _user(repo, args.upn)
    snap = repo.read_snapshot(uid, args.snapshot)
    bar, update = tqdm_progress(snap.items, f"export {snap.upn}")
    try:
        res = export_snapshot(repo, uid, snap.snapshot_id, args.out, fmt=args.format, progress=update)
    except IntegrityError as e:
        bar.close()
        print(f"mailpipe: error: the repository is damaged: {e}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    print(f"exported {res.items} items ({res.bytes:,} bytes) of snapshot {snap.snapshot_id} to {res.out}",
          file=sys.stderr)
    return 0
