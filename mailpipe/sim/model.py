"""The simulated tenant: users, folder trees, messages, change history and delta tokens.

Deterministic from the seed: the same config gives the same ids, folders and message bytes. Messages
are small metadata records (content is generated on demand by :mod:`mailpipe.sim.mime`), so 100k+
message mailboxes fit in a few tens of MB. Messages created through the Graph write API (restore) also
carry what was posted (:mod:`mailpipe.sim.posted`), from which their MIME is rendered; they take ids
from the same counter and their changes go through the same mutation log.

Change tracking: each mailbox has a sequence counter; every change to a message (new, read, flag,
move, draft edit) gives it a new sequence number and appends ``(seq, id)`` to its folder's change list;
every departure from a folder (move out, delete) appends ``(seq, id)`` to that folder's departure list.
A delta token carries a watermark; a delta pass reports the folder's items changed after the watermark
that are in the folder now (upserts), and its departures after the watermark for items not in it now
(``@removed``). Tokens are HMAC-signed with a key derived from the seed, so they stay valid across
restarts when the mutation log is replayed (``state_dir``), and are refused (410) when tampered with,
from another folder, or expired by ``expire_delta_tokens``.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import json
import os
import random
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from mailpipe.sim import fidelity, mime
from mailpipe.sim import posted as posted_mod
from mailpipe.sim import semantic
from mailpipe.sim.items import Folder, Msg, NotFound, TokenError

WELL_KNOWN = [  # (well-known name, display name)
    ("inbox", "Inbox"), ("drafts", "Drafts"), ("sentitems", "Sent Items"), ("deleteditems", "Deleted Items"),
    ("archive", "Archive"), ("junkemail", "Junk Email"),
]
CUSTOM_TREE = [  # (parent well-known name or custom key, key, display name)
    ("inbox", "projects", "Projects"),
    ("projects", "p-alpha", "Alpha — Überprüfung"),
    ("p-alpha", "p-alpha-2026", "2026"),
    ("projects", "p-slash", "Clients A/B"),
    ("inbox", "receipts", "Receipts 領収書"),
    ("archive", "old", "Old"),
    ("old", "empty", "Empty folder"),
]
# share of a mailbox's messages per folder key
FOLDER_WEIGHTS = {"inbox": 40, "sentitems": 15, "archive": 10, "deleteditems": 4, "junkemail": 2, "drafts": 2,
                  "projects": 6, "p-alpha": 6, "p-alpha-2026": 4, "p-slash": 5, "receipts": 4, "old": 2,
                  "empty": 0}


@dataclass
class SimConfigModel:
    tenant: str = "demo"
    tenant_id: str | None = None
    seed: int = 1
    domain: str | None = None
    users: int = 5
    messages_per_mailbox: int = 200
    mailbox_sizes: dict[str, int] = field(default_factory=dict)
    huge_attachments: bool = False
    huge_attachment_every: int = 0
    plain: bool = False  # messages without attachments (text + HTML only)
    state_dir: str | None = None
    other_items: int | None = None  # calendar/contact/task items per mailbox (None: a fifth of its messages, >= 4)
    roles: list[str] | None = None  # the app's application permissions (None: all); checked by the export API


@dataclass
class User:
    id: str
    upn: str
    display_name: str
    kind: str  # user | shared | nomailbox


class Mailbox(fidelity.XMailbox):
    def __init__(self, model: TenantModel, user: User, count: int, idx: int) -> None:
        self.model = model
        self.user = user
        self.lock = threading.RLock()
        self.seq = 0
        self.token_epoch = 0
        self.root_id = self._fid("msgfolderroot")
        self.folders: dict[str, Folder] = {}
        self.by_wk: dict[str, str] = {"msgfolderroot": self.root_id}
        self.folder_departures: list[tuple[int, str]] = []
        self.msgs: dict[str, Msg] = {}
        self.next_n = 0
        self.next_folder_n = 0
        # lookups of the write API ($filter): internetMessageId (built on first use) and stored extended
        # properties, (lower-cased value) -> message ids; entries may be stale, lookups re-check the item
        self._imid_index: dict[str, set[str]] | None = None
        self._prop_index: dict[tuple[str, str], set[str]] = {}
        self._seeded_props: dict[str, dict[str, str]] = {}  # extended properties PATCHed onto seeded items
        # the export API's other folders and items (calendar, contacts, tasks: mailpipe.sim.fidelity)
        self.xfolders: dict[str, Folder] = {}
        self.xitems: dict[str, fidelity.XItem] = {}
        self.xfolder_departures: list[tuple[int, str]] = []
        self.next_xfolder_n = 0
        self.next_xitem_n = 0
        self.xsizes: dict[str, tuple[int, int]] = {}  # item id -> (seq, export stream size)
        keys: dict[str, str] = {}
        for wk, name in WELL_KNOWN:
            f = self._add_folder(name, self.root_id, wk)
            keys[wk] = f.id
        for parent, key, name in CUSTOM_TREE:
            keys[key] = self._add_folder(name, keys[parent]).id
        rng = random.Random(f"{model.cfg.seed}:{user.id}:msgs")
        names = list(FOLDER_WEIGHTS)
        weights = [FOLDER_WEIGHTS[k] for k in names]
        every = model.cfg.huge_attachment_every
        for i in range(count):
            key = rng.choices(names, weights)[0]
            huge = bool(every and i % every == every - 1) or (
                model.cfg.huge_attachments and idx == 0 and i == count // 2)
            m = self._new_msg(keys[key], mime.received_time(rng.randrange(1 << 30), i, count),
                              is_draft=(key == "drafts"), huge=huge)
            m.is_read = rng.random() < 0.7
        self.x_seed(count)

    # ids ----------------------------------------------------------------------------------------------
    def _fid(self, key: str) -> str:
        raw = hashlib.sha256(f"{self.model.cfg.seed}:{self.user.id}:folder:{key}".encode()).digest()[:30]
        return "AAMkF" + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "AAA="

    def _mid(self, n: int) -> str:
        raw = hashlib.sha256(f"{self.model.cfg.seed}:{self.user.id}:msg:{n}".encode()).digest()[:30]
        return "AAkALg" + base64.urlsafe_b64encode(raw).decode() + "AAA="

    def _bump(self) -> int:
        self.seq += 1
        return self.seq

    def _add_folder(self, name: str, parent: str, wk: str | None = None) -> Folder:
        f = Folder(self._fid(f"n{self.next_folder_n}"), name, parent, wk, seq=self._bump())
        self.next_folder_n += 1
        self.folders[f.id] = f
        if wk:
            self.by_wk[wk] = f.id
        return f

    def _new_msg(self, folder: str, received: datetime, is_draft: bool = False, huge: bool = False) -> Msg:
        n = self.next_n
        self.next_n += 1
        m = Msg(self._mid(n), n, folder, self._bump(), received, is_draft, huge)
        self.msgs[m.id] = m
        self.folders[folder].changes.append((m.seq, m.id))
        if self._imid_index is not None:
            self._index(m)
        return m

    def _touch(self, m: Msg) -> None:
        m.seq = self._bump()
        m.change_n += 1
        self.folders[m.folder].changes.append((m.seq, m.id))

    def _depart(self, m: Msg) -> None:
        self.folders[m.folder].departures.append((self._bump(), m.id))

    # lookups ------------------------------------------------------------------------------------------
    def folder_id(self, ref: str) -> str:
        fid = self.by_wk.get(ref.lower(), ref)
        if fid != self.root_id and fid not in self.folders:
            raise NotFound(ref)
        return fid

    def path(self, fid: str) -> list[str]:
        out = []
        while fid != self.root_id:
            f = self.folders[fid]
            out.append(f.name)
            fid = f.parent
        return out[::-1]

    def children(self, fid: str) -> list[Folder]:
        return [f for f in self.folders.values() if f.parent == fid]

    def subtree(self, fid: str) -> list[str]:
        out = [fid]
        for c in self.children(fid):
            out += self.subtree(c.id)
        return out

    def spec(self, m: Msg) -> mime.MessageSpec:
        return mime.MessageSpec(
            tenant_seed=self.model.cfg.seed, seed=int.from_bytes(hashlib.sha256(m.id.encode()).digest()[:6], "big"),
            version=m.version, domain=self.model.domain, owner=self.user.upn, owner_name=self.user.display_name,
            is_draft=m.is_draft, huge=m.huge, received=m.received, plain=self.model.cfg.plain,
        )

    def mime(self, m: Msg) -> bytes:
        if m.imported is not None:
            return m.imported[1]
        if m.posted is not None:
            return posted_mod.render_cached(m.posted, m.id, m.seq, is_draft=m.is_draft, importance=m.importance,
                                            owner=(self.user.display_name, self.user.upn))
        return mime.generate(self.spec(m))

    def change_key(self, m: Msg) -> str:
        return "CQAAAB" + hashlib.sha1(f"{m.id}:{m.seq}".encode()).hexdigest()[:20]

    def message_json(self, m: Msg, rest_id: str) -> dict[str, Any]:
        if m.posted is not None:
            return self._posted_json(m, rest_id)
        if m.imported is not None:
            return self._imported_json(m, rest_id)
        h = mime.headers_of(self.spec(m))
        received = m.received.strftime("%Y-%m-%dT%H:%M:%SZ")
        sender = {"emailAddress": {"name": h["sender_name"], "address": h["sender"]}}
        return {
            "@odata.etag": f'W/"{self.change_key(m)}"',
            "id": rest_id,
            "createdDateTime": received,
            "lastModifiedDateTime": (m.received + timedelta(seconds=m.change_n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "changeKey": self.change_key(m),
            "categories": list(m.categories),
            "receivedDateTime": received,
            "sentDateTime": received,
            "hasAttachments": False,
            "internetMessageId": h["message_id"],
            "subject": h["subject"],
            "importance": m.importance,
            "parentFolderId": m.folder,
            "isRead": m.is_read,
            "isDraft": m.is_draft,
            "from": sender,
            "sender": sender,
            "flag": {"flagStatus": m.flag},
        }

    def _imported_json(self, m: Msg, rest_id: str) -> dict[str, Any]:
        p = m.imported[0] if m.imported else {}
        return {
            "@odata.etag": f'W/"{self.change_key(m)}"', "id": rest_id,
            "createdDateTime": posted_mod.iso(m.received),
            "lastModifiedDateTime": posted_mod.iso(m.received + timedelta(seconds=m.change_n)),
            "changeKey": self.change_key(m), "categories": list(m.categories),
            "receivedDateTime": posted_mod.iso(m.received), "sentDateTime": p.get("sent"),
            "hasAttachments": False, "internetMessageId": p.get("internet_message_id"),
            "subject": p.get("subject"), "importance": m.importance, "parentFolderId": m.folder,
            "isRead": m.is_read, "isDraft": m.is_draft, "flag": {"flagStatus": m.flag},
        }

    # messages created through the write API ------------------------------------------------------------
    def _posted_json(self, m: Msg, rest_id: str) -> dict[str, Any]:
        p = m.posted
        assert p is not None
        c = p.content
        owner = [self.user.display_name, self.user.upn]
        frm = c["from"] or c["sender"] or owner
        key = (c["body_type"], c["body"])
        if p.preview is None or p.preview[0] != key:  # reducing HTML costs: once per body
            text = semantic.html_to_text(c["body"]) if c["body_type"] == "html" else semantic.normalize_space(c["body"])
            p.preview = (key, text[:255])

        def ea(r: list[str]) -> dict[str, Any]:
            return {"emailAddress": {"name": r[0], "address": r[1]}}

        modified = max(p.modified, p.created + timedelta(seconds=m.change_n))
        return {
            "@odata.etag": f'W/"{self.change_key(m)}"',
            "id": rest_id,
            "createdDateTime": posted_mod.iso(p.created),
            "lastModifiedDateTime": posted_mod.iso(modified),
            "changeKey": self.change_key(m),
            "categories": list(m.categories),
            "receivedDateTime": posted_mod.iso(m.received),
            "sentDateTime": posted_mod.iso(p.sent),
            "hasAttachments": self.has_attachments(m),
            "internetMessageId": c["internet_message_id"],
            "subject": c["subject"],
            "bodyPreview": p.preview[1],
            "importance": m.importance,
            "parentFolderId": m.folder,
            "isRead": m.is_read,
            "isDraft": m.is_draft,
            "body": {"contentType": c["body_type"], "content": c["body"]},
            "from": ea(frm),
            "sender": ea(c["sender"] or frm),
            "toRecipients": [ea(r) for r in c["to"]],
            "ccRecipients": [ea(r) for r in c["cc"]],
            "bccRecipients": [ea(r) for r in c["bcc"]],
            "replyTo": [ea(r) for r in c["reply_to"]],
            "flag": {"flagStatus": m.flag},
        }

    def has_attachments(self, m: Msg) -> bool:
        """Graph's ``hasAttachments``: inline attachments do not count (seeded items always answer false)."""
        return m.posted is not None and any(not a.is_inline for a in m.posted.attachments)

    def sent(self, m: Msg) -> datetime:
        if m.imported is not None and m.imported[0].get("sent"):
            return posted_mod.parse_time(m.imported[0]["sent"])
        return m.posted.sent if m.posted is not None else m.received

    def subject(self, m: Msg) -> str:
        if m.imported is not None:
            return m.imported[0].get("subject") or ""
        return m.posted.content["subject"] if m.posted is not None else mime.headers_of(self.spec(m))["subject"]

    def internet_message_id(self, m: Msg) -> str | None:
        if m.imported is not None:
            return m.imported[0].get("internet_message_id")
        if m.posted is not None:
            return m.posted.content["internet_message_id"]
        return mime.headers_of(self.spec(m))["message_id"]

    def stored_props(self, m: Msg) -> dict[str, str]:
        return m.posted.content["props"] if m.posted is not None else self._seeded_props.get(m.id, {})

    def ext_props(self, m: Msg) -> dict[str, str]:
        """Every single-value extended property of an item, canonical id -> value: the stored ones, plus
        PidTagMessageFlags, PidTagMessageDeliveryTime and PidTagClientSubmitTime as the item's state is now."""
        out = dict(self.stored_props(m))
        keep = posted_mod.int_prop(out.get(posted_mod.PROP_FLAGS, "0")) & ~(
            posted_mod.MF_READ | posted_mod.MF_UNSENT | posted_mod.MF_HASATTACH)
        out[posted_mod.PROP_FLAGS] = str(keep | (posted_mod.MF_READ if m.is_read else 0) |
                                         (posted_mod.MF_UNSENT if m.is_draft else 0) |
                                         (posted_mod.MF_HASATTACH if self.has_attachments(m) else 0))
        out[posted_mod.PROP_DELIVERY] = posted_mod.iso(m.received)
        out[posted_mod.PROP_SUBMIT] = posted_mod.iso(self.sent(m))
        return out

    def _index(self, m: Msg) -> None:
        if self._imid_index is not None:
            self._imid_index.setdefault((self.internet_message_id(m) or "").lower(), set()).add(m.id)
        for pid, v in self.stored_props(m).items():
            self._prop_index.setdefault((pid, v.lower()), set()).add(m.id)

    def candidates(self, imid: str | None = None, prop: tuple[str, str] | None = None) -> list[Msg]:
        """The items that may have this internetMessageId or stored extended property value (a superset: the
        caller checks), or every item."""
        with self.lock:
            if imid is not None:
                if self._imid_index is None:
                    self._imid_index = {}
                    for m in self.msgs.values():
                        self._imid_index.setdefault((self.internet_message_id(m) or "").lower(), set()).add(m.id)
                ids = self._imid_index.get(imid.lower(), set())
            elif prop is not None:
                ids = self._prop_index.get((prop[0], prop[1].lower()), set())
            else:
                return list(self.msgs.values())
            return [self.msgs[i] for i in sorted(ids) if i in self.msgs]

    def _post(self, op: dict[str, Any]) -> str:
        fid = self.folder_id(op["folder"])
        at = posted_mod.parse_time(op["at"])
        content = dict(op["message"])
        n = self.next_n
        self.next_n += 1
        mid = self._mid(n)
        if not content.get("internet_message_id"):  # Exchange gives every new item one
            h = hashlib.sha1(f"{self.model.cfg.seed}:{mid}".encode()).hexdigest()[:32].upper()
            content["internet_message_id"] = f"<{h}@{self.model.domain}>"
        p = posted_mod.make_posted(content, at)
        is_draft, is_read, received, _ = posted_mod.derive(p.content, at)
        m = Msg(mid, n, fid, self._bump(), received, is_draft, False)
        m.is_read, m.flag, m.categories = is_read, content["flag"], tuple(content["categories"])
        m.importance, m.posted = content["importance"], p
        self.msgs[mid] = m
        self.folders[fid].changes.append((m.seq, mid))
        self._index(m)
        return mid

    def _add_attachment(self, op: dict[str, Any]) -> str:
        m = self.msgs.get(op["id"])
        if m is None or m.posted is None:
            raise NotFound(op["id"])
        at = posted_mod.parse_time(op["at"])
        m.posted.attachments.append(posted_mod.make_att(op["attachment"], at))
        m.posted.modified = at
        self._touch(m)
        return f"AAMkATT{len(m.posted.attachments) - 1}="

    def _update(self, op: dict[str, Any]) -> str:
        """A PATCH, already checked by the server (draft-only properties only on drafts)."""
        m = self.msgs.get(op["id"])
        if m is None:
            raise NotFound(op["id"])
        ch, at = op["changes"], posted_mod.parse_time(op["at"])
        if "is_read" in ch:
            m.is_read = ch["is_read"]
        if "flag" in ch:
            m.flag = ch["flag"]
        if "categories" in ch:
            m.categories = tuple(ch["categories"])
        if "importance" in ch:
            m.importance = ch["importance"]
        props = {k: v for k, v in ch.get("props", {}).items() if k != posted_mod.PROP_FLAGS}  # fixed once saved
        if posted_mod.PROP_DELIVERY in props:
            m.received = posted_mod.parse_time(props.pop(posted_mod.PROP_DELIVERY))
        p = m.posted
        if p is not None:
            if posted_mod.PROP_SUBMIT in props:
                p.sent = posted_mod.parse_time(props.pop(posted_mod.PROP_SUBMIT))
            for k in ("subject", "body_type", "body", "from", "sender", "to", "cc", "bcc", "reply_to"):
                if k in ch:
                    p.content[k] = ch[k]
            if ch.get("internet_message_id"):
                p.content["internet_message_id"] = ch["internet_message_id"]
            p.content["props"] = {**p.content["props"], **props}
            p.modified = at
        elif props:
            props.pop(posted_mod.PROP_SUBMIT, None)
            self._seeded_props[m.id] = {**self._seeded_props.get(m.id, {}), **props}
        self._touch(m)
        self._index(m)
        return m.id

    def folder_counts(self) -> dict[str, tuple[int, int]]:
        """{folder id: (total, unread)} in one pass."""
        out: dict[str, list[int]] = {}
        for m in self.msgs.values():
            c = out.setdefault(m.folder, [0, 0])
            c[0] += 1
            c[1] += not m.is_read
        return {k: (v[0], v[1]) for k, v in out.items()}

    def folder_json(self, f: Folder, counts: dict[str, tuple[int, int]]) -> dict[str, Any]:
        total, unread = counts.get(f.id, (0, 0))
        return {
            "id": f.id, "displayName": f.name, "parentFolderId": f.parent,
            "childFolderCount": len(self.children(f.id)), "unreadItemCount": unread,
            "totalItemCount": total, "isHidden": False,
        }

    # delta --------------------------------------------------------------------------------------------
    def delta_page(self, folder: str, token: dict | None, page_size: int, *, folders: dict | None = None,
                   items: dict | None = None) -> tuple[list, list, dict | None]:
        """One page of a folder's message delta: (upserts, removed ids, next token state or None when done).

        ``token`` is None for a new sync, else the decoded state {w: watermark, hi: upper bound,
        ph: phase, c: cursor}. Returns the state of the next page, or a final state {w: hi} (done).
        """
        folders = self.folders if folders is None else folders
        items = self.msgs if items is None else items
        with self.lock:
            f = folders.get(folder)
            if f is None:
                raise NotFound(folder)
            if token is None:
                token = {"w": 0, "hi": self.seq, "ph": 0, "c": 0}
            elif "hi" not in token:  # a delta link: start a new pass above its watermark
                token = {"w": token["w"], "hi": self.seq, "ph": 0, "c": 0}
            w, hi, ph, c = token["w"], token["hi"], token["ph"], token["c"]
            removed: list[str] = []
            upserts: list[Msg] = []
            if ph == 0:  # departures in (w, hi] of items not in the folder now
                lst = f.departures
                i = max(bisect.bisect_right(lst, (w, "\uffff")), c)
                while i < len(lst) and lst[i][0] <= hi and len(removed) < page_size:
                    mid = lst[i][1]
                    m = items.get(mid)
                    if (m is None or m.folder != folder) and mid not in removed:
                        removed.append(mid)
                    i += 1
                if i < len(lst) and lst[i][0] <= hi:
                    return [], removed, {"w": w, "hi": hi, "ph": 0, "c": i}
                ph, c = 1, 0
            lst = f.changes
            i = max(bisect.bisect_right(lst, (w, "\uffff")), c)
            while i < len(lst) and lst[i][0] <= hi and len(upserts) + len(removed) < page_size:
                seq, mid = lst[i]
                m = items.get(mid)
                if m is not None and m.folder == folder and m.seq == seq:
                    upserts.append(m)
                i += 1
            if i < len(lst) and lst[i][0] <= hi:
                return upserts, removed, {"w": w, "hi": hi, "ph": 1, "c": i}
            return upserts, removed, {"w": hi}

    def folder_delta(self, token: dict | None) -> tuple[list[Folder], list[str], dict]:
        """The whole folder hierarchy (first sync), or the folders changed since the watermark."""
        with self.lock:
            w = token["w"] if token else 0
            changed = [f for f in self.folders.values() if f.seq > w]
            gone = [fid for s, fid in self.folder_departures if s > w and fid not in self.folders]
            return sorted(changed, key=lambda f: len(self.path(f.id))), gone, {"w": self.seq}

    # mutations ----------------------------------------------------------------------------------------
    def apply(self, op: dict[str, Any]) -> Any:
        with self.lock:
            kind = op["op"]
            if kind == "new_mail":
                fid = self.folder_id(op.get("folder", "inbox"))
                when = datetime.fromisoformat(op["at"]) if op.get("at") else datetime.now(timezone.utc)
                out = []
                for _ in range(int(op.get("count", 1))):
                    m = self._new_msg(fid, when.replace(microsecond=0), is_draft=op.get("draft", False))
                    out.append(m.id)
                return out
            if kind in ("mark_read", "mark_unread", "flag", "categorize", "edit_draft", "move", "delete"):
                done = []
                for mid in op["ids"]:
                    m = self.msgs.get(mid)
                    if m is None:
                        continue
                    if kind == "delete":
                        self._depart(m)
                        del self.msgs[mid]
                    elif kind == "move":
                        to = self.folder_id(op["to"])
                        if to == m.folder:
                            continue
                        self._depart(m)
                        m.folder = to
                        self._touch(m)
                    else:
                        if kind == "mark_read":
                            m.is_read = True
                        elif kind == "mark_unread":
                            m.is_read = False
                        elif kind == "flag":
                            m.flag = "flagged" if m.flag != "flagged" else "complete"
                        elif kind == "categorize":
                            m.categories = tuple(sorted(set(m.categories) | {op.get("category", "Blue category")}))
                        elif kind == "edit_draft":
                            if not m.is_draft or m.posted is not None:
                                continue
                            m.version += 1
                            if self._imid_index is not None:
                                self._index(m)
                        self._touch(m)
                    done.append(mid)
                return done
            if kind == "create_folder":
                parent = self.folder_id(op.get("parent", "msgfolderroot"))
                return self._add_folder(op["name"], parent).id
            if kind == "rename_folder":
                f = self.folders[self.folder_id(op["id"])]
                f.name = op["name"]
                f.seq = self._bump()
                return f.id
            if kind == "move_folder":
                f = self.folders[self.folder_id(op["id"])]
                to = self.folder_id(op["to"])
                if to in self.subtree(f.id):
                    raise ValueError("cannot move a folder into itself")
                f.parent = to
                f.seq = self._bump()
                return f.id
            if kind == "delete_folder":
                fid = self.folder_id(op["id"])
                if self.folders[fid].well_known:
                    raise ValueError("well-known folders cannot be deleted")
                for sub in self.subtree(fid):
                    for m in [m for m in self.msgs.values() if m.folder == sub]:
                        self._depart(m)
                        del self.msgs[m.id]
                    del self.folders[sub]
                    self.folder_departures.append((self._bump(), sub))
                return fid
            if kind == "post_message":
                return self._post(op)
            if kind == "add_attachment":
                return self._add_attachment(op)
            if kind == "update_message":
                return self._update(op)
            if kind in fidelity.X_OPS:
                return self.x_apply(op)
            if kind == "expire_delta_tokens":
                self.token_epoch += 1
                return self.token_epoch
            raise ValueError(f"unknown op {kind!r}")

    def random_ops(self, n: int, seed: int) -> list[dict[str, Any]]:
        """A deterministic random mix of every kind of change, as explicit ops (what is logged)."""
        rng = random.Random(f"{seed}:{self.user.id}")
        with self.lock:
            ids = sorted(self.msgs)
            custom = [f.id for f in self.folders.values() if not f.well_known]
            ops: list[dict[str, Any]] = []
            now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
            for _ in range(n):
                r = rng.random()
                pick = rng.sample(ids, min(len(ids), rng.randint(1, 5))) if ids else []
                if r < 0.30:
                    ops.append({"op": "new_mail", "count": rng.randint(1, 4),
                                "folder": rng.choice(["inbox", "inbox", "sentitems", "archive"] + custom[:2]),
                                "at": now})
                elif r < 0.45:
                    ops.append({"op": rng.choice(["mark_read", "mark_unread"]), "ids": pick})
                elif r < 0.55:
                    ops.append({"op": rng.choice(["flag", "categorize"]), "ids": pick})
                elif r < 0.70:
                    ops.append({"op": "move", "ids": pick, "to": rng.choice(["archive", "deleteditems"] + custom)})
                elif r < 0.82:
                    ops.append({"op": "delete", "ids": pick})
                elif r < 0.88:
                    drafts = [m.id for m in self.msgs.values() if m.is_draft]
                    if drafts:
                        ops.append({"op": "edit_draft", "ids": [rng.choice(drafts)]})
                elif r < 0.92:
                    ops.append({"op": "create_folder", "parent": rng.choice(["inbox", "archive"]),
                                "name": f"New folder {rng.randint(1, 9999)}"})
                elif r < 0.96 and custom:
                    ops.append({"op": "rename_folder", "id": rng.choice(custom),
                                "name": f"Renamed {rng.randint(1, 9999)} é"})
                elif custom:
                    ops.append({"op": "move_folder", "id": rng.choice(custom),
                                "to": rng.choice(["archive", "inbox", "msgfolderroot"])})
            return ops


class TenantModel:
    def __init__(self, cfg: SimConfigModel) -> None:
        self.cfg = cfg
        self.domain = cfg.domain or f"{cfg.tenant}.example.com"
        self.tenant_id = cfg.tenant_id or str(uuid.UUID(bytes=hashlib.sha256(f"tenant:{cfg.tenant}:{cfg.seed}".encode()).digest()[:16], version=4))
        self.key = hashlib.sha256(f"mailpipe-sim-token-key:{cfg.seed}:{cfg.tenant}".encode()).digest()
        self.users: list[User] = []
        self.mailboxes: dict[str, Mailbox] = {}  # by user id
        self._log_lock = threading.Lock()
        rng = random.Random(f"{cfg.seed}:users")
        locals_: list[str] = []
        for i in range(cfg.users):
            first, last = mime._FIRST[i % len(mime._FIRST)], mime._LAST[(i * 7) % len(mime._LAST)]
            local = f"{first}.{last}".lower().encode("ascii", "ignore").decode()
            if local in locals_:
                local = f"{local}{i}"
            locals_.append(local)
        for extra in cfg.mailbox_sizes:
            if extra not in locals_:
                locals_.append(extra)
        for i, local in enumerate(locals_):
            count = cfg.mailbox_sizes.get(local)
            if count is None:
                count = max(1, int(cfg.messages_per_mailbox * (0.5 + rng.random())))
            self._add_user(local, local.replace(".", " ").title(), "user", count)
        self._add_user("shared-info", "Info (shared)", "shared", max(1, cfg.messages_per_mailbox // 4))
        self._add_user("nomailbox", "No Mailbox", "nomailbox", 0)
        self._replay()

    def _add_user(self, local: str, name: str, kind: str, count: int) -> None:
        uid = str(uuid.UUID(bytes=hashlib.sha256(f"user:{self.cfg.seed}:{local}".encode()).digest()[:16], version=4))
        u = User(uid, f"{local}@{self.domain}", name, kind)
        self.users.append(u)
        if kind != "nomailbox":
            self.mailboxes[uid] = Mailbox(self, u, count, len(self.mailboxes))

    # users ----------------------------------------------------------------------------------------
    def user(self, ref: str) -> User:
        r = ref.lower()
        for u in self.users:
            if u.id == r or u.upn.lower() == r:
                return u
        raise NotFound(ref)

    def mailbox(self, ref: str) -> Mailbox:
        u = self.user(ref)
        mb = self.mailboxes.get(u.id)
        if mb is None:
            raise NotFound(ref)
        return mb

    # tokens ---------------------------------------------------------------------------------------
    def encode_token(self, mb: Mailbox, folder: str, state: dict[str, Any], immutable: bool) -> str:
        body = {"u": mb.user.id, "f": folder, "e": mb.token_epoch, "i": int(immutable), **state}
        raw = json.dumps(body, separators=(",", ":")).encode()
        sig = hmac.new(self.key, raw, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(raw + sig).decode().rstrip("=")

    def decode_token(self, mb: Mailbox, folder: str, token: str) -> dict[str, Any]:
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            raw, sig = blob[:-12], blob[-12:]
            if not hmac.compare_digest(sig, hmac.new(self.key, raw, hashlib.sha256).digest()[:12]):
                raise TokenError("bad signature")
            body = json.loads(raw)
        except TokenError:
            raise
        except Exception:
            raise TokenError("malformed token") from None
        if body.get("u") != mb.user.id or body.get("f") != folder:
            raise TokenError("token of another folder")
        if body.get("e") != mb.token_epoch:
            raise TokenError("token expired")
        return body

    # mutations + persistence ------------------------------------------------------------------------
    def mutate(self, user_ref: str, ops: list[dict[str, Any]], persist: bool = True) -> list[Any]:
        mb = self.mailbox(user_ref)
        out = []
        with mb.lock:
            for op in ops:
                out.append(mb.apply(op))
            if persist and self.cfg.state_dir:
                self._log({"user": mb.user.id, "ops": ops})
        return out

    def _log_path(self) -> Path | None:
        return Path(self.cfg.state_dir) / "mutations.jsonl" if self.cfg.state_dir else None

    def _log(self, entry: dict[str, Any]) -> None:
        p = self._log_path()
        assert p is not None
        with self._log_lock:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _replay(self) -> None:
        p = self._log_path()
        if p is None or not p.exists():
            return
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                e = json.loads(line)
                self.mutate(e["user"], e["ops"], persist=False)

    # ground truth -----------------------------------------------------------------------------------
    def truth(self, user_ref: str | None = None, with_hashes: bool = True,
              semantic_view: bool = False, fidelity_view: bool = False) -> dict[str, Any]:
        """Every mailbox as it is now. ``with_hashes``: each item's MIME size, sha256 and internetMessageId
        (generates every item's MIME). ``semantic_view``: each item's ``semantic`` dict, what a person sees
        (:func:`mailpipe.sim.semantic.summarize` of its MIME plus read, draft, flag, categories and times)."""
        out: dict[str, Any] = {"tenant": self.cfg.tenant, "tenant_id": self.tenant_id, "mailboxes": {}}
        for uid, mb in self.mailboxes.items():
            if user_ref and user_ref.lower() not in (uid, mb.user.upn.lower()):
                continue
            with mb.lock:
                folders = [{"id": f.id, "path": mb.path(f.id), "parent_id": f.parent} for f in mb.folders.values()]
                msgs = list(mb.msgs.values())
                items = []
                for m in msgs:
                    it = {"id": m.id, "folder_id": m.folder, "folder_path": mb.path(m.folder),
                          "is_read": m.is_read, "is_draft": m.is_draft}
                    state = {"is_read": m.is_read, "is_draft": m.is_draft, "flag_status": m.flag,
                             "categories": list(m.categories), "received_at": posted_mod.iso(m.received),
                             "sent_at": posted_mod.iso(mb.sent(m))}
                    items.append((m, it, state))
            for m, it, state in items:
                if with_hashes or semantic_view:
                    data = mb.mime(m)
                if with_hashes:
                    it["size"] = len(data)
                    it["sha256"] = hashlib.sha256(data).hexdigest()
                    it["internet_message_id"] = mb.internet_message_id(m)
                if semantic_view:
                    it["semantic"] = {**semantic.summarize(data), **state}
            out["mailboxes"][mb.user.upn] = {"id": uid, "folders": folders, "items": [it for _, it, _ in items]}
            if fidelity_view:
                out["mailboxes"][mb.user.upn]["fidelity"] = mb.x_truth(with_hashes)
        return out
