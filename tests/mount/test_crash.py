"""Crashes of the mount daemon (SPEC §3, "Durability"), on real mounts.

``kill -9`` of the daemon leaves a stale mountpoint (ENOTCONN). What a user
relies on then:

- what ``fsync`` returned for, and what ``close`` returned for, is in the
  store (``close`` durability: the daemon commits on FLUSH);
- a file still being written is simply its previous version, never a torn
  mix; a half-streamed large write leaves no damage;
- ``chronicle fsck`` reports the store clean, and the workspace mounts again
  with no manual step: the test fixture's clean-up path and the daemon's own
  (``restart(m, clean_stale=False)``, ``chronicle mount`` on the stale
  mountpoint) both work;
- the history (``query``) of what survived is intact.

Also the CLI's own lifecycle: ``chronicle mount`` returns once mounted,
``chronicle umount`` once the daemon has exited.
"""

from __future__ import annotations

from chronicle.store.chunks.tree import hash_data

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fsutil import payload

import mounts

CLI = [sys.executable, "-m", "chronicle"]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("crash recovery of the Chronicle daemon")


def fsck_clean(store: Path) -> None:
    """``chronicle fsck --store STORE`` exits 0 (the CLI, as a user runs it)."""
    proc = subprocess.run(CLI + ["fsck", "--store", str(store)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fsck exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "clean" in proc.stdout and "NOT clean" not in proc.stdout, proc.stdout


def query(root: Path, path: str) -> dict:
    return json.loads((root / ".chronicle" / "query" / path).read_bytes())


def assert_stale(mount) -> None:
    assert mounts.mount_entries(mount.path), "the mount vanished: a crash must leave it in place"
    with pytest.raises(OSError) as info:
        os.listdir(mount.path)
    assert info.value.errno == errno.ENOTCONN


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass                      # the daemon is gone: ENOTCONN


# -- kill -9 after fsync / after close ---------------------------------------------------------------


@pytest.mark.parametrize("clean_stale", [True, False], ids=["fixture-cleans", "daemon-cleans"])
@pytest.mark.parametrize("durable_by", ["fsync", "close"])
def test_data_survives_kill_9_and_the_workspace_mounts_again(mount_factory, durable_by, clean_stale):
    m = mount_factory()
    root = m.path
    (root / "dir").mkdir()
    (root / "dir" / "early.txt").write_bytes(b"v1\n")
    (root / "dir" / "early.txt").write_bytes(b"v2\n")
    history = query(root, "dir/early.txt")
    data = payload(5, 3 * (1 << 20) + 99)

    fd = os.open(root / "dir" / "data.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    reader = os.open(root / "dir" / "data.bin", os.O_RDONLY)   # keeps the file open past the close
    os.write(fd, data)
    if durable_by == "fsync":
        os.fsync(fd)                    # killed right after, the file still open
    else:
        os.close(fd)                    # close returned: that is all a program waits for
    m.kill()
    if durable_by == "fsync":
        close_quietly(fd)
    close_quietly(reader)
    assert_stale(m)
    fsck_clean(m.store)

    m2 = mount_factory.restart(m, clean_stale=clean_stale)
    assert m2.path == root and os.path.ismount(root)
    assert (root / "dir" / "data.bin").read_bytes() == data
    assert (root / "dir" / "early.txt").read_bytes() == b"v2\n"
    assert query(root, "dir/early.txt") == history
    versions = [e for e in query(root, "dir/data.bin")["versions"] if e["event"] == "write"]
    assert [(e["version"], e["size"], e["hash"]) for e in versions] == [(1, len(data), hash_data(data).hex())]
    # The remounted workspace takes new writes as usual.
    (root / "dir" / "early.txt").write_bytes(b"v3\n")
    assert [e["version"] for e in query(root, "dir/early.txt")["versions"] if e["event"] == "write"] == [1, 2, 3]
    m2.stop()
    fsck_clean(m.store)


def test_a_file_being_written_when_the_daemon_dies_is_its_previous_version(mount_factory):
    m = mount_factory()
    root = m.path
    old = payload(1, 300000)
    (root / "edited.bin").write_bytes(old)
    (root / "truncated.txt").write_bytes(b"the committed text\n")
    before = {name: query(root, name) for name in ("edited.bin", "truncated.txt")}

    edited = os.open(root / "edited.bin", os.O_WRONLY)
    os.pwrite(edited, b"X" * 5000, 1000)
    os.pwrite(edited, b"tail", 400000)
    truncated = os.open(root / "truncated.txt", os.O_WRONLY | os.O_TRUNC)
    os.write(truncated, b"half")
    created = os.open(root / "created.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(created, b"never closed")
    assert os.stat(root / "edited.bin").st_size == 400004      # the daemon has the writes
    m.kill()
    for fd in (edited, truncated, created):
        close_quietly(fd)
    fsck_clean(m.store)

    mount_factory.restart(m)
    assert (root / "edited.bin").read_bytes() == old
    assert (root / "truncated.txt").read_bytes() == b"the committed text\n"
    assert (root / "created.txt").read_bytes() == b""          # created (an event), never written
    for name, doc in before.items():
        assert query(root, name) == doc
    assert [e["event"] for e in query(root, "created.txt")["versions"]] == ["create"]


# Streams up to 2 GiB in 1 MiB writes, printing the count after each; the
# test kills the daemon after the first 48 MiB, long before the end.
WRITER = textwrap.dedent("""
    import os, sys
    path, total = sys.argv[1], int(sys.argv[2])
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    for i in range(total):
        os.write(fd, block[i % 4096:] + block[:i % 4096])
        print(i + 1, flush=True)
    os.close(fd)
    print("closed", flush=True)
""")


def test_kill_9_during_a_large_streaming_write(mount_factory):
    m = mount_factory()
    root = m.path
    old = payload(9, 1 << 20)
    (root / "big.bin").write_bytes(old)
    (root / "small.txt").write_bytes(b"small\n")
    before = {name: query(root, name) for name in ("big.bin", "small.txt")}

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root / "big.bin"), "2048"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        written = 0
        for line in writer.stdout:
            if line.strip() == "closed":
                pytest.fail("the 2 GiB write finished before the daemon could be killed")
            written = int(line)
            if written >= 48:
                break
        assert written >= 48, writer.stderr.read()
        m.kill()
        rest = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode != 0 and "closed" not in rest[0], "the writer did not notice the daemon died"
    assert_stale(m)
    fsck_clean(m.store)

    m2 = mount_factory.restart(m)
    assert (root / "big.bin").read_bytes() == old
    assert (root / "small.txt").read_bytes() == b"small\n"
    for name, doc in before.items():
        assert query(root, name) == doc
    # And the same file takes a large write after the crash.
    new = payload(10, 20 << 20)
    (root / "big.bin").write_bytes(new)
    assert (root / "big.bin").read_bytes() == new
    m2.stop()
    fsck_clean(m.store)


# -- the CLI: mount / umount --------------------------------------------------------------------------


def daemon_state(pid: int) -> str | None:
    """The process state letter (``S``, ``R``, ``Z`` ...) or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def exited(pid: int) -> bool:
    return daemon_state(pid) in (None, "Z", "X")


def mount_pid(mountpoint: Path) -> int:
    return int(json.loads((mountpoint / ".chronicle" / "stats").read_bytes())["pid"])


def force_down(mountpoint: Path, pids: list[int]) -> None:
    """Clean-up for the CLI tests: unmount (lazily if need be), then kill our daemons by PID."""
    if mounts.mount_entries(mountpoint):
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    for pid in pids:
        deadline = time.monotonic() + 10
        while not exited(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not exited(pid):
            os.kill(pid, signal.SIGKILL)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def wait_reaped(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` has exited and, if its parent (PID 1) reaps it in
    time, is gone entirely; a daemon left a zombie is the next test's case."""
    deadline = time.monotonic() + timeout
    while daemon_state(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exited(pid), f"the killed daemon {pid} is still running"


def no_log_problems(store: Path, workspace: str) -> None:
    log = store / "run" / f"mount-{workspace}.log"
    problems = mounts.log_problems(log.read_text(errors="replace")) if log.exists() else []
    assert not problems, "\n\n".join(problems)


def test_cli_mount_returns_once_mounted_and_umount_once_the_daemon_exited(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    pids: list[int] = []
    try:
        for round_ in range(2):
            proc = cli("mount", "--store", str(store), "--workspace", "w", str(mnt))
            assert proc.returncode == 0, proc.stderr
            assert os.path.ismount(mnt) and not mounts.is_stale(mnt)      # right after it returned
            pid = mount_pid(mnt)
            pids.append(pid)
            assert not exited(pid)
            if round_ == 0:
                (mnt / "kept.txt").write_bytes(b"kept\n")
            else:
                assert (mnt / "kept.txt").read_bytes() == b"kept\n"

            proc = cli("umount", str(mnt))
            assert proc.returncode == 0, proc.stderr
            assert exited(pid), f"umount returned while the daemon (pid {pid}) is {daemon_state(pid)}"
            assert not os.path.ismount(mnt)
            fsck_clean(store)
        proc = cli("umount", str(mnt))
        assert proc.returncode != 0 and "not mounted" in proc.stderr
    finally:
        force_down(mnt, pids)
    no_log_problems(store, "w")


def test_cli_mount_clears_the_stale_mountpoint_of_a_killed_daemon(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    pids: list[int] = []
    try:
        proc = cli("mount", "--store", str(store), "--workspace", "w", str(mnt))
        assert proc.returncode == 0, proc.stderr
        pid = mount_pid(mnt)
        pids.append(pid)
        (mnt / "closed.txt").write_bytes(b"closed before the crash\n")
        assert os.listdir(mnt) == ["closed.txt"]       # the user looked (ls): the root's attributes are cached
        os.stat(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_reaped(pid)
        assert mounts.is_stale(mnt)
        fsck_clean(store)

        proc = cli("mount", "--store", str(store), "--workspace", "w", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(mnt) and not mounts.is_stale(mnt)
        pids.append(mount_pid(mnt))
        assert len(mounts.mount_entries(mnt)) == 1       # the stale mount is gone, not stacked under
        assert (mnt / "closed.txt").read_bytes() == b"closed before the crash\n"
        proc = cli("umount", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert exited(pids[-1]) and not os.path.ismount(mnt)
    finally:
        force_down(mnt, pids)


# Run as a separate process that becomes the parent of the detached daemon
# (a child subreaper) and does not reap it until the end, like the PID 1 of
# many containers (an agent runtime that is its container's init).
UNDER_A_PARENT_THAT_DOES_NOT_REAP = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, time
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    store, mnt, case, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cli = [sys.executable, "-m", "chronicle"]
    daemons = []

    def mount():
        subprocess.run(cli + ["mount", "--store", store, "--workspace", "w", mnt], check=True,
                       capture_output=True)
        daemons.append(json.load(open(os.path.join(mnt, ".chronicle", "stats")))["pid"])

    def timed(args):
        start = time.monotonic()
        try:
            proc = subprocess.run(cli + args, capture_output=True, text=True, timeout=limit)
            out = {"rc": proc.returncode, "stderr": proc.stderr.strip()}
        except subprocess.TimeoutExpired:
            out = {"rc": None, "stderr": f"still running after {limit}s"}
        out["seconds"] = round(time.monotonic() - start, 1)
        return out

    mount()
    with open(os.path.join(mnt, "f.txt"), "wb") as f:
        f.write(b"data")
    if case == "umount":
        result = timed(["umount", mnt])
    else:
        os.kill(daemons[0], signal.SIGKILL)
        while open(f"/proc/{daemons[0]}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        result = timed(["mount", "--store", store, "--workspace", "w", mnt])
        if result["rc"] == 0:
            daemons.append(json.load(open(os.path.join(mnt, ".chronicle", "stats")))["pid"])
            result["data"] = open(os.path.join(mnt, "f.txt"), "rb").read().decode()
            subprocess.run(["fusermount3", "-u", mnt])
    result["mounted"] = os.path.ismount(mnt)
    if result["mounted"]:
        subprocess.run(["fusermount3", "-u", "-z", mnt])
    for pid in daemons:                                 # ours: reap them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    print(json.dumps(result))
""")


def under_a_parent_that_does_not_reap(tmp_path: Path, case: str, limit: float = 15) -> dict:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    try:
        proc = subprocess.run([sys.executable, "-c", UNDER_A_PARENT_THAT_DOES_NOT_REAP, str(store), str(mnt),
                               case, str(limit)], capture_output=True, text=True, timeout=limit * 4 + 60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])
    finally:
        mounts.unmount_stale(mnt)
        force_down(mnt, [])


def test_umount_returns_when_the_daemon_exited_though_nobody_reaped_it(tmp_path):
    """An exited daemon that its parent has not reaped yet is a zombie: it has
    exited, and ``chronicle umount`` must return rather than wait for the reaper."""
    result = under_a_parent_that_does_not_reap(tmp_path, "umount")
    assert not result["mounted"]
    assert result["rc"] == 0 and result["seconds"] < 15, result


def test_mount_again_after_a_crash_though_nobody_reaped_the_dead_daemon(tmp_path):
    """A killed daemon not reaped yet (a zombie) is dead: its workspace is not
    "already mounted", and ``chronicle mount`` must bring it back."""
    result = under_a_parent_that_does_not_reap(tmp_path, "mount")
    assert result["rc"] == 0, result
    assert result["data"] == "data"
