"""The FUSE adapter: pyfuse3 requests in, workspace calls, attributes out.

Inode numbers: the workspace root is FUSE inode 1 (``pyfuse3.ROOT_INODE``);
every other store inode keeps its number (store inodes start at 16). Inodes
of the ``.chronicle`` tree are numbered from :data:`magic.MAGIC_BASE` up and
handled by :class:`chronicle.fs.magic.MagicTree`.

Kernel caching is deliberate (FUSE docs, "entry_timeout"/"attr_timeout"):
Chronicle owns its data and every change comes through this adapter — or
through ``ctl``, which invalidates what it changed — so entries, attributes
and negative lookups are cached for :data:`CACHE_TIMEOUT` seconds and file
pages are kept across opens (``keep_cache``). ``max_write`` is libfuse's
default of 1 MiB (FUSE_CAP_MAX_PAGES).

Lookup counts follow the kernel's (the FUSE docs' "lookup count"): every
entry we return counts one, ``forget`` takes them back; at zero the
workspace may drop what it caches for the inode. An unlinked file stays
readable and writable while it is open.

Versions are committed on ``flush`` — ``close(2)`` waits for FLUSH, while
RELEASE is sent asynchronously after it returns — and on ``fsync`` and the
last ``release`` (mmap writes can come after the last close). The heavy part
of a commit (CDC, hashing, compression) runs in a worker thread under a
:class:`trio.CapacityLimiter`, holding the inode's lock so no write changes
the overlay meanwhile.

Threads: everything runs on the trio thread except commit builds and syncs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass

import pyfuse3
import trio

from chronicle.errors import NotFound, ReadOnly
from chronicle.fs.errno_map import fuse_errors
from chronicle.fs.magic import MAGIC_BASE, MagicTree
from chronicle.store.model import Attrs
from chronicle.store.model import Actor
from chronicle.store.namespace.staging import MAX_FILE_SIZE

log = logging.getLogger("chronicle.fs")

CACHE_TIMEOUT = 300.0
NEGATIVE_TIMEOUT = 30.0
# Commits smaller than this are built on the loop thread (a thread hop costs more).
INLINE_COMMIT_BYTES = 256 * 1024


@dataclass
class Handle:
    """An open file handle of a workspace file."""

    fh: int
    ino: int
    writable: bool
    pid: int


def actor_of(ctx: pyfuse3.RequestContext) -> Actor:
    return Actor(ctx.uid, ctx.gid, ctx.pid)


class ChronicleOperations(pyfuse3.Operations):
    """pyfuse3 operations for one mounted workspace."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, ws, store, *, mountpoint: str = ""):
        super().__init__()
        self.ws = ws
        self.store = store
        self.mountpoint = mountpoint
        self.magic = MagicTree(self)
        self._lookups: dict[int, int] = defaultdict(int)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list] = {}       # fh -> [dir inode, listing snapshot]
        self._next_fh = 1
        self._locks: dict[int, trio.Lock] = {}
        self.limiter = trio.CapacityLimiter(2)

    # -- helpers ---------------------------------------------------------------------

    def store_ino(self, ino: int) -> int:
        return self.ws.root if ino == pyfuse3.ROOT_INODE else ino

    def fuse_ino(self, ino: int) -> int:
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
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode >= MAGIC_BASE or (parent_inode == pyfuse3.ROOT_INODE and name == MagicTree.NAME):
            return self.magic.lookup(parent_inode, name)
        if name == b".":
            ino = self.store_ino(parent_inode)
            return self._counted(ino, self.ws.getattr(ino))
        if name == b"..":
            ino = self.store_ino(parent_inode)
            parent = self.ws.links.parent(ino)
            if parent is None:
                parent = self.ws.root
            return self._counted(parent, self.ws.getattr(parent))
        try:
            ino, attrs = self.ws.lookup(self.store_ino(parent_inode), name)
        except NotFound:
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = NEGATIVE_TIMEOUT
            return e
        return self._counted(ino, attrs)

    @fuse_errors
    async def forget(self, inode_list):
        for ino, count in inode_list:
            if ino >= MAGIC_BASE:
                self.magic.forget(ino, count)
                continue
            sino = self.store_ino(ino)
            left = self._lookups.get(sino, 0) - count
            if left <= 0:
                self._lookups.pop(sino, None)
                self._locks.pop(sino, None)
                self.ws.forget(sino)
            else:
                self._lookups[sino] = left

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode >= MAGIC_BASE:
            return self.magic.getattr(inode)
        ino = self.store_ino(inode)
        return self.entry(ino, self.ws.getattr(ino))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._not_magic(inode)
        ino = self.store_ino(inode)
        actor = actor_of(ctx)
        if fields.update_size:
            if attr.st_size > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            if not self.ws.getattr(ino).is_file:
                raise pyfuse3.FUSEError(errno.EINVAL)
            async with self._lock(ino):
                if fh is not None and fh in self._handles:
                    self.ws.files.truncate(ino, attr.st_size, actor.pid)
                else:
                    # truncate(2): a mutation of its own, recorded now.
                    self.ws.files.open(ino)
                    try:
                        self.ws.files.truncate(ino, attr.st_size, actor.pid)
                        await self._commit_locked(ino, actor.pid)
                    finally:
                        self.ws.files.release(ino)
        changes = {}
        attr_change = (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime
                       or fields.update_mtime)
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
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if changes:
            self.ws.setattr(ino, actor, **changes)
        return self.entry(ino, self.ws.getattr(ino))

    @fuse_errors
    async def readlink(self, inode, ctx):
        if inode >= MAGIC_BASE:
            return self.magic.readlink(inode)
        return self.ws.readlink(self.store_ino(inode))

    # -- namespace ---------------------------------------------------------------------------

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        ino, attrs = self.ws.create(self.store_ino(parent_inode), name, mode, actor_of(ctx), rdev)
        return self._counted(ino, attrs)

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        ino, attrs = self.ws.mkdir(self.store_ino(parent_inode), name, mode, actor_of(ctx))
        return self._counted(ino, attrs)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        self.ws.unlink(self.store_ino(parent_inode), name, actor_of(ctx))

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        self.ws.rmdir(self.store_ino(parent_inode), name, actor_of(ctx))

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        ino, attrs = self.ws.symlink(self.store_ino(parent_inode), name, target, actor_of(ctx))
        return self._counted(ino, attrs)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._not_magic(parent_inode_old, parent_inode_new)
        self._not_reserved(parent_inode_old, name_old)
        self._not_reserved(parent_inode_new, name_new)
        self.ws.rename(self.store_ino(parent_inode_old), name_old, self.store_ino(parent_inode_new), name_new,
                       flags, actor_of(ctx))

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._not_magic(inode, new_parent_inode)
        self._not_reserved(new_parent_inode, new_name)
        ino = self.store_ino(inode)
        attrs = self.ws.link(ino, self.store_ino(new_parent_inode), new_name, actor_of(ctx))
        return self._counted(ino, attrs)

    # -- files ----------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if inode >= MAGIC_BASE:
            return await self.magic.open(inode, flags, ctx, self._new_fh())
        ino = self.store_ino(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC) and writable
        async with self._lock(ino):
            self.ws.files.open(ino, truncate=truncate)
        fh = self._new_fh()
        self._handles[fh] = Handle(fh, ino, writable, ctx.pid)
        if truncate:
            self.ws.files[ino].pid = ctx.pid
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._not_magic(parent_inode)
        self._not_reserved(parent_inode, name)
        ino, attrs = self.ws.create(self.store_ino(parent_inode), name, mode, actor_of(ctx))
        state = self.ws.files.open(ino, created=True)
        state.pid = ctx.pid
        fh = self._new_fh()
        self._handles[fh] = Handle(fh, ino, True, ctx.pid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._counted(ino, attrs)

    @fuse_errors
    async def read(self, fh, off, size):
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.read(fh, off, size)
        return self.ws.files.read(handle.ino, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.write(fh, off, buf)
        if off + len(buf) > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        lock = self._lock(handle.ino)
        if lock.locked():
            async with lock:
                written = self.ws.files.write(handle.ino, off, buf, handle.pid)
        else:
            written = self.ws.files.write(handle.ino, off, buf, handle.pid)
        if self.ws.files.stream_backlogged(handle.ino):
            async with lock:
                await trio.to_thread.run_sync(self.ws.files.wait_stream, handle.ino, limiter=self.limiter)
        return written

    async def _commit_locked(self, ino: int, pid: int = 0) -> int | None:
        overlay = self.ws.files.commit_begin(ino)
        if overlay is None:
            return None
        if overlay.commit_cost() <= INLINE_COMMIT_BYTES:
            built = self.ws.files.commit_build(overlay)
        else:
            built = await trio.to_thread.run_sync(self.ws.files.commit_build, overlay, limiter=self.limiter)
        return self.ws.files.commit_finish(ino, built, pid)

    async def commit(self, ino: int, pid: int = 0) -> int | None:
        """Commit ``ino``'s uncommitted writes as a version (if any)."""
        async with self._lock(ino):
            return await self._commit_locked(ino, pid)

    @fuse_errors
    async def flush(self, fh):
        handle = self._handles.get(fh)
        if handle is None:
            return await self.magic.flush(fh)
        if handle.writable:
            await self.commit(handle.ino, handle.pid)

    @fuse_errors
    async def fsync(self, fh, datasync):
        handle = self._handles.get(fh)
        if handle is None:
            return
        await self.commit(handle.ino, handle.pid)
        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)

    @fuse_errors
    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is None:
            return await self.magic.release(fh)
        async with self._lock(handle.ino):
            state = self.ws.files.get(handle.ino)
            if state is not None and state.handles <= 1 and state.dirty:
                await self._commit_locked(handle.ino, handle.pid)
            self.ws.files.release(handle.ino)

    # -- directories ------------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        if inode >= MAGIC_BASE:
            return self.magic.opendir(inode, self._new_fh())
        ino = self.store_ino(inode)
        if not self.ws.getattr(ino).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = [ino, None]
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        handle = self._dirs.get(fh)
        if handle is None:
            return self.magic.readdir(fh, start_id, token)
        ino, listing = handle
        if start_id == 0 or listing is None:
            # A snapshot of the entries, so offsets stay stable while the directory changes.
            parent = self.ws.links.parent(ino)
            if parent is None or ino == self.ws.root:
                parent = ino
            listing = handle[1] = [(b".", ino, 0), (b"..", parent, 0)] + self.ws.readdir(ino)
        for i in range(start_id, len(listing)):
            name, child, _kind = listing[i]
            try:
                attrs = self.ws.getattr(child)
            except NotFound:
                continue
            if not pyfuse3.readdir_reply(token, name, self.entry(child, attrs), i + 1):
                return
            if i >= 2:                # the kernel takes no lookup count for "." and ".."
                self._lookups[child] += 1

    @fuse_errors
    async def releasedir(self, fh):
        if self._dirs.pop(fh, None) is None:
            self.magic.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)

    # -- the rest ---------------------------------------------------------------------------------

    @fuse_errors
    async def statfs(self, ctx):
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
    async def setxattr(self, inode, name, value, ctx):
        self._not_magic(inode)
        await self.commit(self.store_ino(inode), ctx.pid)
        self.ws.setxattr(self.store_ino(inode), name, value, actor_of(ctx))

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
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
    async def listxattr(self, inode, ctx):
        if inode >= MAGIC_BASE:
            return self.magic.listxattr(inode)
        return self.ws.listxattr(self.store_ino(inode))

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        self._not_magic(inode)
        await self.commit(self.store_ino(inode), ctx.pid)
        self.ws.removexattr(self.store_ino(inode), name, actor_of(ctx))

    @fuse_errors
    async def access(self, inode, mode, ctx):
        return True

    # -- cache invalidation (after ctl changes the tree) ----------------------------------------

    async def invalidate(self, inodes, entries) -> None:
        """Drop the kernel's cached entries and inodes (store numbers) that a
        ``ctl`` command changed, before its reply, so the mount shows the
        change at once. The notifications are sent from worker threads: the
        kernel may wait on locks held by requests this loop has to serve."""
        for parent, name in entries:
            await trio.to_thread.run_sync(_invalidate_entry, self.fuse_ino(parent), name)
        for ino in inodes:
            await trio.to_thread.run_sync(_invalidate_inode, self.fuse_ino(ino))

    async def commit_all(self) -> None:
        """Commit every open file's uncommitted writes (before unmount/sync)."""
        for ino in list(self.ws.files):
            await self.commit(ino)

    def stat_mode(self, mode: int) -> int:
        return stat.S_IMODE(mode)


def _invalidate_entry(ino: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(ino, name)
    except (FileNotFoundError, OSError):
        pass


def _invalidate_inode(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except (FileNotFoundError, OSError):
        pass
