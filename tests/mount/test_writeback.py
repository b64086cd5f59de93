"""The kernel's writeback cache on a real mount (``-o writeback_cache``: ``enable_writeback_cache``).

With it the kernel holds written pages and a written file's mtime/ctime,
and sends them later: WRITEs when it writes pages back (at the latest
before the FLUSH of ``close`` and the FSYNC of ``fsync``), and the times as
SETATTR(mtime, ctime) with the file's handle. What a user must still see:

- one version per close, and no ``utimens`` event of its own for the
  times the kernel gave the writes; a ``touch`` of a file is still its own
  ``utimens`` event (``ChronicleOperations.setattr``'s rule);
- close durability (SPEC §3): what ``close`` returned for survives
  ``kill -9`` of the daemon, although the kernel had cached the writes;
- a ``ctl restore`` shows the restored size and content at once -- for a
  file nobody has open and for one held open -- and writes the kernel still
  held are not written over the restored content afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from fsutil import payload


WRITEBACK = ["-o", "writeback_cache"]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's history and ctl")


@pytest.fixture
def mount(mount_factory):
    """A fresh store mounted with the kernel's writeback cache."""
    return mount_factory(extra_args=WRITEBACK)


def test_the_option_turns_the_kernels_writeback_cache_on(mount, mount_factory):
    """``-o writeback_cache`` reaches pyfuse3 (libfuse's own parser would refuse it): the kernel
    then takes a write into its cache before the daemon sees it, so a write past the 16 TiB
    size limit returns and its close answers EIO -- without the option the write itself gets
    ext4's EFBIG (README, "The writeback cache")."""
    def far_write(root):
        fd = os.open(root / "far", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"x", (16 << 40) - 1)
        except OSError as exc:
            os.close(fd)
            return "write", exc.errno
        try:
            os.close(fd)
        except OSError as exc:
            return "close", exc.errno
        return "ok", 0

    assert far_write(mount.path) == ("close", errno.EIO)
    assert far_write(mount_factory().path) == ("write", errno.EFBIG)


def events(root, path: str) -> list[str]:
    """The events of ``path`` in the workspace log, oldest first."""
    lines = (root / ".chronicle" / "log").read_bytes().splitlines()
    return [e["event"] for e in map(json.loads, lines) if e.get("path") == path]


def ctl(root, command: dict) -> dict:
    fd = os.open(root / ".chronicle" / "ctl", os.O_RDWR)
    try:
        os.write(fd, json.dumps(command).encode() + b"\n")
        return json.loads(os.read(fd, 1 << 20))
    finally:
        os.close(fd)


def test_writes_make_one_version_and_no_utimens_event(mount):
    root = mount.path
    with open(root / "f", "wb", buffering=0) as f:
        for i in range(64):
            f.write(payload(i, 4096))
    with open(root / "f", "r+b", buffering=0) as f:
        f.seek(1000)
        f.write(b"edit")
        os.fsync(f.fileno())
        f.write(b"more")
    with open(root / "f", "r+b") as f:
        f.truncate(100)                      # ftruncate: its times come with the size
    os.truncate(root / "f", 50)              # truncate(2): likewise
    assert events(root, "f") == ["create", "write", "write", "write", "truncate", "truncate"]
    st = os.stat(root / "f")
    assert st.st_size == 50
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9


def test_touch_is_its_own_event_and_its_time_stays(mount):
    root = mount.path
    (root / "f").write_bytes(b"content\n")
    os.utime(root / "f", ns=(1_000_000_000, 2_000_000_000))       # touch -d
    assert events(root, "f") == ["create", "write", "utimens"]
    assert os.stat(root / "f").st_mtime_ns == 2_000_000_000
    os.utime(root / "f")                                            # touch (now)
    assert events(root, "f") == ["create", "write", "utimens", "utimens"]

    # A touch while another handle holds unwritten pages: the writes first, then the touch,
    # and the touch's mtime is what stays (also after a remount).
    with open(root / "f", "r+b", buffering=0) as f:
        f.write(b"CONTENT")
        os.utime(root / "f", ns=(3_000_000_000, 4_000_000_000))
    assert events(root, "f") == ["create", "write", "utimens", "utimens", "write", "utimens"]
    assert os.stat(root / "f").st_mtime_ns == 4_000_000_000
    assert (root / "f").read_bytes() == b"CONTENT\n"


def test_close_durability_survives_kill_9(mount_factory):
    m = mount_factory(extra_args=WRITEBACK)
    root = m.path
    data = payload(7, 3 << 20)
    with open(root / "closed.bin", "wb") as f:
        for off in range(0, len(data), 65536):
            f.write(data[off:off + 65536])
    m.kill()
    mount_factory.restart(m, extra_args=WRITEBACK)
    assert (root / "closed.bin").read_bytes() == data


def test_restore_shows_the_restored_size_closed_and_open(mount):
    root = mount.path
    (root / "f").write_bytes(b"short\n")
    (root / "f").write_bytes(b"a much longer second version\n" * 8)
    assert os.stat(root / "f").st_size == 29 * 8
    reply = ctl(root, {"cmd": "restore", "path": "f", "version": 1})
    assert reply["ok"], reply
    assert os.stat(root / "f").st_size == 6
    assert (root / "f").read_bytes() == b"short\n"

    (root / "g").write_bytes(b"g1\n")
    (root / "g").write_bytes(b"g2, longer\n" * 100)
    with open(root / "g", "rb", buffering=0) as held:
        assert held.read(3) == b"g2,"
        reply = ctl(root, {"cmd": "restore", "path": "g", "version": 1})
        assert reply["ok"], reply
        assert os.fstat(held.fileno()).st_size == 3
        held.seek(0)
        assert held.read() == b"g1\n"
        assert (root / "g").read_bytes() == b"g1\n"
    assert events(root, "g") == ["create", "write", "write", "restore"]

    # A whole-tree restore: sizes back as they were at the point.
    seq = ctl(root, {"cmd": "snapshot", "name": "before"})["seq"]
    (root / "f").write_bytes(b"grown " * 1000)
    reply = ctl(root, {"cmd": "restore", "at": seq})
    assert reply["ok"], reply
    assert os.stat(root / "f").st_size == 6
    assert (root / "f").read_bytes() == b"short\n"


def test_restore_flushes_the_kernels_pages_first(mount):
    root = mount.path
    (root / "f").write_bytes(b"one\n")
    (root / "f").write_bytes(b"two\n")
    with open(root / "f", "r+b", buffering=0) as f:
        f.write(b"TH")                       # cached by the kernel, not yet sent
        reply = ctl(root, {"cmd": "restore", "path": "f", "version": 1})
        # As without the cache: the pending write reached the daemon, so the restore is refused.
        assert not reply["ok"] and reply["kind"] == "Busy", reply
    assert (root / "f").read_bytes() == b"THo\n"
    with open(root / "f", "r+b", buffering=0) as f:
        f.write(b"xy")
        os.fsync(f.fileno())                 # committed: the restore may go ahead
        reply = ctl(root, {"cmd": "restore", "path": "f", "version": 1})
        assert reply["ok"], reply
    # Nothing the kernel held is written over the restored content at the close.
    assert (root / "f").read_bytes() == b"one\n"
    assert events(root, "f")[-1] == "restore"


def test_ctl_sync_and_turn_end_take_the_writes_the_kernel_holds(mount):
    root = mount.path
    with open(root / "log.txt", "wb", buffering=0) as f:
        f.write(b"first line\n")                      # cached by the kernel; the file stays open
        assert ctl(root, {"cmd": "sync"})["ok"]
        query = json.loads((root / ".chronicle" / "query" / "log.txt").read_bytes())
        assert [v["size"] for v in query["versions"]] == [11]

        assert ctl(root, {"cmd": "turn-begin", "agent": "a", "turn": 1})["ok"]
        f.write(b"in the turn\n")
        assert ctl(root, {"cmd": "turn-end"})["ok"]
        query = json.loads((root / ".chronicle" / "query" / "log.txt").read_bytes())
        last = query["versions"][-1]
        assert (last["size"], last["turn"]["agent"], last["turn"]["turn"]) == (23, "a", 1)
