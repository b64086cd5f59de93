"""Where a store's metadata bytes are: the click replay and a per-database table (issue 9 §6).

``click_replay(work, bare, commits)`` mounts a fresh store (``chronicle mount
--foreground``, so the bench has the daemon's PID), replays the last
``commits`` first-parent commits of the bare repository ``bare`` into the
mount with ``git checkout -f`` -- the git directory lives *outside* the mount
(``--git-dir``/``--work-tree``), so the store holds the work trees only, as
the issue measured -- unmounts, and reports:

- ``chunks_bytes``: bytes of the pack files; ``data_mdb_bytes``: the size of
  ``data.mdb`` after the unmount (``du``: the allocated blocks; the store
  preallocates past its end), ``data_mdb_peak_bytes`` its largest while the
  replay ran; ``meta_used_bytes``: pages in use by every database;
- ``databases``: per named database, ``entries``, ``key_bytes``,
  ``value_bytes`` and ``pages_bytes`` (page size x (branch + leaf +
  overflow pages), ``txn.stat``), largest first;
- ``git_pack_bytes``: git's own pack of the same commits (a
  ``--depth=commits+1`` clone, ``git gc``, then ``size-pack`` of
  ``git count-objects -v``);
- ``daemon_peak_rss_bytes``: the daemon's ``VmHWM`` (``/proc/PID/status``)
  just before the unmount.

The repository defaults to a mirror of pallets/click when one is given by
``--git-repo``; without one, ``gitrepo.build_repo`` makes a synthetic history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb

from chronicle import procs
from tools.bench import gitrepo


def db_table(meta_dir: Path) -> list[dict]:
    """Per named database of the LMDB environment at ``meta_dir``: name,
    entries, key bytes, value bytes and bytes of its pages, largest first.
    Opened read-only (the store must not be written meanwhile)."""
    env = lmdb.open(str(meta_dir), readonly=True, lock=False, max_dbs=256, create=False)
    rows = []
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
        for name in names:
            try:
                db = env.open_db(name, create=False)
            except lmdb.Error:                  # a plain key of the main database
                continue
            keys = values = 0
            with env.begin(db=db) as txn:
                st = txn.stat(db)
                for key, value in txn.cursor(db=db):
                    keys += len(key)
                    values += len(value)
            rows.append({"db": name.decode(), "entries": st["entries"], "key_bytes": keys, "value_bytes": values,
                         "pages_bytes": psize * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])})
    finally:
        env.close()
    rows.sort(key=lambda r: -r["pages_bytes"])
    return rows


def format_table(rows: list[dict]) -> str:
    """The per-database table as aligned text (KiB)."""
    lines = [f"{'database':<16}{'entries':>10}{'key KiB':>10}{'value KiB':>11}{'pages KiB':>11}"]
    for r in rows:
        if r["entries"] or r["pages_bytes"]:
            lines.append(f"{r['db']:<16}{r['entries']:>10}{r['key_bytes'] / 1024:>10.0f}"
                         f"{r['value_bytes'] / 1024:>11.0f}{r['pages_bytes'] / 1024:>11.0f}")
    total = {k: sum(r[k] for r in rows) for k in ("entries", "key_bytes", "value_bytes", "pages_bytes")}
    lines.append(f"{'total':<16}{total['entries']:>10}{total['key_bytes'] / 1024:>10.0f}"
                 f"{total['value_bytes'] / 1024:>11.0f}{total['pages_bytes'] / 1024:>11.0f}")
    return "\n".join(lines)


def _peak_rss(pid: int) -> int:
    """``VmHWM`` of process ``pid`` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def git_pack_bytes(work: Path, bare: Path, commits: int) -> int:
    """Bytes of git's pack of the last ``commits`` commits of ``bare``'s HEAD
    (a shallow clone of that depth, ``git gc``)."""
    clone = work / "git-pack-clone"
    gitrepo.git(work, "clone", "-q", "--bare", "--no-local", f"--depth={commits}", f"file://{bare}", str(clone))
    gitrepo.git(clone, "gc", "-q")
    figures = dict(line.split(": ", 1) for line in gitrepo.git(clone, "count-objects", "-v").splitlines())
    shutil.rmtree(clone, ignore_errors=True)
    return int(figures["size-pack"]) * 1024


def click_replay(work: Path, bare: Path, commits: int, extra_mount_args: tuple[str, ...] = ()) -> dict:
    """Replay ``commits`` commits of ``bare`` into a fresh mount (module
    docstring); the figures. Raises RuntimeError if git or the mount fails."""
    store, mnt, gitdir = work / "replay-store", work / "replay-mnt", work / "replay.git"
    mnt.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", "--no-local", str(bare), str(gitdir)], env=gitrepo.git_env(),
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    shas = gitrepo.first_parent_commits(gitdir, commits + 1)
    log = work / "replay-daemon.log"
    proc, _ = procs.spawn(procs.mount_command(store, "bench", mnt, list(extra_mount_args)), log,
                          env=dict(os.environ), cwd=Path(__file__).resolve().parents[2])
    tree = mnt / "repo"
    rss = peak_file = 0
    try:
        procs.wait_for_mount(mnt, proc.pid, timeout=60, log_path=log)
        tree.mkdir()
        git = ("--git-dir", str(gitdir), "--work-tree", str(tree))
        t0 = time.monotonic()
        for i, sha in enumerate(shas):
            gitrepo.git(work, *git, "checkout", "-f", "-q", sha)
            if i % 50 == 0:
                print(f"  {i}/{len(shas)} commits, rss {_peak_rss(proc.pid) >> 20} MiB", file=sys.stderr)
            if i % 10 == 0:
                peak_file = max(peak_file, _allocated(store / "meta" / "data.mdb"))
        seconds = time.monotonic() - t0
        subprocess.run(["sync", "-f", str(tree)], check=False)
        rss = _peak_rss(proc.pid)
        peak_file = max(peak_file, _allocated(store / "meta" / "data.mdb"))
    finally:
        procs.unmount(mnt)
        proc.wait(timeout=120)
    meta = store / "meta"
    rows = db_table(meta)
    chunks = sum(f.stat().st_size for f in (store / "packs").rglob("*") if f.is_file())
    used = sum(r["pages_bytes"] for r in rows)
    pack = git_pack_bytes(work, gitdir, len(shas))
    return {"commits": len(shas) - 1, "replay_seconds": round(seconds, 1), "chunks_bytes": chunks,
            "data_mdb_bytes": _allocated(meta / "data.mdb"), "data_mdb_peak_bytes": peak_file, "meta_used_bytes": used,
            "meta_to_chunks": round(used / chunks, 2) if chunks else None,
            "git_pack_bytes": pack, "store_to_git_pack": round((chunks + used) / pack, 2) if pack else None,
            "daemon_peak_rss_bytes": rss, "databases": rows}
