"""An LMDB data file read page by page, by hand, past any damage.

LMDB checks some damage itself (``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``:
``meta.damaged``), but not all: a branch page whose child is no leaf, or a
branch with too few keys, fails an assertion inside ``mdb.c`` and the whole
process is aborted (``Assertion 'IS_LEAF(mp)' failed in
mdb_cursor_next()``) — no exception, no report. So ``fsck`` first reads the
file itself with :class:`PageWalk`, which never lets LMDB near a damaged
page: it parses the B+trees from the newest sane meta page down, checks
every page before it uses it, and yields every record it can read, in key
order, recording the key ranges it could not (:class:`DamagedRange`, as
``meta.damaged`` does).

The format is LMDB 0.9's on a 64-bit machine (``mdb.c``: ``MDB_page``,
``MDB_node``, ``MDB_meta``, ``MDB_db``; the constants below carry their
names). A page: ``mp_pgno`` u64, ``mp_pad`` u16, ``mp_flags`` u16,
``mp_lower``/``mp_upper`` u16 (``mp_pages`` u32 for an overflow page), then
the ``mp_ptrs`` u16 offsets of its nodes. A node: ``mn_lo``, ``mn_hi``,
``mn_flags``, ``mn_ksize`` u16, then the key, then (leaf) the data — or
(``F_BIGDATA``) the u64 number of the overflow pages that hold it. In a
branch page ``mn_lo | mn_hi << 16 | mn_flags << 32`` is the child page and
the first key is empty (below everything). Named databases are the
``F_SUBDATA`` records of the main database, each an ``MDB_db``.

A page is used only if its number is where it is, its flags say the kind
the tree expects at that depth, its node offsets and sizes lie inside it,
and its keys ascend within the bounds its parent gives them. Chronicle
opens no database with ``MDB_DUPSORT``, so a record with ``F_DUPDATA`` is
damage too.

Threads: a PageWalk is used by one thread; it holds the file mapped read-only.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from chronicle.store.meta.damaged import DamagedRange
from chronicle.store.meta.recovery import meta_page_problem

P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
PAGEHDRSZ = 16
NODESIZE = 8
MAIN_DBI = 1
_HEADER = struct.Struct("<QHHHH")          # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_NODE = struct.Struct("<HHHH")             # mn_lo, mn_hi, mn_flags, mn_ksize
_DB = struct.Struct("<IHHQQQQQ")           # MDB_db: md_pad, md_flags, md_depth, branch, leaf, overflow, entries, root
_DBS_AT = PAGEHDRSZ + 24                   # mm_dbs, after mm_magic, mm_version, mm_address, mm_mapsize
_LAST_PG_AT = _DBS_AT + 2 * _DB.size
_TXNID_AT = _LAST_PG_AT + 8
P_INVALID = (1 << 64) - 1
MAX_DEPTH = 32


class PageDamage(Exception):
    """A page that cannot be used (internal to the walk)."""


class PageWalk:
    """The LMDB data file ``data_file`` (pages of ``page_size`` bytes),
    opened at its newest sane meta page. :attr:`damaged` lists every range
    the reads had to skip; :attr:`meta_problem` says why no meta page could
    be used (then nothing can be read)."""

    def __init__(self, data_file: Path, page_size: int | None = None):
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        self.damaged: list[DamagedRange] = []
        self.meta_problem: str | None = None
        self.txnid = -1
        self._fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        self.pages = size // self.page_size
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else b""
        self.last_pg = 0
        self._main: tuple | None = None
        problems = []
        for slot in (0, 1):
            raw = bytes(self._map[slot * self.page_size:(slot + 1) * self.page_size])
            problem = meta_page_problem(raw, slot, self.pages, self.page_size)
            if problem is not None:
                problems.append(f"meta page {slot}: {problem}")
                continue
            (txnid,) = struct.unpack_from("<Q", raw, _TXNID_AT)
            if txnid > self.txnid:
                self.txnid = txnid
                self.last_pg = struct.unpack_from("<Q", raw, _LAST_PG_AT)[0]
                self._main = _DB.unpack_from(raw, _DBS_AT + MAIN_DBI * _DB.size)
        if self._main is None:
            self.meta_problem = "; ".join(problems) or "no meta page"
        self._named: dict[bytes, tuple] | None = None
        self._want: tuple[bytes | None, bytes | None] = (None, None)

    @property
    def memory(self) -> mmap.mmap | bytes:
        """The file, mapped read-only (``b""`` if it is empty)."""
        return self._map

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        os.close(self._fd)

    def __enter__(self) -> PageWalk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- databases ---------------------------------------------------------------

    def databases(self) -> dict[bytes, tuple]:
        """``{name: MDB_db fields}`` of the named databases (the readable
        ``F_SUBDATA`` records of the main database)."""
        if self._named is None:
            self._named = {}
            if self._main is not None:
                for key, value, flags in self._records("(main)", self._main):
                    if flags & F_SUBDATA and len(value) == _DB.size:
                        self._named[key] = _DB.unpack(value)
        return self._named

    def items(self, name: str, lo: bytes | None = None, hi: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every readable ``(key, value)`` of named database ``name`` with
        ``lo <= key < hi`` (None: unbounded), in key order; only the pages
        that may hold such keys are read, and what cannot be read is
        recorded in :attr:`damaged`. A database the main database does not
        name yields nothing (LMDB creates it when it is opened)."""
        db = self.databases().get(name.encode())
        if db is None:
            return
        for key, value, flags in self._records(name, db, lo, hi):
            if flags & (F_SUBDATA | F_DUPDATA):
                self._damage(name, key, key, "a record with sub-database flags")
                continue
            yield key, value

    # -- the walk ----------------------------------------------------------------

    def _records(self, name: str, db: tuple, lo: bytes | None = None, hi: bytes | None = None
                 ) -> Iterator[tuple[bytes, bytes, int]]:
        depth, root = db[2], db[7]
        if root == P_INVALID:
            return
        self._want = (lo, hi)
        self._last: bytes | None = None
        self._open: DamagedRange | None = None
        seen: set[int] = set()
        yield from self._page(name, root, depth, None, None, seen)
        self._open = None

    def _damage(self, name: str, lo: bytes | None, hi: bytes | None, reason: str) -> None:
        if self._open is not None and self._open.db == name:
            return                  # one range until the next readable key
        self._open = DamagedRange(name, self._last, None, reason)
        self.damaged.append(self._open)

    def _yield_key(self, key: bytes) -> None:
        if self._open is not None:
            self._open.before = key
            self._open = None
        self._last = key

    def _page(self, name: str, pgno: int, depth: int, lo: bytes | None, hi: bytes | None,
              seen: set[int]) -> Iterator[tuple[bytes, bytes, int]]:
        """The records below page ``pgno``, whose keys must lie in ``[lo, hi)``,
        ``depth`` levels above the leaves (1: a leaf)."""
        try:
            if pgno in seen or not 2 <= pgno <= self.last_pg or pgno >= self.pages or depth < 1 \
                    or depth > MAX_DEPTH:
                raise PageDamage(f"page {pgno} is out of the tree")
            seen.add(pgno)
            kind = P_LEAF if depth == 1 else P_BRANCH
            nodes = self.nodes(pgno, kind)
        except PageDamage as exc:
            self._damage(name, lo, hi, str(exc))
            return
        base = pgno * self.page_size
        if kind == P_BRANCH:
            children = []
            for i, (off, lo16, hi16, flags, ksize) in enumerate(nodes):
                key = bytes(self._map[base + off + NODESIZE:base + off + NODESIZE + ksize]) if i else lo
                children.append((lo16 | hi16 << 16 | flags << 32, key))
            want_lo, want_hi = self._want
            for i, (child, key) in enumerate(children):
                upper = children[i + 1][1] if i + 1 < len(children) else hi
                if (want_hi is not None and key is not None and key >= want_hi) or \
                        (want_lo is not None and upper is not None and upper <= want_lo):
                    continue                # no wanted key below this child
                if i and ((lo is not None and key < lo) or (hi is not None and key >= hi)
                          or (i > 1 and key <= children[i - 1][1])):
                    self._damage(name, key, upper, f"branch page {pgno} has keys out of order")
                    continue
                yield from self._page(name, child, depth - 1, key, upper, seen)
            return
        want_lo, want_hi = self._want
        for off, lo16, hi16, flags, ksize in nodes:
            start = base + off + NODESIZE
            key = bytes(self._map[start:start + ksize])
            if (want_lo is not None and key < want_lo) or (want_hi is not None and key >= want_hi):
                continue
            if (lo is not None and key < lo) or (hi is not None and key >= hi) or \
                    (self._last is not None and key <= self._last):
                self._damage(name, key, key, f"leaf page {pgno} has a damaged key {key[:64].hex()}")
                continue
            size = lo16 | hi16 << 16
            try:
                if flags & F_BIGDATA:
                    value = self._overflow(start + ksize, size)
                else:
                    if start + ksize + size > base + self.page_size:
                        raise PageDamage(f"leaf page {pgno} has a record past its end")
                    value = bytes(self._map[start + ksize:start + ksize + size])
            except PageDamage as exc:
                self._damage(name, key, key, str(exc))
                continue
            self._yield_key(key)
            yield key, value, flags

    def nodes(self, pgno: int, kind: int) -> list[tuple[int, int, int, int, int]]:
        """``(offset, mn_lo, mn_hi, mn_flags, mn_ksize)`` of every node of page
        ``pgno``, checked to lie inside it. Raises :class:`PageDamage`."""
        base = pgno * self.page_size
        number, _pad, flags, lower, upper = _HEADER.unpack_from(self._map, base)
        if number != pgno:
            raise PageDamage(f"page {pgno} says it is page {number}")
        if flags & (P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2) != kind:
            raise PageDamage(f"page {pgno} has flags {flags:#x}, not those of a "
                             f"{'leaf' if kind == P_LEAF else 'branch'} page")
        if not PAGEHDRSZ <= lower <= upper <= self.page_size or (lower - PAGEHDRSZ) % 2:
            raise PageDamage(f"page {pgno} has bad bounds ({lower}, {upper})")
        count = (lower - PAGEHDRSZ) // 2
        if count == 0 or (kind == P_BRANCH and count < 2):
            raise PageDamage(f"page {pgno} has {count} keys")
        out = []
        for i in range(count):
            (off,) = struct.unpack_from("<H", self._map, base + PAGEHDRSZ + 2 * i)
            if off < upper or off + NODESIZE > self.page_size:
                raise PageDamage(f"page {pgno} has a node at a bad offset {off}")
            lo16, hi16, nflags, ksize = _NODE.unpack_from(self._map, base + off)
            if off + NODESIZE + ksize > self.page_size:
                raise PageDamage(f"page {pgno} has a key past its end")
            if kind == P_BRANCH and ((i == 0 and ksize) or nflags > 0xFFFF):
                raise PageDamage(f"branch page {pgno} is malformed")
            if kind == P_LEAF and nflags & F_BIGDATA and off + NODESIZE + ksize + 8 > self.page_size:
                raise PageDamage(f"page {pgno} has an overflow reference past its end")
            out.append((off, lo16, hi16, nflags, ksize))
        return out

    def _overflow(self, at: int, size: int) -> bytes:
        (first,) = struct.unpack_from("<Q", self._map, at)
        return self.overflow(first, size)

    def overflow(self, first: int, size: int) -> bytes:
        """The ``size`` bytes of a value held in the overflow pages from page
        ``first`` on, checked to lie in the file. Raises :class:`PageDamage`."""
        if not 2 <= first <= self.last_pg or first >= self.pages:
            raise PageDamage(f"overflow page {first} is out of the file")
        base = first * self.page_size
        number, _pad, flags = struct.unpack_from("<QHH", self._map, base)
        (count,) = struct.unpack_from("<I", self._map, base + 12)
        if number != first or flags & P_OVERFLOW == 0 or count * self.page_size < PAGEHDRSZ + size \
                or first + count - 1 > self.last_pg:
            raise PageDamage(f"overflow page {first} is damaged")
        return bytes(self._map[base + PAGEHDRSZ:base + PAGEHDRSZ + size])
