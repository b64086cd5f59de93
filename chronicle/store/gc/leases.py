"""Leases: what other processes of a store are using, told to GC across processes.

GC (the CLI's ``chronicle gc``, a daemon's background GC) and the processes
that read and write a store are different processes, sharing one LMDB
environment and one pack directory. Each process that writes chunks or holds
open ``.chronicle/at/`` handles keeps a **lease**: the file
``<store>/run/leases/<pid>-<token>.json``, replaced atomically (write a
temporary file, ``rename``), holding::

    {"pid": 123, "heartbeat": <ns since the epoch>,
     "pins": [[ws_id, seq], ...],        # trees an open handle reads
     "packs": [pack_no, ...],            # packs that may hold chunks not yet in the index
     "busy_since": <ns> | null,          # oldest dedup hit not yet committed
     "tracks": [ws_id, ...],             # workspaces it has open for writing
     "open": [[ws_id, ino], ...]}        # their open files (computed after "heartbeat")

A lease is written **before** the event it announces: before the process
creates a pack (:class:`~chronicle.store.chunks.packs.PackWriter` calls
:meth:`Lease.announce_pack` first), before its first chunk write, and when
an ``at/`` handle is opened (:meth:`Lease.pin`), and when a workspace is
opened for writing (:meth:`Lease.track`, called by ``Store.open_workspace``). It is refreshed
(``heartbeat``, ``packs``, ``busy_since`` recomputed) at most every
:data:`LEASE_INTERVAL` seconds by whoever runs the process's periodic work
(the daemon's sync loop); a lease of a process that is gone is ignored and
removed by GC.

How GC uses leases (``gc.compact``, ``gc.prune``):

- **pins** are pins of the prune (``gc.dryrun.pins``), re-read before every
  prune batch; a pin of a fork also pins its parent at ``min(seq, fork_seq)``;
- **packs** are never compacted or deleted (chunks another process wrote
  and will put in the index when its commit lands: "pending");
- a pack a live process is still appending to holds dead chunks: GC
  writes their numbers to ``run/gc-rotate`` (:func:`request_rotation`);
  each process checks that file when it refreshes its lease and, if it
  writes one of them, seals it (``on_rotate``: ``PackWriter.rotate``), so
  after its next sync (the mount daemon: at once, ``Lease.take_rotation``
  then ``PackWriter.close_sealed``) the lease no longer names it and GC
  compacts it;
- **dead chunks** (refcount 0) are dropped only when every live lease has a
  heartbeat newer than the end of GC's sweep and no dedup hit older than it
  (a process that found a chunk in the index, then still live, skips writing
  it and counts on it at its commit); :func:`writers_settled` checks it;
- **open files**: a deleted file's last inode record (nlink 0, the
  workspace's newest record of that inode) is what a process that still
  holds the file open reads; GC rewrites it only when :class:`DeletedFiles`
  says no process can: not open in this process, and every other lease
  that tracks the workspace was refreshed after the deletion (an unlinked
  file cannot be opened again) and does not list it open.

:class:`GcLock` (``run/gc.lock``, ``flock``) lets one GC run at a time.

Threads: a :class:`Lease` guards its state with a lock; any thread may call it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chronicle.errors import Busy
from chronicle.procs import alive

if TYPE_CHECKING:
    from chronicle.store.modes import StoreModes

LEASE_INTERVAL = 2.0        # seconds between two refreshes of a live lease
ROTATE_FILE = "gc-rotate"   # in the run directory: packs a GC asks their writers to seal (JSON list)
DELETION_MARGIN_NS = 2_000_000_000   # a lease shows a deletion's open files once refreshed this long after it
LEASES_DIR = "leases"


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One live lease as GC reads it (module docstring)."""

    pid: int
    heartbeat: int
    pins: tuple[tuple[int, int], ...]
    packs: frozenset[int]
    busy_since: int | None
    tracks: frozenset[int] = frozenset()
    open: frozenset[tuple[int, int]] = frozenset()


class Lease:
    """This process's lease in ``run_dir`` (module docstring).

    ``state`` returns ``(packs, busy_since)`` of the process's chunk store
    (``ChunkStore.lease_state``); ``modes`` writes the file atomically and
    makes the directory with the store's modes (``StoreModes.write_file``, ``mkdir``).
    """

    def __init__(self, run_dir: Path, state: Callable[[], tuple[set[int], int | None]], modes: StoreModes):
        self.dir = Path(run_dir) / LEASES_DIR
        self.path = self.dir / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self._state = state
        self._modes = modes
        self._lock = threading.Lock()
        self._pins: Counter[tuple[int, int]] = Counter()
        self._announced: int | None = None    # the pack being created (not yet the writer's current pack)
        self._tracked: dict[int, Callable[[], Iterable[int]]] = {}   # ws id -> its open inodes
        self.on_rotate: Callable[[], None] | None = None     # seal the pack being written (Store sets it)
        self._rotation_seen = _mtime(Path(run_dir) / ROTATE_FILE)
        self._rotated = False
        self._written = 0.0           # monotonic time of the last write, 0 = never
        self._closed = False

    @property
    def active(self) -> bool:
        """True once the lease file exists (something was announced)."""
        return self._written > 0

    def announce(self) -> None:
        """Make sure the lease exists (before the first chunk write)."""
        if not self._written:
            self._write()

    def announce_pack(self, pack_no: int) -> None:
        """Pack ``pack_no`` is about to be created by this process: written
        into the lease before the pack exists."""
        with self._lock:
            self._announced = pack_no
        self._write()

    def pin(self, ws_id: int, seq: int) -> None:
        """An open handle reads workspace ``ws_id``'s tree at ``seq``: GC keeps it until :meth:`unpin`."""
        with self._lock:
            self._pins[(ws_id, seq)] += 1
        self._write_soft()

    def unpin(self, ws_id: int, seq: int) -> None:
        """Undo one :meth:`pin`."""
        with self._lock:
            self._pins[(ws_id, seq)] -= 1
            if self._pins[(ws_id, seq)] <= 0:
                del self._pins[(ws_id, seq)]
        self._write_soft()

    def track(self, ws_id: int, open_inodes: Callable[[], Iterable[int]]) -> None:
        """This process has workspace ``ws_id`` open for writing; ``open_inodes()``
        gives the inode numbers of its open files (called from any thread).
        Written into the lease now (softly: on a full disk, at the next write)."""
        with self._lock:
            self._tracked[ws_id] = open_inodes
        self._write_soft()

    def untrack(self, ws_id: int) -> None:
        """Undo :meth:`track` (the workspace was released)."""
        with self._lock:
            found = self._tracked.pop(ws_id, None)
        if found is not None:
            self._write_soft()

    def open_inodes(self, ws_id: int) -> set[int] | None:
        """The open files of workspace ``ws_id`` in this process now, or None
        if this process does not track it."""
        with self._lock:
            provider = self._tracked.get(ws_id)
        return None if provider is None else _inodes(provider)

    def _write_soft(self) -> None:
        """Write the lease; on a full disk keep the change for the next write
        (a reader is not refused for it; GC then sees the pin a little later)."""
        try:
            self._write()
        except OSError:
            pass

    def refresh(self, force: bool = False) -> None:
        """Rewrite the lease if it exists and :data:`LEASE_INTERVAL` passed
        (or ``force``); first answer a GC's request to seal a pack this
        process writes (module docstring)."""
        self._check_rotation()
        if self._written and (force or time.monotonic() - self._written >= LEASE_INTERVAL):
            self._write()

    def _check_rotation(self) -> None:
        path = Path(self.dir.parent) / ROTATE_FILE
        seen = _mtime(path)
        if seen <= self._rotation_seen or self.on_rotate is None:
            return
        self._rotation_seen = seen
        try:
            wanted = {int(p) for p in json.loads(path.read_text())}
        except (OSError, ValueError, TypeError):
            return
        if wanted & self._state()[0]:
            self.on_rotate()
            with self._lock:
                self._rotated = True

    def take_rotation(self) -> bool:
        """True (once) if a GC's request made this process seal a pack since
        the last call: its owner may close that pack now (the daemon:
        ``PackWriter.close_sealed`` in a worker, then ``refresh(force=True)``)
        rather than at its next sync, so the GC's wait ends sooner."""
        with self._lock:
            rotated, self._rotated = self._rotated, False
        return rotated

    def close(self) -> None:
        """Remove the lease file (the process uses nothing any more). Idempotent."""
        with self._lock:
            self._closed = True
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        packs, busy = self._state()
        with self._lock:
            if self._closed:
                return
            if self._announced in packs:
                self._announced = None    # the writer reports it itself now (and stops once it is closed)
            if self._announced is not None:
                packs = packs | {self._announced}
            tracked = dict(self._tracked)
            heartbeat = time.time_ns()        # before the open files are listed (DeletedFiles relies on it)
            doc = {"pid": os.getpid(), "heartbeat": heartbeat,
                   "pins": sorted([ws, seq] for (ws, seq) in self._pins),
                   "packs": sorted(packs), "busy_since": busy, "tracks": sorted(tracked),
                   "open": sorted([ws, ino] for ws, provider in tracked.items() for ino in _inodes(provider))}
            if not self.dir.is_dir():
                self._modes.mkdir(self.dir)
            self._modes.write_file(self.path, json.dumps(doc).encode())
            self._written = time.monotonic()


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def request_rotation(run_dir: Path, packs: Iterable[int]) -> None:
    """Ask the processes writing ``packs`` to seal them (module docstring):
    ``run/gc-rotate`` holds their numbers, its mtime says when."""
    path = Path(run_dir) / ROTATE_FILE
    tmp = path.with_name(f".{ROTATE_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(sorted(packs)))
    os.replace(tmp, path)


def _inodes(provider: Callable[[], Iterable[int]]) -> set[int]:
    for _attempt in range(10):
        try:
            return {int(ino) for ino in provider()}
        except RuntimeError:          # the dict changed size while another thread iterated it
            continue
    return {int(ino) for ino in provider()}


def read_leases(run_dir: Path, *, exclude_pid: int | None = None) -> list[LeaseInfo]:
    """The live leases of the store whose run directory is ``run_dir``
    (not those of pid ``exclude_pid``); leases of processes that are gone,
    and unreadable ones, are removed."""
    out = []
    directory = Path(run_dir) / LEASES_DIR
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        path = directory / name
        try:
            doc = json.loads(path.read_text())
            pid = int(doc["pid"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            pid = _pid_of(name)
            if pid and alive(pid):
                continue              # being replaced right now: read again next time
            path.unlink(missing_ok=True)
            continue
        if not alive(pid):
            path.unlink(missing_ok=True)
            continue
        if pid == exclude_pid:
            continue
        out.append(LeaseInfo(pid, int(doc.get("heartbeat") or 0),
                             tuple((int(w), int(s)) for w, s in doc.get("pins") or ()),
                             frozenset(int(p) for p in doc.get("packs") or ()), doc.get("busy_since"),
                             frozenset(int(w) for w in doc.get("tracks") or ()),
                             frozenset((int(w), int(i)) for w, i in doc.get("open") or ())))
    return out


def _pid_of(name: str) -> int:
    try:
        return int(name.split("-", 1)[0])
    except ValueError:
        return 0


def leased_packs(leases: Iterable[LeaseInfo]) -> set[int]:
    """Every pack a live lease names."""
    return {p for lease in leases for p in lease.packs}


def writers_settled(leases: Iterable[LeaseInfo], since_ns: int) -> str | None:
    """None if every lease was refreshed after ``since_ns`` and has no dedup
    hit from before it (module docstring); else why not, one line."""
    for lease in leases:
        if lease.heartbeat <= since_ns:
            return f"process {lease.pid} has not refreshed its lease since gc's sweep"
        if lease.busy_since is not None and lease.busy_since <= since_ns:
            return f"process {lease.pid} has uncommitted writes from before gc's sweep"
    return None


class DeletedFiles:
    """Whether GC may rewrite a deleted file's last inode record (module
    docstring, "open files"): ``own`` is this process's :class:`Lease`,
    ``leases`` the others' (:func:`read_leases` with ``exclude_pid`` this pid)."""

    def __init__(self, own: Lease | None, leases: Iterable[LeaseInfo]):
        self._own = own
        self._leases = list(leases)
        self._own_open: dict[int, set[int] | None] = {}

    def may_drop(self, ws_id: int, ino: int, deleted_ns: int) -> bool:
        """True if no process can still read inode ``ino`` of workspace
        ``ws_id``, deleted at ``deleted_ns`` (its record's ctime, ns since the epoch)."""
        if self._own is not None:
            if ws_id not in self._own_open:
                self._own_open[ws_id] = self._own.open_inodes(ws_id)
            mine = self._own_open[ws_id]
            if mine is not None and ino in mine:
                return False
        for lease in self._leases:
            if ws_id in lease.tracks and (lease.heartbeat <= deleted_ns + DELETION_MARGIN_NS
                                          or (ws_id, ino) in lease.open):
                return False
        return True


def never_drop(_ws_id: int, _ino: int, _deleted_ns: int) -> bool:
    """The :meth:`DeletedFiles.may_drop` of a caller that knows nothing of open files."""
    return False


class GcLock:
    """``run/gc.lock``: held (``flock`` exclusive) by the one GC running,
    which writes its pid in it and empties it when done (:func:`gc_running`).
    :meth:`acquire` raises :class:`Busy` if another process holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "gc.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy("gc is already running on this store (another process holds run/gc.lock)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)      # no pid in it: no GC runs (:func:`gc_running`)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> GcLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def gc_running(run_dir: Path) -> bool:
    """True if a GC runs on the store of ``run_dir``: ``run/gc.lock`` names a
    live process (:class:`GcLock`; a killed GC's pid names none). Reads the
    file without locking it (a probe ``flock`` could make a GC starting at
    that moment fail with :class:`Busy`). ``Store.needs_sync`` asks it to
    renew an idle pin sooner while a GC frees pages. No GC running (the
    file empty or missing) costs one ``stat``."""
    path = Path(run_dir) / "gc.lock"
    try:
        if os.stat(path).st_size == 0:       # GcLock.release empties it
            return False
        with open(path, "rb") as f:
            text = f.read(32)
    except OSError:
        return False
    try:
        pid = int(text)
    except ValueError:
        return False
    return pid > 0 and alive(pid)
