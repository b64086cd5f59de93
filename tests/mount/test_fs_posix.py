"""Focused POSIX tests on a real mount: what a state machine drives badly.

mmap (shared, writable), O_APPEND from two fds, a sparse file far past the
end, fsync/fdatasync, statfs, absurd sizes (EFBIG, as ext4), unlink of an
open file, explicit times surviving close, flock and fcntl locks. Each
compares with what ext4 does where the answer is not fixed by POSIX.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fsutil import outcome, payload

from chronicle.fs.operations import ChronicleOperations


@pytest.fixture
def fresh(session_mount) -> Path:
    """A fresh directory inside the session mount."""
    return session_mount.mkdtemp("focused-")


def test_mmap_shared_writable(fresh):
    path = fresh / "mapped"
    size = 3 * mmap.PAGESIZE + 123
    original = payload(1, size)
    path.write_bytes(original)
    expected = bytearray(original)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            for offset, chunk in ((0, b"head"), (mmap.PAGESIZE - 2, b"across"),
                                  (2 * mmap.PAGESIZE + 7, payload(2, 500)), (size - 3, b"end")):
                mm[offset:offset + len(chunk)] = chunk
                expected[offset:offset + len(chunk)] = chunk
            mm.flush()
            assert mm[:] == bytes(expected)
    with open(path, "rb") as f:
        assert f.read() == bytes(expected)
    assert os.stat(path).st_size == size


def test_o_append_from_two_fds(fresh, tmp_path):
    def run(root: Path) -> bytes:
        path = root / "log"
        a = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        b = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(20):
                os.write(a if i % 3 else b, f"line {i} from {'a' if i % 3 else 'b'}\n".encode() * (i % 4 + 1))
                os.lseek(b, 0, os.SEEK_SET)  # O_APPEND ignores the position
        finally:
            os.close(a)
            os.close(b)
        return path.read_bytes()

    assert run(fresh) == run(tmp_path)


def test_sparse_file(fresh):
    path = fresh / "sparse"
    far = 5 * 2**30 + 12345  # past 4 GiB: offsets must not be truncated to 32 bits
    with open(path, "wb") as f:
        f.write(b"start")
        f.seek(far)
        f.write(b"the end")
    assert os.stat(path).st_size == far + 7
    with open(path, "rb") as f:
        assert f.read(5) == b"start"
        for offset in (5, 4096, 2**31 - 10, 2**32 - 3, far - 4096):
            f.seek(offset)
            assert f.read(4096) == bytes(4096), offset
        f.seek(far - 3)
        assert f.read() == b"\0\0\0the end"


def test_fsync_and_fdatasync(fresh):
    path = fresh / "synced"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        assert os.fsync(fd) is None
        os.write(fd, b" data")
        assert os.fdatasync(fd) is None
    finally:
        os.close(fd)
    dfd = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fsync(dfd) is None  # sqlite and git fsync directories
    finally:
        os.close(dfd)
    assert path.read_bytes() == b"durable data"


def test_statfs_name_max(session_mount):
    assert os.statvfs(session_mount.path).f_namemax == 255


@pytest.mark.parametrize("op", ["truncate", "ftruncate", "pwrite"])
@pytest.mark.parametrize("size", [2**63 - 1, 100 * 2**50], ids=["2**63-1", "100PiB"])
def test_absurd_sizes(fresh, tmp_path, op, size, mount_target):
    """An absurd size gets ext4's errno (EFBIG), not a crash, and changes nothing.

    Except a write with the kernel's writeback cache (README, "The writeback
    cache"): FUSE gives the kernel no size limit of the mount, so the write
    is taken into the page cache and refused when it reaches the daemon --
    the close answers EIO, and the file keeps its content."""
    if op == "pwrite" and mount_target == "chronicle" and ChronicleOperations.enable_writeback_cache:
        path = fresh / "big"
        path.write_bytes(b"small")
        fd = os.open(path, os.O_RDWR)
        assert outcome(os.pwrite, fd, b"x", size - 1)[0] == "ok"
        assert outcome(os.close, fd) == ("err", "EIO")
        query = json.loads((fresh.parent / ".chronicle" / "query" / fresh.name / "big").read_bytes())
        assert [v["size"] for v in query["versions"]] == [5]
        (fresh / "after").write_bytes(b"still serving")
        assert (fresh / "after").read_bytes() == b"still serving"
        return

    def run(root: Path):
        path = root / "big"
        path.write_bytes(b"small")
        with open(path, "r+b") as f:
            if op == "truncate":
                result = outcome(os.truncate, path, size)
            elif op == "ftruncate":
                result = outcome(os.ftruncate, f.fileno(), size)
            else:
                result = outcome(os.pwrite, f.fileno(), b"x", size - 1)
        return result, os.stat(path).st_size, path.read_bytes()

    ext4 = run(tmp_path)
    assert ext4[0][0] == "err"  # so that the comparison means something
    assert run(fresh) == ext4
    (fresh / "after").write_bytes(b"still serving")
    assert (fresh / "after").read_bytes() == b"still serving"


def test_unlink_open_file(fresh):
    path = fresh / "doomed"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.listdir(fresh) == []
        assert os.pread(fd, 100, 0) == b"0123456789"
        assert os.pwrite(fd, b"abc", 20) == 3
        assert os.pread(fd, 100, 0) == b"0123456789" + bytes(10) + b"abc"
        st_ = os.fstat(fd)
        assert (st_.st_nlink, st_.st_size) == (0, 23)
        path.write_bytes(b"new file, same name")  # the name is free for a new inode
        assert os.pread(fd, 3, 20) == b"abc"
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new file, same name"


def test_explicit_times_survive_close(fresh):
    """futimens on a handle that wrote, then close: the set times stay (tar, cp -p, rsync do this)."""
    path = fresh / "stamped"
    atime, mtime = 1_000_000_000_123_456_789, 1_100_000_000_987_654_321
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.utime(fd, ns=(atime, mtime))
    finally:
        os.close(fd)
    assert os.stat(path).st_mtime_ns == mtime
    os.utime(path, ns=(atime, mtime + 1))
    assert os.stat(path).st_mtime_ns == mtime + 1


def test_flock_between_two_fds(fresh):
    path = fresh / "locked"
    path.write_bytes(b"")
    with open(path, "rb") as a, open(path, "rb") as b:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(b, fcntl.LOCK_UN)
        fcntl.flock(a, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared locks coexist


def test_fcntl_lock_between_processes(fresh):
    # POSIX record locks belong to the process, so the second fd is in a child.
    path = fresh / "record-locked"
    path.write_bytes(bytes(100))
    child = textwrap.dedent("""
        import fcntl, sys
        with open(sys.argv[1], "r+b") as f:
            for start, expect in ((0, "busy"), (50, "free")):
                try:
                    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, start)
                    print(start, "free" if expect == "free" else "UNEXPECTEDLY free")
                except OSError:
                    print(start, "busy" if expect == "busy" else "UNEXPECTEDLY busy")
    """)
    with open(path, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 20, 0)  # bytes 0..19
        out = subprocess.run([sys.executable, "-c", child, str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == ["0 busy", "50 free"]
        fcntl.lockf(f, fcntl.LOCK_UN, 20, 0)
        out = subprocess.run([sys.executable, "-c", child.replace('(0, "busy")', '(0, "free")'), str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.split("\n")[:2] == ["0 free", "50 free"], out.stdout + out.stderr
