"""The metadata check at open (meta.salvage) is skipped for a file the last
clean close left, and still runs — and finds damage — after a change LMDB did
not make."""

from __future__ import annotations

import fcntl
import os
import random

from storeutil import write

from chronicle.store.meta import salvage
from chronicle.store.store import Store
from tools import meta_damage as trial


def _fill(store: Store, n: int) -> None:
    ws = store.open_workspace("w", writable=True, create=True)
    for i in range(n):
        write(ws, ws.root, b"f%d" % i, b"content %d\n" % i)


def test_a_clean_close_marks_the_file_sound_and_the_next_open_skips_the_scan(tmp_path, monkeypatch):
    store = Store.init(tmp_path / "s")
    _fill(store, 300)
    store.close()
    assert salvage.is_verified(tmp_path / "s" / "meta")
    scans = []
    real_scan = salvage.scan
    monkeypatch.setattr(salvage, "scan", lambda *a, **k: scans.append(a) or real_scan(*a, **k))
    Store.open(tmp_path / "s").close()
    assert scans == []


def test_a_change_from_outside_lmdb_is_scanned_and_salvaged(tmp_path):
    store = Store.init(tmp_path / "s")
    _fill(store, 300)
    store.close()
    data = tmp_path / "s" / "meta" / "data.mdb"
    for page in trial.pages_holding(data, b"f123"):      # every page holding the record (one is live)
        trial.damage(tmp_path / "s", page, "zero", random.Random(1))     # zeroed after the clean close
    assert not salvage.is_verified(tmp_path / "s" / "meta")
    Store.open(tmp_path / "s").close()
    assert salvage.salvage_note(tmp_path / "s" / "meta") is not None      # the open read it, found it, salvaged


def test_a_store_still_open_elsewhere_is_not_marked_at_close(tmp_path):
    first = Store.init(tmp_path / "s")
    _fill(first, 10)
    first.sync()
    fd = os.open(tmp_path / "s" / "run" / "open.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)              # as another process holding the store open
    try:
        (tmp_path / "s" / "meta" / salvage.VERIFIED_FILE).unlink(missing_ok=True)
        first.close()
        assert not salvage.is_verified(tmp_path / "s" / "meta")
    finally:
        os.close(fd)
