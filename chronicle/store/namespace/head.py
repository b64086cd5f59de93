"""What a writable workspace keeps in memory about its head, and the event
that keeps it true.

A workspace (``chronicle.store.namespace.workspace``) is mutated by one
process at a time, so it need not re-read its head after each change: it
caches the attributes of the inodes in use, and the names they were reached
by. Both caches follow the committed records, never the other way round.

Vocabulary:

- a **link** of an inode is one ``(parent ino, name)`` directory entry that
  reaches it. A regular file has one link per hard link; a directory has one.
- the **path link** of an inode is the link its events name: the one it was
  last reached by. The kernel reaches every inode by ``lookup`` from the
  root, so walking path links up to the root gives the path an event
  records (:meth:`PathLinks.path_of`). An inode whose path link is not known
  (never looked up, e.g. listed but not yet opened) has no path: its events
  are logged without one.
- a :class:`WorkspaceEvent` is the journal's
  :class:`~chronicle.store.meta.journal.EventWriter` plus the cache updates
  its records imply: every ``put_attrs`` becomes the cached head attributes,
  every ``put_dirent``/``del_dirent`` adds or removes a link. They are
  applied by :meth:`WorkspaceEvent.apply` once the transaction has
  committed; an aborted event changes nothing.

Threads: the caches belong to the workspace's thread (the FUSE loop, or the
CLI); nothing here locks.
"""

from __future__ import annotations

import lmdb

from chronicle.store.history.paths import History
from chronicle.store.meta.journal import EventWriter
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import Attrs

# Deeper than any path the kernel can pass (PATH_MAX is 4096 bytes): a longer
# walk means a loop in the cache, and is answered as "unknown".
MAX_DEPTH = 4096


class PathLinks:
    """The links each inode in use was reached by (see the module docstring).

    Hard links: every link seen is kept, newest last, so removing the path
    link of a file with another known name falls back to that name (as
    ``git log --follow`` would pick the surviving one).
    """

    def __init__(self, root: int):
        self.root = root
        self._parents: dict[int, tuple[int, bytes]] = {}        # the path link
        self._links: dict[int, list[tuple[int, bytes]]] = {}    # every link seen, newest last

    def add(self, ino: int, parent: int, name: bytes) -> None:
        """``parent/name`` reaches ``ino`` and is the name its events use from now on."""
        links = self._links.setdefault(ino, [])
        if (parent, name) in links:
            links.remove((parent, name))
        links.append((parent, name))
        self._parents[ino] = (parent, name)

    def note(self, ino: int, parent: int, name: bytes) -> None:
        """``parent/name`` reaches ``ino``: its path link if it has none yet
        (a ``readdir`` listing, which must not change an inode's path)."""
        self._parents.setdefault(ino, (parent, name))

    def remove(self, ino: int, parent: int, name: bytes) -> None:
        """``parent/name`` no longer reaches ``ino``; its events use another known link, if any."""
        links = self._links.get(ino)
        if links and (parent, name) in links:
            links.remove((parent, name))
        if self._parents.get(ino) == (parent, name):
            if links:
                self._parents[ino] = links[-1]
            else:
                del self._parents[ino]
        if not links:
            self._links.pop(ino, None)

    def forget(self, ino: int) -> None:
        """Drop everything known about ``ino`` (the kernel forgot it)."""
        self._parents.pop(ino, None)
        self._links.pop(ino, None)

    def links_of(self, ino: int) -> list[tuple[int, bytes]]:
        """Every ``(parent, name)`` link seen to reach ``ino``: those added
        (oldest first) and the path link, also one only noted by a listing
        (the FUSE adapter: the names the kernel may hold a dentry for)."""
        links = list(self._links.get(ino, ()))
        path_link = self._parents.get(ino)
        if path_link is not None and path_link not in links:
            links.append(path_link)
        return links

    def parent(self, ino: int) -> int | None:
        """The directory of ``ino``'s path link, or None if unknown (the
        root's own parent is unknown: the FUSE adapter answers ``..`` of the
        root with the root)."""
        link = self._parents.get(ino)
        return link[0] if link is not None else None

    def path_of(self, ino: int) -> bytes | None:
        """The path (relative, ``/``-separated; ``b""`` for the root) that
        ``ino`` was last reached by, or None if a link on the way is unknown."""
        parts = []
        for _ in range(MAX_DEPTH):
            if ino == self.root:
                return b"/".join(reversed(parts))
            link = self._parents.get(ino)
            if link is None:
                return None
            ino, name = link
            parts.append(name)
        return None

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        """The path of ``name`` in directory ``parent``, or None if the parent's path is unknown."""
        base = self.path_of(parent)
        if base is None:
            return None
        return base + b"/" + name if base else name

    def is_within(self, ino: int, ancestor: int) -> bool:
        """True if directory ``ino`` is ``ancestor`` or below it, walking up
        the path links (rename(2)'s EINVAL check: "an attempt was made to make
        a directory a subdirectory of itself"). Through FUSE the kernel checks
        this before asking; this protects API callers. An unknown link ends
        the walk: a directory never looked up was not reached through ``ancestor``."""
        for _ in range(MAX_DEPTH):
            if ino == ancestor:
                return True
            link = self._parents.get(ino)
            if ino == self.root or link is None:
                return False
            ino = link[0]
        return True


_LOOK_UP = object()           # put_dirent/del_dirent: the replaced inode is not known


class WorkspaceEvent(EventWriter):
    """One event of a workspace: the journal's writer, remembering what its
    records change in the head caches (see the module docstring).

    ``head`` is the workspace's head view, read (in this event's
    transaction) for the entry a ``put_dirent`` replaces or a ``del_dirent``
    removes. Everything else is :class:`EventWriter`'s.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict, ws: int, seq: int, *, head: TreeView,
                 is_fork: bool, turn: dict | None, pid: int, history: History, now_ns: int | None = None):
        super().__init__(txn, dbs, ws, seq, is_fork=is_fork, turn=turn, pid=pid, history=history, now_ns=now_ns)
        self._head = head
        self.attrs: dict[int, Attrs] = {}                     # ino -> head attrs once committed
        self._unlinked: list[tuple[int, int, bytes]] = []      # (ino, parent, name) links that go
        self._linked: list[tuple[int, int, bytes]] = []        # links that come, in order

    def put_attrs(self, ino: int, attrs: Attrs) -> None:
        """:meth:`EventWriter.put_attrs`; ``attrs`` becomes ``ino``'s cached head attributes."""
        super().put_attrs(ino, attrs)
        self.attrs[ino] = attrs

    def put_dirent(self, parent: int, name: bytes, ino: int, kind: int, *,
                   replaces: int | None | object = _LOOK_UP) -> None:
        """:meth:`EventWriter.put_dirent`; ``parent/name`` becomes ``ino``'s
        path link, and stops being a link of the inode it named before (a
        rename over a file, RENAME_EXCHANGE, a restore). ``replaces``: that
        inode (None: the name was free) when the caller knows it, which saves
        a lookup on every create, link and rename."""
        before = self._before(parent, name, replaces)
        super().put_dirent(parent, name, ino, kind)
        if before is not None:
            self._unlinked.append((before, parent, name))
        self._linked.append((ino, parent, name))

    def del_dirent(self, parent: int, name: bytes, *, replaces: int | None | object = _LOOK_UP) -> None:
        """:meth:`EventWriter.del_dirent`; ``parent/name`` stops being a link
        of the inode it named (``replaces``, when the caller knows it)."""
        before = self._before(parent, name, replaces)
        super().del_dirent(parent, name)
        if before is not None:
            self._unlinked.append((before, parent, name))

    def _before(self, parent: int, name: bytes, known: int | None | object) -> int | None:
        if known is not _LOOK_UP:
            return known                                       # type: ignore[return-value]
        found = self._head.lookup(self.txn, parent, name)
        return None if found is None else found[0]

    def apply(self, attrs_cache: dict[int, Attrs], links: PathLinks) -> None:
        """After the commit: update the caches. Links that go are removed
        before links that come are added, so a name moved within one event
        (rename, exchange, a restored tree) ends at its new inode."""
        attrs_cache.update(self.attrs)
        for ino, parent, name in self._unlinked:
            links.remove(ino, parent, name)
        for ino, parent, name in self._linked:
            links.add(ino, parent, name)


__all__ = ["PathLinks", "WorkspaceEvent", "MAX_DEPTH"]
