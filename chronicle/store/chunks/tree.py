"""The extent tree and the tree hash (store format 4): pure functions, no LMDB.

A file's content is an ordered list of **extents** ``(chunk id, length)``,
``(HOLE_ID, length)`` for a hole. Format 4 stores that list as a persistent
Merkle tree so that two versions of a file share every unchanged part:

- **entries**: a level-0 entry is an extent; a level-``j`` entry (``j >= 1``)
  is a reference to a node of height ``j``: ``(node hash, subtree bytes,
  subtree extent count)``. An :data:`Entry` is the tuple ``(id, nbytes,
  count)`` for both (an extent counts 1).
- **nodes**: a node of height ``j`` holds consecutive level-``j-1`` entries
  (a **leaf** is a node of height 1: it holds extents). Its hash is
  ``BLAKE3(b"chronicle-node\\x00" + height + entries)`` (:func:`node_hash`).
- **grouping** (:func:`group`): a level is cut into nodes after an entry whose
  id has its low :data:`CUT_BITS` bits zero once the node holds at least
  :data:`MIN_FANOUT` entries, or when it holds :data:`MAX_FANOUT` — boundaries
  are content-defined on the entry list, as in prolly trees (Dolt) and Merkle
  search trees (Auvolat & Taïani, SRDS 2019), so an insertion changes one node
  per level and not every node after it. Regrouping from a node boundary gives
  the same nodes as grouping from scratch, so an update (:func:`regroup`)
  re-cuts only from the node before a change until a new cut falls on an old
  boundary.
- **root**: the first level with at most :data:`ROOT_MAX` entries is kept in
  the content record itself (height 0: a small file's extents inline, no
  nodes at all).
- **content hash** (the content id, the ``hash`` users see):
  ``BLAKE3(b"chronicle-content\\x00" + size + height + root entries)``
  (:func:`content_hash`); the empty file's is ``BLAKE3(b"")``
  (:data:`~chronicle.store.chunks.ids.EMPTY_CONTENT_ID`).

The extent list itself is **canonical**: the chunks of every data run (the
bytes between two holes) are FastCDC over that run from its start
(``chunker``), and a hole is a page-aligned unwritten range of at least
:data:`MIN_HOLE` bytes. So the hash is a function of the file's bytes (and,
for a sparse file, of where its holes are): :func:`hash_data` and
:func:`hash_file` compute it from scratch (``chronicle hash``).

Fan-out was chosen by measurement (README "Content records"): a version of a
32 MiB file (~820 extents of ~40 KiB) costs one leaf of ~40 extents and a
root of ~20 references, about 3 KB, instead of the 33 KB of a flat list.
"""

from __future__ import annotations

import errno
import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence

import blake3

from chronicle.store.chunks.chunker import Chunker
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID, ID_SIZE

Entry = tuple[bytes, int, int]          # (chunk id or node hash, bytes, extents)

CUT_BITS = 5                            # average node: MIN_FANOUT + 32 entries
MIN_FANOUT = 8
MAX_FANOUT = 128
ROOT_MAX = 32
_CUT_MASK = (1 << CUT_BITS) - 1

PAGE = 4096
MIN_HOLE = 64 * 1024                    # holes at least this long (page-aligned) are hole extents

_NODE_TAG = b"chronicle-node\x00"
_CONTENT_TAG = b"chronicle-content\x00"
_EXTENT = struct.Struct("<Q")
_REF = struct.Struct("<QQ")


def encode_entries(height: int, entries: Sequence[Entry]) -> bytes:
    """The bytes of a level's entries: extents (``height == 0``) as id + u64
    length, references as id + u64 bytes + u64 extent count (little-endian)."""
    if height == 0:
        return b"".join(e[0] + _EXTENT.pack(e[1]) for e in entries)
    return b"".join(e[0] + _REF.pack(e[1], e[2]) for e in entries)


def decode_entries(height: int, raw: bytes | memoryview) -> list[Entry]:
    """Inverse of :func:`encode_entries`. Raises ``ValueError`` if the length is wrong."""
    size = ID_SIZE + (8 if height == 0 else 16)
    if len(raw) % size:
        raise ValueError("damaged extent entries")
    raw = bytes(raw)
    out = []
    if height == 0:
        for pos in range(0, len(raw), size):
            out.append((raw[pos:pos + ID_SIZE], _EXTENT.unpack_from(raw, pos + ID_SIZE)[0], 1))
    else:
        for pos in range(0, len(raw), size):
            nbytes, count = _REF.unpack_from(raw, pos + ID_SIZE)
            out.append((raw[pos:pos + ID_SIZE], nbytes, count))
    return out


def node_hash(height: int, body: bytes) -> bytes:
    """The hash (key) of a node of ``height`` whose entries encode to ``body``."""
    return blake3.blake3(_NODE_TAG + bytes([height]) + body).digest()


def content_hash(size: int, height: int, root: Sequence[Entry]) -> bytes:
    """The content id of a content of ``size`` bytes whose root level (of
    ``height``) holds ``root`` (:data:`EMPTY_CONTENT_ID` when empty)."""
    if size == 0:
        return EMPTY_CONTENT_ID
    return blake3.blake3(_CONTENT_TAG + struct.pack("<QB", size, height)
                         + encode_entries(height, root)).digest()


def _is_cut(entry_id: bytes, count: int) -> bool:
    return count >= MAX_FANOUT or (count >= MIN_FANOUT and not entry_id[-1] & _CUT_MASK)


def group(entries: Iterable[Entry]) -> list[list[Entry]]:
    """A level's entries cut into nodes (module docstring: grouping)."""
    out: list[list[Entry]] = []
    cur: list[Entry] = []
    for e in entries:
        cur.append(e)
        if _is_cut(e[0], len(cur)):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


class Built:
    """A tree being built: the new nodes (hash -> ``(height, entries)``) and
    :meth:`ref`, which makes one and returns its reference entry."""

    def __init__(self):
        self.nodes: dict[bytes, tuple[int, list[Entry]]] = {}

    def ref(self, height: int, entries: list[Entry]) -> Entry:
        body = encode_entries(height - 1, entries)
        key = node_hash(height, body)
        self.nodes.setdefault(key, (height, entries))
        return key, sum(e[1] for e in entries), sum(e[2] for e in entries)


def build(extents: Sequence[Entry], built: Built, height: int = 0) -> tuple[int, list[Entry]]:
    """The root ``(height, entries)`` over a level of ``height`` (extents by
    default), grouping upward until a level fits :data:`ROOT_MAX`; new nodes
    go to ``built``."""
    level = list(extents)
    while len(level) > ROOT_MAX:
        level = [built.ref(height + 1, g) for g in group(level)]
        height += 1
    return height, level


Replacement = tuple[int, int, list[Entry]]   # old entries [a, b) become the list


def regroup(item: Callable[[int], Entry], n_old: int, ends: Sequence[int],
            changes: Sequence[Replacement]) -> list[tuple[int, int, list[list[Entry]]]]:
    """Regroup a level after ``changes`` without regrouping all of it.

    The old level has ``n_old`` entries (``item(i)``) grouped into nodes
    ending at the cumulative indices ``ends``; ``changes`` (sorted,
    disjoint) replace old entries ``[a, b)`` by new lists. Returns, sorted,
    ``(g0, g1, groups)``: old nodes ``[g0, g1)`` are replaced by ``groups``
    — the same nodes :func:`group` would make over the whole new level.
    Each re-cut starts at the node holding the entry before a change (its
    start is a boundary of the new grouping too) and stops at the first
    new cut that falls on an old boundary past the change."""
    out: list[tuple[int, int, list[list[Entry]]]] = []
    end_index = {e: k for k, e in enumerate(ends)}
    r = 0
    while r < len(changes):
        g0 = bisect_right(ends, max(changes[r][0] - 1, 0))
        if out and g0 < out[-1][1]:
            g0 = out[-1][1]            # cannot happen: the previous re-cut stopped before this change
        pos = ends[g0 - 1] if g0 else 0
        groups: list[list[Entry]] = []
        cur: list[Entry] = []
        g1 = None
        applied = False
        while g1 is None:
            if r < len(changes) and pos == changes[r][0]:
                a, b, new = changes[r]
                for e in new:
                    cur.append(e)
                    if _is_cut(e[0], len(cur)):
                        groups.append(cur)
                        cur = []
                pos = b
                r += 1
                applied = True
                continue
            if pos >= n_old:
                if cur:
                    groups.append(cur)
                g1 = len(ends)
                break
            e = item(pos)
            cur.append(e)
            pos += 1
            if _is_cut(e[0], len(cur)):
                groups.append(cur)
                cur = []
                k = end_index.get(pos)
                nxt = changes[r][0] if r < len(changes) else n_old + 1
                if k is not None and applied and pos <= nxt - 1:
                    g1 = k + 1
        out.append((g0, g1, groups))
    return out


# --- from scratch: the hash a file's bytes get ---------------------------------------------

_chunker = Chunker()


def runs_and_holes(size: int, data_ranges: Iterable[tuple[int, int]],
                   start: int = 0) -> Iterator[tuple[str, int, int]]:
    """``("data"|"hole", start, end)`` covering ``[start, size)``: the gaps between
    ``data_ranges`` (sorted byte ranges that hold data) that span at least
    :data:`MIN_HOLE` page-aligned bytes are holes, everything else data."""
    tail = start
    for s, e in list(data_ranges) + [(size, size)]:
        hole_start = -(-tail // PAGE) * PAGE
        hole_end = s // PAGE * PAGE
        if hole_end - hole_start >= MIN_HOLE:
            if hole_start > tail:
                yield ("data", tail, hole_start)
            yield ("hole", hole_start, hole_end)
            tail = hole_end
        if e > tail:
            yield ("data", tail, e)
            tail = e
    if tail < size:
        yield ("data", tail, size)


def extents_of(read: Callable[[int, int], bytes], size: int,
               data_ranges: Iterable[tuple[int, int]] | None = None) -> list[Entry]:
    """The canonical extent list of ``size`` bytes read with ``read(offset,
    n)``; ``data_ranges``: where data is (default: everywhere, no holes)."""
    out: list[Entry] = []
    ranges = [(0, size)] if data_ranges is None else data_ranges
    for kind, s, e in runs_and_holes(size, ranges):
        if kind == "hole":
            out.append((HOLE_ID, e - s, 1))
            continue
        reader = _RangeReader(read, s, e)
        for view in _chunker.cut_stream(reader):
            out.append((blake3.blake3(view).digest(), len(view), 1))
    return out


def hash_extents(size: int, extents: Sequence[Entry]) -> bytes:
    """The content hash of a canonical extent list."""
    height, root = build(extents, Built())
    return content_hash(size, height, root)


def hash_data(data: bytes | bytearray | memoryview, holes: Iterable[tuple[int, int]] = ()) -> bytes:
    """The content id Chronicle gives a file holding ``data``; ``holes``:
    unwritten byte ranges (a sparse file's; they read as zeros)."""
    view = memoryview(data)
    size = len(view)
    ranges, pos = [], 0
    for s, e in sorted(holes):
        if s > pos:
            ranges.append((pos, s))
        pos = max(pos, e)
    if pos < size:
        ranges.append((pos, size))
    return hash_extents(size, extents_of(lambda o, n: view[o:o + n], size, ranges))


def data_ranges_of_fd(fd: int, size: int) -> list[tuple[int, int]]:
    """The ranges of an open file that hold data (``SEEK_DATA``/``SEEK_HOLE``;
    all of it where the file system cannot tell)."""
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno == errno.EINVAL:
                return [(pos, size)] if not out else out + [(pos, size)]
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, hole))
        pos = hole
    return out


def hash_file(path: os.PathLike | str | bytes, *, dense: bool = False) -> bytes:
    """The content id Chronicle gives the regular file at ``path`` (bounded
    memory): its holes (``SEEK_HOLE``) of at least :data:`MIN_HOLE` bytes
    count as holes; ``dense``: none do (what receipts hash, so that a copy
    that filled its holes with zeros matches). Raises ``OSError`` (missing,
    unreadable, a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return EMPTY_CONTENT_ID
        ranges = [(0, size)] if dense else data_ranges_of_fd(fd, size)
        return hash_extents(size, extents_of(lambda o, n: os.pread(fd, n, o), size, ranges))
    finally:
        os.close(fd)


class _RangeReader:
    """``readinto`` over ``read(offset, n)`` in ``[start, end)``."""

    def __init__(self, read: Callable[[int, int], bytes], start: int, end: int):
        self._read, self._pos, self._end = read, start, end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        data = self._read(self._pos, n)
        if len(data) < n:
            data = bytes(data) + bytes(n - len(data))
        buf[:n] = data
        self._pos += n
        return n


def update(height: int, levels: Sequence[Sequence[Entry]], ends: Sequence[Sequence[int]],
           item0: Callable[[int], Entry], n0: int, changes: Sequence[Replacement],
           built: Built) -> tuple[int, list[Entry]]:
    """The new root ``(height, entries)`` after ``changes`` to the extents of a tree.

    The old tree has root level ``height``; ``item0(i)`` is its extent ``i``
    (of ``n0``); ``levels[j]`` (``1 <= j <= height``) its level-``j``
    entries, ``levels[height]`` being the root; ``ends[j]`` (``j <
    height``) the cumulative end indices of level ``j``'s nodes. New nodes
    go to ``built``; untouched nodes are reused by reference, so the work
    is proportional to the changes (times the height), not to the file."""
    j, item, n = 0, item0, n0
    while True:
        n_new = n + sum(len(new) - (b - a) for a, b, new in changes)
        if j == height or n_new <= ROOT_MAX:
            level: list[Entry] = []
            pos = 0
            for a, b, new in changes:
                level.extend(item(i) for i in range(pos, a))
                level.extend(new)
                pos = b
            level.extend(item(i) for i in range(pos, n))
            return build(level, built, j)
        done = regroup(item, n, ends[j], changes)
        changes = [(g0, g1, [built.ref(j + 1, g) for g in groups]) for g0, g1, groups in done]
        j += 1
        item, n = levels[j].__getitem__, len(levels[j])
