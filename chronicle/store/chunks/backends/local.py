"""The local backend: objects are files under the store directory.

An object named ``packs/000001/00000001a3.pack`` is the file
``<store>/packs/000001/00000001a3.pack`` (see ``base`` for names and the
contract). Files are created with ``O_EXCL``, appended with ``writev``
(large appends with ``O_DIRECT``, below), made durable with ``fdatasync`` plus an ``fsync`` of every directory whose
entries changed, and read with ``pread`` through an LRU of open descriptors.
Temporary files of :meth:`LocalBackend.put` start with ``.`` and are never
listed.

**Direct appends.** An append of at least :data:`DIRECT_MIN` bytes (the pack
writer's flusher hands over 4 MiB at a time; a commit's smaller flush keeps
the page cache, whose copy returns sooner than a disk write) is copied into a reused, page-aligned
buffer and written with ``O_DIRECT`` (open(2): the bytes go from that buffer
to the device, not through the page cache), its last partial
:data:`DIO_ALIGN` block with a plain ``pwrite``; the block a direct write
starts in is written again whole (the writer keeps its bytes). Packs are
written once and read rarely soon after, and on this kind of machine filling
fresh page-cache pages is the costliest part of writing a pack: sequential
write of 512 MiB spent 1.7 ms of system time per MiB in the pack flusher
with ``writev``, 0.1 ms with ``O_DIRECT``
(``tools/bench/profiles/README.md``, "Sequential write"). Linux keeps the
page cache coherent with direct writes (it writes back and drops the range
first), so readers see the bytes as before. A file system that refuses
``O_DIRECT`` (EINVAL) gets ``writev`` from then on
(:attr:`LocalBackend.direct_writes`). Durability is unchanged: ``O_DIRECT``
is not a sync; ``fdatasync`` still makes it durable.

**Pack durability of other processes.** Any process may sync the store's
metadata, and that metadata may refer to bytes another process appended to
its own packs (handed to the kernel, not yet on disk). So every object open
for writing is registered in ``<store>/run/active/``: a file named after the
object (``/`` written as ``+``) holding the writer's pid, created with the
object and removed when its writer closes it (durable by then).
:meth:`LocalBackend.sync` ``fdatasync``\\ s every registered object of other
processes too, and removes a registration whose process is gone once its
object is synced (a crash leaves them behind). This is this backend's own
business: callers only see :meth:`~LocalBackend.sync`.

Threads: see ``base``; a :class:`LocalBackend` guards its tables with a lock,
and a writer's ``sync`` and ``close`` with a lock of its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from chronicle.errors import Busy, Corrupt, Exists, InvalidArgument, NoSpace, NotFound
from chronicle.procs import alive
from chronicle.store.chunks.backends.base import Buffer, ObjectInfo

NAMESPACES = ("packs",)
_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_IOV_MAX = 1024
_MAX_OPEN = 64
DIRECT_MIN = 1024 * 1024          # appends from this size on are written with O_DIRECT
DIO_ALIGN = 4096                  # offset and length alignment of O_DIRECT writes (any device's block)
_STAGE_SIZE = 4 * 1024 * 1024 + 2 * DIO_ALIGN    # the aligned copy buffer, one per thread
_stage = threading.local()


def check_name(name: str) -> None:
    """Raise :class:`InvalidArgument` unless ``name`` is a valid object name
    (``base``: components of ``[A-Za-z0-9._-]`` not starting with ``.``, the
    first one a namespace)."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) < 2 or parts[0] not in NAMESPACES or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise InvalidArgument(f"not a valid object name: {name!r}")


def no_space_or_raise(exc: OSError, what: str) -> None:
    """Raise :class:`NoSpace` for ENOSPC/EDQUOT, else re-raise ``exc`` (transient)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(f"no space left on the device that holds the store ({what})") from exc
    raise exc


def pread_exact(fd: int, name: str, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` of object ``name``'s open file
    ``fd``. Raises :class:`~chronicle.errors.Corrupt` if the file ends first."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise Corrupt(f"object {name} is truncated: it ends before byte {offset + length} "
                          f"({length} bytes at {offset} were asked for)")
        data += more
    return data


class LocalBackend:
    """Objects as files under ``root`` (a store directory); registrations of
    open objects under ``active_dir`` (default ``<root>/run/active``). Files
    it creates get permission bits ``file_mode``, directories ``dir_mode``
    (set after creation: the umask does not narrow them; ``chronicle.store.modes``)."""

    durable_while_open = True
    # Large appends with O_DIRECT (module docstring); cleared when the file system refuses it.
    direct_writes = True

    def __init__(self, root: os.PathLike | str, active_dir: os.PathLike | str | None = None,
                 max_open: int = _MAX_OPEN, file_mode: int = 0o600, dir_mode: int = 0o700):
        self.root = Path(root)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.active_dir = Path(active_dir) if active_dir is not None else self.root / "run" / "active"
        self._max_open = max_open
        self._lock = threading.Lock()
        self._writers: dict[str, _LocalWriter] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()   # read descriptors, least recently used first
        self._dirty_dirs: set[Path] = set()                # entries removed since the last sync

    def path(self, name: str) -> Path:
        """The file that holds object ``name``."""
        check_name(name)
        return self.root / name

    # -- writing -------------------------------------------------------------------

    def create(self, name: str) -> _LocalWriter:
        path = self.path(name)
        try:
            dirs = _makedirs(path.parent, self.dir_mode)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
            os.fchmod(fd, self.file_mode)
        except FileExistsError:
            raise Exists(f"object {name} already exists") from None
        except OSError as exc:
            no_space_or_raise(exc, f"creating {name}")
        marker = self.active_dir / name.replace("/", "+")
        try:
            _makedirs(self.active_dir, self.dir_mode)
            marker_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
            try:
                os.fchmod(marker_fd, self.file_mode)
                os.write(marker_fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(marker_fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            no_space_or_raise(exc, f"registering {name}")
        writer = _LocalWriter(self, name, fd, dirs, marker, path)
        with self._lock:
            self._writers[name] = writer
        return writer

    def put(self, name: str, data: Buffer) -> None:
        path = self.path(name)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            dirs = _makedirs(path.parent, self.dir_mode)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
            os.fchmod(fd, self.file_mode)
            try:
                _writev_all(fd, [data])
                os.fdatasync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if self._read_all(path) != bytes(data):
                    raise Exists(f"object {name} already exists with other content") from None
            for directory in dirs:
                _fsync_dir(directory)
        except OSError as exc:
            no_space_or_raise(exc, f"writing {name}")
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        path = self.path(name)
        with self._lock:
            if name in self._writers:
                raise Busy(f"object {name} is still being written")
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def sync(self) -> None:
        with self._lock:
            writers = list(self._writers.values())
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for writer in writers:
            writer.sync()
        self._sync_others()
        for directory in dirs:
            try:
                _fsync_dir(directory)
            except FileNotFoundError:
                pass

    def needs_sync(self) -> bool:
        """False when :meth:`sync` has nothing of this process's to make
        durable: no appended bytes, no created or removed directory entry
        since the last sync. (Other processes' open objects are synced by
        :meth:`sync` whenever it runs.)"""
        with self._lock:
            return bool(self._dirty_dirs) or any(w._dirty or w._dirs for w in self._writers.values())

    # -- reading -------------------------------------------------------------------

    def read(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range of {name}: {length} bytes at {offset}")
        return pread_exact(self._fd(name), name, offset, length)

    def size(self, name: str) -> int:
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            raise NotFound(f"no object {name}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: list[ObjectInfo] = []
        for ns in NAMESPACES:
            if _may_hold(ns, prefix):
                _walk(self.root / ns, ns, prefix, found)
        found.sort(key=lambda info: info.name)
        return iter(found)

    def advise(self, name: str, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd(name), offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, NotFound, InvalidArgument):
            pass

    def release_deleted(self) -> None:
        """Close the cached read descriptors of objects that were deleted
        (by another process: GC), so their disk space comes back."""
        with self._lock:
            for name, fd in list(self._fds.items()):
                try:
                    gone = os.fstat(fd).st_nlink == 0
                except OSError:
                    gone = True
                if gone:
                    del self._fds[name]
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            writers = list(self._writers.values())
        for writer in writers:
            writer.close()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # -- internals -----------------------------------------------------------------

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            path = self.path(name)        # names are checked once, when first opened
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"no object {name}") from None
            self._fds[name] = fd
            if len(self._fds) > self._max_open:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def _read_all(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _forget(self, writer: _LocalWriter) -> None:
        with self._lock:
            if self._writers.get(writer.name) is writer:
                del self._writers[writer.name]

    def _sync_others(self) -> None:
        """fdatasync the objects other processes registered as open (ours
        were synced by their writers); drop registrations of dead processes
        once their object is synced, and of objects that are gone."""
        try:
            markers = list(self.active_dir.iterdir())
        except FileNotFoundError:
            return
        with self._lock:
            own = set(self._writers)
        for marker in markers:
            name = marker.name.replace("+", "/")
            if name in own:
                continue
            try:
                check_name(name)
            except InvalidArgument:
                name = None          # not ours to sync (a registration of an older format)
            if name is not None:
                try:
                    fd = os.open(self.root / name, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    marker.unlink(missing_ok=True)
                    continue
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    no_space_or_raise(exc, f"fdatasync of {name}")
                finally:
                    os.close(fd)
            try:
                owner = int(marker.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and not alive(owner):
                marker.unlink(missing_ok=True)


class _LocalWriter:
    """An object file open for appending (see :class:`~chronicle.store.chunks.backends.base.ObjectWriter`)."""

    def __init__(self, backend: LocalBackend, name: str, fd: int, dirs: set[Path], marker: Path, path: Path):
        self.name = name
        self._backend = backend
        self._fd = fd
        self._path = path
        self._direct_fd: int | None = None   # the same file opened O_DIRECT, at the first large append
        self._dirs = dirs                 # directories whose entries this object changed, fsynced once
        self._marker = marker
        self._dirty = False
        self._closed = False
        self._end = 0                     # the file's size after the last append that succeeded
        self._tail = b""                  # its last _end % DIO_ALIGN bytes (a direct append rewrites them)
        self._lock = threading.Lock()     # sync and close

    def append(self, buffers: Sequence[Buffer]) -> None:
        """Append ``buffers`` (base): with ``writev``, or from
        :data:`DIRECT_MIN` bytes on with ``O_DIRECT`` (module docstring). A
        failed append is rolled back: the file is truncated to where it ended
        before, so its end is known (the pack writer retires it all the same)
        and a full disk gets back the space a partial write took."""
        if self._closed:
            raise ValueError(f"object {self.name} is closed")
        total = sum(len(b) for b in buffers)
        try:
            if total >= DIRECT_MIN and self._backend.direct_writes and self._append_direct(buffers):
                end = self._end + total
                os.lseek(self._fd, end, os.SEEK_SET)
            else:
                _writev_all(self._fd, buffers)
                end = os.lseek(self._fd, 0, os.SEEK_CUR)
                self._tail = _last_bytes(self._tail, buffers, end % DIO_ALIGN)
        except BaseException:
            self._roll_back()
            raise
        self._end = end
        self._dirty = True

    def _append_direct(self, buffers: Sequence[Buffer]) -> bool:
        """Write ``buffers`` at ``_end`` through the thread's aligned buffer:
        whole :data:`DIO_ALIGN` blocks with ``O_DIRECT`` (from the block
        ``_end`` is in, its first bytes being ``_tail``), the last partial
        block with ``pwrite``; sets ``_tail``. Returns False (nothing written)
        if the file system refuses ``O_DIRECT``. Raises :class:`NoSpace`."""
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(self._path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    no_space_or_raise(exc, f"opening {self.name}")
                self._backend.direct_writes = False
                return False
        stage = _stage_buffer()
        at = self._end - len(self._tail)          # aligned: where the stage's first byte goes
        stage[:len(self._tail)] = self._tail
        fill = len(self._tail)
        try:
            for buf in buffers:
                view = memoryview(buf).cast("B")
                while view:
                    n = min(len(view), len(stage) - fill)
                    stage[fill:fill + n] = view[:n]
                    fill += n
                    view = view[n:]
                    if fill == len(stage):
                        whole = fill - fill % DIO_ALIGN
                        _pwrite_all(self._direct_fd, stage[:whole], at)
                        at += whole
                        stage[:fill - whole] = stage[whole:fill]
                        fill -= whole
            whole = fill - fill % DIO_ALIGN
            if whole:
                _pwrite_all(self._direct_fd, stage[:whole], at)
            if fill > whole:
                _pwrite_all(self._fd, stage[whole:fill], at + whole)
        except OSError as exc:
            if exc.errno == errno.EINVAL and at == self._end - len(self._tail):
                self._backend.direct_writes = False      # refused before any byte went out
                self._roll_back()
                return False
            no_space_or_raise(exc, "writing a pack")
        self._tail = bytes(stage[whole:fill])
        return True

    def _roll_back(self) -> None:
        """Truncate the file to its end after the last append that succeeded."""
        try:
            os.ftruncate(self._fd, self._end)
            os.lseek(self._fd, self._end, os.SEEK_SET)
        except OSError:
            pass                          # the end stays unknown; the pack is retired anyway

    def sync(self) -> None:
        with self._lock:
            self._sync()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._sync()
            finally:
                self._closed = True
                os.close(self._fd)
                if self._direct_fd is not None:
                    os.close(self._direct_fd)
                self._backend._forget(self)
            self._marker.unlink(missing_ok=True)

    def _sync(self) -> None:                            # _lock held
        if self._closed:
            return
        if self._dirty:
            self._dirty = False           # cleared first: an append racing with us sets it again
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._dirty = True
                no_space_or_raise(exc, f"fdatasync of {self.name}")
        if self._dirs:
            dirs, self._dirs = self._dirs, set()
            for directory in dirs:
                _fsync_dir(directory)


def _makedirs(directory: Path, mode: int = 0o700) -> set[Path]:
    """Create ``directory`` and missing parents (permission bits ``mode``);
    returns the directories whose entries change when a file is created in
    it (to fsync for durability)."""
    changed = {directory}
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            m.mkdir()
            os.chmod(m, mode)
        except FileExistsError:
            pass
        changed.add(m.parent)
    return changed


def _may_hold(directory: str, prefix: str) -> bool:
    """Can names under ``directory/`` start with ``prefix``?"""
    d = directory + "/"
    return d.startswith(prefix) or prefix.startswith(d)


def _walk(path: Path, rel: str, prefix: str, out: list[ObjectInfo]) -> None:
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue                      # temporary files of put
        name = f"{rel}/{entry.name}"
        try:
            if entry.is_dir(follow_symlinks=False):
                if _may_hold(name, prefix):
                    _walk(Path(entry.path), name, prefix, out)
            elif entry.is_file(follow_symlinks=False) and name.startswith(prefix):
                out.append(ObjectInfo(name, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:
            continue                      # deleted while we listed


def _writev_all(fd: int, buffers: Sequence[Buffer]) -> None:
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
            while i < len(bufs) and not len(bufs[i]):
                i += 1
    except OSError as exc:
        no_space_or_raise(exc, "writing a pack")


def _stage_buffer() -> memoryview:
    """This thread's page-aligned copy buffer for direct appends (anonymous
    ``mmap``: aligned, and its pages stay mapped, so they are not faulted in
    again for every append)."""
    view = getattr(_stage, "view", None)
    if view is None:
        view = _stage.view = memoryview(mmap.mmap(-1, _STAGE_SIZE))
    return view


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (raises OSError)."""
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        data = data[written:]
        offset += written


def _last_bytes(before: bytes, buffers: Sequence[Buffer], count: int) -> bytes:
    """The last ``count`` bytes of ``before`` followed by ``buffers``."""
    if not count:
        return b""
    parts: list[bytes] = []
    need = count
    for buf in reversed(buffers):
        if not need:
            break
        view = memoryview(buf).cast("B")
        take = view[max(0, len(view) - need):]
        parts.append(bytes(take))
        need -= len(take)
    if need:
        parts.append(before[len(before) - need:])
    return b"".join(reversed(parts))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

