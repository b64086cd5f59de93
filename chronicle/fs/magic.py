"""The ``.chronicle/`` tree of a mount (SPEC §4): history as files.

Vocabulary: a **node** is one entry of the tree, named by a key tuple:

===================================  ==============================================
key                                  what
===================================  ==============================================
``("root",)``                        ``.chronicle/``
``("query", path)``, ``("qfile", p)``  ``query/<path>``: directory mirror / JSON file
``("versions", path)``               ``versions/<path>/``: children and version numbers
``("vfile", path, n)``               ``versions/<path>/<n>``: content of version n
``("at",)``, ``("snapshots",)``      points in history
``("tree", seq, ino)``               an inode of the whole tree at a seq (read-only)
``("log",)``, ``("stats",)``, ``("ctl",)``  the files
===================================  ==============================================

Nodes get inode numbers from :data:`MAGIC_BASE` up, kept while the kernel
holds a lookup count on them. ``.chronicle`` answers lookups at the mount
root but is not listed by readdir, so ``ls -a``, ``find``, ``git add -A``,
``tar``, ``rsync`` and ``du`` never walk it.

Every file's content is rendered when it is opened and stays the same for
that handle. Query, log and stats files are ``direct_io`` (their size is not
known before they are rendered; reads go to EOF). Everything is read-only
(EROFS) except ``ctl``, whose protocol is in ``chronicle.fs.ctl``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass

import pyfuse3

from chronicle.errors import NotFound, ReadOnly
from chronicle.fs.ctl import CtlSession
from chronicle.store.meta import schema
from chronicle.store.meta.schema import P_DIR
from chronicle.store.model import KIND_DIR, Attrs

log = logging.getLogger("chronicle.fs")

MAGIC_BASE = 1 << 62
STATIC = {("root",): 0, ("query", b""): 1, ("versions", b""): 2, ("at",): 3, ("snapshots",): 4, ("log",): 5,
          ("stats",): 6, ("ctl",): 7}
ROOT_CHILDREN = {b"query": ("query", b""), b"versions": ("versions", b""), b"at": ("at",),
                 b"snapshots": ("snapshots",), b"log": ("log",), b"stats": ("stats",), b"ctl": ("ctl",)}
IMMUTABLE_TIMEOUT = 3600.0
SPOOL_BYTES = 8 * 1024 * 1024


@dataclass
class MagicHandle:
    """An open magic file: rendered bytes (or a spool file), or a ctl session."""

    key: tuple
    data: bytes | None = None
    spool: tempfile.SpooledTemporaryFile | None = None
    content: object | None = None     # ContentMap for version/tree files
    ctl: object | None = None         # chronicle.fs.ctl.CtlSession


class MagicTree:
    """Serves the ``.chronicle`` tree for :class:`~chronicle.fs.operations.ChronicleOperations`."""

    NAME = b".chronicle"

    def __init__(self, ops):
        self.ops = ops
        self.ws = ops.ws
        self.store = ops.store
        self._ino_of: dict[tuple, int] = {key: MAGIC_BASE + n for key, n in STATIC.items()}
        self._key_of: dict[int, tuple] = {ino: key for key, ino in self._ino_of.items()}
        self._lookups: dict[int, int] = {}
        self._next = MAGIC_BASE + 1024
        self._handles: dict[int, MagicHandle] = {}
        self._dirs: dict[int, list] = {}

    # -- inode numbers -------------------------------------------------------------------

    def ino(self, key: tuple) -> int:
        ino = self._ino_of.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._ino_of[key] = ino
            self._key_of[ino] = key
        return ino

    def key(self, ino: int) -> tuple:
        key = self._key_of.get(ino)
        if key is None:
            raise NotFound("stale .chronicle inode")
        return key

    def forget(self, ino: int, count: int) -> None:
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        key = self._key_of.get(ino)
        if key is not None and key not in STATIC:
            del self._key_of[ino]
            self._ino_of.pop(key, None)

    def _counted(self, key: tuple) -> pyfuse3.EntryAttributes:
        entry = self.entry(key)
        self._lookups[entry.st_ino] = self._lookups.get(entry.st_ino, 0) + 1
        return entry

    # -- attributes ------------------------------------------------------------------------

    def _base_attrs(self) -> Attrs:
        return self.ws.head_attrs(self.ws.root)

    def attrs(self, key: tuple) -> tuple[Attrs, float]:
        """``(attrs, cache timeout)`` of a node."""
        root = self._base_attrs()
        kind = key[0]
        if kind in ("root", "query", "versions", "at", "snapshots"):
            return root.replace(mode=stat.S_IFDIR | 0o555, nlink=2, size=4096, xattrs=()), 1.0
        if kind in ("qfile", "log", "stats"):
            return root.replace(mode=stat.S_IFREG | 0o444, nlink=1, size=0, xattrs=()), 0.0
        if kind == "ctl":
            return root.replace(mode=stat.S_IFREG | 0o660, nlink=1, size=0, xattrs=()), 0.0
        if kind == "vfile":
            version = self._version(key[1], key[2])
            content = self.store.content_map(version.entry.content)
            return root.replace(mode=stat.S_IFREG | 0o444, nlink=1, size=content.size, xattrs=(),
                                content=content.id), IMMUTABLE_TIMEOUT
        if kind == "tree":
            _, seq, ino = key
            with self.ws.read_txn() as txn:
                attrs = self.ws.view(seq).attrs(txn, ino)
            if attrs is None:
                raise NotFound()
            return attrs, IMMUTABLE_TIMEOUT
        raise NotFound()

    def entry(self, key: tuple) -> pyfuse3.EntryAttributes:
        attrs, timeout = self.attrs(key)
        allocated = attrs.size if attrs.is_file else 4096
        return self.ops.entry(0, attrs, timeout=timeout, fuse_ino=self.ino(key), allocated=allocated)

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        return self.entry(self.key(ino))

    # -- lookup and listing ------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE:
            return self._counted(("root",))
        key = self._child(self.key(parent), name)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._counted(key)

    def _child(self, key: tuple, name: bytes) -> tuple | None:
        kind = key[0]
        if name == b".":
            return key
        if kind == "root":
            return ROOT_CHILDREN.get(name)
        if kind == "query":
            return self._query_child(key[1], name)
        if kind == "versions":
            return self._versions_child(key[1], name)
        if kind == "at":
            try:
                seq = self.store.resolve_point(self.ws, os.fsdecode(name))
            except NotFound:
                return None
            except Exception as exc:
                log.debug("bad point %r: %s", name, exc)
                return None
            return ("tree", seq, self.ws.root)
        if kind == "snapshots":
            for snap in self.store.snapshots(self.ws):
                if os.fsencode(snap["name"]) == name:
                    return ("tree", snap["seq"], self.ws.root)
            return None
        if kind == "tree":
            _, seq, ino = key
            with self.ws.read_txn() as txn:
                found = self.ws.view(seq).lookup(txn, ino, name)
            return ("tree", seq, found[0]) if found else None
        return None

    def _join(self, path: bytes, name: bytes) -> bytes:
        return path + b"/" + name if path else name

    def _head_kind(self, path: bytes) -> int | None:
        try:
            return self.ws.resolve(path)[1]
        except Exception:
            return None

    def _query_child(self, path: bytes, name: bytes) -> tuple | None:
        child = self._join(path, name)
        kind = self._head_kind(child)
        if kind == KIND_DIR:
            return ("query", child)
        with self.ws.read_txn() as txn:
            items = self.ws.history.followed(txn, child)
        if not items:
            return None
        if kind is None and items[-1][1].flags & P_DIR:
            return ("query", child)
        return ("qfile", child)

    def _versions_child(self, path: bytes, name: bytes) -> tuple | None:
        if name.isdigit():
            try:
                self._version(path, int(name))
                return ("vfile", path, int(name))
            except NotFound:
                pass
        child = self._join(path, name)
        if self._head_kind(child) is not None:
            return ("versions", child)
        with self.ws.read_txn() as txn:
            if self.ws.history.has_history(txn, child):
                return ("versions", child)
        return None

    def _version(self, path: bytes, number: int):
        with self.ws.read_txn() as txn:
            found = self.ws.history.content_versions(txn, path).get(number)
        if found is None:
            raise NotFound(f"no version {number}")
        return found

    def listing(self, key: tuple) -> list[tuple[bytes, tuple]]:
        kind = key[0]
        if kind == "root":
            return sorted(ROOT_CHILDREN.items())
        if kind in ("query", "versions"):
            path = key[1]
            names: set[bytes] = set()
            if self._head_kind(path) == KIND_DIR:
                ino = self.ws.resolve(path)[0]
                names.update(name for name, _, _ in self.ws.readdir(ino))
            with self.ws.read_txn() as txn:
                names.update(self.ws.history.children_with_history(txn, path))
                numbers = sorted(self.ws.history.content_versions(txn, path)) if kind == "versions" and path and \
                    self.ws.history.has_history(txn, path) else []
            out = []
            for number in numbers:
                out.append((str(number).encode(), ("vfile", path, number)))
            for name in sorted(names):
                child = self._child(key, name)
                if child is not None:
                    out.append((name, child))
            return out
        if kind == "snapshots":
            return [(os.fsencode(s["name"]), ("tree", s["seq"], self.ws.root)) for s in self.store.snapshots(self.ws)]
        if kind == "at":
            return []
        if kind == "tree":
            _, seq, ino = key
            with self.ws.read_txn() as txn:
                return [(name, ("tree", seq, child)) for name, child, _ in self.ws.view(seq).entries(txn, ino)]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def opendir(self, ino: int, fh: int) -> int:
        key = self.key(ino)
        if key[0] not in ("root", "query", "versions", "at", "snapshots") and not (
                key[0] == "tree" and self.attrs(key)[0].is_dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._dirs[fh] = [key, None]
        return fh

    def readdir(self, fh: int, start_id: int, token) -> None:
        state = self._dirs.get(fh)
        if state is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or state[1] is None:
            state[1] = self.listing(state[0])
        listing = state[1]
        for i in range(start_id, len(listing)):
            name, key = listing[i]
            try:
                entry = self.entry(key)
            except NotFound:
                continue
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                return
            self._lookups[entry.st_ino] = self._lookups.get(entry.st_ino, 0) + 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def readlink(self, ino: int) -> bytes:
        key = self.key(ino)
        attrs, _ = self.attrs(key)
        if not attrs.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return attrs.target

    def getxattr(self, ino: int, name: bytes) -> bytes:
        key = self.key(ino)
        if key[0] == "tree":
            for k, v in self.attrs(key)[0].xattrs:
                if k == name:
                    return v
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def listxattr(self, ino: int) -> list[bytes]:
        key = self.key(ino)
        if key[0] == "tree":
            return [k for k, _ in self.attrs(key)[0].xattrs]
        return []

    # -- files -----------------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, ctx, fh: int) -> pyfuse3.FileInfo:
        key = self.key(ino)
        kind = key[0]
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if kind == "ctl":
            self._handles[fh] = MagicHandle(key, ctl=CtlSession(self.ops, ctx))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        if writable:
            raise ReadOnly(".chronicle is read-only")
        if kind == "qfile":
            with self.ws.read_txn() as txn:
                data = self.ws.history.render_query(txn, key[1])
            self._handles[fh] = MagicHandle(key, data=data)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if kind == "log":
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
            with self.ws.read_txn() as txn:
                for line in self.ws.history.log_lines(txn):
                    spool.write(line)
                    spool.write(b"\n")
            self._handles[fh] = MagicHandle(key, spool=spool)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if kind == "stats":
            data = (json.dumps(self.stats(), indent=2) + "\n").encode()
            self._handles[fh] = MagicHandle(key, data=data)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if kind in ("vfile", "tree"):
            attrs, _ = self.attrs(key)
            if attrs.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if not attrs.is_file:
                raise pyfuse3.FUSEError(errno.EINVAL)
            self._handles[fh] = MagicHandle(key, content=self.store.content_map(attrs.content))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.ctl is not None:
            return handle.ctl.read(size)
        if handle.data is not None:
            return handle.data[off:off + size]
        if handle.spool is not None:
            handle.spool.seek(off)
            return handle.spool.read(size)
        return handle.content.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if handle is None or handle.ctl is None:
            raise ReadOnly(".chronicle is read-only")
        return await handle.ctl.write(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.spool is not None:
            handle.spool.close()

    def stats(self) -> dict:
        """The figures of ``.chronicle/stats``: the store's and this workspace's."""
        figures = self.store.stats()
        figures.update(self.store.workspace_stats(self.ws))
        figures.update(store=str(self.store.path.resolve()), mountpoint=self.ops.mountpoint, pid=os.getpid(),
                       open_files=len(self.ws.files))
        return figures


__all__ = ["MAGIC_BASE", "MagicTree", "schema"]
