"""A mount of a store whose metadata has a damaged page (issue 7 §4): EIO
only for the paths whose records are damaged.

A directory of 200 files spans two leaf pages of ``dirents`` (and of
``dirent_hist``); one page is zeroed (a lost write), as the pages that
hold a given name are found in ``data.mdb`` by their bytes. The metadata
backup the daemon takes at unmount is checked here too.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from storeutil import A, write

from chronicle.store import model
from chronicle.store.meta import backup, schema
from chronicle.store.meta.pages import PageWalk
from chronicle.store.store import Store
from mounts import DEFAULT_WORKSPACE

PAGE = os.sysconf("SC_PAGE_SIZE")
NAMES = [f"n{i:03d}".encode() for i in range(200)]
DAMAGED_NAME = b"n150"


def build(path: Path) -> tuple[int, int, dict[bytes, int]]:
    """The store: ``d/`` with :data:`NAMES`, each written twice. Returns
    ``(ws id, inode of d, {name: inode})``."""
    st = Store.init(path)
    ws = st.open_workspace(DEFAULT_WORKSPACE, writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    inos = {}
    for name in NAMES:
        inos[name] = write(ws, d, name, b"first " + name)
        write(ws, d, name, b"content of " + name)
    write(ws, ws.root, b"top", b"top\n")
    ws_id = ws.id
    st.sync()
    (path / "compact").mkdir()
    st.env.copy(str(path / "compact"), compact=True)          # every page in use: each record once in the file
    st.close()
    os.replace(path / "compact" / "data.mdb", path / "meta" / "data.mdb")
    (path / "compact").rmdir()
    for name in ("synced.rec", "synced.json"):      # (the close may have compacted them away)
        (path / "meta" / name).unlink(missing_ok=True)
    return ws_id, d, inos


def pages_with(data_file: Path, needle: bytes) -> list[int]:
    data = data_file.read_bytes()
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at // PAGE)
        at = data.find(needle, at + 1)
    return sorted(set(out))


def zero_pages(data_file: Path, pages: list[int]) -> None:
    with open(data_file, "r+b") as f:
        for page in pages:
            assert page >= 2
            f.seek(page * PAGE)
            f.write(bytes(PAGE))


def dirents_page(data_file: Path, ws_id: int, d: int, name: bytes, ino: int) -> int:
    (page,) = pages_with(data_file, schema.dirent_key(ws_id, d, name) + schema.encode_dirent(ino, model.KIND_FILE))
    return page


def hist_pages(data_file: Path, ws_id: int, d: int, name: bytes) -> list[int]:
    return pages_with(data_file, schema.dirent_hist_prefix(ws_id, d, name) + b"\xff\xff\xff\xff")


def test_a_damaged_dirents_page_lists_every_name_from_the_history(mount_factory, daemon_log, tmp_path):
    daemon_log.expect(r"damaged")
    store = tmp_path / "store"
    ws_id, d, inos = build(store)
    data_file = store / "meta" / "data.mdb"
    zero_pages(data_file, [dirents_page(data_file, ws_id, d, DAMAGED_NAME, inos[DAMAGED_NAME])])
    m = mount_factory(store=store)
    assert {"d", "top"} <= set(os.listdir(m.path))
    assert sorted(os.listdir(m.path / "d")) == sorted(n.decode() for n in NAMES)
    for name in NAMES:
        assert (m.path / "d" / name.decode()).read_bytes() == b"content of " + name
    with open(m.path / "d" / "new", "wb") as f:             # the directory still takes new files
        f.write(b"new\n")
    assert (m.path / "d" / "new").read_bytes() == b"new\n"


def test_names_damaged_in_both_tables_answer_eio_alone(mount_factory, daemon_log, tmp_path):
    daemon_log.expect(r"damaged")
    store = tmp_path / "store"
    ws_id, d, inos = build(store)
    data_file = store / "meta" / "data.mdb"
    pages = [dirents_page(data_file, ws_id, d, DAMAGED_NAME, inos[DAMAGED_NAME]),
             *hist_pages(data_file, ws_id, d, DAMAGED_NAME)]
    zero_pages(data_file, pages)
    with PageWalk(data_file) as walk:          # what is still readable anywhere
        prefix = schema.dir_prefix(ws_id, d)
        readable = {key[12:] for key, _ in walk.items("dirents", prefix, prefix + b"\xff")}
        readable |= {schema.split_dirent_hist_key(key)[0] for key, _ in walk.items("dirent_hist", prefix, prefix + b"\xff")}
    lost = set(NAMES) - readable
    assert DAMAGED_NAME in lost and len(lost) < len(NAMES)
    m = mount_factory(store=store)
    assert sorted(os.listdir(m.path / "d")) == sorted(n.decode() for n in readable)
    for name in sorted(readable):
        assert (m.path / "d" / name.decode()).read_bytes() == b"content of " + name
    with pytest.raises(OSError) as err:
        os.stat(m.path / "d" / DAMAGED_NAME.decode())
    assert err.value.errno == errno.EIO
    assert (m.path / "top").read_bytes() == b"top\n"          # the rest of the tree is untouched


def test_the_daemon_backs_up_the_metadata_at_unmount(mount_factory, monkeypatch):
    monkeypatch.setenv("CHRONICLE_BACKUP_INTERVAL", "1")
    m = mount_factory()
    deadline = 50
    while not backup.generations(m.store) and deadline:     # the periodic backup, while mounted
        (m.path / "a").write_bytes(f"{deadline}\n".encode())
        deadline -= 1
        time.sleep(0.2)
    assert backup.generations(m.store), "no backup while mounted"
    (m.path / "b").write_bytes(b"two\n")
    m.stop()
    newest = backup.generations(m.store)[0]
    assert newest.heads[DEFAULT_WORKSPACE] >= 3
    with Store.open(m.store) as st:
        assert newest.heads[DEFAULT_WORKSPACE] == st.open_workspace(DEFAULT_WORKSPACE).head_seq
