"""Chronicle's own budgets, measured on a real mount (run by hand, not in CI).

    .venv/bin/python tools/bench/budgets.py [--quick] [--workdir DIR] [--json PATH]

1. **memory**: the daemon's peak RSS while one file of 4 GiB is written through
   it (budget: < 512 MiB — content must be chunked as it streams, not held);
2. **query**: ``cat .chronicle/query/f`` for a file with 10,000 versions
   (budget: < 100 ms; median of 5 runs, each a fresh open);
3. **dedup**: 100 versions of a 10 MiB incompressible file, each differing
   from the last by a 100-byte insertion at a random place (budget: the
   packs grow by < 3x the file's size; the metadata growth is reported too).

``--quick`` shrinks everything (256 MiB, 1,000 versions, 20 versions) for a
smoke run; its figures are not the budgets' conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from chronicle import procs  # noqa: E402

CHRONICLE = [sys.executable, "-m", "chronicle"]
MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run([*CHRONICLE, *args], check=True, capture_output=True, text=True).stdout


class Mount:
    """``chronicle mount`` of one workspace; ``stop()`` unmounts it."""

    def __init__(self, store: Path, mountpoint: Path, workspace: str = "bench"):
        self.store, self.path, self.workspace = store, mountpoint, workspace
        run("mount", "--store", str(store), "--workspace", workspace, str(mountpoint))
        self.pid = json.loads((mountpoint / ".chronicle" / "stats").read_text())["pid"]

    def stats(self) -> dict:
        return json.loads((self.path / ".chronicle" / "stats").read_text())

    def stop(self) -> None:
        if os.path.ismount(self.path):
            try:
                run("umount", str(self.path))
            except subprocess.CalledProcessError:
                procs.unmount(self.path)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def incompressible(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def budget_memory(mount: Mount, size: int) -> dict:
    peak = [rss_kib(mount.pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(mount.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    block = incompressible(MiB, 1)
    table = bytes(random.Random(2).sample(range(256), 256))
    start = time.monotonic()
    with open(mount.path / "big", "wb") as f:
        for i in range(size // MiB):
            if i % 64 == 0:
                table = bytes(random.Random(i).sample(range(256), 256))   # no two 64 MiB runs alike
            f.write(block.translate(table) if i % 2 else block[::-1].translate(table))
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    (mount.path / "big").unlink()
    return {"file_mib": size // MiB, "peak_rss_mib": round(peak[0] / 1024, 1), "budget_mib": 512,
            "ok": peak[0] / 1024 < 512, "write_mib_s": round(size / MiB / seconds, 1)}


def budget_query(mount: Mount, versions: int) -> dict:
    path = mount.path / "many.txt"
    for i in range(versions):
        with open(path, "w") as f:
            f.write(f"version {i}\n")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data = (mount.path / ".chronicle" / "query" / "many.txt").read_bytes()
        times.append(time.perf_counter() - start)
    count = len(json.loads(data)["versions"])
    ms = statistics.median(times) * 1000
    return {"versions": count, "median_ms": round(ms, 1), "budget_ms": 100, "ok": ms < 100 and count == versions}


def budget_dedup(mount: Mount, versions: int) -> dict:
    rng = random.Random(7)
    data = bytearray(incompressible(10 * MiB, 3))
    before = mount.stats()
    for _ in range(versions):
        pos = rng.randrange(len(data))
        data[pos:pos] = rng.randbytes(100)
        with open(mount.path / "doc.bin", "wb") as f:
            f.write(data)
    after = mount.stats()
    packs = after["pack_bytes"] - before["pack_bytes"]
    meta = after["metadata_bytes"] - before["metadata_bytes"]
    return {"versions": versions, "file_mib": round(len(data) / MiB, 2), "pack_growth_mib": round(packs / MiB, 2),
            "ratio_to_file": round(packs / len(data), 2), "metadata_growth_mib": round(meta / MiB, 2),
            "budget_ratio": 3, "ok": packs < 3 * len(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chronicle-budgets-", dir=args.workdir))
    results = {}
    mount = None
    try:
        for name, fn, arg in (("memory", budget_memory, (256 if args.quick else 4096) * MiB),
                              ("query", budget_query, 1000 if args.quick else 10_000),
                              ("dedup", budget_dedup, 20 if args.quick else 100)):
            mount = Mount(work / f"store-{name}", work / f"mnt-{name}")
            try:
                results[name] = fn(mount, arg)
            finally:
                mount.stop()
            print(f"{name:7s} {json.dumps(results[name])}", flush=True)
    finally:
        if mount is not None:
            mount.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
