"""Checking a store: every chunk hash, every reference, every refcount.

``chronicle fsck [--repair]`` (SPEC §2) is :func:`fsck`. It reads the whole
store and returns an :class:`FsckReport`: counters, and a list of
:class:`Problem` s, each with a short ``kind`` slug, a one-line message for
the user, and a **severity**:

- ``error`` — data is lost or unreachable, or a count is wrong in a way that
  would make GC free data still in use (or keep garbage forever);
- ``warning`` — an inconsistency that loses nothing but should not be there
  (records of a workspace that no longer exists, a damaged chunk no file uses);
- ``info`` — what normal operation and crashes leave behind: the torn tail of
  a pack a crashed writer was appending to, pack records of chunks that never
  made it into the index, chunks and contents no file uses any more. GC
  reclaims them.

A store is **clean** when no error or warning is left unrepaired.

Checks, in order (each is a ``progress`` phase):

1. ``workspaces`` — every workspace record decodes, is in ``ws_ids``, has
   a ``heads`` entry, and its fork parent exists and has its fork seq.
2. ``packs`` — every pack the chunk backend lists scans
   (``chunks.packs.PackReader.scan``: range reads through the backend), one
   pass per pack in offset order: each record at an indexed location must match the index
   entry (id, codec, lengths), and its payload must decode to its BLAKE3
   (``ChunkStore.read_record(verify=True)``). Index entries the scan did not
   reach (missing pack, bad offset, damaged pack) are then read one by one.
   Records the index does not point at are counted (``unreferenced_bytes``)
   and kept as spare copies for repair. A delta chunk (``chunks.index``) is
   decoded against its base and its BLAKE3 checked; a delta whose base is
   lost, damaged or not in the index is lost too (``chunk-base-lost``,
   naming the files it holds).
3. ``contents`` — every content record decodes, ``sum(lengths) == size``,
   its id is its hash, each extent names a chunk in the index whose length
   it agrees with. Each content counts one use of each distinct chunk it
   names, and each delta chunk so used (directly, or as the base of one)
   one use of its base; so does each chunk reference a gc sweep recorded
   and has not given back yet (``gc_drops``, ``gc.sweep.pending_drops``);
   those counts must equal the chunks' refcounts.
4. ``inodes`` — every inode record decodes and names an existing content;
   each names one use of its content; those must equal the contents'
   refcounts (the empty content included).
5. ``tree`` — every ``dirents``/``dirent_hist`` entry names a directory and
   an inode that have records in the workspace's fork chain (a fork reads
   through to its parent at the fork seq, see ``tree``), as does each
   workspace's root; every path entry with content names an existing
   content. ``tree-walk``: each head tree,
   from its root, has no loop and no unreachable directory with entries.
6. ``events`` — every workspace has one event per seq of its own range
   ``(fork_seq or 0, head]``, each a JSON line with that seq; snapshots name
   seqs that exist.
7. ``verify-contents`` (``verify_contents=True``) — the whole-file BLAKE3 of
   every content is recomputed from its chunks.

A damaged or missing chunk is reported with the file versions it holds
(``workspace:path vN``), found through the contents that use it and the path
entries that name those contents.

Damaged metadata. Before the checks, ``data.mdb`` is read by hand
(``meta.salvage.scan``: LMDB must never read a damaged page). ``Store.open``
has usually salvaged a damaged file already (``meta.salvage``); fsck then
names each damaged range it lost (``meta-damaged``, with the database, the
decoded keys and whose records they were), the paths no longer reached
(``names-lost``), and the checks show the rest (dangling entries, missing
contents). If another process had the store open, fsck checks a salvaged
copy instead, and ``--repair`` swaps it in. Repair acknowledges a salvage
and a fall back to a metadata backup (``metadata-from-backup``); the report
says which metadata is in use and which backups are kept.

Repair (``repair=True``) never deletes anything. It sets refcounts to the
counted values; points the index of a damaged, missing or unindexed chunk at
another good copy of the same chunk found in the packs (concurrent writers
may have stored a chunk twice); restores a missing empty-content record, a
missing ``heads`` entry (from the events) and a missing ``ws_ids`` entry.
All of it happens in one LMDB write transaction, followed by
``Store.sync``. What cannot be repaired stays reported as an error that says
what data is lost.

Concurrency: the checks read one LMDB snapshot (one read transaction), so
fsck may run while a workspace is mounted; chunks written after the
snapshot only show up as unreferenced pack bytes. Repair re-reads every
record it changes inside its write transaction and leaves alone any record
that changed since the snapshot (run fsck again). Run repair on an
unmounted store.

Threads: :func:`fsck` runs in the calling thread; it shares nothing.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb

from chronicle.errors import Corrupt, NotFound
from chronicle.store.chunks.codec import CODEC_DELTA
from chronicle.store.chunks.ids import HOLE_ID, ID_SIZE, hash_bytes, new_hasher, to_hex
from chronicle.store.chunks import tree as chunk_tree
from chronicle.store.chunks.index import DeltaBaseLost, _distinct_ids
from chronicle.store.chunks.packs import PACK_HEADER, RECORD_HEADER, ChunkLocation, PackRecord
from chronicle.store.fsck.report import (
    _NAMED_IN_DETAILS,
    _NAMED_IN_MESSAGE,
    ERROR,
    INFO,
    WARNING,
    FsckReport,
    Problem,
    _name_files,
    _short,
)
from chronicle.store.fsck.nodes import NodeChecks
from chronicle.store.gc.sweep import pending_drops
from chronicle.store.fsck.tree import TreeChecks
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ChunkRecord, ContentRecord, WorkspaceRecord
from chronicle.store.meta.tree import Layer, TreeView
from chronicle.store.fsck.damage import Reader, describe_damage
from chronicle.store.fsck.rebuild import build, check_damaged, report_salvage_and_backups, scan, swap_in
from chronicle.store.store import Store

_ZEROS = bytes(1 << 20)

Progress = Callable[[str, int, int], None]


def fsck(store: Store, *, repair: bool = False, verify_contents: bool = False,
         progress: Progress | None = None) -> FsckReport:
    """Check ``store`` (a :class:`~chronicle.store.store.Store`); see the
    module docstring. ``progress(phase, done, total)`` is called as each
    phase proceeds (``packs`` counts bytes, the others records).

    Never raises for damage it finds (that is what the report is for); may
    raise ``OSError`` if the store directory cannot be read at all.
    """
    started = time.monotonic()
    walk = scan(store.meta_dir)
    try:
        if walk.damaged:
            report = check_damaged(store, walk, repair, lambda copy: _Checker(
                copy, repair=False, verify_contents=verify_contents, progress=progress))
        else:
            report = _Checker(store, repair=repair, verify_contents=verify_contents, progress=progress).run()
    finally:
        walk.close()
    report_salvage_and_backups(store, report, repair)
    report.seconds = time.monotonic() - started
    return report


# --- internals --------------------------------------------------------------------


class _Progress:
    """Calls the user's callback about 200 times per phase, not per record."""

    def __init__(self, callback: Progress | None):
        self._cb = callback

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total = phase, total
        self._next = self._step = max(1, total // 200)
        if self._cb:
            self._cb(phase, 0, total)

    def update(self, done: int) -> None:
        if self._cb and done >= self._next:
            self._next = done + self._step
            self._cb(self.phase, min(done, self.total), self.total)

    def finish(self) -> None:
        if self._cb:
            self._cb(self.phase, self.total, self.total)


@dataclass
class _Lost:
    """A chunk whose data cannot be read where the index says, or that is
    not in the index at all."""

    kind: str                   # chunk-corrupt | chunk-missing
    reason: str
    problem: Problem | None = None


@dataclass
class _ChunkFix:
    """A change to one chunk index entry: ``snapshot`` is the raw entry the
    checks saw (None: absent); repair writes it only if it is still that."""

    snapshot: bytes | None
    refcount: int
    location: PackRecord | None = None
    problems: list[Problem] = field(default_factory=list)


def _reason(exc: Exception, chunk_id: bytes) -> str:
    return str(exc).replace(f"chunk {to_hex(chunk_id)} ", "")


class _Checker(TreeChecks, NodeChecks):
    def __init__(self, store: Store, *, repair: bool, verify_contents: bool, progress: Progress | None):
        self.store = store
        self.dbs = store.dbs
        self.chunks = store.chunks
        self.reader = store.chunks.reader
        self.repair = repair
        self.verify = verify_contents
        self.progress = _Progress(progress)
        self.report = FsckReport(repair=repair)
        self.meta: Reader | None = None      # the read transaction, renewed after damage
        self.damage_problems: list[Problem] = []

        self.workspaces: dict[int, WorkspaceRecord] = {}
        self.heads: dict[int, int] = {}
        self.chains: dict[int, list[tuple[int, int | None]]] = {}
        self.layers: dict[int, list[Layer]] = {}
        self.orphans: Counter[tuple[str, int]] = Counter()

        self.index: dict[bytes, ChunkRecord] = {}
        self.bad_index: dict[bytes, bytes] = {}           # undecodable entries: id -> raw
        self.bad_index_problems: dict[bytes, Problem] = {}
        self.by_pack: dict[int, dict[int, bytes]] = defaultdict(dict)
        self.pack_sizes: dict[int, int] = {}
        self.spares: dict[bytes, list[PackRecord]] = defaultdict(list)
        self.lost: dict[bytes, _Lost] = {}

        self.content_refcounts: dict[bytes, int] = {}      # stored refcounts
        self.bad_contents: set[bytes] = set()
        self.chunk_uses: Counter[bytes] = Counter()
        self.node_uses: Counter[bytes] = Counter()           # holders of each extent node (format 4)
        self.nodes_seen: dict[bytes, list | None] = {}       # nodes checked: entries, None if damaged
        self.lost_node_users: dict[bytes, list[bytes]] = defaultdict(list)   # missing/damaged node -> contents
        self.lost_users: dict[bytes, list[bytes]] = defaultdict(list)   # lost chunk -> contents
        self.content_uses: Counter[bytes] = Counter()
        self.empty_missing = False
        self.inode_min_seq: dict[tuple[int, int], int] = {}
        self.missing_contents: dict[bytes, list[tuple[int, int, int]]] = defaultdict(list)
        self.missing_content_paths: dict[bytes, list[tuple[int, bytes, int]]] = defaultdict(list)
        self.affected_paths: dict[bytes, list[tuple[int, bytes, int]]] = defaultdict(list)
        self.live_dirs: dict[int, set[int]] = defaultdict(set)    # ws -> directories with head entries

        self.chunk_fixes: dict[bytes, _ChunkFix] = {}
        self.content_fixes: dict[bytes, tuple[bytes, int, Problem]] = {}
        self.other_fixes: list[tuple[Problem, Callable[[lmdb.Transaction], bool]]] = []

    # -- driver --------------------------------------------------------------------

    def run(self) -> FsckReport:
        self.meta = Reader(self.store.env, self.dbs)
        try:
            verify = (self._verify_contents,) if self.verify else ()
            for phase in (self._check_workspaces, self._load_index, self._check_packs, self._check_contents,
                          self._check_chunk_refcounts, self._check_node_refcounts, self._check_inodes,
                          self._check_content_refcounts, self._check_tree, self._check_events, *verify,
                          self._report_lost_chunks, self._report_lost_nodes, self._report_orphans):
                try:
                    self.meta.check()
                    phase()
                except lmdb.Error as exc:
                    # a lookup (not a scan) met a damaged page: the phase stops, the others go on
                    self.meta.renew()
                    name = phase.__name__[1:]
                    self.problem("meta-damaged", f"the metadata is damaged where fsck's {name} check looked "
                                 f"({type(exc).__name__}: {exc}); it could not finish", check=name, error=str(exc))
            self._report_damage()
            self.damage_problems = [p for p in self.report.problems if p.kind == "meta-damaged"]
        finally:
            self.meta.close()
            self.meta = None
        if self.repair:
            self._repair()
        return self.report

    @property
    def txn(self) -> lmdb.Transaction | None:
        return self.meta.txn if self.meta is not None else None

    def items(self, db: str):       # every readable record of ``db`` (damage.Reader.items)
        return self.meta.items(db)

    def _report_damage(self) -> None:
        """One ``meta-damaged`` problem per damaged key range a scan skipped."""
        names = {ws: rec.name for ws, rec in self.workspaces.items()}
        for message, details in describe_damage(self.meta.damaged, names):
            self.problem("meta-damaged", message, **details)

    def problem(self, kind: str, message: str, severity: str = ERROR, **details) -> Problem:
        p = Problem(kind, message, severity, False, details)
        self.report.problems.append(p)
        return p

    def ws_name(self, ws: int) -> str:
        rec = self.workspaces.get(ws)
        return rec.name if rec else f"#{ws}"

    def _entries(self, db: str) -> int:
        return self.txn.stat(self.dbs[db])["entries"]

    # -- 1. workspaces ---------------------------------------------------------------

    def _check_workspaces(self) -> None:
        self.progress.start("workspaces", self._entries("workspaces"))
        for n, (key, value) in enumerate(self.items("workspaces"), 1):
            name = bytes(key).decode(errors="replace")
            try:
                rec = WorkspaceRecord.decode(value)
            except (ValueError, KeyError, TypeError):
                self.problem("workspace-corrupt", f"the record of workspace {name!r} is damaged")
                continue
            if rec.name != name:
                self.problem("workspace-corrupt", f"workspace {name!r} has a record naming it {rec.name!r}")
            if rec.id in self.workspaces:
                self.problem("workspace-corrupt", f"workspaces {self.workspaces[rec.id].name!r} and "
                             f"{rec.name!r} have the same id {rec.id}")
                continue
            self.workspaces[rec.id] = rec
            self.progress.update(n)
        self.report.workspaces = len(self.workspaces)

        for key, value in self.items("heads"):
            ws = schema.U32.unpack(key)[0]
            if ws not in self.workspaces:
                self.orphans[("heads", ws)] += 1
                continue
            self.heads[ws] = schema.U64.unpack(value)[0]
        ws_ids = {schema.U32.unpack(key)[0]: value.decode(errors="replace") for key, value in self.items("ws_ids")}
        for ws, name in ws_ids.items():
            rec = self.workspaces.get(ws)
            if rec is None or rec.name != name:
                self.problem("workspace-index", f"workspace id {ws} is listed as {name!r}, which has no such "
                             "workspace record", WARNING, workspace_id=ws)

        for ws, rec in self.workspaces.items():
            if ws not in ws_ids:
                p = self.problem("workspace-index", f"workspace {rec.name!r} (id {ws}) is missing from the "
                                 "workspace id table (forks of it cannot be opened)", workspace=rec.name)
                self.other_fixes.append((p, self._fix_put("ws_ids", schema.ws_key(ws), rec.name.encode())))
            if ws not in self.heads:
                head = self._last_event_seq(ws, rec.fork_seq or 0)
                p = self.problem("workspace-head", f"workspace {rec.name!r} has no head seq (its last event "
                                 f"is seq {head})", workspace=rec.name)
                self.other_fixes.append((p, self._fix_put("heads", schema.ws_key(ws), schema.U64.pack(head))))
                self.heads[ws] = head
        for ws, rec in self.workspaces.items():
            if rec.parent_id is None:
                continue
            parent = self.workspaces.get(rec.parent_id)
            if parent is None or parent.name != rec.parent:
                self.problem("workspace-parent", f"workspace {rec.name!r} is a fork of {rec.parent!r}, which "
                             "does not exist: the history before its fork point is lost", workspace=rec.name)
            elif rec.fork_seq is None or rec.fork_seq > self.heads.get(parent.id, 0):
                self.problem("workspace-parent", f"workspace {rec.name!r} was forked from {parent.name!r} at "
                             f"seq {rec.fork_seq}, which {parent.name!r} does not have", workspace=rec.name)
        for ws in self.workspaces:
            self.chains[ws] = self._chain(ws)
            self.layers[ws] = TreeView._layers(self.chains[ws], None)
        self.progress.finish()

    def _chain(self, ws: int) -> list[tuple[int, int | None]]:
        rec = self.workspaces[ws]
        chain = [(rec.id, rec.fork_seq)]
        seen = {rec.id}
        while rec.parent_id is not None and rec.fork_seq is not None:
            parent = self.workspaces.get(rec.parent_id)
            if parent is None:
                break
            if parent.id in seen:
                self.problem("workspace-parent", f"workspace {self.workspaces[ws].name!r} has a cycle in its "
                             "fork ancestry", workspace=self.workspaces[ws].name)
                break
            seen.add(parent.id)
            chain.append((parent.id, parent.fork_seq))
            rec = parent
        return chain

    def _last_event_seq(self, ws: int, default: int) -> int:
        with self.txn.cursor(db=self.dbs["events"]) as cur:
            if cur.set_range(schema.event_key(ws + 1, 0)):
                if not cur.prev():
                    return default
            elif not cur.last():
                return default
            key = cur.key()
            if key[:4] == schema.ws_key(ws):
                return max(default, schema.event_key_seq(key))
        return default

    def _fix_put(self, db: str, key: bytes, value: bytes) -> Callable[[lmdb.Transaction], bool]:
        def fix(txn: lmdb.Transaction) -> bool:
            if txn.get(key, db=self.dbs[db]) is not None:
                return False
            txn.put(key, value, db=self.dbs[db])
            return True
        return fix

    # -- 2. chunk index and packs --------------------------------------------------

    def _load_index(self) -> None:
        self.progress.start("index", self._entries("chunks"))
        for n, (key, value) in enumerate(self.items("chunks"), 1):
            chunk_id = bytes(key)
            try:
                rec = ChunkRecord.decode(value)
            except Corrupt:
                self.bad_index[chunk_id] = bytes(value)
                self.bad_index_problems[chunk_id] = self.problem(
                    "chunk-index-corrupt", f"the index entry of chunk {_short(chunk_id)} is damaged",
                    chunk=to_hex(chunk_id))
                continue
            if len(chunk_id) != ID_SIZE or chunk_id == HOLE_ID:
                self.problem("chunk-index-corrupt", f"the chunk index has an entry with an invalid id "
                             f"{to_hex(chunk_id)}", WARNING, chunk=to_hex(chunk_id))
            self.index[chunk_id] = rec
            self.by_pack[rec.pack_no][rec.offset] = chunk_id
            self.progress.update(n)
        self.report.chunks = len(self.index)
        self.progress.finish()

    def _check_packs(self) -> None:
        self.pack_sizes = self.reader.list_packs()
        total = sum(self.pack_sizes.values())
        self.report.packs = len(self.pack_sizes)
        self.report.pack_bytes = total
        self.progress.start("packs", total)
        seen: set[bytes] = set()
        done = 0
        for pack_no, size in self.pack_sizes.items():
            self._scan_pack(pack_no, size, seen, done)
            done += size
            self.progress.update(done)
        self.progress.finish()

        # Index entries the scans did not reach: read them one by one.
        rest = sorted((rec.pack_no, rec.offset, chunk_id) for chunk_id, rec in self.index.items()
                      if chunk_id not in seen)
        for pack_no, offset, chunk_id in rest:
            rec = self.index[chunk_id]
            if pack_no not in self.pack_sizes:
                self.lost[chunk_id] = _Lost("chunk-missing", "is lost: its pack is missing")
                continue
            location = ChunkLocation(pack_no, offset, rec.stored_len)
            try:
                codec_id, raw_len, header_id = self.reader.read_header(location)
            except Corrupt as exc:
                kind = "chunk-missing" if "truncated" in str(exc) else "chunk-corrupt"
                self.lost[chunk_id] = _Lost(kind, f"cannot be read: {exc}")
                continue
            except OSError as exc:
                self.lost[chunk_id] = _Lost("chunk-missing", f"cannot be read from pack {pack_no}: {exc}")
                continue
            self._check_record(chunk_id, rec, header_id, codec_id, raw_len, rec.stored_len)
        self._lose_deltas_of_lost_bases()

    def _lose_deltas_of_lost_bases(self) -> None:
        """A delta chunk whose base is lost or not in the index cannot be read either."""
        changed = True
        while changed:
            changed = False
            for chunk_id, rec in self.index.items():
                if rec.base is None or chunk_id in self.lost:
                    continue
                if rec.base in self.lost or rec.base not in self.index:
                    why = "is lost" if rec.base in self.lost else "is not in the chunk index"
                    self.lost[chunk_id] = _Lost("chunk-base-lost", f"is stored as a delta of chunk "
                                                f"{_short(rec.base)}, which {why}")
                    changed = True

    def _scan_pack(self, pack_no: int, size: int, seen: set[bytes], done: int) -> None:
        expected = self.by_pack.get(pack_no, {})
        end = PACK_HEADER.size if size >= PACK_HEADER.size else size
        failure = None
        try:
            for record in self.reader.scan(pack_no):
                loc = record.location
                end = loc.offset + loc.stored_len
                chunk_id = expected.get(loc.offset)
                if chunk_id is not None:
                    seen.add(chunk_id)
                    self._check_record(chunk_id, self.index[chunk_id], record.chunk_id, record.codec,
                                       record.raw_len, loc.stored_len)
                    self.progress.update(done + end)
                    if chunk_id == record.chunk_id:
                        continue
                self.report.unreferenced_bytes += RECORD_HEADER.size + loc.stored_len
                self.spares[record.chunk_id].append(record)
        except NotFound:
            return          # removed since it was listed (GC); its chunks are checked one by one
        except (Corrupt, OSError, struct.error) as exc:
            failure = str(exc)
        if failure is None and size <= end:
            return
        tail = size - end
        self.report.unreferenced_bytes += tail
        in_use = sorted(off for off in expected if off >= end)
        if failure is None:
            self.problem("pack-torn-tail", f"pack {pack_no} ends with {tail} bytes of an incomplete record (a "
                         "write cut short by a crash, or still under way); no chunk in use is there", INFO, pack=pack_no, bytes=tail)
        elif not in_use:
            self.problem("pack-torn-tail", f"pack {pack_no} has {tail} unreadable bytes at its end ({failure}); "
                         "no chunk in use is there", INFO, pack=pack_no, bytes=tail)
        else:
            self.problem("pack-damaged", f"pack {pack_no} is damaged from offset {end} on ({failure}); "
                         f"{len(in_use)} chunk(s) in use lie there", pack=pack_no, offset=end)

    def _check_record(self, chunk_id: bytes, rec: ChunkRecord, header_id: bytes, codec_id: int, raw_len: int,
                      stored_len: int) -> None:
        """The pack record header found at an index entry's location must be
        the entry's; then its payload must decode to its hash."""
        if header_id != chunk_id:
            self.lost[chunk_id] = _Lost("chunk-corrupt", f"is not where the index says (pack {rec.pack_no} at "
                                        f"{rec.offset} holds a record of another chunk)")
        elif (codec_id, raw_len, stored_len) != (rec.codec, rec.raw_len, rec.stored_len):
            self.lost[chunk_id] = _Lost("chunk-corrupt", "has a pack record whose codec or lengths disagree "
                                        "with the index")
        else:
            self._verify_payload(chunk_id, rec)

    def _verify_payload(self, chunk_id: bytes, rec: ChunkRecord) -> None:
        try:
            self.chunks.read_record(chunk_id, rec, verify=True)
        except DeltaBaseLost as exc:
            self.lost[chunk_id] = _Lost("chunk-base-lost", _reason(exc, chunk_id))
            return
        except Corrupt as exc:
            kind = "chunk-missing" if "truncated" in str(exc) or "missing" in str(exc) else "chunk-corrupt"
            self.lost[chunk_id] = _Lost(kind, _reason(exc, chunk_id))
            return
        except OSError as exc:
            self.lost[chunk_id] = _Lost("chunk-missing", f"cannot be read: {exc}")
            return
        self.report.bytes_checked += rec.stored_len

    # -- 3. contents and chunk refcounts ---------------------------------------------

    def _check_contents(self) -> None:
        self.progress.start("contents", self._entries("contents"))
        for n, (key, value) in enumerate(self.items("contents"), 1):
            self._check_content(bytes(key), value)
            self.progress.update(n)
        self.report.contents = len(self.content_refcounts) + len(self.bad_contents)
        self.progress.finish()

    def _check_content(self, content_id: bytes, raw: bytes) -> None:
        short = _short(content_id)
        try:
            rec = ContentRecord.decode(raw, content_id)
        except Corrupt:
            self.bad_contents.add(content_id)
            self.problem("content-corrupt", f"the record of content {short} is damaged: the file versions "
                         "with this content cannot be read", content=to_hex(content_id))
            return
        self.content_refcounts[content_id] = rec.refcount
        if rec.is_tree:
            for key in {e[0] for e in rec.root}:
                self.node_uses[key] += 1          # held even when the tree below is damaged
            extents = self._tree_extents(content_id, rec)
            if extents is None:
                return
        else:
            extents = [(rec.ids[i * ID_SIZE:(i + 1) * ID_SIZE], n) for i, n in enumerate(rec.lengths)]
            for chunk_id in _distinct_ids(rec):
                self.chunk_uses[chunk_id] += 1
        total = sum(e[1] for e in extents)
        if total != rec.size:
            self.problem("content-size", f"content {short} says it has {rec.size} bytes but its extents add "
                         f"up to {total}", content=to_hex(content_id))
        if rec.v4:
            root = rec.root if rec.is_tree else [(e[0], e[1], 1) for e in extents]
            if content_id != chunk_tree.content_hash(rec.size, rec.height, root):
                self.problem("content-id", f"content {short} is stored under an id that is not its tree hash",
                             WARNING, content=to_hex(content_id))
        elif rec.hash is not None and rec.hash != content_id and content_id != _sparse_id(rec):
            self.problem("content-id", f"content {short} is stored under an id that is not its hash "
                         f"{_short(rec.hash)}", WARNING, content=to_hex(content_id))
        for chunk_id, length in extents:
            if chunk_id == HOLE_ID:
                continue
            chunk = self.index.get(chunk_id)
            if chunk is not None and chunk.raw_len != length:
                self.problem("content-extent", f"content {short} uses {length} bytes of chunk "
                             f"{_short(chunk_id)}, which has {chunk.raw_len}", content=to_hex(content_id),
                             chunk=to_hex(chunk_id))
        for chunk_id in {e[0] for e in extents} - {HOLE_ID}:
            if chunk_id not in self.index:
                if chunk_id not in self.lost:
                    how = "has a damaged index entry" if chunk_id in self.bad_index else "is not in the chunk index"
                    self.lost[chunk_id] = _Lost("chunk-missing", how)
                self.lost_users[chunk_id].append(content_id)
            elif chunk_id in self.lost:
                self.lost_users[chunk_id].append(content_id)

    def _count_delta_uses(self) -> Counter[bytes]:
        """Uses of delta bases: one per delta chunk in use (by a content, or
        as the base of a delta in use), cascading down each chain; added to
        :attr:`chunk_uses`."""
        held: Counter[bytes] = Counter()
        live = [c for c, rec in self.index.items() if rec.base is not None and self.chunk_uses.get(c, 0) > 0]
        while live:
            base = self.index[live.pop()].base
            held[base] += 1
            rec = self.index.get(base)
            if held[base] == 1 and not self.chunk_uses.get(base) and rec is not None and rec.base is not None:
                live.append(base)             # a base used only by deltas is in use: its own base is too
        self.chunk_uses.update(held)
        return held

    def _check_chunk_refcounts(self) -> None:
        try:                              # references a GC sweep took from deleted contents, not yet given back
            self.chunk_uses.update(pending_drops(self.txn, self.dbs))
        except Corrupt as exc:
            self.problem("gc-drops-corrupt", f"the record of chunk references a gc still owes is damaged ({exc}); "
                         "chunk refcounts may be reported wrong", error=str(exc))
        held = self._count_delta_uses()
        unused = unused_bytes = 0
        for chunk_id, rec in self.index.items():
            uses = self.chunk_uses.get(chunk_id, 0)
            if rec.refcount != uses:
                by = f"{uses - held[chunk_id]} content(s) and {held[chunk_id]} delta chunk(s)" if held[chunk_id] \
                    else f"{uses} content(s)"
                p = self.problem("chunk-refcount", f"chunk {_short(chunk_id)} has refcount {rec.refcount} but "
                                 f"{by} use it", chunk=to_hex(chunk_id), stored=rec.refcount,
                                 counted=uses)
                self._chunk_fix(chunk_id).problems.append(p)
            if uses == 0:
                unused += 1
                unused_bytes += rec.stored_len
        for chunk_id, p in self.bad_index_problems.items():
            if not self.chunk_uses.get(chunk_id):
                p.severity = WARNING
                p.message += "; no file uses it"
        if unused:
            self.problem("chunk-unused", f"{unused} chunk(s) ({unused_bytes} bytes) are used by no file "
                         "version; GC will free them", INFO, chunks=unused, bytes=unused_bytes)

    def _chunk_fix(self, chunk_id: bytes) -> _ChunkFix:
        fix = self.chunk_fixes.get(chunk_id)
        if fix is None:
            rec = self.index.get(chunk_id)
            snapshot = rec.encode() if rec is not None else self.bad_index.get(chunk_id)
            fix = self.chunk_fixes[chunk_id] = _ChunkFix(snapshot, self.chunk_uses.get(chunk_id, 0))
        return fix

    # -- 4. inodes and content refcounts ---------------------------------------------

    def _verify_contents(self) -> None:
        self.progress.start("verify-contents", self._entries("contents"))
        lost = set(self.lost)
        damaged = {c for users in self.lost_users.values() for c in users}
        for n, (key, value) in enumerate(self.items("contents"), 1):
            self.progress.update(n)
            content_id = bytes(key)
            if content_id in self.bad_contents:
                continue
            rec = ContentRecord.decode(value, content_id)
            if rec.v4:
                # the tree hash was checked against the nodes in _check_content, and every chunk's
                # bytes against its id (the pack check): the content's bytes are verified
                if content_id not in damaged:
                    self.report.content_bytes_checked += rec.size
                continue
            if rec.hash is None or any(c in lost for c in _distinct_ids(rec)):
                continue        # not hashed yet / its damaged chunks are reported already
            hasher = new_hasher()
            try:
                for i, length in enumerate(rec.lengths):
                    chunk_id = rec.chunk_id(i)
                    if chunk_id == HOLE_ID:
                        for start in range(0, length, len(_ZEROS)):
                            hasher.update(memoryview(_ZEROS)[:min(len(_ZEROS), length - start)])
                    else:
                        hasher.update(memoryview(self.chunks.get(chunk_id, self.txn))[:length])
            except Corrupt as exc:
                self.problem("content-hash", f"content {_short(content_id)} cannot be read: {exc}",
                             content=to_hex(content_id))
                continue
            self.report.content_bytes_checked += rec.size
            if hasher.digest() != rec.hash:
                self.problem("content-hash", f"content {_short(content_id)} does not match its hash: its "
                             "extent list is damaged", content=to_hex(content_id))
        self.progress.finish()

    # -- reporting lost chunks and orphans ------------------------------------------------

    def _report_lost_chunks(self) -> None:
        for chunk_id, lost in sorted(self.lost.items()):
            users = self.lost_users.get(chunk_id, [])
            rec = self.index.get(chunk_id)
            where = f" (pack {rec.pack_no} at {rec.offset})" if rec is not None else ""
            files = self._file_versions([p for c in users for p in self.affected_paths.get(c, [])])
            details = {"chunk": to_hex(chunk_id), "contents": [to_hex(c) for c in users[:_NAMED_IN_DETAILS]],
                       "files": files}
            if rec is not None:
                details.update(pack=rec.pack_no, offset=rec.offset)
            if not users:
                lost.problem = self.problem(lost.kind, f"chunk {_short(chunk_id)}{where} {lost.reason}; no file "
                                            "uses it", WARNING, **details)
            else:
                named = _name_files(files) or "content(s) " + ", ".join(_short(c) for c in users[:_NAMED_IN_MESSAGE])
                lost.problem = self.problem(lost.kind, f"chunk {_short(chunk_id)}{where} {lost.reason}; it holds "
                                            f"data of {named}", **details)
            fix = self._chunk_fix(chunk_id)
            fix.problems.append(lost.problem)
            if chunk_id in self.bad_index_problems:
                fix.problems.append(self.bad_index_problems[chunk_id])

    def _report_orphans(self) -> None:
        by_ws: dict[int, list[str]] = defaultdict(list)
        for (db, ws), count in sorted(self.orphans.items()):
            by_ws[ws].append(f"{count} in {db}")
        for ws, parts in by_ws.items():
            self.problem("orphan-records", f"records of workspace id {ws}, which does not exist: "
                         f"{', '.join(parts)}", WARNING, workspace_id=ws)

    # -- repair ------------------------------------------------------------------------------

    def _repair(self) -> None:
        self.progress.start("repair", len(self.lost) + len(self.chunk_fixes) + len(self.content_fixes))
        for chunk_id, lost in self.lost.items():
            spare = self._good_spare(chunk_id)
            if spare is not None:
                self._chunk_fix(chunk_id).location = spare
        done: list[tuple[Problem, str]] = []
        with self.store.env.begin(write=True) as txn:
            for chunk_id, fix in self.chunk_fixes.items():
                done.extend(self._apply_chunk_fix(txn, chunk_id, fix))
            for content_id, (snapshot, refcount, p) in self.content_fixes.items():
                raw = txn.get(content_id, db=self.dbs["contents"])
                if raw is not None and bytes(raw) == snapshot:
                    txn.put(content_id, schema.content_with_refcount(snapshot, refcount), db=self.dbs["contents"])
                    done.append((p, f"refcount set to {refcount}"))
            for p, fix_fn in self.other_fixes:
                if fix_fn(txn):
                    done.append((p, "restored"))
        for p, note in done:
            p.repaired = True
            p.message += f" [repaired: {note}]"
        for lost in self.lost.values():
            if lost.problem is not None and not lost.problem.repaired and lost.problem.severity == ERROR:
                lost.problem.message += " [not repaired: no good copy in any pack; this data is lost]"
        self.store.sync()
        if self.damage_problems:
            self._rebuild_metadata()
        self.progress.finish()

    def _rebuild_metadata(self) -> None:
        """Damage LMDB reported though the page walk found none (``fsck``
        reads a file no one writes, so this is rare): the same rebuild."""
        walk = scan(self.store.meta_dir)
        try:
            work = self.store.meta_dir / f"check-{os.getpid()}"
            built = build(walk, work, self.store.env.info()["map_size"], self.store.modes.file_mode)
        finally:
            walk.close()
        backup = swap_in(self.store.meta_dir, work)
        for p in self.damage_problems:
            p.repaired = True
            p.message += (f" [repaired: the unreadable records were dropped, {sum(built.copied.values())} readable "
                          f"ones copied into a new metadata file (the damaged one is kept at {backup}); "
                          f"{built.summary()}]")
        self.report.metadata_rebuilt = str(backup)
        self.report.metadata_lost = built.lost
        self.report.metadata_derived = built.derived

    def _good_spare(self, chunk_id: bytes) -> PackRecord | None:
        for spare in self.spares.get(chunk_id, []):
            if spare.codec == CODEC_DELTA:
                continue                # a delta copy would need its base checked too: only plain copies serve
            loc = spare.location
            rec = ChunkRecord(loc.pack_no, loc.offset, loc.stored_len, spare.raw_len, spare.codec, 0)
            try:
                self.chunks.read_record(chunk_id, rec, verify=True)
            except (Corrupt, OSError):
                continue
            return spare
        return None

    def _apply_chunk_fix(self, txn: lmdb.Transaction, chunk_id: bytes,
                         fix: _ChunkFix) -> list[tuple[Problem, str]]:
        """Write one chunk index entry; returns the problems it repaired, each with a note."""
        db = self.dbs["chunks"]
        current = txn.get(chunk_id, db=db)
        if (bytes(current) if current is not None else None) != fix.snapshot:
            return []                   # changed since the check: leave it to the next fsck
        if fix.location is not None:
            loc = fix.location.location
            new = ChunkRecord(loc.pack_no, loc.offset, loc.stored_len, fix.location.raw_len, fix.location.codec,
                              fix.refcount)
            txn.put(chunk_id, new.encode(), db=db)
            note = f"the index now points at a good copy in pack {loc.pack_no} at {loc.offset}"
            return [(p, note) for p in fix.problems]
        old = self.index.get(chunk_id)
        if old is None or old.refcount == fix.refcount:
            return []                   # nothing good to point at, nothing to count
        new = ChunkRecord(old.pack_no, old.offset, old.stored_len, old.raw_len, old.codec, fix.refcount, old.base)
        txn.put(chunk_id, new.encode(), db=db)
        return [(p, f"refcount set to {fix.refcount}") for p in fix.problems if p.kind == "chunk-refcount"]


def _sparse_id(rec: ContentRecord) -> bytes:
    """The id ``content.build_content`` gives a content too sparse to hash
    at commit time (its hash may be filled in later)."""
    return hash_bytes(b"chronicle-sparse:" + rec.ids + rec.lengths.tobytes())
