"""What fsck says of damaged metadata: which records a damaged range held.

The scan past damaged pages is ``chronicle.store.meta.damaged`` (re-exported
here); the repair is ``fsck.rebuild``.

Threads: one fsck run, one thread.
"""

from __future__ import annotations

import struct

from chronicle.store.meta import schema
from chronicle.store.meta.damaged import DamagedRange, Reader
from chronicle.store.meta.journal import path_text

__all__ = ["DamagedRange", "Reader", "describe_damage", "key_text"]

_WS_KEYED = {"inodes", "dirents", "dirent_hist", "paths", "path_heads", "events", "heads", "snapshots", "ws_ids",
             "turns", "policies"}
_WHAT = {"dirents": "head directory entries", "dirent_hist": "directory history (past trees, forks)",
         "inodes": "inode records (attributes and contents of file versions)",
         "paths": "path history (versions/ and query/)", "path_heads": "version counters of paths",
         "events": "log lines", "snapshots": "snapshots", "heads": "head seqs", "ws_ids": "workspace ids",
         "chunks": "chunk index entries (where file data is)", "contents": "file contents (extent lists)",
         "workspaces": "workspace records", "meta": "store counters", "turns": "turn labels",
         "agents": "agent records", "agent_turns": "agent turn records", "agent_states": "agent states",
         "policies": "retention policies"}


def key_text(db: str, key: bytes | None) -> str:
    """A key of database ``db`` as a user reads it: ``directory inode 17,
    'name'``, ``inode 20 at seq 5``, ``path 'a/b' at seq 9``, ``seq 12``, or hex."""
    if key is None:
        return "the end"
    try:
        if db == "dirents" and len(key) >= 12:
            return f"directory inode {schema.U64.unpack(key[4:12])[0]}, {path_text(key[12:])!r}"
        if db == "dirent_hist" and len(key) >= 21:
            name, seq = schema.split_dirent_hist_key(key)
            return f"directory inode {schema.U64.unpack(key[4:12])[0]}, {path_text(name)!r} at seq {seq}"
        if db == "inodes" and len(key) == 20:
            return f"inode {schema.U64.unpack(key[4:12])[0]} at seq {schema.inode_key_seq(key)}"
        if db == "paths" and len(key) >= 13:
            ident = schema.path_key_ident(key)
            return f"path {path_text(ident[:schema.PATH_KEY_MAX])!r} at seq {schema.path_key_seq(key)}"
        if db in ("path_heads", "snapshots") and len(key) >= 4:
            return repr(path_text(key[4:schema.PATH_KEY_MAX + 4]))
        if db == "events" and len(key) == 12:
            return f"seq {schema.event_key_seq(key)}"
    except struct.error:
        pass
    return f"key {key[:48].hex()}"


def describe_damage(ranges: list[DamagedRange], workspaces: dict[int, str]) -> list[tuple[str, dict]]:
    """``(message, details)`` for each distinct damaged range: the database,
    what its records hold, the key range decoded (:func:`key_text`: which
    directory, names, inodes, paths, seqs), and whose records they are (the
    workspace, by the first 4 bytes of the keys of a database keyed by
    workspace id, named through ``workspaces``: ``{ws id: name}``)."""
    out, seen = [], set()
    for rng in ranges:
        if (rng.db, rng.after, rng.before) in seen:
            continue
        seen.add((rng.db, rng.after, rng.before))
        what = _WHAT.get(rng.db, "records")
        whose = ""
        if rng.db in _WS_KEYED:
            ids = sorted({int.from_bytes(k[:4], "big") for k in (rng.after, rng.before) if k and len(k) >= 4})
            names = ", ".join(repr(workspaces[i]) if i in workspaces else f"#{i}" for i in ids)
            whose = f" of workspace {names}" if names else ""
        lo = "the start" if rng.after is None else key_text(rng.db, rng.after)
        message = (f"database {rng.db!r} ({what}{whose}): the records after {lo} up to "
                   f"{key_text(rng.db, rng.before)} cannot be read ({rng.error})")
        out.append((message, {"db": rng.db, "after": rng.after.hex() if rng.after is not None else None,
                              "before": rng.before.hex() if rng.before is not None else None,
                              "error": rng.error}))
    return out
