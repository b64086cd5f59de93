"""Smoke tests of tools/bench/perfbench.py (issue 11's benchmark) and of
profile_commit.py's summary of py-spy output.

perfbench runs every workload but the stdlib untar at its smallest on ext4 and a
real Chronicle mount (no JuiceFS download in CI). No timing assertions: the
figures depend on the machine.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.profile_commit import summarise

REPO = Path(__file__).resolve().parents[2]


PERF_TINY = ["--quick", "--rounds", "2", "--size", "8M", "--rand-file-size", "8M", "--rand-ops", "200",
             "--files", "100", "--append-sizes", "0,1M", "--edit-file-size", "2M", "--sqlite-inserts", "100",
             "--git-files", "20", "--git-commits", "5", "--tree-files", "100"]


@pytest.mark.mount
@pytest.mark.slow
def test_perfbench_tiny_on_ext4_and_chronicle(tmp_path):
    """tools/bench/perfbench.py with its smallest settings on ext4 + a real Chronicle mount (no
    JuiceFS download here): every row has a median per target and the Chronicle/ext4 ratio, the
    JSON keeps both rounds, the store growth of the edits is split into chunks and metadata, and
    the run's temp dir is gone. Every workload but the stdlib untar (whose size is fixed)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    results_path = tmp_path / "perf.json"
    workloads = "seq,randwrite,createstat,append,fsync,edits,sqlite,checkout,tree"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "perfbench.py"), *PERF_TINY,
         "--targets", "ext4,chronicle", "--workloads", workloads,
         "--workdir", str(workdir), "--json", str(results_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "C/ext4" in proc.stdout and "C/JuiceFS" not in proc.stdout, proc.stdout
    # A row: the title, two figures, the ratio and the direction.
    assert re.search(r"append 100 B \+ close at 1 MiB, median ms\W+[\d,.]+\W+[\d,.]+\W+[\d,.]+x\W+lower",
                     proc.stdout), proc.stdout
    results = json.loads(results_path.read_text())
    metrics = ["seqwrite", "seqread", "randwrite", "createstat", "append_0M", "append_1M", "fsync",
               "edits_ms", "sqlite_normal", "sqlite_full", "checkout", "tree_untar", "tree_rm"]
    for metric in metrics:
        for target in ("ext4", "chronicle"):
            rounds = results["rounds"][metric][target]
            assert isinstance(rounds, list) and len(rounds) == 2, (metric, target, rounds)
            assert results["medians"][metric][target] > 0, (metric, target)
    assert set(results["rounds"]["edits_growth"]) == {"chronicle"}  # ext4 has no store of its own
    growth = results["rounds"]["edits_growth"]["chronicle"][0]["details"]
    assert growth["chunks_mib"] > 0 and growth["metadata_mib"] > 0, growth
    assert results["rounds"]["checkout"]["chronicle"][0]["details"]["commits"] == 5
    assert list(workdir.iterdir()) == [], "the run's temp dir was not removed"


def test_profile_commit_summary_counts_inclusive_and_self(tmp_path):
    """tools/bench/profile_commit.py's summary of py-spy's collapsed stacks: inclusive counts a
    function once per stack (Chronicle's frames below the daemon loop only), self counts the leaf,
    paths lose this machine's prefix and line numbers."""
    raw = tmp_path / "x.raw"
    raw.write_text(
        "serve (/x/chronicle/fs/daemon.py:10);flush (/x/chronicle/fs/operations.py:5);"
        "feed (/x/chronicle/store/namespace/content.py:250) 30\n"
        "serve (/x/chronicle/fs/daemon.py:10);flush (/x/chronicle/fs/operations.py:5);"
        "read (/v/lib/python3.11/site-packages/foo.py:3) 10\n"
        "serve (/x/chronicle/fs/daemon.py:10);get_events (/v/lib/python3.11/site-packages/trio/io.py:9) 10\n")
    text = summarise(raw, 0.5, "title")
    assert "wall time of the recorded part: 500 ms; samples (non-idle): 50" in text
    inclusive, self_ = text.split("by self samples")
    assert "80.0%      40  flush (chronicle/fs/operations.py)" in inclusive
    assert "daemon.py" not in inclusive
    assert "60.0%      30  feed (chronicle/store/namespace/content.py)" in self_
    assert "20.0%      10  read (site-packages/foo.py)" in self_


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "must be positive"),
    (["--append-sizes", "5"], "--append-sizes: size must be a positive multiple of 1 MiB"),
    (["--targets", "ext5"], "unknown: ext5"),
    (["--git-repo", "/nonexistent"], "not a git repository"),
])
def test_perfbench_bad_arguments_get_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench" / "perfbench.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sequential_rounds_write_fresh_bytes(tmp_path, monkeypatch):
    """Each round of the seq workload writes bytes no earlier round wrote (else
    Chronicle's later rounds would measure deduplication, not writing)."""
    from tools.bench import workloads as wl
    from tools.bench.targets import Target

    target = Target(tmp_path)
    target.root = tmp_path
    written = []
    real = wl.write_file

    def spy(path, size, source):
        out = real(path, size, source)
        written.append(path.read_bytes())
        return out

    monkeypatch.setattr(wl, "write_file", spy)
    for _ in range(2):
        wl.sequential(target, wl.Config(seq_size=2 * wl.MiB), write=True, read=False)
    assert [len(w) for w in written] == [2 * wl.MiB] * 2
    first = {written[0][i:i + wl.MiB] for i in range(0, 2 * wl.MiB, wl.MiB)}
    assert not any(written[1][i:i + wl.MiB] in first for i in range(0, 2 * wl.MiB, wl.MiB))
