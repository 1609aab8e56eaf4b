"""``mailpipe prune``, ``mailpipe key add|passwd|list|remove`` and ``mailpipe migrate``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from mailpipe.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="delete what no snapshot needs (safe while backups run)",
                       description="Delete the packs no committed snapshot or running backup needs, and the "
                       "leftovers of dead backups. Safe while backups run, with no lock service: a run plans "
                       "the packs to delete (nothing is deleted yet); a later run — once MAILPIPE_PRUNE_SAFETY "
                       "seconds have passed and every backup that started before the plan has ended — copies "
                       "whatever is referenced again and deletes them (docs/FORMAT.md, \"Prune\"). Run it "
                       "regularly (the Dagster repository_maintenance job does, after forget).")
    p.add_argument("tenant")
    p.add_argument("--dry-run", action="store_true", help="report what would be planned and deleted; write nothing")
    p.set_defaults(func=_prune)

    k = sub.add_parser("key", help="manage the passphrases of an encrypted repository",
                       description="An encrypted repository's master key is wrapped by one key file per "
                       "passphrase: adding, changing or removing a passphrase re-encrypts no data. The current "
                       "passphrase comes from the tenant's encryption.passphrase_env; a new one from the "
                       "environment variable named by --new-passphrase-env, or is asked for on the terminal.")
    ks = k.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    kl = ks.add_parser("list", help="list the key files")
    kl.add_argument("tenant")
    ka = ks.add_parser("add", help="add a passphrase")
    kp = ks.add_parser("passwd", help="change the current passphrase (adds the new key, removes the old)")
    kr = ks.add_parser("remove", help="remove a key file (never the last one the current passphrase opens)")
    for q in (ka, kp):
        q.add_argument("tenant")
        q.add_argument("--new-passphrase-env", metavar="NAME",
                       help="environment variable holding the new passphrase (default: ask on the terminal)")
        q.add_argument("--note", default="", help="a note shown by `key list` (e.g. who holds it)")
    kr.add_argument("tenant")
    kr.add_argument("key_id")
    k.set_defaults(func=_key)

    m = sub.add_parser("migrate", help="convert a version-1 repository to version 2 (packs)",
                       description="Convert TENANT's repository from format version 1 (one object per chunk "
                       "under blobs/) to version 2 (packs + index): every chunk is read, verified and written "
                       "into packs, then mailpipe.json is updated, then blobs/ is deleted. Snapshots are kept "
                       "as they are (chunk names do not change). Run it with no backup running; it can be run "
                       "again after an interruption. The result is not encrypted (encryption is chosen when a "
                       "repository is created).")
    m.add_argument("tenant")
    m.set_defaults(func=_migrate)


def _tenant_repo(args: argparse.Namespace):
    from mailpipe.config import find_tenant
    from mailpipe.repo import open_repository

    tenant = find_tenant(args.tenant)
    return tenant, open_repository(tenant, create=False, tmp_dir=args.settings.tenant_work_dir(args.tenant))


def _prune(args: argparse.Namespace) -> int:
    from mailpipe.repo.prune import prune

    _, repo = _tenant_repo(args)
    res = prune(repo, dry_run=args.dry_run, safety_seconds=args.settings.prune_safety,
                lease_seconds=args.settings.lease_seconds)
    print(res.summary())
    return 0


def _new_passphrase(args: argparse.Namespace) -> str:
    if args.new_passphrase_env:
        value = os.environ.get(args.new_passphrase_env)
        if not value:
            raise UserError(f"the environment variable {args.new_passphrase_env} is not set (or empty)")
        return value
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for the new passphrase: pass --new-passphrase-env NAME")
    first = getpass.getpass("new passphrase: ")
    if first != getpass.getpass("again: "):
        raise UserError("the two passphrases differ")
    if not first:
        raise UserError("an empty passphrase is refused")
    return first


def _key(args: argparse.Namespace) -> int:
    from mailpipe.repo import crypto

    tenant, repo = _tenant_repo(args)
    if repo.cipher is None:
        raise UserError(f"tenant {tenant.name}: the repository is not encrypted: it has no keys")
    current = crypto.passphrase_from_env(tenant.encryption.passphrase_env, tenant.name)
    if args.key_command == "list":
        for k in repo.list_keys():
            print(f"{k['id']}  {str(k.get('created_at'))[:19]}  {k.get('kdf')}  {k.get('note') or ''}")
        return 0
    if args.key_command == "remove":
        repo.remove_key(args.key_id, current)
        print(f"removed key {args.key_id}", file=sys.stderr)
        return 0
    new = _new_passphrase(args)
    key_id = repo.add_key(current, new, note=args.note)
    if args.key_command == "passwd":
        for k in repo.list_keys():
            if k["id"] != key_id and crypto.open_key_file(repo.store.get_bytes(f"keys/{k['id']}"), current):
                repo.store.delete(f"keys/{k['id']}")
        print(f"passphrase changed (new key {key_id}); set {tenant.encryption.passphrase_env} to the new "
              "passphrase", file=sys.stderr)
    else:
        print(f"added key {key_id}", file=sys.stderr)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from mailpipe.config import find_tenant
    from mailpipe.repo.migrate import migrate_v1

    tenant = find_tenant(args.tenant)
    res = migrate_v1(tenant, tmp_dir=args.settings.tenant_work_dir(args.tenant))
    print(res, file=sys.stderr)
    return 0
