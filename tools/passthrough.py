"""pyfuse3's own pass-through example filesystem, as a Python-FUSE baseline.

The benchmark and the test harness compare Chronicle with
``examples/passthroughfs.py`` from the pyfuse3 sdist (the same pyfuse3 version
the project pins). The file is not part of this repository: it is fetched from
the package registry with ``pip download`` on first use and cached under
``$CHRONICLE_CACHE`` (default ``~/.cache/chronicle``).

    fetch_passthroughfs() -> Path            # path of passthroughfs.py
    start_passthroughfs(source, mountpoint)  # a running mount; call .stop()
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PYFUSE3_VERSION = "3.5.0"


def cache_dir() -> Path:
    base = os.environ.get("CHRONICLE_CACHE") or os.path.expanduser("~/.cache/chronicle")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_passthroughfs(version: str = PYFUSE3_VERSION) -> Path:
    """Return the path of pyfuse3 ``examples/passthroughfs.py`` for ``version``.

    Downloads the pyfuse3 sdist once (``pip download --no-binary``) and extracts
    the one example file. Raises ``RuntimeError`` if the download fails.
    """
    target = cache_dir() / f"passthroughfs-{version}.py"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--no-binary", ":all:", f"pyfuse3=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("pyfuse3-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"could not download the pyfuse3 {version} sdist: {proc.stderr.strip()}")
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f"pyfuse3-{version}/examples/passthroughfs.py")
            data = tar.extractfile(member).read()
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target


class PassthroughMount:
    """A running passthroughfs mount of ``source`` at ``mountpoint``."""

    def __init__(self, source: Path, mountpoint: Path, proc: subprocess.Popen, log: Path):
        self.source = source
        self.mountpoint = mountpoint
        self.proc = proc
        self.log = log

    def stop(self, timeout: float = 20.0) -> None:
        """Unmount (lazily if busy) and wait for the daemon; kill it if it hangs."""
        if os.path.ismount(self.mountpoint):
            if subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                              capture_output=True).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_passthroughfs(source: os.PathLike, mountpoint: os.PathLike, *,
                        python: str = sys.executable, timeout: float = 20.0) -> PassthroughMount:
    """Mount ``source`` at ``mountpoint`` with pyfuse3's passthroughfs.

    Returns once ``os.path.ismount(mountpoint)``; raises ``RuntimeError`` with
    the daemon's log if it exits or does not mount within ``timeout`` seconds.
    """
    script = fetch_passthroughfs()
    source, mountpoint = Path(source), Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkstemp(prefix="passthroughfs-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, str(script), str(source), str(mountpoint)],
                                stdout=out, stderr=subprocess.STDOUT)
    mount = PassthroughMount(source, mountpoint, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"passthroughfs exited with {proc.returncode}: {log.read_text()}")
        if os.path.ismount(mountpoint):
            return mount
        time.sleep(0.05)
    mount.stop()
    raise RuntimeError(f"passthroughfs did not mount {mountpoint} within {timeout}s: {log.read_text()}")
