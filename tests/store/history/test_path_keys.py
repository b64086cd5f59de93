"""Long paths in the path index, no mount (issue 7 §1): LMDB keys hold at
most 511 bytes, so a path longer than ``schema.PATH_KEY_MAX`` is keyed by a
prefix of it and its BLAKE3 digest. Every name up to 255 bytes and every
path up to (and past) PATH_MAX must create, write, rename and keep its
history; the prefix scans (children of a directory in ``query/``, forgetting
cached version numbers below a moved directory) must see long paths too."""

from __future__ import annotations

from chronicle.store.meta import schema
from chronicle.store.namespace.restore import restore_file
from storeutil import A, history, read, write

NAME = 255


def deep_dir(ws, total: int, letter: bytes = b"d") -> tuple[int, bytes]:
    """mkdir a chain of 255-byte names until the path is at least ``total``
    bytes; returns ``(inode, path)``."""
    ino, path = ws.root, b""
    i = 0
    while len(path) < total:
        name = bytes([letter[0]]) * (NAME - 3) + b"%03d" % i
        ino, _ = ws.mkdir(ino, name, 0o755, A)
        path = path + b"/" + name if path else name
        i += 1
    return ino, path


def test_a_file_under_a_path_of_4000_bytes_is_created_written_and_kept(ws):
    d, dpath = deep_dir(ws, 4000)
    write(ws, d, b"f" * NAME, b"one")
    write(ws, d, b"f" * NAME, b"two")
    path = dpath + b"/" + b"f" * NAME
    assert len(path) > 4096 and len(schema.path_key(ws.id, path, 1)) <= 511
    assert read(ws, path) == b"two"
    assert [v["version"] for v in history(ws, path)] == [1, 2]
    with ws.read_txn() as txn:
        versions = ws.history.content_versions(txn, path)
        assert sorted(versions) == [1, 2]
        parent_children = ws.history.children_with_history(txn, dpath)
        assert parent_children == {b"f" * NAME}


def test_paths_just_below_and_above_the_key_threshold_stay_apart(ws):
    limit = schema.PATH_KEY_MAX
    d, dpath = deep_dir(ws, limit - 300)
    base = len(dpath) + 1
    short = b"s" * (limit - base)            # the whole path is exactly the threshold: a plain key
    long_ = short + b"x"                     # one byte more: a digest key whose prefix is ``short``
    write(ws, d, short, b"short")
    write(ws, d, long_, b"long")
    write(ws, d, long_ + b"y", b"longer")
    for name, data in ((short, b"short"), (long_, b"long"), (long_ + b"y", b"longer")):
        assert [v["version"] for v in history(ws, dpath + b"/" + name)] == [1]
        assert read(ws, dpath + b"/" + name) == data
    with ws.read_txn() as txn:
        assert ws.history.children_with_history(txn, dpath) == {short, long_, long_ + b"y"}


def test_moving_a_directory_so_its_files_paths_get_long_keeps_their_history(ws):
    """The issue's reproduction: ``mv p P...; echo two >> P.../a/b/f`` lost the write."""
    p, _ = ws.mkdir(ws.root, b"p", 0o755, A)
    a, _ = ws.mkdir(p, b"a" * 200, 0o755, A)
    b, _ = ws.mkdir(a, b"b" * 200, 0o755, A)
    write(ws, b, b"f", b"one\n")
    big = b"P" * 100
    ws.rename(ws.root, b"p", ws.root, big, 0, A)
    path = big + b"/" + b"a" * 200 + b"/" + b"b" * 200 + b"/f"
    assert len(path) >= 499
    write(ws, b, b"f", b"one\ntwo\n")
    assert read(ws, path) == b"one\ntwo\n"
    assert [(v["version"], v["event"]) for v in history(ws, path)] == [(1, "write"), (2, "write")]
    with ws.read_txn() as txn:
        assert ws.history.children_with_history(txn, big + b"/" + b"a" * 200 + b"/" + b"b" * 200) == {b"f"}


def test_a_long_directory_moved_over_keeps_numbering_below_it(ws):
    """forget_heads_below must drop cached numbers of long paths below a directory, whatever its length."""
    d, dpath = deep_dir(ws, 600)
    write(ws, d, b"x", b"1")
    write(ws, d, b"x", b"2")
    # Move the deep directory away and back: x's followed history changes, its cached number must not lie.
    parent_path, _, name = dpath.rpartition(b"/")
    parent, _ = ws.resolve(parent_path)
    ws.rename(parent, name, parent, b"moved", 0, A)
    ws.rename(parent, b"moved", parent, name, 0, A)
    write(ws, d, b"x", b"3")
    assert [v["version"] for v in history(ws, dpath + b"/x") if v["event"] == "write"] == [1, 2, 3]


def test_restore_of_a_long_path_version(ws):
    d, dpath = deep_dir(ws, 800)
    write(ws, d, b"f", b"one")
    write(ws, d, b"f", b"two")
    restore_file(ws, dpath + b"/f", 1, A)
    assert read(ws, dpath + b"/f") == b"one"
    assert [v["version"] for v in history(ws, dpath + b"/f")] == [1, 2, 3]


def test_a_path_entry_that_cannot_be_written_aborts_the_whole_commit(ws, monkeypatch):
    """Never success with a lost version: the close fails and nothing of the event is recorded."""
    import lmdb
    from chronicle.store.meta.journal import EventWriter

    ino = write(ws, ws.root, b"f", b"one")
    head, before = ws.head_seq, ws.head_attrs(ino).content

    def fail(self, *args, **kwargs):
        raise lmdb.BadValsizeError("mdb_put: MDB_BAD_VALSIZE")

    monkeypatch.setattr(EventWriter, "path_entry", fail)
    ws.files.open(ino, truncate=True)
    ws.files.write(ino, 0, b"two", A.pid)
    try:
        ws.files.commit(ino)
    except lmdb.Error:
        pass
    else:
        raise AssertionError("the commit succeeded without its path entry")
    assert ws.head_seq == head and ws.head_attrs(ino).content == before
    with ws.read_txn() as txn:
        assert ws.view().attrs(txn, ino).content == before
    monkeypatch.undo()
    ws.files.commit(ino)                      # the writes are still there: a retry records them
    ws.files.release(ino)
    assert read(ws, b"f") == b"two" and [v["version"] for v in history(ws, b"f")] == [1, 2]
