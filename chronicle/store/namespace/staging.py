"""The write overlay of a file that is open for writing.

Vocabulary:

- **base** — the file's committed content (a :class:`ContentMap`) when the
  overlay was started or last committed.
- **base_valid** — how many leading bytes of the base still hold (a truncate
  below the base's size lowers it; bytes past it read as zeros unless written).
- **staging file** — an anonymous sparse file (``O_TMPFILE`` under
  ``<store>/staging``) with the same layout as the file: written bytes go
  there with ``pwrite``, so a 4 GiB file streams through with bounded memory.
- **materialized page** — a 4 KiB page below ``base_valid`` whose bytes are in
  the staging file (a partial write first copies the page's base bytes in).
  Bytes at or past ``base_valid`` always come from the staging file; there,
  unwritten ranges are holes and read as zeros.
- **prior** — the content a file rewritten whole replaces: the base when it
  is truncated to empty (``O_TRUNC``), or, for a new file at a path that had
  one (unlink + create, rename over a temp file), that content (set by
  ``OpenFiles``). Only a hint: each new chunk at offset ``pos`` is stored, when
  that pays, as a delta against the prior's chunk holding ``pos``
  (:meth:`Overlay.delta_base`; ``ChunkStore.put``'s ``base``).

On flush/fsync the store turns the overlay into a new content record
(``chronicle.store.namespace.content.build_content``), re-chunking only the dirty spans,
and the overlay restarts with that content as its base.

- **streaming** — a file written front to back from an empty start needs no
  staging file at all: its bytes are chunked as they arrive
  (``chronicle.store.namespace.stream``). The first write that is not an append, a
  truncate or a read ends streaming: the chunks emitted so far become a
  provisional base (their content record is written only at commit) and the
  rest goes to the staging file.

Threads: an overlay is used by one thread at a time; the FUSE adapter holds a
per-inode lock while a commit reads it from a worker thread.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from chronicle.errors import FileTooLarge, NoSpace
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.chunks import tree
from chronicle.store.chunks.ids import HOLE_ID
from chronicle.store.meta import schema
from chronicle.store.namespace.content import BuiltContent, ContentMap, build_content, finish_content
from chronicle.store.namespace.stream import Stream

PAGE = 4096
# ext4 with 4 KiB blocks: 2**32 - 1 blocks. Past it: EFBIG, as ext4 answers.
MAX_FILE_SIZE = (2 ** 32 - 1) * PAGE


def _os_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("no space left on the device that holds the store (staging a write)")
    if exc.errno == errno.EFBIG:
        return FileTooLarge()
    return exc


@dataclass(frozen=True, slots=True)
class Piece:
    """A byte range ``[start, end)`` of the file and where its bytes are:
    ``"base"`` (the committed content) or ``"staging"`` (the staging file)."""

    start: int
    end: int
    source: str


class Overlay:
    """Uncommitted changes to one file's content (see the module docstring).

    ``staging_dir``: where the anonymous staging file is made; ``base``: the
    committed content it starts from; ``chunks``: the chunk store to stream
    into (None: never stream).
    """

    def __init__(self, staging_dir: str, base: ContentMap, chunks: ChunkStore | None = None):
        self._staging_dir = staging_dir
        self._chunks = chunks             # ChunkStore, for streaming
        self.base = base
        self.base_valid = base.size
        self.size = base.size
        self._fd: int | None = None
        self._pages: set[int] = set()     # materialized pages (< base_valid)
        self.dirty = False
        self.wrote = False                # data was written (not only truncated)
        self.stream: Stream | None = None
        self.prior: ContentMap | None = None   # delta hints (module docstring)

    # -- reading and writing -----------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the file as it is now (short at EOF)."""
        if self.stream is not None:
            self.leave_stream()
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if not self.dirty:
            return self.base.read(offset, end - offset)
        return b"".join(self.read_piece(p) for p in self.pieces(offset, end))

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; returns ``len(data)``.

        Raises :class:`FileTooLarge` past :data:`MAX_FILE_SIZE`, :class:`NoSpace`.
        """
        end = offset + len(data)
        if end > MAX_FILE_SIZE:
            raise FileTooLarge()
        if not data:
            return 0
        if self.stream is not None:
            if offset == self.size:
                self.stream.append(data)
                self.size = end
                return len(data)
            self.leave_stream()
        elif (offset == 0 and self.size == 0 and self._fd is None and self._chunks is not None
              and not self._pages):
            self.stream = Stream(self._chunks, self.delta_base)
            self.stream.append(data)
            self.size = end
            self.dirty = self.wrote = True
            return len(data)
        fd = self._staging_fd()
        if offset < self.base_valid:
            self._materialize_edges(fd, offset, min(end, self.base_valid))
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise _os_error(exc) from None
        if written != len(data):
            raise NoSpace("short write to the staging file")
        if end > self.size:
            self.size = end
        self.dirty = self.wrote = True
        return written

    def truncate(self, size: int) -> None:
        """Set the file's size; a shrink drops bytes past it, a growth adds zeros."""
        if size > MAX_FILE_SIZE:
            raise FileTooLarge()
        if size == self.size:
            return
        if size == 0:
            # Emptied (O_TRUNC, truncate -s 0): nothing to keep; the next
            # writes may stream again; the old bytes stay the delta hint.
            if self.prior is None and self.base.size:
                self.prior = self.base
            if self.stream is not None:
                self.stream.drain()
                self.stream = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._pages.clear()
            self.base_valid = self.size = 0
            self.dirty = True
            return
        if self.stream is not None:
            self.leave_stream()
        fd = self._staging_fd()
        if size < self.size:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                raise _os_error(exc) from None
            if size < self.base_valid:
                self.base_valid = size
                limit = (size + PAGE - 1) // PAGE
                self._pages = {p for p in self._pages if p < limit}
        self.size = size
        self.dirty = True

    def punch_hole(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset+length)`` within the file (size unchanged)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        zeros = bytes(min(end - offset, 1 << 20))
        pos = offset
        while pos < end:
            n = min(len(zeros), end - pos)
            self.write(pos, zeros[:n])
            pos += n

    # -- commit support ----------------------------------------------------------

    def pieces(self, start: int, end: int) -> list[Piece]:
        """Where the bytes of ``[start, end)`` are, as ordered, merged pieces."""
        out: list[Piece] = []

        def add(s: int, e: int, source: str) -> None:
            if s >= e:
                return
            if out and out[-1].source == source and out[-1].end == s:
                out[-1] = Piece(out[-1].start, e, source)
            else:
                out.append(Piece(s, e, source))

        below = min(end, self.base_valid)
        if start < below:
            first, last = start // PAGE, (below - 1) // PAGE
            if not self._pages:
                pages: list[int] = []
            elif last - first + 1 <= len(self._pages):
                pages = [p for p in range(first, last + 1) if p in self._pages]
            else:
                pages = sorted(p for p in self._pages if first <= p <= last)
            pos = start
            for p in pages:
                ps, pe = max(p * PAGE, start), min((p + 1) * PAGE, below)
                add(pos, ps, "base")
                add(ps, pe, "staging")
                pos = pe
            add(pos, below, "base")
        add(max(start, self.base_valid), end, "staging")
        return out

    def staged_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Runs of materialized pages within ``[start, end)`` (all below
        ``base_valid``), as byte ranges clipped to it."""
        return [(p.start, p.end) for p in self.pieces(start, end) if p.source == "staging"]

    def read_piece(self, piece: Piece) -> bytes:
        """The bytes of ``piece``, from the base or the staging file."""
        if piece.source == "base":
            return self.base.read(piece.start, piece.end - piece.start)
        return self.read_staging(piece.start, piece.end - piece.start)

    def read_staging(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the staging file at ``offset``; holes and bytes
        past its end read as zeros."""
        if self._fd is None:
            return bytes(size)
        data = os.pread(self._fd, size, offset)
        if len(data) < size:
            data += bytes(size - len(data))
        return data

    def dirty_spans(self) -> list[tuple[int, int]]:
        """Byte ranges whose content may differ from the base: materialized
        pages and everything from ``base_valid`` to the end, merged, clipped to size."""
        spans: list[tuple[int, int]] = []
        for p in sorted(self._pages):
            s, e = p * PAGE, min((p + 1) * PAGE, self.base_valid)
            if spans and spans[-1][1] >= s:
                spans[-1] = (spans[-1][0], max(spans[-1][1], e))
            else:
                spans.append((s, e))
        if self.size > self.base_valid:
            s = self.base_valid
            if spans and spans[-1][1] >= s:
                spans[-1] = (spans[-1][0], self.size)
            else:
                spans.append((s, self.size))
        return spans

    def data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of ``[start, end)`` that hold data in the staging file (the rest
        are holes), found with ``SEEK_DATA``/``SEEK_HOLE``."""
        if self._fd is None:
            return []
        out = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            out.append((data, hole))
            pos = hole
        return out

    def rebase(self, base: ContentMap) -> None:
        """After a commit: ``base`` holds everything; start a clean overlay on it."""
        self.base = base
        self.base_valid = self.size = base.size
        self._pages.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.stream = None
        self.dirty = self.wrote = False

    def delta_base(self, pos: int) -> bytes | None:
        """The chunk id of the bytes this file's offset ``pos`` replaces (the
        prior's chunk holding it, else the base's past ``base_valid``), or
        None. Safe from the stream worker (``ContentMap`` reads are)."""
        for old in (self.prior, self.base):
            if old is not None and pos < old.size and (old is self.prior or pos >= self.base_valid):
                chunk_id = old.extent(old.extent_index(pos))[0]
                return None if chunk_id == HOLE_ID else chunk_id
        return None

    # -- streaming -------------------------------------------------------------------

    def leave_stream(self) -> None:
        """End streaming: emitted chunks become a provisional base, the rest
        is staged. Raises what the worker raised (e.g. ``NoSpace``)."""
        stream, self.stream = self.stream, None
        rest = stream.drain()
        record = schema.ContentRecord(stream.emitted, None, b"".join(stream.ids), stream.lengths, v4=True)
        self.base = ContentMap(b"", record, self._chunks)
        self.base_valid = stream.emitted
        if rest:
            fd = self._staging_fd()
            try:
                os.pwrite(fd, rest, stream.emitted)
            except OSError as exc:
                raise _os_error(exc) from None

    def backlogged(self) -> bool:
        """True if the stream worker is more than ``stream.MAX_PENDING`` bytes behind."""
        return self.stream is not None and self.stream.backlogged()

    def wait_stream(self) -> None:
        """Block until the stream worker has caught up (worker thread)."""
        if self.stream is not None:
            self.stream.wait_backlog()

    def commit_cost(self) -> int:
        """Roughly how many bytes a commit has to process now."""
        if self.stream is not None:
            return self.stream.pending_bytes + len(self.stream.carry)
        return sum(e - s for s, e in self.dirty_spans())

    def build(self, chunks: ChunkStore) -> BuiltContent:
        """The new content (worker thread): finishes a stream, or rebuilds the
        dirty spans (``content.build_content``)."""
        if self.stream is not None:
            stream = self.stream
            ids, lengths = stream.finish()
            built = tree.Built()
            height, root = tree.build([(i, n, 1) for i, n in zip(ids, lengths)], built)
            out = finish_content(self.size, height, root, built, getattr(chunks, "nodes", None))
            out.new_chunks, out.new_bytes = stream.new_chunks, stream.new_bytes
            out.used = set(ids) | stream.bases_used
            return out
        return build_content(self, chunks)

    def close(self) -> None:
        """Drop the staging file (uncommitted changes are discarded)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- internals ---------------------------------------------------------------

    def _staging_fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self._staging_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise _os_error(exc) from None
        return self._fd

    def _materialize_edges(self, fd: int, start: int, end: int) -> None:
        """Make pages of ``[start, end)`` (all below base_valid) staging-backed,
        copying base bytes into the first and last page when the write covers
        them only partly."""
        first, last = start // PAGE, (end - 1) // PAGE
        for p in (first, last) if first != last else (first,):
            if p in self._pages:
                continue
            ps, pe = p * PAGE, min((p + 1) * PAGE, self.base_valid)
            if not (start <= ps and end >= pe):
                data = self.base.read(ps, pe - ps)
                try:
                    os.pwrite(fd, data, ps)
                except OSError as exc:
                    raise _os_error(exc) from None
        for p in range(first, last + 1):
            self._pages.add(p)

