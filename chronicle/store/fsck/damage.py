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

Threads: one fsck run, one thread.
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
        transaction can seek to, or None (none found: the rest is lost)."""
        for probe in _probes(last):
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
        return None


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
