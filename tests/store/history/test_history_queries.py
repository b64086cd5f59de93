"""History queries over the store API (no mount): blame (renames, identical
lines, a moved line, binary, the 5,000-line × 1,000-version budget), content
by hash (prefix, ambiguous, unknown, permissions), grep (head, history, one
read per distinct content) and what a turn changed."""

from __future__ import annotations

import json
import time

import pytest

from chronicle.store.chunks.tree import hash_data
from chronicle.errors import InvalidArgument, NotFound, PermissionDenied
from chronicle.store.history import queries, search
from chronicle.store.history.access import Caller
from chronicle.store.history.blame import blame
from chronicle.store.history.nodes import Root
from chronicle.store.history.turns import TurnLog
from chronicle.store.history.views import HistoryViews
from storeutil import A, write

ALICE = Caller(1000, frozenset({1000}))


def lines(n: int, tag: str = "") -> bytes:
    return b"".join(b"line %d%s\n" % (i, tag.encode()) for i in range(n))


def owners(b) -> list[int]:
    return [r["version"] for r in b.records]


def test_blame_attributes_each_line_to_the_version_that_last_changed_it(ws):
    root = ws.root
    write(ws, root, b"f", b"a\nb\nc\n")
    write(ws, root, b"f", b"a\nB\nc\n")
    write(ws, root, b"f", b"a\nB\nc\nd\n")
    b = blame(HistoryViews(ws), b"f")
    assert [r["text"] for r in b.records] == ["a", "B", "c", "d"]
    assert owners(b) == [1, 2, 1, 3]
    assert [r["line"] for r in b.records] == [1, 2, 3, 4]
    assert all(r["time"] and r["seq"] and r["path"] == "f" for r in b.records)
    assert owners(blame(HistoryViews(ws), b"f", 2)) == [1, 2, 1]


def test_blame_follows_renames(ws):
    root = ws.root
    write(ws, root, b"old", b"one\ntwo\n")
    ws.rename(root, b"old", root, b"new", 0, A)
    write(ws, root, b"new", b"one\ntwo\nthree\n")
    b = blame(HistoryViews(ws), b"new")
    assert owners(b) == [1, 1, 2]
    assert [r["path"] for r in b.records] == ["old", "old", "new"]


def test_blame_identical_lines_and_a_moved_line(ws):
    root = ws.root
    write(ws, root, b"f", b"x\n\nx\n\nmove me\nend\n")
    write(ws, root, b"f", b"x\n\nx\n\nend\nmove me\n")       # the line moved below "end"
    write(ws, root, b"f", b"x\n\nx\n\nx\n\nend\nmove me\n")  # more identical lines
    b = blame(HistoryViews(ws), b"f")
    assert [r["text"] for r in b.records] == ["x", "", "x", "", "x", "", "end", "move me"]
    assert owners(b)[:4] == [1, 1, 1, 1]
    assert sorted(owners(b)[-2:]) == [1, 2]     # of two lines that swapped, one moved: version 2 (as diff)
    assert owners(b)[4:6].count(3) == 2        # the inserted pair


def test_blame_binary_by_byte_ranges(ws):
    root = ws.root
    data = bytearray(b"\0" * 10000)
    write(ws, root, b"bin", bytes(data))
    data[5000] = 1
    write(ws, root, b"bin", bytes(data))
    b = blame(HistoryViews(ws), b"bin")
    assert b.binary
    assert [(r["offset"], r["length"], r["version"]) for r in b.records] == [
        (0, 4096, 1), (4096, 4096, 2), (8192, 1808, 1)]
    assert "text" not in b.records[0]


def test_blame_5000_lines_1000_versions_stays_fast(ws):
    """A loose guard against a complexity regression (quadratic blame takes minutes); the 2 s
    budget itself is measured by ``tools/bench/history_bench.py``, not asserted in CI."""
    root = ws.root
    base = [b"line %d of a long file\n" % i for i in range(5000)]
    write(ws, root, b"big", b"".join(base))
    for v in range(1, 1000):
        base[(v * 37) % 5000] = b"changed in %d\n" % v
        write(ws, root, b"big", b"".join(base))
    t0 = time.perf_counter()
    b = blame(HistoryViews(ws), b"big")
    took = time.perf_counter() - t0
    print(f"blame of 5,000 lines x 1,000 versions: {took:.3f} s")
    assert len(b.records) == 5000
    assert b.records[(999 * 37) % 5000]["version"] == 1000
    assert b.records[1]["version"] == 1
    assert took < 10.0


def test_hash_lookup_whole_prefix_unknown_and_bad(ws):
    root = ws.root
    write(ws, root, b"a", b"same")
    write(ws, root, b"b", b"same")
    write(ws, root, b"a", b"other")
    full = hash_data(b"same").hex()
    views = HistoryViews(ws)
    doc = search.hash_lookup(views, full)
    assert doc["hash"] == full
    assert [(r["path"], r["version"]) for r in doc["versions"]] == [("a", 1), ("b", 1)]
    assert search.hash_lookup(views, full[:8].upper())["hash"] == full
    with pytest.raises(NotFound):
        search.hash_lookup(views, "0" * 64)
    for bad in ("abc", "zz" * 8, full + "0"):
        with pytest.raises(InvalidArgument):
            search.hash_lookup(views, bad)


def test_hash_prefix_ambiguous(ws, monkeypatch):
    """Two hashes sharing 8 hex digits are too rare to make: allow 4-digit prefixes and find a pair."""
    root = ws.root
    seen: dict[str, bytes] = {}
    n = 0
    while True:
        data = b"%d" % n
        key = hash_data(data).hex()[:4]
        if key in seen:
            break
        seen[key] = data
        n += 1
    write(ws, root, b"f0", seen[key])
    write(ws, root, b"f1", data)
    views = HistoryViews(ws)
    with pytest.raises(InvalidArgument, match="8 to 64"):
        search.hash_lookup(views, key)
    monkeypatch.setattr(search, "HASH_MIN", 4)
    with pytest.raises(InvalidArgument, match="ambiguous: 2 hashes"):
        search.hash_lookup(views, key)
    assert search.hash_lookup(views, hash_data(data).hex()[:12])["versions"][0]["path"] == "f1"


def test_hash_permissions(ws):
    root = ws.root
    ino = write(ws, root, b"secret", b"hidden words")
    ws.setattr(ino, A, mode=0o600)
    write(ws, root, b"open", b"open words")
    full = hash_data(b"hidden words").hex()
    assert search.hash_lookup(HistoryViews(ws), full)["versions"]
    alice = HistoryViews(ws, caller=ALICE)
    with pytest.raises(NotFound):
        search.hash_lookup(alice, full)          # she cannot tell it from a hash no one had
    assert search.hash_lookup(alice, hash_data(b"open words").hex())["versions"][0]["path"] == "open"
    assert [m.path for m in search.grep(alice, "words")] == [b"open"]
    assert [m.path for m in search.grep(alice, "words", history=True)] == [b"open"]
    with pytest.raises(PermissionDenied):
        blame(alice, b"secret")


def test_grep_head_history_and_dedupe(ws):
    root = ws.root
    write(ws, root, b"a", b"hello world\nbye\n")
    write(ws, root, b"b", b"hello world\nbye\n")         # the same content: read once
    write(ws, root, b"a", b"nothing\n")
    write(ws, root, b"bin", b"hello\0world")
    views = HistoryViews(ws)
    head = list(search.grep(views, r"hel+o"))
    assert [(m.path, m.version, m.line, m.text) for m in head] == [(b"b", None, 1, b"hello world")]
    g = search.Grep(views, "hello")
    hist = list(g.history([b""]))
    assert [(m.path, m.version, m.line) for m in hist] == [(b"a", 1, 1), (b"b", 1, 1)]
    assert g.contents_read == 3               # "hello world...", "nothing", the binary: once each
    with pytest.raises(InvalidArgument, match="regular expression"):
        list(search.grep(views, "("))
    assert [m.path for m in search.grep(views, "bye", [b"a"], history=True)] == [b"a"]


def test_grep_seq_range(ws):
    root = ws.root
    write(ws, root, b"a", b"first\n")
    mid = ws.head_seq
    write(ws, root, b"a", b"first again\n")
    assert [m.version for m in search.grep(HistoryViews(ws), "first", history=True, lo=mid + 1)] == [2]


def test_turn_changes_and_turn_nodes(ws, store):
    log = TurnLog(store)
    root = ws.root
    write(ws, root, b"before", b"x")
    log.begin(ws, "alice", 1, "m1")
    write(ws, root, b"made", b"by alice\n")
    ws.rename(root, b"made", root, b"moved", 0, A)
    log.end(ws)
    write(ws, root, b"after", b"y")
    views = HistoryViews(ws)
    doc = search.turn_changes(views, "alice", 1)
    assert doc["paths"] == ["made", "moved"]
    assert doc["status"] == "ended" and doc["end_seq"] >= doc["begin_seq"]
    assert all((e["turn"]["agent"], e["turn"]["turn"]) == ("alice", 1) for e in doc["events"])
    with pytest.raises(NotFound):
        search.turn_changes(views, "alice", 2)
    turns = views.lookup(Root(), b"turns")
    assert [n for n, _ in views.listing(turns)] == [b"alice"]
    agent = views.lookup(turns, b"alice")
    assert [n for n, _ in views.listing(agent)] == [b"1"]
    node = views.lookup(agent, b"1")
    assert json.loads(views.open(node).read(0, 1 << 20))["paths"] == ["made", "moved"]
    with pytest.raises(NotFound):
        views.lookup(agent, b"01")


def test_blame_and_hash_nodes(ws):
    root = ws.root
    d, _ = ws.mkdir(root, b"d", 0o755, A)
    write(ws, d, b"f", b"one\n")
    views = HistoryViews(ws)
    top = views.lookup(Root(), b"blame")
    assert [n for n, _ in views.listing(top)] == [b"d"]
    node = views.lookup(views.lookup(top, b"d"), b"f")
    assert isinstance(node, queries.BlameFile)
    rec = [json.loads(x) for x in views.open(node).read(0, 1 << 20).splitlines()]
    assert rec[0]["text"] == "one" and rec[0]["version"] == 1
    hashes = views.lookup(Root(), b"hash")
    assert views.listing(hashes) == []
    h = hash_data(b"one\n").hex()
    doc = json.loads(views.open(views.lookup(hashes, h[:10].encode())).read(0, 1 << 20))
    assert doc["versions"][0]["path"] == "d/f"
    with pytest.raises(NotFound):
        views.lookup(hashes, b"0" * 12)
    with pytest.raises(InvalidArgument):
        views.lookup(hashes, b"xyz")
