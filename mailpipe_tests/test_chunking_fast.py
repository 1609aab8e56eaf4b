"""The fast delimiter search of the MIME chunker finds exactly what ``bytes.find`` finds: chunk boundaries
(and so deduplication against chunks already stored) must not move."""

from __future__ import annotations

import random

from mailpipe.repo import chunking
from mailpipe.sim import SimConfig
from mailpipe.sim.model import TenantModel


def _reference_cut_points(data: bytes) -> list[int]:
    """mailpipe-parts-v1's cut points as first written (plain ``bytes.find`` everywhere)."""
    def blank_end(pos: int) -> int:
        a = data.find(b"\n\r\n", pos)
        b = data.find(b"\n\n", pos, a + 3 if a >= 0 else len(data))
        if b >= 0:
            return b + 2
        return a + 3 if a >= 0 else -1

    n = len(data)
    cuts: set[int] = set()
    e = blank_end(0)
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
            continue
        cuts.add(start)
        e = blank_end(eol if eol >= 0 else n)
        if e > 0:
            cuts.add(e)
        if eol > pos:
            pos = eol
    if data.startswith(b"--"):
        cuts.add(0)
    return sorted(c for c in cuts if 0 < c < n)


def test_find_delimiter_is_bytes_find():
    rnd = random.Random(7)
    cases = [bytes(rnd.choice(b"-\n\r a") for _ in range(rnd.randrange(0, 120))) for _ in range(600)]
    cases += [b"", b"-", b"--", b"\n-", b"\n--", b"-" * 5000 + b"\n--x", b"a-b " * 100 + b"\n--end", b"\n-\n--"]
    for d in cases:
        for pos in range(0, len(d) + 2):
            assert chunking.find_delimiter(d, pos) == d.find(b"\n--", pos), (d, pos)


def test_cut_points_and_chunks_are_unchanged_on_real_mail():
    model = TenantModel(SimConfig(users=1, messages_per_mailbox=120, seed=3))
    mb = next(iter(model.mailboxes.values()))
    hyphens = b"Subject: x\r\n\r\n" + b"-- not a boundary - a-b --\r\n" * 2000 + b"\r\n--b\r\n\r\nbody\r\n--b--\r\n"
    lf_only = b"Subject: y\n\n" + b"--x\nA: b\n\nbody - text\n" * 500 + b"--x--\n"
    mixed = b"Subject: z\r\n\r\n--q\r\nA: 1\n\n--q\r\nB: 2\r\n\r\n" * 300 + b"--q--"
    rnd = random.Random(5)
    noise = [bytes(rnd.choice(b"-\n\r ab") for _ in range(rnd.randrange(1, 3000))) for _ in range(300)]
    for data in [mb.mime(m) for m in mb.msgs.values()] + [hyphens, lf_only, mixed] + noise:
        assert chunking.cut_points(data) == _reference_cut_points(data)


def test_many_delimiter_lines_without_a_blank_line_are_linear():
    """20,000 lines starting with "--" and no blank line after them: each scan for the header's end went to
    the end of the message (quadratic, ~28 s); the scans are shared now. Counted, not timed."""
    data = b"Subject: x\r\n\r\n" + b"-- a line --\r\n" * 20000
    calls = []
    real = bytes.find

    class Counting(bytes):
        def find(self, sub, *a):  # noqa: D102
            calls.append(sub)
            return real(self, sub, *a)

    chunking.cut_points(Counting(data))
    assert calls.count(b"\n\r\n") < 10 and calls.count(b"\n\n") < 10
