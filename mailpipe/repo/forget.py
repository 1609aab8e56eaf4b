"""``forget``: delete the snapshots a tenant's retention policy no longer keeps (or, ``erase``, every
snapshot of one mailbox). Their content stays in the repository until ``prune`` removes what no snapshot
references any more.

Per mailbox: take the mailbox's backup lease (a running backup or another forget of it → the mailbox is
reported and skipped), list its snapshots, decide (:func:`mailpipe.retention.decide`), delete the
forgotten ones with :meth:`Repository.delete_snapshot` (``snapshot.json`` first: a snapshot is gone or
whole). Never deleted: snapshots an unfinished restore reads (pinned), and — except by ``erase`` —
snapshots whose commit record cannot be read (their time is unknown, so no policy can judge them;
``check`` reports them). ``dry_run`` takes no lease and writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mailpipe.config import TenantConfig
from mailpipe.errors import UserError
from mailpipe.repo.repository import LeaseBusy, Repository, RepositoryError, mailbox_dir
from mailpipe.retention import NO_POLICY, decide
from mailpipe.repo.store import ObjectLocked, StoreError

LEASE_SECONDS = 300.0


@dataclass
class SnapshotOutcome:
    snapshot_id: str
    committed_at: datetime | None  # None: the commit record is unreadable
    action: str  # "keep" | "forget" | "unreadable" (kept: no policy can judge it)
    reasons: list[str] = field(default_factory=list)  # why kept; for "unreadable", why it cannot be read
    deleted: bool = False
    error: str | None = None  # the deletion failed: the snapshot still exists
    retained: str | None = None  # S3 Object Lock keeps it ("until <date>" or "legal hold"): a later run deletes it
    note: str | None = None  # e.g. the snapshot is gone but some of its files are left for the next backup

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id,
                "committed_at": self.committed_at.isoformat() if self.committed_at else None,
                "action": self.action, "reasons": list(self.reasons), "deleted": self.deleted, "error": self.error,
                "retained": self.retained, "note": self.note}


@dataclass
class MailboxOutcome:
    user_id: str
    upn: str
    policy: str  # what was applied: "keep daily 7, ...", "no retention policy", "erase"
    status: str = "done"  # "done" | "dry-run" | "no policy" | "busy" (skipped) | "error"
    note: str | None = None  # why busy / what went wrong
    snapshots: list[SnapshotOutcome] = field(default_factory=list)  # newest first, then the unreadable
    checkpoints_removed: int = 0

    def count(self, action: str) -> int:
        return sum(1 for s in self.snapshots if s.action == action)

    @property
    def deleted(self) -> int:
        return sum(1 for s in self.snapshots if s.deleted)

    @property
    def failed(self) -> list[SnapshotOutcome]:
        return [s for s in self.snapshots if s.error]

    @property
    def retained(self) -> list[SnapshotOutcome]:
        return [s for s in self.snapshots if s.retained]

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "upn": self.upn, "policy": self.policy, "status": self.status,
                "note": self.note, "kept": self.count("keep"), "forgotten": self.count("forget"),
                "deleted": self.deleted, "unreadable": self.count("unreadable"), "failed": len(self.failed),
                "retained": len(self.retained),
                "checkpoints_removed": self.checkpoints_removed,
                "snapshots": [s.to_dict() for s in self.snapshots]}


@dataclass
class ForgetResult:
    tenant: str
    dry_run: bool
    erase: bool
    timezone: str
    mailboxes: list[MailboxOutcome] = field(default_factory=list)

    def _sum(self, what) -> int:
        return sum(what(m) for m in self.mailboxes)

    @property
    def snapshots(self) -> int:
        return self._sum(lambda m: len(m.snapshots))

    @property
    def kept(self) -> int:
        return self._sum(lambda m: m.count("keep") + m.count("unreadable"))

    @property
    def forgotten(self) -> int:
        return self._sum(lambda m: m.count("forget"))

    @property
    def deleted(self) -> int:
        return self._sum(lambda m: m.deleted)

    @property
    def unreadable(self) -> int:
        return self._sum(lambda m: m.count("unreadable"))

    @property
    def failed(self) -> int:
        return self._sum(lambda m: len(m.failed))

    @property
    def retained(self) -> int:
        """Forgotten, but S3 Object Lock still keeps them: a later run deletes them (not a failure)."""
        return self._sum(lambda m: len(m.retained))

    @property
    def busy(self) -> list[MailboxOutcome]:
        return [m for m in self.mailboxes if m.status == "busy"]

    @property
    def errors(self) -> list[MailboxOutcome]:
        return [m for m in self.mailboxes if m.status == "error"]

    @property
    def ok(self) -> bool:
        """Everything that was to be deleted is deleted (a busy mailbox is skipped, not a failure — except
        for an erase, which must remove everything it was asked to)."""
        if self.failed or self.errors:
            return False
        if self.erase and not self.dry_run:  # anything left (pinned, retained by Object Lock) fails an erasure
            return not self.busy and all(s.deleted for m in self.mailboxes for s in m.snapshots)
        return True

    def summary(self) -> str:
        n = len(self.mailboxes)
        what = f"{n} mailbox{'es' if n != 1 else ''}, {self.snapshots} snapshots"
        if self.erase:
            verb = "would erase" if self.dry_run else "erased"
            done = self.forgotten if self.dry_run else self.deleted
            text = f"forget --all: {verb} {done} of {self.snapshots} snapshots"
            if not self.dry_run:
                text += f" and {self._sum(lambda m: m.checkpoints_removed)} checkpoint parts"
            kept = self.snapshots - done
            if kept:
                text += f"; {kept} left"
        elif all(m.status == "no policy" for m in self.mailboxes) and n:
            return (f"forget: {what}: no retention policy for tenant {self.tenant!r}: nothing forgotten "
                    "(set retention: in the tenants file, docs/CONFIG.md)")
        else:
            verb = "would forget" if self.dry_run else "forgot"
            done = self.forgotten if self.dry_run else self.deleted
            text = f"forget: {what}: {verb} {done}, kept {self.kept}"
        extra = []
        if self.unreadable and not self.erase:
            extra.append(f"{self.unreadable} unreadable (kept; see `mailpipe check`)")
        if self.busy:
            extra.append(f"{len(self.busy)} mailbox{'es' if len(self.busy) != 1 else ''} busy (skipped)")
        if self.errors:
            extra.append(f"{len(self.errors)} mailbox{'es' if len(self.errors) != 1 else ''} failed")
        if self.retained:
            extra.append(f"{self.retained} retained by S3 Object Lock (a later run deletes them)")
        if self.failed:
            extra.append(f"{self.failed} deletions FAILED")
        return text + ("; " + ", ".join(extra) if extra else "")

    def to_dict(self, detail: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tenant": self.tenant, "dry_run": self.dry_run, "erase": self.erase, "timezone": self.timezone,
            "mailboxes": len(self.mailboxes), "snapshots": self.snapshots, "kept": self.kept,
            "forgotten": self.forgotten, "deleted": self.deleted, "unreadable": self.unreadable,
            "failed": self.failed, "retained": self.retained, "busy": [m.upn for m in self.busy],
            "errors": [m.upn for m in self.errors],
        }
        if detail:
            d["per_mailbox"] = [m.to_dict() for m in self.mailboxes]
        return d


def forget(repo: Repository, tenant_cfg: TenantConfig, user: str | None = None, *, dry_run: bool = False,
           erase: bool = False, now: datetime | None = None, lease_seconds: float = LEASE_SECONDS) -> ForgetResult:
    """Apply the tenant's retention policy to every mailbox of the repository (or ``user``: a UPN or user
    id). ``erase``: delete every snapshot and the checkpoints of ``user`` (required) — the legal erasure of
    a departed user. A mailbox that is not in the repository is a :class:`UserError`."""
    if erase and not user:
        raise UserError("erasing every snapshot (--all) needs one mailbox: name it (UPN or user id)")
    retention = tenant_cfg.retention
    tzname = retention.timezone if retention else "UTC"
    result = ForgetResult(tenant=tenant_cfg.name, dry_run=dry_run, erase=erase, timezone=tzname)
    mailboxes = repo.list_mailboxes()
    if user:
        mailboxes = [(uid, upn) for uid, upn in mailboxes if user.lower() in (uid.lower(), upn.lower())][:1]
        if not mailboxes:
            raise UserError(f"no backup of mailbox {user!r} in {repo.store.describe()}")
        restores = repo.unfinished_restores(mailboxes[0][0])
    else:
        restores = repo.unfinished_restores()  # one listing for all mailboxes, not one per mailbox
    pins: dict[str, dict[str, str]] = {}
    for r in restores:
        pins.setdefault(mailbox_dir(str(r["source_user_id"])), {})[str(r["snapshot_id"])] = (
            f"pinned by unfinished restore {r.get('restore_id') or '?'}")
    now = now or datetime.now(timezone.utc)
    for uid, upn in mailboxes:
        policy = retention.policy_for(upn) if retention else None
        out = MailboxOutcome(uid, upn, "erase" if erase else (policy.describe() if policy else NO_POLICY))
        result.mailboxes.append(out)
        pinned = pins.get(mailbox_dir(uid), {})
        nothing_to_delete = not erase and (policy is None or policy.all)
        lease = None
        if not dry_run and not nothing_to_delete:
            try:
                lease = repo.acquire_lease(uid, upn, lease_seconds, what="forget of this mailbox")
            except LeaseBusy as e:
                out.status, out.note = "busy", _busy_note(e)
                continue
            except (StoreError, RepositoryError) as e:
                out.status, out.note = "error", f"cannot take the mailbox's lease: {e}"
                continue
        try:
            _forget_mailbox(repo, out, uid, policy, tzname, pinned, now, erase=erase, dry_run=dry_run,
                            lease=lease, lease_seconds=lease_seconds)
            if out.status == "done" and nothing_to_delete:
                out.status = "no policy" if policy is None else "done"
            elif out.status == "done" and dry_run:
                out.status = "dry-run"
        except LeaseBusy as e:  # lost the lease while deleting: stop, the rest waits for the next run
            out.status, out.note = "error", f"stopped: {e}"
        except (StoreError, RepositoryError, OSError) as e:
            out.status, out.note = "error", str(e)
        finally:
            if lease is not None:
                lease.release()
    return result


def _forget_mailbox(repo: Repository, out: MailboxOutcome, uid: str, policy, tzname: str,
                    pinned: dict[str, str], now: datetime, *, erase: bool, dry_run: bool, lease,
                    lease_seconds: float) -> None:
    scanned = repo.scan_snapshots(uid)  # under the lease: no backup commits meanwhile
    readable = [(sid, info.committed_at) for sid, info, _ in scanned if info is not None]
    unreadable = [(sid, why) for sid, info, why in scanned if info is None]
    if erase:
        when = dict(readable)
        out.snapshots = [SnapshotOutcome(sid, when.get(sid), "keep" if sid in pinned else "forget",
                                         [pinned[sid]] if sid in pinned else [])
                         for sid, _, _ in sorted(scanned, key=lambda s: s[0], reverse=True)]
    else:
        out.snapshots = [SnapshotOutcome(d.snapshot_id, d.committed_at, "keep" if d.keep else "forget",
                                         list(d.reasons))
                         for d in decide(readable, policy, tzname, now=now, pinned=pinned)]
        out.snapshots += [SnapshotOutcome(sid, None, "unreadable", [why or "unreadable"]) for sid, why in unreadable]
    if dry_run:
        return
    renewed = time.monotonic()
    trouble: list[SnapshotOutcome] = []
    for s in out.snapshots:
        if s.action != "forget":
            continue
        if lease is not None and time.monotonic() - renewed > lease_seconds / 3:
            lease.renew()  # raises LeaseBusy when lost: stop before deleting anything more
            renewed = time.monotonic()
        try:
            repo.delete_snapshot(uid, s.snapshot_id)
            s.deleted = True
        except ObjectLocked as e:
            s.retained = f"until {e.until:%Y-%m-%d %H:%M} UTC" if e.until else "legal hold"
            trouble.append(s)
        except (StoreError, RepositoryError, OSError) as e:
            s.error = str(e) or type(e).__name__
            trouble.append(s)
    if trouble:  # snapshot.json goes first: once it is gone the snapshot is, whatever happened to its other files
        left = set(repo.snapshot_ids(uid))
        for s in trouble:
            if s.snapshot_id not in left:
                s.deleted, s.error, s.retained = True, None, None
                s.note = "some of its files are left; the next backup of the mailbox removes them"
    if erase and not any(s.action == "keep" for s in out.snapshots):
        before = len(repo.list_checkpoints(uid))
        repo.clear_checkpoints(uid)
        out.checkpoints_removed = before
        # the records of finished restores into this mailbox hold its item and folder ids: erased too
        out.checkpoints_removed += repo.delete_finished_restores(uid)


def _busy_note(e: LeaseBusy) -> str:
    h = e.holder or {}
    if not h.get("host"):
        return f"its lease is taken: {e}"
    return (f"a {h.get('what') or 'backup or another forget'} holds its lease (host {h.get('host')}, pid {h.get('pid')}, since "
            f"{str(h.get('acquired_at'))[:19]} UTC); skipped, run forget again later")
