"""Unversioned history: GC drops the records of ignored paths nothing needs any more.

An ignored path (``gc.ignore``) is unversioned: it keeps its latest content
only, and ``.chronicle/query`` shows one version. Its records would still
pile up for ever (an ``npm install`` and ``rm -rf node_modules`` leaves a
few thousand inode records, directory entries, path entries and log lines
per round), so GC removes them:

- a **dropped inode** is one of the workspace's own inodes (not inherited
  from a fork's parent) whose every name, in the directory history, is a
  path the workspace's ignore rules match *when GC runs* (a directory as
  ``path/``); that is deleted (its newest record has no link, it has no head
  entries); that no process holds open (``Keep.may_drop``, the leases); and
  whose life — from its oldest record's seq to the seq that deleted it — holds
  no pin (head, snapshot, fork point, kept turn end, an open ``at/`` handle's
  seq). A directory drops only with everything it ever held. All its
  records go in one transaction: its ``inodes`` records (each gives back its
  content reference, as ``prune`` does), the ``dirent_hist`` entries that
  name it, and the removal right after each (a link whose older neighbour
  is not a removal — a fork's parent may show the name — becomes a removal
  instead), its ``paths`` entries (the path's ``path_heads`` record is
  recounted or removed) and its ``receipt_dirs``/``receipt_entries``. No
  tree at any seq shows the name afterwards, so no tree names a missing inode;
- a **dropped line** is a ``.chronicle/log`` line of a namespace event
  (create, write, mkdir, rename, delete...) whose every path is ignored, at
  a seq that is no pin and where no path entry is left (a live ignored
  file's current version keeps its lines, from that version on; its
  superseded ones, whose path entries the journal already replaced, go).
  Each run of consecutive dropped lines becomes one **summary line** at its
  first seq: ``{"seq": a, "time": <a's>, "event": "dropped", "path":
  <the paths' common directory>, "through": b, "events": n, "turn": null,
  "pid": null}`` — the log says where GC dropped what, as the pruned marks
  do, and fsck counts the run's seqs as present.

:func:`plan_workspace` is pure reading, shared by the dry run and GC (the
dry run counts the references :func:`released` gives back); :func:`drop`
applies a plan in batches of ``prune.BATCH_SECONDS``, re-checking each
inode in its transaction (idempotent: a killed GC leaves whole inodes, the
next run finishes). Lines are decided from the log itself, so a run killed
between inodes and lines finishes the lines next time.

Threads: synchronous; each function takes the caller's transaction or opens its own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb
import pathspec

from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID
from chronicle.store.gc.ignore import IgnoreRules
from chronicle.store.gc.prune import BATCH_SECONDS, Keep, release_contents
from chronicle.store.meta import events, schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import PathEntry, PathHead, WorkspaceRecord
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import Attrs, KIND_DIR, inode_content
from chronicle.store.history.paths import History

if TYPE_CHECKING:
    from chronicle.store.store import Store

DROPPED_EVENT = "dropped"         # the summary line's event name (module docstring)
NAMESPACE_EVENTS = frozenset(events.EVENTS) - {"restore"}
_PATH_FIELDS = ("path", "from", "to")
_ENTRY_INO = 1                    # a path entry's inode: the u64 (little-endian) after its flags byte


@dataclass(frozen=True, slots=True)
class Dropped:
    """An inode whose records all go: workspace, inode, the key of its
    newest record (re-checked before dropping) and the seq range of its
    life ``[born, died)``."""

    ws: int
    ino: int
    newest: bytes
    born: int
    died: int


@dataclass(slots=True)
class UnversionedPlan:
    """What GC drops in one workspace: inodes (children before their
    directories) and runs of log lines (:class:`Run`)."""

    ws: int
    parent: bool                                  # the workspace is a fork (reads through to a parent)
    inodes: list[Dropped] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    links: dict[int, list[bytes]] = field(default_factory=dict)       # ino -> its dirent_hist keys
    path_keys: dict[int, list[bytes]] = field(default_factory=dict)   # ino -> its paths keys

    @property
    def lines(self) -> int:
        """Log lines the runs replace (each run keeps its summary line)."""
        return sum(run.new for run in self.runs)


def ignore_spec(store: Store, record: WorkspaceRecord, txn: lmdb.Transaction) -> pathspec.GitIgnoreSpec | None:
    """The workspace's ignore rules as ``txn`` sees its head (``gc.ignore``); None: no patterns."""
    view = TreeView(store.dbs, store.fork_chain(record), record.root, None, env=store.env)
    return IgnoreRules(store, record.id, view, record.root).spec(txn)


def _inherited(txn: lmdb.Transaction, dbs: dict, chain: list[tuple[int, int | None]], ino: int) -> bool:
    for ws, _fork_seq in chain[1:]:
        prefix = schema.inode_prefix(ws, ino)
        with txn.cursor(db=dbs["inodes"]) as cur:
            if cur.set_range(prefix) and cur.key()[:len(prefix)] == prefix:
                return True
    return False


def plan_workspace(store: Store, record: WorkspaceRecord, txn: lmdb.Transaction, keep: Keep,
                   head_seq: int) -> UnversionedPlan:
    """What GC drops in workspace ``record`` now (module docstring), read in
    ``txn``; ``keep``: its pins and the open-file check."""
    dbs = store.dbs
    chain = store.fork_chain(record)
    out = UnversionedPlan(record.id, len(chain) > 1)
    spec = ignore_spec(store, record, txn)
    if spec is None:
        return out
    ws = record.id
    prefix = schema.ws_key(ws)
    links: dict[int, list[tuple[int, bytes, int]]] = {}     # ino -> [(parent, name, kind)]
    link_keys: dict[int, list[bytes]] = {}
    children: dict[int, set[int]] = {}
    with txn.cursor(db=dbs["dirent_hist"]) as cur:
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:4] != prefix:
                    break
                if not value:
                    continue
                parent = schema.U64.unpack_from(key, 4)[0]
                name, first = schema.split_dirent_hist_key(key)
                for seq, entry in schema.hist_run_versions(value, first):    # (a run: each of its versions)
                    if entry is None:
                        continue
                    ino, kind = entry
                    links.setdefault(ino, []).append((parent, bytes(name), kind))
                    link_keys.setdefault(ino, []).append(schema.dirent_hist_key(ws, parent, bytes(name), seq))
                children.setdefault(parent, set()).add(ino)
    paths: dict[int, set[bytes] | None] = {record.root: {b""}}

    def paths_of(ino: int, depth: int = 0) -> set[bytes] | None:
        """Every path ``ino`` had (None: one is not known: an inherited or unreachable directory)."""
        if ino in paths:
            return paths[ino]
        paths[ino] = None                         # (a loop, or a deep chain, reads as unknown)
        if depth > 200 or ino not in links:
            return None
        found: set[bytes] = set()
        for parent, name, _kind in links[ino]:
            above = paths_of(parent, depth + 1)
            if above is None:
                return None
            found.update(p + b"/" + name if p else name for p in above)
        paths[ino] = found
        return found

    pins = keep.pins.get(ws, ())
    verdict: dict[int, Dropped | None] = {}

    def droppable(ino: int) -> Dropped | None:
        if ino in verdict:
            return verdict[ino]
        verdict[ino] = None
        found = paths_of(ino)
        if not found or ino == record.root:
            return None
        is_dir = any(kind == KIND_DIR for _p, _n, kind in links[ino])
        if not all(spec.match_file(os.fsdecode(p + b"/" if is_dir else p)) for p in found):
            return None
        ino_prefix = schema.inode_prefix(ws, ino)
        with txn.cursor(db=dbs["inodes"]) as cur:
            if not cur.set_range(ino_prefix) or cur.key()[:12] != ino_prefix:
                return None
            newest, raw = bytes(cur.key()), bytes(cur.value())
            oldest = newest
            for key, _value in cur:
                if key[:12] != ino_prefix:
                    break
                oldest = bytes(key)
        attrs = Attrs.decode(raw)
        born, died = schema.inode_key_seq(oldest), schema.inode_key_seq(newest)
        if attrs.nlink or died > head_seq or any(born <= p < died for p in pins):
            return None
        if not keep.may_drop(ws, ino, attrs.ctime_ns) or _inherited(txn, dbs, chain, ino):
            return None
        if is_dir:
            head_prefix = schema.dir_prefix(ws, ino)
            with txn.cursor(db=dbs["dirents"]) as cur:
                if cur.set_range(head_prefix) and cur.key()[:12] == head_prefix:
                    return None
            if not all(droppable(child) for child in children.get(ino, ())):
                return None
        verdict[ino] = Dropped(ws, ino, newest, born, died)
        return verdict[ino]

    order: list[Dropped] = []
    placed: set[int] = set()

    def place(item: Dropped) -> None:             # children first
        if item.ino in placed:
            return
        placed.add(item.ino)
        for child in children.get(item.ino, ()):
            d = verdict.get(child)
            if d is not None:
                place(d)
        order.append(item)

    for ino in sorted(links):
        droppable(ino)
    for ino in sorted(links):
        d = verdict.get(ino)
        if d is not None:
            place(d)
    out.inodes = order
    out.links = {d.ino: link_keys[d.ino] for d in order}
    out.runs = _line_runs(store, record, txn, spec, set(pins) | {head_seq}, out, head_seq)
    return out


def _line_runs(store: Store, record: WorkspaceRecord, txn: lmdb.Transaction, spec: pathspec.GitIgnoreSpec,
               pins: set[int], plan: UnversionedPlan, head_seq: int) -> list[Run]:
    """The runs of log lines that go (module docstring): ``(first, last, count, common path)``."""
    dbs = store.dbs
    ws = record.id
    prefix = schema.ws_key(ws)
    dropped = plan.links
    entry_seqs: set[int] = set()                  # seqs where a path entry stays
    with txn.cursor(db=dbs["paths"]) as cur:
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:4] != prefix:
                    break
                ino = int.from_bytes(value[_ENTRY_INO:_ENTRY_INO + 8], "little")
                if ino in dropped:
                    plan.path_keys.setdefault(ino, []).append(bytes(key))
                else:
                    entry_seqs.add(schema.path_key_seq(key))
    runs: list[Run] = []
    run: Run | None = None
    covered = 0
    matched: dict[str, bool] = {}

    def ignored(text: str, is_dir: bool) -> bool:
        k = text + "/" if is_dir else text
        if k not in matched:
            matched[k] = bool(text) and spec.match_file(k)
        return matched[k]

    def close() -> None:
        nonlocal run
        if run is not None and (run.new or run.merged):
            runs.append(run)
        run = None

    with txn.cursor(db=dbs["events"]) as cur:
        if not cur.set_range(schema.event_key(ws, (record.fork_seq or 0) + 1)):
            return runs
        for key, value in cur:
            if key[:4] != prefix:
                break
            seq = schema.event_key_seq(key)
            if seq > head_seq:
                break
            line = events.decode(seq, bytes(value))
            event = line.get("event")
            if event == DROPPED_EVENT and isinstance(line.get("through"), int):
                path = line["path"].encode("utf-8", "surrogateescape")
                if run is not None and run.path is not None and run.last == seq - 1:
                    run.last, run.events = line["through"], run.events + int(line.get("events") or 0)
                    run.path, run.merged = _common(run.path, path), True     # two summaries meet: one
                else:
                    close()
                    run = Run(seq, line["through"], int(line.get("events") or 0), path, line["through"] + 1)
                covered = max(covered, line["through"])     # (a killed GC may have left lines inside it)
                continue
            goes = False
            if event in NAMESPACE_EVENTS and seq not in pins and seq not in entry_seqs:
                is_dir = event in ("mkdir", "rmdir", "rename")
                names = [line[f] for f in _PATH_FIELDS if isinstance(line.get(f), str)]
                goes = bool(names) and all(ignored(n, is_dir) or ignored(n, False) for n in names)
            if not goes:
                close()
                continue
            path = line["path"].encode("utf-8", "surrogateescape")
            if seq <= covered:                        # inside a summary already: only deleted
                if run is not None and run.first < seq <= run.last:
                    run.delete_from = min(run.delete_from, seq)
                else:
                    if run is None or run.path is not None or run.last != seq - 1:
                        close()
                        run = Run(seq, seq, 0, None, seq)
                    run.last = seq
                run.new += 1
            elif run is not None and run.path is not None and run.last == seq - 1:
                run.last, run.events, run.new = seq, run.events + 1, run.new + 1
                run.path = _common(run.path, path)
            else:
                close()
                run = Run(seq, seq, 1, path, seq + 1)
                run.new = 1
        close()
    return runs


@dataclass(slots=True)
class Run:
    """A run of log lines that become (or extend) one summary line: its
    first and last seq, the events it sums up, their common path (None: lines
    left inside an earlier summary, deleted without one), the first seq whose
    line is deleted, lines newly dropped, and whether two summaries merged."""

    first: int
    last: int
    events: int
    path: bytes | None
    delete_from: int
    new: int = 0
    merged: bool = False


def _common(a: bytes, b: bytes) -> bytes:
    """The longest common directory of two paths (component-wise)."""
    out = []
    for x, y in zip(a.split(b"/"), b.split(b"/")):
        if x != y:
            break
        out.append(x)
    return b"/".join(out) if out else a.split(b"/")[0]


def released(txn: lmdb.Transaction, dbs: dict, plan: UnversionedPlan, skip: set[bytes] | None = None,
             into: dict[bytes, int] | None = None) -> dict[bytes, int]:
    """The content references dropping ``plan``'s inodes gives back (content
    id -> count), added to ``into``; records in ``skip`` (inode keys an
    earlier step rewrote) give none."""
    out = {} if into is None else into
    for item in plan.inodes:
        for _key, content in _records(txn, dbs, item, skip):
            if content is not None:
                out[content] = out.get(content, 0) + 1
    return out


def _records(txn: lmdb.Transaction, dbs: dict, item: Dropped,
             skip: set[bytes] | None = None) -> list[tuple[bytes, bytes | None]]:
    """``(key, content id that holds a reference or None)`` of each of ``item``'s records."""
    prefix = schema.inode_prefix(item.ws, item.ino)
    out = []
    with txn.cursor(db=dbs["inodes"]) as cur:
        if cur.set_range(prefix):
            for key, raw in cur:
                if key[:12] != prefix:
                    break
                content = inode_content(raw) or None
                if content in (EMPTY_CONTENT_ID, PRUNED_ID) or (skip is not None and bytes(key) in skip):
                    content = None
                out.append((bytes(key), content))
    return out


def _still_droppable(txn: lmdb.Transaction, dbs: dict, item: Dropped, keep: Keep) -> bool:
    prefix = schema.inode_prefix(item.ws, item.ino)
    with txn.cursor(db=dbs["inodes"]) as cur:
        if not cur.set_range(prefix) or bytes(cur.key()) != item.newest:
            return False
        attrs = Attrs.decode(cur.value())
    pins = keep.pins.get(item.ws, ())
    return (not attrs.nlink and not any(item.born <= p < item.died for p in pins)
            and keep.may_drop(item.ws, item.ino, attrs.ctime_ns))


def drop(store: Store, plans: list[UnversionedPlan], keep_of: Callable[[], Keep]) -> dict:
    """Apply ``plans`` (module docstring) in short write transactions.
    Returns ``{"inodes", "records", "lines"}``: inodes dropped, their
    inode records deleted, log lines replaced by summaries."""
    dbs = store.dbs
    out = {"inodes": 0, "records": 0, "lines": 0}
    for plan in plans:
        heads: set[bytes] = set()
        i = 0
        while i < len(plan.inodes):
            keep = keep_of()
            freed: dict[bytes, int] = {}
            with store.env.begin(write=True) as txn:
                start = time.monotonic()
                while i < len(plan.inodes) and time.monotonic() - start < BATCH_SECONDS:
                    item = plan.inodes[i]
                    i += 1
                    if not _still_droppable(txn, dbs, item, keep):
                        continue
                    out["records"] += _drop_inode(txn, dbs, plan, item, freed, heads)
                    out["inodes"] += 1
                release_contents(txn, dbs, freed)
                store.before_commit()
            store.note_commit()
            store.maintain()
        _recount_heads(store, plan.ws, heads)
        out["lines"] += _summarise(store, plan)
    return out


def _drop_inode(txn: lmdb.Transaction, dbs: dict, plan: UnversionedPlan, item: Dropped,
                freed: dict[bytes, int], heads: set[bytes]) -> int:
    ws, ino = item.ws, item.ino
    hist = dbs["dirent_hist"]
    for key in _link_keys(txn, dbs, plan, ino):
        _unlink_history(txn, hist, key, plan.parent)
    records = _records(txn, dbs, item)
    n = 0
    prefix = schema.inode_prefix(ws, ino)
    with txn.cursor(db=dbs["inodes"]) as cur:
        if cur.set_range(prefix):
            while cur.key()[:12] == prefix:
                n += 1
                if not cur.delete():
                    break
    for _key, content in records:
        if content is not None:
            freed[content] = freed.get(content, 0) + 1
    for key in _path_keys(txn, dbs, plan, ino):
        heads.add(schema.path_key_ident(key))
        txn.delete(key, db=dbs["paths"])
    for db_name in ("receipt_dirs", "receipt_entries"):
        dir_prefix = schema.dir_prefix(ws, ino)
        with txn.cursor(db=dbs[db_name]) as cur:
            if cur.set_range(dir_prefix):
                while cur.key()[:12] == dir_prefix:
                    if not cur.delete():
                        break
    return n


def _link_keys(txn: lmdb.Transaction, dbs: dict, plan: UnversionedPlan, ino: int) -> list[bytes]:
    out = []
    for key in plan.links.get(ino, ()):
        split_hist_run(txn, dbs["dirent_hist"], key)
        value = txn.get(key, db=dbs["dirent_hist"])
        if value and schema.decode_dirent(value)[0] == ino:
            out.append(key)
    return out


def _path_keys(txn: lmdb.Transaction, dbs: dict, plan: UnversionedPlan, ino: int) -> list[bytes]:
    out = []
    for key in plan.path_keys.get(ino, ()):
        value = txn.get(key, db=dbs["paths"])
        if value is not None and int.from_bytes(value[_ENTRY_INO:_ENTRY_INO + 8], "little") == ino:
            out.append(key)
    return out


def split_hist_run(txn: lmdb.Transaction, hist, key: bytes) -> None:
    """If the version of the ``dirent_hist`` key ``key`` is inside a run
    (``schema.encode_hist_run``: under its key or an older one), write that
    run's versions back as records of their own (the form stores before runs
    hold), so that one link can be taken out alone."""
    with txn.cursor(db=hist) as cur:
        if not cur.set_range(key) or cur.key()[:-8] != key[:-8] or len(cur.key()) != len(key):
            return
        run_key, value = bytes(cur.key()), bytes(cur.value())
    if not schema.is_hist_run(value):
        return
    ws, parent = schema.U32.unpack_from(run_key)[0], schema.U64.unpack_from(run_key, 4)[0]
    name, first = schema.split_dirent_hist_key(run_key)
    for seq, entry in schema.hist_run_versions(value, first):
        txn.put(schema.dirent_hist_key(ws, parent, name, seq), b"" if entry is None else schema.encode_dirent(*entry),
                db=hist)


def _unlink_history(txn: lmdb.Transaction, hist, key: bytes, has_parent: bool) -> None:
    """Take the link ``key`` (and the removal right after it) out of its
    name's history, keeping every other seq's view of the name (module docstring)."""
    name_prefix = key[:-8]
    with txn.cursor(db=hist) as cur:
        cur.set_key(key)
        newer = bytes(cur.value()) if cur.prev() and cur.key()[:len(name_prefix)] == name_prefix else None
        newer_key = bytes(cur.key()) if newer is not None else None
        cur.set_key(key)
        older = bytes(cur.value()) if cur.next() and cur.key()[:len(name_prefix)] == name_prefix else None
    free_before = older == b"" or (older is None and not has_parent)
    if free_before:
        txn.delete(key, db=hist)
    else:
        txn.put(key, b"", db=hist)                # the name is free from here, as it was to the trees
    if newer == b"" and newer_key is not None:
        txn.delete(newer_key, db=hist)            # its removal: the name was free before it now


def _recount_heads(store: Store, ws: int, idents: set[bytes]) -> None:
    """Recount or remove the ``path_heads`` records of the paths that lost entries."""
    if not idents:
        return
    dbs = store.dbs
    with store.env.begin() as txn:
        record = _record_of(store, txn, ws)
    history = History(dbs, store.fork_chain(record)) if record is not None else None
    pending = sorted(idents)
    i = 0
    while i < len(pending):
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            while i < len(pending) and time.monotonic() - start < BATCH_SECONDS:
                ident = pending[i]
                i += 1
                head_key = schema.ws_key(ws) + ident
                prefix = head_key + b"\x00"
                with txn.cursor(db=dbs["paths"]) as cur:
                    left = cur.set_range(prefix) and cur.key()[:len(prefix)] == prefix
                    entry = PathEntry.decode(cur.value(), cur.key()) if left else None
                if entry is None:
                    txn.delete(head_key, db=dbs["path_heads"])
                    continue
                path = entry.path if schema.ident_is_long(ident) else ident
                head = history.compute_head(txn, path) if history is not None else None
                if head is None:
                    txn.delete(head_key, db=dbs["path_heads"])
                else:
                    long_path = path if schema.is_long(path) else b""
                    txn.put(head_key, PathHead(head.version, head.last_seq, head.ino, long_path).encode(),
                            db=dbs["path_heads"])
            store.before_commit()
        store.note_commit()


def _record_of(store: Store, txn: lmdb.Transaction, ws: int) -> WorkspaceRecord | None:
    name = txn.get(schema.ws_key(ws), db=store.dbs["ws_ids"])
    if name is None:
        return None
    raw = txn.get(bytes(name), db=store.dbs["workspaces"])
    return WorkspaceRecord.decode(raw) if raw is not None else None


def _summarise(store: Store, plan: UnversionedPlan) -> int:
    """Write each run's summary line (first, so a killed GC leaves no gap),
    then delete the lines it covers; returns the lines newly dropped."""
    dbs = store.dbs
    done = 0
    for run in plan.runs:
        seq = run.delete_from
        with store.env.begin(write=True) as txn:
            raw = txn.get(schema.event_key(plan.ws, run.first), db=dbs["events"])
            if raw is None:
                continue
            if run.path is not None:
                line = events.decode(run.first, bytes(raw))
                summary = {"seq": run.first, "time": line["time"], "event": DROPPED_EVENT,
                           "path": path_text(run.path), "through": run.last, "events": run.events,
                           "turn": None, "pid": None}
                txn.put(schema.event_key(plan.ws, run.first), json.dumps(summary).encode(), db=dbs["events"])
            store.before_commit()
        store.note_commit()
        while seq <= run.last:
            with store.env.begin(write=True) as txn:
                start = time.monotonic()
                with txn.cursor(db=dbs["events"]) as cur:
                    while seq <= run.last and time.monotonic() - start < BATCH_SECONDS:
                        if not cur.set_range(schema.event_key(plan.ws, seq)):
                            seq = run.last + 1
                            break
                        seq = schema.event_key_seq(cur.key())
                        if cur.key()[:4] != schema.ws_key(plan.ws) or seq > run.last:
                            seq = run.last + 1
                            break
                        cur.delete()
                        seq += 1
                store.before_commit()
            store.note_commit()
            store.maintain()
        done += run.new
    return done
