"""``chronicle.store.meta.recovery``: what survives a killed process and a
machine crash.

The crash images are made by hand: the LMDB data file as the disk held it
after the last sync, with the newest meta page "flushed early" over it — the
worst a machine crash can leave (LMDB's docs: with ``MDB_NOSYNC`` a crash
"can corrupt the database"). A reboot is simulated with ``CHRONICLE_BOOT_ID``.
The fsck after a crash of a real writer process is
``tests/store/test_fsck.py::test_store_is_clean_after_a_crash``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from chronicle.errors import NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta.recovery import SYNCED_RECORD, boot_id, read_meta_pages, read_synced, recover_after_crash
from chronicle.store.store import Store
from storeutil import read, write


CHILD = r"""
import sys
from chronicle.store.model import Actor
from chronicle.store.store import Store
st = Store.open(sys.argv[1])
ws = st.open_workspace("w", writable=True)
ino, _ = ws.create(ws.root, b"after-kill", 0o100644, Actor())
ws.files.open(ino, created=True); ws.files.write(ino, 0, b"closed before the kill", 1); ws.files.commit(ino)
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
    synced_record = (path / "meta" / SYNCED_RECORD).read_bytes()
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
    (path / "meta" / SYNCED_RECORD).write_bytes(synced_record)
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
    shutil.copy(path / "meta" / SYNCED_RECORD, tmp_path / SYNCED_RECORD)
    st.chunks.flush()
    st._dirty = False           # leave without syncing, as a killed process would
    st.close()
    with Store.open(path) as st:
        assert read(st.open_workspace("w"), b"unsynced") == b"still here"




# -- the protocol's pieces, on their own ------------------------------------------------------


def _synced_store(path):
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"f", b"synced")
    st.sync()
    st.close()
    return path / "meta"


def test_a_sync_records_the_synced_txnid_boot_and_meta_page(tmp_path):
    meta = _synced_store(tmp_path / "store")
    record = read_synced(meta)
    assert record.boot_id == boot_id()
    pages = read_meta_pages(meta / "data.mdb", record.page_size)
    assert len(pages) == 2 and record.txnid == max(p.txnid for p in pages)
    assert record.meta_page == max(pages, key=lambda p: p.txnid).raw


def test_recovery_does_nothing_without_a_record_or_on_the_same_boot(tmp_path, monkeypatch):
    assert recover_after_crash(tmp_path) is None                  # a store never synced
    meta = _synced_store(tmp_path / "store")
    before = (meta / "data.mdb").read_bytes()
    assert recover_after_crash(meta) is None                      # same boot: the page cache held it all
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")
    assert recover_after_crash(meta) is None                      # a reboot, but nothing newer than the sync
    assert (meta / "data.mdb").read_bytes() == before
