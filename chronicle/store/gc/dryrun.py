"""Policy records, pins and the GC dry run: what a policy would drop and free.

:func:`get_policy`/:func:`set_policy` read and write a workspace's record in
``policies`` (no record: :data:`~chronicle.store.gc.policy.DEFAULT_POLICY`).
:func:`dry_run` walks the path index of each workspace asked for (its own
fork layer: a fork's inherited versions belong to its parent, where the fork
seq is a pin), selects per path with :func:`~chronicle.store.gc.policy.select`,
and counts what the dropped versions alone hold.

**What GC would free** is what its prune and sweep would free now: the
inode records pruning would rewrite (``prune.keys_to_prune``, the same
code, replayed over the candidates in GC's order) and the deleted files'
last records it would rewrite (``prune.dead_record_goes``) give back their
references; a content is freed when its refcount reaches 0 (with those
already at 0: deleted workspaces, replaced history of ignored paths); a
chunk is freed when every content record that counts it is freed. Other
inode records of the same content (a pinned tree, a hard link, another
workspace) keep it. A candidate GC would leave alone counts as kept, so the
report's ``dropped_versions`` is GC's ``pruned_versions``.

Threads: synchronous; each function opens its own LMDB transactions.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.gc.leases import DeletedFiles, LeaseInfo, read_leases
from chronicle.store.gc.policy import DEFAULT_POLICY, Policy, VersionInfo, select
from chronicle.store.gc.prune import (Candidate, DeadRecord, Keep, content_entry_fields, dead_record,
                                      dead_record_goes, keys_to_prune)
from chronicle.store.gc.sweep import pending_drops
from chronicle.store.gc.unversioned import UnversionedPlan, plan_workspace, released as unversioned_released
from chronicle.store.meta import events, nodes, schema
from chronicle.store.meta.journal import parse_iso_time, path_text
from chronicle.store.meta.schema import (P_ARRIVED, P_BUMPS, P_CONTENT, P_GONE, ContentRecord, PathEntry,
                                        WorkspaceRecord)

if TYPE_CHECKING:
    from chronicle.store.store import Store


def get_policy(store: Store, ws_id: int, txn: lmdb.Transaction | None = None) -> Policy:
    """Workspace ``ws_id``'s policy (the default if it has no record)."""
    if txn is None:
        with store.env.begin() as rtxn:
            return get_policy(store, ws_id, rtxn)
    raw = txn.get(schema.ws_key(ws_id), db=store.dbs["policies"])
    return DEFAULT_POLICY if raw is None else Policy.decode(raw)


def has_own_policy(store: Store, ws_id: int) -> bool:
    """True if the workspace has a policy record (else it has the default)."""
    with store.env.begin() as txn:
        return txn.get(schema.ws_key(ws_id), db=store.dbs["policies"]) is not None


def set_policy(store: Store, ws_id: int, policy: Policy) -> None:
    """Store ``policy`` as workspace ``ws_id``'s (one write transaction)."""
    with store.env.begin(write=True) as txn:
        store.before_commit()
        txn.put(schema.ws_key(ws_id), policy.encode(), db=store.dbs["policies"])
    store.note_commit()


def _records(txn: lmdb.Transaction, store: Store) -> list[WorkspaceRecord]:
    with txn.cursor(db=store.dbs["workspaces"]) as cur:
        return [WorkspaceRecord.decode(value) for _key, value in cur]


def workspace_records(store: Store, txn: lmdb.Transaction) -> list[WorkspaceRecord]:
    """Every workspace record of the store."""
    return _records(txn, store)


def pins(store: Store, record: WorkspaceRecord, policy: Policy, txn: lmdb.Transaction) -> set[int]:
    """The seqs of ``record``'s workspace whose trees stay (module
    ``gc`` docstring): head, own snapshots, fork seqs of its forks, the end
    seqs of its last ``policy.keep_turns`` turns (by end seq)."""
    prefix = schema.ws_key(record.id)
    out = {store.head_seq(txn, record.id)}
    for other in _records(txn, store):
        if other.parent_id == record.id and other.fork_seq is not None:
            out.add(other.fork_seq)
    with txn.cursor(db=store.dbs["snapshots"]) as cur:
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:4] != prefix:
                    break
                out.add(json.loads(value)["seq"])
    if policy.keep_turns:
        ends = []
        with txn.cursor(db=store.dbs["turns"]) as cur:
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:4] != prefix:
                        break
                    end = json.loads(value).get("end_seq")
                    if end is not None:
                        ends.append(end)
        out.update(sorted(ends)[-policy.keep_turns:])
    return out


@dataclass(slots=True)
class PathVersions:
    """One path's content versions in one workspace layer: ``(seq, size,
    content id, info)`` oldest first, and the seqs at which the path went
    away (deleted, renamed away), oldest first."""

    path: bytes
    versions: list[tuple[int, int, bytes, VersionInfo]] = field(default_factory=list)
    inos: dict[int, int] = field(default_factory=dict)      # seq -> inode of the entry
    gone: list[int] = field(default_factory=list)
    gone_inos: set[int] = field(default_factory=set)


def own_versions(store: Store, ws_id: int, txn: lmdb.Transaction) -> Iterable[PathVersions]:
    """The content versions (entries flagged ``P_CONTENT`` and ``P_BUMPS``
    or ``P_ARRIVED``) and the removals (``P_GONE``) recorded in workspace ``ws_id``'s own
    layer, path by path."""
    prefix = schema.ws_key(ws_id)
    current: PathVersions | None = None
    current_ident = None
    with txn.cursor(db=store.dbs["paths"]) as cur:
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if key[:4] != prefix:
                break
            flags = value[0]
            if flags & P_GONE:
                ident = schema.path_key_ident(key)
                path = PathEntry.decode(value, key).path if schema.ident_is_long(ident) else ident
                if current is None or ident != current_ident or path != current.path:
                    if current is not None:
                        yield current
                    current, current_ident = PathVersions(path), ident
                current.gone.append(schema.path_key_seq(key))
                current.gone_inos.add(_ENTRY_INO.unpack_from(value, 1)[0])
                continue
            if not (flags & P_CONTENT and flags & (P_BUMPS | P_ARRIVED)):
                continue          # (a rename to a free path starts the history there: a version for GC)
            ino, content, entry_path, fragment = content_entry_fields(value, key, packed=True)
            ident = schema.path_key_ident(key)
            path = entry_path if schema.ident_is_long(ident) else ident
            if current is None or ident != current_ident or path != current.path:
                if current is not None:
                    yield current
                current, current_ident = PathVersions(path), ident
            if fragment[:1] == _PACKED:
                time_ns, size, label = events.fragment_facts(fragment)
            else:
                time_ns, size, label = _fields(fragment)
            info = VersionInfo(schema.path_key_seq(key), time_ns, label)
            current.versions.append((info.seq, size, content, info))
            current.inos[info.seq] = ino
    if current is not None:
        yield current


def lease_pins(records: Iterable[WorkspaceRecord], leases: Iterable[LeaseInfo]) -> dict[int, set[int]]:
    """The seqs open ``at/`` handles pin (``leases``), per workspace id: a pin
    of a fork at seq S also pins its parent at ``min(S, fork seq)``, and so on up."""
    by_id = {r.id: r for r in records}
    out: dict[int, set[int]] = {}
    for lease in leases:
        for ws, seq in lease.pins:
            while ws in by_id:
                out.setdefault(ws, set()).add(seq)
                rec = by_id[ws]
                if rec.parent_id is None or rec.fork_seq is None:
                    break
                ws, seq = rec.parent_id, min(seq, rec.fork_seq)
    return out


@dataclass(slots=True)
class Plan:
    """What a GC run would prune: the dry-run report (without the freed
    figures), the candidates, each workspace's pins (sorted) and the seqs of
    kept versions per (workspace, inode) (``prune.Keep.held``)."""

    report: dict
    candidates: list[Candidate]
    pins: dict[int, list[int]]
    held: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    dead: list[DeadRecord] = field(default_factory=list)
    heads: dict[int, int] = field(default_factory=dict)      # ws id -> head seq when planned
    unversioned: list[UnversionedPlan] = field(default_factory=list)   # ``gc.unversioned``


def _uplan_report(uplan: UnversionedPlan) -> dict:
    return {"dropped_inodes": len(uplan.inodes), "dropped_lines": uplan.lines}


def plan(store: Store, names: list[str] | None, now_ns: int, txn: lmdb.Transaction,
         leases: Iterable[LeaseInfo] = (), deadline: float | None = None) -> Plan:
    """The versions the policies drop (module docstring of ``dry_run``), and
    the records of ignored paths GC drops (``gc.unversioned``), read in ``txn``. Raises :class:`NotFound` for an unknown workspace, and
    ``TimeoutError`` once ``time.monotonic()`` passes ``deadline``."""
    report: dict = {"workspaces": []}
    candidates: list[Candidate] = []
    pins_by_ws: dict[int, list[int]] = {}
    held: dict[tuple[int, int], list[int]] = {}
    dead: list[DeadRecord] = []
    heads: dict[int, int] = {}
    uplans: list[UnversionedPlan] = []
    leases = list(leases)
    may_drop = deleted_files(store, leases).may_drop
    records = {r.name: r for r in _records(txn, store)}
    leased = lease_pins(records.values(), leases)
    for name in (sorted(records) if names is None else names):
        record = records.get(name)
        if record is None:
            raise NotFound(f"no workspace named {name!r} in {store.path}")
        policy = get_policy(store, record.id, txn)
        heads[record.id] = store.head_seq(txn, record.id)
        pinned = pins(store, record, policy, txn) | leased.get(record.id, set())
        pins_by_ws[record.id] = sorted(pinned)
        ws_report = {"workspace": name, "policy": policy.as_dict(), "pins": sorted(pinned), "paths": [],
                     "versions": 0, "kept_versions": 0, "dropped_versions": 0, "kept_bytes": 0,
                     "dropped_bytes": 0}
        inos: set[int] = set()
        for pv in own_versions(store, record.id, txn):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the dry run passed its deadline")
            inos.update(pv.inos.values())
            inos.update(pv.gone_inos)
            if not pv.versions:
                continue
            kept = select([v[3] for v in pv.versions], policy, pinned, now_ns, pv.gone)
            dropped = []
            for seq, size, content, _info in pv.versions:
                if seq in kept:
                    ws_report["kept_bytes"] += size
                    held.setdefault((record.id, pv.inos[seq]), []).append(seq)
                else:
                    dropped.append(seq)
                    candidates.append(Candidate(record.id, pv.path, seq, pv.inos[seq], content, size))
                    ws_report["dropped_bytes"] += size
            ws_report["versions"] += len(pv.versions)
            ws_report["kept_versions"] += len(pv.versions) - len(dropped)
            ws_report["dropped_versions"] += len(dropped)
            if dropped:
                ws_report["paths"].append({"path": path_text(pv.path), "versions": len(pv.versions),
                                           "kept": len(pv.versions) - len(dropped), "dropped": dropped})
        uplan = plan_workspace(store, record, txn, Keep(pins_by_ws, {}, may_drop), heads[record.id])
        uplans.append(uplan)
        ws_report.update(_uplan_report(uplan))
        report["workspaces"].append(ws_report)
        gone = set(uplan.links)
        dead.extend(d for d in (dead_record(txn, store.dbs, record.id, ino) for ino in sorted(inos - gone)) if d)
    for seqs in held.values():
        seqs.sort()
    return Plan(report, candidates, pins_by_ws, held, dead, heads, uplans)


_PACKED = bytes((events.PACKED,))
_ENTRY_INO = struct.Struct("<Q")      # a path entry's inode: the u64 after its flags byte
_TIME = re.compile(rb'"time": "([^"]+)"')
_SIZE = re.compile(rb'"size": ([0-9]+)')
_times: dict[bytes, int] = {}


def _fields(fragment: bytes) -> tuple[int, int, tuple[str, int] | None]:
    """``(time ns, size, turn label)`` of a path entry's fragment; the JSON is
    parsed only when the entry has a turn label (a million entries are read)."""
    if b'"turn": null' not in fragment:
        fields = json.loads(b"{" + fragment)
        turn = fields.get("turn")
        label = (turn.get("agent"), turn.get("turn")) if isinstance(turn, dict) else None
        return parse_iso_time(fields["time"]), fields.get("size") or 0, label
    stamp = _TIME.search(fragment).group(1)
    second, _, micros = stamp.partition(b".")
    base = _times.get(second)
    if base is None:
        if len(_times) > 4096:
            _times.clear()
        base = _times[second] = parse_iso_time(second.decode() + "Z")
    size = _SIZE.search(fragment)
    return base + int(micros.rstrip(b"Z") or 0) * 1000, int(size.group(1)) if size else 0, None


def dry_run(store: Store, names: list[str] | None = None, now_ns: int | None = None,
            leases: Iterable[LeaseInfo] | None = None, deadline: float | None = None) -> dict:
    """What GC would drop and free, changing nothing.

    ``names``: the workspaces (None: all); ``leases``: the live leases (None:
    read them now). Returns ``{"workspaces": [{"workspace", "policy", "pins",
    "paths": [{"path", "versions", "kept", "dropped": [seq...]}], "versions",
    "kept_versions", "dropped_versions", "kept_bytes", "dropped_bytes"}],
    "freed_contents", "freed_chunks", "freed_bytes" (stored, compressed),
    "freed_raw_bytes"}``; ``*_bytes`` of versions are logical (file sizes).
    The figures are what GC's prune and sweep would do now: a version the
    policy drops but GC must keep (a pin shows its inode record under
    another name, the file has another link, it is the head's) counts as
    kept, so ``dropped_versions`` is GC's ``pruned_versions``
    (``prune.keys_to_prune``; contents no inode uses any more already
    count as freed). Raises :class:`NotFound` for an unknown workspace, and
    ``TimeoutError`` once ``time.monotonic()`` passes ``deadline`` (a bounded
    look: ``gc.stats``)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    leases = read_leases(store.run_dir) if leases is None else list(leases)
    may_drop = deleted_files(store, leases).may_drop
    with store.env.begin() as txn:
        found = plan(store, names, now_ns, txn, leases, deadline)
        keep = Keep(found.pins, found.held, may_drop)
        released: dict[bytes, int] = {}
        kept: set[tuple[int, bytes, int]] = set()
        rewritten: set[bytes] = set()         # replayed in GC's order: what earlier candidates rewrote
        for cand in found.candidates:
            records = keys_to_prune(txn, store.dbs, cand, keep, rewritten)
            if records is None:
                kept.add((cand.ws, cand.path, cand.seq))
            elif records and cand.content != EMPTY_CONTENT_ID:          # (not refcounted)
                released[cand.content] = released.get(cand.content, 0) + len(records)
        for uplan in found.unversioned:
            unversioned_released(txn, store.dbs, uplan, rewritten, released)
        for item in found.dead:
            if dead_record_goes(txn, store.dbs, item, keep) is not None:
                released[item.content] = released.get(item.content, 0) + 1
        if kept:
            _keep_in_report(found, kept, txn, store)
        found.report.update(freed(store, txn, released, deadline))
    return found.report


def deleted_files(store: Store, leases: Iterable[LeaseInfo]) -> DeletedFiles:
    """The check of deleted files' last records (``leases.DeletedFiles``)
    for this process (its own lease) and ``leases`` (other processes' are used)."""
    return DeletedFiles(store.lease, [lease for lease in leases if lease.pid != os.getpid()])


def _keep_in_report(found: Plan, kept: set[tuple[int, bytes, int]], txn: lmdb.Transaction, store: Store) -> None:
    """Move the candidates GC would leave alone (``kept``: (ws, path, seq))
    from dropped to kept in ``found.report``."""
    ids = {r.name: r.id for r in _records(txn, store)}
    sizes = {(c.ws, c.path, c.seq): c.size for c in found.candidates}
    for ws_report in found.report["workspaces"]:
        ws_id = ids[ws_report["workspace"]]
        paths = []
        for p in ws_report["paths"]:
            raw_path = os.fsencode(p["path"])
            stay = [seq for seq in p["dropped"] if (ws_id, raw_path, seq) in kept]
            for seq in stay:
                size = sizes[(ws_id, raw_path, seq)]
                ws_report["kept_bytes"] += size
                ws_report["dropped_bytes"] -= size
            ws_report["kept_versions"] += len(stay)
            ws_report["dropped_versions"] -= len(stay)
            p["dropped"] = [seq for seq in p["dropped"] if (ws_id, raw_path, seq) not in kept]
            p["kept"] += len(stay)
            if p["dropped"]:
                paths.append(p)
        ws_report["paths"] = paths


def freed(store: Store, txn: lmdb.Transaction, released: dict[bytes, int], deadline: float | None = None) -> dict:
    """Contents whose refcount is 0 after giving back ``released``
    (content id -> references) — with those already at 0 — and the chunks
    that only they use: what the sweep frees (``sweep``), with the chunk
    references a killed sweep recorded and did not give back (``sweep.pending_drops``)."""
    chunk_drops: dict[bytes, int] = pending_drops(txn, store.dbs)
    contents = 0

    def dead_records() -> Iterator[ContentRecord]:
        nonlocal contents
        with txn.cursor(db=store.dbs["contents"]) as cur:
            for n, (key, raw) in enumerate(cur):
                if deadline is not None and n % 4096 == 0 and time.monotonic() > deadline:
                    raise TimeoutError("the dry run passed its deadline")
                content_id = bytes(key)
                if content_id == EMPTY_CONTENT_ID:
                    continue
                if schema.content_header(raw, content_id)[1] > released.get(content_id, 0):
                    continue
                contents += 1
                yield ContentRecord.decode(raw, content_id)

    nodes.releases(txn, store.dbs["content_nodes"], dead_records(), chunk_drops)   # the sweep's cascade, summed
    chunks = stored = raw_bytes = 0
    for chunk in store.chunks.freed_by(txn, chunk_drops):     # delta bases freed with their deltas included
        chunks += 1
        stored += chunk.stored_len
        raw_bytes += chunk.raw_len
    return {"freed_contents": contents, "freed_chunks": chunks, "freed_bytes": stored, "freed_raw_bytes": raw_bytes}
