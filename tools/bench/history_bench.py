#!/usr/bin/env python3
"""History-query budgets of issue 12 (run by hand, not in CI).

    .venv/bin/python tools/bench/history_bench.py [--lines 5000] [--versions 1000] [--rounds 3]

**blame**: a text file of ``--lines`` lines written ``--versions`` times, each
version changing one line, blamed through the store API (no mount) — budget:
under 2 s for 5,000 lines x 1,000 versions. Prints each round and the median,
in seconds. The CI test of blame asserts only a loose bound (a complexity
regression guard); this is where the budget is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    took = bench_blame(args.lines, args.versions, args.rounds)
    print(f"blame {args.lines:,} lines x {args.versions:,} versions: "
          + ", ".join(f"{t:.3f}" for t in took) + f" s; median {statistics.median(took):.3f} s (budget 2 s)")


if __name__ == "__main__":
    main()
