"""Packs: the format of the objects that hold chunk records, and their writer.

A million small chunks must not be a million objects, so chunks are appended
to **packs** (as borg's segments and restic's packs) of up to
``MAX_PACK_SIZE`` bytes, stored in a chunk backend (``backends``) under the
name ``packs/<group>/<pack_no>.pack`` (:func:`pack_name`; 256 packs per
group). Each process writing to a store appends to packs of its own, with
random 48-bit **pack numbers**, and never appends to a pack another session
left behind, so a torn tail after a crash is never written over. This module
is the format; the backend is the place: it only stores bytes at names.

Pack format (all integers little-endian)::

    pack   = header record*
    header = b"CHRNPACK" u32 version=1 u32 0                       (16 bytes)
    record = b"CK" u8 codec u8 flags u32 raw_len u32 stored_len
             32-byte chunk id                                       (44 bytes)
             payload (stored_len bytes; codec per chronicle.store.chunks.codec)

Records are self-describing, so the chunk index in LMDB can be checked
against the packs (``chronicle fsck``) or rebuilt from them. A **location**
(:class:`ChunkLocation`) is a pack number, the byte offset of a record's
payload and its stored length.

Durability: :meth:`PackWriter.flush` hands buffered records to the backend
and waits until they are written (enough to survive a killed process);
:meth:`PackWriter.sync` also makes them durable (``ChunkBackend.sync``:
enough to survive a machine crash). The store calls ``flush`` before any
metadata transaction that refers to new chunks, and ``sync`` before syncing
the metadata.

Threads: :class:`PackWriter` and :class:`PackReader` are safe to share
between threads. A writer hands full 4 MiB buffers to its own flusher
thread, which appends them to the backend while callers go on hashing and
compressing; at most 32 MiB wait in its queue.

Write errors (a full disk). A location is handed out before its bytes are
written, so a failed write must never leave a location pointing at bytes
that are not there. When an append to a pack fails (in the flusher or in
``flush``), that pack is **retired**: the local backend has truncated it back
to its last complete write, nothing more is written to it (records still
queued for it are dropped), and every location in it from the failed
write's first byte on is **lost**. The next ``append`` starts a new pack.
The error reaches the caller whose records were lost, not whichever thread
happens to call next: :meth:`PackWriter.check` raises it for a lost location,
and the chunk store calls it before it records a chunk in the index
(``ChunkStore.add_refs``), so the commit that would have referred to the
lost bytes fails with :class:`~chronicle.errors.NoSpace` and a retry writes
the chunk again.
"""

from __future__ import annotations

import re
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import Corrupt, Exists, NotFound
from chronicle.store.chunks.backends.base import ChunkBackend, ObjectWriter
from chronicle.store.chunks.ids import to_hex

PACK_MAGIC = b"CHRNPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")
RECORD_MAGIC = b"CK"
RECORD_HEADER = struct.Struct("<2sBBII32s")
MAX_PACK_SIZE = 16 * 1024 * 1024       # restic's default pack size: GC rewrites and deletes whole packs
PACKS_PREFIX = "packs/"
_WRITE_BUFFER = 4 * 1024 * 1024
_LOST_KEEP = 64 * 1024 * 1024     # bytes of lost writes kept for PackWriter.lost_payload
_MAX_QUEUED = 32 * 1024 * 1024
_PACK_NAME = re.compile(r"packs/([0-9a-f]{6,})/([0-9a-f]{10,})\.pack")


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where one chunk's payload is: pack number, byte offset, stored length."""

    pack_no: int
    offset: int
    stored_len: int


@dataclass(frozen=True, slots=True)
class PackRecord:
    """One record as found by scanning a pack (see :meth:`PackReader.scan`)."""

    chunk_id: bytes
    codec: int
    raw_len: int
    location: ChunkLocation


def pack_name(pack_no: int) -> str:
    """The backend object name of a pack: ``packs/<group>/<pack_no>.pack``,
    in hex, the group being ``pack_no >> 8`` (at least 6 and 10 digits)."""
    return f"{PACKS_PREFIX}{pack_no >> 8:06x}/{pack_no:010x}.pack"


def parse_pack_name(name: str) -> int | None:
    """The pack number a :func:`pack_name` names, or None for any other name."""
    m = _PACK_NAME.fullmatch(name)
    if m is None:
        return None
    pack_no = int(m.group(2), 16)
    return pack_no if pack_name(pack_no) == name else None


def pack_path(packs_root: Path, pack_no: int) -> Path:
    """The file of pack ``pack_no`` in a local store whose ``packs/`` directory
    is ``packs_root`` (the local backend keeps object ``N`` at ``<store>/N``).
    For tests and tools that look at pack files themselves."""
    return Path(packs_root) / pack_name(pack_no)[len(PACKS_PREFIX):]


def random_pack_no() -> int:
    """A fresh 48-bit pack number (the backend's exclusive create catches a collision)."""
    return secrets.randbits(48) | 1


def describe(location: ChunkLocation, chunk_id: bytes) -> str:
    """A short text naming a chunk and where it is, for messages."""
    return f"chunk {to_hex(chunk_id)[:16]} in pack {location.pack_no} at {location.offset}"


class PackWriter:
    """Appends chunk records to this writer's current pack in ``backend``.

    Pack numbers are random (``allocate_pack_no``), so no metadata
    transaction is needed to start a pack. A full pack is **sealed**: no
    more records go to it, and its writer is closed (durable) at the next
    :meth:`sync`.
    """

    def __init__(self, backend: ChunkBackend, allocate_pack_no: Callable[[], int] | None = None,
                 max_pack_size: int = MAX_PACK_SIZE):
        self.backend = backend
        # a backend shared by many machines draws wider numbers (``backends.s3``: 62 bits)
        self._allocate = allocate_pack_no or getattr(backend, "allocate_pack_no", random_pack_no)
        self._max = max_pack_size
        self._lock = threading.Lock()     # the current pack and its buffers
        self._sink: ObjectWriter | None = None
        self._pack_no = -1
        self._size = 0          # bytes of the current pack, buffered ones included
        self._buffers: list = []          # headers and payloads not yet handed to the flusher
        self._buffered = 0
        self._sealed: list[tuple[ObjectWriter, int]] = []   # (writer, pack_no), closed at the next sync
        # The flusher thread appends handed-off buffers while the caller goes
        # on hashing and compressing; ``_cond`` guards its state.
        self._cond = threading.Condition()
        self._queue: deque[tuple[ObjectWriter | None, list, int, int]] = deque()
        self._queued = 0
        self._writing = False
        self._lost: dict[int, tuple[int, BaseException]] = {}   # retired pack -> (first lost offset, error)
        self._lost_writes: dict[int, list[tuple[int, bytes]]] = {}   # pack -> [(start offset, bytes)] lost
        self._lost_bytes = 0
        self._flusher: threading.Thread | None = None
        # called with a pack number before that pack is created (GC's lease, ``gc.leases``)
        self.on_new_pack: Callable[[int], None] | None = None
        self.created: list[int] = []      # every pack this writer created, oldest first

    def open_packs(self) -> set[int]:
        """The packs this writer may still append to or has not closed yet
        (the current one and those sealed since the last :meth:`sync`).
        Lock-free (read under the GIL): it may be called while the writer
        holds its lock (``on_new_pack``)."""
        out = {pack_no for _sink, pack_no in list(self._sealed)}
        if self._sink is not None and self._pack_no >= 0:
            out.add(self._pack_no)
        return out

    def append(self, chunk_id: bytes, codec: int, raw_len: int, payload) -> ChunkLocation:
        """Add one record; returns where its payload will be. ``payload`` is any
        bytes-like object that stays unchanged until written. Raises :class:`NoSpace`
        (possibly for an earlier record, written in the background)."""
        with self._lock:
            record_len = RECORD_HEADER.size + len(payload)
            if (self._sink is None or self._pack_no in self._lost
                    or (self._size + record_len > self._max and self._size > PACK_HEADER.size)):
                self._start_pack()
            offset = self._size + RECORD_HEADER.size
            self._buffers.append(RECORD_HEADER.pack(RECORD_MAGIC, codec, 0, raw_len, len(payload), chunk_id))
            self._buffers.append(payload)
            self._buffered += record_len
            self._size += record_len
            if self._buffered >= _WRITE_BUFFER:
                self._handoff()
            return ChunkLocation(self._pack_no, offset, len(payload))

    def append_many(self, records: list[tuple[bytes, int, int, object]]) -> list[tuple[int, int, int]]:
        """:meth:`append` of each ``(chunk_id, codec, raw_len, payload)`` of
        ``records``, in order, under one lock acquisition (a stream's batch).
        Returns each payload's ``(pack_no, offset, stored_len)``, as the fields
        of a :class:`ChunkLocation`. Raises as :meth:`append`."""
        out: list[tuple[int, int, int]] = []
        pack = RECORD_HEADER.pack
        head = RECORD_HEADER.size
        with self._lock:
            buffers = self._buffers
            for chunk_id, codec, raw_len, payload in records:
                stored = len(payload)
                record_len = head + stored
                if (self._sink is None or self._pack_no in self._lost
                        or (self._size + record_len > self._max and self._size > PACK_HEADER.size)):
                    self._start_pack()
                    buffers = self._buffers
                offset = self._size + head
                buffers.append(pack(RECORD_MAGIC, codec, 0, raw_len, stored, chunk_id))
                buffers.append(payload)
                self._buffered += record_len
                self._size = offset + stored
                out.append((self._pack_no, offset, stored))
                if self._buffered >= _WRITE_BUFFER:
                    self._handoff()
                    buffers = self._buffers
        return out

    def flush(self) -> None:
        """Hand all buffered records to the backend and wait until they are
        written (survives a killed process), or lost: a write error retires
        its pack (module docstring) and is raised by :meth:`check` for the
        locations it lost, not here."""
        with self._lock:
            if self._buffers and self._sink is not None:
                with self._cond:
                    idle = not self._queue and not self._writing
                if idle:
                    # Nothing queued: write here (a small file's commit must
                    # not pay a round trip to the flusher thread).
                    item = self._take()
                    self._write(*item)
                    return
            self._handoff()
        with self._cond:
            while self._queue or self._writing:
                self._cond.wait()

    def check(self, location: ChunkLocation) -> None:
        """Raise the error that lost ``location``'s bytes (usually
        :class:`~chronicle.errors.NoSpace`), if a write lost them; a location
        written, or still buffered, passes."""
        with self._cond:
            lost = self._lost.get(location.pack_no)
        if lost is not None and location.offset - RECORD_HEADER.size >= lost[0]:
            raise _again(lost[1])

    def retired_packs(self) -> set[int]:
        """The packs a write error retired so far (:meth:`check` passes every
        location in any other pack)."""
        with self._cond:
            return set(self._lost)

    def sync(self) -> None:
        """Flush, close the packs sealed since the last sync, then make
        everything durable (``backend.sync()``, which also covers other
        processes' packs on a local store)."""
        self.flush()
        with self._lock:
            if not self.backend.durable_while_open and self._sink is not None:
                self._seal()
            sealed, self._sealed = self._sealed, []
        self._close_sealed(sealed)
        self.backend.sync()

    def close_sealed(self) -> None:
        """Close the packs sealed since the last :meth:`sync` (:meth:`rotate`)
        once their queued records are written; closing makes each durable
        (``ObjectWriter.close``). GC asked for one (``gc.leases``): after this,
        :meth:`open_packs` no longer names it, without waiting for the next
        sync. Blocks on the disk: call it off any event loop."""
        with self._lock:                  # no record is queued meanwhile: the queue only drains
            sealed, self._sealed = self._sealed, []
            with self._cond:
                while self._queue or self._writing:
                    self._cond.wait()
        self._close_sealed(sealed)

    def _close_sealed(self, sealed: list) -> None:
        """Close every sealed writer — all of them even if one fails (an
        object store's failed upload stays queued in its backend, and the
        next sync must still find the others closed), several at once where
        the backend can (``close_writers``: uploads) — then raise the first
        error."""
        first = None
        close_all = getattr(self.backend, "close_writers", None)
        if close_all is not None:
            try:
                close_all([sink for sink, _pack_no in sealed])
            except Exception as exc:      # noqa: BLE001 - raised below, after the others
                first = exc
        else:
            for sink, _pack_no in sealed:
                try:
                    sink.close()
                except Exception as exc:  # noqa: BLE001 - raised below, after the others
                    first = first or exc
        if first is not None:
            raise first
        for sink, pack_no in sealed:
            with self._cond:
                lost = self._lost.get(pack_no)
            if lost is not None and lost[0] <= PACK_HEADER.size:
                self.backend.delete(sink.name)     # a retired pack with no record in it

    def needs_sync(self) -> bool:
        """False when :meth:`sync` would have nothing to do for this writer:
        no record buffered or being written, no sealed pack to close, and
        the backend has nothing unsynced of ours (``backend.needs_sync``;
        a backend without it always needs one). Another process's packs
        are not considered: only metadata committed since the last sync
        can refer to their new bytes (``Store.sync``)."""
        with self._lock:
            if self._buffers or self._sealed:
                return True
        with self._cond:
            if self._queue or self._writing:
                return True
        needs = getattr(self.backend, "needs_sync", None)
        return True if needs is None else needs()

    def close(self) -> None:
        """Sync and close the current pack; stop the flusher. Idempotent."""
        self.sync()
        with self._lock:
            if self._sink is not None:
                self._sink.close()
                self._sink = None
        with self._cond:
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                self._queue.append((None, [], -1, 0))     # stop
                self._cond.notify_all()
        if flusher is not None:
            flusher.join()

    def rotate(self) -> None:
        """Seal the current pack (the next record starts a new one); it is
        closed at the next :meth:`sync`. GC calls it to compact a pack this
        process is still writing."""
        with self._lock:
            if self._sink is not None:
                self._seal()

    @property
    def current_pack(self) -> int:
        return self._pack_no

    # -- internals ------------------------------------------------------------

    def _seal(self) -> None:                            # _lock held
        self._handoff()
        self._sealed.append((self._sink, self._pack_no))
        self._sink = None

    def _start_pack(self) -> None:                      # _lock held
        if self._sink is not None:
            self._seal()
        for _attempt in range(16):
            pack_no = self._allocate()
            if self.on_new_pack is not None:
                self.on_new_pack(pack_no)
            try:
                self._sink = self.backend.create(pack_name(pack_no))
                self.created.append(pack_no)
                break
            except Exists:
                continue
        else:
            raise RuntimeError("could not create a new pack")
        self._pack_no = pack_no
        self._buffers = [PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0)]
        self._buffered = self._size = PACK_HEADER.size

    def _take(self) -> tuple[ObjectWriter, list, int, int]:   # _lock held
        """The buffered records as a write: ``(sink, buffers, pack_no, start offset)``."""
        item = (self._sink, self._buffers, self._pack_no, self._size - self._buffered)
        self._buffers, self._buffered = [], 0
        return item

    def _handoff(self) -> None:                         # _lock held
        """Queue the buffered records for the flusher (waits while it is far behind)."""
        if not self._buffers or self._sink is None:
            return
        size = self._buffered
        item = self._take()
        with self._cond:
            while self._queued > _MAX_QUEUED:
                self._cond.wait()
            self._queue.append(item)
            self._queued += size
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="chronicle-packs", daemon=True)
                self._flusher.start()
            self._cond.notify_all()

    def _write(self, sink: ObjectWriter, bufs: list, pack_no: int, start: int) -> None:
        """Append one write to its pack, unless the pack is retired; on an
        error retire the pack from ``start`` on (the caller of :meth:`check`
        for a lost location gets the error)."""
        with self._cond:
            if pack_no in self._lost:
                self._keep_lost(pack_no, start, bufs)
                return                    # records after a failed write of their pack are lost too
        try:
            sink.append(bufs)
        except BaseException as exc:     # noqa: BLE001 - handed to the callers whose records it lost
            with self._cond:
                self._lost.setdefault(pack_no, (start, exc))
                self._keep_lost(pack_no, start, bufs)
            if not isinstance(exc, Exception):
                raise

    def _keep_lost(self, pack_no: int, start: int, bufs: list) -> None:     # _cond held
        """Keep a copy of a lost write (up to ``_LOST_KEEP`` bytes), so its
        records can be written again once space is freed (:meth:`lost_payload`)."""
        size = sum(len(b) for b in bufs)
        if self._lost_bytes + size <= _LOST_KEEP:
            self._lost_writes.setdefault(pack_no, []).append((start, b"".join(bytes(b) for b in bufs)))
            self._lost_bytes += size

    def lost_payload(self, location: ChunkLocation) -> bytes | None:
        """The payload a failed write lost at ``location``, if a copy was kept
        (the caller verifies it: a caller's buffer may have changed since)."""
        with self._cond:
            writes = list(self._lost_writes.get(location.pack_no, ()))
        for start, data in writes:
            if start <= location.offset and location.offset + location.stored_len <= start + len(data):
                return data[location.offset - start:location.offset - start + location.stored_len]
        return None

    def forget_lost(self, packs: set[int]) -> None:
        """Drop the kept copies of lost writes of ``packs``."""
        with self._cond:
            for pack_no in packs:
                for _start, data in self._lost_writes.pop(pack_no, ()):
                    self._lost_bytes -= len(data)

    def lost_packs(self) -> set[int]:
        """Packs with kept copies of lost writes."""
        with self._cond:
            return set(self._lost_writes)

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                sink, bufs, pack_no, start = self._queue.popleft()
                if sink is None:
                    self._cond.notify_all()
                    return
                self._writing = True
            try:
                self._write(sink, bufs, pack_no, start)
            finally:
                with self._cond:
                    self._writing = False
                    self._queued -= sum(len(b) for b in bufs)
                    self._cond.notify_all()


def _again(error: BaseException) -> BaseException:
    """A fresh exception like ``error`` (one stored error is raised to many callers)."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror)
    try:
        fresh = type(error)(str(error))
    except Exception:             # noqa: BLE001 - an exception class with another signature
        return error
    fresh.__cause__ = error.__cause__
    return fresh


class PackReader:
    """Reads records from the packs of ``backend``."""

    def __init__(self, backend: ChunkBackend):
        self.backend = backend

    def read(self, location: ChunkLocation) -> bytes:
        """The payload at ``location``; raises :class:`Corrupt` if the pack is short or missing."""
        return self._read(location.pack_no, location.offset, location.stored_len)

    def read_header(self, location: ChunkLocation) -> tuple[int, int, bytes]:
        """``(codec, raw_len, chunk_id)`` from the record header before ``location``."""
        raw = self._read(location.pack_no, location.offset - RECORD_HEADER.size, RECORD_HEADER.size,
                         location.offset)
        magic, codec, _flags, raw_len, stored_len, chunk_id = RECORD_HEADER.unpack(raw)
        if magic != RECORD_MAGIC or stored_len != location.stored_len:
            raise Corrupt(f"pack {location.pack_no} has no chunk record at offset {location.offset}")
        return codec, raw_len, chunk_id

    def scan(self, pack_no: int) -> Iterator[PackRecord]:
        """Every complete record of a pack, in order. A torn tail ends the scan
        silently (it is what a crash leaves); a bad header anywhere else raises
        :class:`Corrupt`; a missing pack raises :class:`NotFound`."""
        name = pack_name(pack_no)
        size = self.backend.size(name)
        if size < PACK_HEADER.size:
            return
        magic, version, _ = PACK_HEADER.unpack(self.backend.read(name, 0, PACK_HEADER.size))
        if magic != PACK_MAGIC or version != PACK_VERSION:
            raise Corrupt(f"pack {pack_no} has a bad header")
        pos = PACK_HEADER.size
        while pos + RECORD_HEADER.size <= size:
            magic, codec, _flags, raw_len, stored_len, chunk_id = RECORD_HEADER.unpack(
                self.backend.read(name, pos, RECORD_HEADER.size))
            if magic != RECORD_MAGIC:
                raise Corrupt(f"pack {pack_no} has a bad record header at offset {pos}")
            end = pos + RECORD_HEADER.size + stored_len
            if end > size:
                return
            yield PackRecord(chunk_id, codec, raw_len, ChunkLocation(pack_no, pos + RECORD_HEADER.size, stored_len))
            pos = end

    def advise(self, pack_no: int, offset: int, length: int) -> None:
        """Tell the backend ``[offset, offset+length)`` of a pack will be read
        soon (asynchronous readahead). Never raises."""
        self.backend.advise(pack_name(pack_no), offset, length)

    def list_packs(self) -> dict[int, int]:
        """``{pack_no: size in bytes}`` of every pack present, ascending pack number."""
        sizes = {}
        for info in self.backend.list(PACKS_PREFIX):
            pack_no = parse_pack_name(info.name)
            if pack_no is not None:
                sizes[pack_no] = info.size
        return dict(sorted(sizes.items()))

    def _read(self, pack_no: int, offset: int, length: int, at: int | None = None) -> bytes:
        if offset < 0:
            raise Corrupt(f"pack {pack_no} has no chunk record at offset {offset if at is None else at}")
        try:
            return self.backend.read(pack_name(pack_no), offset, length)
        except NotFound:
            raise Corrupt(f"pack {pack_no} is missing") from None
        except Corrupt:
            raise Corrupt(f"pack {pack_no} is truncated at offset {offset if at is None else at}") from None
        except OverflowError:                    # an offset past what a file can hold: a damaged index record
            raise Corrupt(f"pack {pack_no} has no chunk record at offset {offset if at is None else at}") from None
