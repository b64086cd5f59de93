"""GC's pending log-line marks (``prune.finish_marks``): ``kill -9`` while it writes them leaves fsck clean and
the next gc writes the rest; the log and the path history end as an uninterrupted gc leaves them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun, prune
from chronicle.store.gc.policy import Policy
from chronicle.store.store import Store
from tests.storeutil import history, log_lines, write

REPO = Path(__file__).resolve().parents[3]
LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then

# gc in a child that kills itself with SIGKILL once the first batch of marks is committed
_KILLED_IN_MARKS = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from chronicle.store.gc import collect, prune
from chronicle.store.store import Store
mark_all, calls = prune._mark_all, []
real_gather = prune._gather_marks
def gather(*args):
    calls.append(1)
    if len(calls) == 2:                  # the first batch of lines is committed: die before the second
        os.kill(os.getpid(), signal.SIGKILL)
    return real_gather(*args)
prune._gather_marks = gather
store = Store.open(Path(sys.argv[2]))
collect.collect(store, ["w"], now_ns=int(sys.argv[3]), wait=0)
"""


def _build(path: Path) -> None:
    """300 files, 3 versions each: 600 versions to prune, more than one batch of log lines."""
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    for round_ in range(3):
        for i in range(300):
            write(ws, ws.root, b"f%03d" % i, b"round %d of %d" % (round_, i))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    store.close()


def _pending(store: Store) -> int:
    with store.env.begin() as txn:
        return txn.stat(store.dbs["gc_marks"])["entries"]


def _state(path: Path) -> tuple[list[dict], list[list[dict]]]:
    store = Store.open(path)
    try:
        ws = store.open_workspace("w")
        return log_lines(ws), [history(ws, b"f%03d" % i) for i in range(0, 300, 7)]
    finally:
        store.close()


def test_kill_9_while_marking_log_lines_then_the_next_gc_marks_the_rest(tmp_path):
    path = tmp_path / "s"
    _build(path)
    shutil.copytree(path, tmp_path / "whole")
    store = Store.open(tmp_path / "whole")
    try:
        assert collect.collect(store, ["w"], now_ns=LATER, wait=0)["pruned_versions"] == 600
    finally:
        store.close()
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_MARKS, str(REPO), str(path), str(LATER)],
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = Store.open(path)
    try:
        report = fsck(store)
        assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]
        assert _pending(store) > 0
        ws = store.open_workspace("w")
        marked = sum(bool(line.get("pruned")) for line in log_lines(ws))
        assert 0 < marked < 600                          # killed half way through the lines
        assert all(v.get("pruned") for v in history(ws, b"f000")[:2])    # the entries are marked already
        result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
        assert result["pruned_versions"] == 0            # nothing left to prune: only the marks were left
        assert _pending(store) == 0
        report = fsck(store)
        assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]
    finally:
        store.close()
    assert _state(path) == _state(tmp_path / "whole")


def test_marks_are_written_where_the_log_line_names_the_path(store, ws):
    """A pending mark of a seq whose line names another path leaves that line alone (idempotent rewrite)."""
    for i in range(3):
        write(ws, ws.root, b"a", b"a%d" % i)
        write(ws, ws.root, b"b", b"b%d" % i)
    lines = log_lines(ws)
    seq_of_b = next(line["seq"] for line in lines if line["path"] == "b")
    with store.env.begin(write=True) as txn:
        prune.put_marks(txn, store.dbs, {(ws.id, b"a"): [seq_of_b]})
    assert prune.finish_marks(store) == 0
    assert _pending(store) == 0
    assert log_lines(ws) == lines
