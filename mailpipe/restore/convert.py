"""A stored message (its MIME, byte-exact) → what Graph v1.0 needs to recreate it as a *received* item.

Graph v1.0 cannot import MIME as a non-draft (``POST …/messages`` with a MIME body always makes a draft,
and a draft's flags cannot be changed afterwards). So a message is recreated as JSON — subject, addresses,
body, importance, ``internetMessageId``, categories and flag — with three MAPI properties that make it a
delivered message: ``Integer 0x0E07`` (PidTagMessageFlags, without *unsent*; *read* from the snapshot),
``SystemTime 0x0E06`` (delivery time = the original received time) and ``SystemTime 0x0039`` (submit time
= the original sent time). Attachments follow separately: files (inline images with their Content-ID
included) and attached messages (``message/rfc822`` parts, as item attachments). docs/RESTORE.md lists
what this keeps and loses compared with the stored MIME; ``mailpipe export`` gives the MIME itself.

The MIME is parsed with the standard library (``email``, policy ``default``): decoded headers, decoded
parts. Every leaf part that is not the chosen body is kept as an attachment, so no content is dropped
silently (a plain-text alternative of an HTML body is the one exception: Exchange regenerates it).
"""

from __future__ import annotations

import email
import email.policy
import json
import email.utils
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Any

# PidTagMessageFlags bits: read 0x1, unmodified 0x2, submitted 0x4, unsent 0x8 (never set: not a draft)
MSGFLAG_READ = 0x1
MSGFLAG_SUBMIT = 0x4
# The property every restored message carries: which restore made it from which item (idempotent resumes)
TAG_PROPERTY = "String {4a6b1c3e-2f8d-4e5a-9b7c-6d1e0f2a3b4c} Name mailpipeRestore"
MAX_JSON_BYTES = 3_500_000   # Graph refuses request bodies over 4 MB; the body must fit below that


@dataclass
class Attachment:
    name: str
    content_type: str
    data: bytes = b""
    is_inline: bool = False
    content_id: str | None = None
    item: dict[str, Any] | None = None   # an attached message, as Graph message JSON (no attachments of its own)

    @property
    def kind(self) -> str:
        return "item" if self.item is not None else "file"

    @property
    def size(self) -> int:
        return len(self.data) if self.item is None else len(str(self.item))



@dataclass
class RestoreMessage:
    message: dict[str, Any]                      # the JSON of POST …/messages
    sent_at: str = ""                            # ISO UTC: the original sent time (the collision fallback)
    attachments: list[Attachment] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)  # what cannot be recreated (for the summary)



def _addresses(msg: EmailMessage, name: str) -> list[dict[str, Any]]:
    values = msg.get_all(name) or []
    out = []
    for display, addr in email.utils.getaddresses([str(v) for v in values]):
        if addr:
            out.append({"emailAddress": {"name": display, "address": addr} if display else {"address": addr}})
    return out


def _date(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc)


def _iso(d: datetime) -> str:
    return d.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _importance(msg: EmailMessage) -> str:
    imp = str(msg.get("Importance", "")).strip().lower()
    if imp in ("high", "low", "normal"):
        return imp
    prio = str(msg.get("X-Priority", "")).strip()[:1]
    return {"1": "high", "2": "high", "4": "low", "5": "low"}.get(prio, "normal")


def _text(part: EmailMessage) -> str:
    try:
        return part.get_content()
    except (LookupError, ValueError, AssertionError):  # an unknown charset: keep the bytes as Latin-1
        payload = part.get_payload(decode=True) or b""
        return payload.decode("latin-1")


def _filename(part: EmailMessage, n: int) -> str:
    name = part.get_filename()
    if name:
        return str(name)
    ext = {"text/plain": "txt", "text/html": "html", "text/calendar": "ics", "message/rfc822": "eml"}.get(
        part.get_content_type(), part.get_content_subtype() or "bin")
    return f"part-{n}.{ext}"


def convert(mime: bytes, *, received_at: datetime | None, is_read: bool | None, flag_status: str | None,
            categories: list[str] | None, tag: str | None = None) -> RestoreMessage:
    """The Graph JSON (and attachments) that recreate ``mime`` as a received message. ``received_at``,
    ``is_read``, ``flag_status`` and ``categories`` come from the snapshot's manifest; ``tag`` is the
    value of :data:`TAG_PROPERTY` (which restore, which source item)."""
    msg = email.message_from_bytes(mime, policy=email.policy.default)
    out = _message_json(msg)
    losses: list[str] = []
    sent = _date(msg.get("Date"))
    received = received_at.astimezone(timezone.utc) if received_at else (sent or datetime.now(timezone.utc))
    flags = MSGFLAG_SUBMIT | (MSGFLAG_READ if is_read else 0)
    props = [{"id": "Integer 0x0E07", "value": str(flags)},
             {"id": "SystemTime 0x0E06", "value": _iso(received)},
             {"id": "SystemTime 0x0039", "value": _iso(sent or received)}]
    if tag:
        props.append({"id": TAG_PROPERTY, "value": tag})
    out["singleValueExtendedProperties"] = props
    out["isRead"] = bool(is_read)
    if categories:
        out["categories"] = list(categories)
    if flag_status in ("flagged", "complete"):
        out["flag"] = {"flagStatus": flag_status}
    atts, body_losses = _attachments(msg, out)
    losses += body_losses
    if len(json.dumps(out.get("body", {}).get("content", ""))) > MAX_JSON_BYTES:  # as sent: bytes, escapes
        # Graph refuses bodies this large in one request: keep the full body as an attachment instead
        body = out["body"]
        atts.insert(0, Attachment(f"body.{'html' if body['contentType'] == 'html' else 'txt'}",
                                  "text/html" if body["contentType"] == "html" else "text/plain",
                                  body["content"].encode("utf-8")))
        out["body"] = {"contentType": "text", "content": "(the message body is attached: it was too large to restore "
                                                          "as the body)"}
        losses.append("body larger than Graph accepts: restored as an attachment")
    return RestoreMessage(out, _iso(sent or received), atts, losses)


def _message_json(msg: EmailMessage) -> dict[str, Any]:
    """The headers Graph lets us set on create, from a parsed message."""
    out: dict[str, Any] = {"subject": str(msg.get("Subject", "") or "")}
    for header, prop in (("From", "from"), ("Sender", "sender")):
        a = _addresses(msg, header)
        if a:
            out[prop] = a[0]
    if "sender" not in out and "from" in out:
        out["sender"] = out["from"]
    for header, prop in (("To", "toRecipients"), ("Cc", "ccRecipients"), ("Bcc", "bccRecipients"),
                         ("Reply-To", "replyTo")):
        a = _addresses(msg, header)
        if a:
            out[prop] = a
    mid = str(msg.get("Message-ID", "") or "").strip()
    if mid:
        out["internetMessageId"] = mid if mid.startswith("<") else f"<{mid}>"
    out["importance"] = _importance(msg)
    return out


def _attachments(msg: EmailMessage, out: dict[str, Any]) -> tuple[list[Attachment], list[str]]:
    """Choose the body (HTML before text), then every other leaf part becomes an attachment."""
    losses: list[str] = []
    body = msg.get_body(preferencelist=("html", "plain")) if msg.is_multipart() or msg.get_content_maintype() == "text" \
        else None
    if body is not None:
        out["body"] = {"contentType": "html" if body.get_content_subtype() == "html" else "text",
                       "content": _text(body)}
    else:
        out["body"] = {"contentType": "text", "content": ""}
    alternative_of_body = set()
    if body is not None:
        for part in msg.walk():
            if part.get_content_type() == "multipart/alternative" and any(p is body for p in part.iter_parts()):
                alternative_of_body = {id(p) for p in part.iter_parts() if p is not body}
    atts: list[Attachment] = []
    n = 0

    def leaves(part: EmailMessage):
        if part.get_content_type() == "message/rfc822":
            yield part
            return
        if part.is_multipart():
            for p in part.iter_parts():
                yield from leaves(p)
            return
        yield part

    for part in leaves(msg):
        n += 1
        if part is body or id(part) in alternative_of_body and part.get_content_maintype() == "text" \
                and not part.get_filename():
            continue
        cid = str(part.get("Content-ID", "") or "").strip().strip("<>") or None
        disposition = part.get_content_disposition()
        if part.get_content_type() == "message/rfc822":
            inner = part.get_content()
            if isinstance(inner, EmailMessage):
                item = _message_json(inner)
                ibody = inner.get_body(preferencelist=("html", "plain"))
                item["body"] = {"contentType": "html" if ibody is not None and ibody.get_content_subtype() == "html"
                                else "text", "content": _text(ibody) if ibody is not None else ""}
                item["@odata.type"] = "#microsoft.graph.message"
                sent = _date(inner.get("Date"))
                if sent:  # an attached message is a sent message too: its times are MAPI properties
                    item["singleValueExtendedProperties"] = [
                        {"id": "Integer 0x0E07", "value": str(MSGFLAG_SUBMIT | MSGFLAG_READ)},
                        {"id": "SystemTime 0x0E06", "value": _iso(sent)},
                        {"id": "SystemTime 0x0039", "value": _iso(sent)}]
                inner_atts = sum(1 for p in inner.walk() if not p.is_multipart() and p is not ibody
                                 and p.get_content_disposition() in ("attachment", "inline"))
                if inner_atts:
                    losses.append(f"attachments inside the attached message {item['subject']!r} (Graph v1.0 "
                                  "cannot create them)")
                atts.append(Attachment(_filename(part, n) if part.get_filename() else (item["subject"] or "message"),
                                       "message/rfc822", item=item))
                continue
        data = part.get_payload(decode=True)
        if data is None:
            data = str(part.get_payload()).encode("utf-8")
        atts.append(Attachment(_filename(part, n), part.get_content_type(), data,
                               is_inline=disposition == "inline" or (cid is not None and disposition != "attachment"),
                               content_id=cid))
    return atts, losses


def fingerprint(subject: str | None, sent: Any) -> str:
    """The collision key of a message without an ``internetMessageId``: subject and sent time."""
    return hashlib.sha256(f"{(subject or '').strip()}\x00{str(sent or '')[:19]}".encode()).hexdigest()[:32]
