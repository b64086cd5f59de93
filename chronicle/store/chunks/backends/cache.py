"""A bounded, persistent LRU cache of object byte ranges, for a remote backend.

The S3 backend (``s3``) reads packs by byte range; what it fetched is kept here
so that a chunk read twice crosses the network once, also after a restart.
Objects are cut into **blocks**: block ``b`` of an object is its bytes
``[b * block_size, (b + 1) * block_size)`` (the last block is shorter). A
block is fetched whole (one range ``GET``) and stored as one file. Closed
objects never change (``base``), so a block never goes stale; deleting an
object drops its blocks (:meth:`BlockCache.drop`).

Layout of the cache directory::

    index.sqlite    one row per block file: key, size in bytes, last use (ns)
    blocks/         the block files, named <object name with / as +>.<block>

The index is SQLite (the standard library's ``sqlite3``, WAL mode), which
several processes of one store may use at once: it holds the byte total and
the LRU order, and every insertion evicts the least recently used blocks
until the total fits ``max_bytes`` again (an insertion and its evictions are
one transaction). A hit opens the block file directly, without the index (a
block evicted meanwhile by another process is then a miss); uses are noted in
memory and written to the index in batches, so the LRU order is approximate
by up to :data:`_TOUCH_BATCH` uses. A block file is written to a temporary
name and renamed in place inside the insertion's transaction, so a reader
never sees part of a block. A crash between the rename and the commit leaves
a file the index does not count: :meth:`BlockCache.reconcile` (run when the
cache is opened by the only process using it) removes such files and the
rows of missing ones.

Threads: a :class:`BlockCache` may be used from any thread; it opens one
SQLite connection per thread.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

BLOCK_SIZE = 1024 * 1024          # bytes fetched and cached as one file
_TOUCH_BATCH = 256                # uses noted in memory before they are written to the index
_SCHEMA = "CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, size INTEGER NOT NULL, used INTEGER NOT NULL)"


def block_key(name: str, block: int) -> str:
    """The key and file name of block ``block`` of object ``name``."""
    return f"{name.replace('/', '+')}.{block}"


class BlockCache:
    """Blocks of objects under ``root`` (created if missing), at most
    ``max_bytes`` bytes of them (0: cache nothing). Files get permission bits
    ``file_mode``, directories ``dir_mode``."""

    def __init__(self, root: os.PathLike | str, max_bytes: int, block_size: int = BLOCK_SIZE,
                 file_mode: int = 0o600, dir_mode: int = 0o700):
        self.root = Path(root)
        self.max_bytes = max(0, int(max_bytes))
        self.block_size = block_size
        self.file_mode = file_mode
        self.blocks_dir = self.root / "blocks"
        for d in (self.root, self.blocks_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, dir_mode)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._touched: dict[str, int] = {}
        index = self.root / "index.sqlite"
        db = self._db()
        db.execute(_SCHEMA)
        db.commit()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(f"{index}{suffix}", file_mode)
            except FileNotFoundError:
                pass

    # -- reading -------------------------------------------------------------------

    def get(self, name: str, block: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes ``[start, end)`` (default: all) of block ``block`` of
        ``name`` — fewer if the block ends sooner (the object's last block) —
        or None (a miss). Reads only those bytes of the block file."""
        key = block_key(name, block)
        try:
            fd = os.open(self.blocks_dir / key, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if end is None:
                end = os.fstat(fd).st_size
            data = os.pread(fd, max(0, end - start), start)
        finally:
            os.close(fd)
        with self._lock:
            self._touched[key] = time.time_ns()
            flush = len(self._touched) >= _TOUCH_BATCH
        if flush:
            self._write_touches()
        return data

    # -- writing -------------------------------------------------------------------

    def put(self, name: str, block: int, data: bytes) -> None:
        """Keep ``data`` as block ``block`` of ``name``, evicting least
        recently used blocks to stay within ``max_bytes``. A block larger
        than the whole cache is not kept. ``OSError`` (a full disk) is the
        caller's to ignore: the cache is only a cache."""
        if len(data) > self.max_bytes:
            return
        key = block_key(name, block)
        tmp = self.blocks_dir / f".{key}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        try:
            self._insert(key, len(data), tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def drop(self, name: str) -> None:
        """Forget every block of ``name`` (its object was deleted)."""
        prefix = name.replace("/", "+") + "."
        db = self._db()
        with self._write(db):
            rows = db.execute("SELECT key FROM blocks WHERE key >= ? AND key < ?",
                              (prefix, prefix[:-1] + "/")).fetchall()
            db.executemany("DELETE FROM blocks WHERE key = ?", rows)
            for (key,) in rows:
                (self.blocks_dir / key).unlink(missing_ok=True)
        with self._lock:
            for key in [k for k in self._touched if k.startswith(prefix)]:
                del self._touched[key]

    def total(self) -> int:
        """Bytes of blocks the index counts."""
        return self._db().execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]

    def reconcile(self) -> None:
        """Make the index and the block files agree: remove files the index
        does not count and rows whose file is gone (left by a crash; call it
        only when no other process uses the cache)."""
        db = self._db()
        with self._write(db):
            keys = {key for (key,) in db.execute("SELECT key FROM blocks")}
            present = set()
            for entry in os.scandir(self.blocks_dir):
                if entry.name.startswith(".") or entry.name not in keys:
                    os.unlink(entry.path)
                else:
                    present.add(entry.name)
            db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in keys - present])

    def close(self) -> None:
        """Write the noted uses to the index. The cache stays usable."""
        self._write_touches()

    # -- internals -----------------------------------------------------------------

    def _insert(self, key: str, size: int, tmp: Path) -> None:
        db = self._db()
        now = time.time_ns()
        with self._write(db):
            self._apply_touches(db)
            db.execute("INSERT OR REPLACE INTO blocks (key, size, used) VALUES (?, ?, ?)", (key, size, now))
            total = db.execute("SELECT SUM(size) FROM blocks").fetchone()[0]
            if total > self.max_bytes:
                victims = []
                for old, old_size in db.execute("SELECT key, size FROM blocks WHERE key != ? ORDER BY used",
                                                (key,)):
                    victims.append((old,))
                    total -= old_size
                    if total <= self.max_bytes:
                        break
                db.executemany("DELETE FROM blocks WHERE key = ?", victims)
                for (old,) in victims:
                    (self.blocks_dir / old).unlink(missing_ok=True)
            os.rename(tmp, self.blocks_dir / key)

    def _write_touches(self) -> None:
        with self._lock:
            if not self._touched:
                return
        db = self._db()
        with self._write(db):
            self._apply_touches(db)

    def _apply_touches(self, db: sqlite3.Connection) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
        db.executemany("UPDATE blocks SET used = ? WHERE key = ?", [(t, k) for k, t in touched.items()])

    def _write(self, db: sqlite3.Connection):
        db.execute("BEGIN IMMEDIATE")
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db
