"""A workspace: its tree at the head, and the mutations that make its history.

Vocabulary: the **head** is the workspace's current state (seq ``head_seq``).
Each mutation is one **event** (``chronicle.store.meta.journal``): one seq,
one LMDB write transaction, one ``.chronicle/log`` line. An **actor** is who
asked for it (uid, gid, pid — the FUSE request context, or the CLI user).

One process at a time mutates a workspace (the mounting daemon, or the CLI on
an unmounted workspace; ``Store.open_workspace`` takes the workspace lock), so
a :class:`Workspace` keeps its head in memory without re-reading it. It is one
object composed of collaborators, each in its own module:

- ``ws.links`` — :class:`~chronicle.store.namespace.head.PathLinks`: the
  ``(parent, name)`` each inode was reached by, which is how an event knows
  its path;
- ``ws.files`` — :class:`~chronicle.store.namespace.files.OpenFiles`: the
  open files (handle counts, overlays, streams) and the commits that turn
  their writes into versions;
- the head attributes of the inodes in use (loaded on demand, read with
  :meth:`Workspace.head_attrs`).

**The mutation API.** Every change is made inside :meth:`Workspace.event`,
which yields a :class:`~chronicle.store.namespace.head.WorkspaceEvent`. Its
``put_attrs``, ``put_dirent`` and ``del_dirent`` write the records *and*
note what they change in the caches above; the workspace applies those
notes once the transaction has committed (an aborted event changes
nothing). The mutations below (create, write, rename, unlink, ...) and
:mod:`chronicle.store.namespace.restore` are written with it alone — no
caller touches a cache.

Errors: tree errors from ``chronicle.errors`` (``NotFound``, ``Exists``,
``NotEmpty``, ``NotADirectory``, ``IsADirectory``, ``NameTooLong``,
``InvalidArgument``, ``NotPermitted``), as ext4 gives them for the same
call (the errno table is ``chronicle.fs.errno_map``); ``ReadOnly`` for a
mutation of a workspace opened read-only; ``NoSpace`` when the metadata map
is full.

Threads: a Workspace is used from one thread (the FUSE loop, or the CLI),
except what ``files`` hands to worker threads (content builds, stream
waits). Its read methods open their own LMDB read transaction unless given
one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import (Exists, InvalidArgument, IsADirectory, NameTooLong, NoAttribute, NoSpace,
                              NotADirectory, NotEmpty, NotFound, NotPermitted, NotSupported, ReadOnly)
from chronicle.store import model
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.gc.ignore import IgnoreRules
from chronicle.store.history import points
from chronicle.store.history.paths import History
from chronicle.store.meta import schema
from chronicle.store.meta.schema import P_ARRIVED, P_BUMPS, P_CONTENT, P_DIR, P_GONE, WorkspaceRecord
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import KIND_DIR, Actor, Attrs
from chronicle.store.namespace.files import OpenFiles
from chronicle.store.namespace.head import PathLinks, WorkspaceEvent

if TYPE_CHECKING:               # store.py opens workspaces: a runtime import would be a cycle
    from chronicle.store.store import Store

NAME_MAX = 255                 # bytes in one name (ext4, NAME_MAX of <limits.h>)
RENAME_NOREPLACE = 1           # renameat2(2) flags, <linux/fs.h>
RENAME_EXCHANGE = 2
XATTR_SIZE_MAX = 65536         # bytes in one xattr value (<linux/limits.h>)
XATTR_TOTAL_MAX = 65536        # bytes of all names and values of one inode
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
DIR_SIZE = 4096                # st_size of a directory, as ext4 shows an empty one
MAX_LINKS = 65000              # ext4's EXT4_LINK_MAX


def check_name(name: bytes) -> None:
    """Raise unless ``name`` is a valid directory entry name: :class:`NameTooLong`
    over :data:`NAME_MAX` bytes, :class:`InvalidArgument` if empty, ``.``,
    ``..``, or holding ``/`` or NUL."""
    if len(name) > NAME_MAX:
        raise NameTooLong()
    if not name or b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise InvalidArgument(f"invalid file name {name!r}")


class Workspace:
    """A workspace of a store; see the module docstring.

    ``store`` opens it (``Store.open_workspace``); ``record`` is its
    ``workspaces`` row; ``writable``: the caller holds the workspace lock
    and may mutate (else every mutation raises :class:`ReadOnly` and nothing
    is cached).
    """

    def __init__(self, store: Store, record: WorkspaceRecord, *, writable: bool):
        self.store = store
        self.record = record
        self.id = record.id
        self.name = record.name
        self.root = record.root
        self.dbs = store.dbs
        self.chain = store.fork_chain(record)
        self.is_fork = len(self.chain) > 1
        self.history = History(self.dbs, self.chain)
        self.writable = writable
        with store.env.begin() as txn:
            self.head_seq = store.head_seq(txn, self.id)
        self.turn: dict | None = None        # the open turn label; chronicle.store.history.turns sets it
        self._head_view = TreeView(self.dbs, self.chain, self.root, None, env=store.env,   # tolerant reads
                                   damaged=store.damaged)
        self.ignore_rules = IgnoreRules(store, self.id, self._head_view, self.root)     # chronicle.store.gc.ignore
        self._attrs: dict[int, Attrs] = {}          # head attributes of the inodes in use
        self.links = PathLinks(self.root)
        self.files = OpenFiles(self)

    # -- views ---------------------------------------------------------------------

    def view(self, seq: int | None = None) -> TreeView:
        """The tree at ``seq`` (None: the committed head). Raises
        :class:`NotFound` for a seq after the head."""
        if seq is None:
            return self._head_view
        if seq > self.head_seq:
            raise NotFound(f"seq {seq} is in the future (head is {self.head_seq})")
        return TreeView(self.dbs, self.chain, self.root, seq, env=self.store.env, damaged=self.store.damaged)

    def read_txn(self) -> lmdb.Transaction:
        """A new LMDB read transaction of the store (use it in ``with``; ``Store.read_txn``)."""
        return self.store.read_txn()

    # -- reads at the head -----------------------------------------------------------

    def head_attrs(self, ino: int, txn: lmdb.Transaction | None = None) -> Attrs:
        """Committed head attributes of ``ino`` (without uncommitted writes:
        see :meth:`getattr`). Raises :class:`NotFound`."""
        attrs = self._attrs.get(ino)
        if attrs is not None:
            return attrs
        if txn is None:
            with self.read_txn() as rtxn:
                attrs = self.view().attrs(rtxn, ino)
        else:
            attrs = self.view().attrs(txn, ino)
        if attrs is None:
            raise NotFound(f"no inode {ino}")
        if self.writable:
            self._attrs[ino] = attrs
        return attrs

    def getattr(self, ino: int, txn: lmdb.Transaction | None = None) -> Attrs:
        """Head attributes with the size and times of uncommitted writes
        (what stat(2) shows). Raises :class:`NotFound`."""
        return self.files.with_pending(ino, self.head_attrs(ino, txn))

    def allocated_bytes(self, ino: int, attrs: Attrs) -> int:
        """Bytes of ``ino`` that are not holes (``st_blocks * 512``); for a
        file with uncommitted writes, its size."""
        if self.files.is_dirty(ino) or not attrs.is_file:
            return attrs.size
        return self.store.content_map(attrs.content).allocated_bytes_cached()

    def lookup(self, parent: int, name: bytes, txn: lmdb.Transaction | None = None) -> tuple[int, Attrs]:
        """``(ino, attrs)`` of ``name`` in ``parent``; it becomes the inode's
        path link (``links``).

        Raises :class:`NotFound`, :class:`NotADirectory`, :class:`NameTooLong`.
        """
        if len(name) > NAME_MAX:
            raise NameTooLong()
        if txn is None:
            with self.read_txn() as rtxn:
                return self.lookup(parent, name, rtxn)
        if not self.head_attrs(parent, txn).is_dir:
            raise NotADirectory()
        found = self.view().lookup(txn, parent, name)
        if found is None:
            raise NotFound()
        ino = found[0]
        self.links.add(ino, parent, name)
        return ino, self.getattr(ino, txn)

    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """``(name, ino, kind)`` of every entry, sorted by name (kinds:
        ``model.KIND_*``). Raises :class:`NotFound`, :class:`NotADirectory`."""
        with self.read_txn() as txn:
            if not self.head_attrs(ino, txn).is_dir:
                raise NotADirectory()
            entries = self.view().entries(txn, ino)
        for name, child, _kind in entries:
            self.links.note(child, ino, name)
        return entries

    def readlink(self, ino: int) -> bytes:
        """The target of symlink ``ino``. Raises :class:`NotFound`,
        :class:`InvalidArgument` (not a symlink: readlink(2) answers EINVAL)."""
        attrs = self.head_attrs(ino)
        if not attrs.is_symlink:
            raise InvalidArgument("not a symbolic link")
        return attrs.target

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of extended attribute ``name``. Raises :class:`NotFound`,
        :class:`NoAttribute` (ENODATA, as getxattr(2))."""
        for key, value in self.head_attrs(ino).xattrs:
            if key == name:
                return value
        raise NoAttribute()

    def listxattr(self, ino: int) -> list[bytes]:
        """The names of ``ino``'s extended attributes, sorted. Raises :class:`NotFound`."""
        return [key for key, _ in self.head_attrs(ino).xattrs]

    def resolve(self, path: bytes) -> tuple[int, int]:
        """``(ino, kind)`` at a path of the head (relative, ``/``-separated),
        recording the links on the way. Raises :class:`NotFound`, :class:`NotADirectory`."""
        ino, kind = self.root, KIND_DIR
        with self.read_txn() as txn:
            for part in path.split(b"/"):
                if not part or part == b".":
                    continue
                if kind != KIND_DIR:
                    raise NotADirectory(f"not a directory on the way to {path.decode(errors='replace')!r}")
                found = self.view().lookup(txn, ino, part)
                if found is None:
                    raise NotFound(f"no such file or directory: {path.decode(errors='replace')!r}")
                self.links.add(found[0], ino, part)
                ino, kind = found
        return ino, kind

    def forget(self, ino: int) -> None:
        """The kernel holds no more references to ``ino`` (FUSE ``forget``):
        drop what is cached for it, unless it is the root or open."""
        if ino == self.root or ino in self.files:
            return
        self._attrs.pop(ino, None)
        self.links.forget(ino)

    def drop_unlinked(self, ino: int) -> None:
        """Drop the cached attributes of ``ino`` if no name reaches it any
        more (nlink 0; ``files`` calls this when its last handle closes)."""
        attrs = self._attrs.get(ino)
        if attrs is not None and attrs.nlink == 0:
            self._attrs.pop(ino, None)

    # -- the mutation transaction ------------------------------------------------------

    @contextmanager
    def event(self, actor: Actor, now_ns: int | None = None) -> Iterator[WorkspaceEvent]:
        """One event: a write transaction with the next seq, as a
        :class:`~chronicle.store.namespace.head.WorkspaceEvent` — the public
        mutation API of the workspace (see the module docstring).

        Commits if the block ends normally and the writer logged a line, then
        moves ``head_seq`` and updates the caches from what was written;
        aborts on an exception (nothing changes) or when nothing was logged.
        ``now_ns``: the event's time (ns since the epoch; default: now).
        Raises :class:`ReadOnly` (not writable), :class:`NoSpace` (the LMDB
        map is full), and whatever the block raises.
        """
        if not self.writable:
            raise ReadOnly(f"workspace {self.name!r} is open read-only")
        seq = self.head_seq + 1
        txn = self.store.env.begin(write=True)
        writer = WorkspaceEvent(txn, self.dbs, self.id, seq, head=self._head_view, is_fork=self.is_fork,
                                turn=self.turn, pid=actor.pid, history=self.history, now_ns=now_ns)
        writer.ignored = self.ignore_rules.ignored
        try:
            yield writer
            if not writer.logged:
                txn.abort()
                return
            txn.put(schema.ws_key(self.id), schema.U64.pack(seq), db=self.dbs["heads"])
            self.store.before_commit()
            txn.commit()
        except BaseException as exc:
            txn.abort()
            if _is_map_full(exc):
                raise NoSpace("the store's metadata map is full") from exc
            if isinstance(exc, (lmdb.Error, OSError)) and self.store.no_space(exc):
                raise NoSpace(f"no space left on the device that holds the store ({exc})") from exc
            raise
        self.head_seq = seq
        writer.apply(self._attrs, self.links)
        self.store.note_commit()

    # -- namespace mutations -------------------------------------------------------------

    def _need_dir(self, ino: int, txn: lmdb.Transaction) -> Attrs:
        attrs = self.head_attrs(ino, txn)
        if not attrs.is_dir:
            raise NotADirectory()
        return attrs

    def _entry(self, parent: int, name: bytes, txn: lmdb.Transaction) -> tuple[Attrs, int, int]:
        """``(parent attrs, ino, kind)`` of an existing entry. Raises
        :class:`NotADirectory` (parent) or :class:`NotFound`."""
        pattrs = self._need_dir(parent, txn)
        found = self.view().lookup(txn, parent, name)
        if found is None:
            raise NotFound()
        return pattrs, found[0], found[1]

    def _new_inode_attrs(self, parent_attrs: Attrs, mode: int, actor: Actor, now: int, **extra) -> Attrs:
        gid = actor.gid
        if parent_attrs.mode & stat.S_ISGID:
            gid = parent_attrs.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return Attrs(mode=mode, uid=actor.uid, gid=gid, nlink=1, size=0, atime_ns=now, mtime_ns=now,
                     ctime_ns=now, **extra)

    def _new_child(self, parent: int, name: bytes, mode: int, actor: Actor, event: str, flags: int,
                   **attr_fields) -> tuple[int, Attrs]:
        """Create a new inode at ``parent/name`` as one ``event``: its record,
        the parent's times (and nlink for a directory), the dirent, the path
        entry and the log line. Raises :class:`Exists`, :class:`NotADirectory`."""
        check_name(name)
        is_dir = stat.S_ISDIR(mode)
        with self.event(actor) as w:
            pattrs = self._need_dir(parent, w.txn)
            if self.view().lookup(w.txn, parent, name) is not None:
                raise Exists()
            ino = self.store.allocate_ino(w.txn)
            attrs = self._new_inode_attrs(pattrs, mode, actor, w.now_ns).replace(**attr_fields)
            new_pattrs = pattrs.replace(nlink=pattrs.nlink + (1 if is_dir else 0), mtime_ns=w.now_ns,
                                        ctime_ns=w.now_ns)
            w.put_attrs(ino, attrs)
            w.put_attrs(parent, new_pattrs)
            w.put_dirent(parent, name, ino, model.kind_of_mode(mode), replaces=None)
            path = self.links.child_path(parent, name)
            target = _text(attrs.target) if attrs.is_symlink else None
            size = 0 if attrs.is_file else None
            version = None
            if path is not None:
                version = w.path_entry(path, event, ino=ino, flags=flags, content=attrs.content, size=size,
                                       target=target)
                if is_dir:
                    w.forget_heads_below(path)
            w.log(event, path, version=version if attrs.is_symlink else None, size=size, target=target)
        return ino, attrs

    def create(self, parent: int, name: bytes, mode: int, actor: Actor, rdev: int = 0) -> tuple[int, Attrs]:
        """Create a regular file (or a FIFO, socket or device node for other
        ``mode`` types; ``rdev`` its device number) ``name`` in ``parent``,
        owned by the actor (group of a setgid parent). Returns ``(ino, attrs)``.
        Raises :class:`Exists`, :class:`NotADirectory`, :class:`NameTooLong`,
        :class:`InvalidArgument` (a bad name, or a directory/symlink mode)."""
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise InvalidArgument("use mkdir or symlink")
        if stat.S_ISREG(mode):
            return self._new_child(parent, name, mode, actor, "create", P_ARRIVED | P_BUMPS | P_CONTENT,
                                   rdev=rdev, content=EMPTY_CONTENT_ID)
        return self._new_child(parent, name, mode, actor, "mknod", P_ARRIVED | P_BUMPS, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, actor: Actor) -> tuple[int, Attrs]:
        """Create directory ``name`` in ``parent`` with permission bits
        ``mode``; it inherits a setgid parent's group and setgid bit (ext4,
        mkdir(2)). Returns ``(ino, attrs)``. Raises :class:`Exists`,
        :class:`NotADirectory`, :class:`NameTooLong`, :class:`InvalidArgument`."""
        return self._new_child(parent, name, stat.S_IFDIR | (mode & 0o7777), actor, "mkdir",
                               P_ARRIVED | P_BUMPS | P_DIR, nlink=2, size=DIR_SIZE)

    def symlink(self, parent: int, name: bytes, target: bytes, actor: Actor) -> tuple[int, Attrs]:
        """Create symlink ``name`` in ``parent`` pointing at ``target`` (not
        resolved). Returns ``(ino, attrs)``. Raises :class:`NameTooLong`
        (target of 4096 bytes or more, as ext4's one-block limit), :class:`InvalidArgument`
        (empty target), :class:`Exists`, :class:`NotADirectory`."""
        if not target or len(target) >= 4096:
            raise NameTooLong() if target else InvalidArgument("empty symlink target")
        return self._new_child(parent, name, stat.S_IFLNK | 0o777, actor, "symlink", P_ARRIVED | P_BUMPS,
                               target=target, size=len(target))

    def link(self, ino: int, parent: int, name: bytes, actor: Actor) -> Attrs:
        """Add a hard link ``parent/name`` to ``ino``; returns its new attrs.
        Raises :class:`NotPermitted` for directories (link(2) EPERM),
        :class:`Exists`, :class:`NotADirectory`, :class:`InvalidArgument`
        (:data:`MAX_LINKS` reached; ext4 answers EMLINK)."""
        check_name(name)
        with self.event(actor) as w:
            attrs = self.head_attrs(ino, w.txn)
            if attrs.is_dir:
                raise NotPermitted("hard links to directories are not allowed")
            pattrs = self._need_dir(parent, w.txn)
            if self.view().lookup(w.txn, parent, name) is not None:
                raise Exists()
            if attrs.nlink >= MAX_LINKS:
                raise InvalidArgument("too many links")
            source = self.links.path_of(ino)
            new_attrs = attrs.replace(nlink=attrs.nlink + 1, ctime_ns=w.now_ns)
            new_pattrs = pattrs.replace(mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            w.put_attrs(parent, new_pattrs)
            w.put_dirent(parent, name, ino, attrs.kind, replaces=None)
            path = self.links.child_path(parent, name)
            version = None
            if path is not None:
                flags = P_ARRIVED | P_BUMPS | (P_CONTENT if attrs.is_file else 0)
                version = w.path_entry(path, "link", ino=ino, flags=flags, content=attrs.content,
                                       size=attrs.size if attrs.is_file else None,
                                       from_=_text(source) if source is not None else None)
            w.log("link", path, from_=_text(source) if source is not None else None, version=version)
        return new_attrs

    def unlink(self, parent: int, name: bytes, actor: Actor) -> int:
        """Remove a non-directory entry; returns its inode (which lives on
        while open or looked up). Raises :class:`IsADirectory` for a
        directory, :class:`NotFound`, :class:`NotADirectory` (parent)."""
        with self.event(actor) as w:
            pattrs, ino, kind = self._entry(parent, name, w.txn)
            if kind == KIND_DIR:
                raise IsADirectory()
            path = self.links.child_path(parent, name)
            attrs = self.head_attrs(ino, w.txn)
            new_attrs = attrs.replace(nlink=max(attrs.nlink - 1, 0), ctime_ns=w.now_ns)
            new_pattrs = pattrs.replace(mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            w.put_attrs(parent, new_pattrs)
            w.del_dirent(parent, name, replaces=ino)
            if path is not None:
                w.path_entry(path, "delete", ino=ino, flags=P_GONE)
            w.log("delete", path)
        return ino

    def rmdir(self, parent: int, name: bytes, actor: Actor) -> int:
        """Remove the empty directory ``parent/name``; returns its inode.
        Raises :class:`NotADirectory`, :class:`NotEmpty`, :class:`NotFound`."""
        with self.event(actor) as w:
            pattrs, ino, kind = self._entry(parent, name, w.txn)
            if kind != KIND_DIR:
                raise NotADirectory()
            if self.view().entries(w.txn, ino):
                raise NotEmpty()
            path = self.links.child_path(parent, name)
            attrs = self.head_attrs(ino, w.txn)
            new_attrs = attrs.replace(nlink=0, ctime_ns=w.now_ns)
            new_pattrs = pattrs.replace(nlink=max(pattrs.nlink - 1, 2), mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            w.put_attrs(parent, new_pattrs)
            w.del_dirent(parent, name, replaces=ino)
            if path is not None:
                w.path_entry(path, "rmdir", ino=ino, flags=P_GONE | P_DIR)
            w.log("rmdir", path)
        return ino

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, actor: Actor) -> int | None:
        """rename(2) / renameat2(2) of ``p_old/n_old`` to ``p_new/n_new``, one event.

        As rename(2): an existing target is replaced atomically (a directory
        only by a directory, and only if empty; a non-directory only by a
        non-directory); if source and target are the same inode nothing
        happens. ``flags``: ``RENAME_NOREPLACE`` fails if the target exists;
        ``RENAME_EXCHANGE`` swaps the two entries atomically (both must
        exist; they may be of different types), as ext4 implements it.

        History: the target path gets a new version if something was
        replaced, else it continues the source path's history (``git log
        --follow``); the source path's history records where it went.

        Returns the inode replaced at the target (nlink dropped; it lives on
        while open or looked up), or None. Raises :class:`Exists`
        (RENAME_NOREPLACE), :class:`NotFound` (no source; RENAME_EXCHANGE
        with no target), :class:`NotEmpty`, :class:`IsADirectory`,
        :class:`NotADirectory`, :class:`InvalidArgument` (bad flags, a
        directory into itself), :class:`NameTooLong`."""
        check_name(n_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise InvalidArgument("invalid rename flags")
        replaced = None
        updates: dict[int, Attrs] = {}
        with self.event(actor) as w:
            txn, now = w.txn, w.now_ns
            view = self.view()

            def attrs_of(ino: int) -> Attrs:
                return updates.get(ino) or self.head_attrs(ino, txn)

            old_pattrs = self._need_dir(p_old, txn)
            self._need_dir(p_new, txn)
            src = view.lookup(txn, p_old, n_old)
            if src is None:
                raise NotFound()
            dst = view.lookup(txn, p_new, n_new)
            if dst is not None and dst[0] == src[0]:
                return None                        # same inode: POSIX says do nothing
            old_path, new_path = self.links.child_path(p_old, n_old), self.links.child_path(p_new, n_new)
            src_ino, src_kind = src
            if src_kind == KIND_DIR and self.links.is_within(p_new, src_ino):
                raise InvalidArgument("cannot move a directory into itself")
            if dst is not None and flags & RENAME_EXCHANGE and dst[1] == KIND_DIR and \
                    self.links.is_within(p_old, dst[0]):
                raise InvalidArgument("cannot move a directory into itself")
            src_attrs = attrs_of(src_ino)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise NotFound()
                dst_ino, dst_kind = dst
                dst_attrs = attrs_of(dst_ino)
                w.put_dirent(p_old, n_old, dst_ino, dst_kind, replaces=src_ino)
                w.put_dirent(p_new, n_new, src_ino, src_kind, replaces=dst_ino)
                if p_old != p_new and (src_kind == KIND_DIR) != (dst_kind == KIND_DIR):
                    delta = 1 if src_kind == KIND_DIR else -1
                    updates[p_old] = attrs_of(p_old).replace(nlink=attrs_of(p_old).nlink - delta)
                    updates[p_new] = attrs_of(p_new).replace(nlink=attrs_of(p_new).nlink + delta)
                updates[src_ino] = src_attrs.replace(ctime_ns=now)
                updates[dst_ino] = dst_attrs.replace(ctime_ns=now)
                for p in {p_old, p_new}:
                    updates[p] = attrs_of(p).replace(mtime_ns=now, ctime_ns=now)
                for ino, attrs in updates.items():
                    w.put_attrs(ino, attrs)
                if old_path is not None and new_path is not None:
                    self._rename_entry(w, old_path, new_path, dst_ino, dst_attrs, replaced=True)
                    v = self._rename_entry(w, new_path, old_path, src_ino, src_attrs, replaced=True)
                    w.log("rename", new_path, from_=_text(old_path), version=v, exchange=True)
                else:
                    w.log("rename", new_path, from_=_text(old_path) if old_path else None, exchange=True)
            else:
                if dst is not None:
                    if flags & RENAME_NOREPLACE:
                        raise Exists()
                    dst_ino, dst_kind = dst
                    if dst_kind == KIND_DIR and src_kind != KIND_DIR:
                        raise IsADirectory()
                    if src_kind == KIND_DIR and dst_kind != KIND_DIR:
                        raise NotADirectory()
                    dst_attrs = attrs_of(dst_ino)
                    if dst_kind == KIND_DIR:
                        if view.entries(txn, dst_ino):
                            raise NotEmpty()
                        updates[dst_ino] = dst_attrs.replace(nlink=0, ctime_ns=now)
                        updates[p_new] = attrs_of(p_new).replace(nlink=attrs_of(p_new).nlink - 1)
                    else:
                        updates[dst_ino] = dst_attrs.replace(nlink=max(dst_attrs.nlink - 1, 0), ctime_ns=now)
                    replaced = dst_ino
                w.del_dirent(p_old, n_old, replaces=src_ino)
                w.put_dirent(p_new, n_new, src_ino, src_kind, replaces=None if dst is None else dst[0])
                if src_kind == KIND_DIR and p_old != p_new:
                    updates[p_old] = attrs_of(p_old).replace(nlink=attrs_of(p_old).nlink - 1)
                    updates[p_new] = attrs_of(p_new).replace(nlink=attrs_of(p_new).nlink + 1)
                updates[src_ino] = src_attrs.replace(ctime_ns=now)
                for p in {p_old, p_new}:
                    updates[p] = attrs_of(p).replace(mtime_ns=now, ctime_ns=now)
                for ino, attrs in updates.items():
                    w.put_attrs(ino, attrs)
                del old_pattrs
                version = None
                if old_path is not None:
                    w.path_entry(old_path, "rename", ino=src_ino, flags=P_GONE | (P_DIR if src_kind == KIND_DIR else 0),
                                 to=_text(new_path) if new_path is not None else None)
                if new_path is not None:
                    version = self._rename_entry(w, new_path, old_path, src_ino, src_attrs,
                                                 replaced=dst is not None)
                w.log("rename", new_path, from_=_text(old_path) if old_path is not None else None,
                      version=version if src_kind != KIND_DIR else None,
                      size=src_attrs.size if src_attrs.is_file else None,
                      hash=w.content_hash(src_attrs.content) if src_attrs.is_file else None)
        return replaced

    def _rename_entry(self, w: WorkspaceEvent, path: bytes, origin: bytes | None, ino: int, attrs: Attrs,
                      *, replaced: bool) -> int:
        """The entry for what arrives at ``path`` by a rename: a new version if
        it replaced something, else a continuation of ``origin``'s history."""
        flags = (P_CONTENT if attrs.is_file else 0) | (P_DIR if attrs.is_dir else 0)
        if replaced or origin is None:
            flags |= P_BUMPS
            origin_arg = b""
        else:
            flags |= P_ARRIVED
            origin_arg = origin
        if attrs.is_dir:
            w.forget_heads_below(path)
        return w.path_entry(path, "rename", ino=ino, flags=flags, content=attrs.content,
                            size=attrs.size if attrs.is_file else None, origin=origin_arg,
                            from_=_text(origin) if origin is not None else None)

    # -- attributes ------------------------------------------------------------------------

    def setattr(self, ino: int, actor: Actor, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None) -> Attrs:
        """chmod / chown / utimens of ``ino`` (size changes go through
        ``files.truncate``); times in ns since the epoch. One event named for
        the change (``chmod``, ``chown``, ``utimens``), or none if nothing
        changes (tar re-applies owners). Returns the attributes as
        :meth:`getattr`. Raises :class:`NotFound`."""
        if self.writable and self._unchanged(ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                             mtime_ns=mtime_ns):
            return self.getattr(ino)              # no write transaction for a no-op (tar re-applies owners)
        with self.event(actor) as w:
            attrs = self.head_attrs(ino, w.txn)
            changes: dict = {"ctime_ns": w.now_ns}
            event = None
            if uid is not None or gid is not None:
                changes["uid"] = attrs.uid if uid is None else uid
                changes["gid"] = attrs.gid if gid is None else gid
                event = "chown"
            if mode is not None:
                changes["mode"] = stat.S_IFMT(attrs.mode) | (mode & 0o7777)
                event = "chmod"
            if atime_ns is not None:
                changes["atime_ns"] = atime_ns
                event = event or "utimens"
            if mtime_ns is not None:
                changes["mtime_ns"] = mtime_ns
                event = event or "utimens"
            new_attrs = attrs.replace(**changes)
            if event is None or new_attrs.replace(ctime_ns=attrs.ctime_ns) == attrs:
                return self.getattr(ino)          # nothing changes: no event (tar re-applies owners)
            w.put_attrs(ino, new_attrs)
            path = self.links.path_of(ino)
            fields = {}
            if event == "chmod":
                fields["mode"] = oct(stat.S_IMODE(new_attrs.mode))
            elif event == "chown":
                fields["uid"], fields["gid"] = new_attrs.uid, new_attrs.gid
            if path is not None:
                w.path_entry(path, event, ino=ino, flags=(P_CONTENT if attrs.is_file else 0) |
                             (P_DIR if attrs.is_dir else 0), content=attrs.content,
                             size=attrs.size if attrs.is_file else None, **fields)
            w.log(event, path, **fields)
        self.files.times_set(ino, mtime=mtime_ns is not None)
        return self.getattr(ino)

    def _unchanged(self, ino: int, *, mode: int | None, uid: int | None, gid: int | None,
                   atime_ns: int | None, mtime_ns: int | None) -> bool:
        """True if :meth:`setattr` with these arguments would change nothing
        (``chown`` to the current owner, as tar does for every file it
        extracts as root). Raises :class:`NotFound`."""
        attrs = self.head_attrs(ino)
        return ((mode is None or stat.S_IFMT(attrs.mode) | (mode & 0o7777) == attrs.mode)
                and (uid is None or uid == attrs.uid) and (gid is None or gid == attrs.gid)
                and (atime_ns is None or atime_ns == attrs.atime_ns)
                and (mtime_ns is None or mtime_ns == attrs.mtime_ns))

    def setxattr(self, ino: int, name: bytes, value: bytes, actor: Actor) -> None:
        """Set extended attribute ``name`` (``user.``, ``trusted.``,
        ``security.``) to ``value``. Raises :class:`NotSupported` (another
        namespace: no POSIX ACLs), :class:`NoSpace` (a value over
        :data:`XATTR_SIZE_MAX`, or all over :data:`XATTR_TOTAL_MAX` bytes),
        :class:`NotPermitted` (``user.`` on a symlink or device, as
        xattr(7)), :class:`InvalidArgument` (a name over 255 bytes)."""
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise NoSpace("extended attribute value too large")
        self._change_xattrs(ino, actor, "setxattr", name, value)

    def removexattr(self, ino: int, name: bytes, actor: Actor) -> None:
        """Remove extended attribute ``name``. Raises :class:`NoAttribute`,
        and as :meth:`setxattr` for the name."""
        self._check_xattr_name(name)
        self._change_xattrs(ino, actor, "removexattr", name, None)

    def _check_xattr_name(self, name: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise NotSupported("unsupported extended attribute namespace (no POSIX ACLs)")
        if len(name) > 255:
            raise InvalidArgument("extended attribute name too long")

    def _change_xattrs(self, ino: int, actor: Actor, event: str, name: bytes, value: bytes | None) -> None:
        with self.event(actor) as w:
            attrs = self.head_attrs(ino, w.txn)
            if name.startswith(b"user.") and not (attrs.is_file or attrs.is_dir):
                raise NotPermitted("user extended attributes are for files and directories")
            xattrs = dict(attrs.xattrs)
            if value is None:
                if name not in xattrs:
                    raise NoAttribute()
                del xattrs[name]
            else:
                xattrs[name] = value
                if sum(len(k) + len(v) for k, v in xattrs.items()) > XATTR_TOTAL_MAX:
                    raise NoSpace("no space left for extended attributes")
            new_attrs = attrs.replace(xattrs=tuple(sorted(xattrs.items())), ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            path = self.links.path_of(ino)
            if path is not None:
                w.path_entry(path, event, ino=ino, flags=(P_CONTENT if attrs.is_file else 0) |
                             (P_DIR if attrs.is_dir else 0), content=attrs.content,
                             size=attrs.size if attrs.is_file else None, name=_text(name))
            w.log(event, path, name=_text(name))

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self, name: str) -> int:
        """Name the current head seq. Raises :class:`Exists`, :class:`InvalidArgument`."""
        return points.put_snapshot(self, name, self.head_seq)


def _text(path: bytes | None) -> str | None:
    return None if path is None else os.fsdecode(path)


def _is_map_full(exc: BaseException) -> bool:
    return isinstance(exc, lmdb.MapFullError)


__all__ = ["Workspace", "check_name", "RENAME_EXCHANGE", "RENAME_NOREPLACE"]
