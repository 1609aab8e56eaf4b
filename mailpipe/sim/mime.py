"""Deterministic, realistic MIME for the simulator.

Every message's bytes are a pure function of (tenant seed, message seed, content version), so two
simulator instances, or one restarted, serve identical bytes. Content is generated on demand; only
the shared attachment pool (the same bytes in many messages and mailboxes, so deduplication has
something to find) and a small LRU of recent messages are cached.

What the corpus contains: text + HTML alternatives, attachments from a few bytes to > 25 MB, inline
images (multipart/related), attached messages (message/rfc822), 8-bit and non-UTF-8 headers, drafts.
Sizes: median in the tens of KB with a long tail (log-normal attachment sizes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

CRLF = b"\r\n"
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)

_WORDS = (
    "the quarterly report budget meeting please review attached invoice project timeline update "
    "customer request approval deadline thanks regards schedule contract proposal draft final "
    "numbers revenue forecast team lunch travel expenses onboarding security notice password policy "
    "shipment order delivery status warehouse supplier quality audit compliance training agenda "
    "minutes follow-up question answer issue ticket resolved pending escalation server migration"
).split()
_FIRST = ["Adele", "Alex", "Megan", "Lynne", "Diego", "Isaiah", "Grady", "Henrietta", "Johanna", "Joni",
          "Lee", "Lidia", "Miriam", "Nestor", "Patti", "Pradeep", "Zoë", "François", "Søren", "Łukasz"]
_LAST = ["Vance", "Wilber", "Bowen", "Robbins", "Soto", "Delgado", "Archie", "Mueller", "Lauer", "Sherman",
         "Gu", "Holloway", "Burnett", "Wilke", "Fernandez", "Gupta", "Brontë", "Dupré", "Kierkegaard", "Wałęsa"]
_EXT = [("report.pdf", "application/pdf"), ("photo.jpg", "image/jpeg"), ("sheet.xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"), ("notes.txt", "text/plain"),
        ("slides.pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
        ("archive.zip", "application/zip")]

POOL_SIZE = 24  # shared attachments per tenant


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes
    inline_cid: str | None = None


def _b64_lines(data: bytes) -> bytes:
    # 76-character lines with CRLF, as mail clients write them: identical bytes wherever it appears
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    lines, line = [], []
    for i, w in enumerate(words):
        line.append(w)
        if len(line) >= 12 or i == len(words) - 1:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\r\n".join(lines)


_STYLE = (
    "<style>@font-face{font-family:\"Cambria Math\";panose-1:2 4 5 3 5 4 6 3 2 4;}"
    "p.MsoNormal,li.MsoNormal,div.MsoNormal{margin:0cm;font-size:11.0pt;font-family:\"Calibri\",sans-serif;}"
    "a:link,span.MsoHyperlink{mso-style-priority:99;color:#0563C1;text-decoration:underline;}"
    "span.EmailStyle17{mso-style-type:personal-compose;font-family:\"Calibri\",sans-serif;color:windowtext;}"
    ".MsoChpDefault{mso-style-type:export-only;font-family:\"Calibri\",sans-serif;}"
    "@page WordSection1{size:612.0pt 792.0pt;margin:72.0pt 72.0pt 72.0pt 72.0pt;}"
    "div.WordSection1{page:WordSection1;}</style>"
)


def _html(text: str, rng: random.Random) -> str:
    """Outlook-style HTML: verbose markup around the same text (what makes real mail tens of KB)."""
    paras = "".join(
        f"<p class=\"MsoNormal\"><span style=\"font-size:11.0pt;font-family:&quot;Calibri&quot;,sans-serif;"
        f"color:#1F497D\">{line}<o:p></o:p></span></p>\r\n"
        for line in text.split("\r\n")
    )
    sig = ("<p class=\"MsoNormal\"><b><span style=\"font-size:10.0pt;color:#2F5496\">Kind regards</span></b>"
           "<o:p></o:p></p>\r\n") * rng.randint(1, 4)
    return ("<html xmlns:o=\"urn:schemas-microsoft-com:office:office\"><head><meta http-equiv=\"Content-Type\" "
            "content=\"text/html; charset=utf-8\">" + _STYLE * rng.randint(1, 3) +
            "</head><body lang=\"EN-US\" link=\"#0563C1\"><div class=\"WordSection1\">\r\n" + paras + sig +
            "</div></body></html>")


def _person(rng: random.Random, domain: str) -> tuple[str, str]:
    f, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = (f + "." + last).lower().encode("ascii", "ignore").decode() or "user"
    return f"{f} {last}", f"{local}@{domain}"


def _encode_name(name: str, rng: random.Random) -> bytes:
    """A display name as mail clients send it: plain ASCII, RFC 2047 (UTF-8 or ISO-8859-1), or raw 8-bit."""
    if name.isascii():
        return name.encode()
    style = rng.random()
    if style < 0.4:
        return b"=?utf-8?B?" + base64.b64encode(name.encode("utf-8")) + b"?="
    if style < 0.7:
        try:
            latin = name.encode("iso-8859-1")
            return b"=?iso-8859-1?Q?" + "".join(
                c if c.isalnum() and c.isascii() else "=%02X" % b for c, b in zip(name, latin)
            ).encode() + b"?="
        except UnicodeEncodeError:
            pass
    return name.encode("utf-8")  # raw 8-bit header, as some clients still send


@lru_cache(maxsize=4)
def pool(tenant_seed: int) -> tuple[Attachment, ...]:
    """The tenant's shared attachments (a newsletter PDF, a logo, a policy document...)."""
    rng = random.Random(f"pool:{tenant_seed}")
    out = []
    for i in range(POOL_SIZE):
        name, ctype = _EXT[i % len(_EXT)]
        size = int(min(6_000_000, max(2_000, rng.lognormvariate(11.5, 1.3))))  # median ~100 KB
        if i == 0:
            size = 5_000_000  # one big shared one: the 5 MB deck everyone forwards
        out.append(Attachment(f"shared-{i:02d}-{name}", ctype, rng.randbytes(size)))
    return tuple(out)


@lru_cache(maxsize=2)
def _huge(tenant_seed: int) -> Attachment:
    rng = random.Random(f"huge:{tenant_seed}")
    return Attachment("site-survey-video.mp4", "video/mp4", rng.randbytes(26 * 1024 * 1024 + 12345))


@dataclass(frozen=True)
class MessageSpec:
    """What generate() needs to know about a message (the model owns the rest)."""

    tenant_seed: int
    seed: int          # the message's own seed
    version: int       # bumps when a draft is edited
    domain: str
    owner: str         # the mailbox owner's address
    owner_name: str
    is_draft: bool
    huge: bool         # carries the > 25 MB attachment
    received: datetime
    plain: bool = False  # text + HTML only, no attachments (small mailboxes for memory benchmarks)


def headers_of(spec: MessageSpec) -> dict[str, str]:
    """Subject, sender and message id as the model reports them in JSON (decoded, unicode)."""
    rng = random.Random(f"{spec.tenant_seed}:{spec.seed}:{spec.version}:h")
    sender_name, sender = _person(rng, spec.domain if rng.random() < 0.7 else "partner.example.org")
    subject = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 7))).capitalize()
    if rng.random() < 0.15:
        subject = "Re: " + subject + " — über café"
    msg_id = f"<{hashlib.sha1(f'{spec.tenant_seed}:{spec.seed}:{spec.version}'.encode()).hexdigest()[:24]}@{spec.domain}>"
    if spec.is_draft:
        sender_name, sender = spec.owner_name, spec.owner
    return {"subject": subject, "sender": sender, "sender_name": sender_name, "message_id": msg_id}


class BytesLRU:
    """Recently made message bytes, up to a byte budget (thread-safe; the simulator's handlers and its
    executor threads share it). ``get_or_make(key, make, max_item)``: items over ``max_item`` bytes are
    made each time, never kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Any, make: Callable[[], bytes], max_item: int) -> bytes:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        data = make()
        if len(data) <= max_item:
            with self._lock:
                if key not in self._items:
                    self._items[key] = data
                    self._bytes += len(data)
                while self._bytes > self.budget:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return data


_CACHE = BytesLRU(64 * 1024 * 1024)


def generate(spec: MessageSpec) -> bytes:
    """The message's MIME; recently generated ones come from a 64 MB LRU."""
    return _CACHE.get_or_make(spec, lambda: _generate(spec), 4 * 1024 * 1024)


def _generate(spec: MessageSpec) -> bytes:
    h = headers_of(spec)
    rng = random.Random(f"{spec.tenant_seed}:{spec.seed}:{spec.version}:b")
    kind = rng.random()
    date = spec.received.strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
    to_name, to = (spec.owner_name, spec.owner) if not spec.is_draft else _person(rng, spec.domain)

    hdr = [
        b"Received: from mail.partner.example.org (10.0.0.1) by mx.example.com; " + date,
        b"From: " + _encode_name(h["sender_name"], rng) + b" <" + h["sender"].encode() + b">",
        b"To: " + _encode_name(to_name, rng) + b" <" + to.encode() + b">",
        b"Subject: " + (h["subject"].encode("utf-8") if rng.random() < 0.3 else
                        b"=?utf-8?B?" + base64.b64encode(h["subject"].encode()) + b"?="),
        b"Date: " + date,
        b"Message-ID: " + h["message_id"].encode(),
        b"MIME-Version: 1.0",
    ]
    if rng.random() < 0.1:
        hdr.append(b"X-Mailer: Microsoft Outlook 16.0")
    if rng.random() < 0.05:
        hdr.append(b"X-Legacy-Note: Gr\xfc\xdfe aus K\xf6ln")  # raw ISO-8859-1 bytes in a header

    text = _text(rng, int(min(6000, rng.lognormvariate(5.6, 0.9))))  # median ~270 words, long tail
    if rng.random() < 0.5:  # a reply quoting the thread so far
        text += "\r\n\r\n-----Original Message-----\r\n" + _text(rng, rng.randint(100, 1500))
    html = _html(text, rng)
    alt_b = f"alt-{spec.seed:x}-{spec.version}".encode()
    alternative = [
        b"Content-Type: multipart/alternative; boundary=\"" + alt_b + b"\"", b"",
        b"--" + alt_b,
        b"Content-Type: text/plain; charset=\"utf-8\"", b"Content-Transfer-Encoding: 8bit", b"",
        text.encode("utf-8"),
        b"--" + alt_b,
        b"Content-Type: text/html; charset=\"utf-8\"", b"Content-Transfer-Encoding: quoted-printable", b"",
        binascii.b2a_qp(html.replace("\r\n", "\n").encode("utf-8")).replace(b"\n", CRLF),
        b"--" + alt_b + b"--", b"",
    ]

    attachments: list[Attachment] = []
    related: Attachment | None = None
    if spec.plain:
        kind = 1.0
    if kind < 0.08:  # an inline image
        related = Attachment("logo.png", "image/png", rng.randbytes(rng.randint(2_000, 40_000)), "logo@cid")
    if rng.random() < 0.32 and not spec.plain:
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 4)):
            r = rng.random()
            if r < 0.35:
                attachments.append(pool(spec.tenant_seed)[rng.randrange(POOL_SIZE)])
            elif r < 0.45:
                attachments.append(Attachment("tiny.txt", "text/plain", b"ok\r\n"))
            else:
                name, ctype = rng.choice(_EXT)
                size = int(min(8_000_000, max(500, rng.lognormvariate(11.0, 1.4))))
                attachments.append(Attachment(name, ctype, rng.randbytes(size)))
    if spec.huge:
        attachments.append(_huge(spec.tenant_seed))
    inner: bytes | None = None
    if rng.random() < 0.03 and not spec.plain:  # a forwarded message as an attachment
        inner = (b"From: someone@partner.example.org\r\nTo: " + spec.owner.encode() +
                 b"\r\nSubject: Original message\r\nDate: " + date +
                 b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
                 _text(rng, 60).encode() + CRLF)

    if not attachments and related is None and inner is None:
        body = alternative
    else:
        mix_b = f"mix-{spec.seed:x}-{spec.version}".encode()
        body = [b"Content-Type: multipart/mixed; boundary=\"" + mix_b + b"\"", b"",
                b"This is a multi-part message in MIME format.", b"--" + mix_b]
        if related is not None:
            rel_b = f"rel-{spec.seed:x}".encode()
            body += [b"Content-Type: multipart/related; boundary=\"" + rel_b + b"\"", b"", b"--" + rel_b]
            body += alternative
            body += [b"--" + rel_b, b"Content-Type: " + related.content_type.encode(),
                     b"Content-Transfer-Encoding: base64",
                     b"Content-ID: <" + related.inline_cid.encode() + b">",
                     b"Content-Disposition: inline; filename=\"" + related.name.encode() + b"\"", b"",
                     _b64_lines(related.data) + b"--" + rel_b + b"--", b""]
        else:
            body += alternative
        for a in attachments:
            body += [b"--" + mix_b, b"Content-Type: " + a.content_type.encode() + b"; name=\"" + a.name.encode() + b"\"",
                     b"Content-Transfer-Encoding: base64",
                     b"Content-Disposition: attachment; filename=\"" + a.name.encode() + b"\"", b"",
                     _b64_lines(a.data)]
        if inner is not None:
            body += [b"--" + mix_b, b"Content-Type: message/rfc822",
                     b"Content-Disposition: attachment; filename=\"original.eml\"", b"", inner]
        body += [b"--" + mix_b + b"--", b""]
    return CRLF.join(hdr) + CRLF + CRLF.join(body)


def received_time(seed: int, n: int, total: int) -> datetime:
    """Spread a mailbox's messages over two years, oldest first."""
    rng = random.Random(seed)
    frac = (n + rng.random()) / max(total, 1)
    return EPOCH + timedelta(seconds=int(frac * 730 * 86400))
