"""The ``.chronicle/`` tree (SPEC §4) computed from the store, FUSE-free.

What history looks like as a file system, as borg's ``vfs.py`` is what an
archive looks like: every node's lookup, listing, attributes and content
come from here; ``chronicle.fs.magic`` only numbers the nodes and speaks
FUSE, and the CLI's ``log``, ``show`` and ``diff`` read the same functions.

Vocabulary: a **node** is one entry of the tree, a frozen (hashable)
dataclass of one kind:

=================================  ================================================
node                               what
=================================  ================================================
:class:`Root`                      ``.chronicle/``
:class:`QueryDir`, :class:`QueryFile`  ``query/<path>``: a directory mirror, or the JSON history
:class:`VersionsDir`               ``versions/<path>/``: children, and version numbers of a file
:class:`VersionFile`               ``versions/<path>/<n>``: the content of version n
:class:`AtDir`, :class:`SnapshotsDir`  points in history: ``at/<point>``, ``snapshots/<name>``
:class:`TreeNode`                  an inode of the whole tree at a seq (``at/…``, ``snapshots/…``)
:class:`LogFile`, :class:`StatsFile`  ``log`` (JSON Lines), ``stats`` (JSON)
:class:`CtlFile`                   ``ctl``: its protocol is the adapter's (``chronicle.fs.ctl``)
``queries`` nodes                  ``blame/``, ``hash/``, ``turns/`` (``chronicle.store.history.queries``)
=================================  ================================================

A node's class says how its content behaves: ``rendered`` files (query,
log, stats) have no size before they are rendered (st_size 0; read to EOF);
``immutable`` nodes (versions, past trees) never change, so they may be
cached for long.

Content (:meth:`HistoryViews.open`) is rendered when a file is opened and
stays the same for that handle (SPEC §4). ``log`` is rendered lazily: the
handle pins the head seq at open (O(1)) and renders the lines of the events
up to it as reads reach them (:class:`LogReader`), so opening a 40,000-event
log costs no more than opening an empty one.

Permissions: a :class:`HistoryViews` answers for one caller
(:class:`~chronicle.store.history.access.Caller`, root by default) and
shows it only what it could have read (``chronicle.store.history.access``
gives the rules): a directory it may not search or list, a version or past
inode it may not read is :class:`PermissionDenied`; versions it may not
read are left out of ``versions/`` listings and ``query`` documents (a
document with none left is :class:`PermissionDenied`), log lines about
paths it may not see are left out of ``log``.

Errors: a path, version, point or inode that does not exist is
:class:`NotFound`; anything else (``Corrupt``, a bug) propagates unchanged.

Threads: a :class:`HistoryViews` holds no transaction; every call opens its
own read transaction and closes it before returning, so any thread may call
it. A :class:`LogReader` is used by one caller at a time.
"""

from __future__ import annotations

import json
import os
import stat
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import lmdb

from chronicle.errors import (InvalidArgument, IsADirectory, NoAttribute, NotADirectory, NotFound,
                              PermissionDenied, Pruned, ReadOnly)
from chronicle.store.gc import stats as gc_stats
from chronicle.store.history import points, queries
from chronicle.store.history.access import R_OK, ROOT, X_OK, Access, Caller, permits
from chronicle.store.history.nodes import (ROOT_CHILDREN, AtDir, CtlFile, LogFile, Node, QueryDir, QueryFile,
                                           Root, SnapshotsDir, StatsFile, TreeNode, VersionFile, VersionsDir)
from chronicle.store.history.paths import History, Version
from chronicle.store.meta import schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_BUMPS, P_DIR, P_PRUNED
from chronicle.store.model import KIND_DIR, Attrs

if TYPE_CHECKING:       # types only: namespace imports history (paths), so history imports no namespace
    from chronicle.store.namespace.content import ContentMap
    from chronicle.store.namespace.workspace import Workspace


_DIR_MODE = stat.S_IFDIR | 0o555
_FILE_MODE = stat.S_IFREG | 0o444
_CTL_MODE = stat.S_IFREG | 0o660


# -- open content -------------------------------------------------------------------------------


class FileContent(Protocol):
    """An open file's content: what a handle reads."""

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end."""

    def close(self) -> None:
        """Free what the handle holds."""


class Rendered:
    """Content rendered whole at open (query and stats files); ``on_close``
    (if given) runs at :meth:`close` (the stats file's cache refresh)."""

    def __init__(self, data: bytes, on_close: Callable[[], object] | None = None):
        self.data = data
        self._on_close = on_close

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]

    def close(self) -> None:
        self.data = b""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class StoredFile:
    """The stored content of a version or of a file in a past tree;
    ``on_close`` (if given) runs once at :meth:`close` (it lifts the GC pin
    the handle held, ``gc.leases``)."""

    def __init__(self, content: ContentMap, on_close: Callable[[], None] | None = None):
        self.content = content
        self._on_close = on_close

    def read(self, offset: int, size: int) -> bytes:
        return self.content.read(offset, size)

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class LogReader:
    """``.chronicle/log`` up to seq ``until``, rendered as reads reach it.

    The bytes are the log lines of the events with seq ≤ ``until`` (each with
    a newline), oldest first. A read renders only the lines it needs, from a
    seq it knows: the one after what it rendered last, or, for a read that
    goes back, a **mark** — ``(offset, seq)`` of a line start, taken every
    :data:`MARK_BYTES` as rendering advances. So a sequential read of n bytes
    renders n bytes in all; each read call seeks once (O(log events)) and
    renders about its own size (at most :data:`MARK_BYTES` more after a seek
    back; a first read far ahead renders everything before it). Memory: one
    read's bytes plus the marks (two ints per :data:`MARK_BYTES` of log).

    The events are immutable, so pinning ``until`` is what keeps the content
    of a handle the same whenever it reads (SPEC §4), with no transaction
    held between reads.
    """

    MARK_BYTES = 64 * 1024

    def __init__(self, ws: Workspace, until: int, access: Access | None = None):
        self.history: History = ws.history
        self.access = access if access is not None and not access.everything else None
        self._begin = ws.read_txn
        self.until = until
        self._marks: list[tuple[int, int]] = [(0, 0)]
        self._mark_offsets: list[int] = [0]
        self._buf = bytearray()       # bytes [_buf_off, _buf_off + len(_buf)) of the log
        self._buf_off = 0
        self._next_seq = 0            # the first seq not rendered into _buf
        self.size: int | None = None  # known once rendering reached the end

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0 or (self.size is not None and offset >= self.size):
            return b""
        end = self._buf_off + len(self._buf)
        i = bisect_right(self._mark_offsets, offset) - 1
        mark_offset, mark_seq = self._marks[i]
        if offset < self._buf_off or mark_offset > end:
            self._buf, self._buf_off, self._next_seq = bytearray(), mark_offset, mark_seq
        self._render(offset, offset + size)
        start = offset - self._buf_off
        data = bytes(self._buf[start:start + size])
        del self._buf[:start + len(data)]            # readers go forward: keep what follows
        self._buf_off += start + len(data)
        return data

    def _render(self, offset: int, want: int) -> None:
        """Render lines until the buffer reaches byte ``want`` or the end,
        keeping nothing before ``offset``."""
        if self._buf_off + len(self._buf) >= want or self.size is not None and self._next_seq > self.until:
            return
        buf = self._buf
        with self._begin() as txn:
            entries = self.history.log_entries(txn, self._next_seq, self.until)
            try:
                for seq, line in entries:
                    if self.access is not None and not self.access.log_line(txn, seq, line):
                        self._next_seq = seq + 1
                        continue
                    at = self._buf_off + len(buf)
                    if at >= self._mark_offsets[-1] + self.MARK_BYTES:
                        self._marks.append((at, seq))
                        self._mark_offsets.append(at)
                    buf += line
                    buf += b"\n"
                    self._next_seq = seq + 1
                    if self._buf_off + len(buf) >= want:
                        return
                    if self._buf_off + len(buf) < offset:     # all before the read: drop it
                        self._buf_off += len(buf)
                        del buf[:]
                self._next_seq = self.until + 1
                self.size = self._buf_off + len(buf)
            finally:
                entries.close()

    def close(self) -> None:
        self._buf = bytearray()


# -- the views ------------------------------------------------------------------------------------


class HistoryViews:
    """Every ``.chronicle/`` node of one workspace, and the path histories
    the CLI prints (module docstring), as ``caller`` may see them.
    ``mountpoint`` only shows in ``stats``."""

    def __init__(self, ws: Workspace, mountpoint: str = "", caller: Caller = ROOT):
        self.ws = ws
        self.store = ws.store
        self.mountpoint = mountpoint
        self.caller = caller
        self.access = Access(ws, caller)
        self._numbers_key: tuple[bytes, bytes] | None = None
        self._numbers: dict[int, Version] = {}

    def for_caller(self, caller: Caller) -> HistoryViews:
        """The same views as ``caller`` may see them (a new, empty cache of answers)."""
        return self if caller == self.caller and caller.is_root else HistoryViews(self.ws, self.mountpoint, caller)

    def _content_versions(self, txn: lmdb.Transaction, path: bytes) -> dict[int, Version]:
        """``history.content_versions`` of ``path``, kept for the last path
        asked while the workspace's head seq (as ``txn`` sees it) stays: a
        ``versions/<file>/`` listing asks once per entry (attributes, lookups),
        which would make listing n versions O(n²). Raises :class:`NotFound`."""
        head = txn.get(schema.ws_key(self.ws.id), db=self.ws.dbs["heads"])
        key = (path, bytes(head) if head is not None else b"")
        if self._numbers_key != key:
            self._numbers = self.ws.history.content_versions(txn, path)
            self._numbers_key = key
        return self._numbers

    # -- attributes ---------------------------------------------------------------------

    def attrs(self, node: Node) -> Attrs:
        """The node's attributes (the workspace root's owner and times for
        the synthetic nodes). Raises :class:`NotFound`."""
        if isinstance(node, TreeNode):
            with self.ws.read_txn() as txn:
                attrs = self.ws.view(node.seq).attrs(txn, node.ino)
            if attrs is None:
                raise NotFound(f"no inode {node.ino} at seq {node.seq}")
            return attrs
        root = self.ws.head_attrs(self.ws.root)
        if isinstance(node, VersionFile):
            content = self.store.content_map(self.version(node.path, node.number).entry.content)
            return root.replace(mode=_FILE_MODE, nlink=1, size=content.size, xattrs=(), content=content.id)
        if node.is_dir:
            return root.replace(mode=_DIR_MODE, nlink=2, size=4096, xattrs=())
        return root.replace(mode=_CTL_MODE if isinstance(node, CtlFile) else _FILE_MODE, nlink=1, size=0, xattrs=())

    def is_dir(self, node: Node) -> bool:
        return self.attrs(node).is_dir if isinstance(node, TreeNode) else node.is_dir

    def readlink(self, node: Node) -> bytes:
        """A symlink's target. Raises :class:`InvalidArgument` for any other node."""
        attrs = self.attrs(node)
        if not attrs.is_symlink:
            raise InvalidArgument("not a symbolic link")
        return attrs.target

    def xattrs(self, node: Node) -> tuple[tuple[bytes, bytes], ...]:
        """``((name, value), ...)``: a past inode's extended attributes; none elsewhere."""
        return self.attrs(node).xattrs if isinstance(node, TreeNode) else ()

    def getxattr(self, node: Node, name: bytes) -> bytes:
        """Raises :class:`NoAttribute`."""
        for key, value in self.xattrs(node):
            if key == name:
                return value
        raise NoAttribute()

    # -- lookup and listing -------------------------------------------------------------------

    def lookup(self, node: Node, name: bytes) -> Node:
        """The child ``name`` of directory node ``node``.

        Raises :class:`NotFound` (also for a name under ``at/`` that is no
        valid point: it names nothing), :class:`NotADirectory` for a file
        node, :class:`PermissionDenied` (module docstring).
        """
        with self.ws.read_txn() as txn:
            if not self.access.everything:
                self._check_search(txn, node)
            child = self._lookup(txn, node, name)
            if isinstance(child, VersionFile) and not self._readable_version(txn, child):
                raise PermissionDenied(f"{_show(child.path)!r} version {child.number}: permission denied")
            return child

    # -- permissions (chronicle.store.history.access) ------------------------------------------

    def _check_search(self, txn: lmdb.Transaction, node: Node, want: int = X_OK) -> None:
        """Raises :class:`PermissionDenied` unless the caller may search
        (``want``: or list) directory node ``node``."""
        if self.access.everything:
            return
        if isinstance(node, (QueryDir, VersionsDir, queries.BlameDir)):
            allowed = self.access.directory(txn, node.path, want)
        elif isinstance(node, TreeNode):
            attrs = self.ws.view(node.seq).attrs(txn, node.ino)
            allowed = attrs is None or permits(attrs, self.caller, want)
        else:
            allowed = True
        if not allowed:
            raise PermissionDenied(f"{type(node).__name__}: permission denied")

    def check_listable(self, node: Node) -> None:
        """Raises :class:`PermissionDenied` unless the caller may list directory node ``node``."""
        if not self.access.everything:
            with self.ws.read_txn() as txn:
                self._check_search(txn, node, R_OK | X_OK)

    def _readable_version(self, txn: lmdb.Transaction, node: VersionFile) -> bool:
        if self.access.everything:
            return True
        found = self._content_versions(txn, node.path).get(node.number)
        return found is None or self.access.version(txn, node.path, found)

    def _readable_versions(self, txn: lmdb.Transaction, path: bytes, versions: dict[int, Version]) -> dict[int, Version]:
        """``versions`` without those the caller may not read."""
        if self.access.everything:
            return versions
        return {n: v for n, v in versions.items() if self.access.version(txn, path, v)}

    def _lookup(self, txn: lmdb.Transaction, node: Node, name: bytes) -> Node:
        if name == b".":
            return node
        if isinstance(node, Root):
            child = ROOT_CHILDREN.get(name)
            if child is None:
                raise NotFound(f"no .chronicle/{os.fsdecode(name)}")
            return child
        if isinstance(node, QueryDir):
            return self.query_child(txn, node.path, name)
        if isinstance(node, VersionsDir):
            return self._versions_child(txn, node.path, name)
        if isinstance(node, AtDir):
            try:
                seq = points.resolve_point(self.ws, os.fsdecode(name))
            except InvalidArgument as exc:
                raise NotFound(f"no point {os.fsdecode(name)!r}: {exc}") from None
            return TreeNode(seq, self.ws.root)
        if isinstance(node, SnapshotsDir):
            seq = points.snapshot_seq(self.ws, os.fsdecode(name))
            if seq is None:
                raise NotFound(f"no snapshot {os.fsdecode(name)!r}")
            return TreeNode(seq, self.ws.root)
        if isinstance(node, TreeNode):
            found = self.ws.view(node.seq).lookup(txn, node.ino, name)
            if found is None:
                raise NotFound(f"no {os.fsdecode(name)!r} at seq {node.seq}")
            return TreeNode(node.seq, found[0])
        if isinstance(node, queries.QUERY_DIRS):
            return queries.lookup(self, txn, node, name)
        raise NotADirectory()

    def listing(self, node: Node) -> list[tuple[bytes, Node]]:
        """``(name, node)`` of every child of a directory node, in ``ls``
        order (version numbers first, then names sorted). Raises
        :class:`NotADirectory` for a file node."""
        with self.ws.read_txn() as txn:
            if isinstance(node, Root):
                return sorted(ROOT_CHILDREN.items())
            if not self.access.everything:
                self._check_search(txn, node, R_OK | X_OK)
            if isinstance(node, (QueryDir, VersionsDir)):
                listing = self._path_listing(txn, node)
                if self.access.everything or not any(isinstance(child, VersionFile) for _, child in listing):
                    return listing
                readable = self._readable_versions(txn, node.path, self._content_versions(txn, node.path))
                return [(name, child) for name, child in listing
                        if not isinstance(child, VersionFile) or child.number in readable]
            if isinstance(node, SnapshotsDir):
                return [(os.fsencode(s["name"]), TreeNode(s["seq"], self.ws.root)) for s in points.snapshots(self.ws)]
            if isinstance(node, AtDir):
                return []
            if isinstance(node, queries.QUERY_DIRS):
                return queries.listing(self, txn, node)
            if isinstance(node, TreeNode):
                view = self.ws.view(node.seq)
                if view.need_attrs(txn, node.ino).is_dir:
                    return [(name, TreeNode(node.seq, child)) for name, child, _ in view.entries(txn, node.ino)]
        raise NotADirectory()

    def _path_listing(self, txn: lmdb.Transaction, node: QueryDir | VersionsDir) -> list[tuple[bytes, Node]]:
        path = node.path
        history = self.ws.history
        names = history.children_with_history(txn, path)
        found = self._head(txn, path)
        if found is not None and found[1] == KIND_DIR:
            names.update(name for name, _, _ in self.ws.view().entries(txn, found[0]))
        out: list[tuple[bytes, Node]] = []
        if isinstance(node, VersionsDir) and path and history.has_history(txn, path):
            out = [(str(n).encode(), VersionFile(path, n)) for n in sorted(self._content_versions(txn, path))]
        for name in sorted(names):
            try:
                out.append((name, self._lookup(txn, node, name)))
            except NotFound:
                continue
        return out

    def _head(self, txn: lmdb.Transaction, path: bytes) -> tuple[int, int] | None:
        """``(ino, kind)`` at ``path`` in the head tree, or None if no such path is there now."""
        try:
            return self.ws.view().resolve(txn, path)
        except (NotFound, NotADirectory):
            return None

    @staticmethod
    def _join(path: bytes, name: bytes) -> bytes:
        return path + b"/" + name if path else name

    def query_child(self, txn: lmdb.Transaction, path: bytes, name: bytes) -> Node:
        """The ``query/`` node of child ``name`` of ``path``. Raises :class:`NotFound`."""
        child = self._join(path, name)
        head = self._head(txn, child)
        if head is not None and head[1] == KIND_DIR:
            return QueryDir(child)
        items = self.ws.history.followed(txn, child)
        if not items:
            raise NotFound(f"no history for {path_text(child)!r}: it never existed")
        if head is None and items[-1][1].flags & P_DIR:
            return QueryDir(child)          # a deleted directory: still a directory
        return QueryFile(child)

    def query_listing(self, txn: lmdb.Transaction, path: bytes) -> list[tuple[bytes, Node]]:
        """The ``query/<path>/`` listing (as the caller may see it)."""
        return self._path_listing(txn, QueryDir(path))

    def _versions_child(self, txn: lmdb.Transaction, path: bytes, name: bytes) -> Node:
        number = points.parse_number(name.decode("ascii", "replace"))    # only "7" names version 7, not "07"
        if number is not None:
            try:
                numbers = self._content_versions(txn, path)
            except NotFound:            # ``path`` has no history: ``name`` can only be a child
                numbers = {}
            if number in numbers:
                return VersionFile(path, number)
            if numbers and self._pruned(txn, path, number):
                raise Pruned(f"version {number} of {_show(path)!r} was pruned by gc (the retention policy "
                             "no longer keeps it)")
        child = self._join(path, name)
        if self._head(txn, child) is not None or self.ws.history.has_history(txn, child):
            return VersionsDir(child)
        raise NotFound(f"no history for {path_text(child)!r}: it never existed")

    # -- content ------------------------------------------------------------------------------

    def open(self, node: Node, *, writable: bool = False) -> FileContent:
        """The content a new handle of a file node reads (module docstring).

        Raises :class:`ReadOnly` for ``writable``, :class:`IsADirectory` for
        a directory, :class:`InvalidArgument` for a past symlink or special
        file and for ``ctl`` (the adapter serves it), :class:`NotFound`.
        """
        if writable:
            raise ReadOnly(".chronicle is read-only")
        if isinstance(node, QueryFile):
            return Rendered(self.query(node.path))
        if isinstance(node, queries.QUERY_FILES):
            return Rendered(queries.render(self, node))
        if isinstance(node, LogFile):
            return LogReader(self.ws, self.ws.head_seq, self.access)
        if isinstance(node, StatsFile):
            return Rendered((json.dumps(self.stats(), indent=2) + "\n").encode(),
                            on_close=lambda: gc_stats.refresh_in_background(self.store, self.ws))
        if isinstance(node, (VersionFile, TreeNode)):
            attrs = self.attrs(node)
            if attrs.is_dir:
                raise IsADirectory()
            if not attrs.is_file:
                raise InvalidArgument("not a regular file")
            if not self.access.everything:
                with self.ws.read_txn() as txn:
                    allowed = (self._readable_version(txn, node) if isinstance(node, VersionFile)
                               else permits(attrs, self.caller, R_OK))
                if not allowed:
                    raise PermissionDenied("permission denied")
            return self._pinned_file(node, attrs)
        if node.is_dir:
            raise IsADirectory()
        raise InvalidArgument(f"{type(node).__name__} has no content of its own")

    def _pinned_file(self, node: VersionFile | TreeNode, attrs: Attrs) -> StoredFile:
        """A handle of a past file that pins its seq against GC while open
        (``gc.leases``: the store's lease) — a pruned one raises :class:`Pruned`."""
        if isinstance(node, TreeNode):
            seq = node.seq
        else:
            with self.ws.read_txn() as txn:
                found = self._content_versions(txn, node.path).get(node.number)
            seq = found.seq if found is not None else None
        if seq is None:
            return StoredFile(self.store.content_map(attrs.content))
        lease, ws_id = self.store.lease, self.ws.id
        lease.pin(ws_id, seq)
        try:
            content = self.store.content_map(attrs.content)
        except BaseException:
            lease.unpin(ws_id, seq)
            raise
        return StoredFile(content, lambda: lease.unpin(ws_id, seq))

    def query(self, path: bytes) -> bytes:
        """The JSON of ``query/<path>`` (SPEC §4), with only the versions the
        caller may read. Raises :class:`NotFound` if the path never existed,
        :class:`PermissionDenied` if the caller may read none of its versions."""
        with self.ws.read_txn() as txn:
            if self.access.everything:
                return self.ws.history.render_query(txn, path)
            versions = [v for v in self.ws.history.versions(txn, path) if self.access.version(txn, path, v)]
        if not versions:
            raise PermissionDenied(f"{_show(path)!r}: permission denied")
        parts = [b'{"version": %d, ' % v.version + v.entry.fragment for v in versions]
        return b'{"path": ' + json.dumps(path_text(path)).encode() + b', "versions": [' + \
            b", ".join(parts) + b"]}\n"

    def path_history(self, path: bytes, lo: int = 0, hi: int | None = None) -> dict:
        """The query document of ``path`` with only the versions whose seq is
        in ``[lo, hi]``. Raises :class:`NotFound`."""
        doc = json.loads(self.query(path))
        doc["versions"] = [v for v in doc["versions"] if lo <= v["seq"] and (hi is None or v["seq"] <= hi)]
        return doc

    def log(self, lo: int = 0, hi: int | None = None) -> Iterator[bytes]:
        """Log lines (no newline) of the events with ``lo <= seq <= hi``
        (default: up to the head now), oldest first. The generator holds one
        read transaction until it is exhausted or closed."""
        hi = self.ws.head_seq if hi is None else hi
        if lo > hi:
            return
        with self.ws.read_txn() as txn:
            if self.access.everything:
                yield from self.ws.history.log_lines(txn, lo, hi)
                return
            for seq, line in self.ws.history.log_entries(txn, lo, hi):
                if self.access.log_line(txn, seq, line):
                    yield line

    def stats(self) -> dict:
        """The figures of ``stats``: the store's (``Store.stats``), the
        workspace's (``Store.workspace_stats``), its retention figures from
        their cache (``gc.stats``: never a dry run here; closing the file
        starts a refresh in a worker thread if the cache is stale, so two
        renders in a row show the same figures), and where it is served."""
        figures = gc_stats.workspace_figures(self.store, self.ws, gc_stats.figures(self.store, self.ws))
        figures["retention_refreshing"] = gc_stats.refreshing(self.store, self.ws)
        figures.update(store=str(self.store.path.resolve()), mountpoint=self.mountpoint, pid=os.getpid(),
                       open_files=len(self.ws.files))
        return figures

    # -- versions of a file -------------------------------------------------------------------

    def version(self, path: bytes, number: int) -> Version:
        """Version ``number`` of ``path`` if it has file content. Raises :class:`NotFound`."""
        with self.ws.read_txn() as txn:
            found = self._content_versions(txn, path).get(number)
            if found is not None and not self.access.everything and not self.access.version(txn, path, found):
                raise PermissionDenied(f"{_show(path)!r} version {number}: permission denied")
            pruned = found is None and self._pruned(txn, path, number)
        if pruned:
            raise Pruned(f"version {number} of {_show(path)!r} was pruned by gc (the retention policy no longer "
                         "keeps it)")
        if found is None:
            raise NotFound(f"{_show(path)!r} has no version {number}")
        return found

    def _pruned(self, txn: lmdb.Transaction, path: bytes, number: int) -> bool:
        """True if version ``number`` of ``path`` is a pruned mark (``gc.prune``)."""
        try:
            return any(v.version == number and v.entry.flags & P_PRUNED and v.entry.flags & P_BUMPS
                       for v in self.ws.history.versions(txn, path))
        except NotFound:
            return False

    def file_versions(self, path: bytes) -> dict[int, Version]:
        """Version number → entry, for the versions of ``path`` that have
        file content (what ``show``, ``diff`` and ``versions/`` offer).

        Raises :class:`IsADirectory` (the root, or a directory at the head)
        or :class:`NotFound` (no such path, or no content in its history).
        """
        if not path:
            raise IsADirectory("the workspace root is a directory")
        with self.ws.read_txn() as txn:
            versions = dict(self._content_versions(txn, path))
            if versions:
                readable = self._readable_versions(txn, path, versions)
                if not readable:
                    raise PermissionDenied(f"{_show(path)!r}: permission denied")
                return readable
            head = self._head(txn, path)
        if head is not None and head[1] == KIND_DIR:
            raise IsADirectory(f"{_show(path)!r} is a directory")
        raise NotFound(f"{_show(path)!r} has no file content in its history")

    @staticmethod
    def pick_version(versions: dict[int, Version], path: bytes, number: int | None) -> tuple[int, Version]:
        """``(number, version)``: ``number`` of ``versions``, default the
        latest. Raises :class:`NotFound` naming the versions there are."""
        if number is None:
            number = max(versions)
        found = versions.get(number)
        if found is None:
            raise NotFound(f"{_show(path)!r} has no version {number} (versions: {version_list(versions)})")
        return number, found


def version_list(numbers) -> str:
    """``"1, 2, 3"``, or ``"1, 2, 3, ..., 8, 9, 10"`` past eight; ``"none"``."""
    numbers = [str(n) for n in sorted(numbers)]
    return ", ".join(numbers if len(numbers) <= 8 else numbers[:3] + ["..."] + numbers[-3:]) or "none"


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def split_version(spec: str) -> tuple[str, int | None]:
    """``"PATH@N"`` → ``("PATH", N)``; anything else → ``(spec, None)``
    (a path may hold ``@``: only a canonical number after the last ``@`` is a
    version, :func:`points.parse_number`)."""
    head, sep, tail = spec.rpartition("@")
    number = points.parse_number(tail)
    if sep and head and number is not None:
        return head, number
    return spec, None
