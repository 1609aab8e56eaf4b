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


def _blank_end(data: bytes, pos: int) -> int:
    """The end of the first blank line (a header block's end) at or after ``pos``, or -1."""
    a = data.find(b"\n\r\n", pos)
    b = data.find(b"\n\n", pos, a + 3 if a >= 0 else len(data))
    if b >= 0:
        return b + 2
    return a + 3 if a >= 0 else -1


def cut_points(data: bytes) -> list[int]:
    """Sorted offsets (excluding 0 and len) where MIME structure begins: each line starting with ``--``
    (a boundary delimiter, up to 200 bytes long) and the end of the header block after it, plus the end
    of the top-level header. ``bytes.find`` does the scanning (memchr speed, GB/s)."""
    n = len(data)
    cuts: set[int] = set()
    e = _blank_end(data, 0)
    if e > 0:
        cuts.add(e)
    pos = 0
    while True:
        i = data.find(b"\n--", pos)
        if i < 0:
            break
        start = i + 1
        eol = data.find(b"\n", start, start + 202)
        pos = start + 2
        if eol < 0 and n - start > 202:
            continue  # a line starting with "--" but longer than a delimiter can be
        cuts.add(start)
        e = _blank_end(data, eol if eol >= 0 else n)
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
