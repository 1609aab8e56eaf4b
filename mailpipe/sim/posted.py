"""Messages created through the Graph write API (what restore does): the posted JSON checked and reduced
to what Exchange keeps of it, the rules Exchange applies to it, and the MIME it then serves.

The checked form (:func:`parse_message`) is plain JSON: it goes into the mutation log as is (attachment
bytes base64), so a restarted simulator rebuilds the same items and serves the same bytes.

Exchange's rules followed here (docs/SIMULATOR.md, "Writing"):

- ``Integer 0x0E07`` (PidTagMessageFlags) present without ``mfUnsent`` (0x8) makes a non-draft (a
  received or sent item); absent, or with 0x8, the item is a draft. It can only be set at creation.
- Read state: ``mfRead`` (0x1) set → read; otherwise ``isRead`` from the JSON; otherwise a draft is read
  (what Graph answers for a new draft) and a non-draft unread (like new mail).
- ``SystemTime 0x0E06`` (PidTagMessageDeliveryTime) is ``receivedDateTime``, ``SystemTime 0x0039``
  (PidTagClientSubmitTime) ``sentDateTime``; without them, the creation time.
- ``hasAttachments`` does not count inline attachments (Graph's documented definition).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.header import Header
from email.utils import format_datetime, formataddr
from typing import Any
from urllib.parse import quote

from mailpipe.sim.mime import BytesLRU

CRLF = b"\r\n"
MAX_REQUEST_BYTES = 4 * 1024 * 1024         # Graph's request size limit (413 above it)
UPLOAD_SESSION_MIN_BYTES = 3 * 1024 * 1024  # smaller: ErrorAttachmentSizeShouldNotBeLessThanMinimumSize
UPLOAD_SESSION_MAX_BYTES = 150 * 1024 * 1024

MF_READ, MF_UNSENT, MF_HASATTACH = 0x1, 0x8, 0x10
PROP_FLAGS, PROP_DELIVERY, PROP_SUBMIT = "Integer 0xe07", "SystemTime 0xe06", "SystemTime 0x39"
COMPUTED_PROPS = (PROP_FLAGS, PROP_DELIVERY, PROP_SUBMIT)

_PROP_TYPES = {t.lower(): t for t in ("Binary", "Boolean", "Currency", "Double", "Float", "Guid", "Integer", "Long",
                                      "Object", "Short", "String", "SystemTime")}
_ADDRESS_FIELDS = {"from": "from", "sender": "sender", "toRecipients": "to", "ccRecipients": "cc",
                   "bccRecipients": "bcc", "replyTo": "reply_to"}
# message properties a client may write on creation
_WRITABLE = {"subject", "body", "importance", "internetMessageId", "categories", "flag", "isRead",
             "singleValueExtendedProperties", "multiValueExtendedProperties", "internetMessageHeaders",
             "attachments", "isDeliveryReceiptRequested", "isReadReceiptRequested", "inferenceClassification",
             *_ADDRESS_FIELDS}
# properties of the message type that Exchange sets itself: accepted and ignored (isDraft included: only
# PidTagMessageFlags decides it)
_READ_ONLY = {"id", "createdDateTime", "lastModifiedDateTime", "changeKey", "receivedDateTime", "sentDateTime",
              "hasAttachments", "parentFolderId", "conversationId", "conversationIndex", "bodyPreview", "webLink",
              "isDraft", "uniqueBody", "@odata.type", "@odata.etag", "@odata.context"}
# what PATCH may change on any item, and only on a draft
PATCH_ANY = {"isRead", "flag", "categories", "importance", "singleValueExtendedProperties",
             "multiValueExtendedProperties", "inferenceClassification", "isDeliveryReceiptRequested",
             "isReadReceiptRequested"}
PATCH_DRAFT_ONLY = {"subject", "body", "internetMessageId", *_ADDRESS_FIELDS}
_FLAGS = {"notflagged": "notFlagged", "flagged": "flagged", "complete": "complete"}


class GraphError(Exception):
    """A request Graph refuses: ``status``, ``code`` and ``message`` of its error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(message: str, code: str = "ErrorInvalidRequest") -> GraphError:
    return GraphError(400, code, message)


def _no_such_property(name: str, typ: str = "microsoft.graph.message") -> GraphError:
    return GraphError(400, "RequestBodyRead", f"The property '{name}' does not exist on type '{typ}'. Make sure "
                      "to only use property names that are defined by the type or mark the type as open type.")


# extended properties ------------------------------------------------------------------------------------
def canonical_prop_id(raw: Any) -> str:
    """An extended property id in the form Graph answers with: ``Integer 0xe07``,
    ``String {00020329-0000-0000-c000-000000000046} Name Foo``, ``String {guid} Id 0x8005``.

    Types and GUIDs are case-insensitive, tags are hex without leading zeros, names keep their case."""
    if not isinstance(raw, str):
        raise _bad("An extended property id must be a string.", "ErrorInvalidProperty")
    s = raw.strip()
    m = re.fullmatch(r"(\w+)\s+0x([0-9a-fA-F]{1,4})", s)
    if m and m.group(1).lower() in _PROP_TYPES:
        return f"{_PROP_TYPES[m.group(1).lower()]} 0x{int(m.group(2), 16):x}"
    m = re.fullmatch(r"(\w+)\s+\{([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}"
                     r"\s+(Name|Id)\s+(.+)", s, re.I)
    if m and m.group(1).lower() in _PROP_TYPES:
        typ, guid, kind, rest = _PROP_TYPES[m.group(1).lower()], m.group(2).lower(), m.group(3).lower(), m.group(4)
        if kind == "name":
            return f"{typ} {{{guid}}} Name {rest}"
        t = re.fullmatch(r"0x([0-9a-fA-F]{1,4})", rest.strip())
        if t:
            return f"{typ} {{{guid}}} Id 0x{int(t.group(1), 16):x}"
    raise _bad(f"The extended property id '{raw}' is not valid.", "ErrorInvalidProperty")


def _check_prop_value(pid: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f"The value of extended property '{pid}' must be a string.", "ErrorInvalidExtendedPropertyValue")
    typ = pid.split(" ", 1)[0]
    try:
        if typ in ("Integer", "Short", "Long"):
            int_prop(value)
        elif typ == "SystemTime":
            parse_time(value)
        elif typ == "Boolean" and value.strip().lower() not in ("true", "false"):
            raise ValueError(value)
    except ValueError:
        raise _bad(f"The value '{value}' is not valid for extended property '{pid}'.",
                   "ErrorInvalidExtendedPropertyValue") from None
    return value


def parse_time(value: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; no zone = UTC) as an aware UTC datetime, whole seconds."""
    v = value.strip()
    if v.endswith(("Z", "z")):
        v = v[:-1] + "+00:00"
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)", v)  # fromisoformat of 3.11 wants 3 or 6 digits
    if m:
        v = m.group(1) + m.group(3)
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).replace(microsecond=0)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def int_prop(v: str) -> int:
    v = v.strip()
    return int(v, 16) if v.lower().startswith("0x") else int(v)


# the posted JSON ----------------------------------------------------------------------------------------
def _recipient(v: Any, field_name: str) -> list[str]:
    if not isinstance(v, dict) or not isinstance(v.get("emailAddress"), dict):
        raise _bad(f"'{field_name}' must hold recipients of the form {{\"emailAddress\": {{\"name\", \"address\"}}}}.",
                   "ErrorInvalidRecipients")
    ea = v["emailAddress"]
    name, addr = ea.get("name") or "", ea.get("address") or ""
    if not isinstance(name, str) or not isinstance(addr, str) or not addr.strip():
        raise _bad(f"A recipient of '{field_name}' has no valid address.", "ErrorInvalidRecipients")
    return [name, addr.strip()]


def _text(v: Any, name: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _bad(f"'{name}' must be a string.")
    return v


def parse_message(d: Any, *, embedded: bool = False, patch: bool = False) -> dict[str, Any]:
    """The checked, normalised content of a posted (or, with ``patch``, PATCHed) message JSON: only the keys
    given are in the result (``patch``), or every key with its default. Raises :class:`GraphError`."""
    if not isinstance(d, dict):
        raise _bad("The request body must be a JSON object.", "RequestBodyRead")
    out: dict[str, Any] = {}
    if not patch:
        out.update({"subject": "", "body_type": "text", "body": "", "from": None, "sender": None, "to": [], "cc": [],
                    "bcc": [], "reply_to": [], "importance": "normal", "internet_message_id": None,
                    "categories": [], "flag": "notFlagged", "is_read": None, "props": {}, "headers": [],
                    "attachments": []})
    for k, v in d.items():
        if k in _READ_ONLY or k.startswith("@odata.") or k.endswith("@odata.type"):
            continue
        if k not in _WRITABLE:
            raise _no_such_property(k)
        if k == "subject":
            out["subject"] = _text(v, k)
        elif k == "body":
            if v is None:
                out["body_type"], out["body"] = "text", ""
                continue
            if not isinstance(v, dict):
                raise _bad("'body' must be an object {contentType, content}.")
            ct = str(v.get("contentType") or "text").lower()
            if ct not in ("text", "html"):
                raise _bad(f"Body contentType '{v.get('contentType')}' is not 'text' or 'html'.")
            out["body_type"], out["body"] = ct, _text(v.get("content"), "body.content")
        elif k in ("from", "sender"):
            out[k] = None if v is None else _recipient(v, k)
        elif k in _ADDRESS_FIELDS:
            if v is None:
                v = []
            if not isinstance(v, list):
                raise _bad(f"'{k}' must be a list of recipients.", "ErrorInvalidRecipients")
            out[_ADDRESS_FIELDS[k]] = [_recipient(r, k) for r in v]
        elif k == "importance":
            imp = str(v or "normal").lower()
            if imp not in ("low", "normal", "high"):
                raise _bad(f"Importance '{v}' is not one of low, normal, high.")
            out["importance"] = imp
        elif k == "internetMessageId":
            imid = _text(v, k).strip()
            if "\r" in imid or "\n" in imid:
                raise _bad("internetMessageId cannot contain line breaks.")
            out["internet_message_id"] = imid or None
        elif k == "categories":
            if v is None:
                v = []
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise _bad("'categories' must be a list of strings.")
            out["categories"] = list(v)
        elif k == "flag":
            status = (v or {}).get("flagStatus", "notFlagged") if isinstance(v, dict) or v is None else None
            if not isinstance(status, str) or status.lower() not in _FLAGS:
                raise _bad("'flag' must be {\"flagStatus\": \"notFlagged\" | \"flagged\" | \"complete\"}.")
            out["flag"] = _FLAGS[status.lower()]
        elif k == "isRead":
            if not isinstance(v, bool):
                raise _bad("'isRead' must be true or false.")
            out["is_read"] = v
        elif k == "singleValueExtendedProperties":
            if not isinstance(v, list):
                raise _bad("'singleValueExtendedProperties' must be a list of {id, value}.")
            props = {}
            for p in v:
                if not isinstance(p, dict) or set(p) - {"id", "value", "@odata.type"}:
                    raise _bad("An extended property must be {\"id\": ..., \"value\": ...}.")
                pid = canonical_prop_id(p.get("id"))
                props[pid] = _check_prop_value(pid, p.get("value"))
            out["props"] = props
        elif k == "internetMessageHeaders":
            if embedded or patch:
                raise _bad("internetMessageHeaders can only be set when a message is created.")
            if not isinstance(v, list):
                raise _bad("'internetMessageHeaders' must be a list of {name, value}.")
            hs = []
            for h in v:
                name, value = (h or {}).get("name"), (h or {}).get("value")
                if not isinstance(name, str) or not isinstance(value, str) or \
                        not re.fullmatch(r"[Xx]-[A-Za-z0-9-]+", name):
                    raise _bad("Only custom headers whose name starts with 'x-' can be set (internetMessageHeaders).",
                               "InvalidInternetMessageHeader")
                hs.append([name, value.replace("\r", " ").replace("\n", " ")])
            out["headers"] = hs
        elif k == "attachments":
            if embedded and v:
                raise _bad("The simulator cannot create an attached item that has attachments of its own "
                           "(nested attachments).")
            if embedded:
                continue
            if patch:
                raise _bad("Attachments are added with POST .../attachments, not PATCH.")
            if not isinstance(v, list):
                raise _bad("'attachments' must be a list.")
            out["attachments"] = [parse_attachment(a) for a in v]
        # multiValueExtendedProperties, receipts, inferenceClassification: accepted, not modelled
    return out


def _odata_type(d: dict, default: str | None = None) -> str:
    t = d.get("@odata.type", default)
    if not isinstance(t, str):
        raise _bad("An attachment needs its '@odata.type' (#microsoft.graph.fileAttachment or "
                   "#microsoft.graph.itemAttachment).", "RequestBodyRead")
    return t.lstrip("#").lower()


def parse_attachment(d: Any) -> dict[str, Any]:
    """A checked, normalised attachment: ``{"kind": "file", name, content_type, is_inline, content_id,
    content_b64}`` or ``{"kind": "item", name, item: <parse_message(embedded)>}``."""
    if not isinstance(d, dict):
        raise _bad("An attachment must be a JSON object.", "RequestBodyRead")
    t = _odata_type(d)
    if t == "microsoft.graph.fileattachment":
        allowed = {"@odata.type", "id", "name", "contentType", "contentBytes", "isInline", "contentId",
                   "contentLocation", "size", "lastModifiedDateTime"}
        for k in d:
            if k not in allowed:
                raise _no_such_property(k, "microsoft.graph.fileAttachment")
        b64 = d.get("contentBytes")
        if not isinstance(b64, str):
            raise _bad("A file attachment needs 'contentBytes' (base64).")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("'contentBytes' is not valid base64.") from None
        inline = d.get("isInline", False)
        if not isinstance(inline, bool):
            raise _bad("'isInline' must be true or false.")
        return {"kind": "file", "name": _text(d.get("name"), "name"),
                "content_type": clean_content_type(d.get("contentType")), "is_inline": inline,
                "content_id": _cid(d.get("contentId")), "content_b64": base64.b64encode(raw).decode()}
    if t == "microsoft.graph.itemattachment":
        for k in d:
            if k not in {"@odata.type", "id", "name", "item", "contentType", "isInline", "size",
                         "lastModifiedDateTime"}:
                raise _no_such_property(k, "microsoft.graph.itemAttachment")
        item = d.get("item")
        if not isinstance(item, dict):
            raise _bad("An item attachment needs its 'item'.")
        if _odata_type(item, "#microsoft.graph.message") != "microsoft.graph.message":
            raise _bad("The simulator only attaches items of type #microsoft.graph.message.")
        return {"kind": "item", "name": _text(d.get("name"), "name"), "item": parse_message(item, embedded=True)}
    if t == "microsoft.graph.referenceattachment":
        raise _bad("Reference attachments are not supported on messages by the simulator.")
    raise _bad(f"Unknown attachment type '{d.get('@odata.type')}'.", "RequestBodyRead")


def clean_content_type(v: Any) -> str:
    """A media type as given (lower-cased, parameters dropped), or application/octet-stream."""
    if not isinstance(v, str):
        return "application/octet-stream"
    t = v.split(";", 1)[0].strip().lower()
    return t if re.fullmatch(r"[a-z0-9][\w.+-]*/[\w.+-]+", t) else "application/octet-stream"


def _cid(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return None
    return re.sub(r"[\r\n]", "", v.strip().strip("<>").strip()) or None


def derive(content: dict[str, Any], at: datetime) -> tuple[bool, bool, datetime, datetime]:
    """(is_draft, is_read, received, sent) of a new message, by Exchange's rules (module docstring)."""
    props = content["props"]
    flags = int_prop(props[PROP_FLAGS]) if PROP_FLAGS in props else None
    is_draft = flags is None or bool(flags & MF_UNSENT)
    if flags is not None and flags & MF_READ:
        is_read = True
    elif content["is_read"] is not None:
        is_read = content["is_read"]
    else:
        is_read = is_draft
    received = parse_time(props[PROP_DELIVERY]) if PROP_DELIVERY in props else at
    sent = parse_time(props[PROP_SUBMIT]) if PROP_SUBMIT in props else at
    return is_draft, is_read, received, sent


# the stored item ------------------------------------------------------------------------------------------
@dataclass
class Att:
    """An attachment of a posted message (file bytes, or an attached item)."""

    kind: str  # file | item
    name: str
    content_type: str
    is_inline: bool
    content_id: str | None
    data: bytes = b""
    item: Posted | None = None
    modified: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass(eq=False)  # identity: a key of the render cache
class Posted:
    """What Exchange keeps of a posted message (the rest of its state — folder, read, flag, categories,
    importance, draft, received — lives on the model's message record)."""

    content: dict[str, Any]  # parse_message() output without "attachments"
    created: datetime
    modified: datetime
    sent: datetime
    is_draft: bool = True     # for attached items (a top-level item's own is on its record)
    received: datetime | None = None
    attachments: list[Att] = field(default_factory=list)
    preview: tuple[Any, str] | None = None  # ((body type, body), bodyPreview)


def make_posted(content: dict[str, Any], at: datetime) -> Posted:
    c = {k: v for k, v in content.items() if k != "attachments"}
    is_draft, _, received, sent = derive(c, at)
    p = Posted(c, at, at, sent, is_draft, received)
    p.attachments = [make_att(a, at) for a in content.get("attachments", [])]
    return p


def make_att(a: dict[str, Any], at: datetime) -> Att:
    if a["kind"] == "file":
        return Att("file", a["name"], a["content_type"], a["is_inline"], a["content_id"],
                   base64.b64decode(a["content_b64"]), modified=at)
    return Att("item", a["name"], "message/rfc822", False, None, item=make_posted(a["item"], at), modified=at)


# MIME -----------------------------------------------------------------------------------------------------
def _one_line(s: str) -> str:
    return re.sub(r"[\r\n]+", " ", s)


def _address(r: list[str]) -> bytes:
    name, addr = _one_line(r[0]).strip(), _one_line(r[1]).strip()
    try:
        return formataddr((name, addr), charset="utf-8").encode("ascii")
    except UnicodeError:  # a non-ASCII address (RFC 6532): raw UTF-8
        enc = formataddr((name, "x@x"), charset="utf-8")[:-len("<x@x>")] if name else ""
        return (enc + f"<{addr}>").encode("utf-8")


def _address_header(name: str, rs: list[list[str]]) -> bytes:
    return name.encode() + b": " + b",\r\n ".join(_address(r) for r in rs)


def _text_header(name: str, value: str) -> bytes:
    value = _one_line(value)
    charset = "us-ascii" if value.isascii() else "utf-8"
    return name.encode() + b": " + Header(value, charset, header_name=name).encode(linesep="\r\n").encode("ascii")


def _param(name: str, value: str) -> bytes:
    value = _one_line(value)
    if value.isascii() and not re.search(r'["\\]', value):
        return f'{name}="{value}"'.encode()
    return f"{name}*=utf-8''{quote(value, safe='')}".encode()


def _b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _qp(text: str) -> bytes:
    t = text.replace("\r\n", "\n").replace("\r", "\n")
    return binascii.b2a_qp(t.encode("utf-8")).replace(b"\n", CRLF)


def _multipart(kind: str, key: str, n: int, parts: list[bytes], extra: bytes = b"") -> bytes:
    """A multipart entity (headers + body) whose boundary is derived from the item and occurs in no part."""
    h = hashlib.sha1(key.encode()).hexdigest()[:24].upper()
    boundary = f"_{n:03d}_{h}_".encode()
    while any(boundary in p for p in parts):
        boundary += b"x"
    out = [b"Content-Type: multipart/" + kind.encode() + b"; boundary=\"" + boundary + b"\"" + extra, b""]
    for p in parts:
        out += [b"--" + boundary, p]
    out += [b"--" + boundary + b"--", b""]
    return CRLF.join(out)


def _file_part(a: Att) -> bytes:
    head = [b"Content-Type: " + a.content_type.encode() + b"; " + _param("name", a.name)]
    head.append(b"Content-Disposition: " + (b"inline" if a.is_inline else b"attachment") + b"; " +
                _param("filename", a.name) + f"; size={len(a.data)}".encode())
    if a.content_id:
        head.append(b"Content-ID: <" + a.content_id.encode("utf-8") + b">")
    head += [b"Content-Transfer-Encoding: base64", b""]
    return CRLF.join(head) + CRLF + _b64_lines(a.data)


_CACHE = BytesLRU(64 * 1024 * 1024)


def render_cached(p: Posted, key: str, version: Any, *, is_draft: bool, importance: str,
                  owner: tuple[str, str] | None) -> bytes:
    """:func:`render`, the recently rendered ones from a 64 MB LRU (``version``: anything that changes when
    the item does, e.g. its change sequence number)."""
    return _CACHE.get_or_make((p, key, version, is_draft, importance, owner),
                              lambda: render(p, key, is_draft=is_draft, importance=importance, owner=owner),
                              8 * 1024 * 1024)


def render(p: Posted, key: str, *, is_draft: bool, importance: str, owner: tuple[str, str] | None) -> bytes:
    """The MIME Exchange would serve for a posted item: deterministic (boundaries from ``key``, the item id).

    ``owner`` (name, address) is the ``From`` of an item posted without one (None for an attached item)."""
    c = p.content
    frm = c["from"] or c["sender"] or (list(owner) if owner else None)
    hdr: list[bytes] = []
    if frm:
        hdr.append(_address_header("From", [frm]))
    if c["sender"] and frm and c["sender"][1].lower() != frm[1].lower():
        hdr.append(_address_header("Sender", [c["sender"]]))
    for field_name, k in (("To", "to"), ("Cc", "cc"), ("Bcc", "bcc"), ("Reply-To", "reply_to")):
        if c[k]:
            hdr.append(_address_header(field_name, c[k]))
    if c["subject"]:
        hdr.append(_text_header("Subject", c["subject"]))
    hdr.append(b"Date: " + format_datetime(p.sent.astimezone(timezone.utc)).encode())
    if c["internet_message_id"]:
        hdr.append(b"Message-ID: " + c["internet_message_id"].encode("utf-8"))
    if importance != "normal":
        hdr.append(b"Importance: " + importance.encode())
    for name, value in c["headers"]:
        hdr.append(_text_header(name, value))
    hdr.append(b"MIME-Version: 1.0")

    sub = "html" if c["body_type"] == "html" else "plain"
    body = CRLF.join([b"Content-Type: text/" + sub.encode() + b"; charset=\"utf-8\"",
                      b"Content-Transfer-Encoding: quoted-printable", b"", _qp(c["body"])])
    # inline files of an HTML body go with it into multipart/related (as Exchange builds it), the rest into
    # multipart/mixed, in the order they were added
    rel = [i for i, a in enumerate(p.attachments) if a.kind == "file" and a.is_inline and sub == "html"]
    related = [p.attachments[i] for i in rel]
    mixed = [i for i in range(len(p.attachments)) if i not in rel]
    if related:
        body = _multipart("related", key, 4, [body] + [_file_part(a) for a in related], b"; type=\"text/html\"")
    if mixed:
        parts = [body]
        for i in mixed:
            a = p.attachments[i]
            if a.kind == "file":
                parts.append(_file_part(a))
            else:  # the attached item's own MIME (the same bytes as GET .../attachments/{id}/$value)
                inner = render(a.item, f"{key}/att{i}", is_draft=a.item.is_draft,
                               importance=a.item.content["importance"], owner=None)
                parts.append(CRLF.join([b"Content-Type: message/rfc822",
                                        b"Content-Disposition: attachment; " + _param("filename", a.name), b"",
                                        inner]))
        body = _multipart("mixed", key, 0, parts)
    return CRLF.join(hdr) + CRLF + body


# queries: $filter and $expand of the collision lookups ------------------------------------------------------
# A predicate takes (mailbox, message); a hint narrows the candidates through the mailbox's indexes:
# {"imid": value} or {"prop": (canonical id, value)} (stored properties only; computed ones are scanned).
_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<punct>[(),:])|(?P<word>[A-Za-z_$][\w./$-]*))")
_STRING_FIELDS = {"internetmessageid": "imid", "subject": "subject"}
_BOOL_FIELDS = {"isread": "is_read", "isdraft": "is_draft"}


def _tokens(s: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise _invalid_filter(s)
        kind = m.lastgroup
        val = m.group(kind)
        out.append((kind, val[1:-1].replace("''", "'") if kind == "str" else val))
        pos = m.end()
    return out


def _invalid_filter(s: str) -> GraphError:
    return GraphError(400, "BadRequest", f"Invalid filter clause: the simulator does not understand '{s}' "
                      "(supported: internetMessageId eq '..', subject eq '..', isRead/isDraft eq true|false, "
                      "singleValueExtendedProperties/any(ep: ep/id eq '..' and ep/value eq '..'), and, or, ()).")


class _Parser:
    def __init__(self, s: str) -> None:
        self.s, self.toks, self.i = s, _tokens(s), 0

    def peek(self, kind: str | None = None, value: str | None = None) -> bool:
        if self.i >= len(self.toks):
            return False
        k, v = self.toks[self.i]
        return (kind is None or k == kind) and (value is None or v.lower() == value)

    def take(self, kind: str, value: str | None = None) -> str:
        if not self.peek(kind, value):
            raise _invalid_filter(self.s)
        self.i += 1
        return self.toks[self.i - 1][1]

    def done(self) -> None:
        if self.i != len(self.toks):
            raise _invalid_filter(self.s)

    # expr := and ("or" and)* ; and := unary ("and" unary)* ; unary := "(" expr ")" | comparison | any()
    def expr(self) -> tuple[Any, dict | None]:
        terms = [self.conj()]
        while self.peek("word", "or"):
            self.i += 1
            terms.append(self.conj())
        if len(terms) == 1:
            return terms[0]
        preds = [t[0] for t in terms]
        return (lambda mb, m: any(p(mb, m) for p in preds)), None

    def conj(self) -> tuple[Any, dict | None]:
        terms = [self.unary()]
        while self.peek("word", "and"):
            self.i += 1
            terms.append(self.unary())
        preds = [t[0] for t in terms]
        hint = next((t[1] for t in terms if t[1]), None)
        return (lambda mb, m: all(p(mb, m) for p in preds)), hint

    def unary(self) -> tuple[Any, dict | None]:
        if self.peek("punct", "("):
            self.i += 1
            out = self.expr()
            self.take("punct", ")")
            return out
        name = self.take("word")
        low = name.lower()
        if low == "singlevalueextendedproperties/any":
            return self.lambda_any()
        self.take("word", "eq")
        if low in _STRING_FIELDS:
            value = self.take("str")
            if _STRING_FIELDS[low] == "imid":
                return (lambda mb, m: (mb.internet_message_id(m) or "").lower() == value.lower()), {"imid": value}
            return (lambda mb, m: mb.subject(m).lower() == value.lower()), None
        if low in _BOOL_FIELDS:
            lit = self.take("word").lower()
            if lit not in ("true", "false"):
                raise _invalid_filter(self.s)
            attr, want = _BOOL_FIELDS[low], lit == "true"
            return (lambda mb, m: getattr(m, attr) == want), None
        raise _invalid_filter(self.s)

    def lambda_any(self) -> tuple[Any, dict | None]:
        self.take("punct", "(")
        var = self.take("word")
        self.take("punct", ":")
        pid = value = None
        while True:
            path = self.take("word").lower()
            self.take("word", "eq")
            lit = self.take("str")
            if path == f"{var.lower()}/id" and pid is None:
                pid = canonical_prop_id(lit)
            elif path == f"{var.lower()}/value" and value is None:
                value = lit
            else:
                raise _invalid_filter(self.s)
            if not self.peek("word", "and"):
                break
            self.i += 1
        self.take("punct", ")")
        if pid is None:
            raise _invalid_filter(self.s)

        def pred(mb: Any, m: Any) -> bool:
            v = mb.ext_props(m).get(pid)
            return v is not None and (value is None or v.lower() == value.lower())

        hint = {"prop": (pid, value)} if value is not None and pid not in COMPUTED_PROPS else None
        return pred, hint


def parse_filter(s: str) -> tuple[Any, dict | None]:
    """A ``$filter`` of a message collection as (predicate(mailbox, message), index hint or None).

    Strings compare case-insensitively, as Exchange compares them; ``'`` inside a literal is doubled."""
    p = _Parser(s)
    out = p.expr()
    p.done()
    return out


def parse_expand(s: str) -> set[str] | None:
    """``$expand=singleValueExtendedProperties($filter=id eq '..' or id eq '..')`` → the canonical ids wanted
    (None: every property, when no filter is given). Any other expansion is refused, as Graph refuses an
    unknown navigation property."""
    m = re.fullmatch(r"\s*singleValueExtendedProperties\s*(?:\(\s*\$filter\s*=\s*(.*)\))?\s*", s, re.I | re.S)
    if not m:
        name = s.split("(", 1)[0].strip()
        raise GraphError(400, "BadRequest", f"Parsing OData Select and Expand failed: Could not find a property "
                         f"named '{name}' on type 'microsoft.graph.message' (the simulator expands "
                         "singleValueExtendedProperties only).")
    if m.group(1) is None:
        return None
    p = _Parser(m.group(1))
    ids = set()
    while True:
        if p.take("word").lower() != "id":
            raise _invalid_filter(m.group(1))
        p.take("word", "eq")
        ids.add(canonical_prop_id(p.take("str")))
        if not p.peek("word", "or"):
            break
        p.i += 1
    p.done()
    return ids
