"""``chronicle.procs``: one meaning of alive, stale-mount detection and cleanup,
fusermount3, spawn-and-wait-for-mount.

The stale mount is made as a crash makes it: a real Chronicle daemon is
started, then killed with SIGKILL, leaving its mount behind (ENOTCONN).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chronicle import procs
from chronicle.errors import StoreError

try:
    from . import mounts
except ImportError:
    import mounts


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0].decode()


def _wait_state(pid: int, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) != want:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {want}"
        time.sleep(0.01)


def test_a_live_child_is_alive():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert procs.alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not procs.alive(proc.pid)                # reaped: no such process


def test_a_zombie_child_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        _wait_state(proc.pid, "Z")                  # exited, not reaped: we have not waited yet
        assert not procs.alive(proc.pid)
        assert procs.wait_gone(proc.pid, timeout=0.1)
    finally:
        proc.wait()


def test_other_users_and_no_process():
    assert procs.alive(1)                           # init: alive whoever owns it
    assert not procs.alive(0) and not procs.alive(-1)
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not procs.alive(proc.pid)


def test_wait_gone_times_out_on_a_live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not procs.wait_gone(proc.pid, timeout=0.1)
    finally:
        proc.kill()
        proc.wait()


def test_nothing_mounted_is_neither_stale_nor_serving(tmp_path):
    assert procs.mount_entries(tmp_path) == []
    assert not procs.is_stale(tmp_path)
    assert not procs.is_stale(tmp_path / "missing")
    assert not procs.serving(tmp_path)
    assert not procs.clear_stale(tmp_path)
    assert procs.unmount(tmp_path) == (0, "")
    rc, message = procs.fusermount(tmp_path)
    assert rc != 0 and message


def test_wait_for_mount_reports_an_exited_daemon_with_its_log(tmp_path):
    log = tmp_path / "daemon.log"
    proc, start = procs.spawn([sys.executable, "-c", "import sys; print('ERROR cannot mount: boom', "
                               "file=sys.stderr); sys.exit(3)"], log)
    with pytest.raises(StoreError, match="exited before .* was mounted: .*boom"):
        procs.wait_for_mount(tmp_path, proc.pid, timeout=30, log_path=log, log_start=start)
    assert proc.wait() == 3
    assert procs.last_error(log, start) == "ERROR cannot mount: boom"


def test_wait_for_mount_times_out_and_leaves_the_process(tmp_path):
    proc, _ = procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    try:
        with pytest.raises(StoreError, match="was not mounted within"):
            procs.wait_for_mount(tmp_path, proc.pid, timeout=0.3, describe=lambda: "still asleep")
        assert procs.alive(proc.pid)                 # the caller owns it
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_mount_is_detected_and_cleared(tmp_path):
    reason = mounts.fuse_unavailable_reason()
    if reason:
        pytest.fail(f"this test needs FUSE and cannot get it: {reason}")
    store, mnt, log = tmp_path / "store", tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    proc, start = procs.spawn(procs.mount_command(store, "w", mnt), log,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        procs.wait_for_mount(mnt, proc.pid, timeout=60, log_path=log, log_start=start)
        assert procs.serving(mnt, timeout=10) and not procs.is_stale(mnt)
        assert procs.mount_entries(mnt) == ["fuse.chronicle"]
        assert not procs.clear_stale(mnt)            # a serving mount is left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert procs.mount_entries(mnt), "kill -9 must leave the mount behind"
        with pytest.raises(OSError):
            os.statvfs(mnt)
        assert procs.is_stale(mnt) and not procs.serving(mnt, timeout=10)
        assert procs.clear_stale(mnt)
        assert not procs.mount_entries(mnt) and not procs.is_stale(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        procs.clear_stale(mnt)
        procs.unmount(mnt)
