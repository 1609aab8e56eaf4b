"""What a person sees of a message: a canonical summary of its MIME, for comparing a backed-up item with the
same item restored elsewhere (``summarize``), and the simulator's ``/_sim/truth?semantic=1``.

Two MIME renderings of the same message differ in many bytes a person never sees (boundaries, header order
and folding, transfer encodings, RFC 2047 vs raw 8-bit names, ``multipart/alternative`` vs a lone HTML
part, Exchange's regenerated headers). The summary keeps what is seen and drops the rest, so that
``summarize(original) == summarize(restored)`` is the test of a faithful restore. Pure stdlib, no I/O, and
tolerant: any bytes give a summary (malformed parts are summarized as well as they can be, never raise).

Definitions (docs/SIMULATOR.md repeats them):

- Headers are unfolded, raw 8-bit bytes decoded as UTF-8 (else cp1252), RFC 2047 words decoded, and runs
  of whitespace collapsed to one space: ``subject`` and the display ``names``.
- Addresses (``from``, ``sender``, ``to``, ``cc``, ``bcc``, ``reply_to``) are lists of lower-cased
  addresses in header order; ``sender`` is the ``From`` when there is no ``Sender`` header (what Graph
  and Outlook show). ``names`` has the display names in the same order, per field.
- ``body_text``: the HTML body reduced to its text when the message has one, else the text/plain body;
  whitespace-normalised. HTML wins because it is what a reader sees (Outlook renders the HTML
  alternative; the seeded corpus's HTML even carries a signature its text part lacks), and an item
  restored with an HTML body then compares equal to its original.
- ``attachments``: file parts (everything that is not the body, not a container and not an attached
  message), sorted, each ``{name, content_type, size, sha256, is_inline, content_id}`` of the decoded
  bytes. ``attached_messages``: the summary of each ``message/rfc822`` part, recursively, sorted.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import email.quoprimime
import hashlib
import json
import re
from datetime import timezone
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

_ADDRESS_FIELDS = (("from", "From"), ("sender", "Sender"), ("to", "To"), ("cc", "Cc"), ("bcc", "Bcc"),
                   ("reply_to", "Reply-To"))
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_BLOCK_TAGS = {"p", "div", "br", "tr", "td", "th", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6",
               "hr", "blockquote", "pre", "section", "article", "header", "footer", "dd", "dt", "dl", "title"}
_HIDDEN_TAGS = {"head", "style", "script", "title", "xml"}


def summarize(mime: bytes) -> dict[str, Any]:
    """The semantic summary of a message's MIME (see the module docstring for every key)."""
    msg = email.message_from_bytes(mime, policy=email.policy.compat32)
    return _summarize(msg)


def normalize_space(s: str) -> str:
    """Runs of whitespace (incl. non-breaking spaces) to one space, trimmed."""
    return " ".join(s.split())


def html_to_text(html: str) -> str:
    """The text a reader sees of an HTML body: no head/style/script, entities decoded, block elements
    separated by whitespace, whitespace-normalised."""
    p = _TextExtractor()
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001 - HTMLParser is lenient; keep whatever was read
        pass
    return normalize_space("".join(p.out))


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden += 1
        elif tag in _BLOCK_TAGS:
            self.out.append(" ")

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if tag in _BLOCK_TAGS:
            self.out.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.out.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(data)


# headers ------------------------------------------------------------------------------------------------
def _repair(value: Any) -> str:
    """A raw header value as text: unfolded; raw 8-bit bytes (surrogate-escaped by the parser) decoded as
    UTF-8 where they are UTF-8, and each other byte as cp1252 (else Latin-1)."""
    s = str(value)
    s = re.sub(r"\r?\n(?=[ \t])", "", s).replace("\r", "").replace("\n", "")
    if any("\udc80" <= c <= "\udcff" for c in s):
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        s = re.sub("[\udc80-\udcff]", lambda m: _decode_bytes(bytes([ord(m.group()) - 0xDC00]), "cp1252"), s)
    return s


def _decode_bytes(raw: bytes, charset: str | None) -> str:
    for cs in (charset, "utf-8", "cp1252"):
        if not cs:
            continue
        try:
            return raw.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


def _decode_words(s: str) -> str:
    """RFC 2047 encoded words decoded; whitespace between two adjacent encoded words dropped (RFC 2047 §6.2)."""
    out: list[str] = []
    pos, last_was_word = 0, False
    for m in _ENCODED_WORD.finditer(s):
        between = s[pos:m.start()]
        if not (last_was_word and between.strip() == ""):
            out.append(between)
        cs, enc, text = m.group(1).split("*", 1)[0], m.group(2).upper(), m.group(3)
        try:
            if enc == "B":
                raw = base64.b64decode(text + "=" * (-len(text) % 4))
            else:
                raw = email.quoprimime.header_decode(text).encode("latin-1")
            out.append(_decode_bytes(raw, cs))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            out.append(m.group(0))
        pos, last_was_word = m.end(), True
    out.append(s[pos:])
    return "".join(out)


def _header(msg: Message, name: str) -> str | None:
    """The first header ``name``, decoded to text (None when absent)."""
    for k, v in msg.raw_items():
        if k.lower() == name.lower():
            return _decode_words(_repair(v))
    return None


def _raw_headers(msg: Message, name: str) -> list[str]:
    return [_repair(v) for k, v in msg.raw_items() if k.lower() == name.lower()]


def _addresses(msg: Message, name: str) -> tuple[list[str], list[str]]:
    """(lower-cased addresses, display names) of every ``name`` header, in order."""
    addrs, names = [], []
    for display, addr in getaddresses(_raw_headers(msg, name)):
        addr = addr.strip().lower()
        if not addr and not display:
            continue
        addrs.append(addr)
        names.append(normalize_space(_decode_words(display)))
    return addrs, names


def _date(msg: Message) -> str | None:
    raw = _header(msg, "Date")
    if not raw:
        return None
    try:
        dt = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _importance(msg: Message) -> str:
    imp = (_header(msg, "Importance") or "").strip().lower()
    if imp in ("high", "low", "normal"):
        return imp
    prio = (_header(msg, "X-Priority") or "").strip()[:1]
    if prio in ("1", "2"):
        return "high"
    if prio in ("4", "5"):
        return "low"
    return "normal"


# parts --------------------------------------------------------------------------------------------------
def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - a broken encoding: the raw text is what there is
        data = None
    if data is None:
        p = part.get_payload()
        data = p.encode("utf-8", "surrogateescape") if isinstance(p, str) else b""
    return data


def _param(part: Message, header: str, name: str) -> str | None:
    try:
        v = part.get_param(name, header=header)
    except Exception:  # noqa: BLE001
        return None
    if v is None:
        return None
    if isinstance(v, tuple):  # RFC 2231: (charset, language, value)
        try:
            v = email.utils.collapse_rfc2231_value(v)
        except Exception:  # noqa: BLE001
            v = v[2]
    return normalize_space(_decode_words(_repair(v)))


def _filename(part: Message) -> str | None:
    return _param(part, "content-disposition", "filename") or _param(part, "content-type", "name")


def _disposition(part: Message) -> str:
    d = part.get("Content-Disposition")
    return str(d).split(";", 1)[0].strip().lower() if d is not None else ""


def _walk(part: Message, bodies: dict[str, str], atts: list[dict], inner: list[Message]) -> None:
    """Collect the body texts, the file parts and the attached messages of ``part`` (not descending into
    attached messages: their content is theirs)."""
    ctype = part.get_content_type()
    if ctype == "message/rfc822":
        p = part.get_payload()
        if isinstance(p, list):
            inner.extend(x for x in p if isinstance(x, Message))
        elif isinstance(p, str | bytes):
            raw = p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p
            inner.append(email.message_from_bytes(raw, policy=email.policy.compat32))
        return
    if part.is_multipart():
        for sub in part.get_payload():
            if isinstance(sub, Message):
                _walk(sub, bodies, atts, inner)
        return
    disp = _disposition(part)
    name = _filename(part)
    if ctype in ("text/plain", "text/html") and disp in ("", "inline") and name is None:
        key = "html" if ctype == "text/html" else "text"
        if key not in bodies:
            bodies[key] = _decode_bytes(_payload(part), part.get_content_charset())
            return
    data = _payload(part)
    cid = part.get("Content-ID")
    cid = str(cid).strip().strip("<>").strip() if cid is not None else None
    atts.append({
        "name": name or "", "content_type": ctype, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "is_inline": disp == "inline" or (disp == "" and bool(cid)), "content_id": cid or None,
    })


def _summarize(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"subject": normalize_space(_header(msg, "Subject") or "")}
    names: dict[str, list[str]] = {}
    for key, header in _ADDRESS_FIELDS:
        out[key], names[key] = _addresses(msg, header)
    if not out["sender"]:
        out["sender"], names["sender"] = list(out["from"]), list(names["from"])
    out["names"] = names
    mid = normalize_space(_header(msg, "Message-ID") or "")
    out["internet_message_id"] = mid or None
    out["date"] = _date(msg)
    out["importance"] = _importance(msg)
    bodies: dict[str, str] = {}
    atts: list[dict] = []
    inner: list[Message] = []
    _walk(msg, bodies, atts, inner)
    if "html" in bodies:
        out["body_text"] = html_to_text(bodies["html"])
    else:
        out["body_text"] = normalize_space(bodies.get("text", ""))
    out["attachments"] = sorted(atts, key=lambda a: (a["name"], a["sha256"], a["content_type"], a["is_inline"],
                                                     a["content_id"] or ""))
    subs = [_summarize(m) for m in inner]
    out["attached_messages"] = sorted(subs, key=lambda s: json.dumps(s, sort_keys=True))
    return out
