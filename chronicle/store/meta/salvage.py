"""Salvaging damaged metadata: a fresh LMDB file of every readable record,
with what the lost records said derived again from the records that hold
the same facts.

LMDB cannot rewrite a damaged page in place, ``mdb_env_copy`` stops at
damage, and some damage aborts LMDB itself (``meta.pages``), so
:func:`scan` reads the file by hand (``meta.pages.PageWalk``) and
:func:`build` copies every readable record into a fresh file, deriving what
it can of the records on the damaged pages — the journal writes each fact
twice (``chronicle.store.meta.journal``):

- **dirents** (the head tables) from ``dirent_hist``: a name's newest
  history record *is* its head entry (a fork's removal is a whiteout);
- **dirent_hist** from ``dirents``: a head entry with no history record
  gets one at the seq its inode arrived at that path (the path history's
  arrival entry, else the inode's first record), so past trees and forks
  see it again;
- **inodes**: an inode a head entry names that has no record left gets one
  from its path history (content, size, the time of its last entry; mode
  0644/0755 and the parent directory's owner — the record that said them is
  lost), so the file keeps its name and content; one whose newest records
  were lost and whose older record shows an older content than its path
  history's last gets a record of that last content;
- **workspaces**: a workspace that is no fork, from its id (``ws_ids``)
  and its root inode (its one record at seq 0);
- **contents** of one chunk: a lost content record whose id is a chunk's id
  is that chunk alone (both are the BLAKE3 of the same bytes); a file of
  more chunks is lost with its record (their order is nowhere else).

Then it names what is still lost: every path the history says exists at the
head but the rebuilt tree does not reach (``lost_paths``), with its
workspace. Counters: records copied, records lost (LMDB's entry count of the
old database minus those copied), records derived.

**When.** LMDB must never read a damaged page (some of its checks abort the
process: ``meta.pages``). So ``Store.open``, when no other process has the
store open, reads the file by hand first (:func:`verify_or_salvage`; skipped
while the file is the one last found sound — found by that check, or left by
the last process to close the store cleanly, :func:`trust_after_close`:
what LMDB itself wrote since a sound open is trusted, so only a crash or a
change from outside LMDB costs a scan) and, if a page is damaged,
swaps in the salvaged copy (:func:`swap_in`, atomic: the damaged file is
kept as ``meta/backup/data.mdb.damaged-<time>``, and the sync records (``synced.rec``), a
meta page of the old file, is removed), recording the damaged ranges and
what was lost in ``meta/salvaged.json``: lookups of names in those ranges
answer EIO (``meta.tree``), and ``chronicle fsck`` reports it, until
``fsck --repair`` acknowledges it. ``fsck`` of a store another process has
open checks such a copy instead of the file (``fsck.rebuild.SoundCopy``),
and ``--repair`` swaps it in. Refcounts of contents named by derived inode
records are set by the next fsck pass.

**Cost**: the check reads every page of the metadata in Python, once per
change of the file: 0.5 s for a store of 20,000 files (36 MiB of pages in use).

Threads: one thread, on a store no other process has open.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from chronicle.errors import ChronicleError
from chronicle.store import model
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.chunks.tree import content_hash
from chronicle.store.meta import schema
from chronicle.store.meta.damaged import DamagedRange
from chronicle.store.meta.journal import iso_time, parse_iso_time, path_text
from chronicle.store.meta.pages import PageWalk
from chronicle.store.meta.recovery import forget_synced
from chronicle.store.meta.schema import (P_ARRIVED, P_CONTENT, P_GONE, ChunkRecord, ContentRecord, PathEntry,
                                         WorkspaceRecord)
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import Attrs

log = logging.getLogger(__name__)

_NAMED = 1000           # lost paths listed


@dataclass
class Rebuilt:
    """What :func:`rebuild` did: ``backup`` (the damaged file kept),
    ``copied``/``lost``/``derived`` (``{database: records}``), the damaged
    ``ranges`` it read past, and ``lost_paths``: ``[(workspace, path)]`` of
    head paths the rebuilt tree no longer reaches."""

    backup: Path
    copied: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    derived: dict[str, int] = field(default_factory=dict)
    ranges: list[DamagedRange] = field(default_factory=list)
    lost_paths: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was lost and what was derived again."""
        lost = ", ".join(f"{n} {db}" for db, n in sorted(self.lost.items()) if n) or "none counted"
        derived = ", ".join(f"{n} {db}" for db, n in sorted(self.derived.items()) if n) or "none"
        names = (f"; {len(self.lost_paths)} path(s) of the head tree are no longer reached: "
                 + ", ".join(f"{ws}:{p}" for ws, p in self.lost_paths[:5])
                 + (f" and {len(self.lost_paths) - 5} more" if len(self.lost_paths) > 5 else "")
                 if self.lost_paths else "; every path of the head tree is reached")
        return f"records lost: {lost}; derived again from their other records: {derived}{names}"


def scan(meta_dir: Path, names: tuple[str, ...] = schema.DATABASES) -> PageWalk:
    """Read every record of databases ``names`` of ``meta_dir/data.mdb`` by
    hand (``meta.pages.PageWalk``); the walk's ``damaged`` lists what could
    not be read. The caller closes the walk. Raises ``OSError``."""
    walk = PageWalk(meta_dir / "data.mdb")
    for name in names:
        for _record in walk.items(name):
            pass
    return walk


def build(walk: PageWalk, work: Path, map_size: int, mode: int = 0o600,
          names: tuple[str, ...] = schema.DATABASES) -> Rebuilt:
    """Write every readable record of databases ``names`` (read by
    ``walk``) into a fresh LMDB environment in directory ``work`` (made
    empty first), with what the damaged ones said derived again (module
    docstring); its file mode is ``mode``. Returns what was done (its
    ``backup`` is set by :func:`swap_in`). Raises ``OSError``, ``lmdb.Error``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    result = Rebuilt(work)
    walk.damaged.clear()
    stored = walk.databases()
    fresh = lmdb.open(str(work), map_size=map_size, max_dbs=len(names) + 2, sync=False, mode=mode)
    try:
        new_dbs = {name: fresh.open_db(name.encode()) for name in names}
        for name in names:
            n = 0
            with fresh.begin(write=True) as txn:
                for key, value in walk.items(name):
                    txn.put(key, value, db=new_dbs[name])
                    n += 1
            result.copied[name] = n
            entries = stored[name.encode()][6] if name.encode() in stored else 0
            result.lost[name] = max(entries - n, 0)
        result.ranges = list(walk.damaged)
        with fresh.begin(write=True) as txn:
            _Deriver(txn, new_dbs, result).run()
        fresh.sync(True)
    finally:
        fresh.close()
    return result


def swap_in(meta_dir: Path, work: Path) -> Path:
    """Put the data file built in ``work`` in place of ``meta_dir/data.mdb``
    atomically (``os.replace``); the old one is kept as
    ``meta_dir/backup/data.mdb.damaged-<time>`` and returned; the sync records
    (a meta page of the old file) and ``work`` are removed. No process may
    have the store open. Raises ``OSError``."""
    backup_dir = meta_dir / "backup"
    backup_dir.mkdir(exist_ok=True)
    backup = backup_dir / f"data.mdb.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    os.link(meta_dir / "data.mdb", backup)
    os.replace(work / "data.mdb", meta_dir / "data.mdb")     # atomic: the old file or the new one
    forget_synced(meta_dir)
    shutil.rmtree(work, ignore_errors=True)
    fd = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return backup


def _hist_range(rng: DamagedRange) -> tuple[bytes, bytes | None]:
    """The ``dirent_hist`` keys of the head entries in damaged ``dirents`` range ``rng``."""
    lo = rng.after + b"\x01" if rng.after else b""
    return lo, (rng.before + b"\x00" if rng.before else None)


def _in(key: bytes, rng: DamagedRange) -> bool:
    return (rng.after is None or key > rng.after) and (rng.before is None or key < rng.before)


class _Deriver:
    """The derivations of :func:`rebuild`, in the fresh file's write transaction ``txn``."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict, result: Rebuilt):
        self.txn, self.dbs, self.result = txn, dbs, result
        self.workspaces: dict[int, WorkspaceRecord] = {}
        with txn.cursor(db=dbs["workspaces"]) as cur:
            for _key, value in cur:
                try:
                    rec = WorkspaceRecord.decode(value)
                except (ValueError, KeyError, TypeError):
                    continue
                self.workspaces[rec.id] = rec
        self.damaged = {db: [r for r in result.ranges if r.db == db] for db in ("dirents", "dirent_hist", "inodes")}

    def count(self, db: str) -> None:
        self.result.derived[db] = self.result.derived.get(db, 0) + 1

    def chain(self, rec: WorkspaceRecord) -> list[tuple[int, int | None]]:
        chain = [(rec.id, rec.fork_seq)]
        while rec.parent_id is not None and rec.parent_id in self.workspaces and len(chain) < 1000:
            rec = self.workspaces[rec.parent_id]
            chain.append((rec.id, rec.fork_seq))
        return chain

    def run(self) -> None:
        if any(r.db == "workspaces" for r in self.result.ranges):
            self.workspace_records()
        if any(r.db == "contents" for r in self.result.ranges):
            self.single_chunk_contents()
        for rng in self.damaged["dirents"]:
            self.dirents_from_history(rng)
        if self.damaged["dirent_hist"] or self.damaged["inodes"] or self.damaged["dirents"]:
            for rec in self.workspaces.values():
                self.walk(rec)
        for rec in self.workspaces.values():
            self.name_lost_paths(rec)

    # -- workspace records from ws_ids and the root inode ----------------------------------

    def workspace_records(self) -> None:
        """A workspace named in ``ws_ids`` whose record was lost gets one
        again if it is no fork: its root is its one inode with a record at
        seq 0 (``Store.create_workspace``), its creation time that record's
        ctime. A fork's parent and fork seq are nowhere else: it stays lost."""
        with self.txn.cursor(db=self.dbs["ws_ids"]) as cur:
            named = {schema.U32.unpack(k)[0]: bytes(v).decode(errors="replace") for k, v in cur if len(k) == 4}
        for ws, name in sorted(named.items()):
            if ws in self.workspaces or self.txn.get(name.encode(), db=self.dbs["workspaces"]) is not None:
                continue
            roots = []
            prefix = schema.ws_key(ws)
            with self.txn.cursor(db=self.dbs["inodes"]) as cur:
                ok = cur.set_range(prefix)
                while ok and cur.key()[:4] == prefix:
                    key = bytes(cur.key())
                    if len(key) == 20 and schema.inode_key_seq(key) == 0:
                        roots.append((schema.U64.unpack(key[4:12])[0], bytes(cur.value())))
                    ok = cur.next()
            if len(roots) != 1:
                continue
            try:
                attrs = Attrs.decode(roots[0][1])
            except ChronicleError:
                continue
            record = WorkspaceRecord(ws, name, roots[0][0], iso_time(attrs.ctime_ns))
            self.txn.put(name.encode(), record.encode(), db=self.dbs["workspaces"])
            self.workspaces[ws] = record
            self.count("workspaces")

    # -- dirents from dirent_hist ------------------------------------------------------

    def dirents_from_history(self, rng: DamagedRange) -> None:
        lo, hi = _hist_range(rng)
        current = None
        with self.txn.cursor(db=self.dbs["dirent_hist"]) as cur:
            ok = cur.set_range(lo)
            while ok:
                key = bytes(cur.key())
                if hi is not None and key >= hi:
                    break
                if len(key) >= 21:
                    head_key = key[:-9]
                    if head_key != current and _in(head_key, rng):
                        current = head_key              # the newest record of this name comes first
                        value = bytes(cur.value())
                        if schema.is_hist_run(value):   # (its own newest record was lost: the run's newest)
                            try:
                                entry = schema.hist_run_versions(value, schema.split_dirent_hist_key(key)[1])[-1][1]
                            except struct.error:
                                entry = None
                            value = schema.encode_dirent(*entry) if entry is not None else b""
                        self._put_head(head_key, value)
                ok = cur.next()

    def _put_head(self, head_key: bytes, value: bytes) -> None:
        ws = schema.U32.unpack(head_key[:4])[0]
        rec = self.workspaces.get(ws)
        if rec is None or (not value and rec.parent_id is None):
            return                   # an unknown workspace's, or a removal (no head entry)
        if self.txn.put(head_key, value, db=self.dbs["dirents"], overwrite=False):
            self.count("dirents")

    # -- dirent_hist and inodes from the head tree and the path history ------------------

    def walk(self, rec: WorkspaceRecord) -> None:
        """Walk ``rec``'s head tree: give each head entry without a history
        record one, and each inode without a record one."""
        view = TreeView(self.dbs, self.chain(rec), rec.root)
        stack = [(rec.root, b"")]
        seen = {rec.root}
        while stack:
            dir_ino, dir_path = stack.pop()
            try:
                dir_attrs = view.attrs(self.txn, dir_ino)
                children = view.entries(self.txn, dir_ino)
            except (ChronicleError, struct.error):
                continue
            for name, ino, kind in children:
                path = dir_path + b"/" + name if dir_path else name
                if self.damaged["dirent_hist"]:
                    self.history_of_entry(rec, view, dir_ino, name, ino, kind, path)
                if self.damaged["inodes"]:
                    self.inode_of_entry(rec, view, ino, kind, path, dir_attrs)
                if kind == model.KIND_DIR and ino not in seen:
                    seen.add(ino)
                    stack.append((ino, path))
            if self.damaged["inodes"]:
                self.gone_inodes(rec, dir_ino, dir_path, {ino for _name, ino, _kind in children}, dir_attrs)

    def gone_inodes(self, rec: WorkspaceRecord, dir_ino: int, dir_path: bytes, here: set[int],
                    dir_attrs: Attrs | None) -> None:
        """The inodes directory ``dir_ino`` named once (its ``dirent_hist``)
        but not at the head, that have no record left at all: records from
        their path history, one per version (past trees show them again)."""
        prefix = schema.dir_prefix(rec.id, dir_ino)
        named: dict[int, tuple[bytes, int]] = {}
        with self.txn.cursor(db=self.dbs["dirent_hist"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:12] == prefix:
                key, value = bytes(cur.key()), bytes(cur.value())
                ok = cur.next()
                if len(key) < 21 or not value:
                    continue
                name, seq = schema.split_dirent_hist_key(key)
                try:
                    versions = schema.hist_run_versions(value, seq)      # (a run: every version it holds)
                except struct.error:
                    continue
                for _seq, entry in versions:
                    if entry is not None and entry[0] not in here:
                        named.setdefault(entry[0], (name, entry[1]))
        for ino, (name, kind) in named.items():
            with self.txn.cursor(db=self.dbs["inodes"]) as cur:
                inode = schema.inode_prefix(rec.id, ino)
                if cur.set_range(inode) and cur.key()[:12] == inode:
                    continue                 # it has records
            path = dir_path + b"/" + name if dir_path else name
            self._versions_of(rec, ino, kind, path, dir_attrs)

    def _versions_of(self, rec: WorkspaceRecord, ino: int, kind: int, path: bytes, owner: Attrs | None) -> None:
        """Records of ``ino`` at each entry of ``path``'s history that names
        it with a content (a file), or at its arrival (a directory, or a
        file with none)."""
        if kind not in (model.KIND_FILE, model.KIND_DIR):
            return
        prefix = schema.path_prefix(rec.id, path)
        entries = []
        with self.txn.cursor(db=self.dbs["paths"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:len(prefix)] == prefix:
                try:
                    entry = PathEntry.decode(cur.value(), cur.key())
                    if entry.ino == ino:
                        entries.append((schema.path_key_seq(cur.key()), entry))
                except (struct.error, ValueError):
                    pass
                ok = cur.next()
        carrying = [(seq, e) for seq, e in entries if e.flags & P_CONTENT] if kind == model.KIND_FILE else []
        arrivals = [(seq, e) for seq, e in entries if e.flags & P_ARRIVED]
        for seq, entry in (carrying or arrivals[:1]):
            self._put_inode(rec, ino, kind, seq, entry, owner)

    def _put_inode(self, rec: WorkspaceRecord, ino: int, kind: int, seq: int, entry: PathEntry,
                   parent: Attrs | None) -> None:
        now = self._time(entry)
        owner = parent or Attrs(stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now)
        if kind == model.KIND_DIR:
            attrs = Attrs(stat.S_IFDIR | 0o755, owner.uid, owner.gid, 2, 0, now, now, now)
        else:
            content = entry.content if entry.flags & P_CONTENT and entry.content else EMPTY_CONTENT_ID
            size = self._size(entry) if content != EMPTY_CONTENT_ID else 0
            attrs = Attrs(stat.S_IFREG | 0o644, owner.uid, owner.gid, 1, size, now, now, now, content=content)
        if self.txn.put(schema.inode_key(rec.id, ino, seq), attrs.encode(), db=self.dbs["inodes"], overwrite=False):
            self.count("inodes")

    def _arrival(self, ws: int, path: bytes, ino: int) -> tuple[int, PathEntry] | None:
        """``(seq, entry)`` of the last entry of ``path`` (own layer) naming
        ``ino`` — the arrival first, else any."""
        found = arrival = None
        prefix = schema.path_prefix(ws, path)
        with self.txn.cursor(db=self.dbs["paths"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:len(prefix)] == prefix:
                try:
                    entry = PathEntry.decode(cur.value(), cur.key())
                except (struct.error, ValueError):
                    ok = cur.next()
                    continue
                seq = schema.path_key_seq(cur.key())
                if entry.ino == ino and (not schema.is_long(path) or entry.path == path):
                    found = (seq, entry)
                    if entry.flags & P_ARRIVED:
                        arrival = (seq, entry)
                    elif entry.flags & P_GONE:
                        arrival = None
                ok = cur.next()
        return arrival or found

    def history_of_entry(self, rec: WorkspaceRecord, view: TreeView, parent: int, name: bytes, ino: int,
                         kind: int, path: bytes) -> None:
        prefix = schema.dirent_hist_prefix(rec.id, parent, name)
        if not any((r.after is None or r.after < prefix + b"\xff" * 8) and (r.before is None or r.before > prefix)
                   for r in self.damaged["dirent_hist"]):
            return                       # none of its history was on a damaged page
        with self.txn.cursor(db=self.dbs["dirent_hist"]) as cur:
            if cur.set_range(prefix) and cur.key()[:len(prefix)] == prefix:
                return                   # it has history left
        raw = self.txn.get(schema.dirent_key(rec.id, parent, name), db=self.dbs["dirents"])
        if not raw:
            return                       # read through from the parent layer
        arrival = self._arrival(rec.id, path, ino)
        seq = arrival[0] if arrival else self._first_inode_seq(rec.id, ino)
        if seq is None:
            return
        self.txn.put(schema.dirent_hist_key(rec.id, parent, name, seq), bytes(raw), db=self.dbs["dirent_hist"])
        self.count("dirent_hist")

    def _first_inode_seq(self, ws: int, ino: int) -> int | None:
        prefix = schema.inode_prefix(ws, ino)
        last = None
        with self.txn.cursor(db=self.dbs["inodes"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:12] == prefix:
                last = schema.inode_key_seq(cur.key())
                ok = cur.next()
        return last

    def inode_of_entry(self, rec: WorkspaceRecord, view: TreeView, ino: int, kind: int, path: bytes,
                       parent_attrs: Attrs | None) -> None:
        """Give ``ino`` (named by a head entry at ``path``) a record if it has
        none, or a newer one if its newest record was lost and an older one
        shows an older content than its path history's last."""
        try:
            found = view.attrs_with_seq(self.txn, ino)
        except ChronicleError:
            found = None                 # a damaged value: replaced below
        last = self._last_entry(rec.id, path, ino) if kind == model.KIND_FILE else None
        if found is not None:
            attrs, seq = found
            if last is None or last[0] <= seq or not attrs.is_file or last[1].content == attrs.content:
                return
            when = self._time(last[1])
            attrs = attrs.replace(content=last[1].content, size=self._size(last[1]), mtime_ns=when, ctime_ns=when)
            self.txn.put(schema.inode_key(rec.id, ino, last[0]), attrs.encode(), db=self.dbs["inodes"])
            self.count("inodes")
            return
        # a symlink's target or a device number is not in the history: only files and directories
        self._versions_of(rec, ino, kind, path, parent_attrs)

    @staticmethod
    def _time(entry: PathEntry) -> int:
        when = _fragment(entry).get("time")
        try:
            return parse_iso_time(when) if isinstance(when, str) else time.time_ns()
        except ValueError:
            return time.time_ns()

    @staticmethod
    def _size(entry: PathEntry) -> int:
        size = _fragment(entry).get("size")
        return size if isinstance(size, int) and size >= 0 else 0

    # -- contents of one chunk ---------------------------------------------------------

    def single_chunk_contents(self) -> None:
        """A lost content record of a file of one chunk is written again
        (refcount 0; the next fsck pass counts it): in format 3 its id is the
        chunk's id (both the BLAKE3 of the same bytes), in format 4 the tree
        hash of that one extent (every chunk is tried)."""
        wanted: set[bytes] = set()
        with self.txn.cursor(db=self.dbs["inodes"]) as cur:
            for _key, value in cur:
                try:
                    content = Attrs.decode(value).content
                except ChronicleError:
                    continue
                if content:
                    wanted.add(content)
        with self.txn.cursor(db=self.dbs["paths"]) as cur:
            for key, value in cur:
                try:
                    entry = PathEntry.decode(value, key)
                except (struct.error, ValueError):
                    continue
                if entry.flags & P_CONTENT and entry.content:
                    wanted.add(entry.content)
        missing = {c for c in wanted
                   if c != EMPTY_CONTENT_ID and self.txn.get(c, db=self.dbs["contents"]) is None}
        for content_id in sorted(missing):
            raw = self.txn.get(content_id, db=self.dbs["chunks"])
            if raw is None:
                continue
            try:
                chunk = ChunkRecord.decode(raw)
            except ChronicleError:
                continue
            # format 3: a one-chunk file's id was the BLAKE3 of its bytes, its chunk's id
            record = ContentRecord(chunk.raw_len, content_id, content_id, array("Q", [chunk.raw_len]))
            self.txn.put(content_id, record.encode(content_id), db=self.dbs["contents"])
            missing.discard(content_id)
            self.count("contents")
        if not missing:
            return
        # format 4: a one-chunk file's id is the tree hash of that one extent (``chunks.tree``)
        with self.txn.cursor(db=self.dbs["chunks"]) as cur:
            for key, raw in cur:
                try:
                    chunk = ChunkRecord.decode(raw)
                except ChronicleError:
                    continue
                extent = [(bytes(key), chunk.raw_len, 1)]
                content_id = content_hash(chunk.raw_len, 0, extent)
                if content_id in missing:
                    record = schema.flat_record(chunk.raw_len, content_id, extent)
                    record.v4 = True
                    self.txn.put(content_id, record.encode(content_id), db=self.dbs["contents"])
                    missing.discard(content_id)
                    self.count("contents")

    def _last_entry(self, ws: int, path: bytes, ino: int) -> tuple[int, PathEntry] | None:
        """The newest entry of ``path`` naming ``ino`` with a content."""
        best = None
        prefix = schema.path_prefix(ws, path)
        with self.txn.cursor(db=self.dbs["paths"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:len(prefix)] == prefix:
                try:
                    entry = PathEntry.decode(cur.value(), cur.key())
                    if entry.ino == ino and entry.flags & P_CONTENT:
                        best = (schema.path_key_seq(cur.key()), entry)
                except (struct.error, ValueError):
                    pass
                ok = cur.next()
        return best

    # -- what is still lost ------------------------------------------------------------------

    def name_lost_paths(self, rec: WorkspaceRecord) -> None:
        """Every path whose own history (``paths``, the workspace's layer)
        ends with it there (its last entry is no removal) that the rebuilt
        head tree does not reach with that inode."""
        view = TreeView(self.dbs, self.chain(rec), rec.root)
        prefix = schema.ws_key(rec.id)
        last: tuple[bytes, bytes, bytes] | None = None  # (path key, value, key) of the ident read last
        with self.txn.cursor(db=self.dbs["paths"]) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key()[:4] == prefix:
                key = bytes(cur.key())
                ident = schema.path_key_ident(key)
                if last is not None and last[0] != ident:
                    self._check_reached(rec, view, *last)
                last = (ident, bytes(cur.value()), key)
                ok = cur.next()
        if last is not None:
            self._check_reached(rec, view, *last)

    def _check_reached(self, rec: WorkspaceRecord, view: TreeView, ident: bytes, raw: bytes, key: bytes) -> None:
        try:
            entry = PathEntry.decode(raw, key)
        except (struct.error, ValueError):
            return
        if entry.flags & P_GONE or len(self.result.lost_paths) >= _NAMED:
            return
        path = entry.path if schema.ident_is_long(ident) else ident
        try:
            ino, _kind = view.resolve(self.txn, path)
        except (ChronicleError, struct.error):
            ino = None
        if ino != entry.ino:
            self.result.lost_paths.append((rec.name, path_text(path)))


def _fragment(entry: PathEntry) -> dict:
    try:
        obj = json.loads(b'{"version": 0, ' + entry.fragment)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}



# -- salvaging at open -----------------------------------------------------------------

VERIFIED_FILE = "verified.json"
SALVAGED_FILE = "salvaged.json"


def _file_state(data_file: Path) -> dict:
    st = os.stat(data_file)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def is_verified(meta_dir: Path) -> bool:
    """True if ``meta_dir/data.mdb`` is the file ``verified.json`` names (last found sound)."""
    try:
        return json.loads((meta_dir / VERIFIED_FILE).read_text()) == _file_state(meta_dir / "data.mdb")
    except (OSError, ValueError):
        return False


def is_new(meta_dir: Path) -> bool:
    """True if ``meta_dir`` holds no metadata file yet, or one too small to hold a record (a new store)."""
    try:
        return (meta_dir / "data.mdb").stat().st_size < 2 * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return True


def trust_after_close(meta_dir: Path, modes) -> None:
    """Record ``meta_dir/data.mdb`` as sound (``verified.json``) after the
    last process using the store closed it cleanly: the file is then what
    LMDB wrote since an open that found it sound, and the next open need not
    read it by hand (:func:`verify_or_salvage`; a scan costs about 1 s per
    70 MiB of metadata). Call with the environment closed and no other
    process using the store. Raises ``OSError`` from the disk."""
    data = meta_dir / "data.mdb"
    if data.exists():
        modes.write_file(meta_dir / VERIFIED_FILE, json.dumps(_file_state(data)).encode())


def verify_or_salvage(meta_dir: Path, modes, map_size: int) -> Rebuilt | None:
    """Before LMDB opens ``meta_dir/data.mdb``: read it by hand (:func:`scan`)
    unless it is the file last found sound (``verified.json``: size, mtime,
    inode); if a page is damaged, put a salvaged copy (:func:`build`) in its
    place (:func:`swap_in`: the damaged file is kept), record what was lost
    in ``salvaged.json`` (read by :func:`salvage_note`, reported by fsck
    until ``fsck --repair`` acknowledges it) and log a WARNING. ``modes``:
    the store's (``chronicle.store.modes.StoreModes``). Call with no other
    process using the store. Returns what the salvage did, or None. Raises
    ``OSError``/``lmdb.Error`` from the disk."""
    data = meta_dir / "data.mdb"
    if is_new(meta_dir):
        return None
    try:
        if json.loads((meta_dir / VERIFIED_FILE).read_text()) == _file_state(data):
            return None
    except (OSError, ValueError):
        pass
    walk = scan(meta_dir)
    try:
        if walk.meta_problem or not walk.damaged:
            if not walk.meta_problem:
                modes.write_file(meta_dir / VERIFIED_FILE, json.dumps(_file_state(data)).encode())
            return None
        built = build(walk, meta_dir / "salvage", map_size, modes.file_mode)
    finally:
        walk.close()
    kept = swap_in(meta_dir, meta_dir / "salvage")
    built.backup = kept
    note = salvage_note(meta_dir) or {"salvages": []}
    note["salvages"].append({
        "time": iso_time(time.time_ns()), "damaged_file": str(kept), "summary": built.summary(),
        "lost": built.lost, "derived": built.derived,
        "lost_paths": [{"workspace": ws, "path": p} for ws, p in built.lost_paths],
        "ranges": [{"db": r.db, "after": r.after.hex() if r.after is not None else None,
                    "before": r.before.hex() if r.before is not None else None, "error": r.error}
                   for r in built.ranges]})
    modes.write_file(meta_dir / SALVAGED_FILE, json.dumps(note).encode())
    modes.write_file(meta_dir / VERIFIED_FILE, json.dumps(_file_state(data)).encode())
    log.warning("the store's metadata had damaged pages (%s); LMDB must not read them, so a salvaged copy of every "
                "readable record is in use: %s; the damaged file is kept at %s (chronicle fsck reports this until "
                "chronicle fsck --repair acknowledges it)", "; ".join(r.describe() for r in built.ranges[:3]),
                built.summary(), kept)
    return built


def salvage_note(meta_dir: Path) -> dict | None:
    """``salvaged.json`` (``{"salvages": [...]}``, :func:`verify_or_salvage`), or None."""
    try:
        return json.loads((meta_dir / SALVAGED_FILE).read_text())
    except (OSError, ValueError):
        return None


def damaged_ranges(note: dict | None) -> list[DamagedRange]:
    """The damaged key ranges a salvage note lists (their records are lost
    unless derived again)."""
    out = []
    for salvage in (note or {}).get("salvages", []):
        for r in salvage.get("ranges", []):
            out.append(DamagedRange(r["db"], bytes.fromhex(r["after"]) if r["after"] else None,
                                    bytes.fromhex(r["before"]) if r["before"] else None, r["error"]))
    return out


def acknowledge(meta_dir: Path) -> None:
    """Forget the salvages (``fsck --repair``): lost names answer ENOENT from now on, not EIO."""
    (meta_dir / SALVAGED_FILE).unlink(missing_ok=True)
