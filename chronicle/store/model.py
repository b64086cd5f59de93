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
from chronicle.store.chunks.ids import ID_SIZE


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
        """The ``inodes`` record.

        An inode without content (a directory, symlink, device) whose mode
        has file type bits is stored *packed* when that is shorter than the
        fixed head below: the tag byte ``0x01``, then one MessagePack array
        ``[mode, uid, gid, nlink, size, atime, mtime - atime, ctime - mtime,
        rdev]`` (times in ns), with the symlink target (bin) and the xattrs
        (``[name, value, ...]``) appended when present (the target ``b""``
        when only xattrs are). Its second byte is a fixarray header
        (``0x9N``), which the fixed form's second byte (the mode's type bits,
        ``0x1``..``0xC``, in its high half) never is: both forms decode.

        Otherwise (every inode with content, which gc reads in place: its
        ``prune``/``unversioned`` modules), a fixed little-endian head (mode,
        uid, gid, nlink u32; size u64; atime, mtime, ctime i64 ns; rdev u32;
        flags u8), then the content id (32 bytes), the symlink target (u32
        length + bytes) and the xattrs (u32 count, then u16 name length, u32
        value length, name, value each), each only if present (flags)."""
        if not self.content and self.mode & 0o170000:
            fields = [self.mode, self.uid, self.gid, self.nlink, self.size, self.atime_ns,
                      self.mtime_ns - self.atime_ns, self.ctime_ns - self.mtime_ns, self.rdev]
            if self.target or self.xattrs:
                fields.append(self.target)
            if self.xattrs:
                fields.append([part for pair in self.xattrs for part in pair])
            try:
                packed = _PACKED_TAG + msgpack.packb(fields)
            except OverflowError:           # a time difference past 64 bits
                packed = None
            if packed is not None and len(packed) < _ATTR_HEAD.size and packed[1] & 0xF0 == 0x90:
                return packed
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

    @classmethod
    def decode(cls, raw: bytes) -> Attrs:
        """From :meth:`encode`'s bytes (either form). Raises ``Corrupt`` if damaged."""
        if len(raw) > 1 and raw[0] == _PACKED and raw[1] & 0xF0 == 0x90:
            return cls._unpack(raw)
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
    def _unpack(cls, raw: bytes) -> Attrs:
        try:
            fields = msgpack.unpackb(memoryview(raw)[1:])
            mode, uid, gid, nlink, size, atime, mtime_delta, ctime_delta, rdev = fields[:9]
            target = fields[9] if len(fields) > 9 else b""
            flat = fields[10] if len(fields) > 10 else ()
            if len(fields) > 11 or not isinstance(target, bytes) or len(flat) % 2:
                raise ValueError("unexpected fields")
            xattrs = tuple(zip(flat[0::2], flat[1::2]))
            mtime = atime + mtime_delta
            return cls(mode, uid, gid, nlink, size, atime, mtime, mtime + ctime_delta, rdev, b"", target, xattrs)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise Corrupt(f"damaged inode record: {exc}") from None
