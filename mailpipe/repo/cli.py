"""``mailpipe snapshots``, ``mailpipe export``, ``mailpipe check`` and ``mailpipe forget``."""

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

    c = sub.add_parser("check", help="check that snapshots are complete and restorable",
                       description="Check TENANT's committed snapshots (every mailbox, or one): commit records, "
                       "manifests and folder tables readable and consistent, every referenced chunk present. "
                       "With --read-data, also download, decompress and hash every referenced chunk once "
                       "(reads the whole repository). Missing or corrupt chunks are marked for repair: the next "
                       "backup of each affected mailbox downloads those items again and rewrites them. "
                       "Exit status 0: no problem; 3: problems found (listed).")
    c.add_argument("tenant")
    c.add_argument("upn", nargs="?", help="a mailbox (UPN or Entra object id); default: every mailbox")
    c.add_argument("--snapshot", default="all", help="all (default), latest, or one snapshot id")
    c.add_argument("--read-data", action="store_true", help="read and verify every chunk's content")
    c.set_defaults(func=_check)

    f = sub.add_parser("forget", help="delete the snapshots the retention policy no longer keeps",
                       description="Apply TENANT's retention policy (retention: in the tenants file, docs/CONFIG.md) "
                       "to every mailbox in its repository, or to one: list each snapshot with the rules that keep "
                       "it (e.g. 'daily 2026-11-24', 'last 3') or 'forget', and delete the forgotten ones. Without "
                       "a policy nothing is deleted. A mailbox whose lease is held (a backup is running) is skipped "
                       "and reported. Snapshots an unfinished restore reads are kept, and so (except with --all) are "
                       "snapshots whose commit record is unreadable. Only a snapshot's own files are deleted (commit "
                       "record, manifest, folder table): content no snapshot references any more stays in the "
                       "repository until prune removes it. Exit status 0: done (a mailbox whose lease is held, and "
                       "snapshots S3 Object Lock still retains, are left for a later run); 2: bad input; 3: some "
                       "snapshots could not be deleted, or --all could not erase everything.")
    f.add_argument("tenant")
    f.add_argument("upn", nargs="?", help="a mailbox (UPN or Entra object id); default: every mailbox")
    f.add_argument("--dry-run", action="store_true",
                   help="show what would be forgotten and why; delete nothing (takes no lease, writes nothing)")
    f.add_argument("--all", action="store_true",
                   help="erase EVERY snapshot and the backup checkpoints of mailbox UPN (required), whatever the "
                   "policy, unreadable ones included: the legal erasure of a departed user. Snapshots an unfinished "
                   "restore reads, or S3 Object Lock still retains, are kept "
                   "(exit status 3). Exclude the mailbox from the tenant's mailboxes: too, or its next backup "
                   "starts a new history")
    f.set_defaults(func=_forget)


def _repo(args: argparse.Namespace):
    """The tenant's repository; files in transit (an S3 manifest being read) go to its private work dir."""
    from mailpipe.config import find_tenant
    from mailpipe.repo import open_repository

    return open_repository(find_tenant(args.tenant), create=False,
                           tmp_dir=args.settings.tenant_work_dir(args.tenant))


def _user(repo, upn: str) -> str:
    uid = repo.find_mailbox(upn)
    if uid is None:
        raise UserError(f"no backup of mailbox {upn!r} in {repo.store.describe()}")
    return uid


def _snapshots(args: argparse.Namespace) -> int:
    repo = _repo(args)
    mailboxes = [(_user(repo, args.upn), args.upn)] if args.upn else repo.list_mailboxes()
    if not mailboxes:
        print(f"no snapshots in {repo.store.describe()}")
        return 0
    print(f"{'mailbox':32} {'snapshot':24} {'committed (UTC)':19} {'items':>8} {'size':>12} {'new bytes':>12}  "
          "content: items by type")
    for uid, upn in mailboxes:
        for s in repo.list_snapshots(uid):
            print(f"{s.upn[:32]:32} {s.snapshot_id:24} {s.committed_at.strftime('%Y-%m-%d %H:%M:%S'):19} "
                  f"{s.items:8d} {s.size_bytes:12,d} {int(s.stats.get('bytes_stored_new', 0)):12,d}  {by_type(s)}")
    return 0


# message classes as people call them
_TYPE_NAMES = {"IPM.Note": "mail", "IPM.Appointment": "calendar", "IPM.Contact": "contacts", "IPM.Task": "tasks",
               "IPM.StickyNote": "notes"}


def by_type(s) -> str:
    """``mime: mail 1,234``, ``fidelity: mail 1,200, calendar 80, contacts 40, tasks 12`` or ``both: ...`` (the
    streams' counts; the messages' MIME too)."""
    if not s.fidelity:
        return f"mime: mail {s.items:,}"
    counts: dict[str, int] = {}
    for t, n in (s.fidelity.get("by_type") or {}).items():
        name = _TYPE_NAMES.get(t) or next((v for k, v in _TYPE_NAMES.items() if str(t).startswith(k + ".")), str(t))
        counts[name] = counts.get(name, 0) + int(n)
    order = list(_TYPE_NAMES.values())
    parts = sorted(counts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    mode = "both" if (s.stats or {}).get("content") == "both" else "fidelity"  # both: MIME of the messages too
    return f"{mode}: " + (", ".join(f"{k} {v:,}" for k, v in parts) or "no items")


def _check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mailpipe.repo.check import check_repository

    repo = _repo(args)
    mailboxes = [(_user(repo, args.upn), args.upn)] if args.upn else repo.list_mailboxes()
    with tqdm(total=len(mailboxes), unit="mailbox", desc="check", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        res = check_repository(repo, mailboxes, snapshot=args.snapshot, read_data=args.read_data,
                               progress=lambda _upn: bar.update(1))
    for p in res.problems:
        print(p)
    more = res.problem_count - len(res.problems)
    if more:
        print(f"... and {more} more problems")
    if res.advice():
        print(res.advice(), file=sys.stderr)
    read = f", {res.chunks_read} read and verified ({res.bytes_read:,} bytes)" if args.read_data else ""
    print(f"checked {res.mailboxes} mailboxes, {res.snapshots} snapshots, {res.items} manifest rows, "
          f"{res.chunks} distinct chunks{read}: "
          + ("no problems" if res.ok else f"{res.problem_count} PROBLEMS"), file=sys.stderr)
    return 0 if res.ok else 3


def _export(args: argparse.Namespace) -> int:
    from mailpipe.repo import IntegrityError
    from mailpipe.repo.export import export_snapshot, tqdm_progress

    repo = _repo(args)
    uid = _user(repo, args.upn)
    snap = repo.read_snapshot(uid, args.snapshot)
    bar, update = tqdm_progress(snap.items, f"export {snap.upn}")
    try:
        res = export_snapshot(repo, uid, snap.snapshot_id, args.out, fmt=args.format, progress=update)
    except IntegrityError as e:
        bar.close()
        print(f"mailpipe: error: the repository is damaged: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        from mailpipe.repo.store import explain_os_error

        raise UserError(f"cannot export to {args.out}: {explain_os_error(e, '--out')}") from None
    finally:
        bar.close()
    print(f"exported {res.items} items ({res.bytes:,} bytes) of snapshot {snap.snapshot_id} to {res.out}",
          file=sys.stderr)
    streams_only = int(snap.fidelity.get("items", 0)) - res.items if snap.fidelity else 0
    if streams_only > 0:
        # content: fidelity — Exchange's full-fidelity streams are opaque: no .eml can be made of them
        print(f"not exported: {streams_only} items of this snapshot exist only as full-fidelity streams of the "
              f"mailbox export API ({by_type(snap)}): Exchange's opaque format, not MIME, so no .eml/mbox can be "
              "made of them; `mailpipe restore` puts them back into a mailbox", file=sys.stderr)
    return 0


def _forget(args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    from mailpipe.config import find_tenant
    from mailpipe.repo import open_repository
    from mailpipe.repo.forget import forget

    if args.all and not args.upn:
        raise UserError("--all erases every snapshot of one mailbox: name it (mailpipe forget TENANT UPN --all)")
    tenant = find_tenant(args.tenant)
    repo = open_repository(tenant, create=False, tmp_dir=args.settings.tenant_work_dir(args.tenant))
    res = forget(repo, tenant, args.upn, dry_run=args.dry_run, erase=args.all,
                 lease_seconds=args.settings.lease_seconds)
    tz = ZoneInfo(res.timezone)
    gone = "would forget" if args.dry_run else "forget"
    for m in res.mailboxes:
        if m.status == "no policy":
            print(f"{m.upn}: no retention policy: {len(m.snapshots)} snapshots kept")
            continue
        print(f"{m.upn}: {m.policy}" + (f" ({res.timezone})" if not args.all else ""))
        if m.status in ("busy", "error"):
            print(f"  {'skipped' if m.status == 'busy' else 'FAILED'}: {m.note}")
        for s in m.snapshots:
            when = s.committed_at.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z") if s.committed_at else "?"
            if s.action == "unreadable":
                line = f"  {'keep':12} {s.snapshot_id:30}  {when:21} unreadable, never forgotten: {'; '.join(s.reasons)}"
            elif s.action == "keep":
                line = f"  {'keep':12} {s.snapshot_id:30}  {when:21} {', '.join(s.reasons)}"
            else:
                line = f"  {gone:12} {s.snapshot_id:30}  {when:21}".rstrip()
                if s.error:
                    line += f" FAILED: {s.error}"
                elif s.retained:
                    line += f" retained by S3 Object Lock ({s.retained}): a later forget deletes it"
                elif s.note:
                    line += f" ({s.note})"
            print(line)
        if m.checkpoints_removed:
            print(f"  removed {m.checkpoints_removed} checkpoint parts")
    print(res.summary(), file=sys.stderr)
    if args.all and not args.dry_run and res.deleted:
        print("the content only this mailbox used leaves the storage at the next prune; exclude the mailbox from "
              "the tenant's mailboxes: in the tenants file, or its next backup starts a new history", file=sys.stderr)
    return 0 if res.ok else 3
