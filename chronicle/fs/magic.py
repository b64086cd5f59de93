"""The ``.chronicle/`` tree of a mount (SPEC §4): FUSE over the history views.

What each node is, lists, holds and reads is computed by
:class:`chronicle.store.history.views.HistoryViews`; this module is the
protocol adapter over it, as borg's ``fuse.py`` is over its ``vfs.py``:
inode numbers and lookup counts, ``EntryAttributes``, file handles, and
errors out (raised as Chronicle errors; ``chronicle.fs.errno_map`` turns
them into errnos in the handlers of ``chronicle.fs.operations``).

Inode numbers: nodes are numbered from :data:`MAGIC_BASE` up; the fixed
nodes (``.chronicle`` itself and its children) keep theirs, every other node
keeps its number while the kernel holds a lookup count on it (FUSE docs,
"lookup count"), then it is forgotten and a later lookup numbers it anew.
``.chronicle`` answers lookups at the mount root but is not listed by
readdir, so ``ls -a``, ``find``, ``git add -A``, ``tar``, ``rsync`` and
``du`` never walk it.

Caching: directories are cached for :data:`DIR_TIMEOUT`, immutable nodes
(versions, past trees) for :data:`IMMUTABLE_TIMEOUT` with their pages kept
across opens; rendered files (query, log, stats, ctl) are ``direct_io`` —
their size is unknown before they are rendered, so reads go to EOF.
Everything is read-only (EROFS) except ``ctl``, whose protocol is in
``chronicle.fs.ctl``.

Permissions: lookups, listings and opens are answered for the request's
caller (``caller_of`` its context: uid, and the groups of its pid), so
history shows each user only what it could have read
(``chronicle.store.history.access``); ``ctl`` answers only the user who
mounted the workspace and root (mode 0600, owned by the mount's user,
checked again at open: EACCES for anyone else).

Threads: the trio (FUSE loop) thread only. The views' calls are short:
opening ``log`` is O(1) and each read renders only what it returns.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3

from chronicle.errors import NotADirectory, NotFound, PermissionDenied, ReadOnly
from chronicle.fs.ctl import CtlSession
from chronicle.store.history.access import caller_of
from chronicle.store.history.nodes import (AtDir, CtlFile, LogFile, Node, QueryDir, Root, SnapshotsDir, StatsFile,
                                           VersionsDir)
from chronicle.store.history.views import FileContent, HistoryViews

if TYPE_CHECKING:       # operations imports this module
    from chronicle.fs.operations import ChronicleOperations

MAGIC_BASE = 1 << 62
STATIC: dict[Node, int] = {Root(): 0, QueryDir(b""): 1, VersionsDir(b""): 2, AtDir(): 3, SnapshotsDir(): 4,
                           LogFile(): 5, StatsFile(): 6, CtlFile(): 7}
DIR_TIMEOUT = 1.0               # seconds
IMMUTABLE_TIMEOUT = 3600.0      # seconds
_FIRST_DYNAMIC = MAGIC_BASE + 1024


@dataclass
class MagicHandle:
    """An open magic file: its content, or a ctl session."""

    node: Node
    content: FileContent | None = None
    ctl: CtlSession | None = None


class MagicTree:
    """Serves the ``.chronicle`` tree for :class:`~chronicle.fs.operations.ChronicleOperations`.

    Every method raises Chronicle errors (``NotFound`` for a stale inode
    number or a missing child, ``ReadOnly``, ...); none is caught here.
    """

    NAME = b".chronicle"

    def __init__(self, ops: ChronicleOperations):
        self.ops = ops
        self.views = HistoryViews(ops.ws, ops.mountpoint)
        self.owner = os.getuid()            # who mounted: the only user besides root that ctl answers
        self._ino_of: dict[Node, int] = {node: MAGIC_BASE + n for node, n in STATIC.items()}
        self._node_of: dict[int, Node] = {ino: node for node, ino in self._ino_of.items()}
        self._lookups: dict[int, int] = {}
        self._next = _FIRST_DYNAMIC
        self._handles: dict[int, MagicHandle] = {}
        self._dirs: dict[int, list] = {}        # fh -> [node, listing or None]

    # -- inode numbers and lookup counts -------------------------------------------------------

    def ino(self, node: Node) -> int:
        """The node's inode number (a new one if it has none)."""
        ino = self._ino_of.get(node)
        if ino is None:
            ino = self._next
            self._next += 1
            self._ino_of[node] = ino
            self._node_of[ino] = node
        return ino

    def node(self, ino: int) -> Node:
        """Raises :class:`NotFound` for a number no node holds (forgotten)."""
        node = self._node_of.get(ino)
        if node is None:
            raise NotFound("stale .chronicle inode")
        return node

    def forget(self, ino: int, count: int) -> None:
        """FORGET of magic inode ``ino``: drop ``count`` lookups; at zero a
        non-static node gives its number back (a later lookup numbers it anew)."""
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        node = self._node_of.get(ino)
        if node is not None and node not in STATIC:
            del self._node_of[ino]
            self._ino_of.pop(node, None)

    def _count(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        self._lookups[entry.st_ino] = self._lookups.get(entry.st_ino, 0) + 1
        return entry

    # -- attributes, lookup, listing -------------------------------------------------------------

    def _views(self, ctx: pyfuse3.RequestContext | None) -> HistoryViews:
        """The views as the request's caller may see them (root: all)."""
        if ctx is None or ctx.uid == 0:
            return self.views
        return self.views.for_caller(caller_of(ctx.uid, ctx.gid, ctx.pid))

    def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The ``EntryAttributes`` of ``node`` (not counted): the views' attributes,
        ``ctl`` as 0600 of the mounting user, cache timeouts by kind (immutable
        nodes :data:`IMMUTABLE_TIMEOUT` s, directories ``DIR_TIMEOUT``, rendered
        files 0). Raises ``NotFound``."""
        attrs = self.views.attrs(node)
        if isinstance(node, CtlFile):
            attrs = attrs.replace(mode=(attrs.mode & ~0o7777) | 0o600, uid=self.owner)
        timeout = IMMUTABLE_TIMEOUT if node.immutable else DIR_TIMEOUT if node.is_dir else 0.0
        allocated = attrs.size if attrs.is_file else 4096
        return self.ops.entry(0, attrs, timeout=timeout, fuse_ino=self.ino(node), allocated=allocated)

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        """GETATTR of magic inode ``ino``. Raises ``NotFound`` (a forgotten number)."""
        return self.entry(self.node(ino))

    def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
               ) -> pyfuse3.EntryAttributes:
        """``name`` in magic directory ``parent``, as the caller may see it;
        ``parent`` is the mount root only for ``.chronicle`` itself."""
        if parent == pyfuse3.ROOT_INODE:
            return self._count(self.entry(Root()))
        return self._count(self.entry(self._views(ctx).lookup(self.node(parent), name)))

    def opendir(self, ino: int, fh: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        """A handle listing ``ino`` as the caller may see it (its listing is
        taken at the first readdir). Raises ``PermissionDenied`` (may not list)."""
        node = self.node(ino)
        views = self._views(ctx)
        if not views.is_dir(node):
            raise NotADirectory()
        views.check_listable(node)
        self._dirs[fh] = [node, None, views]
        return fh

    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """READDIR from entry ``start_id`` (pyfuse3's offset: index + 1 of the
        last entry sent); the listing is taken at the first call and kept for
        the handle, so offsets stay valid. Each entry sent counts one lookup;
        EBADF for an unknown handle."""
        state = self._dirs.get(fh)
        if state is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or state[1] is None:
            state[1] = state[2].listing(state[0])
        listing = state[1]
        for i in range(start_id, len(listing)):
            name, node = listing[i]
            try:
                entry = self.entry(node)
            except NotFound:            # gone since the listing was taken
                continue
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                return
            self._count(entry)

    def releasedir(self, fh: int) -> None:
        """RELEASEDIR: forget the handle's listing."""
        self._dirs.pop(fh, None)

    def readlink(self, ino: int) -> bytes:
        """READLINK of a symlink in a past tree (``at/``, ``snapshots/``); EINVAL otherwise."""
        return self.views.readlink(self.node(ino))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """GETXATTR: a past inode's recorded xattr ``name``; ENODATA if it has none."""
        return self.views.getxattr(self.node(ino), name)

    def listxattr(self, ino: int) -> list[bytes]:
        """LISTXATTR: the names of a past inode's recorded xattrs (none for other nodes)."""
        return [key for key, _ in self.views.xattrs(self.node(ino))]

    # -- files -------------------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext, fh: int) -> pyfuse3.FileInfo:
        """OPEN of magic inode ``ino`` as handle ``fh``: ``ctl`` (EACCES unless
        the caller mounted the workspace or is root) starts a ctl session;
        any other file is rendered or mapped now, as the caller may see it, and
        stays as it was for the handle (SPEC §4). Rendered files are
        ``direct_io``; immutable ones keep the page cache. EROFS for writing
        anything but ``ctl``; EACCES for a version the caller may not read."""
        node = self.node(ino)
        if isinstance(node, CtlFile):
            if ctx.uid not in (0, self.owner):
                raise PermissionDenied(".chronicle/ctl answers only the user who mounted the workspace and root")
            self._handles[fh] = MagicHandle(node, ctl=CtlSession(self.ops, ctx))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        content = self._views(ctx).open(node, writable=(flags & os.O_ACCMODE) != os.O_RDONLY)
        self._handles[fh] = MagicHandle(node, content=content)
        return pyfuse3.FileInfo(fh=fh, direct_io=node.rendered, keep_cache=node.immutable)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """READ ``size`` bytes at ``off`` of an open magic file; for ``ctl``, the
        next pending reply lines (``off`` is ignored: ``nonseekable``)."""
        handle = self._handle(fh)
        if handle.ctl is not None:
            return handle.ctl.read(size)
        return handle.content.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """WRITE to ``ctl``: command lines (one JSON object each); EROFS anywhere else."""
        handle = self._handles.get(fh)
        if handle is None or handle.ctl is None:
            raise ReadOnly(".chronicle is read-only")
        return await handle.ctl.write(buf)

    async def flush(self, fh: int) -> None:
        """FLUSH: nothing to commit in ``.chronicle``."""
        return None

    async def release(self, fh: int) -> None:
        """RELEASE: close the handle's content (a spool file, a log reader)."""
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.content is not None:
            handle.content.close()

    def _handle(self, fh: int) -> MagicHandle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle


__all__ = ["MAGIC_BASE", "MagicHandle", "MagicTree"]
