"""Restore: bring back a file's version or the whole tree of a past seq.

A restore never rewrites history: it is recorded as a new event at the head,
whose entries say what came back (``"event": "restore"``). Content is not
copied: the head simply refers to the old content record again.

- :func:`restore_file` — a path to its version N (from its history). If the
  path is gone it is created again (in its directory, which must exist).
- :func:`restore_tree` — the whole workspace to its state at a seq: one event
  (one seq, one transaction) that removes what was added since, brings back
  what was removed, and puts back old content and attributes. Inodes keep
  their numbers, so hard links come back as they were.

Both return a :class:`Changes` listing what the FUSE adapter must invalidate
in the kernel's caches. Both raise :class:`Busy` if a file they would change
has uncommitted writes.

Both are written with the workspace's public mutation API alone
(``ws.event`` and its ``WorkspaceEvent``, ``ws.lookup``, ``ws.files``): the
workspace's caches follow what the event writes, once it commits.

Threads: the workspace's thread (the caller must not run another mutation
of the same workspace meanwhile). ``restore_tree`` walks every directory
that differs between the head and ``seq``: O(changed paths) reads, and one
write transaction.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from chronicle.errors import Busy, Exists, IsADirectory, NotFound
from chronicle.store import model
from chronicle.store.chunks.ids import to_hex
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_ARRIVED, P_BUMPS, P_CONTENT, P_DIR, P_GONE
from chronicle.store.model import KIND_DIR, Actor, Attrs
from chronicle.store.namespace.workspace import Workspace


@dataclass
class Changes:
    """What a restore changed: ``seq`` of its event (None: nothing to do),
    ``inodes`` whose attributes or content changed, ``(parent, name)``
    directory ``entries`` that appeared, vanished or changed, and how many
    ``paths`` its history entries name."""

    seq: int | None = None
    inodes: set[int] = field(default_factory=set)
    entries: set[tuple[int, bytes]] = field(default_factory=set)
    paths: int = 0

    def as_dict(self) -> dict:
        """``{"seq", "paths"}``: the ctl reply."""
        return {"seq": self.seq, "paths": self.paths}


def restore_file(ws: Workspace, path: bytes, version: int, actor: Actor) -> Changes:
    """Make ``path``'s content its version ``version`` (a number of
    ``ws.history.content_versions``), as one ``restore`` event.

    Raises :class:`NotFound` (no such version, or the directory is gone),
    :class:`IsADirectory`, :class:`Busy`.
    """
    path = path.strip(b"/")
    with ws.read_txn() as txn:
        versions = ws.history.content_versions(txn, path)
        chosen = versions.get(version)
        if chosen is None:
            known = ", ".join(str(n) for n in sorted(versions)) or "none"
            raise NotFound(f"{path_text(path)!r} has no version {version} (versions: {known})")
        old_attrs = ws.view(chosen.seq).attrs(txn, chosen.entry.ino)
    content = chosen.entry.content
    changes = Changes()
    parent_path, _, name = path.rpartition(b"/")
    parent, parent_kind = ws.resolve(parent_path)
    if parent_kind != KIND_DIR:
        raise NotFound(f"{path_text(parent_path)!r} is not a directory")
    try:
        ino, attrs = ws.lookup(parent, name)       # the path link its event names
    except NotFound:
        ino = None
    record = ws.store.content_map(content).record
    if ino is not None:
        if attrs.is_dir:
            raise IsADirectory(f"{path_text(path)!r} is a directory now")
        if ws.files.is_dirty(ino):
            raise Busy(f"{path_text(path)!r} has uncommitted writes")
        attrs = ws.head_attrs(ino)
        if not attrs.is_file:
            raise Exists(f"{path_text(path)!r} is not a regular file now")
        if attrs.content == content:
            return changes
        with ws.event(actor) as w:
            new_attrs = attrs.replace(content=content, size=record.size, mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            v = w.path_entry(path, "restore", ino=ino, flags=P_BUMPS | P_CONTENT, content=content,
                             size=record.size, restored=version)
            w.log("restore", path, version=v, size=record.size, hash=w.content_hash(content), restored=version)
        ws.files.reload(ino)
        changes.inodes.add(ino)
    else:
        mode = old_attrs.mode if old_attrs is not None else stat.S_IFREG | 0o644
        with ws.event(actor) as w:
            pattrs = ws.head_attrs(parent, w.txn)
            ino = ws.store.allocate_ino(w.txn)
            base = old_attrs or Attrs(mode, actor.uid, actor.gid, 1, 0, 0, 0, 0)
            new_attrs = base.replace(mode=mode, nlink=1, size=record.size, content=content, atime_ns=w.now_ns,
                                     mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            new_pattrs = pattrs.replace(mtime_ns=w.now_ns, ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs)
            w.put_attrs(parent, new_pattrs)
            w.put_dirent(parent, name, ino, model.KIND_FILE)
            v = w.path_entry(path, "restore", ino=ino, flags=P_ARRIVED | P_BUMPS | P_CONTENT, content=content,
                             size=record.size, restored=version)
            w.log("restore", path, version=v, size=record.size, hash=w.content_hash(content), restored=version)
        changes.inodes.add(parent)
        changes.entries.add((parent, name))
    changes.seq = ws.head_seq
    changes.paths = 1
    return changes


def _same(a: Attrs | None, b: Attrs | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.replace(ctime_ns=0, atime_ns=0) == b.replace(ctime_ns=0, atime_ns=0)


def restore_tree(ws: Workspace, seq: int, actor: Actor) -> Changes:
    """Make the head tree what it was at ``seq`` (see the module docstring),
    as one ``restore`` event, or no event if nothing differs.

    Raises :class:`NotFound` (``seq`` below 0 or after the head),
    :class:`Busy` (an open file has uncommitted writes).
    """
    if seq > ws.head_seq or seq < 0:
        raise NotFound(f"seq {seq} does not exist (head is {ws.head_seq})")
    dirty = ws.files.dirty()
    if dirty:
        raise Busy(f"{len(dirty)} file(s) have uncommitted writes; close or fsync them first")
    changes = Changes()
    with ws.event(actor) as w:
        txn = w.txn
        head, old = ws.view(), ws.view(seq)
        final_entries: dict[tuple[int, bytes], tuple[int, int] | None] = {}
        involved: dict[int, bytes] = {}           # ino -> a path (for entries)
        present_old: set[int] = set()             # inodes reachable in the old tree at a changed place
        removed_paths: list[tuple[bytes, int, int]] = []
        added_paths: list[tuple[bytes, int, int]] = []
        updated: list[tuple[bytes, int]] = []

        def remove_subtree(parent: int, name: bytes, ino: int, kind: int, path: bytes) -> None:
            final_entries[(parent, name)] = None
            involved[ino] = path
            removed_paths.append((path, ino, kind))
            if kind == KIND_DIR:
                for child_name, child, child_kind in head.entries(txn, ino):
                    remove_subtree(ino, child_name, child, child_kind, path + b"/" + child_name)

        def add_subtree(parent: int, name: bytes, ino: int, kind: int, path: bytes) -> None:
            final_entries[(parent, name)] = (ino, kind)
            involved[ino] = path
            present_old.add(ino)
            added_paths.append((path, ino, kind))
            if kind == KIND_DIR:
                for child_name, child, child_kind in old.entries(txn, ino):
                    add_subtree(ino, child_name, child, child_kind, path + b"/" + child_name)

        def walk(dir_ino: int, path: bytes) -> None:
            now = {name: (ino, kind) for name, ino, kind in head.entries(txn, dir_ino)}
            then = {name: (ino, kind) for name, ino, kind in old.entries(txn, dir_ino)}
            for name in sorted(now.keys() | then.keys()):
                child_path = path + b"/" + name if path else name
                a, b = now.get(name), then.get(name)
                if a is not None and b is not None and a[0] == b[0]:
                    if not _same(ws.head_attrs(a[0], txn), old.attrs(txn, a[0])):
                        updated.append((child_path, a[0]))
                        involved[a[0]] = child_path
                        present_old.add(a[0])
                    if a[1] == KIND_DIR:
                        walk(a[0], child_path)
                    continue
                if a is not None:
                    removals.append((dir_ino, name, a[0], a[1], child_path))
                if b is not None:
                    additions.append((dir_ino, name, b[0], b[1], child_path))

        if not _same(ws.head_attrs(ws.root, txn), old.attrs(txn, ws.root)):
            updated.append((b"", ws.root))
            involved[ws.root] = b""
            present_old.add(ws.root)
        removals: list[tuple] = []
        additions: list[tuple] = []
        walk(ws.root, b"")
        # All removals first: a moved directory is removed under its new name
        # and added back under its old one, and the additions must win.
        for args in removals:
            remove_subtree(*args)
        for args in additions:
            add_subtree(*args)
        if not final_entries and not updated:
            return changes

        for ino in involved:
            if ws.files.is_dirty(ino):
                raise Busy("a file to restore has uncommitted writes")
        for (parent, name), value in final_entries.items():
            if value is None:
                w.del_dirent(parent, name)
            else:
                w.put_dirent(parent, name, value[0], value[1])
            changes.entries.add((parent, name))
        new_attrs: dict[int, Attrs] = {}
        for ino in involved:
            if ino in present_old:
                attrs = old.attrs(txn, ino)
            else:
                attrs = ws.head_attrs(ino, txn).replace(nlink=0)
            new_attrs[ino] = attrs.replace(ctime_ns=w.now_ns)
            w.put_attrs(ino, new_attrs[ino])
            changes.inodes.add(ino)
        count = 0
        for path, ino, kind in removed_paths:
            if path not in {p for p, _, _ in added_paths}:
                w.path_entry(path, "restore", ino=ino, flags=P_GONE | (P_DIR if kind == KIND_DIR else 0), at=seq)
                count += 1
        for path, ino, kind in added_paths:
            attrs = new_attrs[ino]
            w.path_entry(path, "restore", ino=ino, flags=P_ARRIVED | P_BUMPS | _content_flags(attrs),
                         content=attrs.content, size=attrs.size if attrs.is_file else None, at=seq)
            if kind == KIND_DIR:
                w.forget_heads_below(path)
            count += 1
        for path, ino in updated:
            if not path:
                continue
            attrs = new_attrs[ino]
            before = ws.head_attrs(ino, txn)
            bump = P_BUMPS if attrs.is_file and attrs.content != before.content else 0
            w.path_entry(path, "restore", ino=ino, flags=bump | _content_flags(attrs), content=attrs.content,
                         size=attrs.size if attrs.is_file else None, at=seq)
            count += 1
        w.log("restore", b"", at=seq, paths=count)
    changes.seq = ws.head_seq
    changes.paths = count
    for ino in changes.inodes:
        ws.files.reload(ino)
    return changes


def _content_flags(attrs: Attrs) -> int:
    if attrs.is_file:
        return P_CONTENT
    if attrs.is_dir:
        return P_DIR
    return 0


__all__ = ["Changes", "restore_file", "restore_tree", "to_hex"]
