"""Open files of a workspace: reads, writes, and the versions they make.

Vocabulary: an inode with open handles has one :class:`FileState`, shared by
all its handles. Its **overlay** (``chronicle.store.namespace.staging``) holds the
writes not yet committed. A **commit** turns a dirty overlay into a new
**version**: a content record and one ``write`` (or ``truncate``) event.
The FUSE adapter commits on ``flush`` (every ``close``), ``fsync`` and the
last ``release``; identical content makes no version (SPEC §1).

A commit has three phases so the FUSE loop never stalls on a large file:

1. :meth:`FileOps.commit_begin` (loop thread): the overlay to commit, or None;
2. :meth:`FileOps.commit_build` (worker thread): CDC, BLAKE3, zstd, packs;
3. :meth:`FileOps.commit_finish` (loop thread): one metadata transaction.

Between 1 and 3 the adapter holds the inode's lock: no write may change the
overlay while a worker reads it. :meth:`FileOps.commit_file` runs all three
in the calling thread (CLI, tests).

A file created by an open and first written by it shows as one version
(the ``create`` entry is folded into the first ``write``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chronicle.errors import Busy, InvalidArgument, IsADirectory, NotFound
from chronicle.store.chunks.ids import to_hex
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, add_totals
from chronicle.store.model import Actor, Attrs
from chronicle.store.namespace.content import BuiltContent, ContentMap
from chronicle.store.namespace.staging import Overlay


@dataclass
class FileState:
    """The shared state of one inode's open handles."""

    ino: int
    base: ContentMap
    handles: int = 0
    overlay: Overlay | None = None
    created_seq: int | None = None       # set while a create's entry may still be folded
    pid: int = 0                         # last process that wrote (flush has no caller context)
    mtime_ns: int | None = None          # times of uncommitted writes
    ctime_ns: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dirty(self) -> bool:
        return self.overlay is not None and self.overlay.dirty


class FileOps:
    """File-content operations of :class:`~chronicle.store.namespace.workspace.Workspace`."""

    def __init__(self):
        self.files: dict[int, FileState] = {}

    # -- attributes with uncommitted writes -----------------------------------------

    def getattr(self, ino: int, txn=None) -> Attrs:
        """Head attributes, with the size and times of uncommitted writes."""
        attrs = self.head_attrs(ino, txn)
        state = self.files.get(ino)
        if state is not None and state.overlay is not None and state.overlay.dirty:
            attrs = attrs.replace(size=state.overlay.size, mtime_ns=state.mtime_ns or attrs.mtime_ns,
                                  ctime_ns=state.ctime_ns or attrs.ctime_ns)
        return attrs

    def allocated_bytes(self, ino: int, attrs: Attrs) -> int:
        """Bytes that are not holes (``st_blocks * 512``)."""
        state = self.files.get(ino)
        if state is not None and state.dirty:
            return attrs.size
        if not attrs.is_file:
            return attrs.size
        return self.store.content_map(attrs.content).allocated_bytes_cached()

    # -- open / read / write / release -------------------------------------------------

    def open_file(self, ino: int, *, truncate: bool = False, created: bool = False) -> FileState:
        """Count one more open handle of ``ino``; with ``truncate`` (O_TRUNC)
        empty it. ``created``: this open created the file (its create entry
        may be folded into the first write)."""
        state = self.files.get(ino)
        if state is None:
            attrs = self.head_attrs(ino)
            if attrs.is_dir:
                raise IsADirectory()
            if not attrs.is_file:
                raise InvalidArgument("not a regular file")
            state = FileState(ino, self.store.content_map(attrs.content))
            self.files[ino] = state
        state.handles += 1
        if created:
            state.created_seq = self.head_seq
        if truncate:
            self.truncate_file(ino, 0)
        return state

    def read_file(self, ino: int, offset: int, size: int) -> bytes:
        state = self.files.get(ino)
        if state is None:
            attrs = self.head_attrs(ino)
            return self.store.content_map(attrs.content).read(offset, size)
        if state.overlay is not None and state.overlay.dirty:
            return state.overlay.read(offset, size)
        return state.base.read(offset, size)

    def write_file(self, ino: int, offset: int, data: bytes, pid: int = 0) -> int:
        """Write into the open file's overlay. Raises ``FileTooLarge``, ``NoSpace``."""
        state = self._open_state(ino)
        written = self._overlay(state).write(offset, data)
        state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid
        return written

    def truncate_file(self, ino: int, size: int, pid: int = 0) -> None:
        """Set the open file's size (committed with its next version)."""
        state = self._open_state(ino)
        overlay = self._overlay(state)
        if size != overlay.size:
            overlay.truncate(size)
            state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid

    def punch_hole(self, ino: int, offset: int, length: int, pid: int = 0) -> None:
        state = self._open_state(ino)
        self._overlay(state).punch_hole(offset, length)
        state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid

    def release_file(self, ino: int) -> None:
        """One handle fewer. The last one drops the state; uncommitted
        changes are discarded (the adapter commits before releasing)."""
        state = self.files.get(ino)
        if state is None:
            return
        state.handles -= 1
        if state.handles <= 0:
            if state.overlay is not None:
                state.overlay.close()
            del self.files[ino]
            attrs = self._attrs.get(ino)
            if attrs is not None and attrs.nlink == 0:
                self._attrs.pop(ino, None)

    def _open_state(self, ino: int) -> FileState:
        state = self.files.get(ino)
        if state is None:
            raise NotFound(f"inode {ino} is not open")
        return state

    def _overlay(self, state: FileState) -> Overlay:
        if state.overlay is None:
            state.overlay = Overlay(str(self.store.staging_dir), state.base, self.store.chunks)
        return state.overlay

    def stream_backlogged(self, ino: int) -> bool:
        """True if the writer of ``ino`` should wait for its stream worker
        (call :meth:`wait_stream` from a worker thread)."""
        state = self.files.get(ino)
        return state is not None and state.overlay is not None and state.overlay.backlogged()

    def wait_stream(self, ino: int) -> None:
        state = self.files.get(ino)
        if state is not None and state.overlay is not None:
            state.overlay.wait_stream()

    # -- commits ---------------------------------------------------------------------

    def commit_begin(self, ino: int) -> Overlay | None:
        """The overlay to commit, or None (clean, not open, or unlinked:
        a file no path reaches has no history to record)."""
        state = self.files.get(ino)
        if state is None or not state.dirty:
            return None
        if self.head_attrs(ino).nlink == 0:
            return None
        return state.overlay

    def commit_build(self, overlay: Overlay) -> BuiltContent:
        """Build the new content (worker thread; see ``Overlay.build``)."""
        return overlay.build(self.store.chunks)

    def commit_finish(self, ino: int, built: BuiltContent, pid: int = 0) -> int | None:
        """Record the version; returns its seq, or None when the content is unchanged."""

        state = self._open_state(ino)
        attrs = self.head_attrs(ino)
        overlay = state.overlay
        if built.id == attrs.content:
            base = self.store.content_map(built.id)
            overlay.rebase(base, built.hasher)
            state.base = base
            state.mtime_ns = state.ctime_ns = None
            return None
        self.store.chunks.flush()
        event = "write" if overlay.wrote else "truncate"
        inserted: list[bytes] = []
        actor = Actor(attrs.uid, attrs.gid, pid or state.pid)
        with self.event(actor) as w:
            db = self.dbs["contents"]
            if w.txn.get(built.id, db=db) is None:
                built.record.refcount = 0
                w.txn.put(built.id, built.record.encode(), db=db)
                inserted = self.store.chunks.add_refs(w.txn, built.record)
                add_totals(w.txn, self.dbs["meta"], logical_bytes=built.record.size, contents=1)
            new_attrs = attrs.replace(size=built.record.size, content=built.id,
                                      mtime_ns=state.mtime_ns or attrs.mtime_ns, ctime_ns=state.ctime_ns or w.now_ns)
            w.put_attrs(ino, new_attrs)
            path = self.path_of(ino)
            version = None
            digest = to_hex(built.record.hash) if built.record.hash else None
            if path is not None:
                version = w.path_entry(path, event, ino=ino, flags=P_BUMPS | P_CONTENT, content=built.id,
                                       size=built.record.size, fold_seq=state.created_seq)
            w.log(event, path, version=version, size=built.record.size, hash=digest)
        self.store.chunks.committed(inserted)
        self._attrs[ino] = new_attrs
        base = ContentMap(built.id, built.record, self.store.chunks)
        self.store.remember_content(base)
        overlay.rebase(base, built.hasher)
        state.base = base
        state.created_seq = None
        state.mtime_ns = state.ctime_ns = None
        return self.head_seq

    def commit_file(self, ino: int, pid: int = 0) -> int | None:
        """All three commit phases in this thread."""
        overlay = self.commit_begin(ino)
        if overlay is None:
            return None
        return self.commit_finish(ino, self.commit_build(overlay), pid)

    def reload_file(self, ino: int) -> None:
        """After a restore changed ``ino``'s content: point its open state at it.
        Raises :class:`Busy` if it has uncommitted changes."""
        state = self.files.get(ino)
        if state is None:
            return
        if state.dirty:
            raise Busy("the file has uncommitted writes")
        attrs = self.head_attrs(ino)
        base = self.store.content_map(attrs.content)
        state.base = base
        if state.overlay is not None:
            state.overlay.rebase(base)
