#!/usr/bin/env python3
"""Where one fsync's time goes, in-process (no FUSE): commit vs the parts of ``Store.sync``.

    .venv/bin/python tools/bench/fsync_split.py [--workloads append,edits] [--ops 200] [--workdir /var/tmp]

Opens a fresh store in ``--workdir`` and drives its workspace API the way the
FUSE fsync handler does (``OpenFiles.write``, ``OpenFiles.commit``, then
``Store.sync``), timing each part of every operation with
``time.perf_counter``:

- ``append``: ``--ops`` times, 100 bytes appended to one open file, commit, sync
  (perfbench's "append 100 B + fsync");
- ``edits``: a 32 MiB file of incompressible data written and synced first
  (untimed), then 16 x (10 bytes at a random offset, commit, sync), repeated
  ``--ops // 16`` times (perfbench's "16 ten-byte edits of 32 MiB").

The parts of a sync are measured by wrapping what ``Store.sync`` calls:
``pre`` (from the call to the start of the flushes: the pin, the writer lock,
the txnid and its meta page), ``packs`` (``ChunkStore.sync``, in the flush
helper thread) and ``data.mdb`` (``env.sync``) side by side, ``flush`` (both,
as the caller waits for them), ``record`` (``synced.rec``), ``rest`` (the
pin swap after it) and ``total``.
Prints medians and 90th percentiles in µs. The FUSE round trips and the
worker-thread hop of the mount are not included: compare with perfbench's
rows for those. Timings on a shared machine are noisy: say the load
(printed) with the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chronicle.store.model import Actor  # noqa: E402
from chronicle.store.store import Store  # noqa: E402
from tools.storeapi import write_file  # noqa: E402

ACTOR = Actor(uid=0, gid=0, pid=os.getpid())
MiB = 1 << 20


class _Timed:
    """Wraps a store's sync so each part of every call is recorded (module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self.rows: list[dict[str, float]] = []
        self._row: dict[str, float] = {}
        chunks_sync, recorder, env = store.chunks.sync, store._recorder, store.env
        record = recorder.record

        def timed_chunks_sync() -> None:
            t = time.perf_counter()
            chunks_sync()
            self._row["packs"] = time.perf_counter() - t

        def timed_record(txnid: int, raw: bytes) -> bool:
            if "_flush_start" in self._row:
                self._row["flush"] = time.perf_counter() - self._row.pop("_flush_start")
            t = time.perf_counter()
            try:
                return record(txnid, raw)
            finally:
                self._row["record"] = time.perf_counter() - t

        class _Env:                                  # env.sync timed; the rest passed through
            def __getattr__(_self, name):
                return getattr(env, name)

            def sync(_self, force: bool = False) -> None:
                t = time.perf_counter()
                self._row.setdefault("_flush_start", t)
                self._row["pre"] = t - self._row["_start"]
                env.sync(force)
                self._row["data.mdb"] = time.perf_counter() - t

        store.chunks.sync = timed_chunks_sync
        recorder.record = timed_record
        self._env = _Env()

    def close(self) -> None:
        """Unwrap the store's sync parts."""
        del self.store.chunks.sync
        del self.store._recorder.record

    def sync(self) -> None:
        self._row = {"_start": time.perf_counter()}
        env, self.store.env = self.store.env, self._env
        try:
            self.store.sync()
        finally:
            self.store.env = env
        self._row["total"] = time.perf_counter() - self._row.pop("_start")
        self._row.pop("_flush_start", None)
        if all(k in self._row for k in ("pre", "flush", "record")):
            self._row["rest"] = self._row["total"] - self._row["pre"] - self._row["flush"] - self._row["record"]
        self.rows.append(self._row)


def _report(name: str, commits: list[float], timed: _Timed) -> None:
    def line(label: str, values: list[float]) -> str:
        values = sorted(values)
        if not values:
            return f"  {label:<9} —"
        p90 = values[int(0.9 * (len(values) - 1))]
        return f"  {label:<9} median {statistics.median(values) * 1e6:8.0f} µs   p90 {p90 * 1e6:8.0f} µs"
    print(f"{name}: {len(commits)} operations, load {os.getloadavg()[0]:.2f}")
    print(line("commit", commits))
    for part in ("pre", "packs", "data.mdb", "flush", "record", "rest", "total"):
        print(line("sync " + part if part != "total" else "sync", [r[part] for r in timed.rows if part in r]))


def run_append(store: Store, ops: int) -> None:
    ws = store.open_workspace("append", writable=True, create=True)
    ino = write_file(ws, ws.root, b"log.bin", b"", ACTOR)
    store.sync()
    timed, commits = _Timed(store), []
    ws.files.open(ino)
    size = 0
    for _ in range(ops):
        ws.files.write(ino, size, os.urandom(100), ACTOR.pid)
        size += 100
        t = time.perf_counter()
        ws.files.commit(ino, ACTOR.pid)
        commits.append(time.perf_counter() - t)
        timed.sync()
    ws.files.release(ino)
    timed.close()
    _report("append 100 B + fsync", commits, timed)


def run_edits(store: Store, ops: int) -> None:
    ws = store.open_workspace("edits", writable=True, create=True)
    size = 32 * MiB
    ino = write_file(ws, ws.root, b"big.bin", os.urandom(size), ACTOR)
    store.sync()
    timed, commits = _Timed(store), []
    rng = random.Random(7)
    ws.files.open(ino)
    for _ in range(max(1, ops // 16) * 16):
        ws.files.write(ino, rng.randrange(size - 10), os.urandom(10), ACTOR.pid)
        t = time.perf_counter()
        ws.files.commit(ino, ACTOR.pid)
        commits.append(time.perf_counter() - t)
        timed.sync()
    ws.files.release(ino)
    timed.close()
    _report("ten-byte edit of 32 MiB + fsync", commits, timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="append,edits", help="comma-separated: append, edits")
    parser.add_argument("--ops", type=int, default=200, help="operations per workload (default 200)")
    parser.add_argument("--workdir", default="/var/tmp", help="parent of the temporary store (local disk)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fsync-split-", dir=args.workdir) as tmp:
        store = Store.init(Path(tmp) / "store")
        try:
            for name in args.workloads.split(","):
                {"append": run_append, "edits": run_edits}[name](store, args.ops)
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
