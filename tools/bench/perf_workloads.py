"""The workloads issue 11 adds to fsbench's five: what real tools do to a filesystem.

Each function takes an opened ``Target`` and a ``PerfConfig``, works in a fresh
directory on it (``workloads.fresh_dir``), verifies what it wrote and returns
``workloads.Measurement`` objects. Unlike fsbench's rates, several figures here
are latencies (ms, µs) -- lower is better; ``perfbench.METRICS`` says which.

- ``append_close``   -- append 100 bytes + close to a file of 0 / 8 / 64 MiB;
- ``fsync_latency``  -- append 100 bytes + fsync, median µs per round trip;
- ``small_edits``    -- 16 ten-byte pwrites at random offsets of a 32 MiB file,
  fsync after each: total ms and the growth of the target's private store;
- ``sqlite_wal``     -- autocommit inserts in WAL mode, ``synchronous=NORMAL``
  and ``FULL``;
- ``git_checkout``   -- ``git checkout -f`` through 300 commits of a repository
  built by ``gitrepo.build_repo`` (or a bare clone given by path);
- ``tree_untar_rm``  -- ``tar -xf`` then ``rm -rf`` of a 5,000-file tree
  (``gitrepo.tree_tarball``).

Written data is incompressible and distinct (``workloads.BlockSource``,
``os.urandom``), as in fsbench. ``store_usage`` measures the private store of
a Chronicle target (pack bytes + LMDB pages in use) or a JuiceFS target
(bucket bytes + SQLite pages in use); ext4 and the pass-through have none (``None``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from tools.bench import gitrepo
from tools.bench import workloads as wl
from tools.bench.juicefs import JuiceFSTarget
from tools.bench.targets import ChronicleTarget, Target

MiB = wl.MiB
APPEND = 100          # bytes per append
EDIT = 10             # bytes per small edit


@dataclass
class PerfConfig:
    """Sizes and counts of the issue-11 workloads (bytes or counts)."""

    append_sizes: tuple[int, ...] = (0, 8 * MiB, 64 * MiB)
    append_reps: int = 7
    fsync_ops: int = 200
    edit_file_size: int = 32 * MiB
    edits: int = 16
    sqlite_inserts: int = 20_000
    git_files: int = 300
    git_commits: int = 300
    git_repo: Path | None = None           # a bare clone to replay instead of the generated one
    tree_files: int = 5_000
    cache_dir: Path = field(default_factory=lambda: Path("/var/tmp"))


# --- the target's private store -------------------------------------------------

def _file_bytes(paths: list[Path]) -> int:
    total = 0
    for top in paths:
        if top.is_file():
            total += top.stat().st_size
            continue
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def _lmdb_used_bytes(meta_dir: Path) -> int:
    """Bytes of LMDB pages in use by every database of the environment at
    ``meta_dir`` (branch + leaf + overflow pages; the free list and the
    preallocated tail excluded), read through a read-only second handle."""
    env = lmdb.open(str(meta_dir), readonly=True, lock=True, max_dbs=256, create=False)
    try:
        main = env.stat()
        used = main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
        for name in names:
            try:
                db = env.open_db(name, create=False)
            except lmdb.Error:              # a plain key in the main DB, not a database
                continue
            with env.begin() as txn:
                st = txn.stat(db)
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return used * main["psize"]
    finally:
        env.close()


def _sqlite_used_bytes(path: Path) -> int:
    """Bytes of the SQLite database ``path``'s pages in use (page_count less
    the free list, times the page size), as a read-only second connection sees
    it -- WAL frames not yet checkpointed included. The files' own sizes would
    not do: a WAL file is reused in place after a checkpoint."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()


def store_usage(target: Target) -> dict | None:
    """{"chunks": bytes, "metadata": bytes} of the target's private store, or
    None for a target without one (ext4, the pass-through)."""
    if isinstance(target, ChronicleTarget):
        return {"chunks": _file_bytes([target.store / "packs"]),
                "metadata": _lmdb_used_bytes(target.store / "meta")}
    if isinstance(target, JuiceFSTarget):
        return {"chunks": _file_bytes([target.bucket]), "metadata": _sqlite_used_bytes(target.meta)}
    return None


# --- append + close, fsync latency -----------------------------------------------

def append_close(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """Per size: a file of that size is written and closed (untimed), then
    ``append_reps`` times open(O_APPEND) + write 100 bytes + close; the median ms."""
    results = []
    source = wl.BlockSource(seed=11)
    with wl.fresh_dir(target, "append") as d:
        for size in cfg.append_sizes:
            path = d / f"append-{size // MiB}M.bin"
            if size:
                wl.write_file(path, size, source)
            else:
                path.touch()
            os.sync()
            tails, times = [], []
            for _ in range(cfg.append_reps):
                tail = os.urandom(APPEND)
                t0 = time.perf_counter()
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    wl._write_all(fd, tail)
                finally:
                    os.close(fd)
                times.append(time.perf_counter() - t0)
                tails.append(tail)
            expect = size + APPEND * cfg.append_reps
            if path.stat().st_size != expect:
                raise RuntimeError(f"{path.name}: size {path.stat().st_size}, expected {expect}")
            with open(path, "rb") as f:
                f.seek(size)
                if f.read() != b"".join(tails):
                    raise RuntimeError(f"{path.name}: the appended bytes read back different")
            results.append(wl.Measurement(f"append_{size // MiB}M", statistics.median(times) * 1e3, "ms",
                                          sum(times), {"reps": cfg.append_reps, "file_bytes": size,
                                                       "max_ms": max(times) * 1e3}))
            path.unlink()
    return results


def fsync_latency(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """``fsync_ops`` times: append 100 bytes to one open file and fsync; median µs."""
    chunks = [os.urandom(APPEND) for _ in range(cfg.fsync_ops)]
    times = []
    with wl.fresh_dir(target, "fsync") as d:
        path = d / "log.bin"
        os.sync()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for data in chunks:
                t0 = time.perf_counter()
                wl._write_all(fd, data)
                os.fsync(fd)
                times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
        if path.read_bytes() != b"".join(chunks):
            raise RuntimeError(f"{path.name}: the appended bytes read back different")
    times.sort()
    return [wl.Measurement("fsync", statistics.median(times) * 1e6, "µs", sum(times),
                           {"ops": cfg.fsync_ops, "p90_us": times[int(0.9 * (len(times) - 1))] * 1e6})]


# --- small edits of a big file ---------------------------------------------------

def small_edits(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """``edits`` pwrites of 10 fresh random bytes at random offsets of an
    ``edit_file_size`` file, each followed by fsync; total ms from open to
    close, and what the target's private store grew by (after ``sync``)."""
    size = cfg.edit_file_size
    rng = random.Random(7)
    edits = [(rng.randrange(size - EDIT), os.urandom(EDIT)) for _ in range(cfg.edits)]
    results = []
    with wl.fresh_dir(target, "edits") as d:
        path = d / "big.bin"
        source = wl.BlockSource(seed=13)
        wl.write_file(path, size, source)
        os.sync()
        before = store_usage(target)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDWR)
        try:
            for offset, data in edits:
                if os.pwrite(fd, data, offset) != EDIT:
                    raise RuntimeError(f"short pwrite at offset {offset}")
                os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0
        os.sync()
        after = store_usage(target)
        expect = bytearray(b"".join(source.block(i) for i in range(size // MiB)))
        for offset, data in edits:
            expect[offset:offset + EDIT] = data
        if path.read_bytes() != expect:
            raise RuntimeError(f"{path.name}: the edited file reads back different")
    results.append(wl.Measurement("edits_ms", seconds * 1e3, "ms", seconds,
                                  {"edits": cfg.edits, "file_bytes": size}))
    if before is not None and after is not None:
        growth = {k: after[k] - before[k] for k in after}
        results.append(wl.Measurement("edits_growth", sum(growth.values()) / MiB, "MiB", seconds,
                                      {"chunks_mib": growth["chunks"] / MiB,
                                       "metadata_mib": growth["metadata"] / MiB}))
    return results


# --- sqlite ------------------------------------------------------------------------

def sqlite_wal(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """``sqlite_inserts`` autocommit inserts of a 100-byte blob into a WAL
    database, once with ``synchronous=NORMAL`` and once with ``FULL``;
    inserts/s. Verified: row count, every blob's digest, integrity_check."""
    n = cfg.sqlite_inserts
    blobs = [os.urandom(APPEND) for _ in range(n)]
    results = []
    with wl.fresh_dir(target, "sqlite") as d:
        for mode in ("NORMAL", "FULL"):
            path = d / f"wal-{mode.lower()}.db"
            db = sqlite3.connect(path, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise RuntimeError("sqlite refused journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={mode}")
                db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
                os.sync()
                t0 = time.perf_counter()
                for blob in blobs:
                    db.execute("INSERT INTO t (v) VALUES (?)", (blob,))
                seconds = time.perf_counter() - t0
            finally:
                db.close()
            db = sqlite3.connect(path)
            try:
                rows = db.execute("SELECT v FROM t ORDER BY id").fetchall()
                ok = db.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                db.close()
            if ok != "ok" or [r[0] for r in rows] != blobs:
                raise RuntimeError(f"{path.name}: {len(rows)} rows read back of {n}, integrity: {ok}")
            results.append(wl.Measurement(f"sqlite_{mode.lower()}", n / seconds, "inserts/s", seconds,
                                          {"inserts": n}))
    return results


# --- git checkout replay -------------------------------------------------------------

def git_checkout(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """Clone (untimed, no checkout) the bench's repository -- or ``git_repo`` --
    onto the target, check out its first replayed commit, then time
    ``git checkout -f -q`` of each of the next ``git_commits`` commits in order.
    Verified: after the last one, a full re-hash of the work tree
    (``update-index --really-refresh``) finds no difference and no stray file."""
    bare = cfg.git_repo or gitrepo.build_repo(cfg.cache_dir, cfg.git_files, cfg.git_commits)
    env = gitrepo.git_env()
    with wl.fresh_dir(target, "checkout") as d:
        work = d / "repo"
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(bare), str(work)], env=env,
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        commits = gitrepo.first_parent_commits(work, cfg.git_commits + 1)
        if len(commits) < 2:
            raise RuntimeError(f"{bare}: fewer than 2 commits to replay")
        gitrepo.git(work, "checkout", "-f", "-q", commits[0])
        os.sync()
        times = []
        for sha in commits[1:]:
            t0 = time.perf_counter()
            gitrepo.git(work, "checkout", "-f", "-q", sha)
            times.append(time.perf_counter() - t0)
        gitrepo.verify_worktree(work)
    total = sum(times)
    return [wl.Measurement("checkout", total, "s", total,
                           {"commits": len(times), "median_ms": statistics.median(times) * 1e3})]


# --- untar + rm -rf of a many-file tree -----------------------------------------------

def tree_untar_rm(target: Target, cfg: PerfConfig) -> list[wl.Measurement]:
    """``tar -xf`` of the bench's ``tree_files``-file tarball, then ``rm -rf``
    of the tree; files/s for each. Verified: every file is there with its size
    after the untar, nothing is left after the removal."""
    tarball, manifest = gitrepo.tree_tarball(cfg.cache_dir, cfg.tree_files)
    with wl.fresh_dir(target, "tree5k") as d:
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(d)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        untar = time.perf_counter() - t0
        gitrepo.verify_tree(d, manifest)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["rm", "-rf", "--", str(d / gitrepo.TREE_TOP)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        rm = time.perf_counter() - t0
        left = os.listdir(d)
        if left:
            raise RuntimeError(f"rm -rf left {left[:3]} behind")
    n = len(manifest)
    return [wl.Measurement("tree_untar", n / untar, "files/s", untar, {"files": n}),
            wl.Measurement("tree_rm", n / rm, "files/s", rm, {"files": n})]


__all__ = ["PerfConfig", "append_close", "fsync_latency", "git_checkout", "small_edits",
           "sqlite_wal", "store_usage", "tree_untar_rm"]
