"""The FUSE loop thread stays free: a ``stat`` in the mount is answered within
100 ms while long work runs — a ctl ``restore --at`` over 20,000 paths (in a
worker thread, ``ChronicleOperations.run_exclusive``) and a read of a
``.chronicle/log`` of 40,000 events.

The store is filled through the store API before mounting (20 directories of
1,000 files, then a chmod of each file: 40,020 events in a few seconds).

What is measured: each ``stat`` asks for a name never asked before (half of
them missing, half the store's files), so none is answered from the kernel's
dentry or attribute cache: every one is a LOOKUP the daemon's loop answers.
The assertion is on the **maximum** latency of the stats in flight while the
work is in progress, not a percentile: a loop blocked for half a second
delays just the one or two stats waiting on it, which a percentile would
hide. It is the best of up to :data:`ATTEMPTS` runs: on a loaded machine one
run's maximum can be a scheduling hiccup of the daemon's process, while a
blocked loop fails every run (a restore on the loop thread: ~460 ms here).
The budget is 100 ms, not gc's 50: the restore's worker thread holds the GIL
through LMDB's C calls, and on this 2-core VM the slowest stat of a run was
50-66 ms on a quiet machine (medians 0.0-0.4 ms) -- well apart from a blocked
loop's ~460 ms.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from chronicle.control import ControlChannel
from chronicle.store.model import Actor
from chronicle.store.store import Store

BUDGET = 0.100          # s: the longest a stat may take (module docstring: why not 50 ms)
ATTEMPTS = 3
DIRS, FILES = 20, 1000  # 20,000 paths
WORKSPACE = "w"


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the Chronicle daemon's loop thread")


def populate(store_path: Path) -> int:
    """20,000 files in 20 directories, then a chmod of each; a snapshot
    ``empty`` before them. Returns the head seq (the number of events)."""
    actor = Actor(os.getuid(), os.getgid(), os.getpid())
    with Store.open(store_path, create=True) as store:
        ws = store.open_workspace(WORKSPACE, writable=True, create=True)
        ws.snapshot("empty")
        inos = []
        for d in range(DIRS):
            dino, _ = ws.mkdir(ws.root, b"d%02d" % d, 0o755, actor)
            for i in range(FILES):
                inos.append(ws.create(dino, b"f%04d" % i, stat.S_IFREG | 0o644, actor)[0])
        for ino in inos:
            ws.setattr(ino, actor, mode=stat.S_IFREG | 0o600)
        store.sync()
        return ws.head_seq


class StatProbe:
    """A thread stat'ing fresh names in the mount; records each latency (s)
    with the time it started."""

    def __init__(self, root: Path):
        self.root = root
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            if n % 2:
                path = self.root / f"missing-{n}"
            else:
                k = (n // 2) % (DIRS * FILES)
                path = self.root / f"d{k // FILES:02d}" / f"f{k % FILES:04d}"
            start = time.monotonic()
            try:
                os.stat(path)
            except FileNotFoundError:
                pass
            self.samples.append((start, time.monotonic() - start))
            time.sleep(0.001)

    def __enter__(self) -> StatProbe:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def during(self, start: float, end: float) -> list[float]:
        """Latencies of the stats that were in flight at some point in ``[start, end]``."""
        return sorted(lat for t, lat in self.samples if t <= end and t + lat >= start)


def within_budget(attempt, what: str) -> None:
    """Run ``attempt() -> (latencies, description)`` up to :data:`ATTEMPTS`
    times; pass as soon as one run's slowest stat is within :data:`BUDGET`."""
    runs = []
    for _ in range(ATTEMPTS):
        latencies, description = attempt()
        assert len(latencies) >= 5, f"only {len(latencies)} stats overlapped {description}: nothing measured"
        runs.append(f"{latencies[-1] * 1000:.0f} ms max, {latencies[len(latencies) // 2] * 1000:.1f} ms "
                    f"median of {len(latencies)} stats during {description}")
        if latencies[-1] < BUDGET:
            return
    raise AssertionError(f"a stat took longer than {BUDGET * 1000:.0f} ms during {what} in every run:\n"
                         + "\n".join(runs))


def test_stat_answers_during_a_20000_path_restore(mount_factory):
    store = mount_factory.new_store()
    head = populate(store)
    mount = mount_factory(store=store, workspace=WORKSPACE)
    points = iter(["empty", str(head)] * ATTEMPTS)      # away and back: 20,020 paths each time

    def attempt():
        point = next(points)
        with ControlChannel(mount.path) as ctl, StatProbe(mount.path) as probe:
            start = time.monotonic()
            reply = ctl.request({"cmd": "restore", "at": point})
            end = time.monotonic()
        assert reply["paths"] == DIRS * FILES + DIRS
        assert len(os.listdir(mount.path)) == (0 if point == "empty" else DIRS)
        return probe.during(start, end), f"a restore of {reply['paths']} paths ({end - start:.2f} s)"

    within_budget(attempt, "a 20,000-path restore")


def test_stat_answers_during_a_read_of_a_40000_event_log(mount_factory):
    store = mount_factory.new_store()
    events = populate(store)
    assert events >= 40_000
    mount = mount_factory(store=store, workspace=WORKSPACE)

    def attempt():
        with StatProbe(mount.path) as probe:
            start = time.monotonic()
            with open(mount.path / ".chronicle" / "log", "rb", buffering=0) as f:   # a fresh open
                lines = 0
                while chunk := f.read(16 * 1024):
                    lines += chunk.count(b"\n")
            end = time.monotonic()
        assert lines >= events
        return probe.during(start, end), f"a read of a {lines}-line log ({end - start:.2f} s)"

    within_budget(attempt, "a read of a 40,000-event log")
