"""Sweeping dead backups' work dirs while other backups of the tenant (other runs, other processes) run."""

from __future__ import annotations

import os
import time

from mailpipe.backup.runner import sweep_work_dirs


def test_sweep_skips_a_work_dir_removed_by_its_own_backup_meanwhile(tmp_path, monkeypatch):
    """Two runs of one tenant on one host: one lists the tenant's work dirs while the other's backup ends and
    removes its own. The sweep goes on (it used to fail the whole batch with FileNotFoundError)."""
    work = tmp_path / "work"
    (work / "gone").mkdir(parents=True)
    (work / "dead").mkdir()
    (work / "dead" / "f").write_bytes(b"x")
    old = time.time() - 7200
    os.utime(work / "dead" / "f", (old, old))
    os.utime(work / "dead", (old, old))
    real = os.scandir

    def listing_then_removal(path):
        if path != str(work):  # (os.walk and rmtree list directories too, some by file descriptor)
            return real(path)
        entries = list(real(path))
        os.rmdir(work / "gone")  # the other backup ends between the listing and the stat
        return iter(entries)

    monkeypatch.setattr(os, "scandir", listing_then_removal)
    assert sweep_work_dirs(str(work), 3600) == 1
    assert not (work / "dead").exists()
