#!/usr/bin/env python3
"""Profile Chronicle's daemon with py-spy during perfbench's metadata workloads.

    .venv/bin/python tools/bench/perf_profile.py [--workloads createstat,untar,...] [--out DIR] [--rate 200]

Mounts a fresh store of this checkout in the foreground (``procs.spawn`` of
``procs.mount_command``: we hold the daemon's PID), then for each workload
runs its untimed setup, attaches ``py-spy record --nonblocking --format raw``
to the daemon for just the timed part, and prints the top functions by
inclusive and self samples (``profile_commit.summarise``), writing each to
``DIR/<workload>.txt`` when ``--out`` is given. The workloads are perfbench's
(``workloads.py``, ``perf_workloads.py``) at their default sizes, through a
minimal :class:`~tools.bench.targets.Target` whose root is the mount:

``createstat`` (3,000 files), ``untar`` (the stdlib tarball; ``git add -A``
is recorded separately as ``gitadd``), ``fsync`` (200 appends + fsync),
``sqlite`` (20,000 inserts, both sync modes), ``checkout`` (300 commits),
``tree`` (5,000-file untar + ``rm -rf``).

Needs root (ptrace and FUSE). py-spy is a developer tool, not a dependency.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from tools.bench import gitrepo  # noqa: E402
from tools.bench import perf_workloads as pw  # noqa: E402
from tools.bench import workloads as wl  # noqa: E402
from tools.bench.profile_commit import Recording, summarise  # noqa: E402
from tools.bench.targets import Target  # noqa: E402

WORKLOADS = ("createstat", "untar", "gitadd", "fsync", "sqlite", "checkout", "tree")
GIT_ENV = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")


class _Mounted(Target):
    """A Target whose root is an existing mountpoint (the caller mounts it)."""

    name = "chronicle"
    is_fuse = True

    def __init__(self, root: Path):
        super().__init__(root)
        self.root = root


def _run(argv: list[str], cwd: Path | None = None) -> None:
    subprocess.run(argv, cwd=cwd, env=GIT_ENV, check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _steps(name: str, mnt: Path, cache: Path, sqlite_inserts: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(setup, timed)`` of workload ``name`` in a fresh directory under ``mnt``."""
    d = mnt / name
    cfg = pw.PerfConfig(cache_dir=cache, sqlite_inserts=sqlite_inserts)
    if name == "createstat":
        names = [str(d / f"f{i:06d}") for i in range(3000)]

        def timed() -> None:
            for n in names:
                os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
                os.stat(n)
                os.unlink(n)
        return (lambda: d.mkdir()), timed
    if name in ("untar", "gitadd"):
        tarball, _counts = wl.stdlib_tarball(cache)
        untar = (lambda: _run(["tar", "-xf", str(tarball), "-C", str(d)]))
        if name == "untar":
            return (lambda: d.mkdir()), untar

        def setup() -> None:
            d.mkdir()
            untar()
            os.sync()

        def gitadd() -> None:
            _run(["git", "init", "-q"], cwd=d)
            _run(["git", "add", "-A"], cwd=d)
        return setup, gitadd
    if name == "fsync":
        return (lambda: None), (lambda: print(pw.fsync_latency(_Mounted(mnt), cfg), file=sys.stderr))
    if name == "sqlite":
        return (lambda: None), (lambda: print(pw.sqlite_wal(_Mounted(mnt), cfg), file=sys.stderr))
    if name == "checkout":
        gitrepo.build_repo(cache, cfg.git_files, cfg.git_commits)
        return (lambda: None), (lambda: print(pw.git_checkout(_Mounted(mnt), cfg), file=sys.stderr))
    if name == "tree":
        gitrepo.tree_tarball(cache, cfg.tree_files)
        return (lambda: None), (lambda: print(pw.tree_untar_rm(_Mounted(mnt), cfg), file=sys.stderr))
    raise SystemExit(f"perf_profile: unknown workload {name!r} (known: {', '.join(WORKLOADS)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perf_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="createstat,untar,gitadd,fsync,sqlite")
    p.add_argument("--out", type=Path, help="write <workload>.txt summaries here")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sqlite-inserts", type=int, default=20_000, help="inserts per sqlite mode (default 20000)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args(argv)
    names = [w for w in args.workloads.split(",") if w]
    pyspy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if pyspy is None:
        print("perf_profile: py-spy not found; install it with `.venv/bin/pip install py-spy`", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("CHRONICLE_CACHE", Path.home() / ".cache" / "chronicle")) / "bench"
    run = Path(tempfile.mkdtemp(prefix="perf-profile-", dir=args.workdir))
    mnt, log = run / "mnt", run / "daemon.log"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), CHRONICLE_HOME=str(run / "home"))
    daemon, start = procs.spawn(procs.mount_command(run / "store", "bench", mnt), log, env=env)
    try:
        procs.wait_for_mount(mnt, daemon.pid, timeout=60, log_path=log, log_start=start)
        for name in names:
            setup, timed = _steps(name, mnt, cache, args.sqlite_inserts)
            setup()
            raw = run / f"{name}.raw"
            with Recording(pyspy, daemon.pid, raw, args.rate):
                t0 = time.perf_counter()
                timed()
                wall = time.perf_counter() - t0
            text = summarise(raw, wall, f"py-spy profile of the mount daemon: {name}", top=args.top)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{name}.txt").write_text(text + "\n")
            print(text, flush=True)
            shutil.rmtree(mnt / name, ignore_errors=True)
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
