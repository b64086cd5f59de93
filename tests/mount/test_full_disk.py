"""A full disk under the store (issue 7 §3), on a real mount over a small tmpfs.

Must hold: every write, create, close and fsync that cannot be stored
answers ENOSPC (never EIO, never success); what returned success is stored
and reads back; ``chronicle fsck`` stays clean; once space is freed the same
mount writes again, without a remount.

Each test mounts a tmpfs of a few MiB (``mount -t tmpfs -o size=``) for the
store, and unmounts it at the end (root is needed; skipped otherwise).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "chronicle"]
SIZE = "24m"


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the Chronicle store on a full disk")


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of ``SIZE`` at ``tmp_path/disk``, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path: Path, size: int) -> tuple[int, int]:
    """Write fresh random blocks of ``size`` bytes (no dedup) to a new file ``path`` until a write fails; returns
    ``(bytes written, errno)`` of the failure, with close's errno if close failed."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = 0
    try:
        while True:
            try:
                written += os.write(fd, os.urandom(size))
            except OSError as exc:
                err = exc.errno
                break
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            err = err or exc.errno
    return written, err


def try_write(path: Path, data: bytes) -> int:
    """Create ``path`` with ``data`` (open, write, fsync, close): 0 or the errno of the first failing call."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        return exc.errno
    err = 0
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        err = exc.errno
    try:
        os.close(fd)
    except OSError as exc:
        err = err or exc.errno
    return err


def make_ballast(disk: Path, leave: int) -> Path:
    """A file on ``disk`` (outside the store) that leaves ``leave`` bytes free."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    with open(ballast, "wb") as f:
        f.write(b"\1" * max(st.f_bavail * st.f_frsize - leave, 0))
    return ballast


def fsck_clean(store: Path) -> None:
    proc = subprocess.run(CLI + ["fsck", "--store", str(store)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fsck exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "NOT clean" not in proc.stdout, proc.stdout


def test_data_filling_the_disk(small_fs, mount_factory, daemon_log):
    daemon_log.expect(r"No space|no space|ENOSPC")
    m = mount_factory(store=small_fs / "store")
    root = m.path
    ballast = make_ballast(small_fs, leave=8 << 20)
    (root / "before.txt").write_bytes(b"before\n")
    written, err = fill(root / "big", 1 << 20)
    assert err == errno.ENOSPC, f"filling the disk ended with {errno.errorcode.get(err, err)}"
    assert written > 0
    # The disk is full: small writes and creates are refused with ENOSPC or stored.
    results = {}
    for i in range(20):
        name = f"small-{i}.txt"
        results[name] = try_write(root / name, f"hello {i}\n".encode() * 50)
    assert set(results.values()) <= {0, errno.ENOSPC}, results
    for name, code in results.items():
        if code == 0:
            assert (root / name).read_bytes() == f"hello {name[6:-4]}\n".encode() * 50
    assert (root / "before.txt").read_bytes() == b"before\n"
    # Free the space: the same mount writes again.
    ballast.unlink()
    after = os.urandom(3 << 20)
    assert try_write(root / "after.bin", after) == 0
    assert (root / "after.bin").read_bytes() == after
    (root / "after.txt").write_bytes(b"after\n")
    assert (root / "after.txt").read_bytes() == b"after\n"
    m.stop()
    fsck_clean(m.store)


def test_metadata_filling_the_disk(small_fs, mount_factory, daemon_log):
    """Many small files and directories: the LMDB file grows until the disk is full."""
    daemon_log.expect(r"No space|no space|ENOSPC")
    m = mount_factory(store=small_fs / "store")
    root = m.path
    ballast = make_ballast(small_fs, leave=2 << 20)
    stored = {}
    codes = set()
    for i in range(20000):
        d = root / f"d{i // 100}"
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            codes.add(exc.errno)
            if len(codes) and i > 50 and exc.errno == errno.ENOSPC and len(stored) > 10:
                break
            continue
        data = f"file {i}\n".encode() * (i % 7 + 1)
        code = try_write(d / f"f{i}", data)
        if code == 0:
            stored[d / f"f{i}"] = data
        else:
            codes.add(code)
            if code == errno.ENOSPC and len(codes) == 1 and i > 200:
                # keep going a little: metadata must keep answering ENOSPC, never EIO
                if i % 50 == 0:
                    break
    assert errno.ENOSPC in codes, codes
    assert codes <= {errno.ENOSPC}, {errno.errorcode.get(c, c) for c in codes}
    for path, data in stored.items():
        assert path.read_bytes() == data, path
    ballast.unlink()
    (root / "after.txt").write_bytes(b"after\n")
    assert (root / "after.txt").read_bytes() == b"after\n"
    m.stop()
    fsck_clean(m.store)
