"""The FUSE adapter: pyfuse3 requests in, workspace calls, attributes out.

Inode numbers: the workspace root is FUSE inode 1 (``pyfuse3.ROOT_INODE``);
every other store inode keeps its number (store inodes start at 16). Inodes
of the ``.chronicle`` tree are numbered from :data:`magic.MAGIC_BASE` up and
handled by :class:`chronicle.fs.magic.MagicTree`.

Kernel caching is deliberate (FUSE docs, "entry_timeout"/"attr_timeout"):
Chronicle owns its data and every change comes through this adapter — or
through ``ctl``, which invalidates what it changed — so entries, attributes
and negative lookups are cached for :data:`CACHE_TIMEOUT` seconds and file
pages are kept across opens (``keep_cache``) — except while the open turn
records its reads (``self.reads``, a
:class:`~chronicle.store.namespace.files.ReadTracker`): a read the page
cache answers never reaches the daemon, so such opens drop the file's
cached pages. ``max_write`` is libfuse's
default of 1 MiB (FUSE_CAP_MAX_PAGES). Writes go through the kernel's
writeback cache (``enable_writeback_cache``): it sends them in large WRITEs
when it writes pages back, at the latest before FLUSH and FSYNC, and keeps a
written file's size, mtime and ctime itself (see :meth:`ChronicleOperations.setattr`
and :meth:`ChronicleOperations.invalidate_changed`).

Lookup counts follow the kernel's (the FUSE docs' "lookup count"): every
entry we return counts one, ``forget`` takes them back; at zero the
workspace may drop what it caches for the inode. An unlinked file stays
readable and writable while it is open.

Versions are committed on ``flush`` — ``close(2)`` waits for FLUSH, while
RELEASE is sent asynchronously after it returns — and on ``fsync`` and the
last ``release`` (mmap writes can come after the last close). The heavy part
of a commit (CDC, hashing, compression) runs in a worker thread, holding the
inode's lock so no write changes the overlay meanwhile.

Errors: every request handler is wrapped by
:func:`chronicle.fs.errno_map.fuse_errors`: a Chronicle error is answered
with its errno from the one table (``errno_map.ERRNO``: ``NotFound`` ENOENT,
``Exists`` EEXIST, ...), as ext4 answers the same call; anything unexpected
is logged with its traceback and answered EIO. Each handler's docstring
names the FUSE request it serves (libfuse's ``fuse_lowlevel.h``; the
Python signatures are pyfuse3's ``Operations``) and the errnos it answers.
Inodes of ``.chronicle`` are read-only: changing them is EROFS.

Threads: every handler runs on the trio thread (the FUSE loop); blocking work
goes to worker threads (``trio.to_thread.run_sync``), each kind under its own
:class:`trio.CapacityLimiter` so one kind cannot starve another:

- ``build_limiter`` (:data:`BUILD_THREADS`) — commit builds: CPU-bound CDC,
  BLAKE3 and zstd, one thread per core;
- ``sync_limiter`` (:data:`SYNC_THREADS`) — ``Store.sync`` for fsync,
  fsyncdir, ctl ``sync`` and the daemon's periodic sync, through
  ``group_sync`` (:class:`~chronicle.fs.groupsync.GroupSync`: the requests
  arriving while a sync runs share the next one); syncs take the store's
  sync lock, so a second thread would only queue. A sync does not hold the
  LMDB writer lock while the disk flushes: the loop goes on committing;
- ``stream_limiter`` (:data:`STREAM_WAIT_THREADS`) — writers waiting for a
  streaming file's backlog to drain (threads that block, not compute);
- ``job_limiter`` (1) — long ctl commands (``restore --at``) run under the
  :class:`MutationGate`;
- ``fetch_limiter`` (:data:`FETCH_THREADS`) — reads of chunks a remote
  backend (S3) does not have cached: the read runs on the loop in the
  backend's ``cached_only`` mode, a miss is fetched in a worker, then the
  read is tried again.

A long job that changes the tree (ctl ``restore --at``) runs in a worker while
the loop keeps answering (:class:`~chronicle.fs.gate.MutationGate`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import trio

from chronicle.errors import Corrupt, NameTooLong, NotADirectory, NotFound, ReadOnly
from chronicle.fs.errno_map import fuse_errors
from chronicle.fs.gate import MutationGate
from chronicle.fs.groupsync import GroupSync
from chronicle.fs.magic import MAGIC_BASE, MagicTree
from chronicle.store.chunks.backends.base import NotCached
from chronicle.store.model import Actor, Attrs
from chronicle.store.namespace.files import ReadTracker
from chronicle.store.namespace.staging import MAX_FILE_SIZE
from chronicle.store.namespace.workspace import NAME_MAX, Workspace
from chronicle.store.store import Store

log = logging.getLogger("chronicle.fs")

CACHE_TIMEOUT = 300.0
NEGATIVE_TIMEOUT = 30.0
# Commits smaller than this are built on the loop thread (a thread hop costs more).
INLINE_COMMIT_BYTES = 256 * 1024
BUILD_THREADS = 2          # commit builds at once (CPU: CDC, BLAKE3, zstd)
SYNC_THREADS = 1           # Store.sync holds the LMDB writer lock: one at a time
STREAM_WAIT_THREADS = 4    # writers blocked on a stream's backlog at once
FETCH_THREADS = 4          # reads waiting for a remote chunk backend (S3) to fetch at once
JOB_SWITCH_INTERVAL = 0.001  # s: the GIL switch interval while a job runs (sys.setswitchinterval)

T = TypeVar("T")


@dataclass
class Handle:
    """An open file handle of a workspace file: its ``fh``, store inode,
    whether it was opened for writing, and the pid that opened it (flush and
    release carry no request context, so versions are credited to it)."""

    fh: int
    ino: int
    writable: bool
    pid: int


def actor_of(ctx: pyfuse3.RequestContext) -> Actor:
    """The :class:`Actor` of a FUSE request: its caller's uid, gid and pid."""
    return Actor(ctx.uid, ctx.gid, ctx.pid)


class ChronicleOperations(pyfuse3.Operations):
    """pyfuse3 operations for one mounted workspace (see the module docstring).

    State: the kernel's lookup counts per store inode, the open file and
    directory handles (``fh`` numbers shared with the magic tree), and one
    ``trio.Lock`` per inode held while a commit reads its overlay.
    """

    supports_dot_lookup = True
    # The kernel's writeback cache (README, "The writeback cache"), off unless the mount asks for
    # it (``-o writeback_cache``): the kernel holds written pages and the file's mtime/ctime;
    # setattr folds the times it sends back into the pending version, and ctl restore flushes
    # its dirty pages before and resets its cached size after. Off by default: sqlite's NORMAL
    # mode gains ~2.6x, but create/unlink-heavy tools (tar, git, npm) lose ~25 % to the time
    # reports the kernel sends after every written file's close, and a write past the size
    # limit fails at close (EIO) rather than at write(2) (EFBIG).
    enable_writeback_cache = False

    def __init__(self, ws: Workspace, store: Store, *, mountpoint: str = "", writeback_cache: bool | None = None):
        super().__init__()
        if writeback_cache is not None:
            self.enable_writeback_cache = writeback_cache       # pyfuse3.init reads it from the instance
        self.ws = ws
        self.store = store
        self.mountpoint = mountpoint
        self.magic = MagicTree(self)
        self._lookups: dict[int, int] = defaultdict(int)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list] = {}       # fh -> [dir inode, listing snapshot]
        self._next_fh = 1
        self._locks: dict[int, trio.Lock] = {}
        self.build_limiter = trio.CapacityLimiter(BUILD_THREADS)
        self.sync_limiter = trio.CapacityLimiter(SYNC_THREADS)
        self.stream_limiter = trio.CapacityLimiter(STREAM_WAIT_THREADS)
        self.job_limiter = trio.CapacityLimiter(1)
        self.fetch_limiter = trio.CapacityLimiter(FETCH_THREADS)
        self.group_sync = GroupSync(store, self.sync_limiter)   # fsyncs arriving together share one sync
        self.gate = MutationGate()
        self.reads = ReadTracker(ws)           # the open turn's read-set (ctl turn-begin/turn-end)
        self._resyncing: set[int] = set()      # inodes whose kernel size/times the daemon resets (restore)
        self._evict_on_release: set[int] = set()  # inodes the kernel holds a refused size of (write-back failed)
        self._write_errors: dict[int, int] = {}   # ino -> errno of a failed write-back, for the next GETATTR
        self._kernel_mtimes: dict[int, int] = {}  # ino -> mtime the kernel reported with nothing pending

    # -- helpers ---------------------------------------------------------------------

    def store_ino(self, ino: int) -> int:
        """The store's inode number of FUSE inode ``ino`` (the root is FUSE inode 1)."""
        return self.ws.root if ino == pyfuse3.ROOT_INODE else ino

    def fuse_ino(self, ino: int) -> int:
        """The FUSE inode number of store inode ``ino``."""
        return pyfuse3.ROOT_INODE if ino == self.ws.root else ino

    def entry(self, ino: int, attrs: Attrs, *, timeout: float = CACHE_TIMEOUT, fuse_ino: int | None = None,
              allocated: int | None = None) -> pyfuse3.EntryAttributes:
        """EntryAttributes for a store inode (``ino`` is the store's number)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = fuse_ino if fuse_ino is not None else self.fuse_ino(ino)
        e.generation = 0
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        e.st_mode = attrs.mode
        e.st_nlink = attrs.nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_rdev = attrs.rdev
        e.st_size = attrs.size
        e.st_blksize = 4096
        if allocated is None:
            allocated = self.ws.allocated_bytes(ino, attrs) if attrs.is_file else (
                4096 if attrs.is_dir else 0)
        e.st_blocks = (allocated + 511) // 512
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        return e

    def _counted(self, ino: int, attrs: Attrs) -> pyfuse3.EntryAttributes:
        """An entry that the kernel will hold a lookup count on."""
        self._lookups[ino] += 1
        return self.entry(ino, attrs)

    def attrs(self, ino: int) -> Attrs:
        """Attributes of store inode ``ino`` for a read handler: the
        workspace's (with uncommitted writes), or while a job holds the
        :class:`MutationGate`, the committed head's read from LMDB without
        touching the workspace's caches. Raises :class:`NotFound`."""
        if not self.gate.exclusive:
            return self.ws.getattr(ino)
        with self.ws.read_txn() as txn:
            attrs = self.ws.view().attrs(txn, ino)
        if attrs is None:
            raise NotFound(f"no inode {ino}")
        return attrs

    def _lookup_committed(self, parent: int, name: bytes) -> tuple[int, Attrs]:
        """``Workspace.lookup`` from the committed head, for reads while a job
        holds the gate; the path link is recorded once the job is done."""
        if len(name) > NAME_MAX:
            raise NameTooLong()
        with self.ws.read_txn() as txn:
            view = self.ws.view()
            parent_attrs = view.attrs(txn, parent)
            if parent_attrs is None:
                raise NotFound(f"no inode {parent}")
            if not parent_attrs.is_dir:
                raise NotADirectory()
            found = view.lookup(txn, parent, name)
            attrs = view.attrs(txn, found[0]) if found is not None else None
        if found is None or attrs is None:
            raise NotFound()
        self.gate.defer(lambda: self.ws.lookup(parent, name))
        return found[0], attrs

    async def run_exclusive(self, job: Callable[..., T], *args: object) -> T:
        """Run ``job(*args)`` — a blocking workspace mutation such as
        ``restore_tree`` — in a worker thread while holding the
        :class:`MutationGate`; returns its result or raises its exception.
        Not cancellable once started (the worker must finish before the
        workspace is handed back to the loop)."""
        async with self.gate.hold():
            # The job is Python code holding the GIL; a request needs it a few
            # times, and a waiting thread gets it only after the switch
            # interval (5 ms by default: ~20 ms a stat). Shorter while the job runs.
            previous = sys.getswitchinterval()
            sys.setswitchinterval(min(previous, JOB_SWITCH_INTERVAL))
            try:
                return await trio.to_thread.run_sync(job, *args, limiter=self.job_limiter)
            finally:
                sys.setswitchinterval(previous)

    async def sync(self) -> None:
        """Make everything committed so far durable: ``Store.sync`` in a worker
        thread under ``sync_limiter``, shared with the other requests that
        arrive while one runs (:class:`~chronicle.fs.groupsync.GroupSync`)."""
        await self.group_sync.sync()

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def _not_magic(self, *inos: int) -> None:
        for ino in inos:
            if ino >= MAGIC_BASE:
                raise ReadOnly(".chronicle is read-only")

    def _not_reserved(self, parent: int, name: bytes) -> None:
        if parent == pyfuse3.ROOT_INODE and name == MagicTree.NAME:
            raise ReadOnly(".chronicle is reserved")

    # -- lookups and attributes ----------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        """FUSE_LOOKUP: the entry ``name`` in ``parent_inode``, counted (one more
        lookup count). ``.``/``..`` are answered here (``supports_dot_lookup``);
        a missing name is a negative entry (``st_ino`` 0) the kernel caches for
        :data:`NEGATIVE_TIMEOUT` s. Errors: ENOTDIR, ENAMETOOLONG."""
        if parent_inode >= MAGIC_BASE or (parent_inode == pyfuse3.ROOT_INODE and name == MagicTree.NAME):
            await self.gate.wait_free()
            return self.magic.lookup(parent_inode, name, ctx)
        if name == b".":
            ino = self.store_ino(parent_inode)
            return self._counted(ino, self.attrs(ino))
        if name == b"..":
            ino = self.store_ino(parent_inode)
            parent = self.ws.links.parent(ino)
            if parent is None:
                parent = self.ws.root
            return self._counted(parent, self.attrs(parent))
        try:
            if self.gate.exclusive:
                ino, attrs = self._lookup_committed(self.store_ino(parent_inode), name)
            else:
                ino, attrs = self.ws.lookup(self.store_ino(parent_inode), name)
        except NotFound:
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = NEGATIVE_TIMEOUT
            return e
        return self._counted(ino, attrs)

    @fuse_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """FUSE_FORGET / FUSE_BATCH_FORGET: take back ``(inode, nlookup)`` lookup
        counts; at zero the workspace drops what it caches for the inode. No
        reply, never an error (pyfuse3: "must not raise any exceptions")."""
        await self.gate.wait_free()
        for ino, count in inode_list:
            if ino >= MAGIC_BASE:
                self.magic.forget(ino, count)
                continue
            sino = self.store_ino(ino)
            left = self._lookups.get(sino, 0) - count
            if left <= 0:
                self._lookups.pop(sino, None)
                self._locks.pop(sino, None)
                self._kernel_mtimes.pop(sino, None)
                self.ws.forget(sino)
            else:
                self._lookups[sino] = left

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        """FUSE_GETATTR: the attributes of ``inode``, with the size and times of
        uncommitted writes. Errors: ENOENT; once after a refused write-back
        of the inode, that write's errno (ENOSPC, EFBIG: see :meth:`write`).
        Answered during a restore (:class:`MutationGate`)."""
        if inode >= MAGIC_BASE:
            await self.gate.wait_free()
            return self.magic.getattr(inode)
        ino = self.store_ino(inode)
        if self._write_errors:
            failed = self._write_errors.pop(ino, None)
            if failed is not None:
                raise pyfuse3.FUSEError(failed)       # a refused write-back, to the writer's next write(2)
        return self.entry(ino, self.attrs(ino))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FUSE_SETATTR: truncate(2)/ftruncate(2) (``update_size``), chmod, chown
        and utimens, in that order. A size change through an open handle
        (``fh``) waits for that file's next commit; a path truncate(2) is a
        version of its own at once. Writes made before a path truncate or an
        attribute change are committed first, so history keeps their order.

        Times, with the writeback cache (``enable_writeback_cache``): the
        kernel owns a written file's mtime/ctime and sends them back as
        SETATTR(mtime, ctime) from ``write_inode`` (fs/fuse: ``fuse_flush_times``)
        -- before the FLUSH of every close and the FSYNC of every fsync, and
        when its flusher writes the inode back. Such a request carries
        ``FATTR_FH`` (the file's writable handle) and nothing but mtime and
        ctime; utimensat(2)/``touch`` never carries a handle (the VFS passes
        none, ``ATTR_FILE`` is truncate's only) and ``touch`` always sets
        atime too. The rule: mtime/ctime alone, with the ``fh`` of one of our
        writable handles, are the writes' times -- they become the times of
        the pending version (no event), or are dropped if no change is
        pending (their mtime is remembered: the kernel sends it again, with
        no handle, after a rename, unlink or link of the closed file --
        ``fuse_update_ctime`` -- and that report records nothing either);
        anything else is the caller's own change (a ``utimens`` event, writes
        before it committed first). The mtime/ctime that come with a size are
        the truncate's own (part of its version).

        Errors: EFBIG (past ``MAX_FILE_SIZE``), EINVAL (size of a non-file),
        EROFS (``.chronicle``), ENOENT, ENOSPC."""
        self._not_magic(inode)
        async with self.gate.mutation():
            return await self._setattr(self.store_ino(inode), attr, fields, fh, ctx)

    def _kernel_times(self, fields: pyfuse3.SetattrFields, fh: int | None) -> bool:
        """True if this SETATTR only carries the times the kernel's writeback
        cache gave a file's writes (see :meth:`setattr`): mtime and/or ctime,
        nothing else, sent with the ``fh`` of one of our writable handles."""
        if fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
            return False
        if fields.update_atime or not (fields.update_mtime or fields.update_ctime):
            return False
        handle = self._handles.get(fh) if fh is not None else None
        return handle is not None and handle.writable

    async def _setattr(self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                       fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        actor = actor_of(ctx)
        if ino in self._resyncing and _own_thread(ctx.pid):
            return self.entry(ino, self.ws.getattr(ino))       # our own cache resync: nothing to record
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        ctime = attr.st_ctime_ns if fields.update_ctime else None
        if self._kernel_times(fields, fh):
            # The kernel's times for the writes it holds: they belong to the pending version
            # (no event); none pending (already committed): the version keeps its own times,
            # and the kernel's mtime is remembered for its later reports without a handle.
            if not self.ws.files.kernel_times(ino, mtime, ctime) and mtime is not None:
                self._kernel_mtimes[ino] = mtime
            return self.entry(ino, self.ws.getattr(ino))
        if (fh is None and mtime is not None and self._kernel_mtimes.get(ino) == mtime and not fields.update_size
                and not (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime)):
            # The kernel's time report after a rename/unlink/link of a closed file (fuse_update_ctime
            # writes the inode back at once): its mtime is the one it reported before, no change.
            return self.entry(ino, self.ws.getattr(ino))
        if fields.update_size:
            if attr.st_size > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            if not self.ws.getattr(ino).is_file:
                raise pyfuse3.FUSEError(errno.EINVAL)
            async with self._lock(ino):
                if fh is not None and fh in self._handles:
                    self.ws.files.truncate(ino, attr.st_size, actor.pid)
                    self.ws.files.kernel_times(ino, mtime, ctime)
                else:
                    # truncate(2): a version of its own, recorded now. Writes through open
                    # handles before it are committed first (by their writer), as before an
                    # attribute change: history keeps their order, and the truncate keeps its
                    # own times (folded into one unchanged content, mtime/ctime went back).
                    self.ws.files.open(ino)
                    try:
                        await self._commit_locked(ino)
                        self.ws.files.truncate(ino, attr.st_size, actor.pid)
                        self.ws.files.kernel_times(ino, mtime, ctime)
                        await self._commit_locked(ino, actor.pid)
                    finally:
                        self.ws.files.release(ino)
        # The mtime/ctime sent with a size are the truncate's own (no syscall sets both:
        # the kernel adds them, FATTR_MTIME(_NOW) and, with the writeback cache, FATTR_CTIME).
        update_mtime = fields.update_mtime and not fields.update_size
        changes = {}
        attr_change = (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime
                       or update_mtime)
        if attr_change:
            # Writes made before this change are committed first, so history
            # shows them in the order they happened (tar writes, then fchmods).
            await self.commit(ino, actor.pid)
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if changes:
            self.ws.setattr(ino, actor, **changes)
        return self.entry(ino, self.ws.getattr(ino))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """FUSE_READLINK: the target of symlink ``inode``. Errors: EINVAL (not a symlink), ENOENT."""
        await self.gate.wait_free()
        if inode >= MAGIC_BASE:
            return self.magic.readlink(inode)
        return self.ws.readlink(self.store_ino(inode))

    # -- namespace ---------------------------------------------------------------------------

    # Each mutation is one event (``Workspace``), taken under the MutationGate.

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FUSE_MKNOD: a regular file, FIFO, socket or device node ``name`` in
        ``parent_inode`` (mode includes the type bits), counted. Errors:
        EEXIST, ENOTDIR, ENAMETOOLONG, EINVAL, EROFS (``.chronicle``)."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            ino, attrs = self.ws.create(self.store_ino(parent_inode), name, mode, actor_of(ctx), rdev)
            return self._counted(ino, attrs)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FUSE_MKDIR: directory ``name`` in ``parent_inode``, counted (a setgid
        parent passes its group and setgid bit on, as ext4 does). Errors:
        EEXIST, ENOTDIR, ENAMETOOLONG, EINVAL, EROFS."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            ino, attrs = self.ws.mkdir(self.store_ino(parent_inode), name, mode, actor_of(ctx))
            return self._counted(ino, attrs)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """FUSE_UNLINK: remove the non-directory entry ``name``. The inode lives
        on while open or looked up (until ``forget``). Errors: ENOENT,
        EISDIR, ENOTDIR, EROFS."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            self.ws.unlink(self.store_ino(parent_inode), name, actor_of(ctx))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """FUSE_RMDIR: remove the empty directory ``name``. Errors: ENOENT,
        ENOTDIR, ENOTEMPTY, EROFS."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            self.ws.rmdir(self.store_ino(parent_inode), name, actor_of(ctx))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FUSE_SYMLINK: symlink ``name`` in ``parent_inode`` pointing at
        ``target``, counted. Errors: EEXIST, ENOTDIR, ENAMETOOLONG (target of
        4096 bytes or more), EINVAL (empty target), EROFS."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            ino, attrs = self.ws.symlink(self.store_ino(parent_inode), name, target, actor_of(ctx))
            return self._counted(ino, attrs)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        """FUSE_RENAME / FUSE_RENAME2: rename(2) and renameat2(2) with
        ``flags`` ``RENAME_NOREPLACE`` or ``RENAME_EXCHANGE``. A replaced
        target keeps its inode until ``forget`` (pyfuse3's rename contract).
        Errors: ENOENT, EEXIST (NOREPLACE), EISDIR, ENOTDIR, ENOTEMPTY,
        EINVAL (bad flags, a directory into itself), EROFS (``.chronicle``)."""
        self._not_magic(parent_inode_old, parent_inode_new)
        self._not_reserved(parent_inode_old, name_old)
        self._not_reserved(parent_inode_new, name_new)
        async with self.gate.mutation():
            self.ws.rename(self.store_ino(parent_inode_old), name_old, self.store_ino(parent_inode_new),
                           name_new, flags, actor_of(ctx))

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FUSE_LINK: hard link ``new_name`` in ``new_parent_inode`` to ``inode``,
        counted. Errors: EPERM (a directory), EEXIST, ENOTDIR, EINVAL (too many
        links), EROFS."""
        self._not_magic(inode, new_parent_inode)
        self._not_reserved(new_parent_inode, new_name)
        ino = self.store_ino(inode)
        async with self.gate.mutation():
            attrs = self.ws.link(ino, self.store_ino(new_parent_inode), new_name, actor_of(ctx))
            return self._counted(ino, attrs)

    # -- files ----------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """FUSE_OPEN: a file handle for ``inode`` (``.chronicle`` files go to
        the magic tree). ``O_TRUNC`` of a writable open empties the file; the
        kernel keeps its page cache across opens (``keep_cache``), except
        while the open turn tracks its reads (``self.reads``). Errors:
        EISDIR, EINVAL (not a regular file), ENOENT."""
        if inode >= MAGIC_BASE:
            await self.gate.wait_free()
            return await self.magic.open(inode, flags, ctx, self._new_fh())
        ino = self.store_ino(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC) and writable
        async with self.gate.mutation():
            async with self._lock(ino):
                self.ws.files.open(ino, truncate=truncate)
            fh = self._new_fh()
            self._handles[fh] = Handle(fh, ino, writable, ctx.pid)
            if truncate:
                self.ws.files[ino].pid = ctx.pid
        # While a turn tracks its reads, the kernel drops the file's cached pages at this open, so its
        # reads reach read() and are recorded (a cached page is served without asking the daemon).
        return pyfuse3.FileInfo(fh=fh, keep_cache=not self.reads.active)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """FUSE_CREATE: create regular file ``name`` and open it (open(2) with
        ``O_CREAT``); returns ``(FileInfo, EntryAttributes)``, counted. Its
        create entry folds into its first write (one version). Errors:
        EEXIST, ENOTDIR, ENAMETOOLONG, EROFS."""
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        async with self.gate.mutation():
            ino, attrs = self.ws.create(self.store_ino(parent_inode), name, mode, actor_of(ctx))
            state = self.ws.files.open(ino, created=True)
            state.pid = ctx.pid
            fh = self._new_fh()
            self._handles[fh] = Handle(fh, ino, True, ctx.pid)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._counted(ino, attrs)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """FUSE_READ: ``size`` bytes at ``off`` of open handle ``fh``, with its
        uncommitted writes; short only at the end of the file. While a turn
        tracks its reads, the range served joins its read-set (``self.reads``;
        ``.chronicle`` reads do not). Errors: EIO (a damaged chunk:
        ``Corrupt``, logged)."""
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.read(fh, off, size)
        data = await self._read_file(handle.ino, off, size)
        if self.reads.active:
            self.reads.note(handle.ino, off, len(data), handle.pid)
        return data

    async def _read_file(self, ino: int, off: int, size: int) -> bytes:
        """``ws.files.read`` on the loop; with a remote chunk backend (S3:
        ``cached_only``), what is not cached locally is fetched in a worker
        thread (``fetch_limiter``) and the read tried again, so the loop never
        waits for the network."""
        cached_only = getattr(self.store.chunks.backend, "cached_only", None)
        while True:
            await self.gate.wait_free()        # a restore may repoint the open file's content
            if cached_only is None:
                return self.ws.files.read(ino, off, size)
            try:
                with cached_only():
                    return self.ws.files.read(ino, off, size)
            except NotCached as miss:
                await trio.to_thread.run_sync(miss.fetch, limiter=self.fetch_limiter)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """FUSE_WRITE: write ``buf`` at ``off``; returns ``len(buf)`` (all of it:
        no ``direct_io``). A writer that outruns its stream worker waits for it
        in a worker thread. A ``.chronicle`` handle (``ctl``) goes to the magic
        tree. Errors: EFBIG (past ``MAX_FILE_SIZE``), ENOSPC.

        With the writeback cache the write(2) that wrote the data returned long
        ago: a refused write-back is reported at close/fsync by the kernel,
        and to the writer's next write(2) by this daemon -- the inode's
        attributes are invalidated, and the GETATTR the kernel sends before
        its next cached write (``fuse_cache_write_iter`` refreshes size and
        mode) is answered with the error, once (:meth:`getattr`). The inode
        is dropped at its last release, so the size the kernel counted is
        forgotten."""
        try:
            return await self._write(fh, off, buf)
        except pyfuse3.FUSEError as exc:
            handle = self._handles.get(fh)
            if self.enable_writeback_cache and handle is not None:
                self._write_errors[handle.ino] = exc.errno
                self._evict_on_release.add(handle.ino)
                trio.lowlevel.spawn_system_task(self._invalidate_attrs, handle.ino)
            raise

    async def _invalidate_attrs(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(_invalidate_attributes, self.fuse_ino(ino))
        except Exception:                     # noqa: BLE001 - a system task must not raise
            log.exception("invalidating the attributes of inode %d failed", ino)

    @fuse_errors
    async def _write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.write(fh, off, buf)
        if off + len(buf) > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        async with self.gate.mutation():
            lock = self._lock(handle.ino)
            if lock.locked():
                async with lock:
                    written = self.ws.files.write(handle.ino, off, buf, handle.pid)
            else:
                written = self.ws.files.write(handle.ino, off, buf, handle.pid)
            if self.ws.files.stream_backlogged(handle.ino):
                async with lock:
                    await trio.to_thread.run_sync(self.ws.files.wait_stream, handle.ino, limiter=self.stream_limiter)
        return written

    async def _commit_locked(self, ino: int, pid: int = 0) -> int | None:
        overlay = self.ws.files.commit_begin(ino)
        if overlay is None:
            return None
        if overlay.commit_cost() <= INLINE_COMMIT_BYTES:
            built = self.ws.files.commit_build(overlay)
        else:
            built = await trio.to_thread.run_sync(self.ws.files.commit_build, overlay, limiter=self.build_limiter)
        return self.ws.files.commit_finish(ino, built, pid)

    async def commit(self, ino: int, pid: int = 0) -> int | None:
        """Commit ``ino``'s uncommitted writes as a version (if any), under the
        inode's lock; returns the version's seq or None. Builds over
        :data:`INLINE_COMMIT_BYTES` run in a worker thread."""
        async with self._lock(ino):
            return await self._commit_locked(ino, pid)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """FUSE_FLUSH: close(2) of a descriptor of ``fh`` (maybe one of several
        dups): a writable handle's writes become a version now, so ``close``
        returning means the version exists. Errors: ENOSPC, EIO."""
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.flush(fh)
        if handle.writable:
            async with self.gate.mutation():
                await self.commit(handle.ino, handle.pid)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """FUSE_FSYNC: commit ``fh``'s writes, then make the store durable
        (packs and metadata, ``Store.sync``) in a worker thread — unless
        nothing was committed since the last sync (``Store.synced``: what
        close or flush committed is synced here too). ``datasync`` is
        treated as a full sync. Errors: ENOSPC, EIO."""
        handle = self._handles.get(fh)
        if handle is None:
            return
        async with self.gate.mutation():
            await self.commit(handle.ino, handle.pid)
        if not self.store.synced:
            await self.sync()

    @fuse_errors
    async def release(self, fh: int) -> None:
        """FUSE_RELEASE: the last descriptor of ``fh`` is closed. The last handle
        of an inode commits what is left (mmap writes may come after the last
        flush). The reply carries no error to anyone (pyfuse3)."""
        handle = self._handles.pop(fh, None)
        if handle is None:
            return await self.magic.release(fh)
        async with self.gate.mutation():
            async with self._lock(handle.ino):
                state = self.ws.files.get(handle.ino)
                if state is not None and state.handles <= 1 and state.dirty:
                    await self._commit_locked(handle.ino, handle.pid)
                self.ws.files.release(handle.ino)
        if handle.ino in self._evict_on_release and handle.ino not in self.ws.files:
            self._evict_on_release.discard(handle.ino)
            self._write_errors.pop(handle.ino, None)      # reported at the close, if not before
            await self.invalidate([handle.ino], self.ws.links.links_of(handle.ino))

    # -- directories ------------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """FUSE_OPENDIR: a directory handle for ``inode``. Errors: ENOTDIR, ENOENT."""
        if inode >= MAGIC_BASE:
            await self.gate.wait_free()
            return self.magic.opendir(inode, self._new_fh(), ctx)
        ino = self.store_ino(inode)
        if not self.attrs(ino).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = [ino, None]
        return fh

    def _entries(self, ino: int) -> list[tuple[bytes, int, int]]:
        """``Workspace.readdir``, or while a job holds the gate the committed
        head's entries (the links they give are recorded after the job)."""
        if not self.gate.exclusive:
            return self.ws.readdir(ino)
        if not self.attrs(ino).is_dir:
            raise NotADirectory()
        with self.ws.read_txn() as txn:
            entries = self.ws.view().entries(txn, ino)
        self.gate.defer(lambda: self.ws.readdir(ino))
        return entries

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """FUSE_READDIRPLUS (pyfuse3 serves every readdir as one): entries of ``fh`` from ``start_id`` on,
        through ``pyfuse3.readdir_reply``. The listing is snapshotted at
        ``start_id`` 0 so offsets stay stable while the directory changes;
        every entry sent counts one lookup, except ``.`` and ``..``."""
        handle = self._dirs.get(fh)
        if handle is None:
            await self.gate.wait_free()
            return self.magic.readdir(fh, start_id, token)
        ino, listing = handle
        if start_id == 0 or listing is None:
            # A snapshot of the entries, so offsets stay stable while the directory changes.
            parent = self.ws.links.parent(ino)
            if parent is None or ino == self.ws.root:
                parent = ino
            listing = handle[1] = [(b".", ino, 0), (b"..", parent, 0)] + self._entries(ino)
        for i in range(start_id, len(listing)):
            name, child, _kind = listing[i]
            try:
                attrs = self.attrs(child)
                entry = self.entry(child, attrs)
            except NotFound:
                continue
            except Corrupt as exc:          # damaged metadata: list the rest; a lookup of it answers EIO
                log.error("readdir: %s", exc)
                continue
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                return
            if i >= 2:                # the kernel takes no lookup count for "." and ".."
                self._lookups[child] += 1

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        """FUSE_RELEASEDIR: forget directory handle ``fh``."""
        if self._dirs.pop(fh, None) is None:
            self.magic.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """FUSE_FSYNCDIR: make the store durable (``Store.sync``, worker thread)
        unless it already is (``Store.synced``): every directory change is
        already committed. Errors: EIO."""
        if not self.store.synced:
            await self.sync()

    # -- the rest ---------------------------------------------------------------------------------

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """FUSE_STATFS: the free space of the file system holding the store, in
        4 KiB blocks; inode counts are reported as plentiful (at least 2**32)
        since inode numbers are not a limited resource here; names up to 255 bytes."""
        vfs = os.statvfs(self.store.path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = 4096
        out.f_frsize = 4096
        scale = vfs.f_frsize / 4096
        out.f_blocks = int(vfs.f_blocks * scale)
        out.f_bfree = int(vfs.f_bfree * scale)
        out.f_bavail = int(vfs.f_bavail * scale)
        out.f_files = max(vfs.f_files, 1 << 32)
        out.f_ffree = max(vfs.f_ffree, (1 << 32) - 1)
        out.f_favail = out.f_ffree
        out.f_namemax = 255
        return out

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        """FUSE_SETXATTR: set extended attribute ``name`` (``user.``, ``trusted.``,
        ``security.``) to ``value``, after committing the file's writes.
        Errors: EOPNOTSUPP (another namespace: no POSIX ACLs), ENOSPC (value
        over 64 KiB or all attributes over 64 KiB), EPERM (``user.`` on a
        symlink or device), EINVAL, EROFS."""
        self._not_magic(inode)
        async with self.gate.mutation():
            await self.commit(self.store_ino(inode), ctx.pid)
            self.ws.setxattr(self.store_ino(inode), name, value, actor_of(ctx))

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """FUSE_GETXATTR: the value of ``name``. ``security.capability``, asked
        before every write, is answered without raising a domain error.
        Errors: ENOATTR (ENODATA), ENOENT."""
        await self.gate.wait_free()
        if inode >= MAGIC_BASE:
            return self.magic.getxattr(inode, name)
        ino = self.store_ino(inode)
        if name == b"security.capability":
            # The kernel asks this before every write (to drop file capabilities);
            # answer without raising and catching a Chronicle error each time.
            for key, value in self.ws.head_attrs(ino).xattrs:
                if key == name:
                    return value
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return self.ws.getxattr(ino, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """FUSE_LISTXATTR: the names of ``inode``'s extended attributes. Errors: ENOENT."""
        await self.gate.wait_free()
        if inode >= MAGIC_BASE:
            return self.magic.listxattr(inode)
        return self.ws.listxattr(self.store_ino(inode))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """FUSE_REMOVEXATTR: remove ``name``, after committing the file's writes.
        Errors: ENOATTR, EOPNOTSUPP, EPERM, EROFS."""
        self._not_magic(inode)
        async with self.gate.mutation():
            await self.commit(self.store_ino(inode), ctx.pid)
            self.ws.removexattr(self.store_ino(inode), name, actor_of(ctx))

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """FUSE_ACCESS: allowed. The mount uses ``default_permissions``
        (``daemon.mount_options``): the kernel checks modes itself and does
        not send this request (pyfuse3's ``access`` docs); True should one come."""
        return True

    # -- cache invalidation (after ctl changes the tree) ----------------------------------------

    async def invalidate(self, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]]) -> None:
        """Drop the kernel's cached entries and inodes (store numbers) that a
        ``ctl`` command changed, before its reply, so the mount shows the
        change at once. ``entries``: ``(parent ino, name)`` pairs;
        ``inodes``: inode numbers. The notifications are sent from worker
        threads: the kernel may wait on locks held by requests this loop has
        to serve."""
        fuse_entries = [(self.fuse_ino(parent), name) for parent, name in entries]
        fuse_inodes = [self.fuse_ino(ino) for ino in inodes]
        await trio.to_thread.run_sync(_invalidate, fuse_entries, fuse_inodes)

    async def flush_kernel_writes(self) -> None:
        """Before a store-side change of files (ctl ``restore``): have the
        kernel write back the dirty pages its writeback cache holds, so they
        reach this daemon now instead of landing on the restored content
        later. Dirty pages exist only under open writable handles (the kernel
        writes a file's pages back before FLUSH and RELEASE: ``fuse_flush``,
        ``fuse_release``); for each such inode, FUSE_NOTIFY_INVAL_INODE over
        the whole file makes the kernel launder its dirty pages -- write them
        to us and wait (``fuse_reverse_inval_inode`` ->
        ``invalidate_inode_pages2_range`` -> ``fuse_launder_folio``) -- and
        drop them. Sent from a worker thread: the loop serves those WRITEs."""
        if not self.enable_writeback_cache:
            return
        inodes = sorted({handle.ino for handle in self._handles.values() if handle.writable})
        if inodes:
            await trio.to_thread.run_sync(_invalidate, [], [self.fuse_ino(ino) for ino in inodes])

    async def invalidate_changed(self, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]]) -> None:
        """After a store-side change (ctl ``restore``): :meth:`invalidate`
        what changed -- and, with the writeback cache, every name of each
        changed regular file that no handle holds open too. The kernel
        trusts its own size, mtime and ctime of a cached regular file in
        writeback mode (fs/fuse/inode.c ``fuse_get_cache_mask``: a GETATTR
        reply no longer changes them), so a restored size shows only on a
        fresh inode: with its dentries gone the kernel drops the inode
        (FORGET), and the next lookup reads the restored attributes. A file
        open meanwhile cannot be dropped: the daemon sets its size and times
        through the mount itself (truncate(2) and utimensat(2) on its path, in
        a worker thread), requests :meth:`setattr` answers with the restored
        attributes and records nothing (``_resync_kernel``)."""
        inodes, entries = set(inodes), set(entries)
        resync: list[tuple[int, str, Attrs]] = []
        if self.enable_writeback_cache:
            for ino in inodes:
                try:
                    attrs = self.ws.head_attrs(ino)
                except NotFound:
                    continue
                if not attrs.is_file:
                    continue
                if ino not in self.ws.files:
                    entries.update(self.ws.links.links_of(ino))
                    continue
                path = self.ws.links.path_of(ino)
                if path and self.mountpoint:
                    resync.append((ino, os.path.join(self.mountpoint, os.fsdecode(path)), attrs))
        await self.invalidate(inodes, entries)
        if resync:
            self._resyncing.update(ino for ino, _path, _attrs in resync)
            try:
                await trio.to_thread.run_sync(_resync_kernel, [(path, attrs) for _ino, path, attrs in resync])
            finally:
                self._resyncing.difference_update(ino for ino, _path, _attrs in resync)

    async def commit_all(self) -> None:
        """Commit every open file's uncommitted writes (ctl ``sync``,
        ``turn-end``, ``step``, ``receipt``), those the kernel's writeback
        cache still holds included (:meth:`flush_kernel_writes`): what was
        written before the command is in the version it makes."""
        await self.flush_kernel_writes()
        for ino in list(self.ws.files):
            await self.commit(ino)

    def stat_mode(self, mode: int) -> int:
        """The permission bits of ``mode`` (``stat.S_IMODE``)."""
        return stat.S_IMODE(mode)


def _own_thread(pid: int) -> bool:
    """True if ``pid`` (a FUSE request's caller: the kernel sends the
    calling thread's id) is this process or one of its threads."""
    return pid == os.getpid() or os.path.isdir(f"/proc/self/task/{pid}")


def _resync_kernel(files: list[tuple[str, Attrs]]) -> None:
    """Worker thread: set the kernel's cached size and mtime of open files
    a restore changed (writeback cache: the kernel keeps its own), by
    truncate(2) and utimensat(2) on their paths through the mount. A file the
    daemon's user may not write keeps the kernel's size until its last close
    (logged at INFO)."""
    for path, attrs in files:
        try:
            os.truncate(path, attrs.size)
            os.utime(path, ns=(attrs.atime_ns, attrs.mtime_ns), follow_symlinks=False)
        except OSError as exc:
            log.info("restore: the kernel keeps its cached size of the open file %s until closed: %s", path, exc)


def _invalidate_attributes(ino: int) -> None:
    """Worker thread: drop the kernel's cached attributes of FUSE inode ``ino`` (not its pages)."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError:
        pass


def _invalidate(entries: list[tuple[int, bytes]], inodes: list[int]) -> None:
    """Worker thread: send the kernel's invalidation notices (FUSE numbers);
    one the kernel no longer knows (ENOENT) or refuses is skipped."""
    for ino, name in entries:
        try:
            pyfuse3.invalidate_entry(ino, name)
        except OSError:
            pass
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError:
            pass
