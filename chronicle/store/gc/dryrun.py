"""Policy records, pins and the GC dry run: what a policy would drop and free.

:func:`get_policy`/:func:`set_policy` read and write a workspace's record in
``policies`` (no record: :data:`~chronicle.store.gc.policy.DEFAULT_POLICY`).
:func:`dry_run` walks the path index of each workspace asked for (its own
fork layer: a fork's inherited versions belong to its parent, where the fork
seq is a pin), selects per path with :func:`~chronicle.store.gc.policy.select`,
and counts what the dropped versions alone hold.

**What GC would free** is counted conservatively, never more than it could:
a content is freed when no kept version names it and its refcount (inode
records) is at most the number of dropped versions that name it; a chunk is
freed when every content record that counts it is freed. Other inode
records of the same content (a chmod, a hard link, another workspace) keep it.

Threads: synchronous; each function opens its own LMDB transactions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID, ID_SIZE
from chronicle.store.gc.policy import DEFAULT_POLICY, Policy, VersionInfo, select
from chronicle.store.meta import schema
from chronicle.store.meta.journal import parse_iso_time, path_text
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, ChunkRecord, ContentRecord, PathEntry, WorkspaceRecord

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
    content id, info)`` oldest first."""

    path: bytes
    versions: list[tuple[int, int, bytes, VersionInfo]] = field(default_factory=list)


def own_versions(store: Store, ws_id: int, txn: lmdb.Transaction) -> Iterable[PathVersions]:
    """The content versions (entries flagged ``P_BUMPS`` and ``P_CONTENT``)
    recorded in workspace ``ws_id``'s own layer, path by path."""
    prefix = schema.ws_key(ws_id)
    current: PathVersions | None = None
    current_ident = None
    with txn.cursor(db=store.dbs["paths"]) as cur:
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if key[:4] != prefix:
                break
            entry = PathEntry.decode(value)
            if not (entry.flags & P_BUMPS and entry.flags & P_CONTENT):
                continue
            ident = schema.path_key_ident(key)
            path = entry.path if schema.ident_is_long(ident) else ident
            if current is None or ident != current_ident or path != current.path:
                if current is not None:
                    yield current
                current, current_ident = PathVersions(path), ident
            fields = json.loads(b"{" + entry.fragment)
            turn = fields.get("turn")
            label = (turn.get("agent"), turn.get("turn")) if isinstance(turn, dict) else None
            info = VersionInfo(schema.path_key_seq(key), parse_iso_time(fields["time"]), label)
            current.versions.append((info.seq, fields.get("size") or 0, entry.content, info))
    if current is not None:
        yield current


def dry_run(store: Store, names: list[str] | None = None, now_ns: int | None = None) -> dict:
    """What GC would drop and free, changing nothing.

    ``names``: the workspaces (None: all). Returns ``{"workspaces": [{"workspace",
    "policy", "pins", "paths": [{"path", "versions", "kept", "dropped": [seq...]}],
    "versions", "kept_versions", "dropped_versions", "kept_bytes", "dropped_bytes"}],
    "freed_contents", "freed_chunks", "freed_bytes" (stored, compressed),
    "freed_raw_bytes"}``; ``*_bytes`` of versions are logical (file sizes).
    Raises :class:`NotFound` for an unknown workspace."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    report: dict = {"workspaces": []}
    dropped_refs: dict[bytes, int] = {}
    kept_contents: set[bytes] = set()
    with store.env.begin() as txn:
        records = {r.name: r for r in _records(txn, store)}
        for name in (sorted(records) if names is None else names):
            record = records.get(name)
            if record is None:
                raise NotFound(f"no workspace named {name!r} in {store.path}")
            policy = get_policy(store, record.id, txn)
            pinned = pins(store, record, policy, txn)
            ws_report = {"workspace": name, "policy": policy.as_dict(), "pins": sorted(pinned), "paths": [],
                         "versions": 0, "kept_versions": 0, "dropped_versions": 0, "kept_bytes": 0,
                         "dropped_bytes": 0}
            for pv in own_versions(store, record.id, txn):
                kept = select([v[3] for v in pv.versions], policy, pinned, now_ns)
                dropped = []
                for seq, size, content, _info in pv.versions:
                    if seq in kept:
                        kept_contents.add(content)
                        ws_report["kept_bytes"] += size
                    else:
                        dropped.append(seq)
                        dropped_refs[content] = dropped_refs.get(content, 0) + 1
                        ws_report["dropped_bytes"] += size
                ws_report["versions"] += len(pv.versions)
                ws_report["kept_versions"] += len(pv.versions) - len(dropped)
                ws_report["dropped_versions"] += len(dropped)
                if dropped:
                    ws_report["paths"].append({"path": path_text(pv.path), "versions": len(pv.versions),
                                               "kept": len(pv.versions) - len(dropped), "dropped": dropped})
            report["workspaces"].append(ws_report)
        report.update(_freed(store, txn, dropped_refs, kept_contents))
    return report


def _freed(store: Store, txn: lmdb.Transaction, dropped_refs: dict[bytes, int], kept: set[bytes]) -> dict:
    """Contents and chunks only the dropped versions hold (module docstring)."""
    chunk_drops: dict[bytes, int] = {}
    contents = 0
    for content_id, count in dropped_refs.items():
        if content_id in kept or content_id == EMPTY_CONTENT_ID:
            continue
        raw = txn.get(content_id, db=store.dbs["contents"])
        if raw is None or schema.content_header(raw)[1] > count:
            continue
        contents += 1
        record = ContentRecord.decode(raw)
        ids = {record.ids[i:i + ID_SIZE] for i in range(0, len(record.ids), ID_SIZE)}
        ids.discard(HOLE_ID)
        for chunk_id in ids:
            chunk_drops[chunk_id] = chunk_drops.get(chunk_id, 0) + 1
    chunks = stored = raw_bytes = 0
    for chunk_id, count in chunk_drops.items():
        raw = txn.get(chunk_id, db=store.dbs["chunks"])
        if raw is None:
            continue
        chunk = ChunkRecord.decode(raw)
        if chunk.refcount <= count:
            chunks += 1
            stored += chunk.stored_len
            raw_bytes += chunk.raw_len
    return {"freed_contents": contents, "freed_chunks": chunks, "freed_bytes": stored, "freed_raw_bytes": raw_bytes}
