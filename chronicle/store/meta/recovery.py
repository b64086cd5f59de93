"""Crash consistency of the LMDB metadata without a disk flush per commit.

The problem. Closing a file must not cost a disk flush (untarring thousands
of files must not be thousands of flushes), yet a machine crash must never
corrupt the store. LMDB commits without ``fsync`` (``MDB_NOSYNC``) survive a
killed process — the commit is in the kernel's page cache — but after a
*machine* crash the disk may hold a newer meta page than the tree pages it
points to: LMDB's docs warn a crash "can corrupt the database".

The protocol (ours; the LMDB file format is from ``mdb.c``, LMDB 0.9):

1. **Sync** (``Store.sync``: on fsync, the ``sync`` ctl command, unmount, and
   every few seconds while dirty): take the last committed txnid and a copy
   of its meta page (under the LMDB writer lock, for a moment), fdatasync the
   packs and ``mdb_env_sync`` (at the same time, without the lock: commits
   after that txnid may reach the disk too, and step 3 rolls them back),
   then record in ``meta/synced.rec`` the synced txnid, the boot id, and
   that meta page (``record_synced``: one of two slots overwritten in place
   and fdatasync'd; stores written by older versions have ``synced.json``,
   still read).
2. **Pin**: each writing process holds a read transaction opened *before*
   its last sync, so its snapshot is at most the synced txnid. LMDB never
   reuses a page freed after the oldest reader's snapshot, so no page of the
   synced tree is overwritten until the next sync: the synced tree is always
   intact on disk.
3. **Recover** (``recover_after_crash``, before ``lmdb.open``): if the boot id
   differs from the one recorded (the machine went down since) and either
   meta page on disk is newer than the synced txnid, the newer commits may
   point at pages that never reached the disk. Both meta pages are rewritten
   with the saved one: the store opens at the last synced state, losing only
   what was committed after it — what ``fsync`` did not promise to keep.
   After a killed process on the same boot, the page cache held everything:
   nothing is rolled back.

Chunk data reaches the disk before the metadata that refers to it: step 1
syncs the packs before LMDB, and recovery only ever goes back to a synced
state, whose chunks were synced first.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import NoSpace

log = logging.getLogger(__name__)

SYNCED_FILE = "synced.json"              # the record as stores before the slotted one kept it (still read)
SYNCED_RECORD = "synced.rec"             # the record: two slots, rewritten in place (record_synced)
_SLOT = struct.Struct("<8sQI64s")         # magic, txnid, page size, boot id (NUL-padded); then the page, then a CRC-32
_SLOT_MAGIC = b"CHRSYNC1"
LMDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = struct.Struct("<QHH")      # mp_pgno, mp_pad, mp_flags
_META_MAGIC_AT = 16                       # after the 16-byte page header
_META_TXNID_AT = 144                      # mm_txnid, after mm_dbs[2] and mm_last_pg
P_META = 0x08


_BOOT_ID: list[str] = []                  # this boot's id, read once (it cannot change while we run)


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``, read once per
    process); tests may set ``CHRONICLE_BOOT_ID`` to simulate a reboot."""
    override = os.environ.get("CHRONICLE_BOOT_ID")
    if override:
        return override
    if not _BOOT_ID:
        try:
            _BOOT_ID.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        except OSError:
            return "unknown"
    return _BOOT_ID[0]


@dataclass
class MetaPage:
    """One LMDB meta page: its ``slot`` (0 or 1: the first two pages of
    ``data.mdb``), the ``txnid`` it commits, and its ``raw`` bytes (one page)."""

    slot: int
    txnid: int
    raw: bytes


def read_meta_pages(data_file: Path, page_size: int) -> list[MetaPage]:
    """The valid meta pages (0, 1 or 2) of an LMDB data file whose pages are
    ``page_size`` bytes: those with the ``P_META`` flag and LMDB's magic
    (``MDB_meta`` in ``mdb.c``). Raises ``OSError`` if the file cannot be read."""
    metas = []
    with open(data_file, "rb") as f:
        for slot in (0, 1):
            f.seek(slot * page_size)
            raw = f.read(page_size)
            txnid = _meta_txnid(raw)
            if txnid is not None:
                metas.append(MetaPage(slot, txnid, raw))
    return metas


def carry_txnid(data_file: Path, page_size: int, txnid: int) -> int:
    """Make the LMDB data file ``data_file`` (not open anywhere) continue
    from transaction ``txnid``: its current meta page is rewritten with the
    first txnid >= ``txnid`` of that page's parity (LMDB writes transaction
    T's meta page into slot ``T & 1``, ``mdb.c``) and the other slot with a
    copy numbered one less. A file built afresh (``meta.compact``) starts
    at transaction 1, and the metadata backup orders its generations by
    txnid (``meta.backup``). Returns the txnid now current; raises
    ``OSError``, ``RuntimeError`` if the file has no valid meta page."""
    metas = read_meta_pages(data_file, page_size)
    if not metas:
        raise RuntimeError(f"{data_file} has no valid meta page")
    current = max(metas, key=lambda m: m.txnid)
    if current.txnid >= txnid:
        return current.txnid
    carried = txnid + (txnid - current.slot) % 2
    fd = os.open(data_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot, value in ((1 - current.slot, carried - 1), (current.slot, carried)):
            page = bytearray(current.raw)
            _PAGE_HEADER.pack_into(page, 0, slot, 0, P_META)
            struct.pack_into("<Q", page, _META_TXNID_AT, value)
            os.pwrite(fd, bytes(page), slot * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return carried


@dataclass
class SyncedRecord:
    """What a sync recorded: the synced ``txnid``, the ``boot_id`` it was
    taken in, the data file's ``page_size`` and ``meta_page`` (the raw
    meta page of ``txnid``)."""

    txnid: int
    boot_id: str
    page_size: int
    meta_page: bytes


def _slot_size(page_size: int) -> int:
    return -(-(_SLOT.size + page_size + 4) // 4096) * 4096


def _encode_slot(record: SyncedRecord) -> bytes:
    body = _SLOT.pack(_SLOT_MAGIC, record.txnid, record.page_size, record.boot_id.encode()[:64]) + \
        record.meta_page
    body += struct.pack("<I", zlib.crc32(body))
    return body.ljust(_slot_size(record.page_size), b"\0")


def _decode_slot(raw: bytes) -> SyncedRecord | None:
    """The record in one slot, or None (empty, torn by a crash mid-write, or not a record)."""
    if len(raw) < _SLOT.size:
        return None
    magic, txnid, page_size, boot = _SLOT.unpack_from(raw)
    end = _SLOT.size + page_size
    if magic != _SLOT_MAGIC or len(raw) < end + 4 or \
            struct.unpack_from("<I", raw, end)[0] != zlib.crc32(raw[:end]):
        return None
    return SyncedRecord(txnid, boot.rstrip(b"\0").decode(errors="replace"), page_size, raw[_SLOT.size:end])


def _read_slots(fd: int) -> list[SyncedRecord | None]:
    size = os.fstat(fd).st_size // 2
    if size < _SLOT.size:
        return [None, None]
    return [_decode_slot(os.pread(fd, size, k * size)) for k in (0, 1)]


def read_synced(meta_dir: Path) -> SyncedRecord | None:
    """The newest valid record of the last sync in ``meta_dir`` (the slot
    with the highest txnid of ``synced.rec``, or a ``synced.json`` an older
    version wrote), or None if there is none. Raises ``OSError``."""
    found: list[SyncedRecord] = []
    try:
        fd = os.open(meta_dir / SYNCED_RECORD, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    else:
        try:
            found += [r for r in _read_slots(fd) if r is not None]
        finally:
            os.close(fd)
    try:
        legacy = json.loads((meta_dir / SYNCED_FILE).read_text())
        found.append(SyncedRecord(int(legacy["txnid"]), str(legacy.get("boot_id")), int(legacy["page_size"]),
                                  base64.b64decode(legacy["meta_page"])))
    except FileNotFoundError:
        pass
    return max(found, key=lambda r: r.txnid, default=None)


def forget_synced(meta_dir: Path) -> None:
    """Remove the records of past syncs (the data file was replaced: they
    describe another file). Raises ``OSError``."""
    for name in (SYNCED_RECORD, SYNCED_FILE):
        (meta_dir / name).unlink(missing_ok=True)


def record_synced(meta_dir: Path, txnid: int, page_size: int, raw: bytes | None = None) -> bool:
    """Record in ``meta_dir/synced.rec`` that ``txnid`` is synced (its tree
    pages must be on disk now). ``raw``: ``txnid``'s meta page as read when
    it was the last commit (``Store.sync`` lets commits go on while it
    flushes, so the page may have been overwritten since); None: read it
    from ``data.mdb`` now.

    The file has two slots, each a whole record with a CRC-32; the one with
    the lower txnid (or none) is overwritten in place and fdatasync'd — one
    disk flush, where a new file + rename + directory fsync cost three. A
    crash in the middle tears at most that slot, and the other one (an
    earlier sync, whose pages the writer's pin still protects) is used. The
    first time the file is written whole aside, fsync'd and renamed in place
    (directory fsync'd); an older ``synced.json`` is removed once it is.
    Writers of several processes take turns (``flock`` of ``meta_dir``). Returns True
    if the file was created (give it the store's modes). Raises
    ``RuntimeError`` if no meta page holds ``txnid``, ``OSError`` from the disk.
    A one-off call; an open store keeps a :class:`SyncRecorder`."""
    recorder = SyncRecorder(meta_dir, page_size)
    try:
        if raw is None:
            raw = recorder.meta_page(txnid)
        if raw is None:
            raise RuntimeError(f"no meta page for synced txn {txnid}")
        return recorder.record(txnid, raw)
    finally:
        recorder.close()


class SyncRecorder:
    """:func:`record_synced` for an open store, without its per-call costs:
    the descriptors of ``meta_dir`` (for the ``flock``), of ``synced.rec``
    and of ``data.mdb`` (for :meth:`meta_page`) stay open between syncs, so
    a record is one ``flock``, one ``pread`` of both slots, one ``pwrite``
    and one ``fdatasync`` (``Store.sync`` used to open, read and close four
    files for it). A ``synced.rec`` replaced or removed meanwhile (its link
    count is 0) is opened again. ``page_size``: the data file's pages, in
    bytes.

    Threads: one call at a time (``Store.sync`` holds its sync lock). Call
    :meth:`close` when the store closes."""

    def __init__(self, meta_dir: Path, page_size: int):
        self.meta_dir = Path(meta_dir)
        self.page_size = page_size
        self._dir_fd: int | None = None
        self._fd: int | None = None               # synced.rec, once it exists with its two slots
        self._data_fd: int | None = None          # data.mdb, for the meta pages

    def meta_page(self, txnid: int) -> bytes | None:
        """The raw meta page of ``txnid`` in ``data.mdb`` now, or None if
        neither slot holds it: LMDB writes transaction T's meta page into
        slot ``T & 1`` (``mdb_env_write_meta`` in ``mdb.c``), so one
        ``pread`` usually does. Raises ``OSError``."""
        if self._data_fd is None:
            self._data_fd = os.open(self.meta_dir / "data.mdb", os.O_RDONLY | os.O_CLOEXEC)
        for slot in (txnid & 1, 1 - (txnid & 1)):
            raw = os.pread(self._data_fd, self.page_size, slot * self.page_size)
            if _meta_txnid(raw) == txnid:
                return raw
        return None

    def record(self, txnid: int, raw: bytes) -> bool:
        """Record that ``txnid`` (whose meta page is ``raw``) is synced, as
        :func:`record_synced` does. Returns True if ``synced.rec`` was
        created. Raises ``OSError``."""
        size = _slot_size(self.page_size)
        slot = _encode_slot(SyncedRecord(txnid, boot_id(), self.page_size, raw))
        if self._dir_fd is None:
            self._dir_fd = os.open(self.meta_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)          # writers of several processes take turns
        try:
            fd = self._open_record(size)
            if fd is not None:
                both = os.pread(fd, 2 * size, 0)
                slots = [_decode_slot(both[:size]), _decode_slot(both[size:])]
                target = min((0, 1), key=lambda k: -1 if slots[k] is None else slots[k].txnid)
                os.pwrite(fd, slot, target * size)
                os.fdatasync(fd)
                return False
            _create_record(self.meta_dir, self._dir_fd, slot, size)
            return True
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def _open_record(self, size: int) -> int | None:
        """The open ``synced.rec`` if it has its two slots (opened again if it
        was replaced), else None."""
        if self._fd is not None:
            st = os.fstat(self._fd)
            if st.st_nlink and st.st_size == 2 * size:
                return self._fd
            os.close(self._fd)
            self._fd = None
        try:
            fd = os.open(self.meta_dir / SYNCED_RECORD, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != 2 * size:
            os.close(fd)
            return None
        self._fd = fd
        return fd

    def close(self) -> None:
        """Close the descriptors (idempotent)."""
        for name in ("_fd", "_data_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def _meta_txnid(raw: bytes) -> int | None:
    """The txnid of a raw LMDB meta page, or None if ``raw`` is not one (``read_meta_pages``)."""
    if len(raw) < _META_TXNID_AT + 8:
        return None
    _pgno, _pad, flags = _PAGE_HEADER.unpack_from(raw)
    (magic,) = struct.unpack_from("<I", raw, _META_MAGIC_AT)
    if magic != LMDB_MAGIC or not flags & P_META:
        return None
    return struct.unpack_from("<Q", raw, _META_TXNID_AT)[0]


def _create_record(meta_dir: Path, dir_fd: int, slot: bytes, size: int) -> None:
    """The first record (or a file of another size): the whole file, written
    aside, fsync'd, renamed in place, the directory fsync'd; an older
    ``synced.json`` is removed. Call with the ``flock`` of ``dir_fd`` held."""
    path = meta_dir / SYNCED_RECORD
    tmp = meta_dir / f"{SYNCED_RECORD}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, slot + b"\0" * size)           # allocated blocks: later writes change no metadata
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    os.fsync(dir_fd)
    (meta_dir / SYNCED_FILE).unlink(missing_ok=True)


def recover_after_crash(meta_dir: Path) -> int | None:
    """Roll the metadata back to the last synced state if the machine crashed
    since. Call before opening the LMDB environment, with no other process
    using it. Returns the number of transactions dropped, or None if nothing
    was done (never synced, the same boot, or nothing newer than the sync).
    Logs a WARNING when it rolls back. Raises ``OSError`` from the disk."""
    data_file = meta_dir / "data.mdb"
    if not data_file.exists():
        return None
    record = read_synced(meta_dir)
    if record is None or record.boot_id == boot_id():
        return None
    page_size = record.page_size
    synced = record.txnid
    metas = read_meta_pages(data_file, page_size)
    newest = max((m.txnid for m in metas), default=-1)
    if newest <= synced and len(metas) == 2:
        return None
    saved = record.meta_page
    fd = os.open(data_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in (0, 1):
            page = bytearray(saved)
            _PAGE_HEADER.pack_into(page, 0, slot, 0, P_META)
            os.pwrite(fd, bytes(page), slot * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    dropped = max(newest - synced, 0)
    log.warning("the machine stopped since this store was last synced: metadata rolled back to "
                "transaction %d (%d later transactions were not synced and are dropped)", synced, dropped)
    return dropped


# -- a full disk -----------------------------------------------------------------------
#
# LMDB grows ``data.mdb`` by writing pages past its end. On a full disk such
# a write fails half way: ``mdb_txn_commit`` answers ENOSPC, or EIO for a
# short write (``mdb_page_flush`` in mdb.c has no better code for it). The
# commit is then aborted and nothing is lost, but the caller must hear
# ENOSPC. So Chronicle keeps the file allocated a little past its last page
# (:class:`MetaReserve`): a commit only grows into space that is already
# there, and when the reserve cannot be extended the commit is refused with
# ``NoSpace`` before LMDB writes anything.

RESERVE_MIN = 1 << 20                     # bytes kept allocated past the last page, at least
RESERVE_FRACTION = 16                     # ... or 1/16 of the file, whichever is more
RESERVE_MAX = 32 << 20                    # ... but never more than this
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")
_LOW_FREE = 4 << 20                       # an LMDB EIO with less free than this is a short write


class MetaReserve:
    """Keeps the LMDB data file ``data_file`` allocated past its last used
    page (``posix_fallocate``), so that a commit never meets a full disk in
    the middle of writing its pages.

    Threads: call :meth:`ensure` inside the (single) LMDB write transaction.
    """

    def __init__(self, data_file: Path, page_size: int):
        self.data_file = Path(data_file)
        self.page_size = page_size
        self._allocated = 0               # bytes known to be allocated from the start of the file

    def ensure(self, last_pgno: int) -> None:
        """Make sure at least ``RESERVE_MIN`` (or 1/16 of the file, at most ``RESERVE_MAX``) is
        allocated past page ``last_pgno``; allocates twice that when it
        extends. Raises :class:`~chronicle.errors.NoSpace` if even the minimum
        cannot be allocated; other ``OSError``s (a file system without
        fallocate) are ignored."""
        used = (last_pgno + 1) * self.page_size
        low = min(max(RESERVE_MIN, used // RESERVE_FRACTION), RESERVE_MAX)
        if used + low <= self._allocated:
            return
        try:
            fd = os.open(self.data_file, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for want in (used + 2 * low, used + low):
                try:
                    os.posix_fallocate(fd, 0, want)
                    self._allocated = want
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        self._allocated = used + 2 * low     # not supported here: do not try each commit
                        return
            raise NoSpace("no space left on the device that holds the store (growing the metadata)")
        finally:
            os.close(fd)


def is_no_space(exc: BaseException, store_dir: Path) -> bool:
    """True if ``exc`` (an ``lmdb.Error`` or ``OSError``) is a full disk or
    quota under ``store_dir``: ENOSPC/EDQUOT, or LMDB's EIO for a short write
    when the file system has almost no space left (``statvfs``)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(t in text for t in _NO_SPACE_TEXTS):
        return True
    if code == errno.EIO or "Input/output error" in text:
        try:
            st = os.statvfs(store_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _LOW_FREE
    return False


# -- a damaged meta page ---------------------------------------------------------------
#
# LMDB keeps two meta pages (pages 0 and 1) and opens at the one with the
# higher txnid; it has no checksums, so one damaged meta page makes the whole
# file unopenable ("Invalid argument", "File is not an LMDB file") or points
# it at garbage. Before opening, :func:`repair_meta_pages` checks both for
# sanity and rewrites a damaged one from the other: the store opens at the
# other's transaction (the previous commit, or the same one).

P_INVALID = 0xFFFFFFFFFFFFFFFF
MDB_DATA_VERSION = 1
_META = struct.Struct("<IIQQ")            # mm_magic, mm_version, mm_address, mm_mapsize (at 16)
_DB = struct.Struct("<IHHQQQQQ")          # MDB_db: pad (psize for FREE_DBI), flags, depth, pages..., entries, root
_DBS_AT = 40
_LAST_PG_AT = 136


def meta_page_problem(raw: bytes, slot: int, file_pages: int, page_size: int) -> str | None:
    """Why ``raw`` (page ``slot`` of a data file of ``file_pages`` pages) is
    not a sane LMDB meta page, or None: page number and flags, magic,
    version, page size, map size, tree depths and root pages within the file
    (``MDB_meta``/``MDB_db`` in mdb.c, LMDB 0.9, 64-bit)."""
    if len(raw) < _META_TXNID_AT + 8:
        return "short page"
    pgno, _pad, flags = _PAGE_HEADER.unpack_from(raw)
    if pgno != slot or not flags & P_META:
        return f"page header says page {pgno}, flags {flags:#x}"
    magic, version, address, mapsize = _META.unpack_from(raw, 16)
    if magic != LMDB_MAGIC:
        return f"bad magic {magic:#x}"
    if version != MDB_DATA_VERSION:
        return f"bad version {version}"
    (last_pg,) = struct.unpack_from("<Q", raw, _LAST_PG_AT)
    if address != 0 or mapsize % page_size or mapsize < (last_pg + 1) * page_size or mapsize > 1 << 48:
        return f"bad map address or size ({address:#x}, {mapsize})"
    if last_pg < 1 or last_pg >= max(file_pages, 2):
        return f"last page {last_pg} is outside the file ({file_pages} pages)"
    for i in (0, 1):
        psize, _flags, depth, _b, _l, _o, _entries, root = _DB.unpack_from(raw, _DBS_AT + i * _DB.size)
        if i == 0 and psize != page_size:
            return f"bad page size {psize}"
        if root != P_INVALID and not 2 <= root <= last_pg:
            return f"root page {root} of database {i} is outside the tree"
        if depth > 32 or (root == P_INVALID) != (depth == 0):
            return f"bad depth {depth} of database {i}"
    return None


def repair_meta_pages(meta_dir: Path, page_size: int = 4096) -> str | None:
    """If one of the two meta pages of ``meta_dir/data.mdb`` is damaged
    (:func:`meta_page_problem`) and the other is sane, rewrite the damaged
    one from the sane one, so LMDB opens at the sane one's transaction. Call
    before opening the environment, with no other process using it. Returns
    a message saying what was done (also logged as a WARNING), or None if
    both are sane, or both damaged (nothing to copy from). Raises ``OSError``
    from the disk."""
    data_file = meta_dir / "data.mdb"
    try:
        size = data_file.stat().st_size
    except FileNotFoundError:
        return None
    if size < 2 * page_size:
        return None
    file_pages = size // page_size
    with open(data_file, "rb") as f:
        raws = [f.read(page_size), f.read(page_size)]
    problems = [meta_page_problem(raw, slot, file_pages, page_size) for slot, raw in enumerate(raws)]
    if (problems[0] is None) == (problems[1] is None):
        return None
    bad = 0 if problems[0] is not None else 1
    good = raws[1 - bad]
    page = bytearray(good)
    _PAGE_HEADER.pack_into(page, 0, bad, 0, P_META)
    fd = os.open(data_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(page), bad * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    (txnid,) = struct.unpack_from("<Q", good, _META_TXNID_AT)
    message = (f"meta page {bad} of {data_file} was damaged ({problems[bad]}): rewritten from meta page "
               f"{1 - bad}; the store opens at transaction {txnid}")
    log.warning("%s", message)
    return message
