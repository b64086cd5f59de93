"""The store without a mount: versions, history, past trees, forks, restores,
and crash recovery of the metadata.

These call the store's Python API as the FUSE adapter and the CLI do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import blake3
import pytest

from chronicle.errors import Busy, Exists, NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta.recovery import read_meta_pages
from chronicle.store.model import Actor
from chronicle.store.namespace.restore import restore_file, restore_tree
from chronicle.store.namespace.workspace import RENAME_EXCHANGE, RENAME_NOREPLACE
from chronicle.store.store import Store

A = Actor(uid=0, gid=0, pid=4242)


@pytest.fixture
def store(tmp_path):
    st = Store.init(tmp_path / "store")
    yield st
    st.close()


@pytest.fixture
def ws(store):
    return store.open_workspace("w", writable=True, create=True)


def write(ws, parent, name, data: bytes, *, exists_ok=True) -> int:
    """create (or open with O_TRUNC) + write + close, as ``open(..., "wb")`` does."""
    try:
        ino, _ = ws.create(parent, name, 0o100644, A)
        ws.open_file(ino, created=True)
    except Exists:
        if not exists_ok:
            raise
        ino, _ = ws.lookup(parent, name)
        ws.open_file(ino, truncate=True)
    ws.write_file(ino, 0, data, A.pid)
    ws.commit_file(ino)
    ws.release_file(ino)
    return ino


def history(ws, path: bytes) -> list[dict]:
    with ws.read_txn() as txn:
        return json.loads(ws.history.render_query(txn, path))["versions"]


def read(ws, path: bytes) -> bytes:
    ino, _ = ws.resolve(path)
    return ws.read_file(ino, 0, 1 << 30)


# -- versions ----------------------------------------------------------------------


def test_a_created_and_written_file_has_one_version(ws):
    write(ws, ws.root, b"notes.txt", b"hello\n")
    versions = history(ws, b"notes.txt")
    assert [(v["version"], v["event"], v["size"]) for v in versions] == [(1, "write", 6)]
    assert versions[0]["hash"] == blake3.blake3(b"hello\n").hexdigest()
    assert versions[0]["pid"] == A.pid and versions[0]["turn"] is None
    assert versions[0]["time"].endswith("Z")


def test_touch_is_a_create_version_and_identical_content_makes_none(ws):
    ino, _ = ws.create(ws.root, b"empty", 0o100644, A)
    ws.open_file(ino, created=True)
    ws.commit_file(ino)
    ws.release_file(ino)
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
    with ws.read_txn() as txn:
        lines = [json.loads(x) for x in ws.history.log_lines(txn)]
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


def test_restore_refuses_files_with_uncommitted_writes(ws):
    ino = write(ws, ws.root, b"f", b"v1")
    point = ws.head_seq
    write(ws, ws.root, b"f", b"v2")
    ws.open_file(ino)
    ws.write_file(ino, 0, b"dirty", 1)
    with pytest.raises(Busy):
        restore_tree(ws, point, A)
    ws.release_file(ino)


def test_rename_flags(ws):
    write(ws, ws.root, b"a", b"A")
    write(ws, ws.root, b"b", b"B")
    with pytest.raises(Exists):
        ws.rename(ws.root, b"a", ws.root, b"b", RENAME_NOREPLACE, A)
    ws.rename(ws.root, b"a", ws.root, b"b", RENAME_EXCHANGE, A)
    assert (read(ws, b"a"), read(ws, b"b")) == (b"B", b"A")
    assert history(ws, b"a")[-1]["from"] == "b"


# -- crash safety ----------------------------------------------------------------------------


CHILD = r"""
import sys
from chronicle.store.model import Actor
from chronicle.store.store import Store
st = Store.open(sys.argv[1])
ws = st.open_workspace("w", writable=True)
ino, _ = ws.create(ws.root, b"after-kill", 0o100644, Actor())
ws.open_file(ino, created=True); ws.write_file(ino, 0, b"closed before the kill", 1); ws.commit_file(ino)
import os; os._exit(0)          # like kill -9: no sync, no close
"""


def test_a_committed_version_survives_a_killed_process(tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    st.open_workspace("w", writable=True, create=True)
    st.close()
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True)
    with Store.open(path) as st:
        ws = st.open_workspace("w")
        assert read(ws, b"after-kill") == b"closed before the kill"
        assert fsck(st).clean


def test_after_a_machine_crash_the_metadata_rolls_back_to_the_last_sync(tmp_path, monkeypatch):
    """Simulate the worst a machine crash can leave: the newest meta page on
    disk, but not the tree pages it points to. The store must open at its
    last synced state, and fsck must find it clean."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"synced", b"made durable by sync")
    st.sync()
    st.close()
    disk = (path / "meta" / "data.mdb").read_bytes()      # what the disk holds after the sync
    synced_record = (path / "meta" / "synced.json").read_bytes()
    st = Store.open(path)
    ws = st.open_workspace("w", writable=True)
    for i in range(50):
        write(ws, ws.root, b"lost-%d" % i, os.urandom(2000))
    st.chunks.flush()
    st._dirty = False           # these commits never reach the disk: no sync at close
    st.close()
    live = path / "meta" / "data.mdb"
    page_size = st._page_size
    newest = max(read_meta_pages(live, page_size), key=lambda m: m.txnid)
    crashed = bytearray(disk)   # the disk: the synced pages, plus the newest meta page flushed early
    crashed[newest.slot * page_size:(newest.slot + 1) * page_size] = newest.raw
    live.write_bytes(bytes(crashed))
    (path / "meta" / "synced.json").write_bytes(synced_record)
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st:
        ws = st.open_workspace("w")
        assert read(ws, b"synced") == b"made durable by sync"
        with pytest.raises(NotFound):
            ws.resolve(b"lost-0")
        assert fsck(st).clean


def test_the_same_boot_never_rolls_back(tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    st.sync()
    write(ws, ws.root, b"unsynced", b"still here")
    shutil.copy(path / "meta" / "synced.json", tmp_path / "synced.json")
    st.chunks.flush()
    st._dirty = False           # leave without syncing, as a killed process would
    st.close()
    with Store.open(path) as st:
        assert read(st.open_workspace("w"), b"unsynced") == b"still here"


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
