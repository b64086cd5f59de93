"""The workspace without a mount: versions, history that follows renames,
past trees, forks, rename flags, turn labels, and the head caches
(``ws.links``, ``ws.files``) that its events keep.

These call the store's Python API as the FUSE adapter and the CLI do.
Restores are in ``test_restore.py``; crash recovery in
``tests/store/meta/test_recovery.py``.
"""

from __future__ import annotations

import pytest

from chronicle.store.chunks.tree import hash_data
from chronicle.errors import Exists, InvalidArgument, NotFound, ReadOnly
from chronicle.store.fsck.checks import fsck
from chronicle.store.namespace.workspace import RENAME_EXCHANGE, RENAME_NOREPLACE
from chronicle.store.store import Store
from storeutil import A, history, log_lines, read, write




# -- versions ----------------------------------------------------------------------


def test_a_created_and_written_file_has_one_version(ws):
    write(ws, ws.root, b"notes.txt", b"hello\n")
    versions = history(ws, b"notes.txt")
    assert [(v["version"], v["event"], v["size"]) for v in versions] == [(1, "write", 6)]
    assert versions[0]["hash"] == hash_data(b"hello\n").hex()
    assert versions[0]["pid"] == A.pid and versions[0]["turn"] is None
    assert versions[0]["time"].endswith("Z")


def test_touch_is_a_create_version_and_identical_content_makes_none(ws):
    ino, _ = ws.create(ws.root, b"empty", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.commit(ino)
    ws.files.release(ino)
    assert [v["event"] for v in history(ws, b"empty")] == ["create"]
    write(ws, ws.root, b"f", b"same")
    head = ws.head_seq
    write(ws, ws.root, b"f", b"same")          # O_TRUNC + the same bytes: no new version
    assert [v["version"] for v in history(ws, b"f") if v["event"] == "write"] == [1]
    assert ws.head_seq == head + 0 or all(v["seq"] <= head for v in history(ws, b"f"))


def test_every_event_gets_the_next_seq_and_the_log_lists_them_oldest_first(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"a", b"1")
    ws.rename(d, b"a", d, b"b", 0, A)
    ino, _ = ws.lookup(d, b"b")
    ws.setattr(ino, A, mode=0o600)
    ws.setxattr(ino, b"user.k", b"v", A)
    ws.unlink(d, b"b", A)
    lines = log_lines(ws)
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert [x["event"] for x in lines] == ["mkdir", "create", "write", "rename", "chmod", "setxattr", "delete"]
    assert lines[3]["path"] == "d/b" and lines[3]["from"] == "d/a"


# -- history follows renames ------------------------------------------------------------


def test_editor_atomic_save_is_a_new_version_of_the_same_path(ws):
    write(ws, ws.root, b"notes.txt", b"v1")
    write(ws, ws.root, b".notes.txt.swp", b"v2")
    ws.rename(ws.root, b".notes.txt.swp", ws.root, b"notes.txt", 0, A)
    versions = history(ws, b"notes.txt")
    assert [(v["version"], v["event"]) for v in versions] == [(1, "write"), (2, "rename")]
    assert versions[1]["from"] == ".notes.txt.swp"
    assert read(ws, b"notes.txt") == b"v2"


def test_history_follows_a_file_moved_to_a_new_name_and_a_renamed_directory(ws):
    write(ws, ws.root, b"a.txt", b"one")
    write(ws, ws.root, b"a.txt", b"two")
    d, _ = ws.mkdir(ws.root, b"src", 0o755, A)
    ws.rename(ws.root, b"a.txt", d, b"b.txt", 0, A)
    ws.rename(ws.root, b"src", ws.root, b"lib", 0, A)
    write(ws, ws.resolve(b"lib")[0], b"b.txt", b"three")
    versions = history(ws, b"lib/b.txt")
    assert [v["version"] for v in versions if v["event"] == "write"] == [1, 2, 3]
    assert [v["path"] for v in versions] == ["a.txt", "a.txt", "src/b.txt", "lib/b.txt"]
    with ws.read_txn() as txn:
        versions_by_number = ws.history.content_versions(txn, b"lib/b.txt")
    assert sorted(versions_by_number) == [1, 2, 3]


def test_a_deleted_path_keeps_its_history_and_a_path_that_never_existed_has_none(ws):
    write(ws, ws.root, b"gone", b"data")
    ws.unlink(ws.root, b"gone", A)
    assert [v["event"] for v in history(ws, b"gone")] == ["write", "delete"]
    with pytest.raises(NotFound), ws.read_txn() as txn:
        ws.history.render_query(txn, b"never")


# -- past trees, forks, restores -------------------------------------------------------


def test_the_tree_at_any_seq_is_exact(ws):
    write(ws, ws.root, b"f", b"first")
    seq1 = ws.head_seq
    write(ws, ws.root, b"f", b"second")
    write(ws, ws.root, b"g", b"other")
    with ws.read_txn() as txn:
        then = ws.view(seq1)
        assert [name for name, _, _ in then.entries(txn, ws.root)] == [b"f"]
        ino = then.lookup(txn, ws.root, b"f")[0]
        attrs = then.attrs(txn, ino)
    assert ws.store.content_map(attrs.content).read(0, 100) == b"first"


def test_a_fork_is_a_copy_on_write_view_at_the_fork_seq(store, ws):
    write(ws, ws.root, b"f", b"base")
    store.fork("w", ws.head_seq, "w2")
    write(ws, ws.root, b"f", b"parent after fork")
    fork = store.open_workspace("w2", writable=True)
    assert read(fork, b"f") == b"base"
    write(fork, fork.root, b"f", b"fork change")
    fork.unlink(fork.root, b"f", A)
    write(fork, fork.root, b"new", b"only in the fork")
    assert read(ws, b"f") == b"parent after fork"
    assert [n for n, _, _ in ws.readdir(ws.root)] == [b"f"]
    assert [n for n, _, _ in fork.readdir(fork.root)] == [b"new"]
    assert [v["event"] for v in history(fork, b"f")] == ["write", "write", "delete"]
    assert fsck(store).clean


def test_rename_flags(ws):
    write(ws, ws.root, b"a", b"A")
    write(ws, ws.root, b"b", b"B")
    with pytest.raises(Exists):
        ws.rename(ws.root, b"a", ws.root, b"b", RENAME_NOREPLACE, A)
    ws.rename(ws.root, b"a", ws.root, b"b", RENAME_EXCHANGE, A)
    assert (read(ws, b"a"), read(ws, b"b")) == (b"B", b"A")
    assert history(ws, b"a")[-1]["from"] == "b"


# -- the store handle and turn labels ---------------------------------------------------


def test_opening_a_store_twice_in_one_process_shares_it(tmp_path):
    """LMDB allows one environment per file per process: a second open
    returns the same store, and only the last close closes it."""
    first = Store.init(tmp_path / "store")
    second = Store.open(tmp_path / "store")
    assert second is first
    second.close()
    assert first.open_workspace("w", writable=True, create=True).name == "w"   # still usable
    first.close()
    with pytest.raises(Exception):
        first.env.info()                # really closed now


# -- the head caches follow the events ----------------------------------------------------------


def test_events_name_the_path_an_inode_was_last_reached_by(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    f = write(ws, d, b"f", b"x")
    assert ws.links.path_of(f) == b"d/f" and ws.links.parent(f) == d
    ws.link(f, ws.root, b"hard", A)
    assert ws.links.path_of(f) == b"hard"                # the newest name
    ws.unlink(ws.root, b"hard", A)
    assert ws.links.path_of(f) == b"d/f"                 # falls back to the name that remains
    ws.rename(ws.root, b"d", ws.root, b"e", 0, A)
    assert ws.links.path_of(f) == b"e/f"
    ws.setattr(f, A, mode=0o600)
    assert log_lines(ws)[-1]["path"] == "e/f"


def test_rename_exchange_and_replace_move_both_links(ws):
    a = write(ws, ws.root, b"a", b"A")
    b = write(ws, ws.root, b"b", b"B")
    ws.rename(ws.root, b"a", ws.root, b"b", RENAME_EXCHANGE, A)
    assert (ws.links.path_of(a), ws.links.path_of(b)) == (b"b", b"a")
    assert ws.rename(ws.root, b"b", ws.root, b"a", 0, A) == b        # replaces b (now at "a")
    assert ws.links.path_of(a) == b"a" and ws.links.path_of(b) is None
    assert ws.head_attrs(b).nlink == 0


def test_an_aborted_event_leaves_the_caches_as_they_were(ws):
    f = write(ws, ws.root, b"f", b"x")
    before = ws.head_attrs(f)
    with pytest.raises(RuntimeError):
        with ws.event(A) as w:
            w.put_attrs(f, before.replace(mode=0o100600))
            w.del_dirent(ws.root, b"f")
            w.log("chmod", b"f")
            raise RuntimeError("abort")
    assert ws.head_attrs(f) == before and ws.links.path_of(f) == b"f"
    assert ws.lookup(ws.root, b"f")[0] == f


def test_open_files_is_a_mapping_of_the_open_inodes(ws):
    f = write(ws, ws.root, b"f", b"committed")
    state = ws.files.open(f)
    assert list(ws.files) == [f] and ws.files[f] is state and len(ws.files) == 1
    ws.files.write(f, 0, b"UNCOMMITTED", 1)
    assert ws.files.is_dirty(f) and ws.files.dirty() == [f]
    assert ws.getattr(f).size == len(b"UNCOMMITTED") and ws.head_attrs(f).size == len(b"committed")
    seq = ws.files.commit(f)
    assert seq == ws.head_seq and not ws.files.is_dirty(f)
    ws.files.release(f)
    assert f not in ws.files
    with pytest.raises(NotFound):
        ws.files.write(f, 0, b"not open", 1)


def test_mutation_errors_are_those_of_ext4(ws, store):
    write(ws, ws.root, b"f", b"x")
    with pytest.raises(Exists):
        ws.mkdir(ws.root, b"f", 0o755, A)
    with pytest.raises(InvalidArgument):
        ws.mkdir(ws.root, b"a/b", 0o755, A)
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    with pytest.raises(InvalidArgument):                 # a directory into itself
        ws.rename(ws.root, b"d", d, b"inside", 0, A)
    reader = store.open_workspace("w")
    with pytest.raises(ReadOnly):
        reader.mkdir(reader.root, b"x", 0o755, A)
