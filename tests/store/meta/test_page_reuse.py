"""LMDB page reuse (issue 9 §6): the metadata file does not grow under steady
churn, and a mostly free file is compacted when the last process closes the
store (meta.compact)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import lmdb

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.meta import backup, compact, salvage
from chronicle.store.store import Store
from tests.storeutil import history, read, write

LATER = 2 ** 62


def _file_pages(store: Store) -> int:
    """Pages of data.mdb LMDB has written (the last page number + 1): the
    preallocated tail (recovery.MetaReserve) not counted."""
    return store.env.info()["last_pgno"] + 1


def _churn(store: Store, ws, rounds: int, start: int) -> None:
    for i in range(start, start + rounds):
        write(ws, ws.root, b"f", b"version %d\n" % i)
        store.maintain()


def test_a_file_rewritten_10000_times_with_keep_last_and_gc_stops_growing_the_metadata(tmp_path):
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    for i in range(20):                                  # some other files: a tree of several levels
        write(ws, ws.root, b"other%02d" % i, b"x" * 100)
    dryrun.set_policy(store, ws.id, Policy(keep_last=2))
    sizes, used = [], []
    done = 0
    for _round in range(5):
        _churn(store, ws, 2000, done)
        done += 2000
        collect.collect(store, ["w"], now_ns=LATER)
        store.sync()
        sizes.append(_file_pages(store))
        used.append(compact.used_pages(store.env))
    # After the first rounds the file has its working size: the records in use and one sync window's churn
    # (meta.compact). 4,000 more rewrites (and 2 gcs) grow it by the records they add (events, path entries,
    # pruned marks: the history keeps them), not by pages left unused.
    # (Without reuse each round would add ~40,000 pages; the slack is for where the last sync window fell.)
    free = [s - u for s, u in zip(sizes, used)]
    assert free[-1] <= max(free[:3]) * 1.25 + 256, (sizes, used)
    assert sizes[-1] - sizes[2] <= (used[-1] - used[2]) + 0.25 * sizes[2] + 256, (sizes, used)
    assert read(ws, b"f") == b"version %d\n" % (done - 1)
    versions = history(ws, b"f")
    assert [v["version"] for v in versions if not v.get("pruned")][-2:] == [done - 1, done]
    report = fsck(store)
    assert report.clean, [p.message for p in report.problems]
    store.close()


def _grow(path, n: int = 600) -> Store:
    """A store whose metadata file is mostly free pages: ``n`` commits within one sync window."""
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    for i in range(n):
        write(ws, ws.root, b"f%d" % (i % 40), b"content %d\n" % i)
    return store


def test_the_last_close_compacts_a_mostly_free_metadata_file_and_everything_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "MIN_BYTES", 1 << 20)
    store = _grow(tmp_path / "s")
    data = tmp_path / "s" / "meta" / "data.mdb"
    before = data.stat().st_size
    expected = {b"f%d" % (i % 40): b"content %d\n" % i for i in range(600)}
    store.close()
    after = data.stat().st_size
    assert after < before / 2, (before, after)
    assert salvage.is_verified(tmp_path / "s" / "meta")          # the swapped-in file is the one recorded sound
    assert not (tmp_path / "s" / "meta" / ".compact").exists()
    store = Store.open(tmp_path / "s")
    ws = store.open_workspace("w", writable=True)
    assert {name: read(ws, name) for name in expected} == expected
    assert len(history(ws, b"f7")) == 15
    write(ws, ws.root, b"f1", b"after the compaction\n")            # and it takes new commits
    assert fsck(store).clean
    store.close()
    store = Store.open(tmp_path / "s")
    assert read(store.open_workspace("w"), b"f1") == b"after the compaction\n"
    store.close()


def test_a_store_open_elsewhere_or_a_mostly_used_file_is_not_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "MIN_BYTES", 1 << 20)
    store = _grow(tmp_path / "s")
    data = tmp_path / "s" / "meta" / "data.mdb"
    fd = os.open(tmp_path / "s" / "run" / "open.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)                     # as another process holding the store open
    try:
        store.close()
        size = data.stat().st_size
        assert size > 2 << 20
    finally:
        os.close(fd)
    # a file without many free pages is left as it is, even by the last close
    assert compact.compact_if_mostly_free(tmp_path / "s" / "meta", 1 << 40, 64, 0o600, min_bytes=0,
                                          free_fraction=0.999) is None
    assert data.stat().st_size == size
    env = lmdb.open(str(tmp_path / "s" / "meta"), max_dbs=64, readonly=True)
    try:
        assert compact.used_pages(env) > 10
    finally:
        env.close()


def test_a_read_only_open_does_not_compact(tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "MIN_BYTES", 1 << 20)
    _grow(tmp_path / "s").close()
    data = tmp_path / "s" / "meta" / "data.mdb"
    calls = []
    monkeypatch.setattr(compact, "compact_if_mostly_free", lambda *a, **k: calls.append(a))
    store = Store.open(tmp_path / "s")
    store.open_workspace("w")
    store.close()
    assert calls == [] and data.exists()


_READER = """
import sys, time
from chronicle.store.store import Store
store = Store.open(sys.argv[1])
ws = store.open_workspace("w")
print("open", flush=True)
while not sys.stdin.readline().startswith("stop"):
    with ws.read_txn() as txn:                  # as `chronicle ui` reads, now and then
        pass
    print("read", flush=True)
store.close()
"""


def test_a_reading_process_does_not_keep_the_writer_from_reusing_pages(tmp_path, monkeypatch):
    monkeypatch.setattr("chronicle.store.store.SYNC_INTERVAL", 0.2)
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"f", b"first\n")
    store.sync()
    env = dict(os.environ, CHRONICLE_SYNC_INTERVAL="0.2", PYTHONPATH=os.pathsep.join(sys.path))
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(tmp_path / "s")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert reader.stdout.readline() == "open\n"
        free = []
        done = 0
        for _round in range(4):
            for i in range(300):
                write(ws, ws.root, b"f", b"version %d\n" % (done + i))
                if i % 100 == 99:
                    time.sleep(0.25)
                    reader.stdin.write("read\n")          # the reader opens a read transaction meanwhile
                    reader.stdin.flush()
                    assert reader.stdout.readline() == "read\n"
                    store.maintain()
            done += 300
            store.sync()
            free.append(_file_pages(store) - compact.used_pages(store.env))
        # a reader whose pin stayed where it opened would make every round's ~6,000 pages new ones
        assert free[-1] <= free[1] * 1.2 + 256, free
    finally:
        reader.stdin.write("stop\n")
        reader.stdin.close()
        reader.wait(timeout=30)
    store.close()


def test_a_compacted_file_goes_on_from_the_old_transaction_ids_and_backups_stay_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "MIN_BYTES", 1 << 20)
    store = _grow(tmp_path / "s")
    first = store.backup_metadata()
    last = store.env.info()["last_txnid"]
    store.close()
    store = Store.open(tmp_path / "s")
    assert store.env.info()["last_txnid"] > last                       # compacted, and numbered on
    ws = store.open_workspace("w", writable=True)
    write(ws, ws.root, b"f1", b"after\n")
    second = store.backup_metadata()
    assert second.txnid > first.txnid
    assert backup.generations(tmp_path / "s")[0].path == second.path      # the newest is the newest
    assert fsck(store).clean
    store.close()
