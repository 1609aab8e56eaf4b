"""Damage a repository the way disks, hands and lifecycle rules do, one chunk at a time (tests, bench/chaos).

Chunks live inside pack files; these helpers find a chunk's blob through the repository's index and alter
the pack in place (same key), or make exactly one chunk missing (its pack's other chunks moved to a new
pack, the old pack deleted). Each returns a function that undoes it.
"""

from __future__ import annotations

from collections.abc import Callable

from mailpipe.repo.packs import pack_key


def chunk_location(repo, h: str) -> tuple[str, int, int]:
    """(pack id, offset, length) of a stored copy of chunk ``h`` (the newest whose pack exists)."""
    repo.flush()
    repo.sync_index()
    locs = [loc for loc in repo.index.locations(h) if repo.store.exists(pack_key(loc[0]))]
    assert locs, f"chunk {h} is not in any pack that exists"
    return locs[0]


def corrupt_chunk(repo, h: str, *, at: int | None = None, garbage: bool = False) -> Callable[[], None]:
    """Flip one byte of chunk ``h``'s stored blob (``at``: its offset in the blob, default the middle), or
    overwrite the whole blob with garbage."""
    from mailpipe.repo.repository import IntegrityError

    pid, off, n = chunk_location(repo, h)
    key = pack_key(pid)
    good = repo.store.get_bytes(key)
    if garbage:
        data = bytearray(good)
        data[off:off + n] = b"\x5a" * n
    else:
        # a flip that the reader cannot notice (a bit zstd ignores) is not damage: move on until it is
        start = n // 2 if at is None else at % n
        for step in range(n):
            data = bytearray(good)
            data[off + (start + step) % n] ^= 0x20
            try:
                repo._piece(h, bytes(data[off:off + n]), "probe")
            except IntegrityError:
                break
    repo.store.put_bytes(key, bytes(data))
    return lambda: repo.store.put_bytes(key, good)


def delete_chunk(repo, h: str) -> Callable[[], None]:
    """Make chunk ``h`` (and only it) missing: the other chunks of its pack are stored again in a new pack,
    then the pack is deleted."""
    pid, _, _ = chunk_location(repo, h)
    key = pack_key(pid)
    good = repo.store.get_bytes(key)
    for c, off, n in repo.index.pack_blobs(pid):
        if c != h:
            repo._add_blob(c, good[off:off + n], False)
    repo.flush()
    repo.store.delete(key)
    return lambda: repo.store.put_bytes(key, good)


def delete_pack_of(repo, h: str) -> Callable[[], None]:
    """Delete the whole pack holding chunk ``h`` (every chunk in it goes missing)."""
    pid, _, _ = chunk_location(repo, h)
    key = pack_key(pid)
    good = repo.store.get_bytes(key)
    repo.store.delete(key)
    return lambda: repo.store.put_bytes(key, good)
