"""``kill -9`` of ``chronicle gc`` at random points: fsck stays clean, kept versions read, the next gc finishes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from chronicle.errors import Pruned
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.history import points
from chronicle.store.store import Store
from tests.store.gc.test_collect import read_at
from tests.storeutil import write

REPO = Path(__file__).resolve().parents[3]


def _build(path: Path) -> tuple[dict[int, dict[bytes, bytes]], int]:
    """300 files, 4 versions each, 8-24 KiB of random bytes; a snapshot half way."""
    rng = random.Random(9)
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    trees: dict[int, dict[bytes, bytes]] = {}
    tree: dict[bytes, bytes] = {}
    snap = None
    for round_ in range(4):
        for i in range(300):
            name = b"f%03d" % i
            tree[name] = rng.randbytes(rng.randint(8_000, 24_000))
            write(ws, ws.root, name, tree[name])
        trees[ws.head_seq] = dict(tree)
        if round_ == 1:
            snap = ws.head_seq
            points.put_snapshot(ws, "half", snap)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    store.close()
    return trees, snap


def _gc(path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "chronicle", "gc", "-s", str(path), "-w", "w", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check(path: Path, trees: dict[int, dict[bytes, bytes]], snap: int) -> None:
    store = Store.open(path)
    try:
        report = fsck(store)
        assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]
        ws = store.open_workspace("w")
        for seq in (snap, ws.head_seq):          # pinned trees read whole
            for name, data in trees[seq].items():
                assert read_at(ws, seq, name) == data
        for seq, tree in trees.items():          # any other: its own content or a clear error
            for name in list(tree)[::37]:
                try:
                    assert read_at(ws, seq, name) == tree[name]
                except Pruned:
                    pass
    finally:
        store.close()


def test_kill_9_at_random_points_of_gc(tmp_path):
    path = tmp_path / "s"
    trees, snap = _build(path)
    rng = random.Random(int(os.environ.get("GC_CRASH_SEED", "5")))
    shutil.copytree(path, tmp_path / "probe")
    start = time.monotonic()
    probe = _gc(tmp_path / "probe")                       # how long a whole gc takes here, start-up included
    probe_out, _ = probe.communicate(timeout=120)
    whole = time.monotonic() - start
    all_versions = json.loads(probe_out)["pruned_versions"]
    kills = 0
    for _trial in range(8):
        proc = _gc(path)
        time.sleep(rng.uniform(0.3 * whole, whole))       # somewhere in start-up, prune, sweep or compaction
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        _check(path, trees, snap)
    proc = _gc(path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    _check(path, trees, snap)
    assert json.loads(out)["pruned_versions"] < all_versions      # the killed runs' batches stayed done
    store = Store.open(path)
    try:                                          # the job is finished: nothing more to free
        assert dryrun.dry_run(store, ["w"])["freed_bytes"] == 0
        assert dryrun.dry_run(store, ["w"])["workspaces"][0]["dropped_versions"] == 0
        pack_bytes = store.stats()["pack_bytes"]
    finally:
        store.close()
    kept = sum(len(d) for seq in (snap, max(trees)) for d in trees[seq].values())
    assert pack_bytes < 1.3 * kept + 1_000_000           # the dropped half's bytes came back
    assert kills >= 1
