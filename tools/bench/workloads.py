"""The benchmark workloads and the data they write.

Each workload runs in a fresh, empty directory on the target and removes it
afterwards. A workload returns ``Measurement`` objects: one figure (higher is
better: MiB/s, IOPS, files/s), the seconds it is computed from, and details.

Timing uses ``time.perf_counter``. Only filesystem work is timed: producing
the data to write happens outside the timed calls.

Data honesty: Chronicle deduplicates chunks (content-defined chunking) and
compresses them (zstd), so written data must be incompressible and must not
repeat -- not even shifted, which content-defined chunking would still find.
``BlockSource`` makes 1 MiB blocks from one 64 MiB ``os.urandom`` pool: block
``i`` is slice ``i mod 64`` of the pool mapped through a byte permutation that
is drawn anew for every pass over the pool (and per seed), so no two blocks of
a run are equal and every block is uniformly random bytes. A workload that
runs once per round makes its source with ``BlockSource.fresh()`` (a seed no
other source of this process has), so a later round does not write what an
earlier one stored: Chronicle keeps versions, and would deduplicate them.
"""

from __future__ import annotations

import contextlib
import itertools
import hashlib
import json
import os
import random
import shutil
import subprocess
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench.targets import Target

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BLOCK = MiB
PAGE = 4 * KiB
POOL_SIZE = 64 * MiB


@dataclass
class Config:
    """Workload sizes (bytes or counts)."""

    seq_size: int = 1024 * MiB
    rand_file_size: int = 256 * MiB
    rand_ops: int = 20_000
    files: int = 10_000
    cache_dir: Path = Path("/var/tmp")


@dataclass
class Measurement:
    metric: str            # key in fsbench.METRICS
    value: float           # higher is better
    unit: str
    seconds: float
    details: dict = field(default_factory=dict)


class BlockSource:
    """Incompressible, never-repeating 1 MiB blocks (see the module docstring)."""

    _pool: bytes | None = None
    _fresh_seeds = itertools.count(1_000)

    @classmethod
    def fresh(cls) -> BlockSource:
        """A source whose seed no other ``fresh()`` source of this process had."""
        return cls(seed=next(cls._fresh_seeds))

    def __init__(self, seed: int):
        self.seed = seed
        self._tables: dict[int, bytes] = {}
        if BlockSource._pool is None:
            BlockSource._pool = os.urandom(POOL_SIZE)

    def _table(self, cycle: int) -> bytes:
        table = self._tables.get(cycle)
        if table is None:
            perm = list(range(256))
            random.Random(self.seed * 1_000_003 + cycle).shuffle(perm)
            table = self._tables[cycle] = bytes(perm)
        return table

    def block(self, i: int) -> bytes:
        per_pool = POOL_SIZE // BLOCK
        offset = (i % per_pool) * BLOCK
        return self._pool[offset:offset + BLOCK].translate(self._table(i // per_pool))


def drop_page_cache() -> bool:
    """``sync`` and drop the page cache, dentries and inodes (needs root).

    Returns False (and drops nothing) without permission.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def fresh_dir(target: Target, name: str) -> Iterator[Path]:
    """An empty directory ``name`` under the target's root, removed afterwards."""
    path = target.root / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    try:
        yield path
    finally:
        # The target root may be a remounted FUSE mount; if it is gone, the
        # target's close() removes everything anyway.
        shutil.rmtree(path, ignore_errors=True)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: Path, size: int, source: BlockSource) -> tuple[float, float]:
    """Write ``size`` bytes (a multiple of 1 MiB) in 1 MiB blocks and close.

    Returns (seconds in open+write+close, seconds in close); block generation
    is not counted.
    """
    busy = 0.0
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    busy += time.perf_counter() - t
    try:
        for i in range(size // BLOCK):
            data = source.block(i)
            t = time.perf_counter()
            _write_all(fd, data)
            busy += time.perf_counter() - t
    finally:
        t = time.perf_counter()
        os.close(fd)
        closing = time.perf_counter() - t
    return busy + closing, closing


def sequential(target: Target, cfg: Config, write: bool, read: bool) -> list[Measurement]:
    """Workloads 1 and 2: sequential write, then cold sequential read, of one file.

    The read starts from a fresh mount (FUSE targets are unmounted and mounted
    again) with the page cache dropped. If only the read is asked for, the
    file is written untimed first. Every call writes fresh bytes
    (``BlockSource.fresh``): a round must not measure deduplication of the
    previous round's file.
    """
    results = []
    size = cfg.seq_size
    source = BlockSource.fresh()
    with fresh_dir(target, "seq") as d:
        path = d / "seq.bin"
        os.sync()
        seconds, closing = write_file(path, size, source)
        if write:
            results.append(Measurement("seqwrite", size / MiB / seconds, "MiB/s", seconds,
                                       {"close_s": closing, "bytes": size}))
        if not read:
            return results
        dropped = []
        target.remount(lambda: dropped.append(drop_page_cache()))
        buf = bytearray(BLOCK)
        total = 0
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0
        if total != size:
            raise RuntimeError(f"read {total} bytes back, wrote {size}")
        _check_blocks(path, source, [0, size // BLOCK - 1])
        results.append(Measurement("seqread", size / MiB / seconds, "MiB/s", seconds,
                                   {"bytes": size, "cache_dropped": all(dropped),
                                    "remounted": target.is_fuse}))
    return results


def _check_blocks(path: Path, source: BlockSource, blocks: list[int]) -> None:
    with open(path, "rb") as f:
        for i in blocks:
            f.seek(i * BLOCK)
            if f.read(BLOCK) != source.block(i):
                raise RuntimeError(f"{path.name}: block {i} reads back different from what was written")


def random_writes(target: Target, cfg: Config) -> list[Measurement]:
    """Workload 3: ``rand_ops`` random 4 KiB-aligned pwrites of fresh random data.

    On a ``rand_file_size`` file written (and closed) beforehand. Timed from
    open to the end of fsync + close; the data and offsets are made before.
    """
    n, size = cfg.rand_ops, cfg.rand_file_size
    rng = random.Random(3)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(n)]
    data = memoryview(os.urandom(n * PAGE))
    with fresh_dir(target, "rand") as d:
        path = d / "rand.bin"
        write_file(path, size, BlockSource(seed=2))
        os.sync()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        try:
            for i, off in enumerate(offsets):
                if os.pwrite(fd, data[i * PAGE:(i + 1) * PAGE], off) != PAGE:
                    raise RuntimeError(f"short pwrite at offset {off}")
            t1 = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter()
        # Spot-check: the last write to each of a few offsets is what reads back.
        last = {off: i for i, off in enumerate(offsets)}
        with open(path, "rb") as f:
            for off, i in list(last.items())[-64:]:
                f.seek(off)
                if f.read(PAGE) != data[i * PAGE:(i + 1) * PAGE]:
                    raise RuntimeError(f"offset {off} reads back different from what was written")
    seconds = t2 - t0
    return [Measurement("randwrite", n / seconds, "IOPS", seconds,
                        {"writes_s": t1 - t0, "fsync_close_s": t2 - t1, "ops": n,
                         "file_bytes": size})]


def create_stat_unlink(target: Target, cfg: Config) -> list[Measurement]:
    """Workload 4: per file, create (O_CREAT|O_WRONLY, close), stat, unlink."""
    n = cfg.files
    with fresh_dir(target, "files") as d:
        names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
        os.sync()
        t0 = time.perf_counter()
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
            os.stat(name)
            os.unlink(name)
        seconds = time.perf_counter() - t0
    return [Measurement("createstat", n / seconds, "files/s", seconds, {"files": n})]


def stdlib_tarball(cache_dir: Path) -> tuple[Path, dict]:
    """The cached tarball of this Python's standard library, and its counts.

    Built once under ``cache_dir``: ``sysconfig.get_paths()["stdlib"]``
    without ``__pycache__`` and ``site-packages``, uncompressed (so ``tar -xf``
    measures the filesystem, not gunzip). Returns (path, {"files", "dirs",
    "bytes", "source"}), where files counts regular files and symlinks.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(str(stdlib).encode()).hexdigest()[:10]
    tarball = cache_dir / f"stdlib-py{sysconfig.get_python_version()}-{key}.tar"
    info_path = tarball.with_suffix(".json")
    if tarball.exists() and info_path.exists():
        return tarball, json.loads(info_path.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    counts = {"files": 0, "dirs": 0, "bytes": 0, "source": str(stdlib)}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = info.name.split("/")
        if "__pycache__" in parts or parts[1:2] == ["site-packages"]:
            return None
        if info.isdir():
            counts["dirs"] += 1
        else:
            counts["files"] += 1
            counts["bytes"] += info.size
        return info

    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(stdlib, arcname="stdlib", filter=keep)
    partial.rename(tarball)
    info_path.write_text(json.dumps(counts))
    return tarball, counts


def untar_git_add(target: Target, cfg: Config) -> list[Measurement]:
    """Workload 5: ``tar -xf`` of the stdlib tarball, then ``git init && git add -A``."""
    tarball, counts = stdlib_tarball(cfg.cache_dir)
    files = counts["files"]
    # No user or system git config: the same git behaviour on every machine.
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    with fresh_dir(target, "tree") as d:
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(d)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        untar = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["git", "init", "-q"], cwd=d, env=env, check=True, capture_output=True)
        subprocess.run(["git", "add", "-A"], cwd=d, env=env, check=True, capture_output=True)
        git = time.perf_counter() - t0
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=d, env=env, check=True,
                                capture_output=True).stdout.count(b"\0")
    mib = counts["bytes"] / MiB
    return [
        Measurement("untar", files / untar, "files/s", untar, {"files": files, "MiB": mib}),
        Measurement("gitadd", files / git, "files/s", git, {"files": files, "indexed": listed}),
    ]
