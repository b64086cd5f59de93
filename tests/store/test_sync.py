"""``Store.sync`` lets commits go on while the disk flushes, and what it
records is still a state a machine crash can roll back to.

The crash is simulated as in ``tests/store/meta/test_recovery.py``: a later
boot (``CHRONICLE_BOOT_ID``) and meta pages on disk newer than the synced one.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chronicle.errors import NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta.recovery import SYNCED_FILE, SYNCED_RECORD, _decode_slot, read_meta_pages, read_synced
from chronicle.store.store import Store
from storeutil import read, write


def test_commits_go_on_while_a_sync_flushes_and_a_crash_rolls_back_to_the_sync(tmp_path, monkeypatch):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"before", b"committed before the sync began")
    flushing, go_on = threading.Event(), threading.Event()
    packs_sync = st.chunks.sync

    def slow_packs_sync() -> None:
        flushing.set()
        assert go_on.wait(30), "the commits during the sync did not finish"
        packs_sync()

    monkeypatch.setattr(st.chunks, "sync", slow_packs_sync)
    syncer = threading.Thread(target=st.sync)
    syncer.start()
    assert flushing.wait(30)
    # The sync is flushing: commits must not wait for it (it does not hold the LMDB writer lock).
    # Several of them, so the synced txnid's meta page slot is overwritten meanwhile.
    for i in range(5):
        write(ws, ws.root, b"during-%d" % i, b"committed while the disk flushed")
    go_on.set()
    syncer.join(30)
    assert not syncer.is_alive()
    monkeypatch.setattr(st.chunks, "sync", packs_sync)
    st.chunks.flush()
    st._dirty = False               # leave as a crash would: nothing after that sync is synced
    st.close()

    live = path / "meta" / "data.mdb"
    assert max(m.txnid for m in read_meta_pages(live, st._page_size)) > read_synced(path / "meta").txnid
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st2:
        ws2 = st2.open_workspace("w")
        assert read(ws2, b"before") == b"committed before the sync began"
        with pytest.raises(NotFound):
            ws2.resolve(b"during-4")       # not promised by that sync: rolled back
        assert fsck(st2).clean


def test_syncs_from_several_threads_all_record_what_came_before_them(tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    for i in range(3):
        write(ws, ws.root, b"f%d" % i, b"x" * 100)
    threads = [threading.Thread(target=st.sync) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not st.dirty
    st.close()
    with Store.open(path) as st2:
        assert read(st2.open_workspace("w"), b"f2") == b"x" * 100
        assert fsck(st2).clean


# -- the sync record: two slots rewritten in place ---------------------------------------------


def _store_synced_twice(path):
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"one", b"first sync")
    st.sync()
    first = read_synced(path / "meta")
    write(ws, ws.root, b"two", b"second sync")
    st.sync()
    st.close()
    return first


def test_each_sync_overwrites_the_older_slot(tmp_path):
    path = tmp_path / "store"
    first = _store_synced_twice(path)
    raw = (path / "meta" / SYNCED_RECORD).read_bytes()
    half = len(raw) // 2
    txnids = sorted(r.txnid for r in (_decode_slot(raw[:half]), _decode_slot(raw[half:])) if r is not None)
    newest = read_synced(path / "meta")
    assert len(txnids) == 2 and txnids[-1] == newest.txnid and txnids[0] >= first.txnid
    assert not (path / "meta" / SYNCED_FILE).exists()


def test_a_slot_torn_by_a_crash_falls_back_to_the_other_sync(tmp_path, monkeypatch):
    """A crash while the newest record was written: its slot fails its CRC,
    and recovery rolls back to the sync before it, which is intact."""
    path = tmp_path / "store"
    _store_synced_twice(path)
    meta = path / "meta"
    newest = read_synced(meta)
    raw = bytearray((meta / SYNCED_RECORD).read_bytes())
    half = len(raw) // 2
    torn = 0 if _decode_slot(bytes(raw[:half])).txnid == newest.txnid else 1
    raw[torn * half + 100:torn * half + 200] = b"\xff" * 100
    (meta / SYNCED_RECORD).write_bytes(bytes(raw))
    assert read_synced(meta).txnid < newest.txnid
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st:
        ws = st.open_workspace("w")
        assert read(ws, b"one") == b"first sync"
        with pytest.raises(NotFound):
            ws.resolve(b"two")                     # its record was torn: that sync never finished
        assert fsck(st).clean


def test_a_store_synced_by_an_older_version_is_still_recovered(tmp_path, monkeypatch):
    """Stores written before the slotted record have ``synced.json``; recovery reads it,
    and the next sync replaces it."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"kept", b"synced by an older version")
    st.sync()
    record = read_synced(path / "meta")
    st.close()
    (path / "meta" / SYNCED_RECORD).unlink()
    (path / "meta" / SYNCED_FILE).write_text(json.dumps({    # what the older version wrote
        "txnid": record.txnid, "boot_id": record.boot_id, "page_size": record.page_size,
        "meta_page": base64.b64encode(record.meta_page).decode()}))
    st = Store.open(path)
    ws = st.open_workspace("w", writable=True)
    write(ws, ws.root, b"lost", b"never synced")
    st.chunks.flush()
    st._dirty = False
    st.close()
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st:
        ws = st.open_workspace("w", writable=True)
        assert read(ws, b"kept") == b"synced by an older version"
        with pytest.raises(NotFound):
            ws.resolve(b"lost")
        st.sync()
    assert (path / "meta" / SYNCED_RECORD).exists() and not (path / "meta" / SYNCED_FILE).exists()


# -- a sync with nothing new, and the sync record's kept descriptors --------------------------


def _count_fdatasyncs(monkeypatch) -> list[int]:
    """Count ``os.fdatasync``/``os.fsync`` calls from here on (the flushes of a sync)."""
    calls: list[int] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_sync_with_nothing_committed_since_flushes_nothing_and_a_later_one_is_recovered(tmp_path, monkeypatch):
    """An fsync of an unchanged file costs no disk flush: the last sync already made the store
    what this one would; the next commit is synced (and recovered after a crash) as before."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"first", b"synced once")
    st.sync()
    record = (path / "meta" / SYNCED_RECORD).read_bytes()
    calls = _count_fdatasyncs(monkeypatch)
    st.sync()
    st.sync()
    assert calls == []
    assert (path / "meta" / SYNCED_RECORD).read_bytes() == record
    write(ws, ws.root, b"second", b"synced after the idle syncs")
    st.sync()
    assert len(calls) >= 2                      # the pack and synced.rec (LMDB flushes data.mdb in C)
    assert (path / "meta" / SYNCED_RECORD).read_bytes() != record
    monkeypatch.undo()
    write(ws, ws.root, b"third", b"never synced")
    st.chunks.flush()
    st._dirty = False                           # leave as a crash would
    st.close()
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st2:
        ws2 = st2.open_workspace("w")
        assert read(ws2, b"second") == b"synced after the idle syncs"
        with pytest.raises(NotFound):
            ws2.resolve(b"third")
        assert fsck(st2).clean


def test_a_sync_after_another_process_committed_flushes_again(tmp_path):
    """The txnid that says "nothing new" is the store's, not this process's: a commit by
    another process since our last sync makes our next sync record it."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"ours", b"x")
    st.sync()
    st.release_workspace(ws)
    script = (
        "import sys\n"
        "from chronicle.store.store import Store\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from storeutil import write\n"
        "st = Store.open(sys.argv[1])\n"
        "ws = st.open_workspace('other', writable=True, create=True)\n"
        "write(ws, ws.root, b'theirs', b'committed by another process')\n"
        "st.chunks.flush()\n"
        "st._dirty = False\n"             # it leaves without syncing: our sync must cover it
        "st.release_workspace(ws)\n"
        "st.close()\n"
    )
    tests_dir = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", script, str(path), tests_dir], check=True,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    before = read_synced(path / "meta").txnid
    st.sync()
    assert read_synced(path / "meta").txnid > before
    st.close()


def test_the_sync_record_is_written_again_after_it_was_removed(tmp_path, monkeypatch):
    """The store keeps ``synced.rec`` open between syncs; if the file goes away (or is
    replaced), the next sync writes a new one rather than into the lost file."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"one", b"first")
    st.sync()
    (path / "meta" / SYNCED_RECORD).unlink()
    write(ws, ws.root, b"two", b"second")
    st.sync()
    record = read_synced(path / "meta")
    assert record is not None
    write(ws, ws.root, b"three", b"never synced")
    st.chunks.flush()
    st._dirty = False
    st.close()
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st2:
        ws2 = st2.open_workspace("w")
        assert read(ws2, b"two") == b"second"
        with pytest.raises(NotFound):
            ws2.resolve(b"three")


def test_a_metadata_only_change_synced_without_pack_bytes_survives_a_crash(tmp_path, monkeypatch):
    """A sync after changes that wrote no chunk data (a rename, a new directory) flushes only
    the metadata and the record; the changes are still there after a machine crash."""
    from storeutil import A
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"old-name", b"renamed later")
    st.sync()
    ws.rename(ws.root, b"old-name", ws.root, b"new-name", 0, A)
    ws.mkdir(ws.root, b"made", 0o755, A)
    assert not st.chunks.needs_sync()
    st.sync()
    st._dirty = False
    st.close()
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    with Store.open(path) as st2:
        ws2 = st2.open_workspace("w")
        assert read(ws2, b"new-name") == b"renamed later"
        assert ws2.resolve(b"made")
        with pytest.raises(NotFound):
            ws2.resolve(b"old-name")
        assert fsck(st2).clean


def test_an_idle_store_leaves_other_processes_commits_to_them_and_only_moves_its_pin(tmp_path):
    """A store with nothing of its own to sync (an idle mount daemon) never
    syncs for another process's commits (that process syncs them); once
    ``interval`` has passed since its pin it moves the pin to the last
    commit, so the pages those commits free can be reused. With no commit
    anywhere its pin stays as it is."""
    path = tmp_path / "store"
    st = Store.init(path)
    try:
        st.sync()
        pin, synced = st._pin, st._synced_txnid
        assert not st.needs_sync(interval=0) and st._pin is pin          # nothing committed: nothing to move
        script = ("import sys; from chronicle.store.store import Store; from storeutil import write\n"
                  "st = Store.open(sys.argv[1]); ws = st.open_workspace('other', writable=True, create=True)\n"
                  "write(ws, ws.root, b'f', b'another process'); st.sync(); st.close()\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                                          os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=120)
        last = st.env.info()["last_txnid"]
        assert last > pin.id()
        assert not st.needs_sync(interval=3600) and st._pin is pin       # not due yet (and no gc runs)
        assert not st.needs_sync(interval=0)
        assert st._pin.id() == last and st._synced_txnid == synced       # moved on, nothing synced
    finally:
        st.close()
