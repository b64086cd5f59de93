"""Smoke test of the filesystem benchmark harness (tools/bench/fsbench.py).

Runs its fastest workload on ext4 only, so the harness does not rot unnoticed.
No timing assertions: the figures depend on the machine.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
