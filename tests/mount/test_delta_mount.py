"""Small in-place edits of a big file on a real mount (issue 11's edits row):
each edit, fsync'd, stores a zstd delta of the chunk it changed instead of a
whole new chunk, and every version reads back."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's chunk store")


def pack_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "packs").rglob("*.pack"))


def test_sixteen_fsyncd_ten_byte_edits_of_32_mib_store_a_few_kib(mount):
    rng = random.Random(4)
    data = bytearray(rng.randbytes(32 << 20))
    path = mount.path / "big.bin"
    path.write_bytes(data)
    before = pack_bytes(mount.store)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(16):
            offset = rng.randrange(len(data) - 10)
            patch = rng.randbytes(10)
            assert os.pwrite(fd, patch, offset) == 10
            os.fsync(fd)
            data[offset:offset + 10] = patch
    finally:
        os.close(fd)
    grown = pack_bytes(mount.store) - before
    assert grown < 32 * 1024, grown                       # 16 whole new chunks would be ~700 KiB
    assert path.read_bytes() == data
    query = json.loads((mount.path / ".chronicle" / "query" / "big.bin").read_text())
    assert len(query["versions"]) == 17
    mount.stop()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "chronicle", "fsck", "-s", str(mount.store)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _source(rng: random.Random, lines: int) -> list[bytes]:
    words = [b"def", b"return", b"self", b"value", b"click", b"option", b"if", b"None", b"ctx"]
    return [b" ".join(rng.choice(words) for _ in range(rng.randrange(3, 9))) + b"  # %d\n" % rng.randrange(10**6)
            for _ in range(lines)]


@pytest.mark.parametrize("how", ["trunc", "unlink", "replace"])
def test_a_source_file_rewritten_whole_twenty_times_stores_deltas(mount, how):
    rng = random.Random(7)
    lines = _source(rng, 220)
    path = mount.path / "core.py"
    path.write_bytes(b"".join(lines))
    first = pack_bytes(mount.store)
    versions = [b"".join(lines)]
    for _ in range(20):
        lines[rng.randrange(len(lines))] = _source(rng, 1)[0]
        data = b"".join(lines)
        if how == "unlink":                               # as git checkout writes a changed file
            path.unlink()
            path.write_bytes(data)
        elif how == "replace":                            # as an atomic save: a temp file renamed over
            tmp = mount.path / ".core.py.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:
            path.write_bytes(data)                        # O_TRUNC + write
        versions.append(data)
    grown = pack_bytes(mount.store) - first
    assert grown < 20 * first / 3, (grown, first)         # 20 whole chunks without a base
    assert path.read_bytes() == versions[-1]
    query = json.loads((mount.path / ".chronicle" / "query" / "core.py").read_text())
    seen = set()
    for v in query["versions"]:                          # unlink + create also lists the deletions
        at = mount.path / ".chronicle" / "at" / str(v["seq"]) / "core.py"
        if at.exists():
            seen.add(at.read_bytes())
    assert all(expected in seen for expected in versions)
    mount.stop()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "chronicle", "fsck", "-s", str(mount.store)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
