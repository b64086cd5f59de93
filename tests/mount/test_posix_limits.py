"""Where a mount meets ext4's edges (issue 7 §8): truncate times, and the
calls FUSE or pyfuse3 do not carry, pinned as the README's "Differences from
SPEC.md" describes them.

- ``truncate(path, 0)`` after writes through an open descriptor moves mtime
  and ctime forward, as ext4 does (it used to put them back to the create
  time: the writes and the truncate made one unchanged content);
- ``renameat2(RENAME_WHITEOUT)`` answers EINVAL (overlayfs' flag; FUSE
  filesystems commonly refuse it);
- ``fallocate(2)`` answers EOPNOTSUPP in every mode (pyfuse3 3.5 has no
  fallocate handler), while ``posix_fallocate(3)`` works through glibc's
  fallback of writing zeros.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import time
from pathlib import Path

import pytest
from fsutil import renameat2

from chronicle.fs.operations import ChronicleOperations

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

RENAME_WHITEOUT = 4                 # <linux/fs.h>
FALLOC_FL_KEEP_SIZE = 0x01          # <linux/falloc.h>
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
STEP = 0.03                         # s between steps: well above the clock's and the kernel's granularity


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(2)``: 0 or the errno."""
    return 0 if _fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


@pytest.fixture
def chronicle(mount, mount_target):
    if mount_target != "chronicle":
        pytest.skip("these pin Chronicle's own answers")
    return mount


def truncate_after_writes(root: Path, *, through_fd: bool) -> tuple[list[int], list[int], int]:
    """Create, write through an open fd, then truncate to 0 by path (or by the
    fd) while it is open, then close. ``(mtimes, ctimes, size)`` in ns at
    create, after the write, after the truncate and after the close."""
    path = root / "t"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    stats = [os.stat(path)]
    try:
        time.sleep(STEP)
        os.write(fd, b"x" * 100)
        stats.append(os.stat(path))
        time.sleep(STEP)
        if through_fd:
            os.ftruncate(fd, 0)
        else:
            os.truncate(path, 0)
        stats.append(os.stat(path))
    finally:
        os.close(fd)
    stats.append(os.stat(path))
    return [s.st_mtime_ns for s in stats], [s.st_ctime_ns for s in stats], stats[-1].st_size


@pytest.mark.parametrize("through_fd", [False, True], ids=["truncate", "ftruncate"])
def test_truncate_after_writes_moves_the_times_forward_as_ext4(chronicle, tmp_path, through_fd):
    ref = tmp_path / "ext4"
    ref.mkdir()
    for root in (ref, chronicle.path):
        mtimes, ctimes, size = truncate_after_writes(root, through_fd=through_fd)
        assert size == 0
        for times in (mtimes, ctimes):
            create, written, truncated, closed = times
            assert create < written < truncated, (root, [t - create for t in times])
            assert closed == truncated, (root, [t - create for t in times])
    if not through_fd:
        # History keeps the order: the write a version, then the truncate one -- unless the
        # kernel's writeback cache still held the write: truncate(2) drops it in the page cache
        # (it flushes nothing first), so it never reaches the daemon and makes no version.
        versions = json.loads((chronicle.path / ".chronicle" / "query" / "t").read_bytes())["versions"]
        if ChronicleOperations.enable_writeback_cache:
            assert [(v["event"], v["size"]) for v in versions] == [("create", 0)]
        else:
            assert [(v["event"], v["size"]) for v in versions] == [("write", 100), ("truncate", 0)]


def test_rename_whiteout_answers_einval(chronicle):
    (chronicle.path / "a").write_text("a\n")
    with pytest.raises(OSError) as info:
        renameat2(chronicle.path / "a", chronicle.path / "b", RENAME_WHITEOUT)
    assert info.value.errno == errno.EINVAL
    assert (chronicle.path / "a").read_text() == "a\n" and not (chronicle.path / "b").exists()


def test_fallocate_answers_eopnotsupp_in_every_mode_and_posix_fallocate_works(chronicle, tmp_path):
    path = chronicle.path / "f"
    path.write_bytes(b"0123456789" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
            assert fallocate(fd, mode, 0, 4096) == errno.EOPNOTSUPP, mode
        assert os.pread(fd, 10, 0) == b"0123456789" and os.fstat(fd).st_size == 10000
        # posix_fallocate: glibc falls back to writing a zero byte per block past the end.
        os.posix_fallocate(fd, 0, 20000)
        assert os.fstat(fd).st_size == 20000
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:10000] == b"0123456789" * 1000 and data[10000:] == bytes(10000)
    versions = os.listdir(chronicle.path / ".chronicle" / "versions" / "f")
    assert sorted(versions, key=int) == ["1", "2"]
    # ext4 allocates with fallocate(2) itself (no version of ours to compare): only the sizes agree.
    ref = tmp_path / "ref"
    ref.write_bytes(b"0123456789" * 1000)
    fd = os.open(ref, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 20000)
        assert os.fstat(fd).st_size == 20000
    finally:
        os.close(fd)
