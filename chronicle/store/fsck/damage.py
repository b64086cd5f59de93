"""Reading LMDB databases past damaged pages, for ``chronicle fsck``.

LMDB has no checksums; a damaged branch or leaf page shows up as
``lmdb.CorruptedError`` (``MDB_CORRUPTED``), ``lmdb.PageNotFoundError``
(``MDB_PAGE_NOTFOUND``) or another ``lmdb.Error`` from a cursor, and marks
its read transaction bad (``MDB_BAD_TXN`` for every later call). So
:class:`Reader` holds the read transaction fsck works in, renews it after a
failure (:meth:`Reader.renew`), and :meth:`Reader.items` walks a database in
key order **past** damage: when the cursor fails after key ``k`` it seeks,
in a fresh transaction, to ever larger keys above ``k`` (``k`` with its
last byte raised, then with ever shorter prefixes raised) until a seek
succeeds, and records the key range it skipped as a :class:`DamagedRange`.
A database whose root cannot be read at all is one range from the first
key to the last. The records in a skipped range are what was lost.

Repair (:func:`rebuild`) copies every readable record into a fresh LMDB file
and swaps it in atomically, keeping the damaged file under ``meta/backup/``.

Threads: one fsck run, one thread.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

_MAX_PROBES = 600            # seeks tried to get past one damaged range


@dataclass
class DamagedRange:
    """Records of database ``db`` that cannot be read: every key after
    ``after`` (None: from the first) and before ``before`` (None: to the end),
    with the LMDB error that stopped the cursor."""

    db: str
    after: bytes | None
    before: bytes | None
    error: str

    def describe(self) -> str:
        lo = "the first key" if self.after is None else f"key {self.after.hex()}"
        hi = "the last" if self.before is None else f"key {self.before.hex()}"
        return f"database {self.db!r}: the records after {lo} up to {hi} cannot be read ({self.error})"


class Reader:
    """The read transaction of one fsck run over ``env`` and its named
    databases ``dbs`` (``{name: handle}``); ``damaged`` lists every range
    :meth:`items` had to skip."""

    def __init__(self, env: lmdb.Environment, dbs: dict):
        self.env = env
        self.dbs = dbs
        self.txn = env.begin()
        self.damaged: list[DamagedRange] = []

    def renew(self) -> lmdb.Transaction:
        """Abort the current read transaction (it may be marked bad) and begin a new one."""
        try:
            self.txn.abort()
        except lmdb.Error:
            pass
        self.txn = self.env.begin()
        return self.txn

    def check(self) -> None:
        """Renew the read transaction if an error marked it bad (a caller
        that caught an ``lmdb.Error`` of a lookup itself)."""
        try:
            self.txn.stat(self.dbs[next(iter(self.dbs))])
        except lmdb.Error:
            self.renew()

    def close(self) -> None:
        try:
            self.txn.abort()
        except lmdb.Error:
            pass

    def items(self, db: str) -> Iterator[tuple[bytes, bytes]]:
        """Every readable ``(key, value)`` of database ``db``, in key order,
        as bytes; damaged ranges are skipped and recorded in :attr:`damaged`.
        Never raises an ``lmdb.Error``."""
        handle = self.dbs[db]
        last: bytes | None = None       # the last key yielded
        resume: bytes | None = None     # a readable key to start from (after a skip)
        while True:
            try:
                batch = self._read_from(handle, last, resume)
                for key, value in batch:
                    if last is not None and key <= last and resume is None:
                        # a damaged key of a leaf page: the order LMDB keeps is broken
                        self.damaged.append(DamagedRange(db, last, key, "keys out of order"))
                        continue
                    yield key, value
                    last, resume = key, None
                return
            except lmdb.Error as exc:
                self.renew()
                error = f"{type(exc).__name__}: {exc}"
                found = self._skip(handle, last)
                self.damaged.append(DamagedRange(db, last, found, error))
                if found is None:
                    return
                resume = found

    def _read_from(self, handle, last: bytes | None, resume: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=handle)
        try:
            if resume is not None:
                ok = cur.set_range(resume)
            elif last is None:
                ok = cur.first()
            else:
                ok = cur.set_range(last)
                if ok and cur.key() == last:
                    ok = cur.next()
            while ok:
                yield bytes(cur.key()), bytes(cur.value())
                ok = cur.next()
        finally:
            cur.close()

    def _skip(self, handle, last: bytes | None) -> bytes | None:
        """The first key past the damage after ``last`` that a fresh
        transaction can read, or None (none found: the rest is lost):
        coarse probes (:func:`_probes`) find a readable key, then bisection
        between ``last`` and it finds the first one."""
        found = None
        for probe in _probes(last):
            found = self._seek(handle, probe)
            if found is not False:
                break
        if not found:
            return None
        if last is None:
            last = b""
        width = max(len(last), len(found))
        lo = int.from_bytes(last.ljust(width, b"\0"), "big")
        hi = int.from_bytes(found.ljust(width, b"\0"), "big")
        for _ in range(8 * width + 8):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            got = self._seek(handle, mid.to_bytes(width, "big"))
            if got is False:
                lo = mid
            elif got is None or got >= found:
                hi = mid
            else:
                found = got
                hi = int.from_bytes(found.ljust(width, b"\0")[:width], "big")
                if len(found) > width:
                    break
        return found

    def _seek(self, handle, probe: bytes):
        """The first key >= ``probe`` if it and the key after it can be
        read; None at the end; False if the seek met damage."""
        try:
            with self.txn.cursor(db=handle) as cur:
                if not cur.set_range(probe):
                    return None
                key = bytes(cur.key())
                cur.value()
                if cur.next():
                    cur.key()           # the page after it must be readable too
                return key
        except lmdb.Error:
            self.renew()
            return False


_WS_KEYED = {"inodes", "dirents", "dirent_hist", "paths", "events", "heads", "snapshots", "ws_ids"}
_WHAT = {"chunks": "chunk index entries (where file data is)", "contents": "file contents (extent lists)",
         "workspaces": "workspace records"}


def describe_damage(ranges: list[DamagedRange], workspaces: dict[int, str]) -> list[tuple[str, dict]]:
    """``(message, details)`` for each distinct damaged range: the database,
    the key range, and whose records they are (the workspace, by the first 4
    bytes of the keys of a database keyed by workspace id, named through
    ``workspaces``: ``{ws id: name}``)."""
    out, seen = [], set()
    for rng in ranges:
        if (rng.db, rng.after, rng.before) in seen:
            continue
        seen.add((rng.db, rng.after, rng.before))
        whose = _WHAT.get(rng.db, "")
        if rng.db in _WS_KEYED:
            ids = sorted({int.from_bytes(k[:4], "big") for k in (rng.after, rng.before) if k and len(k) >= 4})
            names = ", ".join(repr(workspaces[i]) if i in workspaces else f"#{i}" for i in ids)
            whose = f"{rng.db} records of workspace {names}" if names else f"{rng.db} records"
        out.append((rng.describe() + (f": {whose}" if whose else ""),
                    {"db": rng.db, "after": rng.after.hex() if rng.after is not None else None,
                     "before": rng.before.hex() if rng.before is not None else None, "error": rng.error}))
    return out


def _probes(last: bytes | None) -> Iterator[bytes]:
    """Keys ever further above ``last``: raise its last byte by 1, 16, 128,
    then shorter and shorter prefixes of it, then every first byte."""
    count = 0
    if last:
        for length in range(len(last), 0, -1):
            prefix = last[:length]
            for step in (1, 16, 128):
                value = int.from_bytes(prefix, "big") + step
                if value >= 1 << (8 * length):
                    break
                count += 1
                yield value.to_bytes(length, "big")
                if count >= _MAX_PROBES:
                    return
    first = last[0] + 1 if last else 0
    for b in range(first, 256):
        yield bytes([b])


def rebuild(env: lmdb.Environment, dbs: dict, meta_dir: Path, map_size: int) -> tuple[Path, dict[str, int]]:
    """Copy every readable record of every database ``dbs`` of ``env`` into
    a fresh LMDB file and swap it in for ``meta_dir/data.mdb`` (LMDB cannot
    rewrite a damaged page in place, and ``mdb_env_copy`` does not skip
    damage). The old file is kept as ``meta_dir/backup/data.mdb.damaged-<time>``;
    ``synced.json`` (which holds a meta page of the old file) is removed.
    Returns ``(backup path, {database: records copied})``. The caller's
    ``env`` still maps the old file: close the store after this. Raises
    ``OSError`` and ``lmdb.Error`` from the disk."""
    work = meta_dir / "rebuild"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    copied: dict[str, int] = {}
    reader = Reader(env, dbs)
    fresh = lmdb.open(str(work), map_size=map_size, max_dbs=len(dbs) + 2, sync=True)
    try:
        for name in dbs:
            handle = fresh.open_db(name.encode())
            n = 0
            with fresh.begin(write=True) as txn:
                for key, value in reader.items(name):
                    txn.put(key, value, db=handle)
                    n += 1
            copied[name] = n
        fresh.sync(True)
    finally:
        fresh.close()
        reader.close()
    backup_dir = meta_dir / "backup"
    backup_dir.mkdir(exist_ok=True)
    backup = backup_dir / f"data.mdb.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    os.link(meta_dir / "data.mdb", backup)
    os.replace(work / "data.mdb", meta_dir / "data.mdb")     # atomic: the old file or the new one
    (meta_dir / "synced.json").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    fd = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return backup, copied
