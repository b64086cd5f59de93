"""``Store.sync`` lets commits go on while the disk flushes, and what it
records is still a state a machine crash can roll back to.

The crash is simulated as in ``tests/store/meta/test_recovery.py``: a later
boot (``CHRONICLE_BOOT_ID``) and meta pages on disk newer than the synced one.
"""

from __future__ import annotations

import json
import threading

import pytest

from chronicle.errors import NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta.recovery import read_meta_pages
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
    assert max(m.txnid for m in read_meta_pages(live, st._page_size)) > \
        json.loads((path / "meta" / "synced.json").read_text())["txnid"]
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
