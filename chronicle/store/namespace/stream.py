"""Streaming commits: chunking a file while it is written front to back.

Most files are written once, sequentially, from an empty start (created or
truncated, then ``write, write, ..., close``). For them the overlay keeps no
staging file: written bytes queue in memory and a worker cuts them into CDC
chunks in batches, hashing each chunk and storing it in a pack as it goes
(the content hash is the tree hash over those chunk ids, made at finish). Closing then only has the tail to finish, and
the data is written to disk once (into a pack) instead of twice.

Vocabulary:

- **pending** — bytes written but not yet handed to the worker;
- **carry** — the last CDC chunk of the previous batch: its end was the end
  of the data seen so far, not a content-defined cut, so it is cut again
  with the next batch;
- **emitted** — chunks that are final: stored, in the extent list.

Only one batch per file is in flight, so chunks are emitted in order. A
writer that gets more than :data:`MAX_PENDING` bytes ahead of the worker
waits (:meth:`Stream.backlogged`). A write that is not an append, a
truncate or a read ends streaming (``Overlay`` turns the emitted chunks into
a provisional base and writes the rest to a staging file).

Threads: the FUSE loop calls :meth:`Stream.append`; batches run on a shared
worker pool, each starting the next when the writer got ahead;
:meth:`Stream.wait_backlog`, :meth:`Stream.wait`, :meth:`Stream.finish` and
:meth:`Stream.drain` block (call them from a worker thread, or where a short
wait is acceptable). State shared with the worker is under ``_cond``.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chronicle.store.chunks.chunker import Chunker
from chronicle.store.chunks.codec import CODEC_DELTA, CODEC_RAW, hash_many
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.namespace.content import RAW_STREAK

BATCH = 8 * 1024 * 1024
MAX_PENDING = 32 * 1024 * 1024
# New chunks in a row that had a base but were not worth a delta (a file
# rewritten with unrelated data), after which bases are tried only now and then.
DELTA_MISSES = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_chunker = Chunker()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chronicle-stream")
        return _pool


class Stream:
    """The streaming state of one overlay (see the module docstring).
    ``base_at(pos)``: the id of the old chunk a new chunk starting at byte
    ``pos`` replaces (``Overlay.delta_base``), or None; new chunks are stored
    as deltas against it when that pays (``ChunkStore.put_many``'s ``bases``)."""

    def __init__(self, chunks: ChunkStore, base_at: Callable[[int], bytes | None] | None = None):
        self._chunks = chunks
        self._base_at = base_at
        self._cond = threading.Condition()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.carry = b""
        self.ids: list[bytes] = []
        self.lengths = array("Q")
        self.emitted = 0                  # bytes in emitted chunks
        self.new_chunks = 0
        self.new_bytes = 0
        self.bases_used: set[bytes] = set()     # delta bases passed to put_many (their hits: BuiltContent.used)
        self._busy = False                # a batch is in flight
        self._raw_streak = 0              # consecutive new chunks zstd could not shrink
        self._delta_misses = 0            # consecutive new chunks with a base not stored as a delta
        self._error: BaseException | None = None

    def append(self, data: bytes) -> None:
        """Queue written bytes; starts a batch when enough are pending. Raises
        the error a previous batch hit (e.g. ``NoSpace``)."""
        with self._cond:
            self._raise()
            self.pending.append(data)
            self.pending_bytes += len(data)
            if not self._busy and self.pending_bytes >= BATCH:
                self._start()

    def backlogged(self) -> bool:
        """True if the writer should wait for the worker (:meth:`wait_backlog`)."""
        return self.pending_bytes >= MAX_PENDING

    def wait_backlog(self) -> None:
        """Block until fewer than :data:`MAX_PENDING` bytes are pending."""
        with self._cond:
            while self.pending_bytes >= MAX_PENDING and self._error is None:
                if not self._busy:
                    self._start()
                self._cond.wait()
            self._raise()

    def wait(self) -> None:
        """Block until no batch is in flight; re-raise a batch's error."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._raise()

    def finish(self) -> tuple[list[bytes], array]:
        """Cut everything, the tail included. Returns ``(ids, lengths)``: the
        canonical chunking of the file (one run from offset 0)."""
        self.wait()
        batch = self.pending
        self.pending, self.pending_bytes = [], 0
        try:
            self._cut(batch, True)
        except BaseException as exc:
            with self._cond:
                self._error = exc         # the tail is gone: every later finish fails the same way
            raise
        return self.ids, self.lengths

    def drain(self) -> bytes:
        """Stop streaming: wait for the worker, return the bytes not yet
        emitted (carry and pending), which the caller stages."""
        self.wait()
        rest = self.carry + b"".join(self.pending)
        self.carry, self.pending, self.pending_bytes = b"", [], 0
        return rest

    # -- the worker --------------------------------------------------------------------

    def _start(self) -> None:                       # condition held
        batch = self.pending                        # joined by the worker, not on the FUSE thread
        self.pending, self.pending_bytes = [], 0
        self._busy = True
        _executor().submit(self._run, batch)

    def _run(self, batch: list[bytes]) -> None:
        try:
            self._cut(batch, False)
        except BaseException as exc:                # noqa: BLE001 - handed to the writer
            with self._cond:
                self._error = exc
                self._busy = False
                self._cond.notify_all()
            return
        with self._cond:
            self._busy = False
            if self.pending_bytes >= BATCH:
                self._start()                       # the writer got ahead: keep going
            self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _cut(self, batch: list[bytes], final: bool) -> None:
        pieces = self._split(batch, final)
        if not pieces:
            return
        # Stored RAW_STREAK chunks at a time (ChunkStore.put_many: zstd on the
        # second core). Incompressible streams (media, archives, random data):
        # after a run of chunks zstd could not shrink, probe only every 16th.
        pos = self.emitted
        hashes = hash_many(pieces)                         # on two cores (codec.hash_many)
        sizes = [len(piece) for piece in pieces]
        for start in range(0, len(pieces), RAW_STREAK):
            end = start + RAW_STREAK
            part = list(zip(hashes[start:end], pieces[start:end]))
            bases = None
            if self._base_at is not None:
                # data unlike what it replaces: after DELTA_MISSES misses in a row,
                # only the first RAW_STREAK chunks of each batch try their base
                tries = self._delta_misses < DELTA_MISSES or start == 0
                bases = []
                for size in sizes[start:end]:
                    bases.append(self._base_at(pos) if tries else None)
                    pos += size
            streak = self._raw_streak
            probes = [streak + k < RAW_STREAK or (streak + k) % RAW_STREAK == 0 for k in range(len(part))]
            # a stream whose last new chunk compressed skips the 4 KiB sample (codec.encode)
            sample = self._raw_streak > 0 or not self.new_chunks
            stored = self._chunks.put_many(part, probes, sample=sample, bases=bases)
            if bases is not None:
                self.bases_used.update(b for b in bases if b is not None)
            for k, stored_as in enumerate(stored):
                if stored_as is None:
                    continue                               # the store had it (dedup)
                if bases is not None and bases[k] is not None:
                    self._delta_misses = 0 if stored_as == CODEC_DELTA else self._delta_misses + 1
                self.new_chunks += 1
                self.new_bytes += sizes[start + k]
                self._raw_streak = self._raw_streak + 1 if stored_as == CODEC_RAW else 0
        self.ids.extend(hashes)
        self.lengths.extend(sizes)
        self.emitted += sum(sizes)

    def _split(self, batch: list[bytes], final: bool) -> list[memoryview]:
        """The final CDC chunks of ``carry`` + ``batch`` (the tail too if
        ``final``), as views of one joined buffer; sets ``carry`` to the last
        chunk otherwise (its end was the end of the data seen so far).

        The batch is joined (one copy) rather than cut in place: cutting each
        1 MiB write in place (a cut found before a buffer's end is final)
        kept the writes alive until their chunks were written, and glibc
        then gave the FUSE loop fresh pages for its next requests (50-80
        page faults per MiB on the loop thread instead of 1-15, +0.1-0.2 ms
        of loop CPU per MiB, measured; tools/bench/profiles/README.md)."""
        data = b"".join([self.carry, *batch]) if self.carry or len(batch) != 1 else batch[0]
        if not data:
            return []
        pieces = _chunker.split(data)
        self.carry = b"" if final else bytes(pieces.pop())
        return pieces
