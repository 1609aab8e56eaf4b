"""A small chaos run (bench/chaos.py): 4 rounds of changes under 429/503/504/resets and transient 404s on
$value, a SIGKILL at a random point of each round's backup, a corrupted and a deleted chunk between
rounds — after each round every latest snapshot equals the ground truth and `check --read-data` is clean."""

from __future__ import annotations

from bench.chaos import run


def test_chaos_rounds_lose_nothing_and_leave_a_clean_repository(tmp_path):
    rounds = run(users=2, messages=40, rounds=4, seed=11, work=str(tmp_path), verbose=False)
    assert len(rounds) == 4
    for r in rounds:
        assert (r.lost, r.extra, r.wrong, r.check_problems) == (0, 0, 0, 0), r
        assert r.items > 0 and r.killed_after > 0
    assert sum(r.faults["404_value"] + r.faults["503"] + r.faults["reset"] for r in rounds) > 0
