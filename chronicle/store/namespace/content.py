"""File content: extent lists, reading them, and building new ones.

Vocabulary: a file's **content** is an ordered **extent list**; an extent is
``(chunk id, length)`` or ``(HOLE_ID, length)`` for a hole (zeros, nothing
stored). A content record (``schema.ContentRecord``) holds the list inline
(a small file) or the root of a persistent tree of extent nodes
(``chunks.tree``, ``meta.nodes``), and is keyed by its **content id**: the
tree hash over the chunk ids (the ``hash`` users see; ``chunks.tree``), a
function of the file's bytes, so a file whose content is unchanged gets no
new version and identical files share one record.

:func:`build_content` makes the new content of a file from its base content
and its overlay (``chronicle.store.namespace.staging``): base extents untouched by a
write are kept as they are; the touched ones are cut again with CDC from the
cut before the change until the new cuts meet the old ones (CDC resynchronises
within a chunk or two), so a 4 KiB change to a large file stores one or two
new chunks (each stored, when that pays, as a zstd delta against the chunk it
replaces: ``ChunkStore.put``'s ``base``), one leaf and the path to the root,
and re-reads nothing else.

Threads: ``build_content`` runs in a worker thread (hashing, chunking and
compression release the GIL); ``ContentMap`` is safe to read from any thread.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

from chronicle.errors import Corrupt
from chronicle.store.chunks import tree
from chronicle.store.chunks.chunker import Chunker
from chronicle.store.chunks.codec import CODEC_RAW
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID, ID_SIZE, hash_bytes, to_hex
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.chunks.tree import MIN_HOLE, PAGE, Entry
from chronicle.store.meta import schema
from chronicle.store.meta.nodes import NodeStore
from chronicle.store.meta.schema import ContentRecord

if TYPE_CHECKING:               # staging.py builds contents with this module: a runtime import would be a cycle
    from chronicle.store.namespace.staging import Overlay

# After this many new chunks in a row that zstd could not shrink, only every
# RAW_STREAK-th is tried (incompressible data: media, archives, random bytes).
RAW_STREAK = 16
_ZEROS = bytes(1 << 20)
_FLAT_LEAF = 1024               # extents of a flat record decoded at a time
READAHEAD = 8 * 1024 * 1024

__all__ = ["MIN_HOLE", "BuiltContent", "ContentMap", "build_content", "finish_content"]


class ContentMap:
    """A readable view of one content record: ``id`` (the content id),
    ``record`` (its extents, inline or a tree root), read through ``chunks``
    (and, for a tree, ``chunks.nodes``: ``meta.nodes.NodeStore``).

    Extents are indexed ``0 .. extent_count - 1`` in file order. A tree's
    inner levels are loaded when the map is made (about one reference per 40
    extents); its leaves are read when first needed, through the node cache,
    so finding an offset is two binary searches. Reads raise ``Corrupt`` if a
    chunk or node is damaged or missing (see ``ChunkStore.get``).
    """

    __slots__ = ("id", "record", "_chunks", "_nodes", "levels", "ends", "_leaf_refs", "_leaf_off",
                 "_leaf_first", "_leaves", "_allocated", "_next_read", "_prefetched")

    def __init__(self, content_id: bytes, record: ContentRecord, chunks: ChunkStore):
        self.id = content_id
        self.record = record
        self._chunks = chunks
        self._nodes: NodeStore | None = getattr(chunks, "nodes", None)
        self._leaves: OrderedDict[int, tuple[list, list]] = OrderedDict()
        if record.height:
            if self._nodes is None:
                raise Corrupt("a tree content needs the store's content nodes")
            self.levels, self.ends = self._nodes.levels(record)
            self._leaf_refs = self.levels[1]
            self._leaf_off = list(accumulate((r[1] for r in self._leaf_refs), initial=0))
            self._leaf_first = [0] + self.ends[0]
        else:
            # A flat record (small, or format 3, or a stream's provisional base) is read in
            # pseudo-leaves of _FLAT_LEAF extents, made when first needed.
            n = len(record.lengths)
            self.levels, self.ends = [], []
            self._leaf_first = list(range(0, n, _FLAT_LEAF)) + [n]
            offsets = record.offsets()
            self._leaf_off = [offsets[i] for i in self._leaf_first] if n else [0, 0]
            if not n:
                self._leaf_first = [0, 0]
            self._leaf_refs = [(b"", self._leaf_off[k + 1] - self._leaf_off[k], 0)
                               for k in range(len(self._leaf_first) - 1)]
        self._allocated: int | None = None
        self._next_read = -1          # where a sequential reader would read next
        self._prefetched = 0          # extents up to this index have been prefetched

    @classmethod
    def empty(cls, chunks: ChunkStore) -> ContentMap:
        """The empty content (no extents; id :data:`EMPTY_CONTENT_ID`)."""
        return cls(EMPTY_CONTENT_ID, schema.empty_record(), chunks)

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.record.size

    @property
    def hash(self) -> bytes | None:
        """The content hash (32 bytes), or None for a format-3 file too sparse to hash."""
        return self.record.hash

    @property
    def extent_count(self) -> int:
        """Number of extents."""
        return self._leaf_first[-1]

    @property
    def canonical(self) -> bool:
        """True if the extents are the canonical chunking of the bytes (format 4)."""
        return self.record.v4 or self.record.size == 0

    def _leaf(self, k: int) -> tuple[list, list]:
        """Leaf ``k``'s extents and their absolute start offsets (plus the end)."""
        hit = self._leaves.get(k)
        if hit is not None:
            return hit
        if not self.record.height:
            ids, lengths = self.record.ids, self.record.lengths
            first, last = self._leaf_first[k], self._leaf_first[k + 1]
            entries = [(ids[i * ID_SIZE:(i + 1) * ID_SIZE], lengths[i], 1) for i in range(first, last)]
            hit = (entries, list(accumulate((e[1] for e in entries), initial=self._leaf_off[k])))
            self._leaves[k] = hit
            if len(self._leaves) > 64:
                self._leaves.popitem(last=False)
            return hit
        height, entries = self._nodes.get(self._leaf_refs[k][0])
        if height != 1:
            raise Corrupt(f"content node {to_hex(self._leaf_refs[k][0])} is not a leaf")
        hit = (entries, list(accumulate((e[1] for e in entries), initial=self._leaf_off[k])))
        self._leaves[k] = hit
        if len(self._leaves) > 64:
            self._leaves.popitem(last=False)
        return hit

    def extent(self, i: int) -> Entry:
        """Extent ``i``: ``(chunk id or HOLE_ID, length, 1)``."""
        k = bisect_right(self._leaf_first, i) - 1
        return self._leaf(k)[0][i - self._leaf_first[k]]

    def extent_index(self, offset: int) -> int:
        """Index of the extent holding byte ``offset`` (``offset < size``)."""
        k = bisect_right(self._leaf_off, offset) - 1
        k = min(k, len(self._leaf_refs) - 1)
        return self._leaf_first[k] + bisect_right(self._leaf(k)[1], offset) - 1

    def extent_span(self, i: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of extent ``i``."""
        k = bisect_right(self._leaf_first, i) - 1
        offs = self._leaf(k)[1]
        j = i - self._leaf_first[k]
        return offs[j], offs[j + 1]

    def iter_extents(self, first: int = 0) -> Iterator[tuple[int, Entry]]:
        """``(start offset, extent)`` from extent ``first`` on."""
        if first >= self.extent_count:
            return
        k = bisect_right(self._leaf_first, first) - 1
        j = first - self._leaf_first[k]
        while k < len(self._leaf_refs):
            entries, offs = self._leaf(k)
            for jj in range(j, len(entries)):
                yield offs[jj], entries[jj]
            k += 1
            j = 0

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)``, short at the end of the content.
        A sequential reader gets the next :data:`READAHEAD` bytes prefetched."""
        end = min(offset + size, self.record.size)
        if offset >= end:
            return b""
        if offset == self._next_read:
            self._readahead(end)
        self._next_read = end
        return b"".join(self.iter_range(offset, end))

    def _readahead(self, end: int) -> None:
        first = max(self.extent_index(end - 1) + 1, self._prefetched)
        last = min(self.extent_index(min(end + READAHEAD, self.record.size) - 1), self.extent_count - 1)
        if first > last:
            return
        ids = []
        for _start, e in self.iter_extents(first):
            if e[0] != HOLE_ID:
                ids.append(e[0])
            if len(ids) > last - first:
                break
        self._prefetched = last + 1
        self._chunks.prefetch(ids)

    def iter_range(self, start: int, end: int) -> Iterator[bytes | memoryview]:
        """The bytes of ``[start, end)`` as consecutive pieces."""
        k = min(bisect_right(self._leaf_off, start) - 1, len(self._leaf_refs) - 1)
        entries, offs = self._leaf(k)
        j = bisect_right(offs, start) - 1
        pos = start
        while pos < end:
            if j >= len(entries):
                k += 1
                entries, offs = self._leaf(k)
                j = 0
            chunk_id = entries[j][0]
            ext_start, ext_end = offs[j], offs[j + 1]
            take_end = min(end, ext_end)
            if chunk_id == HOLE_ID:
                n = take_end - pos
                while n > 0:
                    step = min(n, len(_ZEROS))
                    yield _ZEROS[:step]
                    n -= step
            else:
                data = self._chunks.get(chunk_id)
                if pos == ext_start and take_end == ext_end:
                    yield data
                else:
                    yield memoryview(data)[pos - ext_start:take_end - ext_start]
            pos = take_end
            j += 1

    def allocated_bytes_cached(self) -> int:
        """Bytes not in holes (for ``st_blocks``), computed once."""
        if self._allocated is None:
            self._allocated = sum(e[1] for _s, e in self.iter_extents() if e[0] != HOLE_ID)
        return self._allocated

@dataclass
class BuiltContent:
    """The result of :func:`build_content`: the new record and its id, the
    tree nodes it made (``nodes``: hash -> ``(height, entries)``, some may
    be stored already: ``meta.nodes.reference`` puts the others), what
    was written (for stats), and ``used``: the chunk ids the build passed to
    ``ChunkStore.put`` / ``put_many`` and their delta bases (the commit
    releases their dedup hits, ``ChunkStore.release_hits``)."""

    id: bytes
    record: ContentRecord
    new_chunks: int = 0
    new_bytes: int = 0
    reused_extents: int = 0
    nodes: dict = field(default_factory=dict)
    used: set = field(default_factory=set)


def finish_content(size: int, height: int, root: list[Entry], built: tree.Built,
                   nodes: NodeStore | None, holes: bool = False) -> BuiltContent:
    """The record and id of a content whose tree root is ``(height, root)``
    (new nodes in ``built``, remembered in ``nodes``' cache so the new
    version reads without waiting for its commit); ``holes``: it may have
    hole extents (``ContentRecord.holes``)."""
    if height == 0:
        record = schema.flat_record(size, None, root)
    else:
        record = ContentRecord(size, None, b"", array("Q"), 0, height, root)
    record.v4, record.holes = True, holes
    record.hash = content_id = tree.content_hash(size, height, root)
    if nodes is not None:
        for key, (h, entries) in built.nodes.items():
            nodes.remember(key, h, entries)
    return BuiltContent(content_id, record, nodes=built.nodes)


def read_new(overlay: Overlay, start: int, n: int) -> bytearray:
    """The overlay's bytes ``[start, start + n)`` in one window: the base
    bytes in one read, then the staging file's pages over them (not page by
    page, which costs a Python call per 4 KiB after random writes)."""
    end, ov = start + n, overlay
    window = bytearray(n)
    below = min(end, ov.base_valid)
    if start < below:
        window[:below - start] = ov.base.read(start, below - start)
        for s_, e_ in ov.staged_runs(start, below):
            window[s_ - start:e_ - start] = ov.read_staging(s_, e_ - s_)
    if end > max(start, ov.base_valid):
        s_ = max(start, ov.base_valid)
        window[s_ - start:] = ov.read_staging(s_, end - s_)
    return window


# Layout items of the new file, in order: (kind, start, end, old extent index, old chunk id), kind one of
# "keep" (an untouched data extent), "keephole" (an untouched hole), "data" (bytes to cut), "hole" (a new hole).
_Item = tuple[str, int, int, "int | None", "bytes | None"]


class _RunReader:
    """``readinto`` over one data run of the new file (feeds CDC): the bytes
    of consecutive ``data``/``keep`` items, pulled from the layout as CDC
    asks; a hole or the end of the layout ends the run (``stop``). Notes
    where kept extents start (``keep_at``), how far touched bytes reach
    (``touched_end``) and which old chunk each piece replaces (:meth:`base_at`)."""

    def __init__(self, overlay: Overlay, items: Iterator[_Item], first: _Item):
        self._overlay = overlay
        self._items = items
        self.pos = first[1]
        self._end = first[1]
        self.stop: _Item | None = None
        self._done = False
        self.keep_at: dict[int, int] = {}
        self.touched_end = -1
        self._starts: list[int] = []
        self._olds: list[bytes | None] = []
        self._take(first)

    def _take(self, item: _Item) -> None:
        kind, start, end, index, old_id = item
        if kind == "keep":
            self.keep_at[start] = index
        else:
            self.touched_end = max(self.touched_end, end)
        self._starts.append(start)
        self._olds.append(old_id if old_id != HOLE_ID else None)
        self._end = end

    def base_at(self, offset: int) -> bytes | None:
        """The old chunk id of the item holding ``offset`` (the chunk a new one replaces), if any."""
        i = bisect_right(self._starts, offset) - 1
        return self._olds[i] if i >= 0 else None

    def readinto(self, buf: memoryview) -> int:
        while self.pos >= self._end:
            if self._done:
                return 0
            item = next(self._items, None)
            if item is None or item[0] in ("hole", "keephole"):
                self.stop, self._done = item, True
                return 0
            self._take(item)
        n = min(len(buf), self._end - self.pos)
        buf[:n] = read_new(self._overlay, self.pos, n)
        self.pos += n
        return n


_chunker_local = threading.local()


def _chunker() -> Chunker:
    c = getattr(_chunker_local, "chunker", None)
    if c is None:
        c = _chunker_local.chunker = Chunker()
    return c


class _Build:
    """One :func:`build_content` run (see there)."""

    def __init__(self, overlay: Overlay, chunks: ChunkStore):
        self.ov = overlay
        self.base = overlay.base
        self.chunks = chunks
        self.size = overlay.size
        self.kept_limit = min(overlay.base_valid, self.size)
        self.n = self.base.extent_count
        self.force = not self.base.canonical        # a format-3 base: cut its data again, once
        self.spans = overlay.dirty_spans()
        self.span_ends = [e for _s, e in self.spans]
        self.stats = BuiltContent(b"", None)  # type: ignore[arg-type]
        self.raw_streak = 0          # as in stream.py: stop trying zstd on data it cannot shrink

    def touched_from(self, i: int) -> int | None:
        """The first old extent at or after ``i`` that must be cut again (``n``:
        only the tail past the old extents), or None if none is left."""
        if self.force:
            return i if i < self.n or self.size > self.kept_limit else None
        n, base = self.n, self.base
        if i >= n:
            return n if self.size > self.kept_limit else None
        pos = base.extent_span(i)[0]
        found = n
        k = bisect_right(self.span_ends, pos)          # the first span that ends after pos
        if k < len(self.spans):
            s = max(self.spans[k][0], pos)
            found = base.extent_index(s) if s < base.size else n
        if self.kept_limit < base.size:
            found = min(found, base.extent_index(self.kept_limit))
        if found == n and self.size <= self.kept_limit and self.kept_limit >= base.size:
            return None
        return max(found, i)

    def layout(self, first: int) -> Iterator[_Item]:
        """The new file from old extent ``first`` on (items: see ``_Item``)."""
        base, spans, kept_limit = self.base, self.spans, self.kept_limit
        si = bisect_right(self.span_ends, base.extent_span(first)[0]) if first < self.n else len(spans)
        for i, (s, (cid, length, _n)) in enumerate(base.iter_extents(first), first):
            e = s + length
            if s >= kept_limit:
                break
            while si < len(spans) and spans[si][1] <= s:
                si += 1
            touched = e > kept_limit or (si < len(spans) and spans[si][0] < e) or (self.force and cid != HOLE_ID)
            if cid == HOLE_ID and e >= kept_limit and self.size > kept_limit:
                # the last old hole runs into the new tail: one unwritten range, one hole (canonical)
                inside = [(max(a, s), min(b, kept_limit)) for a, b in spans[si:] if a < kept_limit]
                ranges = inside + self.ov.data_ranges(kept_limit, self.size)
                for kind, a, b in tree.runs_and_holes(self.size, ranges, start=s):
                    yield (kind, a, b, i, HOLE_ID)
                return
            if not touched:
                yield ("keephole" if cid == HOLE_ID else "keep", s, e, i, cid)
            elif cid != HOLE_ID:
                yield ("data", s, min(e, kept_limit), i, cid)
            else:
                yield from self._split_hole(s, min(e, kept_limit), si, i)
        if self.size > kept_limit:
            ranges = self.ov.data_ranges(kept_limit, self.size)
            for kind, s, e in tree.runs_and_holes(self.size, ranges, start=kept_limit):
                yield (kind, s, e, None, None)

    def _split_hole(self, s: int, end: int, si: int, i: int) -> Iterator[_Item]:
        """A touched old hole ``[s, end)``: written pages are data, and what is
        left stays a hole where it spans at least ``MIN_HOLE`` bytes."""
        parts: list[list] = []
        cut, spans = s, self.spans
        while si < len(spans) and spans[si][0] < end:
            ps = max(spans[si][0], s) // PAGE * PAGE
            pe = min(spans[si][1], end)
            if ps > cut:
                parts.append(["hole", cut, ps])
            parts.append(["data", max(ps, cut), pe])
            cut = pe
            si += 1
        if cut < end:
            parts.append(["hole", cut, end])
        aligned: list[list] = []
        for kind, a, b in parts:
            a2, b2 = -(-a // PAGE) * PAGE, b // PAGE * PAGE
            if kind == "data" or b2 - a2 < MIN_HOLE:
                aligned.append(["data", a, b])
                continue
            aligned.extend(p for p in (["data", a, a2], ["hole", a2, b2], ["data", b2, b]) if p[1] < p[2])
        merged: list[list] = []
        for part in aligned:
            if merged and merged[-1][0] == part[0] and merged[-1][2] == part[1]:
                merged[-1][2] = part[2]
            elif part[1] < part[2]:
                merged.append(part)
        for kind, a, b in merged:
            yield (kind, a, b, i, HOLE_ID)

    def window(self, w0: int) -> tuple[int, list[Entry]]:
        """Cut the new file from old extent ``w0`` (a canonical cut) until a
        cut falls on a kept old extent past every change; returns ``(b,
        extents)``: old extents ``[w0, b)`` become ``extents``."""
        items = self.layout(w0)
        out: list[Entry] = []
        touched = False
        item = next(items, None)
        while item is not None:
            kind = item[0]
            if kind in ("hole", "keephole"):
                length = item[2] - item[1]
                if out and out[-1][0] == HOLE_ID:
                    out[-1] = (HOLE_ID, out[-1][1] + length, 1)
                else:
                    out.append((HOLE_ID, length, 1))
                touched = touched or kind == "hole"
                item = next(items, None)
                if touched and item is not None and item[0] == "keep":
                    return item[3], out               # a run starts at a kept extent: resynchronised
                continue
            reader = _RunReader(self.ov, items, item)
            pos = item[1]
            for view in _chunker().cut_stream(reader):
                piece = bytes(view)       # the chunker reuses its buffer; the pack writer keeps this
                replaced = reader.base_at(pos)
                self._put(piece, replaced if replaced is not None else self.ov.delta_base(pos), out)
                pos += len(piece)
                if reader.touched_end >= 0 and pos >= reader.touched_end and pos in reader.keep_at:
                    return reader.keep_at[pos], out
            touched = True
            item = reader.stop
        return self.n, out

    def _put(self, piece: bytes, replaced: bytes | None, out: list[Entry]) -> None:
        chunk_id = hash_bytes(piece)
        probe = self.raw_streak < RAW_STREAK or self.raw_streak % RAW_STREAK == 0
        # ``replaced``: the old chunk this one replaces (the one holding its start offset): stored,
        # when that pays, as a zstd delta against it (``ChunkStore.put``'s ``base``, delta chunks).
        stored_as = self.chunks.put(chunk_id, piece, compress=probe, base=replaced)
        self.stats.used.add(chunk_id)
        if replaced is not None:
            self.stats.used.add(replaced)
        if stored_as is not None:
            self.stats.new_chunks += 1
            self.stats.new_bytes += len(piece)
            self.raw_streak = self.raw_streak + 1 if stored_as == CODEC_RAW else 0
        out.append((chunk_id, len(piece), 1))

    def changes(self) -> list[tuple[int, int, list[Entry]]]:
        """The replaced old extent ranges, sorted: ``(a, b, new extents)``."""
        out: list[tuple[int, int, list[Entry]]] = []
        base, n = self.base, self.n
        i = self.touched_from(0)
        while i is not None:
            w0 = i
            if w0 > 0 and (w0 == n or base.extent(w0)[0] == HOLE_ID or base.extent(w0 - 1)[0] == HOLE_ID):
                w0 -= 1               # the old cut before it ended a run (or a hole): not a cut of the new file
            if out and w0 <= out[-1][1]:
                w0 = out[-1][1]       # the previous window ended on a cut of the new file
            b, extents = self.window(w0)
            if out and out[-1][1] == w0:
                a, _b, before = out.pop()
                if before and extents and before[-1][0] == HOLE_ID == extents[0][0]:
                    extents[0] = (HOLE_ID, before.pop()[1] + extents[0][1], 1)
                w0, extents = a, before + extents
            out.append((w0, b, extents))
            if b >= n:
                break
            i = self.touched_from(b)
        return out


def build_content(overlay: Overlay, chunks: ChunkStore) -> BuiltContent:
    """Turn an overlay (base content + uncommitted changes) into new content.

    Stores new chunks (``chunks.put``) and returns the new record, not yet
    written to the index: the caller records it in a metadata transaction
    (``meta.nodes.reference`` puts its new nodes). Only the touched extents
    are cut again, from the content-defined cut before the first change to
    the first new cut that falls on an old one after it, so the extents stay
    the canonical chunking of the bytes (``chunks.tree``); the tree is then
    updated along the changed paths (``chunks.tree.update``): the work is
    proportional to the change, not to the file. Raises ``NoSpace`` if a pack
    cannot be written, ``Corrupt`` if a base chunk or node is damaged.
    """
    run = _Build(overlay, chunks)
    changes = run.changes()
    base = run.base
    built = tree.Built()
    if base.record.height:
        height, levels, ends = base.record.height, base.levels, base.ends
    else:
        height, levels, ends = 0, [], []
    height, root = tree.update(height, levels, ends, base.extent, run.n, changes, built)
    if base.record.v4:
        holes = base.record.holes
    else:
        holes = any(e[0] == HOLE_ID for _s, e in base.iter_extents())     # a flat format-3 record
    holes = holes or any(e[0] == HOLE_ID for _a, _b, new in changes for e in new)
    result = finish_content(run.size, height, root, built, getattr(chunks, "nodes", None), holes)
    result.new_chunks, result.new_bytes = run.stats.new_chunks, run.stats.new_bytes
    result.reused_extents = run.n - sum(b - a for a, b, _new in changes)
    result.used = run.stats.used
    return result
