"""File content: extent lists, reading them, and building new ones.

Vocabulary: a file's **content** is an ordered **extent list**; an extent is
``(chunk id, length)`` or ``(HOLE_ID, length)`` for a hole (zeros, nothing
stored). A content record (``schema.ContentRecord``) is keyed by its
**content id**: the BLAKE3 of the whole file (the ``hash`` users see), so a
file whose content is unchanged gets no new version and identical files share
one record. For a file whose holes are too large to hash on the spot
(:data:`HASH_HOLE_LIMIT`), the id is the BLAKE3 of the extent list instead and
the record's ``hash`` is None.

:func:`build_content` makes the new content of a file from its base content
and its overlay (``chronicle.store.namespace.staging``): base extents untouched by a
write are kept as they are; only the dirty spans, widened to the enclosing
base extents, are cut again with CDC, so a 4 KiB change to a large file stores
one or two new chunks — each stored, when that pays, as a zstd delta against
the chunk it replaces (:func:`replaced_chunk`, ``ChunkStore.put``'s ``base``).

Threads: ``build_content`` runs in a worker thread (hashing, chunking and
compression release the GIL); ``ContentMap`` is safe to read from any thread.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from chronicle.store.chunks.chunker import Chunker
from chronicle.store.chunks.codec import CODEC_RAW
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID, ID_SIZE, hash_bytes, new_hasher
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ContentRecord

if TYPE_CHECKING:               # staging.py builds contents with this module: a runtime import would be a cycle
    from chronicle.store.namespace.staging import Overlay

# ``(offset, hasher)``: a BLAKE3 state over the first ``offset`` bytes of a file.
HashPrefix = tuple[int, blake3.blake3]

# After this many new chunks in a row that zstd could not shrink, only every
# RAW_STREAK-th is tried (incompressible data: media, archives, random bytes).
RAW_STREAK = 16
# Holes at least this long (and page-aligned) become hole extents.
MIN_HOLE = 64 * 1024
# A file with more hole bytes than this is not hashed at commit time (hashing
# zeros runs at ~4 GB/s; a 10 TiB sparse file would take an hour).
HASH_HOLE_LIMIT = 1 << 32
_ZEROS = bytes(1 << 20)
READAHEAD = 8 * 1024 * 1024


class ContentMap:
    """A readable view of one content record: ``id`` (the content id),
    ``record`` (its extent list), read through ``chunks``.

    Reads raise ``Corrupt`` if a chunk is damaged or missing (see
    ``ChunkStore.get``).
    """

    __slots__ = ("id", "record", "_offsets", "_chunks", "_allocated", "_next_read", "_prefetched")

    def __init__(self, content_id: bytes, record: ContentRecord, chunks: ChunkStore):
        self.id = content_id
        self.record = record
        self._offsets = record.offsets()
        self._chunks = chunks
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
        """BLAKE3 of the bytes (32 bytes), or None for a file too sparse to hash."""
        return self.record.hash

    def extent_index(self, offset: int) -> int:
        """Index of the extent holding byte ``offset`` (``offset < size``)."""
        return bisect_right(self._offsets, offset) - 1

    def extent_span(self, i: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of extent ``i``."""
        return self._offsets[i], self._offsets[i + 1]

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
        last = min(self.extent_index(min(end + READAHEAD, self.record.size) - 1), self.record.extent_count - 1)
        if first > last:
            return
        ids = [cid for cid in (self.record.chunk_id(i) for i in range(first, last + 1)) if cid != HOLE_ID]
        self._prefetched = last + 1
        self._chunks.prefetch(ids)

    def iter_range(self, start: int, end: int) -> Iterator[bytes | memoryview]:
        """The bytes of ``[start, end)`` as consecutive pieces."""
        i = self.extent_index(start)
        pos = start
        offsets, record = self._offsets, self.record
        while pos < end:
            ext_start, ext_end = offsets[i], offsets[i + 1]
            take_end = min(end, ext_end)
            chunk_id = record.ids[i * ID_SIZE:(i + 1) * ID_SIZE]
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
            i += 1

    def allocated_bytes_cached(self) -> int:
        """Bytes not in holes (for ``st_blocks``), computed once."""
        if self._allocated is None:
            total = 0
            ids = self.record.ids
            for i, length in enumerate(self.record.lengths):
                if ids[i * ID_SIZE:(i + 1) * ID_SIZE] != HOLE_ID:
                    total += length
            self._allocated = total
        return self._allocated


@dataclass
class BuiltContent:
    """The result of :func:`build_content`: the new record and its id, what
    was written (for stats), and the BLAKE3 state after the whole content
    (``hasher``; None for a file too sparse to hash) for the next commit."""

    id: bytes
    record: ContentRecord
    new_chunks: int = 0
    new_bytes: int = 0
    reused_extents: int = 0
    hasher: blake3.blake3 | None = None


@dataclass
class _Extents:
    ids: list[bytes] = field(default_factory=list)
    lengths: array = field(default_factory=lambda: array("Q"))
    hole_bytes: int = 0

    def add(self, chunk_id: bytes, length: int) -> None:
        if chunk_id == HOLE_ID and self.ids and self.ids[-1] == HOLE_ID:
            self.lengths[-1] += length
        else:
            self.ids.append(chunk_id)
            self.lengths.append(length)
        if chunk_id == HOLE_ID:
            self.hole_bytes += length


class _PieceReader:
    """``readinto`` over the overlay's bytes in ``[start, end)`` (feeds CDC).

    Each call reads a whole window at once: the base bytes in one read, then
    the staging file's pages over them — not page by page, which costs a
    Python call per 4 KiB after random writes."""

    def __init__(self, overlay: Overlay, start: int, end: int):
        self._overlay = overlay
        self._pos = start
        self._end = end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        start, end, ov = self._pos, self._pos + n, self._overlay
        window = bytearray(n)
        below = min(end, ov.base_valid)
        if start < below:
            window[:below - start] = ov.base.read(start, below - start)
            for s_, e_ in ov.staged_runs(start, below):
                window[s_ - start:e_ - start] = ov.read_staging(s_, e_ - s_)
        if end > max(start, ov.base_valid):
            s_ = max(start, ov.base_valid)
            window[s_ - start:] = ov.read_staging(s_, end - s_)
        buf[:n] = window
        self._pos = end
        return n


_chunker_local = threading.local()


def _chunker() -> Chunker:
    c = getattr(_chunker_local, "chunker", None)
    if c is None:
        c = _chunker_local.chunker = Chunker()
    return c


def build_content(overlay: Overlay, chunks: ChunkStore, hash_prefix: HashPrefix | None = None) -> BuiltContent:
    """Turn an overlay (base content + uncommitted changes) into new content.

    Stores new chunks (``chunks.put``) and returns the new record, not yet
    written to the index: the caller records it in a metadata transaction.
    ``hash_prefix``: ``(offset, hasher)`` — a BLAKE3 state over the first
    ``offset`` bytes, which are unchanged; hashing resumes there instead of
    re-reading them. Raises ``NoSpace`` if a pack cannot be written,
    ``Corrupt`` if a base chunk is damaged.
    """
    base = overlay.base
    size = overlay.size
    kept_limit = min(overlay.base_valid, size)
    spans = overlay.dirty_spans()
    out = _Extents()
    if hash_prefix is not None and hash_prefix[0] <= size:
        skip, hasher = hash_prefix[0], hash_prefix[1].copy()
    else:
        skip, hasher = 0, new_hasher()
    stats = BuiltContent(b"", None)  # type: ignore[arg-type]
    hashing = True

    def feed(pos: int, data: bytes | memoryview) -> None:
        """Hash ``data`` (the file's bytes at ``pos``), less the prefix already hashed."""
        if pos + len(data) <= skip:
            return
        hasher.update(memoryview(data)[skip - pos:] if pos < skip else data)

    # Segments of the new file, in order: ("keep", extent index), ("hole", start, end),
    # ("data", start, end) where data is re-chunked from the overlay.
    segments: list[tuple] = []
    pos = 0
    span_i = 0
    n_extents = base.record.extent_count
    i = 0
    while pos < kept_limit and i < n_extents:
        ext_start, ext_end = base.extent_span(i)
        is_hole = base.record.chunk_id(i) == HOLE_ID
        while span_i < len(spans) and spans[span_i][1] <= ext_start:
            span_i += 1
        touched = span_i < len(spans) and spans[span_i][0] < ext_end
        if ext_end > kept_limit:
            touched = True
        if not touched:
            segments.append(("keep", i))
        elif is_hole:
            # Holes split anywhere: keep the untouched page-aligned parts as holes.
            cut = ext_start
            j = span_i
            while j < len(spans) and spans[j][0] < min(ext_end, kept_limit):
                s = max(spans[j][0], ext_start) // 4096 * 4096
                e = min(spans[j][1], ext_end, kept_limit)
                if s > cut:
                    segments.append(("hole", cut, s))
                segments.append(("data", max(s, cut), e))
                cut = e
                j += 1
            end = min(ext_end, kept_limit)
            if cut < end:
                segments.append(("hole", cut, end))
        else:
            segments.append(("data", ext_start, min(ext_end, kept_limit)))
        pos = ext_end
        i += 1
    if size > kept_limit:
        # Past base_valid every byte is in the staging file; its holes become hole extents.
        tail = kept_limit
        for s, e in overlay.data_ranges(kept_limit, size) + [(size, size)]:
            hole_start = -(-tail // 4096) * 4096
            hole_end = s // 4096 * 4096
            if hole_end - hole_start >= MIN_HOLE:
                segments.append(("data", tail, hole_start))
                segments.append(("hole", hole_start, hole_end))
                tail = hole_end
            segments.append(("data", tail, e))
            tail = max(tail, e)

    # Merge adjacent data segments so CDC sees one stream per dirty region.
    merged: list[tuple] = []
    for seg in segments:
        if seg[0] == "data" and seg[1] >= seg[2]:
            continue
        if seg[0] == "data" and merged and merged[-1][0] == "data" and merged[-1][2] == seg[1]:
            merged[-1] = ("data", merged[-1][1], seg[2])
        elif seg[0] == "hole" and merged and merged[-1][0] == "hole" and merged[-1][2] == seg[1]:
            merged[-1] = ("hole", merged[-1][1], seg[2])
        else:
            merged.append(seg)

    hole_total = sum(max(seg[2] - max(seg[1], skip), 0) for seg in merged if seg[0] == "hole")
    hole_total += sum(base.record.lengths[seg[1]] for seg in merged
                      if seg[0] == "keep" and base.record.chunk_id(seg[1]) == HOLE_ID
                      and base.extent_span(seg[1])[1] > skip)
    if hole_total > HASH_HOLE_LIMIT:
        hashing = False

    chunker = _chunker()
    raw_streak = 0          # as in stream.py: stop trying zstd on data it cannot shrink
    pos = 0
    for seg in merged:
        kind = seg[0]
        if kind == "keep":
            chunk_id = base.record.chunk_id(seg[1])
            length = base.record.lengths[seg[1]]
            out.add(chunk_id, length)
            stats.reused_extents += 1
            if hashing and pos + length > skip:
                if chunk_id == HOLE_ID:
                    _hash_zeros(hasher, pos + length - max(pos, skip))
                else:
                    feed(pos, chunks.get(chunk_id))
            pos += length
        elif kind == "hole":
            length = seg[2] - seg[1]
            out.add(HOLE_ID, length)
            if hashing and pos + length > skip:
                _hash_zeros(hasher, pos + length - max(pos, skip))
            pos += length
        else:
            reader = _PieceReader(overlay, seg[1], seg[2])
            for view in chunker.cut_stream(reader):
                piece = bytes(view)       # the chunker reuses its buffer; the pack writer keeps this
                chunk_id = hash_bytes(piece)
                if hashing:
                    feed(pos, piece)
                probe = raw_streak < RAW_STREAK or raw_streak % RAW_STREAK == 0
                stored_as = chunks.put(chunk_id, piece, compress=probe, base=replaced_chunk(base, pos))
                if stored_as is not None:
                    stats.new_chunks += 1
                    stats.new_bytes += len(piece)
                    raw_streak = raw_streak + 1 if stored_as == CODEC_RAW else 0
                out.add(chunk_id, len(piece))
                pos += len(piece)

    ids = b"".join(out.ids)
    if hashing:
        digest = hasher.digest()
        content_id = digest
    else:
        digest = None
        content_id = hash_bytes(b"chronicle-sparse:" + ids + out.lengths.tobytes())
    stats.id = content_id
    stats.record = ContentRecord(size, digest, ids, out.lengths)
    stats.hasher = hasher if hashing else None
    return stats


def replaced_chunk(base: ContentMap, pos: int) -> bytes | None:
    """The chunk of the previous version ``base`` that a new chunk starting
    at byte ``pos`` replaces — the one holding ``pos`` — or None past its end
    or in a hole: the delta base ``ChunkStore.put`` may store the new chunk
    against (``chunks.index``, delta chunks)."""
    if pos >= base.size:
        return None
    chunk_id = base.record.chunk_id(base.extent_index(pos))
    return None if chunk_id == HOLE_ID else chunk_id


def _hash_zeros(hasher: blake3.blake3, n: int) -> None:
    while n > 0:
        step = min(n, len(_ZEROS))
        hasher.update(_ZEROS[:step] if step < len(_ZEROS) else _ZEROS)
        n -= step
