"""``kill -9`` of ``chronicle gc`` while it drops ignored paths' records: fsck stays clean, the next gc finishes."""

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

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import dryrun
from chronicle.store.store import Store
from tests.storeutil import A, write

REPO = Path(__file__).resolve().parents[3]


def _build(path: Path) -> None:
    """Rounds of 300 files in ``node_modules/`` created and removed, a versioned file beside them."""
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    for r in range(3):
        nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
        dirs = [ws.mkdir(nm, b"p%d" % d, 0o755, A)[0] for d in range(10)]
        for i in range(300):
            write(ws, dirs[i % 10], b"f%d.js" % i, b"%d-%d" % (r, i) * 50)
        for d, ino in enumerate(dirs):
            for i in range(d, 300, 10):
                ws.unlink(ino, b"f%d.js" % i, A)
            ws.rmdir(nm, b"p%d" % d, A)
        ws.rmdir(ws.root, b"node_modules", A)
        write(ws, ws.root, b"app.py", b"round %d" % r)
    store.close()


def _gc(path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "chronicle", "gc", "-s", str(path), "-w", "w", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check(path: Path) -> None:
    store = Store.open(path)
    try:
        report = fsck(store)
        assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]
        ws = store.open_workspace("w")
        for seq in range(1, ws.head_seq + 1, 7):        # no past tree names a missing inode
            view = ws.view(seq)
            with ws.read_txn() as txn:
                stack = [ws.root]
                while stack:
                    parent = stack.pop()
                    for name, ino, _kind in view.entries(txn, parent):
                        attrs = view.attrs(txn, ino)
                        assert attrs is not None and attrs.nlink >= 1, (seq, name)
                        if attrs.is_dir:
                            stack.append(ino)
    finally:
        store.close()


def test_kill_9_while_dropping_unversioned_records(tmp_path):
    path = tmp_path / "s"
    _build(path)
    shutil.copytree(path, tmp_path / "probe")
    start = time.monotonic()
    probe = _gc(tmp_path / "probe")
    probe_out, _ = probe.communicate(timeout=120)
    whole = time.monotonic() - start
    assert json.loads(probe_out)["dropped_inodes"] == 3 * 311
    rng = random.Random(int(os.environ.get("GC_CRASH_SEED", "7")))
    kills = 0
    for _trial in range(6):
        proc = _gc(path)
        time.sleep(rng.uniform(0.4 * whole, whole))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        _check(path)
    proc = _gc(path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    _check(path)
    store = Store.open(path)
    try:
        again = dryrun.dry_run(store, ["w"])["workspaces"][0]
        assert again["dropped_inodes"] == 0 and again["dropped_lines"] == 0
    finally:
        store.close()
    assert kills >= 1
