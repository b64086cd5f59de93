"""Crash consistency of the LMDB metadata without a disk flush per commit.

The problem. Closing a file must not cost a disk flush (untarring thousands
of files must not be thousands of flushes), yet a machine crash must never
corrupt the store. LMDB commits without ``fsync`` (``MDB_NOSYNC``) survive a
killed process — the commit is in the kernel's page cache — but after a
*machine* crash the disk may hold a newer meta page than the tree pages it
points to: LMDB's docs warn a crash "can corrupt the database".

The protocol (ours; the LMDB file format is from ``mdb.c``, LMDB 0.9):

1. **Sync** (``Store.sync``: on fsync, the ``sync`` ctl command, unmount, and
   every few seconds while dirty): fdatasync the packs, then
   ``mdb_env_sync``, then record in ``meta/synced.json`` the synced txnid,
   the boot id, and a copy of that txnid's meta page; fsync it.
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
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import NoSpace

log = logging.getLogger(__name__)

SYNCED_FILE = "synced.json"
LMDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = struct.Struct("<QHH")      # mp_pgno, mp_pad, mp_flags
_META_MAGIC_AT = 16                       # after the 16-byte page header
_META_TXNID_AT = 144                      # mm_txnid, after mm_dbs[2] and mm_last_pg
P_META = 0x08


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``); tests may set
    ``CHRONICLE_BOOT_ID`` to simulate a reboot."""
    override = os.environ.get("CHRONICLE_BOOT_ID")
    if override:
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


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
            if len(raw) < _META_TXNID_AT + 8:
                continue
            _pgno, _pad, flags = _PAGE_HEADER.unpack_from(raw)
            (magic,) = struct.unpack_from("<I", raw, _META_MAGIC_AT)
            if magic != LMDB_MAGIC or not flags & P_META:
                continue
            (txnid,) = struct.unpack_from("<Q", raw, _META_TXNID_AT)
            metas.append(MetaPage(slot, txnid, raw))
    return metas


def record_synced(meta_dir: Path, txnid: int, page_size: int, raw: bytes | None = None) -> None:
    """Write ``synced.json`` for ``txnid`` in ``meta_dir`` (its tree pages
    must be on disk now), atomically (write, fsync, rename, fsync the
    directory). ``raw``: ``txnid``'s meta page as read when it was the last
    commit (``Store.sync`` lets commits go on while it flushes, so the page
    may have been overwritten since); None: read it from ``data.mdb`` now.
    Raises ``RuntimeError`` if no meta page holds ``txnid``, ``OSError``
    from the disk."""
    if raw is None:
        page = next((m for m in read_meta_pages(meta_dir / "data.mdb", page_size) if m.txnid == txnid), None)
        raw = page.raw if page is not None else None
    if raw is None:
        raise RuntimeError(f"no meta page for synced txn {txnid}")
    record = {"txnid": txnid, "boot_id": boot_id(), "page_size": page_size,
              "meta_page": base64.b64encode(raw).decode()}
    tmp = meta_dir / (SYNCED_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, meta_dir / SYNCED_FILE)
    dfd = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def recover_after_crash(meta_dir: Path) -> int | None:
    """Roll the metadata back to the last synced state if the machine crashed
    since. Call before opening the LMDB environment, with no other process
    using it. Returns the number of transactions dropped, or None if nothing
    was done (never synced, the same boot, or nothing newer than the sync).
    Logs a WARNING when it rolls back. Raises ``OSError`` from the disk."""
    synced_path = meta_dir / SYNCED_FILE
    data_file = meta_dir / "data.mdb"
    if not synced_path.exists() or not data_file.exists():
        return None
    record = json.loads(synced_path.read_text())
    if record.get("boot_id") == boot_id():
        return None
    page_size = int(record["page_size"])
    synced = int(record["txnid"])
    metas = read_meta_pages(data_file, page_size)
    newest = max((m.txnid for m in metas), default=-1)
    if newest <= synced and len(metas) == 2:
        return None
    saved = base64.b64decode(record["meta_page"])
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
