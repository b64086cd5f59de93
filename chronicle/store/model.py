"""The store's domain types, with no storage in them.

- :class:`Attrs` — one inode's state (mode with type bits, owner, link count,
  size in bytes, times in ns since the epoch, content id, symlink target,
  xattrs) and its compact binary form, as every layer passes it around.
- **kinds** — the file type of a directory entry (``KIND_FILE``, ``KIND_DIR``,
  ``KIND_SYMLINK``, ``KIND_OTHER``), kept in dirents so readdir needs no inode.
- :class:`Actor` — who makes a change: uid, gid and pid of the caller (the
  FUSE request context, or the CLI user); :data:`SYSTEM` is root, pid 0.

Threads: every type here is immutable and may be shared by any thread.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

import msgpack

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, ID_SIZE


# dirent kinds (the file type, so readdir needs no inode read)
KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_OTHER = 1, 2, 3, 4


def kind_of_mode(mode: int) -> int:
    """The dirent kind (``KIND_*``) of a ``st_mode`` with its type bits."""
    if stat.S_ISREG(mode):
        return KIND_FILE
    if stat.S_ISDIR(mode):
        return KIND_DIR
    if stat.S_ISLNK(mode):
        return KIND_SYMLINK
    return KIND_OTHER


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: the caller's uid, gid and pid."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


SYSTEM = Actor()


_ATTR_HEAD = struct.Struct("<IIIIQqqqIB")
_F_CONTENT, _F_TARGET, _F_XATTRS = 1, 2, 4
_PACKED = 0x01            # tag of a packed record (no content): MessagePack array follows
_PACKED_TAG = bytes((_PACKED,))
_PACKED_CONTENT = 0x02    # tag of a packed record with content: MessagePack array, the content id first
_PACKED_CONTENT_TAG = bytes((_PACKED_CONTENT,))
_PACKED_EMPTY = 0x03      # tag of a packed record whose content is the empty content: nlink first, no content id
_PACKED_EMPTY_TAG = bytes((_PACKED_EMPTY,))
_PACKED_TAGS = (_PACKED, _PACKED_CONTENT, _PACKED_EMPTY)
_RUN = 0x04               # tag of a run record: versions of an inode without content (:func:`encode_run`)
_RUN_TAG = bytes((_RUN,))
RUN_MAX_BYTES = 640       # a run is at most this long (well inside an LMDB page: no overflow page; ~60 versions)
_BIN_ID = bytes((0xC4, ID_SIZE))        # MessagePack bin 8 header of a content id
_PACKED_ID_AT = 4                       # tag, fixarray header, bin header (2): the content id starts here
_PACKED_NLINK_AT = _PACKED_ID_AT + ID_SIZE   # nlink's MessagePack int follows the content id
_FIXED_ID_AT = _ATTR_HEAD.size          # the fixed form's content id (with ``_F_CONTENT``)
_NLINK_AT = 12                          # the fixed form's nlink u32
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Attrs:
    """One inode's state. Immutable: change with :meth:`replace`.

    ``mode`` includes the file type bits; times are ns since the epoch;
    ``content`` is the content id of a regular file (``b""`` otherwise);
    ``target`` the symlink target; ``xattrs`` sorted ``(name, value)`` pairs.
    """

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    content: bytes = b""
    target: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = field(default=())

    def replace(self, **changes) -> Attrs:
        """A copy with ``changes`` (field names as keywords). Raises ``TypeError`` for an unknown field."""
        # dataclasses.replace re-runs __init__ with field processing (~12 us);
        # a slot copy is a few times faster and this is on every event's path.
        new = object.__new__(Attrs)
        for name in Attrs.__slots__:
            object.__setattr__(new, name, changes.pop(name) if name in changes else getattr(self, name))
        if changes:
            raise TypeError(f"unknown Attrs fields: {sorted(changes)}")
        return new

    @property
    def kind(self) -> int:
        """The dirent kind (``KIND_*``)."""
        return kind_of_mode(self.mode)

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link."""
        return stat.S_ISLNK(self.mode)

    def encode(self) -> bytes:
        """The ``inodes`` record, in one of three forms; :meth:`decode` reads each.

        An inode whose mode has file type bits is stored *packed* when that
        is shorter than the fixed form below. Without content (a directory,
        symlink, device): the tag byte ``0x01``, then one MessagePack array
        ``[mode, uid, gid, nlink, size, atime, mtime - atime, ctime - mtime,
        rdev]`` (times in ns), with the symlink target (bin) and the xattrs
        (``[name, value, ...]``) appended when present (the target ``b""``
        when only xattrs are). With content (a regular file): the tag byte
        ``0x02``, then the array ``[content, nlink, mode, uid, gid, size,
        atime, mtime - atime, ctime - mtime, rdev]`` and the same optional
        tail; the content id (bin 8 of 32 bytes) is thus at bytes 4..36 and
        nlink's MessagePack int at byte 36, which gc reads and rewrites in
        place (:func:`inode_content_nlink`, :func:`inode_with_content`).
        A file whose content is the empty content (a file just created:
        ``EMPTY_CONTENT_ID``, which the key-less record need not repeat) has
        the tag ``0x03`` and the array ``[nlink, mode, uid, gid, size, atime,
        mtime - atime, ctime - mtime, rdev]`` with the same optional tail
        (nlink's MessagePack int at byte 2).
        A packed record's second byte is a fixarray header (``0x9N``), which
        the fixed form's second byte (the mode's type bits, ``0x1``..``0xC``,
        in its high half) never is: every form decodes.

        Otherwise (format 4 until this form, and records whose packed form
        is not shorter), a fixed little-endian head (mode, uid, gid, nlink
        u32; size u64; atime, mtime, ctime i64 ns; rdev u32; flags u8), then
        the content id (32 bytes), the symlink target (u32 length + bytes)
        and the xattrs (u32 count, then u16 name length, u32 value length,
        name, value each), each only if present (flags)."""
        if self.mode & 0o170000:
            packed = self._pack()
            if packed is not None:
                return packed
        return self._fixed()

    def _pack(self) -> bytes | None:
        """The packed form (:meth:`encode`), or None where it is not shorter than the fixed one."""
        content = self.content
        if content and len(content) != ID_SIZE:
            return None
        atime, mtime = self.atime_ns, self.mtime_ns
        tag = _PACKED_CONTENT_TAG if content else _PACKED_TAG
        if content == EMPTY_CONTENT_ID:
            tag = _PACKED_EMPTY_TAG
            fields = [self.nlink, self.mode, self.uid, self.gid, self.size, atime, mtime - atime,
                      self.ctime_ns - mtime, self.rdev]
        elif content:
            fields = [content, self.nlink, self.mode, self.uid, self.gid, self.size, atime,
                      mtime - atime, self.ctime_ns - mtime, self.rdev]
        else:
            fields = [self.mode, self.uid, self.gid, self.nlink, self.size, atime,
                      mtime - atime, self.ctime_ns - mtime, self.rdev]
        fixed = _ATTR_HEAD.size + len(content)
        if self.target or self.xattrs:
            fields.append(self.target)
            if self.target:
                fixed += 4 + len(self.target)
        if self.xattrs:
            fields.append([part for pair in self.xattrs for part in pair])
            fixed += 4 + sum(6 + len(name) + len(value) for name, value in self.xattrs)
        try:
            packed = msgpack.packb(fields)
        except OverflowError:           # a time difference past 64 bits
            return None
        if len(packed) + 1 >= fixed or packed[0] & 0xF0 != 0x90:
            return None
        return tag + packed

    @classmethod
    def decode(cls, raw: bytes) -> Attrs:
        """From :meth:`encode`'s bytes (any form), or the oldest version of a
        run record (:func:`encode_run`: the inode's state at its key's seq;
        :func:`attrs_at` reads the others). Raises ``Corrupt`` if damaged."""
        if is_run(raw):
            return _run_fields(raw)[0]
        if len(raw) > 1 and raw[1] & 0xF0 == 0x90:
            if raw[0] == _PACKED:
                return cls._unpack(raw)
            if raw[0] == _PACKED_CONTENT:
                return cls._unpack_content(raw)
            if raw[0] == _PACKED_EMPTY:
                return cls._unpack(raw, EMPTY_CONTENT_ID)
        try:
            mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, flags = _ATTR_HEAD.unpack_from(raw)
            pos = _ATTR_HEAD.size
            content = target = b""
            xattrs: list[tuple[bytes, bytes]] = []
            if flags & _F_CONTENT:
                content = bytes(raw[pos:pos + ID_SIZE])
                pos += ID_SIZE
            if flags & _F_TARGET:
                (n,) = struct.unpack_from("<I", raw, pos)
                target = bytes(raw[pos + 4:pos + 4 + n])
                pos += 4 + n
            if flags & _F_XATTRS:
                (count,) = struct.unpack_from("<I", raw, pos)
                pos += 4
                for _ in range(count):
                    nlen, vlen = struct.unpack_from("<HI", raw, pos)
                    pos += 6
                    xattrs.append((bytes(raw[pos:pos + nlen]), bytes(raw[pos + nlen:pos + nlen + vlen])))
                    pos += nlen + vlen
        except struct.error as exc:
            raise Corrupt(f"damaged inode record: {exc}") from None
        return cls(mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, content, target, tuple(xattrs))

    @classmethod
    def _unpack(cls, raw: bytes, content: bytes = b"") -> Attrs:
        """A packed record without a content id: tag 0x01 (``mode`` first, no
        content) or, with ``content=EMPTY_CONTENT_ID``, tag 0x03 (``nlink``
        first, an empty file). Raises ``Corrupt``."""
        try:
            fields = msgpack.unpackb(memoryview(raw)[1:])
            if content:
                nlink, mode, uid, gid, size, atime, mtime_delta, ctime_delta, rdev = fields[:9]
            else:
                mode, uid, gid, nlink, size, atime, mtime_delta, ctime_delta, rdev = fields[:9]
            target = fields[9] if len(fields) > 9 else b""
            flat = fields[10] if len(fields) > 10 else ()
            if len(fields) > 11 or not isinstance(target, bytes) or len(flat) % 2:
                raise ValueError("unexpected fields")
            xattrs = tuple(zip(flat[0::2], flat[1::2]))
            mtime = atime + mtime_delta
            return cls(mode, uid, gid, nlink, size, atime, mtime, mtime + ctime_delta, rdev, content, target, xattrs)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise Corrupt(f"damaged inode record: {exc}") from None

    @classmethod
    def _unpack_content(cls, raw: bytes) -> Attrs:
        try:
            fields = msgpack.unpackb(memoryview(raw)[1:])
            content, nlink, mode, uid, gid, size, atime, mtime_delta, ctime_delta, rdev = fields[:10]
            target = fields[10] if len(fields) > 10 else b""
            flat = fields[11] if len(fields) > 11 else ()
            if (len(fields) > 12 or not isinstance(target, bytes) or len(flat) % 2
                    or not isinstance(content, bytes) or len(content) != ID_SIZE):
                raise ValueError("unexpected fields")
            xattrs = tuple(zip(flat[0::2], flat[1::2]))
            mtime = atime + mtime_delta
            return cls(mode, uid, gid, nlink, size, atime, mtime, mtime + ctime_delta, rdev, content, target, xattrs)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise Corrupt(f"damaged inode record: {exc}") from None

    def encode_fixed(self) -> bytes:
        """The fixed form of the ``inodes`` record (:meth:`encode`), all that
        format 4 wrote before packed records; still read. Tests and tools only."""
        return self._fixed()

    def _fixed(self) -> bytes:
        flags = (_F_CONTENT if self.content else 0) | (_F_TARGET if self.target else 0) | \
                (_F_XATTRS if self.xattrs else 0)
        parts = [_ATTR_HEAD.pack(self.mode, self.uid, self.gid, self.nlink, self.size, self.atime_ns,
                                 self.mtime_ns, self.ctime_ns, self.rdev, flags)]
        if self.content:
            parts.append(self.content)
        if self.target:
            parts.append(struct.pack("<I", len(self.target)))
            parts.append(self.target)
        if self.xattrs:
            parts.append(struct.pack("<I", len(self.xattrs)))
            for name, value in self.xattrs:
                parts.append(struct.pack("<HI", len(name), len(value)))
                parts.append(name)
                parts.append(value)
        return b"".join(parts)


def _packed_content(raw: bytes) -> bool:
    """True if the ``inodes`` record ``raw`` is packed with content (tag ``0x02``, :meth:`Attrs.encode`)."""
    return (len(raw) > _PACKED_NLINK_AT and raw[0] == _PACKED_CONTENT and raw[1] & 0xF0 == 0x90
            and raw[2:_PACKED_ID_AT] == _BIN_ID)


def inode_content_nlink(raw: bytes) -> tuple[bytes, int]:
    """``(content id, nlink)`` of an encoded ``inodes`` record (any form of
    :meth:`Attrs.encode`, or a run: ``b""``), as ``Attrs.decode(raw)`` would give them, read in
    place where the form allows (gc reads a million); the content id is
    ``b""`` for an inode without content. Raises ``Corrupt`` if damaged."""
    if _packed_content(raw):
        nlink = raw[_PACKED_NLINK_AT]
        if nlink >= 0x80:               # not a positive fixint: decode the whole record
            nlink = Attrs.decode(raw).nlink
        return bytes(raw[_PACKED_ID_AT:_PACKED_NLINK_AT]), nlink
    if len(raw) > 2 and raw[0] == _PACKED_EMPTY and raw[1] & 0xF0 == 0x90 and raw[2] < 0x80:
        return EMPTY_CONTENT_ID, raw[2]             # nlink a positive fixint, first in the array
    if (len(raw) > 1 and raw[1] & 0xF0 == 0x90 and raw[0] in _PACKED_TAGS) or is_run(raw):
        attrs = Attrs.decode(raw)       # (a run: its oldest version's; no version of a run has content)
        return attrs.content, attrs.nlink
    if len(raw) < _ATTR_HEAD.size:
        raise Corrupt("damaged inode record: short head")
    nlink = _U32.unpack_from(raw, _NLINK_AT)[0]
    if not raw[_ATTR_HEAD.size - 1] & _F_CONTENT:
        return b"", nlink
    if len(raw) < _FIXED_ID_AT + ID_SIZE:
        raise Corrupt("damaged inode record: short content id")
    return bytes(raw[_FIXED_ID_AT:_FIXED_ID_AT + ID_SIZE]), nlink


def inode_content(raw: bytes) -> bytes:
    """The content id of an encoded ``inodes`` record (``b""`` without content); see
    :func:`inode_content_nlink`. Raises ``Corrupt`` if damaged."""
    return inode_content_nlink(raw)[0]


def inode_with_content(raw: bytes, content: bytes) -> bytes:
    """The encoded ``inodes`` record ``raw``, which has content, with its content
    id replaced by ``content`` (32 bytes) in place: every other byte is kept
    (a record of the empty content, which stores no id, is decoded and
    encoded again with ``content``). Raises ``Corrupt`` if ``raw`` has no
    content id or is damaged."""
    if len(content) != ID_SIZE:
        raise ValueError("a content id is 32 bytes")
    if _packed_content(raw):
        at = _PACKED_ID_AT
    elif (len(raw) > 1 and raw[1] & 0xF0 == 0x90 and raw[0] in _PACKED_TAGS) or is_run(raw):
        attrs = Attrs.decode(raw)       # the empty content's form, or damaged or odd: decode checks
        if not attrs.content:
            raise Corrupt("inode record without content")
        return attrs.replace(content=content).encode()
    elif len(raw) >= _FIXED_ID_AT + ID_SIZE and raw[_ATTR_HEAD.size - 1] & _F_CONTENT:
        at = _FIXED_ID_AT
    else:
        raise Corrupt("inode record without content")
    return b"".join((raw[:at], content, raw[at + ID_SIZE:]))


# --- runs: several versions of an inode without content in one record ------------------------

def encode_run(first: Attrs) -> bytes:
    """A **run record** of one version, ``first``, which :func:`run_append`
    extends: consecutive versions of one inode without content (a
    directory's, whose times and link count change with every entry added or
    removed, and nothing else) in one ``inodes`` record under the key of the
    oldest (issue 9 §6: one key and LMDB node for many versions). Bytes: the
    tag ``0x04``, a MessagePack array of one bin, ``first``'s record
    (:meth:`Attrs.encode`), then for each newer version, oldest first, one
    MessagePack array ``[seq delta, mtime delta, ctime - mtime]`` (deltas
    from the version before), with the link count appended where it
    changed: every other field is ``first``'s. Appending is concatenating;
    the newest version's seq and times are summed from the arrays without
    building the versions before it (the journal appends at every
    directory event).
    decoding. The second byte is a fixarray header (``0x91``), which the fixed
    form's second byte (a mode's type bits, ``0x1``..``0xC``, in its high
    half) never is: every form still decodes. Read with
    :func:`attrs_at`/:func:`run_versions`; :meth:`Attrs.decode` gives
    ``first``. Raises ``ValueError`` for an inode with content (those stay
    one record a version: gc rewrites them in place)."""
    if first.content:
        raise ValueError("a run holds versions without content")
    return _RUN_TAG + msgpack.packb([first.encode()])


def is_run(raw: bytes) -> bool:
    """True if the ``inodes`` record ``raw`` is a run record (:func:`encode_run`)."""
    return len(raw) > 2 and raw[0] == _RUN and raw[1] == 0x91


def _run_fields(raw: bytes) -> tuple[Attrs, list]:
    """``(first, items)`` of a run record. Raises ``Corrupt`` if damaged."""
    try:
        unpacker = msgpack.Unpacker()
        unpacker.feed(memoryview(raw)[1:])
        parts = list(unpacker)
        head = parts[0] if parts else None
        first = head[0] if isinstance(head, list) and len(head) == 1 else None
        if not isinstance(first, bytes) or is_run(first):
            raise ValueError("unexpected fields")
        attrs = Attrs.decode(first)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise Corrupt(f"damaged inode run record: {exc}") from None
    return attrs, parts[1:]


def _bad_item(item) -> bool:
    return (not isinstance(item, list) or not 3 <= len(item) <= 4 or not all(type(x) is int for x in item)
            or item[0] < 1 or (len(item) == 4 and item[3] < 0))


def _walk(first: Attrs, key_seq: int, items: list, bound: int | None = None) -> tuple[Attrs, int]:
    """The newest version of a run at or before ``bound`` (None: its newest) and its seq."""
    seq, mtime, ctime, nlink = key_seq, first.mtime_ns, first.ctime_ns, first.nlink
    try:
        for item in items:
            if bound is not None and seq + item[0] > bound:
                break
            seq += item[0]
            mtime += item[1]
            ctime = mtime + item[2]
            if len(item) == 4:
                nlink = item[3]
    except (TypeError, IndexError, KeyError):
        raise Corrupt("damaged inode run record: bad item") from None
    if seq < key_seq or type(seq) is not int or type(mtime) is not int or type(ctime) is not int \
            or type(nlink) is not int or nlink < 0:
        raise Corrupt("damaged inode run record: bad item")
    if seq == key_seq:
        return first, seq
    return first.replace(mtime_ns=mtime, ctime_ns=ctime, nlink=nlink), seq


def run_versions(raw: bytes, first_seq: int) -> list[tuple[int, Attrs]]:
    """Every ``(seq, attrs)`` of the ``inodes`` record ``raw`` stored under a
    key of seq ``first_seq``, oldest first: one for a record of one version,
    all of a run's. Raises ``Corrupt`` if damaged."""
    if not is_run(raw):
        return [(first_seq, Attrs.decode(raw))]
    first, items = _run_fields(raw)
    if any(map(_bad_item, items)):
        raise Corrupt("damaged inode run record: bad item")
    out = [(first_seq, first)]
    seq, mtime, nlink = first_seq, first.mtime_ns, first.nlink
    for item in items:
        seq += item[0]
        mtime += item[1]
        if len(item) == 4:
            nlink = item[3]
        out.append((seq, first.replace(mtime_ns=mtime, ctime_ns=mtime + item[2], nlink=nlink)))
    return out


def attrs_at(raw: bytes, key_seq: int, bound: int) -> tuple[Attrs, int]:
    """``(attrs, seq)`` of the newest version at or before seq ``bound`` in the
    ``inodes`` record ``raw`` under a key of seq ``key_seq <= bound`` (a run
    may hold versions past ``bound``; a record of one version is it). Raises
    ``Corrupt`` if damaged."""
    if not is_run(raw):
        return Attrs.decode(raw), key_seq
    first, items = _run_fields(raw)
    return _walk(first, key_seq, items, bound)


def run_append(raw: bytes, key_seq: int, seq: int, attrs: Attrs) -> bytes | None:
    """The run record ``raw`` (:func:`encode_run`) under a key of seq
    ``key_seq`` with the version ``attrs`` at ``seq`` appended (``seq`` past
    every version it holds: the caller's order), or None where it does not
    belong: ``raw`` is no run, ``attrs`` differs from the run's first version
    in more than times and link count, or the run would pass
    :data:`RUN_MAX_BYTES`. Raises ``Corrupt`` if ``raw`` is damaged."""
    if not is_run(raw) or seq <= key_seq:
        return None
    try:
        first_raw = msgpack.Unpacker()
        first_raw.feed(memoryview(raw)[1:])
        head = next(first_raw)
        if not isinstance(head, list) or len(head) != 1 or not isinstance(head[0], bytes) or is_run(head[0]):
            raise ValueError("unexpected fields")
        first = Attrs.decode(head[0])
    except (ValueError, TypeError, StopIteration, msgpack.UnpackException) as exc:
        raise Corrupt(f"damaged inode run record: {exc}") from None
    if attrs.replace(mtime_ns=first.mtime_ns, ctime_ns=first.ctime_ns, nlink=first.nlink) != first:
        return None
    items = list(first_raw)
    last, last_seq = _walk(first, key_seq, items)
    if seq <= last_seq:
        return None
    fields = [seq - last_seq, attrs.mtime_ns - last.mtime_ns, attrs.ctime_ns - attrs.mtime_ns]
    if attrs.nlink != last.nlink:
        fields.append(attrs.nlink)
    try:
        item = msgpack.packb(fields)
    except OverflowError:               # a time difference past 64 bits
        return None
    return raw + item if len(raw) + len(item) <= RUN_MAX_BYTES else None
