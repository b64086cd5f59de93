#!/usr/bin/env python3
"""History-query budgets of issue 12 (run by hand, not in CI).

    .venv/bin/python tools/bench/history_bench.py [--lines 5000] [--versions 1000] [--rounds 3]

**blame**: a text file of ``--lines`` lines written ``--versions`` times, each
version changing one line, blamed through the store API (no mount) — budget:
under 2 s for 5,000 lines x 1,000 versions. Prints each round and the median,
in seconds. The CI test of blame asserts only a loose bound (a complexity
regression guard); this is where the budget is measured.

**listing** (``--listing N``, default 20,000): a file with N versions, then
``ls .chronicle/versions/f/`` on a real mount, timed (budget: under 1 s for
20,000 versions; ``tests/mount/test_magic_versions.py`` checks the listing
and a loose bound).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from chronicle import procs  # noqa: E402
from chronicle.store.history.blame import blame  # noqa: E402
from chronicle.store.history.views import HistoryViews  # noqa: E402
from chronicle.store.model import SYSTEM  # noqa: E402
from chronicle.store.store import Store  # noqa: E402
from tools.storeapi import write_file  # noqa: E402


def _write(ws, name: bytes, data: bytes) -> None:
    """create-or-truncate, write, close of ``name`` at the root (``tools.storeapi``)."""
    write_file(ws, ws.root, name, data, SYSTEM)


def bench_blame(lines: int, versions: int, rounds: int) -> list[float]:
    """Seconds per blame of the last version, ``rounds`` times, on a fresh store."""
    with tempfile.TemporaryDirectory(prefix="chronicle-history-bench-") as tmp:
        store = Store.init(Path(tmp) / "store")
        try:
            ws = store.open_workspace("w", writable=True, create=True)
            text = [b"line %d of a long file\n" % i for i in range(lines)]
            _write(ws, b"big", b"".join(text))
            for v in range(1, versions):
                text[(v * 37) % lines] = b"changed in %d\n" % v
                _write(ws, b"big", b"".join(text))
            took = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                result = blame(HistoryViews(ws), b"big")
                took.append(time.perf_counter() - t0)
                assert len(result.records) == lines
            return took
        finally:
            store.close()


def bench_listing(versions: int, rounds: int) -> list[float]:
    """Seconds per ``ls`` of ``.chronicle/versions/f/`` of a file with
    ``versions`` versions (each a short text, written through the store
    API), on a real mount, ``rounds`` times (each a new directory handle)."""
    with tempfile.TemporaryDirectory(prefix="chronicle-history-bench-") as tmp:
        path, mnt, log = Path(tmp) / "store", Path(tmp) / "mnt", Path(tmp) / "daemon.log"
        with Store.init(path) as store:
            ws = store.open_workspace("w", writable=True, create=True)
            for v in range(versions):
                _write(ws, b"f", b"version %d\n" % (v % 64))
        mnt.mkdir()
        proc, _ = procs.spawn(procs.mount_command(path, "w", mnt, []), log, env=dict(os.environ), cwd=REPO)
        try:
            procs.wait_for_mount(mnt, proc.pid, timeout=60, log_path=log)
            listing = mnt / ".chronicle" / "versions" / "f"
            os.stat(listing)                                # the lookup is not what is measured
            took = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                names = subprocess.run(["ls", str(listing)], check=True, capture_output=True).stdout.split()
                took.append(time.perf_counter() - t0)
                assert len(names) == versions
            return took
        finally:
            procs.unmount(mnt)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listing", type=int, default=20000, help="versions for the listing job (0: skip)")
    args = parser.parse_args()
    took = bench_blame(args.lines, args.versions, args.rounds)
    print(f"blame {args.lines:,} lines x {args.versions:,} versions: "
          + ", ".join(f"{t:.3f}" for t in took) + f" s; median {statistics.median(took):.3f} s (budget 2 s)")
    if args.listing:
        took = bench_listing(args.listing, args.rounds)
        print(f"ls of {args.listing:,} versions: " + ", ".join(f"{t:.3f}" for t in took)
              + f" s; median {statistics.median(took):.3f} s (budget 1 s)")


if __name__ == "__main__":
    main()
