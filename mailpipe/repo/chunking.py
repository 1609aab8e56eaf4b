"""MIME-aware chunking: cut where MIME parts begin, so an attachment is the same chunks wherever it is.

A message's raw bytes are cut at:
- the start of every line that begins with ``--`` (MIME boundary delimiters, found with one regex
  pass in C), and the end of the header block that follows each (the first blank line);
- the end of the top-level header block.

The regions between cuts are the header blocks and the part bodies. A region of at least
``LARGE_PART`` bytes (an attachment, a big body) becomes its own chunk(s): fixed ``MAX_CHUNK`` pieces
aligned to the region's start, so the same base64 attachment body yields the same chunks in every
message and mailbox, whatever comes before it. Everything else (headers, small parts) is glued into
chunks of up to ``MAX_CHUNK`` between the large regions. A message smaller than ``SINGLE_CHUNK`` is
one chunk. The cuts are only hints: the concatenation of the chunks is always the input, byte for byte,
malformed MIME included. ``docs/FORMAT.md`` gives the reasons for the numbers.
"""

from __future__ import annotations

SINGLE_CHUNK = 128 * 1024   # smaller messages are one chunk
LARGE_PART = 64 * 1024      # regions at least this big get chunks of their own
MAX_CHUNK = 1024 * 1024     # no chunk is larger

PARAMS = {"scheme": "mime-parts-v1", "single_chunk": SINGLE_CHUNK, "large_part": LARGE_PART,
          "max_chunk": MAX_CHUNK}


class _Finder:
    """``data.find(sub, pos, end)`` for (mostly) increasing ``pos``: an answer that still holds is reused, so a
    long stretch without ``sub`` is scanned once, not once per query. (Many ``--`` lines and no blank line
    after them made cut_points quadratic: 20,000 such lines took ~28 s.)"""

    __slots__ = ("data", "sub", "asked", "end", "found")

    def __init__(self, data: bytes, sub: bytes) -> None:
        self.data, self.sub, self.asked, self.end, self.found = data, sub, -1, -1, -1

    def __call__(self, pos: int, end: int) -> int:
        f = self.found
        if 0 <= self.asked <= pos and (f + len(self.sub) <= end if f >= pos else (f < 0 and end <= self.end)):
            return f  # found at or after pos and inside [pos, end), or nothing in a range that covers it
        self.asked, self.end = pos, end
        self.found = self.data.find(self.sub, pos, end)
        return self.found


def _blank_end(data: bytes, pos: int, crlf: _Finder | None = None, lf: _Finder | None = None) -> int:
    """The end of the first blank line (a header block's end) at or after ``pos``, or -1."""
    n = len(data)
    a = crlf(pos, n) if crlf else data.find(b"\n\r\n", pos)
    limit = a + 3 if a >= 0 else n
    b = lf(pos, limit) if lf else data.find(b"\n\n", pos, limit)
    if b >= 0:
        return b + 2
    return a + 3 if a >= 0 else -1


def find_delimiter(data: bytes, pos: int) -> int:
    """``data.find(b"\n--", pos)``, faster where it matters: a single-byte search for ``-`` is memchr (many
    GB/s) and base64 — every attachment — has no ``-`` at all, while a 3-byte search crawls through it at
    ~1 GB/s holding the GIL (~0.6 ms of a 490 KB message). Text full of hyphens falls back to the 3-byte
    search after 64 misses, so the worst case stays within a few times the plain search."""
    misses = 0
    while misses < 64:
        i = data.find(b"-", pos + 1)
        if i < 0:
            return -1
        if data[i - 1] == 10 and data[i + 1:i + 2] == b"-":  # b"\n--" starts at i - 1 (≥ pos)
            return i - 1
        pos = i  # no match starts before i
        misses += 1
    return data.find(b"\n--", pos)


def cut_points(data: bytes) -> list[int]:
    """Sorted offsets (excluding 0 and len) where MIME structure begins: each line starting with ``--``
    (a boundary delimiter, up to 200 bytes long) and the end of the header block after it, plus the end
    of the top-level header. ``bytes.find`` does the scanning (memchr speed, GB/s)."""
    n = len(data)
    cuts: set[int] = set()
    crlf, lf = _Finder(data, b"\n\r\n"), _Finder(data, b"\n\n")
    e = _blank_end(data, 0, crlf, lf)
    if e > 0:
        cuts.add(e)
    pos = 0
    while True:
        i = find_delimiter(data, pos)
        if i < 0:
            break
        start = i + 1
        eol = data.find(b"\n", start, start + 202)
        pos = start + 2
        if eol < 0 and n - start > 202:
            continue  # a line starting with "--" but longer than a delimiter can be
        cuts.add(start)
        e = _blank_end(data, eol if eol >= 0 else n, crlf, lf)
        if e > 0:
            cuts.add(e)
        if eol > pos:
            pos = eol
    if data.startswith(b"--"):
        cuts.add(0)
    return sorted(c for c in cuts if 0 < c < n)


def split(data: bytes) -> list[bytes]:
    """The chunks of ``data``; ``b"".join(split(data)) == data`` always."""
    n = len(data)
    if n <= SINGLE_CHUNK:
        return [data]
    bounds = [0, *cut_points(data), n]
    spans: list[tuple[int, int]] = []  # chunk spans
    glue_start: int | None = None
    for a, b in zip(bounds, bounds[1:]):
        if b - a >= LARGE_PART:
            if glue_start is not None:
                spans += _fixed(glue_start, a)
                glue_start = None
            spans += _fixed(a, b)
        elif glue_start is None:
            glue_start = a
        elif b - glue_start > MAX_CHUNK:
            spans.append((glue_start, a))
            glue_start = a
    if glue_start is not None:
        spans += _fixed(glue_start, n)
    return [data[a:b] for a, b in spans]


def _fixed(a: int, b: int) -> list[tuple[int, int]]:
    return [(i, min(i + MAX_CHUNK, b)) for i in range(a, b, MAX_CHUNK)]
