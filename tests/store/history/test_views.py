"""The ``.chronicle/`` views (``chronicle.store.history.views``), no FUSE:
every node kind's lookup, listing, attributes and content; a missing path
is ``NotFound`` and every other error comes through as it is; ``log`` is
pinned at open and rendered as it is read."""

from __future__ import annotations

import json
import stat
import time

import pytest

from chronicle.store.chunks.tree import hash_data
from chronicle.errors import (Corrupt, InvalidArgument, IsADirectory, NoAttribute, NotADirectory,
                              NotFound, ReadOnly)
from chronicle.store.history import points
from chronicle.store.history.nodes import (ROOT_CHILDREN, AtDir, CtlFile, LogFile, QueryDir, QueryFile, Root,
                                           SnapshotsDir, StatsFile, TreeNode, VersionFile, VersionsDir)
from chronicle.store.history.views import HistoryViews, LogReader, split_version, version_list
from chronicle.store.meta import schema
from chronicle.store.meta.journal import EventWriter
from storeutil import A, write





@pytest.fixture
def views(ws):
    return HistoryViews(ws, mountpoint="/mnt/w")



def read_all(views: HistoryViews, node, piece: int = 1 << 20) -> bytes:
    content = views.open(node)
    out, off = [], 0
    while True:
        data = content.read(off, piece)
        if not data:
            content.close()
            return b"".join(out)
        out.append(data)
        off += len(data)


def names(listing) -> list[bytes]:
    return [name for name, _ in listing]


def walk(views: HistoryViews, *names_: bytes):
    node = Root()
    for name in names_:
        node = views.lookup(node, name)
    return node


def log_text(ws) -> bytes:
    with ws.read_txn() as txn:
        return b"".join(line + b"\n" for line in ws.history.log_lines(txn))


# -- the root and its fixed children ----------------------------------------------------------------


def test_the_root_lists_its_fixed_children_with_their_modes(views, ws):
    assert names(views.listing(Root())) == [b"at", b"blame", b"ctl", b"hash", b"log", b"query", b"snapshots", b"stats",
                                            b"turns", b"versions"]
    root = ws.head_attrs(ws.root)
    for name, node in ROOT_CHILDREN.items():
        assert views.lookup(Root(), name) == node
        attrs = views.attrs(node)
        assert (attrs.uid, attrs.gid, attrs.mtime_ns) == (root.uid, root.gid, root.mtime_ns)
        want = {True: stat.S_IFDIR | 0o555, False: stat.S_IFREG | (0o660 if name == b"ctl" else 0o444)}
        assert attrs.mode == want[node.is_dir] and attrs.xattrs == ()
        assert views.is_dir(node) is node.is_dir
    assert views.lookup(Root(), b".") == Root()
    with pytest.raises(NotFound):
        views.lookup(Root(), b"nothing")
    for file_node in (LogFile(), StatsFile(), CtlFile()):
        with pytest.raises(NotADirectory):
            views.lookup(file_node, b"x")
        with pytest.raises(NotADirectory):
            views.listing(file_node)


def test_nodes_are_values(views):
    assert QueryFile(b"a") == QueryFile(b"a") and hash(TreeNode(3, 16)) == hash(TreeNode(3, 16))
    assert QueryFile(b"a") != QueryDir(b"a")
    assert {LogFile(): 1}[LogFile()] == 1


# -- query/ -----------------------------------------------------------------------------------------


def test_query_mirrors_directories_and_renders_each_paths_history(views, ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"f", b"one")
    write(ws, d, b"f", b"two")
    write(ws, ws.root, b"gone", b"x")
    ws.unlink(ws.root, b"gone", A)
    old, _ = ws.mkdir(ws.root, b"olddir", 0o755, A)
    write(ws, old, b"inner", b"x")
    ws.unlink(old, b"inner", A)
    ws.rmdir(ws.root, b"olddir", A)

    top = views.lookup(Root(), b"query")
    assert top == QueryDir(b"")
    listing = dict(views.listing(top))
    assert listing == {b"d": QueryDir(b"d"), b"gone": QueryFile(b"gone"), b"olddir": QueryDir(b"olddir")}
    assert views.listing(QueryDir(b"olddir")) == [(b"inner", QueryFile(b"olddir/inner"))]
    assert walk(views, b"query", b"d", b"f") == QueryFile(b"d/f")
    doc = json.loads(read_all(views, QueryFile(b"d/f")))
    assert doc["path"] == "d/f"
    assert [(v["version"], v["hash"]) for v in doc["versions"]] == [(1, hash_data(b"one").hex()),
                                                                     (2, hash_data(b"two").hex())]
    assert [v["event"] for v in json.loads(read_all(views, QueryFile(b"gone")))["versions"]] == ["write", "delete"]
    attrs = views.attrs(QueryFile(b"d/f"))
    assert stat.S_ISREG(attrs.mode) and attrs.size == 0          # rendered: size unknown before open
    assert QueryFile.rendered and not QueryFile.immutable
    with pytest.raises(NotFound):
        views.lookup(top, b"never-existed")
    with pytest.raises(NotFound):
        views.lookup(QueryDir(b"d"), b"never")
    with pytest.raises(NotADirectory):
        views.lookup(QueryFile(b"d/f"), b"x")


# -- versions/ --------------------------------------------------------------------------------------


def test_versions_list_numbers_and_read_exact_bytes(views, ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"f", b"one")
    write(ws, d, b"f", b"two!")
    ws.setattr(ws.resolve(b"d/f")[0], A, mode=0o600)       # no new content: no new number

    assert views.listing(VersionsDir(b"")) == [(b"d", VersionsDir(b"d"))]
    assert views.listing(VersionsDir(b"d")) == [(b"f", VersionsDir(b"d/f"))]
    assert views.listing(VersionsDir(b"d/f")) == [(b"1", VersionFile(b"d/f", 1)), (b"2", VersionFile(b"d/f", 2))]
    node = walk(views, b"versions", b"d", b"f", b"2")
    assert node == VersionFile(b"d/f", 2) and node.immutable and not node.rendered
    attrs = views.attrs(node)
    assert attrs.size == 4 and attrs.mode == stat.S_IFREG | 0o444
    assert read_all(views, VersionFile(b"d/f", 1)) == b"one"
    assert views.open(node).read(1, 2) == b"wo"
    for missing in (b"3", b"0", b"nothing"):
        with pytest.raises(NotFound):
            views.lookup(VersionsDir(b"d/f"), missing)
    with pytest.raises(NotFound):
        views.attrs(VersionFile(b"d/f", 3))
    with pytest.raises(NotADirectory):
        views.listing(node)


def test_file_versions_and_pick_version_serve_show_and_diff(views, ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    for n in range(10):
        write(ws, d, b"f", b"v%d" % n)
    versions = views.file_versions(b"d/f")
    assert sorted(versions) == list(range(1, 11))
    assert views.pick_version(versions, b"d/f", None)[0] == 10
    assert views.pick_version(versions, b"d/f", 3)[1] == versions[3]
    with pytest.raises(NotFound, match=r"no version 11 \(versions: 1, 2, 3, \.\.\., 8, 9, 10\)"):
        views.pick_version(versions, b"d/f", 11)
    with pytest.raises(IsADirectory):
        views.file_versions(b"")
    with pytest.raises(IsADirectory):
        views.file_versions(b"d")
    with pytest.raises(NotFound, match="never existed"):
        views.file_versions(b"never")
    ws.symlink(ws.root, b"link", b"d/f", A)
    with pytest.raises(NotFound, match="no file content"):
        views.file_versions(b"link")
    assert version_list([2, 1]) == "1, 2" and version_list([]) == "none"
    assert split_version("a@b@3") == ("a@b", 3)
    assert split_version("a@b") == ("a@b", None) and split_version("@3") == ("@3", None)


# -- at/ and snapshots/ ---------------------------------------------------------------------------------


def test_at_a_point_is_the_whole_tree_of_then(views, ws):
    write(ws, ws.root, b"a.txt", b"alpha")
    ino, _ = ws.symlink(ws.root, b"link", b"a.txt", A)
    ws.setxattr(ws.resolve(b"a.txt")[0], b"user.k", b"v", A)
    then = ws.head_seq
    write(ws, ws.root, b"a.txt", b"changed")
    write(ws, ws.root, b"later", b"x")

    at = views.lookup(Root(), b"at")
    assert views.listing(at) == []
    tree = views.lookup(at, str(then).encode())
    assert tree == TreeNode(then, ws.root) and views.is_dir(tree)
    assert names(views.listing(tree)) == [b"a.txt", b"link"]
    a = views.lookup(tree, b"a.txt")
    assert read_all(views, a) == b"alpha" and views.attrs(a).size == 5
    assert views.getxattr(a, b"user.k") == b"v" and views.xattrs(a) == ((b"user.k", b"v"),)
    with pytest.raises(NoAttribute):
        views.getxattr(a, b"user.none")
    assert views.readlink(views.lookup(tree, b"link")) == b"a.txt"
    with pytest.raises(InvalidArgument):
        views.readlink(a)
    with pytest.raises(InvalidArgument):
        views.open(views.lookup(tree, b"link"))
    with pytest.raises(IsADirectory):
        views.open(tree)
    with pytest.raises(NotADirectory):
        views.listing(a)
    with pytest.raises(NotFound):
        views.lookup(tree, b"later")
    assert views.listing(views.lookup(at, b"0")) == []
    # A time, and the names of nothing: a future seq, an unknown name, a malformed point.
    with ws.read_txn() as txn:
        when = ws.history.event(txn, then)["time"]
    assert views.lookup(at, when.encode()) == tree
    for nothing in (str(ws.head_seq + 1).encode(), b"no-such-point", b"turn:bot", b"2024-13-45T00:00:00Z"):
        with pytest.raises(NotFound):
            views.lookup(at, nothing)
    with pytest.raises(NotFound):
        views.attrs(TreeNode(then, 999999))


def test_snapshots_are_trees_at_their_seqs(views, ws):
    write(ws, ws.root, b"f", b"1")
    ws.snapshot("one")
    write(ws, ws.root, b"g", b"2")
    points.put_snapshot(ws, "two", ws.head_seq)
    snaps = views.lookup(Root(), b"snapshots")
    assert snaps == SnapshotsDir()
    assert views.listing(snaps) == [(b"one", TreeNode(2, ws.root)), (b"two", TreeNode(4, ws.root))]
    assert names(views.listing(views.lookup(snaps, b"one"))) == [b"f"]
    with pytest.raises(NotFound):
        views.lookup(snaps, b"three")


# -- files: log, stats, ctl; read-only ------------------------------------------------------------


def test_log_stats_and_what_cannot_be_opened(views, ws, store):
    write(ws, ws.root, b"f", b"hello")
    assert read_all(views, LogFile()) == log_text(ws)
    figures = json.loads(read_all(views, StatsFile()))
    assert (figures["workspace"], figures["head_seq"], figures["mountpoint"]) == ("w", ws.head_seq, "/mnt/w")
    assert figures["store"] == str(store.path.resolve()) and figures["events"] == ws.head_seq
    for node in (LogFile(), QueryFile(b"f"), VersionFile(b"f", 1), TreeNode(ws.head_seq, ws.resolve(b"f")[0])):
        with pytest.raises(ReadOnly):
            views.open(node, writable=True)
    for node in (Root(), QueryDir(b""), AtDir()):
        with pytest.raises(IsADirectory):
            views.open(node)
    with pytest.raises(InvalidArgument):
        views.open(CtlFile())


def test_a_log_handle_reads_the_events_up_to_its_open_however_it_seeks(views, ws, monkeypatch):
    monkeypatch.setattr(LogReader, "MARK_BYTES", 256)          # many marks in a small log
    for n in range(60):
        write(ws, ws.root, b"f%d" % n, b"x")
    whole = log_text(ws)
    handle = views.open(LogFile())
    write(ws, ws.root, b"after-open", b"x")                      # not in this handle
    assert handle.read(0, 10) == whole[:10]
    assert handle.read(10, len(whole)) == whole[10:]
    assert handle.read(len(whole), 100) == b""
    for off, size in [(0, 1), (5000, 333), (17, 4096), (len(whole) - 3, 10), (1000, 1), (999, 2), (0, 1 << 20)]:
        assert handle.read(off, size) == whole[off:off + size], (off, size)
    fresh = views.open(LogFile())
    assert fresh.read(3000, 50) == whole[3000:3050]             # a first read far from the start
    assert read_all(views, LogFile(), piece=77) == log_text(ws) != whole


def test_opening_a_40000_event_log_is_o1_and_reads_back_exactly_those_events(store, ws):
    # 40,000 log lines written as the journal writes them, in one transaction.
    with store.env.begin(write=True) as txn:
        for seq in range(1, 40001):
            EventWriter(txn, store.dbs, ws.id, seq, is_fork=False, turn=None, pid=A.pid,
                        history=ws.history).log("chmod", b"d", mode="0o755")
        txn.put(schema.ws_key(ws.id), schema.U64.pack(40000), db=store.dbs["heads"])
    ws = store.open_workspace("w")
    views = HistoryViews(ws)
    started = time.perf_counter()
    handle = views.open(LogFile())
    assert time.perf_counter() - started < 0.05          # O(1): microseconds (it was 209 ms rendering all)
    with store.env.begin(write=True) as txn:                    # an event after the open
        EventWriter(txn, store.dbs, ws.id, 40001, is_fork=False, turn=None, pid=A.pid,
                    history=ws.history).log("chmod", b"d", mode="0o700")
        txn.put(schema.ws_key(ws.id), schema.U64.pack(40001), db=store.dbs["heads"])
    pieces, off, slowest = [], 0, 0.0
    while True:
        started = time.perf_counter()
        data = handle.read(off, 128 * 1024)                     # the kernel's usual read size
        slowest = max(slowest, time.perf_counter() - started)
        if not data:
            break
        pieces.append(data)
        off += len(data)
    lines = b"".join(pieces).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 40001))
    assert slowest < 0.05, f"one read held the caller for {slowest * 1000:.1f} ms"


# -- errors: only a missing path is NotFound ----------------------------------------------------------


def test_a_corrupt_store_is_not_a_missing_file(views, ws, monkeypatch):
    write(ws, ws.root, b"f", b"x")

    def corrupt(*_args, **_kwargs):
        raise Corrupt("damaged path index")

    monkeypatch.setattr(ws.history, "followed", corrupt)
    for parent, name in [(QueryDir(b""), b"f"), (QueryDir(b""), b"never"), (VersionsDir(b""), b"never")]:
        with pytest.raises(Corrupt):
            views.lookup(parent, name)
    with pytest.raises(Corrupt):
        views.listing(QueryDir(b""))
    monkeypatch.undo()

    monkeypatch.setattr(points, "snapshot_seq", corrupt)
    for name in (b"some-snapshot", b"2024-01-01T00:00:00Z"):
        with pytest.raises(Corrupt):
            views.lookup(AtDir(), name)
    with pytest.raises(Corrupt):
        views.lookup(SnapshotsDir(), b"some-snapshot")
    monkeypatch.undo()

    monkeypatch.setattr(ws.store, "get_turn", lambda *_: 1 / 0)             # a bug
    with pytest.raises(ZeroDivisionError):
        views.lookup(AtDir(), b"turn:bot:1")
