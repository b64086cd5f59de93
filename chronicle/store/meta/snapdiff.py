"""What changed between two LMDB snapshots, read from the pages they do not share.

LMDB never writes a committed page again while a reader may still see it
(copy-on-write: ``mdb_page_touch`` in ``mdb.c`` copies a page the first time a
write transaction changes it, and a freed page is reused only once no reader
is older than the transaction that freed it). So if a process holds a read
transaction on snapshot *S* (Chronicle's recovery pin does: ``meta.recovery``)
while a later snapshot *N* is read, a page number that both trees reach is
the same page in both, with the same contents, and the whole subtree below it
is equal. The difference ``S → N`` is then found by walking the two trees side
by side and descending only where their page numbers differ, as ZFS finds an
incremental send's blocks from their birth txg and btrfs ``send`` compares
two snapshots' trees: the cost is the pages written between the two snapshots
(times the tree's depth), not the size of the database.

:func:`snapshot_diff` yields every key of every named database whose value
differs between *S* and *N*, in key order per database, with its value in *N*
(``None``: deleted). Its inputs are the two snapshots' **meta pages** as raw
bytes (``SyncRecorder.meta_page`` reads a live one; ``synced.rec`` keeps the
last synced one), since LMDB overwrites a meta page two commits later.

**Precondition**, which the caller must keep: a read transaction on *S* (or
an older one) is open in some process for the whole call, so that none of
*S*'s pages can have been reused; *N*'s pages are stable because *N* is the
newest snapshot or is pinned too. Without it a reused page number could make
two different subtrees look shared, and the diff would silently miss
changes. The page format is LMDB 0.9's (``meta.pages``); a page that does not
parse raises :class:`~chronicle.errors.Corrupt`: a diff is exact or nothing.

Threads: a call reads the data file through its own read-only mapping and
may run beside the writer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chronicle.errors import Corrupt
from chronicle.store.meta.pages import _DB, _DBS_AT, _TXNID_AT, F_BIGDATA, F_SUBDATA, MAIN_DBI, NODESIZE, P_BRANCH, \
    P_INVALID, P_LEAF, PageDamage, PageWalk


@dataclass(frozen=True, slots=True)
class Change:
    """One key of named database ``db`` whose value differs between the two
    snapshots: its value in the newer one, or ``None`` if it was deleted."""

    db: str
    key: bytes
    value: bytes | None


@dataclass
class DiffStats:
    """What a diff read: ``pages`` (branch and leaf pages parsed, both trees)
    and ``shared`` (subtrees skipped because both trees reach the same page)."""

    pages: int = 0
    shared: int = 0
    changes: int = 0


@dataclass(frozen=True, slots=True)
class _Page:
    pgno: int
    depth: int          # levels above the leaves: 1 is a leaf page


@dataclass(frozen=True, slots=True)
class _Entry:
    key: bytes
    flags: int
    inline: bytes | None        # the value, or None when it is in overflow pages
    overflow: int               # first overflow page (F_BIGDATA), else 0
    size: int


def meta_txnid(meta: bytes) -> int:
    """The txnid a raw meta page commits."""
    return struct.unpack_from("<Q", meta, _TXNID_AT)[0]


def snapshot_diff(data_file: Path, old_meta: bytes, new_meta: bytes, *, page_size: int | None = None,
                  stats: DiffStats | None = None) -> Iterator[Change]:
    """Every change from the snapshot committed by meta page ``old_meta`` to
    the one of ``new_meta`` (both raw pages of ``data_file``), database by
    database in name order, keys ascending. ``stats`` (optional) is filled in
    as the walk goes. See the module docstring for the pin the caller must
    hold. Raises :class:`~chronicle.errors.Corrupt` if a page does not parse
    and ``ValueError`` if ``new_meta`` is older than ``old_meta``."""
    stats = stats if stats is not None else DiffStats()
    if meta_txnid(new_meta) < meta_txnid(old_meta):
        raise ValueError("the new snapshot is older than the old one")
    with PageWalk(data_file, page_size) as walk:
        reader = _Reader(walk, stats)
        old_dbs = reader.named(old_meta)
        new_dbs = reader.named(new_meta)
        for name in sorted(old_dbs.keys() | new_dbs.keys()):
            old, new = old_dbs.get(name), new_dbs.get(name)
            if old is not None and new is not None and old[7] == new[7]:
                continue                        # same root page: the database is unchanged
            text = name.decode("utf-8", "replace")
            for key, value in reader.diff(_stream_of(old), _stream_of(new)):
                stats.changes += 1
                yield Change(text, key, value)


def _stream_of(db: tuple | None) -> list:
    if db is None or db[7] == P_INVALID:
        return []
    return [_Page(db[7], db[2])]


@dataclass
class _Reader:
    walk: PageWalk
    stats: DiffStats = field(default_factory=DiffStats)

    def named(self, meta: bytes) -> dict[bytes, tuple]:
        """``{name: MDB_db}`` of the snapshot of ``meta``: the sub-database
        records of its main database."""
        main = _DB.unpack_from(meta, _DBS_AT + MAIN_DBI * _DB.size)
        out = {}
        stack = _stream_of(main)
        while stack:
            item = stack.pop()
            if isinstance(item, _Page):
                stack.extend(reversed(self.expand(item)))
            elif item.flags & F_SUBDATA:
                out[item.key] = _DB.unpack(self.value(item))
        return out

    def expand(self, page: _Page) -> list:
        """The children of a branch page (as :class:`_Page`) or the records of
        a leaf page (as :class:`_Entry`), in key order."""
        self.stats.pages += 1
        walk = self.walk
        kind = P_LEAF if page.depth == 1 else P_BRANCH
        try:
            nodes = walk.nodes(page.pgno, kind)
        except PageDamage as exc:
            raise Corrupt(f"metadata page {page.pgno}: {exc}") from None
        base = page.pgno * walk.page_size
        mem = walk.memory
        if kind == P_BRANCH:
            return [_Page(lo16 | hi16 << 16 | flags << 32, page.depth - 1) for _off, lo16, hi16, flags, _k in nodes]
        out = []
        for off, lo16, hi16, flags, ksize in nodes:
            start = base + off + NODESIZE
            key = bytes(mem[start:start + ksize])
            size = lo16 | hi16 << 16
            if flags & F_BIGDATA:
                (first,) = struct.unpack_from("<Q", mem, start + ksize)
                out.append(_Entry(key, flags, None, first, size))
            else:
                if start + ksize + size > base + walk.page_size:
                    raise Corrupt(f"metadata page {page.pgno} has a record past its end")
                out.append(_Entry(key, flags, bytes(mem[start + ksize:start + ksize + size]), 0, size))
        return out

    def value(self, entry: _Entry) -> bytes:
        if entry.inline is not None:
            return entry.inline
        try:
            return self.walk.overflow(entry.overflow, entry.size)
        except PageDamage as exc:
            raise Corrupt(f"metadata overflow page {entry.overflow}: {exc}") from None

    def same_value(self, a: _Entry, b: _Entry) -> bool:
        if a.overflow and a.overflow == b.overflow:
            return True                         # the same overflow pages: written once, never in place
        return a.size == b.size and self.value(a) == self.value(b)

    def diff(self, old: list, new: list) -> Iterator[tuple[bytes, bytes | None]]:
        """Merge the two trees' item streams (stacks, next item last),
        descending into pages only where the trees do not share them."""
        old.reverse()
        new.reverse()
        while old or new:
            a = old[-1] if old else None
            b = new[-1] if new else None
            if isinstance(a, _Page) and isinstance(b, _Page):
                if a.pgno == b.pgno:            # both streams stand at the same subtree: equal
                    old.pop()
                    new.pop()
                    self.stats.shared += 1
                    continue
                if a.depth >= b.depth:
                    old.extend(reversed(self.expand(old.pop())))
                if b.depth >= a.depth:
                    new.extend(reversed(self.expand(new.pop())))
                continue
            if isinstance(a, _Page):
                old.extend(reversed(self.expand(old.pop())))
                continue
            if isinstance(b, _Page):
                new.extend(reversed(self.expand(new.pop())))
                continue
            if b is None or (a is not None and a.key < b.key):
                old.pop()
                yield a.key, None
            elif a is None or b.key < a.key:
                new.pop()
                yield b.key, self.value(b)
            else:
                old.pop()
                new.pop()
                if not self.same_value(a, b):
                    yield b.key, self.value(b)
