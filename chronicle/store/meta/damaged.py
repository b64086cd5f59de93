"""Reading LMDB databases past damaged pages.

LMDB has no checksums; a damaged branch or leaf page shows up as
``lmdb.CorruptedError`` (``MDB_CORRUPTED``), ``lmdb.PageNotFoundError``
(``MDB_PAGE_NOTFOUND``) or another ``lmdb.Error`` from a cursor, and marks
its read transaction bad (``MDB_BAD_TXN`` for every later call). So
:class:`Reader` holds a read transaction, renews it after a failure
(:meth:`Reader.renew`), and :meth:`Reader.items` walks a database (or a key
range of it) in key order **past** damage: when the cursor fails after key
``k`` it seeks, in a fresh transaction, to ever larger keys above ``k``
(``k`` with its last byte raised, then with ever shorter prefixes raised)
until a seek succeeds, then bisects back to the first readable key, and
records the key range it skipped as a :class:`DamagedRange`. A database
whose root cannot be read at all is one range from the first key to the
last. The records in a skipped range are what was lost.

Users: ``chronicle fsck`` (``fsck.damage``: whole databases) and the tree's
tolerant reads (``meta.tree``: one directory's entries).

Threads: a Reader is used by one thread; it opens its own read transactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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

    def items(self, db: str, lo: bytes | None = None, hi: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every readable ``(key, value)`` of database ``db`` with ``lo <=
        key < hi`` (None: unbounded), in key order, as bytes; damaged ranges
        are skipped and recorded in :attr:`damaged`. Never raises an
        ``lmdb.Error``.

        A key damaged inside a leaf page breaks the order LMDB keeps. So
        records are yielded one behind: of two keys out of order, the one
        that does not fit between its neighbours is dropped and recorded as
        a damaged record (a range between those neighbours)."""
        handle = self.dbs[db]
        pos: bytes | None = None        # the last key read (where to go on from)
        resume: bytes | None = None     # a readable key to start from (after a skip)
        last: bytes | None = None       # the last key yielded
        pending: tuple[bytes, bytes] | None = None
        while True:
            try:
                for key, value in self._read_from(handle, pos, resume if resume is not None else
                                                  (lo if pos is None else None)):
                    if hi is not None and key >= hi:
                        break
                    pos, resume = key, None
                    if pending is None or key > pending[0]:
                        if pending is not None:
                            yield pending
                            last = pending[0]
                        pending = (key, value)
                    elif last is None or key > last:
                        # the pending key sits above its successor: it is the damaged one
                        self.damaged.append(DamagedRange(db, last, key, "a damaged key "
                                                         f"{pending[0][:64].hex()} out of order"))
                        pending = (key, value)
                    else:
                        self.damaged.append(DamagedRange(db, last, pending[0], f"a damaged key "
                                                         f"{key[:64].hex()} out of order"))
                if pending is not None:
                    yield pending
                return
            except lmdb.Error as exc:
                self.renew()
                error = f"{type(exc).__name__}: {exc}"
                found = self._skip(handle, pos, lo)
                if found is not None and hi is not None and found >= hi:
                    found = None
                self.damaged.append(DamagedRange(db, pos if pos is not None else lo, found, error))
                if found is None:
                    if pending is not None:
                        yield pending
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

    def _skip(self, handle, last: bytes | None, lo: bytes | None = None) -> bytes | None:
        """The first key past the damage after ``last`` (None: from ``lo``,
        or the start) that a fresh transaction can read, or None (none
        found: the rest is lost): coarse probes (:func:`_probes`) find a
        readable key, then bisection between ``last`` and it finds the first one."""
        found = None
        if last is None and lo:
            last = lo
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
