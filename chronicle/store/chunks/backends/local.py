"""Pack files: where chunk data lives on disk.

A million small chunks must not be a million files, so chunks are appended to
**packs** (as borg's segments and restic's packs): append-only files of up to
``MAX_PACK_SIZE`` bytes under ``<store>/packs/<group>/<pack_no>.pack``. Each
process writing to a store appends to packs of its own, numbered from a
store-wide counter, and never appends to a pack another session left behind,
so a torn tail after a crash is never written over.

Pack format (all integers little-endian)::

    pack   = header record*
    header = b"CHRNPACK" u32 version=1 u32 0                       (16 bytes)
    record = b"CK" u8 codec u8 flags u32 raw_len u32 stored_len
             32-byte chunk id                                       (44 bytes)
             payload (stored_len bytes; codec per chronicle.store.chunks.codec)

Records are self-describing, so the chunk index in LMDB can be checked
against the packs (``chronicle fsck``) or rebuilt from them.

Durability: :meth:`PackWriter.flush` hands buffered records to the kernel
and waits until they are written (enough to survive a killed process);
:meth:`PackWriter.sync` also ``fdatasync``s every pack written since the last
sync (enough to survive a machine crash). The store calls ``flush`` before
any metadata transaction that refers to new chunks, and ``sync`` before
syncing the metadata.

Threads: ``PackWriter`` and ``PackReader`` are safe to share between threads.
A writer hands full 4 MiB buffers to its own flusher thread, which writes
them with ``writev`` while callers go on hashing and compressing; at most
32 MiB wait in its queue. A write error is raised by the next ``append``,
``flush`` or ``sync``.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import Corrupt, NoSpace
from chronicle.procs import alive
from chronicle.store.chunks.ids import to_hex

PACK_MAGIC = b"CHRNPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")
RECORD_MAGIC = b"CK"
RECORD_HEADER = struct.Struct("<2sBBII32s")
MAX_PACK_SIZE = 64 * 1024 * 1024
_WRITE_BUFFER = 4 * 1024 * 1024
_MAX_QUEUED = 32 * 1024 * 1024
_IOV_MAX = 1024


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


def pack_path(root: Path, pack_no: int) -> Path:
    """``<root>/<group>/<pack_no>.pack``; 256 packs per group directory."""
    return root / f"{pack_no >> 8:06x}" / f"{pack_no:010x}.pack"


def _raise_os_error(exc: OSError, what: str) -> None:
    import errno as _errno

    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        raise NoSpace(f"no space left on the device that holds the store ({what})") from exc
    raise exc


def random_pack_no() -> int:
    """A fresh 48-bit pack number (creation with O_EXCL catches a collision)."""
    return secrets.randbits(48) | 1


class PackWriter:
    """Appends chunk records to this process's current pack.

    Pack numbers are random (``allocate_pack_no``), so no metadata
    transaction is needed to start a pack. Every pack with data not yet
    synced is registered in ``active_dir`` (a file named after the pack,
    holding the writer's pid), so that whichever process syncs the store's
    metadata can first make every process's pack data durable
    (:func:`sync_active_packs`).
    """

    def __init__(self, root: Path, active_dir: Path | None = None,
                 allocate_pack_no: Callable[[], int] = random_pack_no, max_pack_size: int = MAX_PACK_SIZE):
        self.root = Path(root)
        self._active_dir = Path(active_dir) if active_dir is not None else None
        self._allocate = allocate_pack_no
        self._max = max_pack_size
        self._lock = threading.Lock()     # the current pack and its buffers
        self._fd: int | None = None
        self._pack_no = -1
        self._size = 0          # bytes of the current pack, buffered ones included
        self._buffers: list = []          # headers and payloads not yet handed to the flusher
        self._buffered = 0
        self._closing: list[int] = []     # sealed packs, closed after their sync
        self._active: dict[int, int] = {}  # fd -> pack_no of packs registered as active
        self._new_dirs: set[Path] = set()  # group directories to fsync at the next sync
        # The flusher thread writes handed-off buffers (writev) while the
        # caller goes on hashing and compressing; ``_cond`` guards its state.
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, list]] = deque()
        self._queued = 0
        self._writing = False
        self._written_fds: set[int] = set()   # fds written since the last sync
        self._error: BaseException | None = None
        self._flusher: threading.Thread | None = None

    def append(self, chunk_id: bytes, codec: int, raw_len: int, payload) -> ChunkLocation:
        """Add one record; returns where its payload will be. ``payload`` is any
        bytes-like object that stays unchanged until written. Raises :class:`NoSpace`
        (possibly for an earlier record, written in the background)."""
        with self._lock:
            record_len = RECORD_HEADER.size + len(payload)
            if self._fd is None or (self._size + record_len > self._max and self._size > PACK_HEADER.size):
                self._start_pack()
            offset = self._size + RECORD_HEADER.size
            self._buffers.append(RECORD_HEADER.pack(RECORD_MAGIC, codec, 0, raw_len, len(payload), chunk_id))
            self._buffers.append(payload)
            self._buffered += record_len
            self._size += record_len
            if self._buffered >= _WRITE_BUFFER:
                self._handoff()
            return ChunkLocation(self._pack_no, offset, len(payload))

    def flush(self) -> None:
        """Hand all buffered records to the kernel and wait until they are
        written (survives a killed process). Raises :class:`NoSpace`."""
        with self._lock:
            if self._buffers and self._fd is not None:
                with self._cond:
                    idle = not self._queue and not self._writing
                if idle:
                    # Nothing queued: write here (a small file's commit must
                    # not pay a round trip to the flusher thread).
                    fd, bufs, self._buffers, self._buffered = self._fd, self._buffers, [], 0
                    _writev_all(fd, bufs)
                    with self._cond:
                        self._written_fds.add(fd)
                        self._raise()
                    return
            self._handoff()
        with self._cond:
            while self._queue or self._writing:
                self._cond.wait()
            self._raise()

    def sync(self) -> None:
        """Flush, then fdatasync every pack written since the last sync."""
        self.flush()
        with self._lock:
            closing, self._closing = self._closing, []
        with self._cond:
            fds, self._written_fds = self._written_fds, set()
        fds |= set(closing)
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                _raise_os_error(exc, "fdatasync of a pack")
        if fds:
            self._sync_dirs()
        for fd in closing:
            pack_no = self._active.pop(fd, None)
            if pack_no is not None and self._active_dir is not None:
                (self._active_dir / f"{pack_no:012x}").unlink(missing_ok=True)
            os.close(fd)

    def close(self) -> None:
        """Sync and close the current pack; stop the flusher."""
        self.sync()
        with self._lock:
            if self._fd is not None:
                pack_no = self._active.pop(self._fd, None)
                if pack_no is not None and self._active_dir is not None:
                    (self._active_dir / f"{pack_no:012x}").unlink(missing_ok=True)
                os.close(self._fd)
                self._fd = None
        with self._cond:
            self._queue.append((-1, []))     # stop
            self._cond.notify_all()

    @property
    def current_pack(self) -> int:
        return self._pack_no

    def own_packs(self) -> set[int]:
        """Packs this writer registered as active."""
        with self._lock:
            return set(self._active.values())

    # -- internals ------------------------------------------------------------

    def _start_pack(self) -> None:                      # _lock held
        if self._fd is not None:
            self._handoff()
            self._closing.append(self._fd)   # fdatasync'd and closed at the next sync
        for _attempt in range(16):
            self._pack_no = self._allocate()
            path = pack_path(self.root, self._pack_no)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                _raise_os_error(exc, "creating a pack")
        else:
            raise RuntimeError("could not create a new pack file")
        if self._active_dir is not None:
            self._active_dir.mkdir(parents=True, exist_ok=True)
            (self._active_dir / f"{self._pack_no:012x}").write_text(f"{os.getpid()}\n")
        self._new_dirs.add(path.parent)
        self._active[self._fd] = self._pack_no
        self._buffers = [PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0)]
        self._buffered = self._size = PACK_HEADER.size

    def _handoff(self) -> None:                         # _lock held
        """Queue the buffered records for the flusher (waits while it is far behind)."""
        if not self._buffers or self._fd is None:
            return
        item, size = (self._fd, self._buffers), self._buffered
        self._buffers, self._buffered = [], 0
        with self._cond:
            self._raise()
            while self._queued > _MAX_QUEUED and self._error is None:
                self._cond.wait()
            self._raise()
            self._queue.append(item)
            self._queued += size
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="chronicle-packs", daemon=True)
                self._flusher.start()
            self._cond.notify_all()

    def _raise(self) -> None:                           # _cond held
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                fd, bufs = self._queue.popleft()
                if fd < 0:
                    self._flusher = None
                    return
                self._writing = True
            error = None
            try:
                _writev_all(fd, bufs)
            except BaseException as exc:     # noqa: BLE001 - handed to the next caller
                error = exc
            with self._cond:
                self._writing = False
                self._queued -= sum(len(b) for b in bufs)
                self._written_fds.add(fd)
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

    def _sync_dirs(self) -> None:
        with self._lock:
            dirs, self._new_dirs = self._new_dirs, set()
        for directory in dirs | {self.root}:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class PackReader:
    """Reads chunk payloads from packs, keeping an LRU of open file descriptors."""

    def __init__(self, root: Path, max_open: int = 64):
        self.root = Path(root)
        self._max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, location: ChunkLocation) -> bytes:
        """The payload at ``location``; raises :class:`Corrupt` if the pack is short or missing."""
        fd = self._fd(location.pack_no)
        data = os.pread(fd, location.stored_len, location.offset)
        if len(data) != location.stored_len:
            raise Corrupt(f"pack {location.pack_no} is truncated at offset {location.offset}")
        return data

    def read_header(self, location: ChunkLocation) -> tuple[int, int, bytes]:
        """``(codec, raw_len, chunk_id)`` from the record header before ``location``."""
        fd = self._fd(location.pack_no)
        raw = os.pread(fd, RECORD_HEADER.size, location.offset - RECORD_HEADER.size)
        if len(raw) != RECORD_HEADER.size:
            raise Corrupt(f"pack {location.pack_no} is truncated at offset {location.offset}")
        magic, codec, _flags, raw_len, stored_len, chunk_id = RECORD_HEADER.unpack(raw)
        if magic != RECORD_MAGIC or stored_len != location.stored_len:
            raise Corrupt(f"pack {location.pack_no} has no chunk record at offset {location.offset}")
        return codec, raw_len, chunk_id

    def scan(self, pack_no: int) -> Iterator[PackRecord]:
        """Every complete record of a pack, in order. A torn tail ends the scan
        silently (it is what a crash leaves); a bad header anywhere else raises
        :class:`Corrupt`."""
        path = pack_path(self.root, pack_no)
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(PACK_HEADER.size)
            if len(header) < PACK_HEADER.size:
                return
            magic, version, _ = PACK_HEADER.unpack(header)
            if magic != PACK_MAGIC or version != PACK_VERSION:
                raise Corrupt(f"pack {pack_no} has a bad header")
            pos = PACK_HEADER.size
            while pos + RECORD_HEADER.size <= size:
                f.seek(pos)
                magic, codec, _flags, raw_len, stored_len, chunk_id = RECORD_HEADER.unpack(
                    f.read(RECORD_HEADER.size))
                if magic != RECORD_MAGIC:
                    raise Corrupt(f"pack {pack_no} has a bad record header at offset {pos}")
                end = pos + RECORD_HEADER.size + stored_len
                if end > size:
                    return
                yield PackRecord(chunk_id, codec, raw_len, ChunkLocation(pack_no, pos + RECORD_HEADER.size, stored_len))
                pos = end

    def advise(self, pack_no: int, offset: int, length: int) -> None:
        """Tell the kernel ``[offset, offset+length)`` of a pack will be read
        soon (``POSIX_FADV_WILLNEED``: asynchronous readahead). Never raises."""
        try:
            os.posix_fadvise(self._fd(pack_no), offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, Corrupt):
            pass

    def list_packs(self) -> list[int]:
        """Numbers of all packs present, ascending."""
        found = []
        if self.root.is_dir():
            for group in self.root.iterdir():
                if group.is_dir():
                    for entry in group.iterdir():
                        if entry.suffix == ".pack":
                            try:
                                found.append(int(entry.stem, 16))
                            except ValueError:
                                pass
        return sorted(found)

    def total_size(self) -> int:
        """Bytes of all packs on disk."""
        return sum(pack_path(self.root, n).stat().st_size for n in self.list_packs())

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, pack_no: int) -> int:
        with self._lock:
            fd = self._fds.get(pack_no)
            if fd is not None:
                self._fds.move_to_end(pack_no)
                return fd
            try:
                fd = os.open(pack_path(self.root, pack_no), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise Corrupt(f"pack {pack_no} is missing") from None
            self._fds[pack_no] = fd
            if len(self._fds) > self._max_open:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd


def _writev_all(fd: int, buffers: list) -> None:
    """Write all ``buffers`` at the end of ``fd``. Raises :class:`NoSpace`."""
    bufs = [memoryview(b) for b in buffers]
    i = 0
    try:
        while i < len(bufs):
            written = os.writev(fd, bufs[i:i + _IOV_MAX])
            while written:
                if written >= len(bufs[i]):
                    written -= len(bufs[i])
                    i += 1
                else:
                    bufs[i] = bufs[i][written:]
                    written = 0
    except OSError as exc:
        _raise_os_error(exc, "writing a pack")


def sync_active_packs(root: Path, active_dir: Path, own: set[int]) -> None:
    """fdatasync the packs other processes registered as having unsynced
    data (ours, ``own``, are synced by our writer). A registration left by a
    process that is gone is removed once its pack is synced."""
    if not active_dir.is_dir():
        return
    for marker in active_dir.iterdir():
        try:
            pack_no = int(marker.name, 16)
        except ValueError:
            continue
        if pack_no in own:
            continue
        try:
            fd = os.open(pack_path(root, pack_no), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            marker.unlink(missing_ok=True)
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        try:
            owner = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and not alive(owner):
            marker.unlink(missing_ok=True)


def describe(location: ChunkLocation, chunk_id: bytes) -> str:
    """A short text naming a chunk and where it is, for messages."""
    return f"chunk {to_hex(chunk_id)[:16]} in pack {location.pack_no} at {location.offset}"
