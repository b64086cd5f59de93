"""Open files of a workspace: reads, writes, and the versions they make.

:class:`OpenFiles` is a collaborator of
:class:`~chronicle.store.namespace.workspace.Workspace`, held as ``ws.files``:
a read-only mapping ``ino -> FileState`` of the inodes with open handles, and
the operations on them. It changes the namespace only through the
workspace's public API (``ws.event``, ``ws.head_attrs``, ``ws.links``).

Vocabulary: an inode with open handles has one :class:`FileState`, shared by
all its handles (the **handle count**; the FUSE adapter keeps the handles
themselves). Its **overlay** (``chronicle.store.namespace.staging``) holds the
writes not yet committed. A **commit** turns a dirty overlay into a new
**version**: a content record and one ``write`` (or ``truncate``) event.
The FUSE adapter commits on ``flush`` (every ``close``), ``fsync`` and the
last ``release``; identical content makes no version (SPEC §1).

A commit has three phases so the FUSE loop never stalls on a large file:

1. :meth:`OpenFiles.commit_begin` (loop thread): the overlay to commit, or None;
2. :meth:`OpenFiles.commit_build` (worker thread): CDC, BLAKE3, zstd, packs;
3. :meth:`OpenFiles.commit_finish` (loop thread): one metadata transaction.

Between 1 and 3 the adapter holds the inode's lock: no write may change the
overlay while a worker reads it. :meth:`OpenFiles.commit` runs all three
in the calling thread (CLI, tests).

A file created by an open and first written by it shows as one version
(the ``create`` entry is folded into the first ``write``).

Errors: :class:`NotFound` (an inode that is not open, where one must be),
:class:`IsADirectory` / :class:`InvalidArgument` (opening what is not a
regular file, as open(2) answers EISDIR), :class:`FileTooLarge` and
:class:`NoSpace` from the overlay, :class:`Busy` (``reload`` over
uncommitted writes).

**Read recording.** :class:`ReadTracker` gathers the read-set of the open
turn in memory; the mount daemon (the FUSE adapter) holds one beside the
workspace it serves. While a turn label is open and its tracking is on
(``turn-begin`` without ``"track_reads": false``), every read the adapter
answers is noted (:meth:`ReadTracker.note`): the open file's committed
content and the byte range go to that (inode, content)'s
:class:`~chronicle.store.history.reads.FileRead` — a dict lookup and a
range append, no LMDB. :meth:`ReadTracker.end` hands the read-set over when
the turn ends; the caller writes it in one transaction
(:meth:`chronicle.store.history.reads.ReadLog.record`): one LMDB write per
turn, whatever the number of reads. What counts: reads of regular
workspace files while the label is open, by any process on the mount (the
attribution of a write's turn label: the agent and its child processes).
Reads of ``.chronicle/`` are not file reads of the workspace and are left
out, as are reads of a file no path reaches (unlinked while open). A read
the kernel answers from its page cache never reaches the daemon, so while
tracking is on the adapter opens files without keeping the page cache
(``keep_cache`` off): a file opened in a tracked turn is read through the
mount. Not seen: pages cached before the turn read through a handle opened
before it, and empty files (the kernel asks nothing). Ranges are what the
kernel asked for, read-ahead included, clipped to the bytes served.

Threads: the workspace's thread, except :meth:`OpenFiles.commit_build` and
:meth:`OpenFiles.wait_stream`, which are meant for a worker thread while the
caller holds the inode's lock (the FUSE adapter's per-inode ``trio.Lock``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import Busy, ChronicleError, InvalidArgument, IsADirectory, NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID, to_hex
from chronicle.store.history.reads import FileRead
from chronicle.store.meta import nodes, schema
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, PathEntry, add_totals
from chronicle.store.model import KIND_FILE, Actor, Attrs
from chronicle.store.namespace.content import BuiltContent, ContentMap
from chronicle.store.namespace.staging import Overlay

if TYPE_CHECKING:               # workspace.py builds an OpenFiles: a runtime import would be a cycle
    from chronicle.store.namespace.workspace import Workspace


@dataclass
class FileState:
    """The shared state of one inode's open handles.

    ``base`` is the committed content the overlay started from; ``overlay``
    exists from the first change on; times are ns since the epoch.
    """

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
        """True while the overlay holds changes not yet committed."""
        return self.overlay is not None and self.overlay.dirty


class OpenFiles(Mapping[int, FileState]):
    """The open files of one workspace: ``ino -> FileState`` (see the module docstring)."""

    def __init__(self, ws: Workspace):
        self._ws = ws
        self._states: dict[int, FileState] = {}

    # -- the mapping ------------------------------------------------------------------

    def __getitem__(self, ino: int) -> FileState:
        return self._states[ino]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, ino: object) -> bool:      # Mapping's would raise and catch KeyError
        return ino in self._states

    def get(self, ino: int, default: FileState | None = None) -> FileState | None:
        return self._states.get(ino, default)

    def is_dirty(self, ino: int) -> bool:
        """True if ``ino`` is open with uncommitted changes."""
        state = self._states.get(ino)
        return state is not None and state.dirty

    def dirty(self) -> list[int]:
        """The open inodes with uncommitted changes."""
        return [ino for ino, state in self._states.items() if state.dirty]

    # -- attributes with uncommitted writes -----------------------------------------

    def with_pending(self, ino: int, attrs: Attrs) -> Attrs:
        """``attrs`` (the committed head attributes of ``ino``) with the size
        and times of its uncommitted writes, as stat(2) must show them."""
        state = self._states.get(ino)
        if state is not None and state.overlay is not None and state.overlay.dirty:
            attrs = attrs.replace(size=state.overlay.size, mtime_ns=state.mtime_ns or attrs.mtime_ns,
                                  ctime_ns=state.ctime_ns or attrs.ctime_ns)
        return attrs

    def times_set(self, ino: int, *, mtime: bool) -> None:
        """An explicit time change (futimens on an open file) was committed:
        it wins over the times of the writes before it; later writes set them
        again. ``mtime``: the mtime was set (the ctime always changes)."""
        state = self._states.get(ino)
        if state is not None:
            if mtime:
                state.mtime_ns = None
            state.ctime_ns = None

    def kernel_times(self, ino: int, mtime_ns: int | None, ctime_ns: int | None) -> bool:
        """The kernel's writeback cache reports the times (ns since the epoch)
        it gave the writes it holds (FUSE ``SETATTR`` from ``write_inode``):
        they become the times of the pending version, with no event of their
        own. Returns False, changing nothing, when no change is pending (the
        writes they belong to are committed already: their version keeps the
        times the daemon gave it)."""
        state = self._states.get(ino)
        if state is None or not state.dirty:
            return False
        if mtime_ns is not None:
            state.mtime_ns = mtime_ns
        if ctime_ns is not None:
            state.ctime_ns = ctime_ns
        return True

    # -- open / read / write / release -------------------------------------------------

    def open(self, ino: int, *, truncate: bool = False, created: bool = False) -> FileState:
        """Count one more open handle of ``ino``; with ``truncate`` (O_TRUNC)
        empty it. ``created``: this open created the file (its create entry
        may be folded into the first write). Raises :class:`NotFound`,
        :class:`IsADirectory`, :class:`InvalidArgument` (not a regular file)."""
        state = self._states.get(ino)
        if state is None:
            attrs = self._ws.head_attrs(ino)
            if attrs.is_dir:
                raise IsADirectory()
            if not attrs.is_file:
                raise InvalidArgument("not a regular file")
            state = FileState(ino, self._ws.store.content_map(attrs.content))
            self._states[ino] = state
        state.handles += 1
        if created:
            state.created_seq = self._ws.head_seq
        if truncate:
            self.truncate(ino, 0)
        return state

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the file as it is now (with its
        uncommitted writes if open); short at the end of the file. ``ino``
        need not be open. Raises :class:`NotFound`, ``Corrupt``."""
        state = self._states.get(ino)
        if state is None:
            attrs = self._ws.head_attrs(ino)
            return self._ws.store.content_map(attrs.content).read(offset, size)
        if state.overlay is not None and state.overlay.dirty:
            return state.overlay.read(offset, size)
        return state.base.read(offset, size)

    def write(self, ino: int, offset: int, data: bytes, pid: int = 0) -> int:
        """Write into the open file's overlay; returns ``len(data)``. ``pid``:
        the writer, for the version's log line. Raises :class:`NotFound` (not
        open), ``FileTooLarge``, ``NoSpace``."""
        state = self._open_state(ino)
        written = self._overlay(state).write(offset, data)
        state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid
        return written

    def truncate(self, ino: int, size: int, pid: int = 0) -> None:
        """Set the open file's size in bytes (committed with its next
        version). Raises :class:`NotFound` (not open), ``FileTooLarge``."""
        state = self._open_state(ino)
        overlay = self._overlay(state)
        if size != overlay.size:
            overlay.truncate(size)
            state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid

    def punch_hole(self, ino: int, offset: int, length: int, pid: int = 0) -> None:
        """Zero ``[offset, offset+length)`` of the open file, keeping its size
        (fallocate(2) ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``). Raises :class:`NotFound`."""
        state = self._open_state(ino)
        self._overlay(state).punch_hole(offset, length)
        state.mtime_ns = state.ctime_ns = time.time_ns()
        if pid:
            state.pid = pid

    def release(self, ino: int) -> None:
        """One handle fewer. The last one drops the state; uncommitted
        changes are discarded (the adapter commits before releasing). An
        unlinked file's cached attributes go with it (``ws.drop_unlinked``)."""
        state = self._states.get(ino)
        if state is None:
            return
        state.handles -= 1
        if state.handles <= 0:
            if state.overlay is not None:
                state.overlay.close()
            del self._states[ino]
            self._ws.drop_unlinked(ino)

    def _open_state(self, ino: int) -> FileState:
        state = self._states.get(ino)
        if state is None:
            raise NotFound(f"inode {ino} is not open")
        return state

    def _overlay(self, state: FileState) -> Overlay:
        if state.overlay is None:
            store = self._ws.store
            state.overlay = Overlay(str(store.staging_dir), state.base, store.chunks)
            if not state.base.size:
                state.overlay.prior = self._prior(state.ino)
        return state.overlay

    def _prior(self, ino: int) -> ContentMap | None:
        """The content an empty file's first writes replace, as delta hints
        (``Overlay.prior``): its path's last non-empty content (unlink +
        create, as ``git checkout`` does), else that of the file its name is a
        temporary of (:func:`temp_targets`: written, then renamed over it).
        A few LMDB reads, once per overlay; None if nothing is found."""
        ws = self._ws
        path = ws.links.path_of(ino)
        if not path:
            return None
        content = None
        try:
            with ws.read_txn() as txn:
                content = _last_content(txn, ws.dbs["paths"], ws.id, path)
                parent = ws.links.parent(ino)
                for name in temp_targets(path.rsplit(b"/", 1)[-1]) if content is None and parent else ():
                    found = ws.view().lookup(txn, parent, name)
                    if found is not None and found[1] == KIND_FILE and found[0] != ino:
                        attrs = ws.head_attrs(found[0], txn)
                        if attrs.size:
                            content = attrs.content
                            break
            return None if content is None else ws.store.content_map(content)
        except (ChronicleError, lmdb.Error):
            return None               # only a hint

    def stream_backlogged(self, ino: int) -> bool:
        """True if the writer of ``ino`` should wait for its stream worker
        (call :meth:`wait_stream` from a worker thread)."""
        state = self._states.get(ino)
        return state is not None and state.overlay is not None and state.overlay.backlogged()

    def wait_stream(self, ino: int) -> None:
        """Block until ``ino``'s stream worker has caught up (worker thread)."""
        state = self._states.get(ino)
        if state is not None and state.overlay is not None:
            state.overlay.wait_stream()

    # -- commits ---------------------------------------------------------------------

    def commit_begin(self, ino: int) -> Overlay | None:
        """The overlay to commit, or None (clean, not open, or unlinked:
        a file no path reaches has no history to record)."""
        state = self._states.get(ino)
        if state is None or not state.dirty:
            return None
        if self._ws.head_attrs(ino).nlink == 0:
            return None
        return state.overlay

    def commit_build(self, overlay: Overlay) -> BuiltContent:
        """Build the new content (worker thread; see ``Overlay.build``).
        Raises ``NoSpace`` (a pack cannot be written), ``Corrupt`` (a base chunk is damaged)."""
        return overlay.build(self._ws.store.chunks)

    def commit_finish(self, ino: int, built: BuiltContent, pid: int = 0) -> int | None:
        """Record the version as one ``write`` (or ``truncate``) event;
        returns its seq, or None when the content is unchanged (SPEC §1: no
        version). Raises :class:`NotFound` (not open), ``NoSpace``."""
        ws = self._ws
        store = ws.store
        state = self._open_state(ino)
        attrs = ws.head_attrs(ino)
        overlay = state.overlay
        if built.id == attrs.content:
            store.chunks.release_hits(built.used)     # the head content holds them: no hit is needed
            base = store.content_map(built.id)
            overlay.rebase(base)
            state.base = base
            state.mtime_ns = state.ctime_ns = None
            return None
        store.chunks.flush()
        event = "write" if overlay.wrote else "truncate"
        inserted: list[bytes] = []
        actor = Actor(attrs.uid, attrs.gid, pid or state.pid)
        with ws.event(actor) as w:
            db = ws.dbs["contents"]
            if w.txn.get(built.id, db=db) is None:
                built.record.refcount = 0
                w.txn.put(built.id, built.record.encode(built.id), db=db)
                held = nodes.reference(w.txn, ws.dbs["content_nodes"], built.record, built.nodes)
                inserted = store.chunks.add_chunk_refs(w.txn, held)
                add_totals(w.txn, ws.dbs["meta"], logical_bytes=built.record.size, contents=1)
            new_attrs = attrs.replace(size=built.record.size, content=built.id,
                                      mtime_ns=state.mtime_ns or attrs.mtime_ns, ctime_ns=state.ctime_ns or w.now_ns)
            w.put_attrs(ino, new_attrs)
            path = ws.links.path_of(ino)
            version = None
            digest = to_hex(built.record.hash) if built.record.hash else None
            if path is not None:
                version = w.path_entry(path, event, ino=ino, flags=P_BUMPS | P_CONTENT, content=built.id,
                                       size=built.record.size, fold_seq=state.created_seq)
            w.log(event, path, version=version, size=built.record.size, hash=digest)
        store.chunks.committed(inserted)
        store.chunks.release_hits(built.used)         # the committed content holds them now
        base = ContentMap(built.id, built.record, store.chunks)
        store.remember_content(base)
        overlay.rebase(base)
        state.base = base
        state.created_seq = None
        state.mtime_ns = state.ctime_ns = None
        return ws.head_seq

    def commit(self, ino: int, pid: int = 0) -> int | None:
        """All three commit phases in this thread (CLI, tests, shutdown);
        returns the new version's seq or None."""
        overlay = self.commit_begin(ino)
        if overlay is None:
            return None
        return self.commit_finish(ino, self.commit_build(overlay), pid)

    def reload(self, ino: int) -> None:
        """After a restore changed ``ino``'s content: point its open state at it.
        Raises :class:`Busy` if it has uncommitted changes."""
        state = self._states.get(ino)
        if state is None:
            return
        if state.dirty:
            raise Busy("the file has uncommitted writes")
        attrs = self._ws.head_attrs(ino)
        base = self._ws.store.content_map(attrs.content)
        state.base = base
        if state.overlay is not None:
            state.overlay.rebase(base)


_PRIOR_WALK = 8                 # path entries looked at, newest first, for the last content


def _last_content(txn: lmdb.Transaction, db: lmdb._Database, ws_id: int, path: bytes) -> bytes | None:
    """The newest non-empty content id among ``path``'s last :data:`_PRIOR_WALK`
    entries in workspace ``ws_id``'s own ``paths`` layer, or None."""
    prefix = schema.path_key(ws_id, path, 0)[:-8]
    with txn.cursor(db=db) as cur:
        if not cur.set_range(prefix + b"\xff" * 8):
            if not cur.last():
                return None
        elif not cur.prev():
            return None
        for _ in range(_PRIOR_WALK):
            key = cur.key()
            if not bytes(key).startswith(prefix):
                return None
            entry = PathEntry.decode(cur.value(), key)
            if (entry.flags & P_CONTENT and entry.content not in (EMPTY_CONTENT_ID, PRUNED_ID)
                    and (not entry.path or entry.path == path)):
                return entry.content
            if not cur.prev():
                return None
    return None


def temp_targets(name: bytes) -> list[bytes]:
    """The names a temporary file ``name`` is likely written to replace (by
    a rename over it): without a leading ``.`` and a trailing ``~``, then with
    each trailing ``.suffix`` dropped in turn (``.f.txt.swp``, ``f.txt.tmp``,
    ``f.txt~`` -> ``f.txt`` among them). At most 4 names, never ``name``."""
    out: list[bytes] = []
    stem = name.lstrip(b".").rstrip(b"~")
    while stem and len(out) < 4:
        if stem != name and stem not in out:
            out.append(stem)
        cut = stem.rfind(b".")
        if cut <= 0:
            break
        stem = stem[:cut]
    return out


class ReadTracker:
    """The read-set of the open turn of one writable workspace (module docstring: "Read recording")."""

    def __init__(self, ws: Workspace):
        self._ws = ws
        self.agent: str | None = None
        self.turn: int | None = None
        self.active = False              # a turn is open and tracks its reads
        self._reads: dict[tuple[int, bytes], FileRead] = {}

    def begin(self, agent: str, turn: int, *, enabled: bool = True) -> None:
        """A turn's label was opened: gather its reads from now on (if
        ``enabled``). Drops what an earlier turn left unclaimed."""
        self.agent, self.turn = agent, turn
        self.active = enabled
        self._reads = {}

    def end(self) -> list[FileRead]:
        """The turn's label was closed: its reads (every read noted before
        this call), and tracking stops until the next :meth:`begin`."""
        reads = list(self._reads.values())
        self._reads = {}
        self.active = False
        self.agent = self.turn = None
        return reads

    def note(self, ino: int, offset: int, length: int, pid: int = 0) -> None:
        """``length`` bytes at ``offset`` of open inode ``ino`` were served to
        a handle opened by ``pid``. Cheap: called for every read."""
        if not self.active or length <= 0:
            return
        state = self._ws.files.get(ino)
        if state is None:
            return
        base = state.base
        read = self._reads.get((ino, base.id))
        if read is None:
            path = self._ws.links.path_of(ino)
            if path is None:
                return
            read = self._reads[(ino, base.id)] = FileRead(path, ino, base.id, base.hash, self._ws.head_seq,
                                                          base.size)
        read.ranges.add(offset, offset + length)
        read.pids.add(pid)
        if state.dirty:
            read.uncommitted = True

    def __len__(self) -> int:
        return len(self._reads)


__all__ = ["FileState", "OpenFiles", "ReadTracker"]
