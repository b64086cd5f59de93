"""Path history (``chronicle.store.history.paths.History``), no mount: the
versions of a path follow renames as ``git log --follow`` does, a deleted
path keeps its history, a fork reads its parent's history up to the fork
seq, and the event log can be read from any seq on."""

from __future__ import annotations

import json

import pytest

from chronicle.errors import NotFound
from chronicle.store.meta.journal import parse_iso_time
from storeutil import A, write






def versions(ws, path: bytes) -> list[tuple[int, str, str]]:
    """``(version, event, recorded path)`` of every entry of ``path``'s history."""
    with ws.read_txn() as txn:
        out = []
        for v in ws.history.versions(txn, path):
            fields = json.loads(b"{" + v.entry.fragment)
            out.append((v.version, fields["event"], fields["path"]))
        return out


def contents(ws, path: bytes) -> dict[int, int]:
    """Version number → seq, for the versions with file content."""
    with ws.read_txn() as txn:
        return {n: v.seq for n, v in ws.history.content_versions(txn, path).items()}


def test_a_path_moved_to_a_free_name_brings_its_history_along(ws):
    write(ws, ws.root, b"a.txt", b"one")
    write(ws, ws.root, b"a.txt", b"two")
    ws.rename(ws.root, b"a.txt", ws.root, b"b.txt", 0, A)
    write(ws, ws.root, b"b.txt", b"three")
    assert versions(ws, b"b.txt") == [(1, "write", "a.txt"), (2, "write", "a.txt"), (2, "rename", "b.txt"),
                                      (3, "write", "b.txt")]
    assert sorted(contents(ws, b"b.txt")) == [1, 2, 3]
    # The old name keeps its own history, ending with the move away.
    assert [e for _, e, _ in versions(ws, b"a.txt")] == ["write", "write", "rename"]


def test_a_rename_over_an_existing_file_is_a_new_version_of_that_path(ws):
    write(ws, ws.root, b"notes", b"v1")
    write(ws, ws.root, b".notes.swp", b"v2")
    ws.rename(ws.root, b".notes.swp", ws.root, b"notes", 0, A)
    assert versions(ws, b"notes") == [(1, "write", "notes"), (2, "rename", "notes")]
    assert sorted(contents(ws, b"notes")) == [1, 2]


def test_files_follow_a_renamed_directory_but_one_created_after_the_move_does_not(ws):
    d, _ = ws.mkdir(ws.root, b"src", 0o755, A)
    write(ws, d, b"x", b"x1")
    ws.rename(ws.root, b"src", ws.root, b"lib", 0, A)
    write(ws, d, b"x", b"x2")
    write(ws, d, b"y", b"y1")
    assert versions(ws, b"lib/x") == [(1, "write", "src/x"), (2, "write", "lib/x")]
    assert versions(ws, b"lib/y") == [(1, "write", "lib/y")]
    assert [e for _, e, _ in versions(ws, b"lib")] == ["mkdir", "rename"]


def test_a_deleted_path_keeps_its_history_and_a_new_file_there_continues_it(ws):
    write(ws, ws.root, b"gone", b"data")
    ws.unlink(ws.root, b"gone", A)
    assert versions(ws, b"gone") == [(1, "write", "gone"), (1, "delete", "gone")]
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    ws.rmdir(ws.root, b"dir", A)
    assert [e for _, e, _ in versions(ws, b"dir")] == ["mkdir", "rmdir"]
    write(ws, ws.root, b"gone", b"back")
    assert versions(ws, b"gone")[-1] == (2, "write", "gone")
    with ws.read_txn() as txn:
        assert ws.history.has_history(txn, b"gone") and ws.history.has_history(txn, b"dir")
        assert ws.history.compute_head(txn, b"gone").version == 2


def test_a_path_that_never_existed_has_no_history(ws):
    write(ws, ws.root, b"f", b"1")
    with ws.read_txn() as txn:
        assert ws.history.followed(txn, b"never") == []
        assert not ws.history.has_history(txn, b"never")
        assert ws.history.compute_head(txn, b"never") is None
        with pytest.raises(NotFound):
            ws.history.versions(txn, b"never")
        with pytest.raises(NotFound):
            ws.history.render_query(txn, b"f/below-a-file")


def test_children_with_history_lists_deleted_names_one_level_deep(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    sub, _ = ws.mkdir(d, b"sub", 0o755, A)
    write(ws, sub, b"deep", b"x")
    write(ws, d, b"kept", b"x")
    write(ws, d, b"deleted", b"x")
    ws.unlink(d, b"deleted", A)
    with ws.read_txn() as txn:
        assert ws.history.children_with_history(txn, b"d") == {b"sub", b"kept", b"deleted"}
        assert ws.history.children_with_history(txn, b"") == {b"d"}
        assert ws.history.children_with_history(txn, b"d/kept") == set()


def test_a_fork_reads_its_parents_history_up_to_the_fork_seq_then_its_own(store, ws):
    write(ws, ws.root, b"f", b"base")
    store.fork("w", ws.head_seq, "w2")
    write(ws, ws.root, b"f", b"parent after the fork")
    fork = store.open_workspace("w2", writable=True)
    write(fork, fork.root, b"f", b"fork change")
    assert [(n, e) for n, e, _ in versions(ws, b"f")] == [(1, "write"), (2, "write")]
    assert [(n, e) for n, e, _ in versions(fork, b"f")] == [(1, "write"), (2, "write")]
    assert contents(fork, b"f")[2] == fork.head_seq
    with fork.read_txn() as txn:
        log = [json.loads(line) for line in fork.history.log_lines(txn)]
    assert [x["seq"] for x in log] == list(range(1, fork.head_seq + 1))
    assert log[-1]["path"] == "f" and log[-1]["seq"] > fork.record.fork_seq


def test_the_log_resumes_at_any_seq_and_maps_times_to_seqs(ws):
    for n in range(5):
        write(ws, ws.root, b"f%d" % n, b"x")
    with ws.read_txn() as txn:
        every = list(ws.history.log_entries(txn))
        assert [seq for seq, _ in every] == list(range(1, ws.head_seq + 1))
        assert list(ws.history.log_entries(txn, 4, 6)) == every[3:6]
        assert list(ws.history.log_entries(txn, ws.head_seq + 1)) == []
        assert json.loads(every[2][1]) == ws.history.event(txn, 3)
        assert ws.history.event(txn, ws.head_seq + 1) is None
        third = ws.history.event(txn, 3)["time"]
    with ws.read_txn() as txn:
        at = ws.history.seq_at_time(txn, parse_iso_time(third))
        assert at >= 3 and ws.history.event(txn, at)["time"] == third
        assert ws.history.seq_at_time(txn, 0) == 0
