#!/usr/bin/env python3
"""Profile Chronicle's commit path with py-spy: where does a small change's time go?

    .venv/bin/python tools/bench/profile_commit.py [--out tools/bench/profiles] [--rate 200]

Mounts a fresh store in the foreground (``procs.mount_command``; we hold the
daemon's PID), then for each of two workloads attaches ``py-spy record
--format raw --pid PID`` to the daemon for just the timed part:

- ``append64``: a 64 MiB file written and closed first (not recorded), then
  30 x open(O_APPEND) + write 100 bytes + close;
- ``edits32``:  a 32 MiB file written and closed first, then 3 x (open, 16
  pwrites of 10 bytes at random offsets each followed by fsync, close);
- ``seqwrite512`` (only with ``--workloads``): perfbench's sequential write,
  512 MiB of incompressible 1 MiB blocks + close, and its MiB/s.

py-spy samples every thread that is not idle. The collapsed stacks are
summarised as ``<name>.txt`` in ``--out``: the wall time, then the top
functions by *inclusive* samples (share of samples with the function anywhere
on the stack) and by *self* samples (the function is the leaf). The raw
collapsed stacks are not kept (they name this machine's paths).
py-spy is a developer tool, not a project dependency:
``.venv/bin/pip install py-spy``. Needs root (ptrace).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chronicle import procs  # noqa: E402
from tools.bench import workloads as wl  # noqa: E402

MiB = wl.MiB
# Inclusive counts list Chronicle's own frames below the daemon's outer loop.
_OWN = ("chronicle/", "agent_runtime/")
_OUTER = ("chronicle/cli/", "chronicle/mounting.py", "chronicle/fs/daemon.py", "chronicle/__main__.py")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """``func (path/to/chronicle/x/y.py:123)`` -> ``func (chronicle/x/y.py)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for anchor in ("chronicle/", "agent_runtime/", "site-packages/", "lib/python3"):
        if anchor in path:
            path = path[path.index(anchor):]
            break
    return f"{m.group('func')} ({path})"


def summarise(raw: Path, wall: float, title: str, top: int = 25) -> str:
    """The text summary of py-spy's collapsed stacks in ``raw`` (see the module docstring)."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        total += n
        for name in set(frames):
            if name.split(" (", 1)[-1].startswith(_OWN) and not name.split(" (", 1)[-1].startswith(_OUTER):
                inclusive[name] += n
        if frames:
            leaf[frames[-1]] += n
    lines = [title, f"wall time of the recorded part: {wall * 1e3:.0f} ms; samples (non-idle): {total}", ""]
    for label, counter in (("inclusive", inclusive), ("self", leaf)):
        scope = " (Chronicle's frames below the daemon loop)" if label == "inclusive" else ""
        lines.append(f"top {top} by {label} samples{scope}:")
        for name, n in counter.most_common(top):
            lines.append(f"  {100 * n / max(total, 1):5.1f}%  {n:6d}  {name}")
        lines.append("")
    return "\n".join(lines)


class Recording:
    """``py-spy record`` attached to ``pid`` for the duration of a ``with`` block."""

    def __init__(self, pyspy: str, pid: int, raw: Path, rate: int):
        self.argv = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                     "--output", str(raw), "--nonblocking"]
        self.raw = raw
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Recording:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        time.sleep(1.0)  # let it attach
        if self.proc.poll() is not None:
            raise RuntimeError(f"py-spy exited: {self.proc.stderr.read().decode(errors='replace').strip()}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)   # py-spy writes its output on ^C
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def append64(d: Path) -> tuple[Path, Callable[[], None]]:
    path = d / "append64.bin"
    wl.write_file(path, 64 * MiB, wl.BlockSource(seed=21))
    os.sync()

    def timed() -> None:
        for _ in range(30):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, os.urandom(100))
            os.close(fd)
    return path, timed


def edits32(d: Path) -> tuple[Path, Callable[[], None]]:
    path = d / "edits32.bin"
    wl.write_file(path, 32 * MiB, wl.BlockSource(seed=22))
    os.sync()
    rng = random.Random(7)

    def timed() -> None:
        for _ in range(3):
            fd = os.open(path, os.O_RDWR)
            try:
                for _ in range(16):
                    os.pwrite(fd, os.urandom(10), rng.randrange(32 * MiB - 10))
                    os.fsync(fd)
            finally:
                os.close(fd)
    return path, timed


def seqwrite512(d: Path) -> tuple[Path, Callable[[], None]]:
    path = d / "seq512.bin"
    source = wl.BlockSource(seed=23)
    for i in range(512):
        source.block(i)           # the block tables made before the timed part

    def timed() -> None:
        seconds, _close = wl.write_file(path, 512 * MiB, source)
        print(f"seqwrite512: {512 / seconds:.0f} MiB/s", file=sys.stderr)
    return path, timed


WORKLOADS = {"append64": append64, "edits32": edits32, "seqwrite512": seqwrite512}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="profile_commit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "tools" / "bench" / "profiles")
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second (default 500)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--workloads", default="append64,edits32",
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default append64,edits32)")
    args = p.parse_args(argv)
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s): {', '.join(unknown)}")
    pyspy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if pyspy is None:
        print("profile_commit: py-spy not found; install it with `.venv/bin/pip install py-spy`",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="profile-commit-", dir=args.workdir))
    mnt, log = run / "mnt", run / "daemon.log"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), CHRONICLE_HOME=str(run / "home"))
    daemon, start = procs.spawn(procs.mount_command(run / "store", "bench", mnt), log, env=env)
    try:
        procs.wait_for_mount(mnt, daemon.pid, timeout=60, log_path=log, log_start=start)
        for name in names:
            setup = WORKLOADS[name]
            _path, timed = setup(mnt)
            raw = run / f"{name}.raw"
            with Recording(pyspy, daemon.pid, raw, args.rate):
                t0 = time.perf_counter()
                timed()
                wall = time.perf_counter() - t0
            text = summarise(raw, wall, f"py-spy profile of the mount daemon: {name} ({setup.__name__})")
            (args.out / f"{name}.txt").write_text(text + "\n")
            print(text)
    finally:
        procs.unmount(mnt)
        if not procs.wait_gone(daemon.pid, 60):
            daemon.terminate()
            daemon.wait(10)
        if not procs.mounted_under(run):
            shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
