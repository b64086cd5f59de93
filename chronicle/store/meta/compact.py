"""Giving a mostly free metadata file's space back: a compacted copy swapped in at the last close.

Why the file has free pages. LMDB never overwrites a page a reader may
still see: a page freed by a commit is reused only once no read
transaction older than that commit is open. Every writing process holds
such a reader, the recovery pin (``recovery``: the synced tree stays intact
until the next sync), so between two syncs (every few seconds or
``store.SYNC_COMMITS`` commits) each commit's copied-on-write pages are
new pages, and the file grows to the data in use plus one sync window's
churn — about 20 pages per commit. Those pages are reused after the next
sync (the file does not grow under steady churn), but the file keeps its
high-water mark: after replaying 300 commits of a git repository, 33 MB of
file held 3.6 MB of pages in use.

What this does (:func:`compact_if_mostly_free`): when the last process
using the store closes it (``Store.close``; it holds the store's open lock
exclusively, so no other process opens the environment meanwhile) and at
least :data:`FREE_FRACTION` of a file of at least :data:`MIN_BYTES` is free,
every database is written again into a fresh file, record by record in key
order in LMDB's append mode (:func:`rebuild`; as ``mdb_load -a`` loads a
dump), so its pages are full: B-tree pages split by inserts in the middle
of a database (a path's next entry, an inode's next record) are about half
full, and ``mdb_env_copy2``'s compacting copy keeps them as they are (the
click replay: 3.0 MB copied, 2.0 MB rebuilt). The new file is fsynced and
put in place with ``os.replace`` (atomic: the old file or the new one), and
the record of the last sync (``synced.rec``; a meta page of the old file) is removed: the new file is
durable as a whole, there is nothing to roll back to. Its transaction ids
continue from the old file's (``recovery.carry_txnid``: the metadata backup
orders its generations by them). It costs one read and
one write of the records (a store of 18,000 records: 25 ms).

Threads: call from the closing thread, with the environment closed.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lmdb

from chronicle.store.meta.backup import fsync_dir
from chronicle.store.meta.recovery import carry_txnid, forget_synced

log = logging.getLogger(__name__)

MIN_BYTES = 4 << 20          # a smaller file is left as it is
FREE_FRACTION = 0.5          # compact when at least this part of the file is free pages
_WORK = ".compact"


@dataclass(frozen=True)
class Compacted:
    """What a compaction did: the file's bytes before and after."""

    before: int
    after: int


def used_pages(env: lmdb.Environment) -> int:
    """Pages in use by the main database and every named database of
    ``env`` (branch + leaf + overflow; the free list and the two meta pages
    not counted). Raises ``lmdb.Error``."""
    main = env.stat()
    used = main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
    with env.begin() as txn:
        names = [bytes(key) for key, _ in txn.cursor()]
        for name in names:
            try:
                db = env.open_db(name, txn=txn, create=False)
            except lmdb.Error:                  # a plain key of the main database
                continue
            st = txn.stat(db)
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    return used


def rebuild(env: lmdb.Environment, work: Path, map_size: int, max_dbs: int, file_mode: int) -> None:
    """Write every record of ``env`` (its named databases, and any plain key
    of its main database) into a new environment in the empty directory
    ``work``, in one write transaction, in key order with ``append``: full
    pages. A database opened with duplicate keys is copied with
    ``mdb_env_copy2`` instead (its flags make append mode a different
    call; the store has none). Raises ``lmdb.Error``/``OSError``."""
    with env.begin() as txn:
        named = []
        for key, value in txn.cursor():
            try:
                db = env.open_db(bytes(key), txn=txn, create=False)
            except lmdb.Error:
                named.append((bytes(key), None, bytes(value)))
                continue
            flags = db.flags(txn)
            if flags.get("dupsort"):
                env.copy(str(work), compact=True)
                return
            named.append((bytes(key), db, flags))
        out = lmdb.open(str(work), map_size=map_size, max_dbs=max_dbs, sync=False, metasync=False,
                        readahead=False, mode=file_mode)
        try:
            with out.begin(write=True) as wtxn:
                for name, db, flags in named:
                    if db is None:
                        continue
                    odb = out.open_db(name, txn=wtxn, reverse_key=flags.get("reverse_key", False),
                                      integerkey=flags.get("integerkey", False))
                    with txn.cursor(db=db) as cur, wtxn.cursor(db=odb) as wcur:
                        wcur.putmulti(cur.iternext(), append=True)
                for name, db, value in named:
                    if db is None:
                        wtxn.put(name, value)          # a plain key of the main database (none today)
            out.sync(True)
        finally:
            out.close()
    (work / "lock.mdb").unlink(missing_ok=True)



def compact_if_mostly_free(meta_dir: Path, map_size: int, max_dbs: int, file_mode: int,
                           min_bytes: int = MIN_BYTES, free_fraction: float = FREE_FRACTION) -> Compacted | None:
    """Swap a compacted copy in for ``meta_dir/data.mdb`` if at least
    ``free_fraction`` of a file of at least ``min_bytes`` is free (module
    docstring). Call with no process having the environment open (the
    store's open lock held exclusively). Returns what it did, or None when
    the file is left as it is. Raises ``OSError``/``lmdb.Error`` from the
    disk; the live file is then untouched (the copy is made beside it)."""
    data = meta_dir / "data.mdb"
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return None
    if size < min_bytes:
        return None
    work = meta_dir / _WORK
    shutil.rmtree(work, ignore_errors=True)            # what a killed compaction left
    env = lmdb.open(str(meta_dir), map_size=map_size, max_dbs=max_dbs, readonly=True, lock=True,
                    readahead=False)
    try:
        page = env.stat()["psize"]
        if used_pages(env) + 2 > (1 - free_fraction) * (size // page):
            return None
        txnid = env.info()["last_txnid"]
        work.mkdir(mode=0o700)
        rebuild(env, work, map_size, max_dbs, file_mode)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        env.close()
    try:
        copy = work / "data.mdb"
        carry_txnid(copy, page, txnid + 1)          # txnids go on rising (the backup orders by them)
        os.chmod(copy, file_mode)
        fd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        after = copy.stat().st_size
        # First the synced state goes (the old file was synced at close: without it nothing is rolled back),
        # so that a crash can never leave a sync record beside the new file (whose txnids are past it).
        forget_synced(meta_dir)
        fsync_dir(meta_dir)
        os.replace(copy, data)                          # atomic: the old file or the new one
        fsync_dir(meta_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("compacted the metadata file: %d -> %d bytes", size, after)
    return Compacted(size, after)
