"""Who may read which history: the permission rules of ``.chronicle/`` and the CLI (README, "History obeys permissions").

History shows a user only what that user could have read. The rules, for
a caller (:class:`Caller`: a uid and its groups; root sees everything):

- **a version** of a path (an entry of its history: content, a delete, a
  rename, ...) is readable if the caller could read the file when it was
  recorded — its recorded mode, owner and group, and search (``x``)
  permission on every directory of the path it was recorded under, in the
  tree of that seq (of the seq before, for an entry whose file is gone at
  its own seq, as a delete) — **and** could read the path now (at the head;
  for a path that is gone, as it last was). So ``chmod 600`` or a ``0700``
  directory hides a file's past as well as its present;
- **a directory** of ``query/`` or ``versions/`` may be searched (looked
  up in) or listed as the directory at that path may now (``x``, ``r``; as
  it last was if it is gone), with search permission on every directory
  above it;
- **a log line** is shown if the caller could search every directory
  above the paths it names (``path``, ``from``), in the tree of its seq
  and, where they still exist, now.

Permission bits are checked as the kernel checks them (``inode_permission``
with POSIX modes): the owner class if the caller's uid owns the inode, else
the group class if the inode's gid is one of the caller's groups, else the
others; uid 0 may read and search anything (search a file only with some
``x`` bit).

A caller's groups: a FUSE request's pid's supplementary groups read from
``/proc/<pid>/status`` (``Groups:``), with its primary gid as the fallback
(:func:`caller_of`); the CLI's invoking user (:func:`invoking_user`).

Threads: an :class:`Access` holds no transaction (methods take ``txn``) and
caches answers per instance; one caller at a time.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb

from chronicle.store.history.paths import Version
from chronicle.store.meta.schema import PathEntry
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import Attrs

if TYPE_CHECKING:       # types only: namespace imports history (paths), so history imports no namespace
    from chronicle.store.namespace.workspace import Workspace

R_OK, W_OK, X_OK = 4, 2, 1


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: ``uid`` and every group id it holds (primary and supplementary)."""

    uid: int
    gids: frozenset[int]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


ROOT = Caller(0, frozenset({0}))


def caller_of(uid: int, gid: int, pid: int) -> Caller:
    """The caller of a FUSE request: ``uid``/``gid`` from its context, the
    supplementary groups of process ``pid`` from ``/proc/<pid>/status``
    (``Groups:``); only ``gid`` if that cannot be read (the process is gone)."""
    gids = {gid}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    gids.update(int(g) for g in line[7:].split())
                    break
    except (OSError, ValueError):
        pass
    return Caller(uid, frozenset(gids))


def invoking_user() -> Caller:
    """The user running this process (the CLI's caller)."""
    return Caller(os.getuid(), frozenset({os.getgid(), *os.getgroups()}))


def permits(attrs: Attrs, caller: Caller, want: int) -> bool:
    """True if ``caller`` has every permission of ``want`` (``R_OK | W_OK |
    X_OK`` bits) on an inode with ``attrs`` (module docstring)."""
    mode = attrs.mode
    if caller.uid == 0:
        return not want & X_OK or stat.S_ISDIR(mode) or bool(mode & 0o111)
    if caller.uid == attrs.uid:
        bits = mode >> 6
    elif attrs.gid in caller.gids:
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


def entry_path(entry: PathEntry) -> bytes:
    """The path an entry was recorded under (its fragment's ``path``)."""
    return os.fsencode(json.loads(b"{" + entry.fragment)["path"])


class Access:
    """The rules of the module docstring for one caller over one workspace.
    Root is answered without reading anything."""

    def __init__(self, ws: Workspace, caller: Caller):
        self.ws = ws
        self.caller = caller
        self.everything = caller.is_root
        self._now: dict[tuple[bytes, int], bool] = {}

    # -- walking a tree --------------------------------------------------------------------

    def _walk(self, txn: lmdb.Transaction, view: TreeView, path: bytes) -> tuple[bool, int, Attrs | None]:
        """``(searched, ino, attrs)`` of ``path`` in ``view``: ``searched`` is
        False if a directory on the way denies the caller search permission;
        ``attrs`` is None if the path is not there (or was not reached)."""
        ino = view.root
        attrs = view.attrs(txn, ino)
        for part in path.split(b"/"):
            if not part:
                continue
            if attrs is None or not attrs.is_dir:
                return True, 0, None
            if not permits(attrs, self.caller, X_OK):
                return False, 0, None
            found = view.lookup(txn, ino, part)
            if found is None:
                return True, 0, None
            ino = found[0]
            attrs = view.attrs(txn, ino)
        return True, ino, attrs

    def _may(self, txn: lmdb.Transaction, view: TreeView, path: bytes, want: int) -> bool | None:
        """Whether the caller has ``want`` on ``path`` in ``view`` (None: not there)."""
        searched, _ino, attrs = self._walk(txn, view, path)
        if not searched:
            return False
        if attrs is None:
            return None
        return permits(attrs, self.caller, want)

    def _last_view(self, txn: lmdb.Transaction, path: bytes) -> TreeView | None:
        """The tree where ``path`` was last there: the head, or the seq
        before its last history entry (its delete); None if it has no history."""
        head = self.ws.view()
        if self._walk(txn, head, path)[2] is not None:
            return head
        items = self.ws.history.own_entries(txn, path)
        if not items:
            return None
        return self.ws.view(items[-1][0] - 1)

    def now(self, txn: lmdb.Transaction, path: bytes, want: int) -> bool:
        """Whether the caller has ``want`` on ``path`` now (or as it last
        was, if it is gone; True for a path with no trace anywhere)."""
        if self.everything:
            return True
        key = (path, want)
        found = self._now.get(key)
        if found is None:
            view = self._last_view(txn, path)
            allowed = None if view is None else self._may(txn, view, path, want)
            found = self._now[key] = allowed is not False
        return found

    # -- the rules ---------------------------------------------------------------------------

    def directory(self, txn: lmdb.Transaction, path: bytes, want: int) -> bool:
        """Whether the ``query/``/``versions/`` directory of ``path`` may be
        searched (``X_OK``) or listed (``R_OK | X_OK``): ``want`` on the
        directory at ``path`` and search on those above it, now (or as
        they last were). For a path that is a file (``versions/<file>/``
        lists its versions) only the search above it counts: each version
        is checked by :meth:`version`."""
        if self.everything:
            return True
        key = (path, -want)
        found = self._now.get(key)
        if found is None:
            view = self._last_view(txn, path)
            if view is None:
                found = True
            else:
                searched, _ino, attrs = self._walk(txn, view, path)
                found = searched and (attrs is None or not attrs.is_dir or permits(attrs, self.caller, want))
            self._now[key] = found
        return found

    def version(self, txn: lmdb.Transaction, path: bytes, version: Version) -> bool:
        """Whether the caller may see ``version`` of ``path`` (module docstring)."""
        if self.everything:
            return True
        if not self.now(txn, path, R_OK):
            return False
        recorded = entry_path(version.entry)
        for seq in (version.seq, version.seq - 1):
            if seq < 0:
                continue
            view = self.ws.view(seq)
            searched, ino, attrs = self._walk(txn, view, recorded)
            if not searched:
                return False
            if attrs is not None and ino == version.entry.ino:
                return permits(attrs, self.caller, R_OK)
        return False

    def may_change(self, txn: lmdb.Transaction, path: bytes) -> bool:
        """Whether the caller may change ``path`` at the head, as a restore of
        it does: search on the directories above it and write permission on
        it, or (if it is not there, so a restore creates it again) write and
        search permission on its directory."""
        if self.everything:
            return True
        head = self.ws.view()
        searched, _ino, attrs = self._walk(txn, head, path)
        if not searched:
            return False
        if attrs is not None:
            return permits(attrs, self.caller, W_OK)
        parent = self._walk(txn, head, path.rpartition(b"/")[0])[2]
        return parent is None or permits(parent, self.caller, W_OK | X_OK)

    def log_line(self, txn: lmdb.Transaction, seq: int, line: bytes) -> bool:
        """Whether the caller may see the log line of ``seq`` (module docstring)."""
        if self.everything:
            return True
        try:
            event = json.loads(line)
        except ValueError:
            return False
        paths = [event.get(key) for key in ("path", "from")]
        view = None
        for text in paths:
            if not isinstance(text, str):
                continue
            parent = os.fsencode(text).rpartition(b"/")[0]
            view = view or self.ws.view(seq)
            if self._may(txn, view, parent, X_OK) is False or not self.now(txn, parent, X_OK):
                return False
        return True
