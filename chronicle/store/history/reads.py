"""Read-sets: which file versions a turn read, and which turns' reads went stale.

Vocabulary (issue 12 §2):

- **read-set** of a turn — the file versions read while its label was open
  (every ``read`` the mount answered, by the agent or by any process on the
  mount: the same attribution as the turn label of a write), one **read**
  per (path, content)::

      {"path", "version": N | null, "seq": S | null, "hash": hex | null, "content": hex,
       "size": bytes, "ranges": [[start, end], ...], "bytes": N, "pids": [...],
       "uncommitted"?: true}

  ``version``/``seq``: the path's version whose content was read and the seq
  that made it (null when the bytes were no version of that path, e.g. a file
  reached by an old handle); ``hash``: the BLAKE3 of the content (null for a
  file too sparse to hash at commit); ``content``: the content id;
  ``ranges``: the byte ranges the mount served, half-open, sorted and
  coalesced (adjacent or overlapping ranges merge) — what the kernel asked
  for, read-ahead included, clipped to the file's size; ``bytes``: their
  total; ``uncommitted``: the turn read its own writes before they were a
  version (the version shown is the one they started from).
- **stale** turn — a completed turn one of whose read files has changed since
  the turn ended: the path's content at the head differs from its content at
  the turn's ``end_seq`` (a deleted path counts as changed). Comparing with
  the end of the turn, not with the version read, keeps a turn that read a
  file and then wrote it itself from being stale at once.

Storage: database ``turn_reads`` (per workspace), key ``ws u32, agent, 0x00,
turn u32, index u32`` (``schema.turn_key`` and an index): a turn's read-set
is one range scan, written in one transaction at the turn's end
(:meth:`ReadLog.record`). A fork sees the read-sets of the turns it
inherited through their owner's workspace (the turn's agent names it).

:class:`Ranges` is the coalescing range set (``bisect`` over two sorted
lists: appending after the last range, the sequential case, is O(1)).

Errors: :class:`AgentNotFound`, :class:`NotFound` (no such turn).

Threads: a :class:`ReadLog` holds no transaction; :meth:`ReadLog.record`
opens one write transaction inside the call and may run in a worker thread
(it reads the workspace only through its own transaction).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import NotADirectory, NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, to_hex
from chronicle.store.meta import schema
from chronicle.store.meta.journal import path_text
from chronicle.store.history.turns import TurnLog
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, PathEntry, PathHead

if TYPE_CHECKING:                      # (the namespace imports this module)
    from chronicle.store.namespace.workspace import Workspace
    from chronicle.store.store import Store

READS_DB = "turn_reads"


class Ranges:
    """A set of byte offsets as sorted, coalesced half-open ranges ``[start, end)``."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``; an empty range (``end <= start``) adds nothing."""
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        if not starts or start > ends[-1]:           # after every range: the sequential case
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:                       # touches or overlaps the last range
            if end > ends[-1]:
                ends[-1] = end
            return
        lo = bisect_left(ends, start)                 # the first range ending at or after start
        hi = bisect_right(starts, end)                # past the last range starting at or before end
        if lo == hi:
            starts.insert(lo, start)
            ends.insert(lo, end)
            return
        starts[lo:hi] = [min(start, starts[lo])]
        ends[lo:hi] = [max(end, ends[hi - 1])]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends)

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    @property
    def total(self) -> int:
        """Bytes covered."""
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def to_json(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self._starts, self._ends)]


@dataclass
class FileRead:
    """One file content read during a turn, as the mount daemon gathers it
    before the turn ends (:class:`chronicle.store.namespace.files.ReadTracker`):
    ``path`` when first read, the content id and BLAKE3 ``digest`` of the
    committed content, ``seq`` the head then, ``size`` its size in bytes."""

    path: bytes
    ino: int
    content: bytes
    digest: bytes | None
    seq: int
    size: int
    ranges: Ranges = field(default_factory=Ranges)
    pids: set[int] = field(default_factory=set)
    uncommitted: bool = False


def reads_prefix(ws_id: int, agent: str, turn: int) -> bytes:
    """The ``turn_reads`` key prefix of one turn's read-set."""
    return schema.turn_key(ws_id, agent.encode(), turn)


class ReadLog:
    """The read-sets of one open :class:`~chronicle.store.store.Store` (module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self.env: lmdb.Environment = store.env
        self.db = store.dbs[READS_DB]

    # -- writing (the workspace's writer, at a turn's end) ---------------------------------------

    def record(self, ws: Workspace, agent: str, turn: int, reads: list[FileRead]) -> int:
        """Write the read-set of ``turn`` of ``agent`` in ``ws`` (sorted by
        path) in one transaction, after the reads of that turn already kept,
        resolving each read's version number. Returns how many reads were
        written (none: no transaction)."""
        if not reads:
            return 0
        prefix = reads_prefix(ws.id, agent, turn)
        with self.env.begin(write=True) as txn:
            index = 0                                   # after what an earlier call kept for the turn
            with txn.cursor(db=self.db) as cur:
                if cur.set_range(prefix):
                    for key in cur.iternext(values=False):
                        if key[:len(prefix)] != prefix:
                            break
                        index += 1
            for read in sorted(reads, key=lambda r: (r.path, r.seq)):
                txn.put(prefix + schema.U32.pack(index), json.dumps(self._entry(txn, ws, read)).encode(), db=self.db)
                index += 1
        self.store.note_commit()
        return len(reads)

    def _entry(self, txn: lmdb.Transaction, ws: Workspace, read: FileRead) -> dict:
        version, seq = _version_of(txn, ws, read.path, read.content, read.seq)
        out = {"path": path_text(read.path), "version": version, "seq": seq,
               "hash": to_hex(read.digest) if read.digest else None, "content": to_hex(read.content),
               "size": read.size, "ranges": read.ranges.to_json(), "bytes": read.ranges.total,
               "pids": sorted(read.pids)}
        if read.uncommitted:
            out["uncommitted"] = True
        return out

    # -- reading -----------------------------------------------------------------------------

    def turn_reads(self, workspace: str, agent: str, turn: int) -> list[dict]:
        """The read-set of ``turn`` of ``agent`` kept in workspace ``workspace``
        (the turn's owner: an agent's own workspace), sorted by path; [] if
        none was kept (tracking off, nothing read, or no such turn).
        Raises :class:`NotFound` (no such workspace)."""
        ws_id = self.store.workspace_record(workspace).id
        with self.env.begin() as txn:
            return self.layer_reads(txn, ws_id, agent, turn)

    def layer_reads(self, txn: lmdb.Transaction, ws_id: int, agent: str, turn: int) -> list[dict]:
        """The read-set of ``turn`` of ``agent`` kept under workspace id ``ws_id`` (one range scan)."""
        prefix = reads_prefix(ws_id, agent, turn)
        out = []
        with txn.cursor(db=self.db) as cur:
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:len(prefix)] != prefix:
                        break
                    out.append(json.loads(value))
        return out

    def stale(self, agent: str) -> list[dict]:
        """The completed turns along ``agent``'s lineage whose read files have
        changed since they ended (module docstring), oldest first::

            [{"turn", "owner", "end_seq", "changed": [{"path", "read": {"version", "seq", "hash"},
              "now": {"version", "seq", "hash"} | null, "deleted": bool}]}]

        "now" is the path at the head of ``agent``'s workspace. Raises
        :class:`AgentNotFound`."""
        log = TurnLog(self.store)
        lineage = log.lineage(agent)
        ws = self.store.open_workspace(agent)
        owners: dict[str, Workspace] = {agent: ws}
        heads: dict[bytes, dict | None] = {}
        out = []
        with self.env.begin() as txn:
            for owner, record in lineage:
                end = record.get("end_seq")
                if record.get("status") != "completed" or end is None:
                    continue
                owner_ws = owners.get(owner)
                if owner_ws is None:
                    try:
                        owner_ws = owners[owner] = self.store.open_workspace(owner)
                    except NotFound:
                        continue
                changed = []
                for read in self.layer_reads(txn, owner_ws.id, owner, record["turn"]):
                    path = os.fsencode(read["path"])
                    if path not in heads:
                        heads[path] = _file_at(txn, ws, path, None)
                    now = heads[path]
                    then = _file_at(txn, owner_ws, path, end)
                    if (now and now["content"]) == (then and then["content"]):
                        continue                            # as the turn left it (or gone since then)
                    if now is not None and now["content"] == read["content"]:
                        continue
                    changed.append({"path": read["path"],
                                    "read": {k: read.get(k) for k in ("version", "seq", "hash")},
                                    "now": None if now is None else {k: now[k] for k in ("version", "seq", "hash")},
                                    "deleted": now is None})
                if changed:
                    out.append({"turn": record["turn"], "owner": owner, "end_seq": end, "changed": changed})
        return out


def _path_head(txn: lmdb.Transaction, ws: Workspace, path: bytes) -> PathHead | None:
    raw = txn.get(schema.path_head_key(ws.id, path), db=ws.dbs["path_heads"])
    if raw is None:
        return None
    head = PathHead.decode(raw)
    return None if schema.is_long(path) and head.path != path else head


def _entry_at(txn: lmdb.Transaction, ws: Workspace, path: bytes, seq: int) -> PathEntry | None:
    """The path entry of ``path`` recorded at ``seq`` (through the fork layers), or None."""
    for layer in ws.history.layers:
        key = schema.path_key(layer.ws, path, seq)
        raw = txn.get(key, db=ws.dbs["paths"])
        if raw is not None:
            return PathEntry.decode(raw, key)
    return None


def _version_of(txn: lmdb.Transaction, ws: Workspace, path: bytes, content: bytes,
                at_seq: int) -> tuple[int | None, int | None]:
    """``(version, seq)`` of ``path``'s version current at ``at_seq`` if it
    has ``content``, else ``(None, None)``. One or two lookups when nothing
    happened to the path after ``at_seq`` (its cached head, ``path_heads``);
    else a walk of its history."""
    head = _path_head(txn, ws, path)
    if head is not None and head.last_seq <= at_seq:
        entry = _entry_at(txn, ws, path, head.last_seq)
        if entry is not None and entry.flags & P_BUMPS and entry.flags & P_CONTENT and entry.content == content:
            return head.version, head.last_seq
    try:
        versions = ws.history.versions(txn, path)
    except NotFound:
        return None, None
    found = None
    for v in versions:
        if v.seq > at_seq:
            break
        if v.entry.flags & P_BUMPS:
            found = v
    if found is None or not found.entry.flags & P_CONTENT or found.entry.content != content:
        return None, None
    return found.version, found.seq


def _file_at(txn: lmdb.Transaction, ws: Workspace, path: bytes, seq: int | None) -> dict | None:
    """``{"content", "version", "seq", "hash"}`` (hex ids) of the regular file
    at ``path`` in ``ws`` at ``seq`` (None: the head), or None if there is
    none; version, seq and hash are looked up at the head only."""
    view = ws.view(None if seq is None or seq >= ws.head_seq else seq)
    try:
        ino, _kind = view.resolve(txn, path)
    except (NotFound, NotADirectory):
        return None
    attrs = view.attrs(txn, ino)
    if attrs is None or not attrs.is_file:
        return None
    out = {"content": to_hex(attrs.content), "version": None, "seq": None, "hash": None}
    if seq is None:
        out["version"], out["seq"] = _version_of(txn, ws, path, attrs.content, ws.head_seq)
        raw = txn.get(attrs.content, db=ws.dbs["contents"])
        digest = schema.content_header(raw, attrs.content)[2] if raw is not None else None
        if attrs.content == EMPTY_CONTENT_ID:                  # (no record: not refcounted)
            digest = EMPTY_CONTENT_ID
        out["hash"] = to_hex(digest) if digest else None
    return out


__all__ = ["FileRead", "READS_DB", "Ranges", "ReadLog", "reads_prefix"]
