"""Unit tests of the merge rules of one backup (mailpipe.backup.state)."""

from __future__ import annotations

import pytest

from mailpipe.backup.state import BackupState, Content


def prev_row(item_id, folder, *, draft=False, ck="ck1", sha=None):
    return {"item_id": item_id, "folder_id": folder, "change_key": ck, "is_draft": draft,
            "sha256": sha or f"sha-{item_id}", "chunks": [f"c-{item_id}"], "size": 10,
            "first_snapshot_id": "S1", "subject": f"s {item_id}", "categories": []}


def msg(item_id, *, draft=False, ck="ck2", read=True):
    return {"item_id": item_id, "change_key": ck, "is_draft": draft, "is_read": read, "subject": "x"}


@pytest.fixture
def st(tmp_path):
    s = BackupState(str(tmp_path / "s.sqlite"))
    yield s
    s.close()


def manifest(st, live):
    return {r["item_id"]: r for batch in st.iter_manifest(set(live), "S2") for r in batch}


def test_unchanged_previous_items_are_kept_without_download(st):
    st.load_previous([prev_row("a", "F"), prev_row("b", "F")])
    m = manifest(st, {"F"})
    assert set(m) == {"a", "b"}
    assert m["a"]["first_snapshot_id"] == "S1"
    assert st.counts({"F"})["items_total"] == 2


def test_read_flag_change_and_move_reuse_content_of_non_drafts(st):
    st.load_previous([prev_row("a", "F"), prev_row("b", "F")])
    assert st.upsert("F", msg("a", read=False)) is False  # read/flag change: changeKey differs, no download
    # a move F -> G: removal in F, upsert in G, in either order
    assert st.upsert("G", msg("b")) is False
    st.remove("F", "b")  # the removal reported by the old folder must not drop the moved item
    m = manifest(st, {"F", "G"})
    assert m["b"]["folder_id"] == "G" and m["b"]["sha256"] == "sha-b" and m["b"]["first_snapshot_id"] == "S1"
    c = st.counts({"F", "G"})
    assert c["items_changed"] == 2 and c["items_reused"] == 2 and c["items_new"] == 0


def test_move_with_removal_first(st):
    st.load_previous([prev_row("b", "F")])
    st.remove("F", "b")
    assert st.upsert("G", msg("b")) is False
    assert manifest(st, {"F", "G"})["b"]["folder_id"] == "G"


def test_changed_draft_is_downloaded_again_but_unchanged_draft_is_not(st):
    st.load_previous([prev_row("d1", "D", draft=True, ck="k1"), prev_row("d2", "D", draft=True, ck="k1")])
    assert st.upsert("D", msg("d1", draft=True, ck="k1")) is False
    assert st.upsert("D", msg("d2", draft=True, ck="k2")) is True
    # a draft that was sent (not a draft any more) may have new content too
    st.load_previous([prev_row("d3", "D", draft=True, ck="k1")])
    assert st.upsert("S", msg("d3", draft=False, ck="k9")) is True


def test_new_item_needs_download_once_even_if_reported_twice(st):
    assert st.upsert("F", msg("n")) is True
    assert st.upsert("F", msg("n")) is False  # repeated update while the download is pending
    st.stored("n", Content("sha-n", ["c1", "c2"], 99))
    m = manifest(st, {"F"})
    assert m["n"]["chunks"] == ["c1", "c2"] and m["n"]["first_snapshot_id"] == "S2"
    assert st.counts({"F"})["items_new"] == 1


def test_item_without_content_is_not_in_manifest(st):
    st.upsert("F", msg("n"))
    assert manifest(st, {"F"}) == {}


def test_deleted_item_and_deleted_folder_leave_snapshot(st):
    st.load_previous([prev_row("a", "F"), prev_row("b", "F"), prev_row("c", "Gone")])
    st.remove("F", "a")
    m = manifest(st, {"F"})
    assert set(m) == {"b"}
    c = st.counts({"F"})
    assert c["items_removed"] == 2 and c["items_total"] == 1


def test_full_listing_removes_what_it_did_not_report(st):
    st.load_previous([prev_row("a", "F"), prev_row("b", "F"), prev_row("x", "G")])
    # an interrupted first listing reported z, which was deleted before the second listing
    st.upsert("F", msg("z"), listing=1)
    st.stored("z", Content("sha-z", ["cz"], 1))
    assert st.upsert("F", msg("a"), listing=2) is False  # known content: no download after a resync
    st.finish_full_listing("F", 2)
    m = manifest(st, {"F", "G"})
    assert set(m) == {"a", "x"}


def test_checkpoint_rows_avoid_downloads(st):
    st.load_checkpoint([{"item_id": "n", "change_key": "k1", "is_draft": False, "sha256": "sha-n",
                         "chunks": ["c"], "size": 3}])
    assert st.upsert("F", msg("n", ck="k7")) is False
    m = manifest(st, {"F"})
    assert m["n"]["sha256"] == "sha-n"
    assert st.counts({"F"})["items_reused"] == 1
    # a draft in the checkpoint with another changeKey is downloaded again
    st.load_checkpoint([{"item_id": "d", "change_key": "k1", "is_draft": True, "sha256": "s",
                         "chunks": ["c"], "size": 3}])
    assert st.upsert("F", msg("d", draft=True, ck="k2")) is True


def test_gone_and_skipped(st):
    st.upsert("F", msg("g"))
    st.upsert("F", msg("s"))
    st.gone("g")
    st.skip("s", "permanent: 500 ErrorCorruptData")
    assert manifest(st, {"F"}) == {}
    sk = st.skipped()
    assert [(s["item_id"], s["folder_id"], s["reason"]) for s in sk] == [("s", "F", "permanent: 500 ErrorCorruptData")]
    assert st.counts({"F"})["items_skipped"] == 1
