"""The LMDB layout: named databases, key encodings and record formats.

One LMDB environment per store (``<store>/meta``) holds all metadata. Keys are
big-endian so that LMDB's byte order is numeric order. ``~seq`` means
``SEQ_MAX - seq``: versioned keys sort newest first, so "the record at or
before seq S" is one ``set_range`` to ``prefix + ~S``.

======================  =========================================  ==========================================
database                key                                        value
======================  =========================================  ==========================================
``meta``                ``b"format"``, counters                    see :data:`FORMAT_VERSION`, u64 counters
``workspaces``          workspace name (UTF-8)                     :class:`WorkspaceRecord` (JSON)
``ws_ids``              ws u32                                     workspace name
``heads``               ws u32                                     head seq u64
``chunks``              chunk id (32)                              :class:`ChunkRecord`
``contents``            content id (32)                            :class:`ContentRecord`
``content_nodes``       node hash (32)                             refcount, height, entries (:func:`encode_node`)
``inodes``              ws u32, ino u64, ~seq u64                  :class:`Attrs` (the inode from seq on), or a run
``dirents``             ws u32, parent u64, name                   ino u64 + kind u8; ``b""`` = whiteout
``dirent_hist``         ws u32, parent u64, name, 0x00, ~seq u64   ino u64 + kind u8; ``b""`` = removed; or a run
``events``              ws u32, seq u64                            one ``.chronicle/log`` line, packed (``meta.events``)
``paths``               ws u32, path key, 0x00, seq u64            :class:`PathEntry`
``path_heads``          ws u32, path key                           :class:`PathHead`
``snapshots``           ws u32, name                               JSON ``{"seq", "time"}``
``turns``               ws u32, agent, 0x00, turn u32              JSON turn label
``agents``              agent id (UTF-8)                           JSON agent record
``agent_turns``         agent id, 0x00, turn u32                   JSON turn record
``agent_states``        agent id, 0x00, turn u32                   JSON state snapshot after that turn
``agent_steps``         agent id, 0x00, turn u32, step u32         JSON durable step of a running turn
``policies``            ws u32                                     retention policy JSON (``gc.policy.Policy``)
``receipts``            ws u32, seq u64                            receipt JSON (``history.receipts``)
``receipt_dirs``        ws u32, dir ino u64, ~seq u64              a directory's receipt hash and counts
``receipt_entries``     ws u32, dir ino u64                        a large directory's latest receipt entries
``receipt_hashes``      content id (32)                            dense content hash of a sparse or format-3 content (receipts)
``turn_reads``          ws u32, agent, 0x00, turn u32, index u32   JSON: one file read of the turn (``history.reads``)
``gc_drops``            batch u64                                  chunk references a GC sweep still owes (``gc.sweep``)
``gc_marks``            ws u32, batch u64                          marks a GC batch left to write (``gc.prune.encode_marks``)
======================  =========================================  ==========================================

A workspace's ``inodes``/``dirent_hist`` records are its own events only; a
fork reads through to its parent at the fork seq (``chronicle.store.meta.tree``).
``dirents`` is the head (current) directory table; in a fork it holds only
the fork's own changes, with whiteouts for names it removed.

The turn log is ``turns`` (a workspace's labels: what a fork reads through
to) and the agent runtime's ``agents``, ``agent_turns``, ``agent_states``,
keyed by agent id, which is also the name of the agent's workspace;
``chronicle.store.history.turns`` defines their records and who writes them.

Names and paths are ``bytes`` at every layer (POSIX names are bytes); paths
are relative to the workspace root, components joined by ``/``, root ``b""``.

**Path keys.** LMDB keys hold at most 511 bytes, and a path may be longer
than PATH_MAX (a directory deeper than 4,096 bytes is reached by relative
lookups). The *path key* of a path of at most :data:`PATH_KEY_MAX` bytes is
the path itself; a longer path's is its first :data:`PATH_KEY_MAX` bytes,
``0x01`` and the BLAKE3 digest of the whole path (:func:`path_ident`), and its
``paths``/``path_heads`` values carry the whole path (``PathEntry.path``,
``PathHead.path``) so readers verify it. The two kinds never collide (a plain
key ends where a digest key has ``0x01``; paths hold no NUL), and every key
of a path below directory ``d`` still starts with ``d/`` when ``d/`` is at
most :data:`PATH_KEY_MAX` bytes, so prefix scans over a directory stay
scans; below a longer directory they scan the digest keys sharing its
prefix and compare the whole paths (``history.paths``, ``journal``).
Format 4 stores a content's extent list as a persistent tree
(``chronicle.store.chunks.tree``): a content record holds its extents inline
(flag clear: the format-3 layout, still read as is) or, with ``_C_TREE``, the
root level of references to ``content_nodes``; new content ids are the tree
hash, a format-3 content keeps its whole-file BLAKE3 as its id. Opening a
format-3 store upgrades it in place (``Store.open``: only the format number
changes). Format 2 introduced path keys (format 1 stores failed on paths of 499 bytes
or more; none were deployed, so there is no migration). Format 3 added
``policies`` (a workspace without a record has the default policy).
Within format 3, ``events`` records are packed (tag byte ``0x01`` and
MessagePack, ``meta.events``; a record starting with ``{`` is the old JSON
line, still read) and a ``paths`` entry whose fragment's hash is its content
id's hex stores it cut out (flag ``P_HASH_CUT``; entries without it still read).
A ``chunks`` record of a delta chunk (``CODEC_DELTA``) is 61 bytes instead of
29: the base chunk id follows (:class:`ChunkRecord`); 29-byte records, all
that older stores hold, read as before.
Still within format 4 (issue 9 §6: metadata <= 0.5x chunk bytes), three
records are packed, each with the tag byte ``0x01`` and MessagePack, and the
forms written before still read: a ``paths`` entry's fragment
(:meth:`PathEntry.encode`, ``meta.events.pack_fragment``: the fragment's text
is rendered from it byte for byte; a text fragment starts with ``"``), a
``chunks`` record (:meth:`ChunkRecord.encode`: told from the fixed 29/61-byte
form by its length) and an ``inodes`` record without content
(``model.Attrs.encode``: told from the fixed form by its second byte). An
``inodes`` record with content is packed too, behind the tag ``0x02`` with
its content id first (``model.Attrs.encode``; gc reads and rewrites it in
place through ``model.inode_content_nlink``/``inode_with_content``).
Two fields derivable from the key are left out of new records (the record
is then read with its key; records holding them still read): a ``contents``
record's hash where it is the content id (flag ``_C_HASH_IS_ID``:
:meth:`ContentRecord.decode`, :func:`content_header` take the id), and a
packed ``paths`` fragment's ``seq`` and ``path`` where they are the key's
(:meth:`PathEntry.encode`/:meth:`PathEntry.decode` take the key;
``meta.events.pack_fragment``).
Also within format 4, with nothing older changed (new tags; every form
written before still reads, and a store holding them goes on writing the
new ones beside them):

- an ``inodes`` record of a file whose content is the empty content (a file
  just created) leaves the content id out (tag ``0x03``, ``model.Attrs.encode``);
- a **run record** holds consecutive versions of an inode without content
  (a directory's: its times change with every entry added or removed) under
  the key of the oldest, each newer one as the changes from the oldest
  (tag ``0x04``, ``model.encode_run``: while only its times and link count
  change; at most ``model.RUN_MAX_BYTES``).
  The key form is unchanged, so "the record at or before seq S" is still
  one ``set_range``: it lands on the record whose oldest version is the
  newest at or before S, and ``model.attrs_at`` picks the version within.
  The journal folds the inode's previous record into the run below it when
  it writes the next (``journal.EventWriter.put_attrs``): an inode's newest
  record is always one of one version, which gc reads as before; records
  with content are never folded (gc reads and rewrites them one a version);
- a ``dirent_hist`` value may likewise be a **run** of a name's consecutive
  records (:func:`encode_hist_run`: tag ``0x01``, never 0 or 9 bytes long;
  at most :data:`HIST_RUN_MAX_BYTES`), read with :func:`hist_at`; the
  name's newest record stays one of its own (the head entry's twin);
  ``gc.unversioned`` splits a run back into records of one to take a link out;
- a flat ``contents`` record leaves out its last extent's length where the
  lengths add up to its size (flag ``_C_LAST_CUT``);
- a ``chunks`` record is varints (tag ``0x02``, :meth:`ChunkRecord.encode`)
  where that is shorter than the MessagePack form.

GC may fold a run of ``events`` lines of ignored paths into one JSON summary
line (``"event": "dropped"``, ``"through"``: the run's last seq; ``gc.unversioned``):
the seqs it covers have no record of their own.
``gc_drops`` (added within format 4; a store without it gets it empty when
opened) holds the chunk references a GC sweep took from deleted contents and
has not yet given back to ``chunks``: a tag byte ``0x01``, then 36-byte
entries (chunk id, count u32 big-endian) in chunk id order; the applied
prefix is named by ``meta`` key ``gc_drops_done`` (``gc.sweep``). fsck counts
these entries as uses.
Beside the LMDB file, the record of the last sync moved from ``synced.json``
(rewritten through a rename) to ``synced.rec`` (two CRC'd slots rewritten in
place, ``meta.recovery.record_synced``); a ``synced.json`` is still read.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from binascii import hexlify
from dataclasses import dataclass
from itertools import accumulate

import lmdb
import msgpack

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, ID_SIZE, hash_bytes
from chronicle.store.chunks.tree import decode_entries, encode_entries
from chronicle.store.meta import events

FORMAT_VERSION = 4
OLD_FORMATS = (3,)        # opened and upgraded in place to FORMAT_VERSION
SEQ_MAX = (1 << 64) - 1

DATABASES = ("meta", "workspaces", "ws_ids", "heads", "chunks", "contents", "content_nodes", "inodes", "dirents",
             "dirent_hist", "events", "paths", "path_heads", "snapshots", "turns",
             "agents", "agent_turns", "agent_states", "agent_steps", "policies", "receipts", "receipt_dirs",
             "receipt_entries", "receipt_hashes", "turn_reads", "gc_drops", "gc_marks")

# meta keys
META_FORMAT = b"format"
META_NEXT_INO = b"next_ino"
META_NEXT_PACK = b"next_pack"
META_NEXT_WS = b"next_ws"
META_CREATED = b"created"

# Running totals in ``meta`` (updated in the transaction that changes them; GC subtracts).
TOTALS = ("logical_bytes", "contents", "unique_bytes", "stored_bytes", "chunks")

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
_WS_INO = struct.Struct(">IQ")
_WS_INO_SEQ = struct.Struct(">IQQ")
_WS_SEQ = struct.Struct(">IQ")
_DIRENT_VALUE = struct.Struct(">QB")

# --- keys -------------------------------------------------------------------

def inv(seq: int) -> int:
    """``~seq``: ``SEQ_MAX - seq``, so newer seqs sort first."""
    return SEQ_MAX - seq


def inode_prefix(ws: int, ino: int) -> bytes:
    """The ``inodes`` key prefix of one inode of workspace ``ws`` (12 bytes)."""
    return _WS_INO.pack(ws, ino)


def inode_key(ws: int, ino: int, seq: int) -> bytes:
    """The ``inodes`` key of ``ino``'s record written at ``seq``."""
    return _WS_INO_SEQ.pack(ws, ino, SEQ_MAX - seq)


def inode_key_seq(key: bytes) -> int:
    """The seq of an ``inodes`` key."""
    return SEQ_MAX - _WS_INO_SEQ.unpack(key)[2]


def dir_prefix(ws: int, parent: int) -> bytes:
    """The ``dirents``/``dirent_hist`` key prefix of directory ``parent`` (12 bytes)."""
    return _WS_INO.pack(ws, parent)


def dirent_key(ws: int, parent: int, name: bytes) -> bytes:
    """The ``dirents`` (head) key of ``parent/name``."""
    return _WS_INO.pack(ws, parent) + name


def dirent_hist_prefix(ws: int, parent: int, name: bytes) -> bytes:
    """The ``dirent_hist`` key prefix of ``parent/name`` (name, then NUL)."""
    return _WS_INO.pack(ws, parent) + name + b"\x00"


def dirent_hist_key(ws: int, parent: int, name: bytes, seq: int) -> bytes:
    """The ``dirent_hist`` key of ``parent/name`` at ``seq`` (newest first)."""
    return _WS_INO.pack(ws, parent) + name + b"\x00" + U64.pack(SEQ_MAX - seq)


def split_dirent_hist_key(key: bytes) -> tuple[bytes, int]:
    """``(name, seq)`` of a ``dirent_hist`` key."""
    return key[12:-9], SEQ_MAX - U64.unpack(key[-8:])[0]


def encode_dirent(ino: int, kind: int) -> bytes:
    """A dirent value: ino u64 and kind u8 (``model.KIND_*``)."""
    return _DIRENT_VALUE.pack(ino, kind)


def decode_dirent(value: bytes) -> tuple[int, int] | None:
    """``(ino, kind)``, or None for a whiteout / removal."""
    if not value:
        return None
    return _DIRENT_VALUE.unpack(value)


_HIST_RUN = 0x01
HIST_RUN_MAX_BYTES = 256          # a dirent_hist run is at most this long (~40 versions)
_NIL = b"\xc0"


def is_hist_run(value: bytes) -> bool:
    """True if the ``dirent_hist`` value ``value`` is a run (:func:`encode_hist_run`):
    not 0 bytes (a removal) nor 9 (an entry), with the tag ``0x01``."""
    return len(value) not in (0, _DIRENT_VALUE.size) and value[0] == _HIST_RUN


def _hist_ints(seq_offset: int | None, entry: tuple[int, int] | None) -> bytes:
    head = b"" if seq_offset is None else msgpack.packb(seq_offset)
    if entry is None:
        return head + msgpack.packb(0)
    return head + msgpack.packb(entry[0]) + msgpack.packb(entry[1])


def encode_hist_run(versions: list[tuple[int, tuple[int, int] | None]]) -> bytes:
    """A **run**: consecutive ``dirent_hist`` records of one name (``(seq,
    (ino, kind))``, or ``(seq, None)`` for a removal, oldest first) in one
    record under the oldest one's key (issue 9 §6: one key and LMDB node for
    up to :data:`HIST_RUN_MAX_BYTES` of records; a name's newest record stays
    its own, as the head entry's twin). Bytes: the tag ``0x01``, then
    MessagePack integers one after another (no array: :func:`hist_run_append`
    concatenates): the first version's ino (0: a removal; inode numbers start
    past 0) and, unless removed, its kind; then for each newer version its
    seq less the key's, its ino and kind the same way. A nil (ignored) is
    appended where the run would otherwise be 9 bytes long (the length of an
    entry, which tells the forms apart). Raises ``ValueError`` if the seqs do
    not rise."""
    first = versions[0][0]
    parts, last = [], None
    for seq, entry in versions:
        if last is not None and seq <= last:
            raise ValueError("a run's seqs rise")
        parts.append(_hist_ints(None if last is None else seq - first, entry))
        last = seq
    out = bytes((_HIST_RUN,)) + b"".join(parts)
    return out + _NIL if len(out) == _DIRENT_VALUE.size else out


def hist_run_versions(value: bytes, first_seq: int) -> list[tuple[int, tuple[int, int] | None]]:
    """Every ``(seq, (ino, kind) or None)`` of the ``dirent_hist`` value ``value``
    under a key of seq ``first_seq``, oldest first: one for an entry or removal,
    every version of a run. Raises ``struct.error`` if damaged (as
    :func:`decode_dirent` does)."""
    if not is_hist_run(value):
        return [(first_seq, decode_dirent(value))]
    try:
        unpacker = msgpack.Unpacker()
        unpacker.feed(memoryview(value)[1:])
        flat = [x for x in unpacker if x is not None]
        out = []
        i, last = 0, -1
        while i < len(flat):
            offset = 0
            if i:
                offset = flat[i]
                i += 1
                if offset <= last:
                    raise ValueError
            last = offset
            ino = flat[i]
            if type(ino) is not int or type(offset) is not int or ino < 0:
                raise ValueError
            if ino:
                kind = flat[i + 1]
                if type(kind) is not int or not 0 <= kind <= 255:
                    raise ValueError
                out.append((first_seq + offset, (ino, kind)))
                i += 2
            else:
                out.append((first_seq + offset, None))
                i += 1
    except (ValueError, TypeError, IndexError, msgpack.UnpackException):
        raise struct.error("damaged dirent_hist run") from None
    if not out:
        raise struct.error("damaged dirent_hist run")
    return out


def hist_at(value: bytes, key_seq: int, bound: int) -> tuple[int, int] | None:
    """``(ino, kind)`` or None (removed) of the newest version at or before seq
    ``bound`` in the ``dirent_hist`` value ``value`` under a key of seq
    ``key_seq <= bound`` (a run may hold versions past ``bound``). Raises
    ``struct.error`` if damaged."""
    if not is_hist_run(value):
        return decode_dirent(value)
    found = None
    for seq, entry in hist_run_versions(value, key_seq):
        if seq > bound:
            break
        found = entry
    return found


def hist_run_append(value: bytes, key_seq: int, seq: int, entry: tuple[int, int] | None) -> bytes | None:
    """The ``dirent_hist`` run ``value`` under a key of seq ``key_seq`` with the
    version ``entry`` at ``seq`` appended (``seq`` past every version it holds:
    the caller's order), without decoding it; None if ``value`` is no run or
    the run would pass :data:`HIST_RUN_MAX_BYTES`."""
    if not is_hist_run(value) or seq <= key_seq:
        return None
    out = value + _hist_ints(seq - key_seq, entry)
    if len(out) == _DIRENT_VALUE.size:
        out += _NIL
    return out if len(out) <= HIST_RUN_MAX_BYTES else None


def event_key(ws: int, seq: int) -> bytes:
    """The ``events`` key of ``ws``'s event ``seq`` (oldest first)."""
    return _WS_SEQ.pack(ws, seq)


def event_key_seq(key: bytes) -> int:
    """The seq of an ``events`` key."""
    return _WS_SEQ.unpack(key)[1]


PATH_KEY_MAX = 400          # bytes of a path used as its own key (keys hold at most 511 bytes)
_DIGEST_MARK = b"\x01"
PATH_IDENT_LONG = PATH_KEY_MAX + 1 + ID_SIZE    # length of a digest path key


def path_ident(path: bytes) -> bytes:
    """The path key of ``path`` (module docstring): the path itself up to
    :data:`PATH_KEY_MAX` bytes, else its first :data:`PATH_KEY_MAX` bytes,
    ``0x01`` and its BLAKE3 digest (:data:`PATH_IDENT_LONG` bytes)."""
    if len(path) <= PATH_KEY_MAX:
        return path
    return path[:PATH_KEY_MAX] + _DIGEST_MARK + hash_bytes(path)


def is_long(path: bytes) -> bool:
    """True if ``path`` is keyed by digest (its values carry the whole path)."""
    return len(path) > PATH_KEY_MAX


def below_prefix(directory: bytes) -> tuple[bytes, bool]:
    """``(key prefix, exact)`` of the path keys of paths strictly below
    ``directory`` (after the workspace id): ``directory/`` itself, exact,
    if it fits in a plain key; else the digest-key prefix ``directory/``
    cut to :data:`PATH_KEY_MAX` bytes + ``0x01``, which other long paths with
    the same first bytes share (``exact`` False: compare whole paths)."""
    base = directory + b"/" if directory else b""
    if len(base) <= PATH_KEY_MAX:
        return base, True
    return base[:PATH_KEY_MAX] + _DIGEST_MARK, False


def path_prefix(ws: int, path: bytes) -> bytes:
    """The ``paths`` key prefix of ``path`` (path key, then NUL)."""
    return U32.pack(ws) + path_ident(path) + b"\x00"


def path_key(ws: int, path: bytes, seq: int) -> bytes:
    """The ``paths`` key of ``path``'s entry at ``seq`` (oldest first); at most
    4 + :data:`PATH_IDENT_LONG` + 9 = 446 bytes."""
    return U32.pack(ws) + path_ident(path) + b"\x00" + U64.pack(seq)


def path_key_seq(key: bytes) -> int:
    """The seq of a ``paths`` key."""
    return U64.unpack(key[-8:])[0]


def path_key_ident(key: bytes) -> bytes:
    """The path key inside a ``paths`` key (the path itself unless
    :func:`ident_is_long`)."""
    return bytes(key[4:-9])


def ident_is_long(ident: bytes) -> bool:
    """True if a path key is a digest key (the path is in the value)."""
    return len(ident) > PATH_KEY_MAX


def path_head_key(ws: int, path: bytes) -> bytes:
    """The ``path_heads`` key of ``path``."""
    return U32.pack(ws) + path_ident(path)


def ws_key(ws: int) -> bytes:
    return U32.pack(ws)


def named_key(ws: int, name: bytes) -> bytes:
    return U32.pack(ws) + name


def turn_key(ws: int, agent: bytes, turn: int) -> bytes:
    """Key of a turn label (``turns``)."""
    return U32.pack(ws) + agent + b"\x00" + U32.pack(turn)


def add_totals(txn: lmdb.Transaction, meta_db: lmdb._Database, **deltas: int) -> None:
    """Add ``deltas`` (name -> signed count or bytes) to the store's running
    totals (``TOTALS``, big-endian i64 under ``total:<name>`` in ``meta``),
    inside the caller's write transaction."""
    for name, delta in deltas.items():
        key = b"total:" + name.encode()
        raw = txn.get(key, db=meta_db)
        value = (struct.unpack(">q", raw)[0] if raw else 0) + delta
        txn.put(key, struct.pack(">q", value), db=meta_db)


def read_totals(txn: lmdb.Transaction, meta_db: lmdb._Database) -> dict[str, int]:
    """Every running total (``TOTALS``) as ``{name: value}``; 0 if never added to."""
    out = {}
    for name in TOTALS:
        raw = txn.get(b"total:" + name.encode(), db=meta_db)
        out[name] = struct.unpack(">q", raw)[0] if raw else 0
    return out


# --- workspace records ------------------------------------------------------

@dataclass(slots=True)
class WorkspaceRecord:
    """A workspace: id, root inode, creation time, and its fork origin if any."""

    id: int
    name: str
    root: int
    created: str
    parent: str | None = None       # name of the workspace it was forked from
    parent_id: int | None = None
    fork_seq: int | None = None     # parent's seq at the fork; the fork's seqs continue from it

    def encode(self) -> bytes:
        """The ``workspaces`` value: JSON."""
        return json.dumps({"id": self.id, "name": self.name, "root": self.root, "created": self.created,
                           "parent": self.parent, "parent_id": self.parent_id,
                           "fork_seq": self.fork_seq}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> WorkspaceRecord:
        """From :meth:`encode`'s JSON. Raises ``ValueError``/``KeyError`` if damaged."""
        d = json.loads(raw)
        return cls(d["id"], d["name"], d["root"], d["created"], d.get("parent"), d.get("parent_id"),
                   d.get("fork_seq"))


# --- inode attributes -------------------------------------------------------

# --- chunks and contents ----------------------------------------------------

_CHUNK = struct.Struct("<QQIIBI")
_FIXED_CHUNK_SIZES = (_CHUNK.size, _CHUNK.size + ID_SIZE)
_PACKED_CHUNK = b"\x01"
_VARINT_CHUNK = 0x02


def _uvarints(values) -> bytes:
    """Unsigned LEB128 of each of ``values`` (7 bits a byte, low first; the
    DWARF/protobuf varint)."""
    out = bytearray()
    for v in values:
        if v < 0:
            raise ValueError("a varint is unsigned")
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_uvarints(raw, pos: int, count: int) -> tuple[list[int], int]:
    """``count`` unsigned LEB128 values from ``raw[pos:]`` and the position after
    them. Raises ``IndexError`` if ``raw`` ends first, ``ValueError`` past 64 bits."""
    out = []
    for _ in range(count):
        value = shift = 0
        while True:
            byte = raw[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise ValueError("varint past 64 bits")
        out.append(value)
    return out, pos


@dataclass(slots=True)
class ChunkRecord:
    """Where a chunk is stored and how many references it has: from content
    records, and (``refcount`` includes them) from live delta chunks whose
    base it is (``chunks.index``). ``base`` is the base chunk id of a
    ``CODEC_DELTA`` chunk, else None."""

    pack_no: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    refcount: int
    base: bytes | None = None

    def encode(self) -> bytes:
        """The ``chunks`` value, in the shortest of three forms that is not 29 or
        61 bytes long (those lengths read as the fixed form): the tag byte
        ``0x02``, then pack number, offset, stored length, raw length, codec and
        refcount as unsigned LEB128 varints, then the base chunk id (32 bytes) of
        a delta chunk (pack numbers are random 48-bit numbers: 7 bytes as a
        varint, 9 in MessagePack); the tag byte ``0x01`` and one MessagePack
        array of the same fields, the base a bin (what stores wrote before the
        varint form); or the fixed form (:meth:`encode_fixed`)."""
        fields = [self.pack_no, self.offset, self.stored_len, self.raw_len, self.codec, self.refcount]
        varint = bytes((_VARINT_CHUNK,)) + _uvarints(fields) + (self.base or b"")
        if len(varint) not in _FIXED_CHUNK_SIZES and len(varint) < _CHUNK.size:
            return varint
        if self.base is not None:
            fields.append(self.base)
        packed = _PACKED_CHUNK + msgpack.packb(fields)
        fixed = self.encode_fixed()
        best = min((f for f in (varint, packed) if len(f) not in _FIXED_CHUNK_SIZES), key=len, default=fixed)
        return best if len(best) < len(fixed) else fixed

    def encode_packed(self) -> bytes | None:
        """The MessagePack form of :meth:`encode` (tag ``0x01``), as stores wrote it
        before the varint form, or None where it would read as the fixed form. Tests and tools only."""
        fields = [self.pack_no, self.offset, self.stored_len, self.raw_len, self.codec, self.refcount]
        if self.base is not None:
            fields.append(self.base)
        packed = _PACKED_CHUNK + msgpack.packb(fields)
        return packed if len(packed) not in _FIXED_CHUNK_SIZES else None

    def encode_fixed(self) -> bytes:
        """The fixed form (what stores before packed records hold): pack number, offset, stored and
        raw length, codec, refcount (little-endian ``<QQIIBI``, 29 bytes), then the base chunk id
        (32 bytes) for a delta chunk."""
        head = _CHUNK.pack(self.pack_no, self.offset, self.stored_len, self.raw_len, self.codec, self.refcount)
        return head if self.base is None else head + self.base

    @classmethod
    def decode(cls, raw: bytes) -> ChunkRecord:
        """From :meth:`encode`'s or :meth:`encode_fixed`'s bytes (told apart by length: a
        fixed record is 29 or 61 bytes, a packed one never). Raises ``Corrupt`` if damaged."""
        size = len(raw)
        if size in _FIXED_CHUNK_SIZES:
            record = cls(*_CHUNK.unpack_from(raw))
            if size > _CHUNK.size:
                record.base = bytes(raw[_CHUNK.size:])
            return record
        if size and raw[0] == _VARINT_CHUNK:
            try:
                fields, pos = _read_uvarints(raw, 1, 6)
            except (IndexError, ValueError):
                raise Corrupt("damaged chunk index record") from None
            if pos == size:
                return cls(*fields)
            if size - pos != ID_SIZE:
                raise Corrupt("damaged chunk index record")
            return cls(*fields, bytes(raw[pos:]))
        if not size or raw[0] != _PACKED_CHUNK[0]:
            raise Corrupt("damaged chunk index record")
        try:
            fields = msgpack.unpackb(memoryview(raw)[1:])
            if len(fields) == 6:
                return cls(*fields)
            base = fields[6]
            if len(fields) != 7 or not isinstance(base, bytes) or len(base) != ID_SIZE:
                raise ValueError("unexpected fields")
            return cls(*fields)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise Corrupt("damaged chunk index record") from None


_CONTENT_HEAD = struct.Struct("<QIBI")
_C_HASH = 1
_C_TREE = 2          # format 4: the record holds the root level of an extent tree (``chunks.tree``)
_C_V4 = 4            # format 4: the extents are the canonical chunking and the id is the tree hash
_C_HOLES = 8         # format 4: the content may have hole extents (its dense hash differs from its id)
_C_HASH_IS_ID = 16   # the hash is the record's key (its content id) and is not stored (``_C_HASH`` clear)
_C_LAST_CUT = 32     # flat: the last extent's length is not stored (it is the size less the others')


def _hash_of(flags: int, content_id: bytes | None) -> bytes:
    """The hash of a record with ``_C_HASH_IS_ID``: its key ``content_id``. Raises ``ValueError`` without one."""
    if content_id is None:
        raise ValueError("this content record's hash is its content id: read it with the id")
    return bytes(content_id)


@dataclass(slots=True)
class ContentRecord:
    """One file content: size, content hash, refcount, and its extents.

    Flat (``height == 0``): ``ids`` is the concatenation of the extents'
    chunk ids (32 bytes each, :data:`~chronicle.store.chunks.ids.HOLE_ID` for
    a hole) and ``lengths`` their byte lengths. A tree root (``height > 0``):
    ``root`` holds references ``(node hash, bytes, extents)`` to nodes of
    that height in ``content_nodes`` (``chunks.tree``), and ``ids``/``lengths``
    are empty; read its extents with ``meta.nodes.NodeStore``. ``hash`` is
    None only for a format-3 content too sparse to hash at commit.
    ``refcount`` counts the inode records that refer to it.
    """

    size: int
    hash: bytes | None
    ids: bytes
    lengths: array
    refcount: int = 0
    height: int = 0
    root: list | None = None
    v4: bool = False
    holes: bool = False

    def __post_init__(self):
        if len(self.ids) != ID_SIZE * len(self.lengths):
            raise Corrupt("content record extent lists disagree")

    @property
    def is_tree(self) -> bool:
        """True if the extents are in ``content_nodes`` (``root``), not inline."""
        return self.height > 0

    @property
    def extent_count(self) -> int:
        """Number of extents."""
        if self.height:
            return sum(e[2] for e in self.root)
        return len(self.lengths)

    def chunk_id(self, i: int) -> bytes:
        """The chunk id of extent ``i`` (:data:`HOLE_ID` for a hole); flat records only."""
        if self.height:
            raise AssertionError("chunk_id of a tree content record: read it through meta.nodes")
        return self.ids[i * ID_SIZE:(i + 1) * ID_SIZE]

    def offsets(self) -> array:
        """Start offset of every extent (array of u64); flat records only."""
        out = array("Q", [0])
        out.extend(accumulate(self.lengths))
        return out

    def encode(self, content_id: bytes | None = None) -> bytes:
        """The ``contents`` value under the key ``content_id``: size, refcount, flags, count
        (little-endian u64, u32, u8, u32); the hash if any, unless it is ``content_id``
        (flag ``_C_HASH_IS_ID``: the key gives it back; records written before it, and
        without ``content_id``, store it); then either ids and lengths (u64 each; with
        ``content_id``, the last length left out where the lengths add up to the size:
        flag ``_C_LAST_CUT``), or (``_C_TREE``) the height u8 and the root's entries."""
        flags = self._flags()
        digest = self.hash or b""
        if digest and content_id is not None and digest == content_id:
            flags, digest = (flags & ~_C_HASH) | _C_HASH_IS_ID, b""
        if self.height:
            head = _CONTENT_HEAD.pack(self.size, self.refcount, _C_TREE | flags, len(self.root))
            return b"".join((head, digest, bytes([self.height]), encode_entries(self.height, self.root)))
        lengths = self.lengths if self.lengths.typecode == "Q" else array("Q", self.lengths)
        if lengths.itemsize != 8:
            raise AssertionError("array('Q') must be 64-bit")
        stored = lengths.tobytes()
        if content_id is not None and len(lengths) and sum(lengths) == self.size:
            flags |= _C_LAST_CUT
            stored = stored[:-8]
        head = _CONTENT_HEAD.pack(self.size, self.refcount, flags, len(self.lengths))
        return b"".join((head, digest, self.ids, stored))

    def _flags(self) -> int:
        return (_C_HASH if self.hash else 0) | (_C_V4 if self.v4 else 0) | (_C_HOLES if self.holes else 0)

    @classmethod
    def decode(cls, raw: bytes, content_id: bytes | None = None) -> ContentRecord:
        """From :meth:`encode`'s bytes; ``content_id`` is the record's key, which a
        record with ``_C_HASH_IS_ID`` needs (``ValueError`` without it). Raises
        ``Corrupt`` if damaged."""
        try:
            size, refcount, flags, count = _CONTENT_HEAD.unpack_from(raw)
        except struct.error:
            raise Corrupt("damaged content record") from None
        pos = _CONTENT_HEAD.size
        digest = None
        if flags & _C_HASH:
            digest = bytes(raw[pos:pos + ID_SIZE])
            pos += ID_SIZE
        elif flags & _C_HASH_IS_ID:
            digest = _hash_of(flags, content_id)
        if flags & _C_TREE:
            if pos >= len(raw):
                raise Corrupt("damaged content record")
            height = raw[pos]
            try:
                root = decode_entries(height, raw[pos + 1:])
            except ValueError:
                raise Corrupt("damaged content record") from None
            if height == 0 or len(root) != count:
                raise Corrupt("damaged content record")
            return cls(size, digest, b"", array("Q"), refcount, height, root, True, bool(flags & _C_HOLES))
        ids = bytes(raw[pos:pos + count * ID_SIZE])
        pos += count * ID_SIZE
        lengths = array("Q")
        cut = bool(flags & _C_LAST_CUT) and count > 0
        lengths.frombytes(raw[pos:pos + 8 * (count - cut)])
        if len(ids) != count * ID_SIZE or len(lengths) != count - cut:
            raise Corrupt("damaged content record")
        if cut:
            rest = size - sum(lengths)
            if rest < 0:
                raise Corrupt("damaged content record")
            lengths.append(rest)
        return cls(size, digest, ids, lengths, refcount, v4=bool(flags & _C_V4), holes=bool(flags & _C_HOLES))


def flat_record(size: int, digest: bytes | None, extents: list) -> ContentRecord:
    """A flat content record over ``extents`` (``(id, length, ...)`` tuples)."""
    return ContentRecord(size, digest, b"".join(e[0] for e in extents), array("Q", [e[1] for e in extents]))


_NODE_HEAD = struct.Struct("<IB")


def encode_node(refcount: int, height: int, entries: list) -> bytes:
    """A ``content_nodes`` value: refcount u32, height u8 (1: a leaf of extents), entries
    (``chunks.tree.encode_entries`` of level ``height - 1``)."""
    return _NODE_HEAD.pack(refcount, height) + encode_entries(height - 1, entries)


def decode_node(raw: bytes) -> tuple[int, int, list]:
    """``(refcount, height, entries)`` of a ``content_nodes`` value. Raises ``Corrupt``."""
    try:
        refcount, height = _NODE_HEAD.unpack_from(raw)
        if height == 0:
            raise ValueError
        return refcount, height, decode_entries(height - 1, raw[_NODE_HEAD.size:])
    except (struct.error, ValueError):
        raise Corrupt("damaged content node") from None


def node_refcount(raw: bytes) -> int:
    """The refcount of a ``content_nodes`` value."""
    try:
        return _NODE_HEAD.unpack_from(raw)[0]
    except struct.error:
        raise Corrupt("damaged content node") from None


def node_with_refcount(raw: bytes, refcount: int) -> bytes:
    """A ``content_nodes`` value with its refcount replaced."""
    if refcount < 0:
        raise Corrupt("content node refcount would go negative")
    return struct.pack("<I", refcount) + bytes(raw[4:])


def empty_record() -> ContentRecord:
    """The record of the empty content (no chunks, never refcounted)."""
    return ContentRecord(0, EMPTY_CONTENT_ID, b"", array("Q"))


def content_header(raw: bytes, content_id: bytes | None = None) -> tuple[int, int, bytes | None]:
    """``(size, refcount, hash)`` of an encoded content record, without
    decoding its extent list; ``content_id`` is its key, which a record with
    ``_C_HASH_IS_ID`` needs (``ValueError`` without it). Raises ``Corrupt`` if damaged."""
    try:
        size, refcount, flags, _count = _CONTENT_HEAD.unpack_from(raw)
    except struct.error:
        raise Corrupt("damaged content record") from None
    if flags & _C_HASH:
        digest = bytes(raw[_CONTENT_HEAD.size:_CONTENT_HEAD.size + ID_SIZE])
    elif flags & _C_HASH_IS_ID:
        digest = _hash_of(flags, content_id)
    else:
        digest = None
    return size, refcount, digest


def content_is_dense_v4(raw: bytes) -> bool:
    """True if an encoded content record was written by format 4 (its id is
    the tree hash of canonical chunks, ``chunks.tree``) and has no holes (so
    its id is also the hash of its bytes read densely)."""
    try:
        flags = _CONTENT_HEAD.unpack_from(raw)[2]
    except struct.error:
        raise Corrupt("damaged content record") from None
    return bool(flags & (_C_V4 | _C_TREE)) and not flags & _C_HOLES


def content_with_refcount(raw: bytes, refcount: int) -> bytes:
    """An encoded content record with its refcount replaced."""
    if refcount < 0:
        raise Corrupt("content refcount would go negative")
    out = bytearray(raw)
    struct.pack_into("<I", out, 8, refcount)
    return bytes(out)


# --- path history -----------------------------------------------------------

_PATH_ENTRY_HEAD = struct.Struct("<BQII")
P_BUMPS = 1      # the event gives the path a new version number
P_CONTENT = 2    # the entry carries a content id (regular file content after the event)
P_DIR = 4        # the path is a directory after (or, for removals, before) the event
P_GONE = 8       # after the event nothing is at the path (delete, rename away)
P_ARRIVED = 16   # something arrived at a path that was free (create, mkdir, link, symlink, rename)
P_UNVERSIONED = 32   # an ignored path's version: it replaced the path's earlier ones (``gc.ignore``)
P_PRUNED = 64    # a version GC pruned: no content any more (``gc.prune``); it keeps its number
P_HASH_CUT = 128  # stored only (never in ``PathEntry.flags``): the fragment's ``"hash"`` is the content id's hex,
                  # cut out of the stored fragment at the u16 offset after the content id
                  # (``PathEntry.encode_text``: read, no longer written)
_HASH_AT = struct.Struct("<H")
_TEXT_TAG = b"\x02"            # before a text fragment that would start with a tag byte
_FRAGMENT_TAGS = (bytes((events.PACKED,)), _TEXT_TAG)
_FRAGMENT_TAG_BYTES = (events.PACKED, _TEXT_TAG[0])
PATH_ENTRY_CONTENT_AT = _PATH_ENTRY_HEAD.size     # where a stored entry's content id starts (with P_CONTENT)


@dataclass(frozen=True, slots=True)
class PathEntry:
    """One event in one path's history.

    ``fragment`` is the entry's JSON object without its leading
    ``{"version": N, `` (so rendering 10,000 entries is joins, not 10,000
    ``json.dumps``); ``content`` the file content id after the event;
    ``origin`` the path it came from when it arrived by rename at a free path
    (history follows it back there, as ``git log --follow``); ``path`` the
    whole path when its key is a digest key (``b""`` otherwise: the key is the path).
    """

    flags: int
    ino: int
    content: bytes
    origin: bytes
    fragment: bytes
    path: bytes = b""

    def encode(self, key: bytes | None = None) -> bytes:
        """The ``paths`` value under the ``paths`` key ``key``: flags u8, ino u64, origin
        length u32, path length u32; content id (with ``P_CONTENT``); origin; path;
        fragment (little-endian). The fragment is stored packed
        (``meta.events.pack_fragment``: tag byte ``0x01``, its ``"hash"`` a mark where it
        is the content id's hex and, given ``key``, its ``"seq"`` and ``"path"`` left out
        where they are the key's: :meth:`decode` then needs the key) when it has a log
        line's shape, else as text (which starts with ``"``; one starting with a tag byte
        gets the tag ``0x02`` in front)."""
        flags = self.flags & ~P_HASH_CUT
        content = self.content if flags & P_CONTENT else b""
        if key is None:
            fragment = events.pack_fragment(self.fragment, content)
        else:
            fragment = events.pack_fragment(self.fragment, content, path_key_seq(key),
                                            os.fsdecode(self._whole_path(key)))
        if fragment is None:
            fragment = self.fragment if self.fragment[:1] not in _FRAGMENT_TAGS else _TEXT_TAG + self.fragment
        return b"".join((_PATH_ENTRY_HEAD.pack(flags, self.ino, len(self.origin), len(self.path)),
                         content, self.origin, self.path, fragment))

    def encode_text(self) -> bytes:
        """The ``paths`` value as format 4 wrote it before packed fragments (the
        fragment as text, its ``"hash"`` cut out where it is the content id's hex,
        flag ``P_HASH_CUT`` and the u16 offset after the content id); still read.
        Tests and tools only."""
        fragment, flags, cut = self.fragment, self.flags & ~P_HASH_CUT, b""
        if flags & P_CONTENT and len(self.content) == ID_SIZE:
            needle = b', "hash": "' + self.content.hex().encode() + b'"'
            at = fragment.find(needle)
            if 0 <= at <= 0xFFFF:
                fragment = fragment[:at] + fragment[at + len(needle):]
                flags |= P_HASH_CUT
                cut = _HASH_AT.pack(at)
        return b"".join((_PATH_ENTRY_HEAD.pack(flags, self.ino, len(self.origin), len(self.path)),
                         self.content if flags & P_CONTENT else b"", cut, self.origin, self.path, fragment))

    def _whole_path(self, key: bytes) -> bytes:
        ident = path_key_ident(key)
        return self.path if ident_is_long(ident) else ident

    @classmethod
    def decode(cls, raw: bytes, key: bytes | None = None) -> PathEntry:
        """From :meth:`encode`'s bytes (or :meth:`encode_text`'s, or the text fragment
        format 4 first wrote) stored under the ``paths`` key ``key``, which an entry
        encoded with its key needs (``ValueError`` without it). Raises
        ``struct.error``/``ValueError`` if damaged."""
        flags, ino, origin_len, path_len = _PATH_ENTRY_HEAD.unpack_from(raw)
        pos = _PATH_ENTRY_HEAD.size
        content = b""
        if flags & P_CONTENT:
            content = bytes(raw[pos:pos + ID_SIZE])
            pos += ID_SIZE
        at = None
        if flags & P_HASH_CUT:
            at = _HASH_AT.unpack_from(raw, pos)[0]
            pos += _HASH_AT.size
        origin = bytes(raw[pos:pos + origin_len])
        pos += origin_len
        path = bytes(raw[pos:pos + path_len])
        pos += path_len
        if pos > len(raw) or (at is not None and (len(content) != ID_SIZE or pos + at > len(raw))):
            raise ValueError("damaged path entry")
        if at is not None:
            fragment = bytes(raw[pos:pos + at]) + b', "hash": "' + hexlify(content) + b'"' + bytes(raw[pos + at:])
        elif pos < len(raw) and raw[pos] == events.PACKED:
            if key is None:
                fragment = events.render_fragment(raw[pos:], content)
            else:
                ident = bytes(key[4:-9])
                fragment = events.render_fragment(raw[pos:], content, U64.unpack_from(key, len(key) - 8)[0],
                                                  path if len(ident) > PATH_KEY_MAX else ident)
        elif pos < len(raw) and raw[pos] == _TEXT_TAG[0]:
            fragment = bytes(raw[pos + 1:])
        else:
            fragment = bytes(raw[pos:])
        return cls(flags & ~P_HASH_CUT, ino, content, origin, fragment, path)


def entry_fragment_at(raw: bytes) -> int:
    """Where the stored fragment of the ``paths`` value ``raw`` starts (no
    ``P_HASH_CUT``). Raises ``struct.error`` if damaged."""
    flags, _ino, origin_len, path_len = _PATH_ENTRY_HEAD.unpack_from(raw)
    return _PATH_ENTRY_HEAD.size + (ID_SIZE if flags & P_CONTENT else 0) + origin_len + path_len


def pruned_entry(raw: bytes) -> bytes | None:
    """The pruned mark (``gc.prune``) of the ``paths`` value ``raw``, which has
    content and a packed fragment: ``P_CONTENT`` and the content id dropped,
    ``P_PRUNED`` set, the fragment marked (``meta.events.mark_fragment_pruned``);
    None if its fragment is not packed or that function leaves it to the text
    mark. Raises ``struct.error``/``ValueError`` if damaged."""
    flags, ino, origin_len, path_len = _PATH_ENTRY_HEAD.unpack_from(raw)
    if flags & P_HASH_CUT or not flags & P_CONTENT:
        return None
    at = _PATH_ENTRY_HEAD.size + ID_SIZE + origin_len + path_len
    if at >= len(raw) or raw[at] != events.PACKED:
        return None
    content = raw[_PATH_ENTRY_HEAD.size:_PATH_ENTRY_HEAD.size + ID_SIZE]
    marked = events.mark_fragment_pruned(raw[at:], content)
    if marked is None:
        return None
    return b"".join((_PATH_ENTRY_HEAD.pack((flags & ~P_CONTENT) | P_PRUNED, ino, origin_len, path_len),
                     raw[_PATH_ENTRY_HEAD.size + ID_SIZE:at], marked))


def entry_is_packed(raw: bytes) -> bool:
    """True if the ``paths`` value ``raw`` does not end in its fragment's text:
    packed, or text behind the tag ``0x02`` (``PathEntry.encode``); False for
    ``P_HASH_CUT`` records."""
    if raw[0] & P_HASH_CUT:
        return False
    at = entry_fragment_at(raw)
    return at < len(raw) and raw[at] in _FRAGMENT_TAG_BYTES


_PATH_HEAD = struct.Struct("<IQQ")


@dataclass(frozen=True, slots=True)
class PathHead:
    """Per-path summary kept beside the entries: the last version number, the
    seq of the last entry, and the inode of the last entry; ``path`` the whole
    path when its key is a digest key (``b""`` otherwise)."""

    version: int
    last_seq: int
    ino: int
    path: bytes = b""

    def encode(self) -> bytes:
        """The ``path_heads`` value: version u32, last seq u64, ino u64 (little-endian), then the path if long."""
        return _PATH_HEAD.pack(self.version, self.last_seq, self.ino) + self.path

    @classmethod
    def decode(cls, raw: bytes) -> PathHead:
        """From :meth:`encode`'s bytes. Raises ``struct.error`` if damaged."""
        return cls(*_PATH_HEAD.unpack_from(raw), bytes(raw[_PATH_HEAD.size:]))
