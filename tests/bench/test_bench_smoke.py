"""Smoke tests of the benchmark harnesses (tools/bench/fsbench.py, tools/bench/agent_bench.py).

fsbench runs its fastest workload on ext4 only, agent_bench its quick mode on
a few turns, so neither harness rots unnoticed. No timing assertions: the
figures depend on the machine.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_fsbench_quick_createstat_on_ext4(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    results_path = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "fsbench.py"), "--quick",
         "--targets", "ext4", "--workloads", "createstat",
         "--workdir", str(workdir), "--json", str(results_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The table row: target, figure, ratio to itself.
    assert re.search(r"ext4\W+[\d,.]+\W+1\.00x", proc.stdout), proc.stdout

    results = json.loads(results_path.read_text())
    row = results["metrics"]["createstat"]["ext4"]
    assert row["unit"] == "files/s"
    assert row["value"] > 0
    assert row["details"]["files"] == 1000
    assert list(workdir.iterdir()) == [], "the run's temp dir was not removed"


@pytest.mark.mount
def test_agent_bench_quick(tmp_path):
    """tools/bench/agent_bench.py --quick runs (real mounts and workers) and cleans up after itself."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    results_path = tmp_path / "agents.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "agent_bench.py"), "--quick", "--turns", "5",
         "--log-turns", "120", "--workdir", str(workdir), "--json", str(results_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(a) Per-turn overhead" in proc.stdout and "(b) Restoring an agent with 120 turns" in proc.stdout
    results = json.loads(results_path.read_text())
    assert set(results["overhead"]) == {"noop", "counter"}
    restore = results["restore"]
    assert (restore["state_latest_snapshot"], restore["state_latest_patches"]) == (100, 20)
    assert (restore["state_worst_turn"], restore["state_worst_patches"], restore["turns_listed"]) == (99, 99, 121)
    assert list(workdir.iterdir()) == [], "the run's temp dir was not removed"
