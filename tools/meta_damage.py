"""The damaged-metadata trial of issue 7 §4, as a tool (run by hand) and as
the engine of ``tests/store/fsck/test_damage_trial.py`` (a fast subset).

    .venv/bin/python -m tools.meta_damage [--trials 40] [--seed 1] [--mode flip16|page] [--mount] [--json PATH]

It builds a store of a few hundred files in nested directories, with
history (second versions, renames, deletes, a snapshot), compacts its
metadata so every page of ``data.mdb`` is in use, and commits once more so
both LMDB meta pages hold real commits. Then, for each trial, a copy gets
one page damaged — ``flip16``: 16 random bytes at a random offset of the
page (a bad sector's worth of a stray write); ``page``: the whole page
random; ``zero``: the whole page zeros (a lost write) — on ``--trials`` random pages and on each meta page, and the trial
records what a user sees:

- ``opened``: the store opens (``Store.open``);
- ``fsck``: ``chronicle fsck`` ran to its end (``aborted`` if it printed
  "internal error" or a traceback, or died), the damaged ranges it named;
- ``before``: files read back byte-exact by name through the store API;
- ``mount`` (``--mount``): a real mount of the damaged copy walked with
  ``os.scandir``/``open``: files read exact, directories whose listing
  failed, whether ``ls /`` failed;
- ``repair``: ``chronicle fsck --repair`` ran to its end, then
  ``chronicle fsck`` is clean of damage; ``after``: files read exact by
  name after the repair, and ``wrong``: files that read other bytes.

Each trial runs in a child process (a damaged LMDB file must not take the
whole run down with it). Prints one line per trial and the totals; ``--json``
writes every record.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb

from chronicle import procs
from chronicle.errors import ChronicleError
from chronicle.store.fsck.checks import fsck
from chronicle.store.model import Actor
from chronicle.store.namespace.workspace import Workspace
from chronicle.store.store import Store
from tools.storeapi import write_file

CLI = [sys.executable, "-m", "chronicle"]
PAGE = os.sysconf("SC_PAGE_SIZE")
WORKSPACE = "w"
ACTOR = Actor(uid=0, gid=0, pid=4242)


def _write(ws: Workspace, parent: int, name: bytes, data: bytes) -> int:
    """create (or truncate) + write + close, as ``open(..., "wb")`` does (``tools.storeapi``)."""
    return write_file(ws, parent, name, data, ACTOR)


def build(base: Path, *, tops: int = 4, subs: int = 3, files: int = 25, seed: int = 0) -> tuple[Path, dict[str, bytes], int]:
    """A store at ``base/store`` holding ``tops * subs * files`` files (default
    300) in ``tK/sJ/`` directories with history; its metadata compacted and
    then written once more. Returns ``(store, {path: head content}, pages in use
    after compaction)``."""
    rng = random.Random(seed)
    st = Store.init(base / "store")
    ws = st.open_workspace(WORKSPACE, writable=True, create=True)
    expected: dict[str, bytes] = {}
    for t in range(tops):
        top, _ = ws.mkdir(ws.root, f"t{t}".encode(), 0o755, ACTOR)
        for s in range(subs):
            sub, _ = ws.mkdir(top, f"s{s}".encode(), 0o755, ACTOR)
            for i in range(files):
                name = f"f{i:03d}.txt"
                data = f"{t}/{s}/{i} first\n".encode() * rng.randrange(1, 40)
                _write(ws, sub, name.encode(), data)
                if i % 3 == 0:                   # a second version
                    data = f"{t}/{s}/{i} second\n".encode() * rng.randrange(1, 40)
                    _write(ws, sub, name.encode(), data)
                expected[f"t{t}/s{s}/{name}"] = data
            for i in range(0, files, 7):          # renames: history follows them
                old, new = f"f{i:03d}.txt", f"r{i:03d}.txt"
                ws.rename(sub, old.encode(), sub, new.encode(), 0, ACTOR)
                expected[f"t{t}/s{s}/{new}"] = expected.pop(f"t{t}/s{s}/{old}")
            for i in range(1, files, 11):         # deletes: history stays
                name = f"f{i:03d}.txt"
                if f"t{t}/s{s}/{name}" in expected:
                    ws.unlink(sub, name.encode(), ACTOR)
                    del expected[f"t{t}/s{s}/{name}"]
    ws.snapshot("built")
    st.sync()
    copy = base / "compact"
    copy.mkdir()
    st.env.copy(str(copy), compact=True)
    st.close()
    live = (copy / "data.mdb").stat().st_size // PAGE
    os.replace(copy / "data.mdb", base / "store" / "meta" / "data.mdb")
    (base / "store" / "meta" / "synced.json").unlink(missing_ok=True)
    shutil.rmtree(copy)
    st = Store.open(base / "store")
    ws = st.open_workspace(WORKSPACE, writable=True)
    _write(ws, ws.root, b"last", b"last\n")
    expected["last"] = b"last\n"
    st.close()
    return base / "store", expected, live


def damage(store: Path, page: int, mode: str, rng: random.Random) -> None:
    """Damage page ``page`` of ``store``'s ``data.mdb`` in place (``mode``:
    ``flip16``, ``page`` or ``zero``, module docstring). On a meta page the 16 bytes
    land in its first 136 bytes of fields."""
    with open(store / "meta" / "data.mdb", "r+b") as f:
        if mode in ("page", "zero"):
            f.seek(page * PAGE)
            f.write(rng.randbytes(PAGE) if mode == "page" else bytes(PAGE))
            return
        offset = 16 + rng.randrange(0, 120) if page < 2 else rng.randrange(0, PAGE - 16)
        f.seek(page * PAGE + offset)
        f.write(rng.randbytes(16))


def read_back(store: Path, expected: dict[str, bytes]) -> tuple[int, list[str]]:
    """``(files read exact by name, paths that read other bytes)`` through
    the store API; a file that cannot be read counts as neither."""
    good, wrong = 0, []
    with Store.open(store) as st:
        try:
            ws = st.open_workspace(WORKSPACE)
        except (ChronicleError, lmdb.Error):
            return 0, []
        for path, data in expected.items():
            try:
                ino, _ = ws.resolve(path.encode())
                got = ws.files.read(ino, 0, 1 << 30)
            except (ChronicleError, lmdb.Error, ValueError, KeyError):
                continue
            if got == data:
                good += 1
            else:
                wrong.append(path)
    return good, wrong


def repair_in_process(store: Path) -> list:
    """``fsck --repair`` as the CLI runs it, in this process: a second
    repairing pass after a metadata rebuild. Returns the reports."""
    with Store.open(store) as st:
        reports = [fsck(st, repair=True)]
    if reports[0].metadata_rebuilt:
        with Store.open(store) as st:
            reports.append(fsck(st, repair=True))
    return reports


def pages_holding(data_file: Path, needle: bytes) -> list[int]:
    """The pages of ``data_file`` whose bytes contain ``needle`` (to aim damage at a record)."""
    data = data_file.read_bytes()
    out, at = [], data.find(needle)
    while at >= 0:
        if not out or out[-1] != at // PAGE:
            out.append(at // PAGE)
        at = data.find(needle, at + 1)
    return out


@dataclass
class Fsck:
    """One ``chronicle fsck`` run."""

    exit: int | None = None
    aborted: bool = False           # "internal error", a traceback, or no exit status
    damaged: int = 0                # meta-damaged problems named
    clean: bool = False
    rebuilt: str | None = None
    text: str = ""


def run_fsck(store: Path, *args: str) -> Fsck:
    """``chronicle fsck --json [args]`` on ``store``."""
    try:
        proc = subprocess.run(CLI + ["fsck", "--json", "--store", str(store), *args], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return Fsck(aborted=True, text="timed out")
    out = proc.stdout + proc.stderr
    result = Fsck(exit=proc.returncode, text=out[-2000:])
    result.aborted = "internal error" in out or "Traceback" in out or proc.returncode not in (0, 1, 3)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return result
    result.damaged = sum(1 for p in doc["problems"] if p["kind"] == "meta-damaged")
    result.clean = doc["clean"]
    result.rebuilt = doc.get("metadata_rebuilt")
    return result


@dataclass
class MountWalk:
    """What a mount of a damaged store answered."""

    mounted: bool = False
    root_listing_failed: bool = False
    dirs_failed: int = 0
    files_exact: int = 0
    files_failed: int = 0
    files_wrong: int = 0
    tracebacks: int = 0
    died: str = ""                  # the daemon did not exit cleanly (e.g. an LMDB assertion aborted it)
    error: str = ""


def mount_walk(store: Path, expected: dict[str, bytes], work: Path) -> MountWalk:
    """Mount ``store`` (``chronicle mount --foreground``), walk it, read every
    file, unmount, stop the daemon (by PID)."""
    walk = MountWalk()
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    log_path = work / "daemon.log"
    proc, start = procs.spawn(procs.mount_command(store, WORKSPACE, mnt), log_path)
    try:
        procs.wait_for_mount(mnt, proc.pid, timeout=30, log_path=log_path, log_start=start)
        walk.mounted = True
    except ChronicleError as exc:
        walk.error = str(exc)[:300]
    try:
        if walk.mounted:
            seen: dict[str, bytes] = {}
            stack = [""]
            while stack:
                rel = stack.pop()
                try:
                    entries = list(os.scandir(mnt / rel))
                except OSError:
                    walk.dirs_failed += 1
                    walk.root_listing_failed |= rel == ""
                    continue
                for entry in entries:
                    path = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.name == ".chronicle":
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(path)
                        else:
                            seen[path] = (mnt / path).read_bytes()
                    except OSError:
                        walk.files_failed += 1
            for path, data in expected.items():       # files not listed: try them by name
                if path not in seen:
                    try:
                        seen[path] = (mnt / path).read_bytes()
                    except OSError:
                        continue
            for path, data in expected.items():
                if path in seen:
                    if seen[path] == data:
                        walk.files_exact += 1
                    else:
                        walk.files_wrong += 1
    finally:
        if walk.mounted or procs.mount_entries(mnt):
            code, _ = procs.unmount(mnt)
            if code != 0:
                procs.fusermount(mnt, lazy=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = log_path.read_text(errors="replace")[start:]
        walk.tracebacks = text.count("Traceback")
        if proc.returncode not in (0, None) or "Assertion" in text:
            walk.died = next((line for line in text.splitlines() if "Assertion" in line), f"exit {proc.returncode}")
    return walk


@dataclass
class Trial:
    """One damaged copy and what each step made of it (module docstring)."""

    page: int
    mode: str
    opened: bool = False
    open_error: str = ""
    fsck: Fsck = field(default_factory=Fsck)
    before: int = 0
    mount: MountWalk | None = None
    repair: Fsck = field(default_factory=Fsck)
    again: Fsck = field(default_factory=Fsck)
    after: int = 0
    wrong: list[str] = field(default_factory=list)
    crashed: str = ""


def run_trial(pristine: Path, expected: dict[str, bytes], work: Path, page: int, mode: str, seed: int,
              mount: bool) -> Trial:
    """One trial on a fresh copy of ``pristine`` under ``work`` (removed after)."""
    trial = Trial(page, mode)
    copy = work / "store"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(pristine, copy)
    damage(copy, page, mode, random.Random(seed))
    try:
        try:
            Store.open(copy).close()
            trial.opened = True
        except ChronicleError as exc:
            trial.open_error = str(exc)[:300]
        trial.fsck = run_fsck(copy)
        if trial.opened:
            trial.before, _ = read_back(copy, expected)
        if mount:
            trial.mount = mount_walk(copy, expected, work)
        trial.repair = run_fsck(copy, "--repair")
        trial.again = run_fsck(copy)
        try:
            trial.after, trial.wrong = read_back(copy, expected)
        except ChronicleError:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return trial


def plan(live: int, trials: int, seed: int) -> list[int]:
    """The pages damaged: both meta pages, then ``trials`` random data pages."""
    rng = random.Random(seed)
    return [0, 1] + rng.sample(range(2, live), min(trials, live - 2))


def summary(trials: list[Trial], files: int) -> dict:
    """Totals over ``trials`` (of a store of ``files`` files)."""
    return {
        "trials": len(trials),
        "files": files,
        "opened": sum(t.opened for t in trials),
        "fsck_aborted": sum(t.fsck.aborted for t in trials),
        "repair_aborted": sum(t.repair.aborted for t in trials),
        "named_damage": sum(t.fsck.damaged > 0 for t in trials),
        "damage_left_after_repair": sum(t.again.damaged > 0 for t in trials),
        "files_before_repair": sum(t.before for t in trials),
        "files_after_repair": sum(t.after for t in trials),
        "files_wrong_after_repair": sum(len(t.wrong) for t in trials),
        "trials_losing_files_after_repair": sum(t.after < files for t in trials),
        "mount_root_listing_failed": sum(bool(t.mount and t.mount.root_listing_failed) for t in trials),
        "mount_files_exact": sum(t.mount.files_exact for t in trials if t.mount),
        "mount_tracebacks": sum(t.mount.tracebacks for t in trials if t.mount),
        "mount_daemon_died": sum(bool(t.mount and t.mount.died) for t in trials),
        "crashed": sum(bool(t.crashed) for t in trials),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="random data pages damaged (plus both meta pages)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=("flip16", "page", "zero"), default="flip16")
    parser.add_argument("--mount", action="store_true", help="also mount each damaged copy and walk it")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every trial record here")
    parser.add_argument("--pages", default=None, help="only these pages of the plan (comma-separated)")
    parser.add_argument("--verbose", action="store_true", help="print fsck's output of each trial")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="meta-damage-", dir=args.workdir))
    try:
        started = time.monotonic()
        pristine, expected, live = build(base / "pristine", seed=args.seed)
        print(f"store: {len(expected)} files, {live} metadata pages in use", flush=True)
        results: list[Trial] = []
        ctx = multiprocessing.get_context("forkserver")
        only = {int(p) for p in args.pages.split(",")} if args.pages else None
        for n, page in enumerate(plan(live, args.trials, args.seed)):
            if only is not None and page not in only:
                continue
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                future = pool.submit(run_trial, pristine, expected, base / f"t{n}", page, args.mode,
                                     args.seed * 1000 + n, args.mount)
                try:
                    trial = future.result()
                except Exception as exc:          # the child died (a damaged page can crash LMDB)
                    trial = Trial(page, args.mode, crashed=f"{type(exc).__name__}: {exc}")
            results.append(trial)
            walk = trial.mount
            print(f"page {page:4d}: opened={int(trial.opened)} fsck_aborted={int(trial.fsck.aborted)} "
                  f"named={trial.fsck.damaged} before={trial.before} "
                  + (f"mount_exact={walk.files_exact} ls_root_failed={int(walk.root_listing_failed)} "
                     f"dirs_failed={walk.dirs_failed} " + (f"DIED({walk.died}) " if walk.died else "") if walk else "")
                  + f"repair_aborted={int(trial.repair.aborted)} after={trial.after} wrong={len(trial.wrong)}"
                  + (f" CRASHED {trial.crashed}" if trial.crashed else ""), flush=True)
            if args.verbose:
                for step in (trial.fsck, trial.repair, trial.again):
                    print("   ", step.text.replace("\n", "\n    ")[-1500:])
        totals = summary(results, len(expected))
        totals["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(totals, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"summary": totals, "trials": [asdict(t) for t in results]}, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
