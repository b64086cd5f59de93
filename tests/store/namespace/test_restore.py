"""``chronicle.store.namespace.restore`` through the store API only: a file's
version or the whole tree at a seq comes back as new events, and history
before them is kept as it was."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import chronicle.store.namespace as namespace

from chronicle.errors import Busy, IsADirectory, NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.namespace.restore import restore_file, restore_tree
from storeutil import A, history, log_lines, read, write




# -- one file --------------------------------------------------------------------------


def test_a_file_version_comes_back_as_a_new_version(ws, store):
    write(ws, ws.root, b"f", b"v1")
    write(ws, ws.root, b"f", b"v2")
    before = history(ws, b"f")
    changes = restore_file(ws, b"f", 1, A)
    assert changes.seq == ws.head_seq and changes.paths == 1
    assert read(ws, b"f") == b"v1"
    after = history(ws, b"f")
    assert after[:-1] == before                                   # history kept as it was
    assert (after[-1]["event"], after[-1]["version"], after[-1]["restored"]) == ("restore", 3, 1)
    assert after[-1]["hash"] == before[0]["hash"]                  # the same content record, not a copy
    assert log_lines(ws)[-1]["event"] == "restore"
    assert fsck(store).clean


def test_a_deleted_file_is_created_again_in_its_directory(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"gone", b"data")
    ws.unlink(d, b"gone", A)
    changes = restore_file(ws, b"d/gone", 1, A)
    assert read(ws, b"d/gone") == b"data"
    assert (d, b"gone") in changes.entries and d in changes.inodes
    assert [v["event"] for v in history(ws, b"d/gone")] == ["write", "delete", "restore"]
    ino, _ = ws.resolve(b"d/gone")
    write(ws, d, b"gone", b"later")                                # the path links follow the restore
    assert history(ws, b"d/gone")[-1]["path"] == "d/gone" and ws.links.path_of(ino) == b"d/gone"


def test_restoring_the_content_a_file_has_is_no_event(ws):
    write(ws, ws.root, b"f", b"same")
    head = ws.head_seq
    changes = restore_file(ws, b"f", 1, A)
    assert changes.seq is None and ws.head_seq == head


def test_restore_file_errors(ws):
    write(ws, ws.root, b"f", b"v1")
    with pytest.raises(NotFound, match=r"versions: 1"):
        restore_file(ws, b"f", 7, A)
    ws.unlink(ws.root, b"f", A)
    ws.mkdir(ws.root, b"f", 0o755, A)
    with pytest.raises(IsADirectory):
        restore_file(ws, b"f", 1, A)


# -- the whole tree --------------------------------------------------------------------------


def test_restore_of_a_file_version_and_of_a_whole_tree_are_new_events(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"f", b"v1")
    f = ws.lookup(d, b"f")[0]
    ws.link(f, ws.root, b"hard", A)
    point = ws.head_seq
    write(ws, d, b"f", b"v2")
    ws.rename(ws.root, b"d", ws.root, b"moved", 0, A)
    write(ws, ws.root, b"added", b"x")
    restore_file(ws, b"moved/f", 1, A)
    assert read(ws, b"moved/f") == b"v1" and history(ws, b"moved/f")[-1]["event"] == "restore"
    before = ws.head_seq
    changes = restore_tree(ws, point, A)
    assert changes.seq == before + 1 == ws.head_seq          # one event
    assert sorted(n for n, _, _ in ws.readdir(ws.root)) == [b"d", b"hard"]
    assert read(ws, b"d/f") == b"v1"
    f_ino, _ = ws.resolve(b"d/f")
    assert ws.resolve(b"hard")[0] == f_ino and ws.head_attrs(f_ino).nlink == 2   # the hard link came back
    with ws.read_txn() as txn:
        assert ws.view(point - 1).lookup(txn, ws.root, b"hard") is None         # history untouched


def test_a_tree_restore_is_one_logged_event_and_the_past_is_kept(ws, store):
    write(ws, ws.root, b"keep", b"k1")
    write(ws, ws.root, b"old", b"removed later")
    ws.setattr(ws.resolve(b"keep")[0], A, mode=0o600)
    point = ws.head_seq
    write(ws, ws.root, b"keep", b"k2")
    ws.setattr(ws.resolve(b"keep")[0], A, mode=0o644)
    ws.unlink(ws.root, b"old", A)
    write(ws, ws.root, b"new", b"added later")
    head = ws.head_seq
    with ws.read_txn() as txn:
        head_names = [n for n, _, _ in ws.view(head).entries(txn, ws.root)]
    changes = restore_tree(ws, point, A)
    line = log_lines(ws)[-1]
    assert (line["seq"], line["event"], line["at"], line["paths"]) == (head + 1, "restore", point, changes.paths)
    assert sorted(n for n, _, _ in ws.readdir(ws.root)) == [b"keep", b"old"]
    assert read(ws, b"keep") == b"k1" and read(ws, b"old") == b"removed later"
    assert ws.head_attrs(ws.resolve(b"keep")[0]).mode & 0o777 == 0o600
    assert [v["event"] for v in history(ws, b"new")] == ["write", "restore"]      # gone, history kept
    with ws.read_txn() as txn:                                                    # the tree at head is as it was
        assert [n for n, _, _ in ws.view(head).entries(txn, ws.root)] == head_names
    assert fsck(store).clean


def test_a_tree_restore_with_nothing_to_change_is_no_event(ws):
    write(ws, ws.root, b"f", b"x")
    head = ws.head_seq
    assert restore_tree(ws, head, A).seq is None and ws.head_seq == head
    with pytest.raises(NotFound):
        restore_tree(ws, head + 1, A)


def test_a_fork_restores_to_a_seq_before_it_forked(store, ws):
    write(ws, ws.root, b"f", b"base")
    point = ws.head_seq
    write(ws, ws.root, b"g", b"before the fork")
    store.fork("w", None, "w2")
    fork = store.open_workspace("w2", writable=True)
    write(fork, fork.root, b"f", b"fork change")
    restore_tree(fork, point, A)
    assert [n for n, _, _ in fork.readdir(fork.root)] == [b"f"] and read(fork, b"f") == b"base"
    assert sorted(n for n, _, _ in ws.readdir(ws.root)) == [b"f", b"g"]         # the parent is untouched
    assert fsck(store).clean


def test_restore_refuses_files_with_uncommitted_writes(ws):
    ino = write(ws, ws.root, b"f", b"v1")
    point = ws.head_seq
    write(ws, ws.root, b"f", b"v2")
    ws.files.open(ino)
    ws.files.write(ino, 0, b"dirty", 1)
    with pytest.raises(Busy):
        restore_tree(ws, point, A)
    with pytest.raises(Busy):
        restore_file(ws, b"f", 1, A)
    ws.files.release(ino)


def test_an_open_clean_file_reads_the_restored_content(ws):
    ino = write(ws, ws.root, b"f", b"version one")
    write(ws, ws.root, b"f", b"version two")
    ws.files.open(ino)
    assert ws.files.read(ino, 0, 100) == b"version two"
    restore_file(ws, b"f", 1, A)
    assert ws.files.read(ino, 0, 100) == b"version one"
    ws.files.release(ino)


def test_restore_and_open_files_use_only_the_public_api_of_the_workspace():
    """No ``ws._private`` (nor ``self._ws._private``) access: the workspace's
    caches are changed only through ``ws.event`` and its collaborators."""
    for module in ("restore.py", "files.py"):
        tree = ast.parse((Path(namespace.__file__).parent / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                is_ws = (isinstance(owner, ast.Name) and owner.id == "ws") or \
                    (isinstance(owner, ast.Attribute) and owner.attr == "_ws")
                assert not is_ws, f"{module}:{node.lineno} touches the workspace's {node.attr}"
