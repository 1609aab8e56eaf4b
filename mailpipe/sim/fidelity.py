"""The mailbox export/import API's side of the simulated mailbox: calendar, contact and task folders with
their items, and the simulator's own full-fidelity stream (docs/SIMULATOR.md, "The mailbox import/export API").

Exchange's ``exportItems`` answers an opaque FastTransfer stream per item; the simulator answers a stream of
its own design, just as opaque to clients and carrying everything needed to recreate the item::

    b"MPSIM-FTS\\x01" | u32 little-endian: length of P | P: canonical JSON of the item's properties | body

``P`` holds the message class (``type``) and the item's properties (subject, times, read state, flag,
categories, importance, ...); the body is the message's MIME for mail and a generated MIME document for the
other item types (an event's agenda, a contact's photo: attachments shared across items, so a client's
chunking can deduplicate them). It never contains the item id, the folder or the mailbox: the same item
exported from two mailboxes (the original and its import elsewhere) gives the same bytes.

Non-mail folders and items live beside the mail ones (``Mailbox.xfolders``, ``Mailbox.xitems``): the mail
routes (``mailFolders``, ``messages``) never show them, the export API shows both. They share the mailbox's
sequence counter, change lists and delta machinery (:meth:`Mailbox.delta_page`). The functions of this half are
the ``x_`` methods of :class:`XMailbox`, which :class:`~mailpipe.sim.model.Mailbox` inherits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

from mailpipe.sim import mime
from mailpipe.sim import posted as posted_mod
from mailpipe.sim.items import Folder, Msg, NotFound

MAGIC = b"MPSIM-FTS\x01"

# folder class -> message class of the items it holds
ITEM_CLASS = {"IPF.Note": "IPM.Note", "IPF.Appointment": "IPM.Appointment", "IPF.Contact": "IPM.Contact",
              "IPF.Task": "IPM.Task"}
# (well-known name or None, key, display name, folder class, parent key or None for the root)
X_TREE = [
    ("calendar", "calendar", "Calendar", "IPF.Appointment", None),
    (None, "cal-team", "Team calendar", "IPF.Appointment", "calendar"),
    ("contacts", "contacts", "Contacts", "IPF.Contact", None),
    (None, "con-clients", "Clients — Kunden", "IPF.Contact", "contacts"),
    ("tasks", "tasks", "Tasks", "IPF.Task", None),
]
X_WEIGHTS = {"calendar": 40, "cal-team": 10, "contacts": 25, "con-clients": 10, "tasks": 15}


class FtsError(ValueError):
    """Data that is not a stream this simulator exported."""


class XItem:
    """A calendar event, contact or task. ``imported``: (properties, body) of an item created by an import,
    else its content is generated from (tenant seed, id, version)."""

    __slots__ = ("id", "n", "folder", "seq", "type", "version", "categories", "created", "imported")

    def __init__(self, id: str, n: int, folder: str, seq: int, type_: str, created: datetime) -> None:
        self.id = id
        self.n = n
        self.folder = folder
        self.seq = seq
        self.type = type_
        self.version = 0
        self.categories: tuple[str, ...] = ()
        self.created = created
        self.imported: tuple[dict[str, Any], bytes] | None = None


# the stream ------------------------------------------------------------------------------------------------


def encode(props: dict[str, Any], body: bytes) -> bytes:
    pj = json.dumps(props, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return MAGIC + struct.pack("<I", len(pj)) + pj + body


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise FtsError("The data is not a valid FastTransfer stream.")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        props = json.loads(data[start:start + n])
    except ValueError:
        raise FtsError("The FastTransfer stream is damaged.") from None
    if not isinstance(props, dict) or not isinstance(props.get("type"), str) or len(data) < start + n:
        raise FtsError("The FastTransfer stream is damaged.")
    return props, data[start + n:]


# seeding -----------------------------------------------------------------------------------------------------


# content -----------------------------------------------------------------------------------------------------


def _mime_doc(headers: list[tuple[str, str]], text: str, attachment: mime.Attachment | None, boundary: str) -> bytes:
    crlf = b"\r\n"
    head = crlf.join(f"{k}: {v}".encode() for k, v in headers)
    if attachment is None:
        return head + crlf + b"Content-Type: text/plain; charset=utf-8" + crlf + crlf + text.encode() + crlf
    parts = [head + crlf + f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode() + crlf + crlf,
             f"--{boundary}".encode() + crlf + b"Content-Type: text/plain; charset=utf-8" + crlf + crlf
             + text.encode() + crlf,
             f"--{boundary}".encode() + crlf + f"Content-Type: {attachment.content_type}; "
             f'name="{attachment.name}"'.encode() + crlf
             + f'Content-Disposition: attachment; filename="{attachment.name}"'.encode() + crlf
             + b"Content-Transfer-Encoding: base64" + crlf + crlf + mime._b64_lines(attachment.data),
             f"--{boundary}--".encode() + crlf]
    return b"".join(parts)


def item_type(item: Msg | XItem) -> str:
    return item.type if isinstance(item, XItem) else "IPM.Note"


# the export API's view of the mailbox ---------------------------------------------------------------------


# mutations ---------------------------------------------------------------------------------------------------


X_OPS = {"new_item", "edit_item", "move_item", "delete_item", "create_xfolder", "rename_xfolder",
         "delete_xfolder", "import_item"}


class XMailbox:
    """The export API's half of a simulated mailbox (calendar, contact and task folders and items, the
    full-fidelity stream of every item, its delta and its mutations): :class:`~mailpipe.sim.model.Mailbox`
    inherits it, so ``self`` is the mailbox. Its methods are ``x_`` named."""

    def x_seed(self, message_count: int) -> None:
        """Calendar, contact and task folders with items, after the mail (so mail ids and sequence numbers are
        what they were before these existed)."""
        cfg = self.model.cfg
        keys: dict[str, str] = {}
        for wk, key, name, cls, parent in X_TREE:
            f = self.x_add_folder(name, keys[parent] if parent else self.root_id, cls, wk)
            keys[key] = f.id
        count = cfg.other_items if cfg.other_items is not None else max(4, message_count // 5)
        rng = random.Random(f"{cfg.seed}:{self.user.id}:xitems")
        names = list(X_WEIGHTS)
        weights = [X_WEIGHTS[k] for k in names]
        base = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
        for _ in range(count):
            fid = keys[rng.choices(names, weights)[0]]
            self.x_new_item(fid, base + timedelta(minutes=rng.randrange(0, 60 * 24 * 300)))

    def _x_xfid(self, n: int) -> str:
        raw = hashlib.sha256(f"{self.model.cfg.seed}:{self.user.id}:xfolder:{n}".encode()).digest()[:30]
        return "AAMkX" + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "AAA="

    def _x_xid(self, n: int) -> str:
        raw = hashlib.sha256(f"{self.model.cfg.seed}:{self.user.id}:xitem:{n}".encode()).digest()[:30]
        return "AAkALx" + base64.urlsafe_b64encode(raw).decode() + "AAA="

    def x_add_folder(self, name: str, parent: str, cls: str, wk: str | None = None) -> Folder:
        f = Folder(self._x_xfid(self.next_xfolder_n), name, parent, wk, seq=self._bump())
        f.cls = cls
        self.next_xfolder_n += 1
        self.xfolders[f.id] = f
        if wk:
            self.by_wk[wk] = f.id
        return f

    def x_new_item(self, fid: str, created: datetime) -> XItem:
        f = self.xfolders[fid]
        n = self.next_xitem_n
        self.next_xitem_n += 1
        it = XItem(self._x_xid(n), n, fid, self._bump(), ITEM_CLASS[f.cls], created)
        self.xitems[it.id] = it
        f.changes.append((it.seq, it.id))
        return it

    def x_touch(self, it: XItem) -> None:
        it.seq = self._bump()
        self.xfolders[it.folder].changes.append((it.seq, it.id))

    def x_depart(self, it: XItem) -> None:
        self.xfolders[it.folder].departures.append((self._bump(), it.id))

    def _x_generated(self, it: XItem) -> tuple[dict[str, Any], bytes]:
        cfg = self.model.cfg
        rng = random.Random(f"{cfg.seed}:{it.id}:{it.version}")
        who = mime._person(rng, self.model.domain)
        subject = mime._text(rng, rng.randint(3, 7)).split("\r\n")[0].rstrip(".")
        if it.version:
            subject += f" (rev. {it.version})"
        text = mime._text(rng, rng.randint(30, 400))
        pool = [a for a in mime.pool(cfg.seed)[1:8] if len(a.data) < 400_000]
        att = None
        props: dict[str, Any] = {"type": it.type, "categories": list(it.categories),
                                 "created": posted_mod.iso(it.created)}
        headers: list[tuple[str, str]] = []
        if it.type == "IPM.Appointment":
            start = it.created + timedelta(days=rng.randint(1, 60))
            end = start + timedelta(minutes=rng.choice([30, 60, 90]))
            props.update(subject=subject, start=posted_mod.iso(start), end=posted_mod.iso(end),
                         location=rng.choice(["Room 1.21", "Teams", "Café Zürich", "HQ — Aula"]),
                         organizer=who[1],
                         attendees=sorted({mime._person(rng, self.model.domain)[1] for _ in range(3)}))
            headers = [("X-Item", "event"), ("Subject", subject), ("Organizer", who[1])]
            if not cfg.plain and pool and it.n % 4 == 1:
                att = pool[it.n % len(pool)]
        elif it.type == "IPM.Contact":
            props.update(display_name=who[0], email=who[1], company=rng.choice(["Contoso", "Fabrikam", "Northwind"]),
                         phone=f"+41 44 {rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)}")
            headers = [("X-Item", "contact"), ("FN", who[0])]
            text = text[:400]
            if not cfg.plain and pool and it.n % 5 == 2:
                att = pool[(it.n // 5) % len(pool)]
        else:
            due = it.created + timedelta(days=rng.randint(1, 30))
            props.update(subject=subject, due=posted_mod.iso(due),
                         status=rng.choice(["notStarted", "inProgress", "completed"]))
            headers = [("X-Item", "task"), ("Subject", subject)]
            text = text[:1200]
        boundary = "_fts_" + hashlib.sha1(f"{it.id}:{it.version}".encode()).hexdigest()[:16] + "_"
        return props, _mime_doc(headers, text, att, boundary)

    def x_xitem_content(self, it: XItem) -> tuple[dict[str, Any], bytes]:
        if it.imported is not None:
            props, body = it.imported
            return {**props, "categories": list(it.categories)}, body
        return self._x_generated(it)

    def x_message_props(self, m: Msg) -> dict[str, Any]:
        """The full-fidelity properties of a mail item, as they are now."""
        if m.imported is not None:
            base = dict(m.imported[0])
        else:
            base = {"type": "IPM.Note", "subject": self.subject(m), "internet_message_id": self.internet_message_id(m),
                    "sent": posted_mod.iso(self.sent(m))}
        base.update(is_read=m.is_read, is_draft=m.is_draft, flag=m.flag, categories=list(m.categories),
                    importance=m.importance, received=posted_mod.iso(m.received))
        return base

    def x_stream(self, item: Msg | XItem) -> bytes:
        """The item's export stream (what ``exportItems`` answers, base64-decoded)."""
        if isinstance(item, XItem):
            return encode(*self.x_xitem_content(item))
        return encode(self.x_message_props(item), self.mime(item))

    def x_stream_size(self, item: Msg | XItem) -> int:
        """``len(item.x_stream())``, cached per (item, version): delta pages report every item's size."""
        hit = self.xsizes.get(item.id)
        if hit is not None and hit[0] == item.seq:
            return hit[1]
        n = len(self.x_stream(item))
        self.xsizes[item.id] = (item.seq, n)
        return n

    def x_folder_class(self, fid: str) -> str:
        f = self.xfolders.get(fid)
        return f.cls if f is not None else "IPF.Note"

    def x_any_folder(self, ref: str) -> tuple[Folder, bool]:
        """(folder, is_mail) by id or well-known name; raises NotFound."""
        fid = self.by_wk.get(ref.lower(), ref)
        if fid in self.folders:
            return self.folders[fid], True
        if fid in self.xfolders:
            return self.xfolders[fid], False
        raise NotFound(ref)

    def x_all_folders(self) -> list[Folder]:
        return [*self.folders.values(), *self.xfolders.values()]

    def x_any_path(self, fid: str) -> list[str]:
        out = []
        while fid != self.root_id:
            f = self.folders.get(fid) or self.xfolders[fid]
            out.append(f.name)
            fid = f.parent
        return out[::-1]

    def x_children(self, fid: str) -> list[Folder]:
        return [f for f in self.x_all_folders() if f.parent == fid]

    def x_find_item(self, iid: str) -> Msg | XItem | None:
        return self.msgs.get(iid) or self.xitems.get(iid)

    def x_item_change_key(self, item: Msg | XItem) -> str:
        return "CQAAAB" + hashlib.sha1(f"{item.id}:{item.seq}".encode()).hexdigest()[:20]

    def x_folder_json(self, f: Folder, counts: dict[str, int]) -> dict[str, Any]:
        return {"@odata.type": "#microsoft.graph.mailboxFolder", "id": f.id, "displayName": f.name,
                "parentFolderId": f.parent, "childFolderCount": len(self.x_children(f.id)),
                "totalItemCount": counts.get(f.id, 0), "wellKnownName": f.well_known,
                "type": getattr(f, "cls", "IPF.Note")}

    def x_item_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in (*self.msgs.values(), *self.xitems.values()):
            out[it.folder] = out.get(it.folder, 0) + 1
        return out

    def x_item_json(self, item: Msg | XItem) -> dict[str, Any]:
        ck = self.x_item_change_key(item)
        if isinstance(item, XItem):
            created = item.created
            modified = item.created + timedelta(seconds=item.seq)
        else:
            created = item.received
            modified = item.received + timedelta(seconds=item.change_n)
        return {"@odata.type": "#microsoft.graph.mailboxItem", "@odata.etag": f'W/"{ck}"', "id": item.id,
                "createdDateTime": posted_mod.iso(created), "lastModifiedDateTime": posted_mod.iso(modified),
                "changeKey": ck, "categories": list(item.categories), "type": item_type(item),
                "size": self.x_stream_size(item)}

    def x_folder_delta(self, token: dict | None) -> tuple[list[Folder], list[str], dict]:
        """Every folder of every class (first sync), or those changed since the watermark, parents first."""
        with self.lock:
            w = token["w"] if token else 0
            changed = [f for f in self.x_all_folders() if f.seq > w]
            gone = [fid for s, fid in (*self.folder_departures, *self.xfolder_departures)
                    if s > w and fid not in self.folders and fid not in self.xfolders]
            return sorted(changed, key=lambda f: len(self.x_any_path(f.id))), gone, {"w": self.seq}

    def x_delta_page(self, fid: str, token: dict | None, page_size: int) -> tuple[list, list, dict]:
        if fid in self.xfolders:
            return self.delta_page(fid, token, page_size, folders=self.xfolders, items=self.xitems)
        return self.delta_page(fid, token, page_size)

    def x_apply(self, op: dict[str, Any]) -> Any:
        kind = op["op"]
        if kind == "new_item":
            f, is_mail = self.x_any_folder(op.get("folder", "calendar"))
            if is_mail:
                raise ValueError("new_item takes a calendar, contact or task folder (new_mail: mail)")
            when = datetime.fromisoformat(op["at"]) if op.get("at") else datetime.now(timezone.utc)
            return [self.x_new_item(f.id, when.replace(microsecond=0)).id for _ in range(int(op.get("count", 1)))]
        if kind in ("edit_item", "move_item", "delete_item"):
            done = []
            for iid in op["ids"]:
                it = self.xitems.get(iid)
                if it is None:
                    continue
                if kind == "delete_item":
                    self.x_depart(it)
                    del self.xitems[iid]
                elif kind == "move_item":
                    to, is_mail = self.x_any_folder(op["to"])
                    if is_mail or to.id == it.folder or to.cls != self.xfolders[it.folder].cls:
                        continue
                    self.x_depart(it)
                    it.folder = to.id
                    self.x_touch(it)
                else:
                    if it.imported is None:
                        it.version += 1
                    it.categories = tuple(sorted(set(it.categories) | {op.get("category", "Green category")}))
                    self.x_touch(it)
                done.append(iid)
            return done
        if kind == "create_xfolder":
            parent, is_mail = self.x_any_folder(op["parent"]) if op.get("parent") and op["parent"] != self.root_id \
                else (None, False)
            cls = op.get("class") or (parent.cls if parent is not None and not is_mail else "IPF.Appointment")
            if cls not in ITEM_CLASS or cls == "IPF.Note":
                raise ValueError(f"create_xfolder: class {cls!r} is not one of IPF.Appointment, IPF.Contact, IPF.Task")
            return self.x_add_folder(op["name"], parent.id if parent is not None else self.root_id, cls).id
        if kind == "rename_xfolder":
            f = self.xfolders[self.x_any_folder(op["id"])[0].id]
            f.name = op["name"]
            f.seq = self._bump()
            return f.id
        if kind == "delete_xfolder":
            f = self.xfolders[self.x_any_folder(op["id"])[0].id]
            if f.well_known:
                raise ValueError("well-known folders cannot be deleted")
            doomed = [f.id]
            i = 0
            while i < len(doomed):
                doomed += [c.id for c in self.xfolders.values() if c.parent == doomed[i]]
                i += 1
            for sub in doomed:
                for it in [it for it in self.xitems.values() if it.folder == sub]:
                    self.x_depart(it)
                    del self.xitems[it.id]
                del self.xfolders[sub]
                self.xfolder_departures.append((self._bump(), sub))
            return f.id
        if kind == "import_item":
            return self._x_import(op)
        raise ValueError(f"unknown op {kind!r}")

    def _x_import(self, op: dict[str, Any]) -> str:
        """Create (or, with ``id``, update) an item from an export stream, already checked by the server."""
        props, body = decode(base64.b64decode(op["data"]))
        at = posted_mod.parse_time(op["at"])
        f, is_mail = self.x_any_folder(op["folder"])
        stored = {k: v for k, v in props.items()
                  if k not in ("is_read", "is_draft", "flag", "categories", "importance", "received")}
        if op.get("id"):  # update mode: same id, new content
            item = self.x_find_item(op["id"])
            assert item is not None
        elif is_mail:
            n = self.next_n
            self.next_n += 1
            item = Msg(self._mid(n), n, f.id, 0, posted_mod.parse_time(props.get("received") or op["at"]),
                       bool(props.get("is_draft")), False)
            self.msgs[item.id] = item
        else:
            n = self.next_xitem_n
            self.next_xitem_n += 1
            item = XItem(self._x_xid(n), n, f.id, 0, props["type"], at)
            self.xitems[item.id] = item
        item.categories = tuple(props.get("categories") or ())
        if isinstance(item, XItem):
            item.imported = (stored, body)
            self.x_touch(item)
        else:
            item.imported = (stored, body)
            item.is_read = bool(props.get("is_read"))
            item.flag = props.get("flag") or "notFlagged"
            item.importance = props.get("importance") or "normal"
            if props.get("received"):
                item.received = posted_mod.parse_time(props["received"])
            self._touch(item)
            if self._imid_index is not None:
                self._index(item)
        return item.id

    def x_random_ops(self, n: int, seed_: int) -> list[dict[str, Any]]:
        """``n`` changes to calendar, contact and task items and folders, as explicit ops (what is logged)."""
        rng = random.Random(f"{seed_}:{self.user.id}:x")
        ops: list[dict[str, Any]] = []
        now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        with self.lock:
            ids = sorted(self.xitems)
            custom = sorted(f.id for f in self.xfolders.values() if not f.well_known)
        for _ in range(n):
            r = rng.random()
            pick = rng.sample(ids, min(len(ids), rng.randint(1, 3))) if ids else []
            if r < 0.35:
                ops.append({"op": "new_item", "count": rng.randint(1, 3),
                            "folder": rng.choice(["calendar", "contacts", "tasks"] + custom), "at": now})
            elif r < 0.6:
                ops.append({"op": "edit_item", "ids": pick})
            elif r < 0.75:
                ops.append({"op": "move_item", "ids": pick, "to": rng.choice(["calendar", "contacts"] + custom)})
            elif r < 0.92:
                ops.append({"op": "delete_item", "ids": pick})
            else:
                ops.append({"op": "create_xfolder", "parent": rng.choice(["calendar", "contacts", "tasks"]),
                            "name": f"Sub {rng.randint(1, 9999)}"})
        return ops

    def x_truth(self, with_hashes: bool = True) -> dict[str, Any]:
        """The export API's ground truth for one mailbox: every folder (with its class) and every item of every
        type, with its folder path and, with ``with_hashes``, the size and sha256 of its export stream."""
        with self.lock:
            folders = [{"id": f.id, "path": self.x_any_path(f.id), "parent_id": f.parent,
                        "type": getattr(f, "cls", "IPF.Note"), "well_known": f.well_known}
                       for f in self.x_all_folders()]
            items = [(it, {"id": it.id, "type": item_type(it), "folder_id": it.folder,
                           "folder_path": self.x_any_path(it.folder), "change_key": self.x_item_change_key(it)})
                     for it in (*self.msgs.values(), *self.xitems.values())]
        out = []
        for it, d in items:
            if with_hashes:
                data = self.x_stream(it)
                d["size"] = len(data)
                d["sha256"] = hashlib.sha256(data).hexdigest()
            out.append(d)
        return {"mailbox_id": self.x_mailbox_id(), "folders": folders, "items": out}

    def x_mailbox_id(self) -> str:
        """``primaryMailboxId``: the shape Graph's examples show (``MBX:e0643f21@a7809c93``)."""
        return f"MBX:{self.user.id.replace('-', '')[:8]}@{self.model.tenant_id.replace('-', '')[:8]}"
