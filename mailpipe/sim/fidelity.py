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
sequence counter, change lists and delta machinery (:meth:`Mailbox.delta_page`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from mailpipe.sim import mime
from mailpipe.sim import posted as posted_mod

if TYPE_CHECKING:
    from mailpipe.sim.model import Folder, Mailbox, Msg

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
def seed(mb: Mailbox, message_count: int) -> None:
    """Calendar, contact and task folders with items, after the mail (so mail ids and sequence numbers are
    what they were before these existed)."""
    cfg = mb.model.cfg
    keys: dict[str, str] = {}
    for wk, key, name, cls, parent in X_TREE:
        f = add_folder(mb, name, keys[parent] if parent else mb.root_id, cls, wk)
        keys[key] = f.id
    count = cfg.other_items if cfg.other_items is not None else max(4, message_count // 5)
    rng = random.Random(f"{cfg.seed}:{mb.user.id}:xitems")
    names = list(X_WEIGHTS)
    weights = [X_WEIGHTS[k] for k in names]
    base = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    for _ in range(count):
        fid = keys[rng.choices(names, weights)[0]]
        new_item(mb, fid, base + timedelta(minutes=rng.randrange(0, 60 * 24 * 300)))


def _xfid(mb: Mailbox, n: int) -> str:
    raw = hashlib.sha256(f"{mb.model.cfg.seed}:{mb.user.id}:xfolder:{n}".encode()).digest()[:30]
    return "AAMkX" + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "AAA="


def _xid(mb: Mailbox, n: int) -> str:
    raw = hashlib.sha256(f"{mb.model.cfg.seed}:{mb.user.id}:xitem:{n}".encode()).digest()[:30]
    return "AAkALx" + base64.urlsafe_b64encode(raw).decode() + "AAA="


def add_folder(mb: Mailbox, name: str, parent: str, cls: str, wk: str | None = None) -> Folder:
    from mailpipe.sim.model import Folder

    f = Folder(_xfid(mb, mb.next_xfolder_n), name, parent, wk, seq=mb._bump())
    f.cls = cls
    mb.next_xfolder_n += 1
    mb.xfolders[f.id] = f
    if wk:
        mb.by_wk[wk] = f.id
    return f


def new_item(mb: Mailbox, fid: str, created: datetime) -> XItem:
    f = mb.xfolders[fid]
    n = mb.next_xitem_n
    mb.next_xitem_n += 1
    it = XItem(_xid(mb, n), n, fid, mb._bump(), ITEM_CLASS[f.cls], created)
    mb.xitems[it.id] = it
    f.changes.append((it.seq, it.id))
    return it


def touch(mb: Mailbox, it: XItem) -> None:
    it.seq = mb._bump()
    mb.xfolders[it.folder].changes.append((it.seq, it.id))


def depart(mb: Mailbox, it: XItem) -> None:
    mb.xfolders[it.folder].departures.append((mb._bump(), it.id))


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


def _generated(mb: Mailbox, it: XItem) -> tuple[dict[str, Any], bytes]:
    cfg = mb.model.cfg
    rng = random.Random(f"{cfg.seed}:{it.id}:{it.version}")
    who = mime._person(rng, mb.model.domain)
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
                     organizer=who[1], attendees=sorted({mime._person(rng, mb.model.domain)[1] for _ in range(3)}))
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


def xitem_content(mb: Mailbox, it: XItem) -> tuple[dict[str, Any], bytes]:
    if it.imported is not None:
        props, body = it.imported
        return {**props, "categories": list(it.categories)}, body
    return _generated(mb, it)


def message_props(mb: Mailbox, m: Msg) -> dict[str, Any]:
    """The full-fidelity properties of a mail item, as they are now."""
    if m.imported is not None:
        base = dict(m.imported[0])
    else:
        base = {"type": "IPM.Note", "subject": mb.subject(m), "internet_message_id": mb.internet_message_id(m),
                "sent": posted_mod.iso(mb.sent(m))}
    base.update(is_read=m.is_read, is_draft=m.is_draft, flag=m.flag, categories=list(m.categories),
                importance=m.importance, received=posted_mod.iso(m.received))
    return base


def stream(mb: Mailbox, item: Msg | XItem) -> bytes:
    """The item's export stream (what ``exportItems`` answers, base64-decoded)."""
    if isinstance(item, XItem):
        return encode(*xitem_content(mb, item))
    return encode(message_props(mb, item), mb.mime(item))


def stream_size(mb: Mailbox, item: Msg | XItem) -> int:
    """``len(stream(item))``, cached per (item, version): delta pages report every item's size."""
    hit = mb.xsizes.get(item.id)
    if hit is not None and hit[0] == item.seq:
        return hit[1]
    n = len(stream(mb, item))
    mb.xsizes[item.id] = (item.seq, n)
    return n


def item_type(item: Msg | XItem) -> str:
    return item.type if isinstance(item, XItem) else "IPM.Note"


# the export API's view of the mailbox ---------------------------------------------------------------------
def folder_class(mb: Mailbox, fid: str) -> str:
    f = mb.xfolders.get(fid)
    return f.cls if f is not None else "IPF.Note"


def any_folder(mb: Mailbox, ref: str) -> tuple[Folder, bool]:
    """(folder, is_mail) by id or well-known name; raises NotFound."""
    from mailpipe.sim.model import NotFound

    fid = mb.by_wk.get(ref.lower(), ref)
    if fid in mb.folders:
        return mb.folders[fid], True
    if fid in mb.xfolders:
        return mb.xfolders[fid], False
    raise NotFound(ref)


def all_folders(mb: Mailbox) -> list[Folder]:
    return [*mb.folders.values(), *mb.xfolders.values()]


def any_path(mb: Mailbox, fid: str) -> list[str]:
    out = []
    while fid != mb.root_id:
        f = mb.folders.get(fid) or mb.xfolders[fid]
        out.append(f.name)
        fid = f.parent
    return out[::-1]


def children(mb: Mailbox, fid: str) -> list[Folder]:
    return [f for f in all_folders(mb) if f.parent == fid]


def find_item(mb: Mailbox, iid: str) -> Msg | XItem | None:
    return mb.msgs.get(iid) or mb.xitems.get(iid)


def item_change_key(mb: Mailbox, item: Msg | XItem) -> str:
    return "CQAAAB" + hashlib.sha1(f"{item.id}:{item.seq}".encode()).hexdigest()[:20]


def folder_json(mb: Mailbox, f: Folder, counts: dict[str, int]) -> dict[str, Any]:
    return {"@odata.type": "#microsoft.graph.mailboxFolder", "id": f.id, "displayName": f.name,
            "parentFolderId": f.parent, "childFolderCount": len(children(mb, f.id)),
            "totalItemCount": counts.get(f.id, 0), "wellKnownName": f.well_known,
            "type": getattr(f, "cls", "IPF.Note")}


def item_counts(mb: Mailbox) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in (*mb.msgs.values(), *mb.xitems.values()):
        out[it.folder] = out.get(it.folder, 0) + 1
    return out


def item_json(mb: Mailbox, item: Msg | XItem) -> dict[str, Any]:
    ck = item_change_key(mb, item)
    if isinstance(item, XItem):
        created = item.created
        modified = item.created + timedelta(seconds=item.seq)
    else:
        created = item.received
        modified = item.received + timedelta(seconds=item.change_n)
    return {"@odata.type": "#microsoft.graph.mailboxItem", "@odata.etag": f'W/"{ck}"', "id": item.id,
            "createdDateTime": posted_mod.iso(created), "lastModifiedDateTime": posted_mod.iso(modified),
            "changeKey": ck, "categories": list(item.categories), "type": item_type(item),
            "size": stream_size(mb, item)}


def folder_delta(mb: Mailbox, token: dict | None) -> tuple[list[Folder], list[str], dict]:
    """Every folder of every class (first sync), or those changed since the watermark, parents first."""
    with mb.lock:
        w = token["w"] if token else 0
        changed = [f for f in all_folders(mb) if f.seq > w]
        gone = [fid for s, fid in (*mb.folder_departures, *mb.xfolder_departures)
                if s > w and fid not in mb.folders and fid not in mb.xfolders]
        return sorted(changed, key=lambda f: len(any_path(mb, f.id))), gone, {"w": mb.seq}


def delta_page(mb: Mailbox, fid: str, token: dict | None, page_size: int) -> tuple[list, list, dict]:
    if fid in mb.xfolders:
        return mb.delta_page(fid, token, page_size, folders=mb.xfolders, items=mb.xitems)
    return mb.delta_page(fid, token, page_size)


# mutations ---------------------------------------------------------------------------------------------------
X_OPS = {"new_item", "edit_item", "move_item", "delete_item", "create_xfolder", "rename_xfolder",
         "delete_xfolder", "import_item"}


def apply(mb: Mailbox, op: dict[str, Any]) -> Any:
    kind = op["op"]
    if kind == "new_item":
        f, is_mail = any_folder(mb, op.get("folder", "calendar"))
        if is_mail:
            raise ValueError("new_item takes a calendar, contact or task folder (new_mail: mail)")
        when = datetime.fromisoformat(op["at"]) if op.get("at") else datetime.now(timezone.utc)
        return [new_item(mb, f.id, when.replace(microsecond=0)).id for _ in range(int(op.get("count", 1)))]
    if kind in ("edit_item", "move_item", "delete_item"):
        done = []
        for iid in op["ids"]:
            it = mb.xitems.get(iid)
            if it is None:
                continue
            if kind == "delete_item":
                depart(mb, it)
                del mb.xitems[iid]
            elif kind == "move_item":
                to, is_mail = any_folder(mb, op["to"])
                if is_mail or to.id == it.folder or to.cls != mb.xfolders[it.folder].cls:
                    continue
                depart(mb, it)
                it.folder = to.id
                touch(mb, it)
            else:
                if it.imported is None:
                    it.version += 1
                it.categories = tuple(sorted(set(it.categories) | {op.get("category", "Green category")}))
                touch(mb, it)
            done.append(iid)
        return done
    if kind == "create_xfolder":
        parent, is_mail = any_folder(mb, op["parent"]) if op.get("parent") and op["parent"] != mb.root_id \
            else (None, False)
        cls = op.get("class") or (parent.cls if parent is not None and not is_mail else "IPF.Appointment")
        if cls not in ITEM_CLASS or cls == "IPF.Note":
            raise ValueError(f"create_xfolder: class {cls!r} is not one of IPF.Appointment, IPF.Contact, IPF.Task")
        return add_folder(mb, op["name"], parent.id if parent is not None else mb.root_id, cls).id
    if kind == "rename_xfolder":
        f = mb.xfolders[any_folder(mb, op["id"])[0].id]
        f.name = op["name"]
        f.seq = mb._bump()
        return f.id
    if kind == "delete_xfolder":
        f = mb.xfolders[any_folder(mb, op["id"])[0].id]
        if f.well_known:
            raise ValueError("well-known folders cannot be deleted")
        doomed = [f.id]
        i = 0
        while i < len(doomed):
            doomed += [c.id for c in mb.xfolders.values() if c.parent == doomed[i]]
            i += 1
        for sub in doomed:
            for it in [it for it in mb.xitems.values() if it.folder == sub]:
                depart(mb, it)
                del mb.xitems[it.id]
            del mb.xfolders[sub]
            mb.xfolder_departures.append((mb._bump(), sub))
        return f.id
    if kind == "import_item":
        return _import(mb, op)
    raise ValueError(f"unknown op {kind!r}")


def _import(mb: Mailbox, op: dict[str, Any]) -> str:
    """Create (or, with ``id``, update) an item from an export stream, already checked by the server."""
    from mailpipe.sim.model import Msg

    props, body = decode(base64.b64decode(op["data"]))
    at = posted_mod.parse_time(op["at"])
    f, is_mail = any_folder(mb, op["folder"])
    stored = {k: v for k, v in props.items()
              if k not in ("is_read", "is_draft", "flag", "categories", "importance", "received")}
    if op.get("id"):  # update mode: same id, new content
        item = find_item(mb, op["id"])
        assert item is not None
    elif is_mail:
        n = mb.next_n
        mb.next_n += 1
        item = Msg(mb._mid(n), n, f.id, 0, posted_mod.parse_time(props.get("received") or op["at"]),
                   bool(props.get("is_draft")), False)
        mb.msgs[item.id] = item
    else:
        n = mb.next_xitem_n
        mb.next_xitem_n += 1
        item = XItem(_xid(mb, n), n, f.id, 0, props["type"], at)
        mb.xitems[item.id] = item
    item.categories = tuple(props.get("categories") or ())
    if isinstance(item, XItem):
        item.imported = (stored, body)
        touch(mb, item)
    else:
        item.imported = (stored, body)
        item.is_read = bool(props.get("is_read"))
        item.flag = props.get("flag") or "notFlagged"
        item.importance = props.get("importance") or "normal"
        if props.get("received"):
            item.received = posted_mod.parse_time(props["received"])
        mb._touch(item)
        if mb._imid_index is not None:
            mb._index(item)
    return item.id


def random_ops(mb: Mailbox, n: int, seed_: int) -> list[dict[str, Any]]:
    """``n`` changes to calendar, contact and task items and folders, as explicit ops (what is logged)."""
    rng = random.Random(f"{seed_}:{mb.user.id}:x")
    ops: list[dict[str, Any]] = []
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    with mb.lock:
        ids = sorted(mb.xitems)
        custom = sorted(f.id for f in mb.xfolders.values() if not f.well_known)
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


def truth(mb: Mailbox, with_hashes: bool = True) -> dict[str, Any]:
    """The export API's ground truth for one mailbox: every folder (with its class) and every item of every
    type, with its folder path and, with ``with_hashes``, the size and sha256 of its export stream."""
    with mb.lock:
        folders = [{"id": f.id, "path": any_path(mb, f.id), "parent_id": f.parent,
                    "type": getattr(f, "cls", "IPF.Note"), "well_known": f.well_known} for f in all_folders(mb)]
        items = [(it, {"id": it.id, "type": item_type(it), "folder_id": it.folder,
                       "folder_path": any_path(mb, it.folder), "change_key": item_change_key(mb, it)})
                 for it in (*mb.msgs.values(), *mb.xitems.values())]
    out = []
    for it, d in items:
        if with_hashes:
            data = stream(mb, it)
            d["size"] = len(data)
            d["sha256"] = hashlib.sha256(data).hexdigest()
        out.append(d)
    return {"mailbox_id": mailbox_id(mb), "folders": folders, "items": out}


def mailbox_id(mb: Mailbox) -> str:
    """``primaryMailboxId``: the shape Graph's examples show (``MBX:e0643f21@a7809c93``)."""
    return f"MBX:{mb.user.id.replace('-', '')[:8]}@{mb.model.tenant_id.replace('-', '')[:8]}"
