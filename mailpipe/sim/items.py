"""The simulated mailbox's items and folders, and the errors of looking them up: what the mail half
(:mod:`.model`) and the export API's half (:mod:`.fidelity`) of a mailbox share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailpipe.sim import posted as posted_mod


class TokenError(Exception):
    """An unknown, tampered or expired delta token (Graph answers 410 SyncStateNotFound)."""


class NotFound(Exception):
    pass


class Msg:
    __slots__ = ("id", "n", "folder", "seq", "version", "is_read", "flag", "categories", "is_draft",
                 "received", "huge", "change_n", "importance", "posted", "imported")

    def __init__(self, id: str, n: int, folder: str, seq: int, received: datetime, is_draft: bool, huge: bool):
        self.id = id
        self.n = n
        self.folder = folder
        self.seq = seq
        self.version = 0
        self.is_read = False
        self.flag = "notFlagged"
        self.categories: tuple[str, ...] = ()
        self.is_draft = is_draft
        self.received = received
        self.huge = huge
        self.change_n = 0
        self.importance = "normal"
        self.posted: posted_mod.Posted | None = None  # content of a message created through the write API
        self.imported: tuple[dict[str, Any], bytes] | None = None  # (properties, MIME) of an imported message


@dataclass
class Folder:
    id: str
    name: str
    parent: str  # folder id or the root id
    well_known: str | None = None
    seq: int = 0
    # (seq, message id) in sequence order; entries go stale when the message changes again
    changes: list[tuple[int, str]] = field(default_factory=list)
    departures: list[tuple[int, str]] = field(default_factory=list)
    cls: str = "IPF.Note"  # folder class: IPF.Note (mail), IPF.Appointment, IPF.Contact, IPF.Task
