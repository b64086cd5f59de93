"""Read-sets in the store, without a mount: range coalescing (hypothesis),
the in-memory read-set of a turn (``ReadTracker``) and how ``ReadLog``
writes it and names the versions read."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.history.reads import Ranges, ReadLog
from chronicle.store.history.turns import TurnLog
from chronicle.store.namespace.files import ReadTracker

from storeutil import A, write

spans = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1])),
                 max_size=40)


@settings(max_examples=400, deadline=None)
@given(spans)
def test_ranges_coalesce_to_the_union(added):
    ranges = Ranges()
    covered: set[int] = set()
    for start, end in added:
        ranges.add(start, end)
        covered.update(range(start, end))
    out = list(ranges)
    assert all(s < e for s, e in out)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(out, out[1:]))      # sorted, disjoint, not even touching
    assert {i for s, e in out for i in range(s, e)} == covered
    assert ranges.total == len(covered)
    assert list(Ranges(added)) == out                                 # independent of how it was built


def test_sequential_reads_coalesce():
    ranges = Ranges()
    for off in range(0, 1 << 20, 4096):
        ranges.add(off, off + 4096)
    ranges.add(10, 20)
    assert ranges.to_json() == [[0, 1 << 20]]


def _read_all(ws, tracker, ino, chunk=4):
    ws.files.open(ino)
    off = 0
    while data := ws.files.read(ino, off, chunk):
        tracker.note(ino, off, len(data), pid=77)
        off += len(data)
    ws.files.release(ino)


def test_a_turns_reads_keep_the_version_read_even_if_it_changes_in_the_turn(store, ws):
    ino = write(ws, ws.root, b"a.txt", b"one\n")
    write(ws, ws.root, b"a.txt", b"two!!\n")                           # version 2
    other = write(ws, ws.root, b"b.txt", b"bee\n")
    log = TurnLog(store)
    log.begin(ws, "bob", 1)
    tracker = ReadTracker(ws)
    tracker.note(ino, 0, 4)                                           # no turn begun here: nothing
    tracker.begin("bob", 1)
    _read_all(ws, tracker, ino)
    v2_seq = ws.head_seq
    write(ws, ws.root, b"a.txt", b"three\n")                          # version 3, in the turn
    _read_all(ws, tracker, ino, chunk=2)
    ws.files.open(other)
    tracker.note(other, 2, 2, pid=78)
    tracker.note(other, 0, 1, pid=78)
    ws.files.release(other)
    reads = tracker.end()
    assert not tracker.active
    log.end(ws)
    assert ReadLog(store).record(ws, "bob", 1, reads) == 3
    got = ReadLog(store).turn_reads("w", "bob", 1)
    assert [(r["path"], r["version"], r["ranges"], r["bytes"], r["pids"]) for r in got] == [
        ("a.txt", 2, [[0, 6]], 6, [77]), ("a.txt", 3, [[0, 6]], 6, [77]), ("b.txt", 1, [[0, 1], [2, 4]], 3, [78])]
    with ws.read_txn() as txn:
        versions = ws.history.versions(txn, b"a.txt")
    assert got[0]["seq"] == versions[1].seq <= v2_seq and got[1]["seq"] == versions[2].seq
    assert ReadLog(store).turn_reads("w", "bob", 2) == []


def test_reads_of_own_uncommitted_writes_are_marked(store, ws):
    ino = write(ws, ws.root, b"a.txt", b"base\n")
    tracker = ReadTracker(ws)
    tracker.begin("bob", 1)
    ws.files.open(ino)
    ws.files.write(ino, 0, b"B", A.pid)
    tracker.note(ino, 0, 5)
    ws.files.commit(ino)
    ws.files.release(ino)
    [read] = tracker.end()
    assert read.uncommitted and read.ranges.to_json() == [[0, 5]]
    ReadLog(store).record(ws, "bob", 1, [read])
    [got] = ReadLog(store).turn_reads("w", "bob", 1)
    assert (got["version"], got["uncommitted"]) == (1, True)         # the version the writes started from


def test_untracked_turn_notes_nothing(store, ws):
    ino = write(ws, ws.root, b"a.txt", b"x")
    tracker = ReadTracker(ws)
    tracker.begin("bob", 1, enabled=False)
    ws.files.open(ino)
    tracker.note(ino, 0, 1)
    ws.files.release(ino)
    assert tracker.end() == [] and ReadLog(store).record(ws, "bob", 1, []) == 0


def test_deleting_the_workspace_drops_its_read_sets(store, ws):
    ino = write(ws, ws.root, b"a.txt", b"x")
    tracker = ReadTracker(ws)
    tracker.begin("bob", 1)
    ws.files.open(ino)
    tracker.note(ino, 0, 1)
    ws.files.release(ino)
    ReadLog(store).record(ws, "bob", 1, tracker.end())
    store.release_workspace(ws)
    store.delete_workspace("w")
    with store.env.begin() as txn:
        assert txn.stat(store.dbs["turn_reads"])["entries"] == 0
