"""What a wake costs (issue 8's 300 ms budget): the lean daemon entry and the standby mount daemon.

- ``python -m chronicle.mounting --store S --workspace W MOUNTPOINT`` is the
  daemon of ``chronicle mount --foreground`` without the command line's
  imports: it serves, and its errors are one line;
- ``--standby`` imports first and reads its job from stdin; EOF ends it;
- a runtime keeps one standby daemon ready after its first mount: the next
  mount (a wake after scaling to zero) is served by it, a new one is started,
  and none is left once the runtime closes.

Real mounts and daemons; cleanup by PID and by mountpoint (``tests/mounts.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chronicle import procs
from chronicle.store.store import Store

try:
    from .test_agent_runtime import env   # noqa: F401  (the fixture)
    from .. import mounts
except ImportError:
    from test_agent_runtime import env     # noqa: F401
    import mounts

pytestmark = pytest.mark.mount

DAEMON = [sys.executable, "-m", "chronicle.mounting"]
RUN_ENV = dict(os.environ, PYTHONPATH=str(mounts.REPO_ROOT))


def standbys() -> dict[int, int]:
    """pid -> parent pid of every ``chronicle.mounting --standby`` process (one
    that took a job keeps its command line: it is then the mount's daemon)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"chronicle.mounting" in argv and b"--standby" in argv and procs.alive(int(entry)):
            out[int(entry)] = ppid
    return out


def ours() -> set[int]:
    return {pid for pid, ppid in standbys().items() if ppid == os.getpid()}


async def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await asyncio.sleep(0.05)
    return value


def test_the_lean_daemon_entry_serves_and_reports_errors_in_one_line(tmp_path):
    store, mp = tmp_path / "store", tmp_path / "mnt"
    with Store.open(store, create=True) as st:
        st.create_workspace("w")
    proc = subprocess.Popen([*DAEMON, "--store", str(store), "--workspace", "w", str(mp)], env=RUN_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        procs.wait_for_mount(mp, proc.pid, timeout=60)
        (mp / "f.txt").write_text("served\n")
        with Store.open(store) as st:
            assert st.mount_info("w")["pid"] == proc.pid
    finally:
        if os.path.ismount(mp):
            procs.fusermount(mp)
        assert proc.wait(60) == 0
    assert b"Traceback" not in proc.stderr.read()
    (tmp_path / "file").write_text("x")
    for argv, code, text in (
            ([str(tmp_path / "file"), "--store", str(store)], 2, "is not a directory"),
            (["--standby", "--store", str(store)], 2, "--standby reads the store"),
            ([str(mp)], 2, "give --store STORE and MOUNTPOINT")):
        done = subprocess.run([*DAEMON, *argv], env=RUN_ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == code and text in done.stderr and "Traceback" not in done.stderr, done


def test_a_standby_daemon_waits_for_its_job_and_ends_at_eof(tmp_path):
    for job, code, text in ((b"", 0, ""), (b'{"store": "/x"}\n', 2, "a standby daemon reads")):
        done = subprocess.run([*DAEMON, "--standby"], input=job, env=RUN_ENV, capture_output=True, timeout=60)
        assert done.returncode == code and text in done.stderr.decode() and b"Traceback" not in done.stderr
    # A job: it serves the workspace, its output goes to the job's log from then on.
    store, mp, log = tmp_path / "store", tmp_path / "mnt", tmp_path / "mount.log"
    mp.mkdir()
    proc = subprocess.Popen([*DAEMON, "--standby"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=RUN_ENV, start_new_session=True)
    try:
        proc.stdin.write(json.dumps({"store": str(store), "workspace": "w", "mountpoint": str(mp),
                                     "log": str(log)}).encode() + b"\n")
        proc.stdin.close()
        procs.wait_for_mount(mp, proc.pid, timeout=60)
        assert (mp / ".chronicle").is_dir()
    finally:
        if os.path.ismount(mp):
            procs.fusermount(mp)
        assert proc.wait(60) == 0
    assert "mounted workspace 'w'" in log.read_text()


def test_a_wake_is_served_by_the_standby_daemon(env):
    async def program(rt):
        assert ours() == set()                                  # none before a mount
        await rt.create("s", "agents:Scripted", cwd=env.src)
        assert (await rt.ask("s", {"text": "one"}))["status"] == "completed"
        first_daemon = rt.store.mount_info("s")["pid"]
        standby = next(iter(await wait_for(ours)))              # ready for the next mount
        await rt.shutdown_agent("s")                            # scale to zero
        assert standby in ours()
        result = await rt.ask("s", {"text": "two"})             # wakes: the standby serves the workspace
        assert result["status"] == "completed" and result["reply"] == "done 2"
        assert rt.store.mount_info("s")["pid"] == standby != first_daemon
        log = (env.store / "run" / "mount-s.log").read_text()
        assert f"(pid {standby})" in log                        # its output went to the workspace's log
        await wait_for(lambda: ours() - {standby})              # and the next one is ready
        return standby

    standby = env.run(program)
    assert ours() == set() and not procs.alive(standby)          # closing the runtime ended them all


def test_a_standby_daemon_ends_when_its_runtime_is_killed(env):
    """kill -9 of the coordinator: the standby sees EOF on its stdin and exits."""
    code = f"""
import asyncio, sys
sys.path.insert(0, {str(mounts.REPO_ROOT)!r})
from agent_runtime import Runtime
async def main():
    rt = Runtime({str(env.store)!r})
    await rt.create("k", "agents:Scripted", cwd={str(env.src)!r})
    print(rt.worker_pid("k"), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""
    coordinator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=RUN_ENV)
    worker = None
    try:
        worker = int(coordinator.stdout.readline())
        deadline = time.monotonic() + 30
        while not [p for p, ppid in standbys().items() if ppid == coordinator.pid]:
            assert time.monotonic() < deadline, "no standby daemon started"
            time.sleep(0.05)
        standby = next(p for p, ppid in standbys().items() if ppid == coordinator.pid)
    finally:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(30)
    try:
        deadline = time.monotonic() + 30
        while procs.alive(standby):
            assert time.monotonic() < deadline, "the standby daemon outlived its runtime"
            time.sleep(0.05)
    finally:        # what the killed runtime left, as expected: its agent's worker and mount
        mounts.stop_workers([worker] if worker else [], env.store)
