"""Bounded storage budgets of issue 9 (run by hand, not in CI).

    .venv/bin/python tools/bench/storage_bench.py [--quick] [--events N] [--beside-idle] [--workdir DIR] [--json PATH]

1. **gc-events**: a store with N events (default 1,000,000; ``--quick``
   100,000), written through the store API (no mount): 1,000 files rewritten
   in turn, policy ``--keep-last 1``. Times ``chronicle gc``'s work
   (``gc.collect``) and checks it freed what the dry run promised (budget:
   < 60 s for 1,000,000 events); the metadata file's growth (``file_pages``,
   ``grew_pages``) beside the pages gc freed (``freed_pages``). With
   ``--beside-idle`` another process holds the store open, idle, running a
   mount daemon's sync loop (its recovery pin: ``Store.needs_sync``).
2. **sqlite-wal**: 20,000 autocommit inserts (``--quick`` 2,000) into a
   SQLite database in WAL mode through a real mount, with the default policy
   (``*.db-wal``/``*.db-shm`` ignored); then gc. Budget: store (packs +
   metadata) <= 10x the database's size; the database file's history still
   lists versions at the policy's granularity (``policy.select`` keeps
   what ``query`` lists as kept, each readable). Figures after the mounted
   gc (the LMDB file and its pages in use) and after unmounting and a
   second gc; where the bytes are: packs live / dead, LMDB databases, the
   kept versions' chunks.

3. **click-replay** (``--metadata``): 300 commits (``--quick`` 30) of a git
   repository (``--git-repo BARE``, e.g. a mirror of pallets/click; default
   the synthetic ``gitrepo`` history) replayed with ``git checkout -f`` into
   a mount; the per-database metadata table, metadata / chunks, git's pack
   of the same commits and the daemon's peak RSS (``replay_meta``). Budget:
   metadata <= 0.5x chunks, RSS < 300 MB.
4. **npm**: a small project (``package.json`` with a handful of real
   dependencies: about 2,000 files in ``node_modules``) in a real mount, 20
   rounds (``--quick`` 5) of ``npm install --no-audit --no-fund`` (its cache
   a private directory in the bench's workdir, outside the mount: the first
   round fetches from the registry, the others from the cache) followed by
   ``rm -rf node_modules``, with the default policy (``node_modules/``
   ignored); then ``chronicle gc`` while mounted, and again after unmounting.
   Budget: store (packs + metadata) after gc <= 2x one round's install
   (``du`` of ``node_modules``). Needs ``npm`` and the npm registry. The
   figures after gc say both the LMDB pages in use and the file's size: a
   mounted store's file keeps the pages gc freed (reused by later commits)
   until the last close compacts it (``meta.compact``), which the figures
   after unmounting show (``budget_ok_in_use``, ``budget_ok_unmounted``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from chronicle import procs  # noqa: E402
from chronicle.store.gc import collect, dryrun  # noqa: E402
from chronicle.store.gc.policy import Policy  # noqa: E402
from chronicle.store.meta import schema  # noqa: E402
from chronicle.store.meta.compact import used_pages  # noqa: E402
from chronicle.store.model import Actor  # noqa: E402
from chronicle.store.store import Store  # noqa: E402
from tools.bench import gitrepo, replay_meta  # noqa: E402

CHRONICLE = [sys.executable, "-m", "chronicle"]
ACTOR = Actor(0, 0, os.getpid())


def _rewrite(ws, ino: int, data: bytes) -> None:
    ws.files.open(ino, truncate=True)
    ws.files.write(ino, 0, data, ACTOR.pid)
    ws.files.commit(ino)
    ws.files.release(ino)


def gc_events(work: Path, events: int, beside_idle: bool = False) -> dict:
    store = Store.init(work / "events-store")
    ws = store.open_workspace("w", writable=True, create=True)
    inos = []
    for i in range(1000):
        ino, _ = ws.create(ws.root, b"f%04d" % i, 0o100644, ACTOR)
        inos.append(ino)
    t = time.monotonic()
    n = 0
    while ws.head_seq < events:
        _rewrite(ws, inos[n % len(inos)], b"%d " % n * 8)
        n += 1
        if n % 20000 == 0:
            store.maintain()
            print(f"  {ws.head_seq} events ({ws.head_seq / (time.monotonic() - t):.0f}/s)", file=sys.stderr)
    written = time.monotonic() - t
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    store.sync()
    t = time.monotonic()
    promised = dryrun.dry_run(store, ["w"])
    dry_seconds = time.monotonic() - t
    idle = _idle_store(store.path) if beside_idle else None
    pages = store.env.info()["last_pgno"], used_pages(store.env)
    t = time.monotonic()
    result = collect.collect(store, ["w"])
    gc_seconds = time.monotonic() - t
    after = store.env.info()["last_pgno"], used_pages(store.env)
    if idle is not None:
        idle.stdin.close()
        idle.wait(30)
    figures = {"events": ws.head_seq, "write_seconds": round(written, 1), "dry_run_seconds": round(dry_seconds, 1),
               "gc_seconds": round(gc_seconds, 1), "gc_phases": result["seconds"],
               "pruned_versions": result["pruned_versions"], "freed_bytes": result["freed_bytes"],
               "promised_bytes": promised["freed_bytes"], "promise_kept": promised["freed_bytes"] == result["freed_bytes"],
               "beside_idle_store": beside_idle, "file_pages": [pages[0], after[0]],
               "used_pages": [pages[1], after[1]], "grew_pages": after[0] - pages[0],
               "freed_pages": pages[1] - after[1], "budget_ok": gc_seconds < 60}
    store.close()
    return figures


_IDLE_STORE = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from chronicle.store.store import Store
store = Store.open(__import__("pathlib").Path(sys.argv[2]))
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("open", flush=True)
while not done.wait(0.1):           # the mount daemon's _periodic_sync, with nothing of its own to write
    if store.needs_sync():
        store.sync()
store.close()
"""


def _idle_store(path: Path) -> subprocess.Popen:
    """Another process with the store open and idle, as a mount daemon between
    requests (its periodic sync loop: ``Store.needs_sync`` every 0.1 s); it
    closes the store when its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _IDLE_STORE, str(REPO), str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "open":
        raise RuntimeError("the idle store process did not start")
    return proc


def _du(path: Path) -> int:
    """Bytes allocated on disk below ``path`` (``du``: the metadata file is preallocated past its end)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def sqlite_wal(work: Path, inserts: int) -> dict:
    """The sqlite-wal job (module docstring): gc while mounted, then again
    after unmounting; figures of both, where the bytes are
    (:func:`pack_breakdown`, :func:`meta_breakdown`, :func:`content_bytes`)
    and the history check: the database's versions the default policy keeps
    (``policy.select``, as gc applies it) are exactly those ``query`` lists
    as not pruned, and each of them reads back whole (``versions/``)."""
    store, mnt = work / "sqlite-store", work / "sqlite-mnt"
    mnt.mkdir()
    log = work / "sqlite-daemon.log"
    proc, _ = procs.spawn(procs.mount_command(store, "bench", mnt, []), log, env=dict(os.environ), cwd=REPO)
    figures: dict = {"inserts": inserts}
    try:
        procs.wait_for_mount(mnt, proc.pid, timeout=60, log_path=log)
        db = sqlite3.connect(mnt / "bench.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
        t = time.monotonic()
        for i in range(inserts):
            db.execute("INSERT INTO t (body) VALUES (?)", (f"row {i} " + "x" * 60,))
        db.close()
        figures["insert_seconds"] = round(time.monotonic() - t, 1)
        db_size = figures["db_bytes"] = (mnt / "bench.db").stat().st_size
        figures["before_gc"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
        gc = subprocess.run(CHRONICLE + ["gc", "-s", str(store), "-w", "bench", "--json"], capture_output=True,
                            text=True, check=True)
        figures["gc"] = json.loads(gc.stdout)
        figures["after_gc"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
        mounted = meta_breakdown(store)          # (a second opener: the daemon's close is the last, not this one)
        figures["after_gc"]["metadata_in_use_bytes"] = mounted["_in_use_bytes"]
        figures["after_gc"]["metadata_file_bytes"] = mounted["_file_bytes"]
        figures["after_gc"]["packs"] = pack_breakdown(store)
        query = json.loads((mnt / ".chronicle" / "query" / "bench.db").read_text())
        figures["history"] = _history_check(mnt, query)
    finally:
        procs.unmount(mnt)
        proc.wait(timeout=60)
    gc2 = subprocess.run(CHRONICLE + ["gc", "-s", str(store), "-w", "bench", "--json"], capture_output=True,
                         text=True, check=True)
    figures["gc_unmounted"] = json.loads(gc2.stdout)
    figures["after_gc_unmounted"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
    figures["metadata_breakdown"] = meta_breakdown(store)
    figures["after_gc_unmounted"]["metadata_in_use_bytes"] = figures["metadata_breakdown"]["_in_use_bytes"]
    figures["after_gc_unmounted"]["metadata_file_bytes"] = figures["metadata_breakdown"]["_file_bytes"]
    figures["after_gc_unmounted"]["packs"] = pack_breakdown(store)
    figures["db_versions_content"] = content_bytes(store, {v["hash"] for v in query["versions"]
                                                           if not v.get("pruned") and v.get("hash")})
    for key in ("after_gc", "after_gc_unmounted"):
        total = figures[key]["packs_bytes"] + figures[key]["metadata_bytes"]
        figures[key]["ratio"] = round(total / db_size, 2)
    in_use = figures["after_gc"]["packs_bytes"] + figures["after_gc"]["metadata_in_use_bytes"]
    figures["after_gc"]["ratio_in_use"] = round(in_use / db_size, 2)      # LMDB pages in use, not the file
    history_ok = figures["history"]["kept_as_policy"] and figures["history"]["reads_ok"] \
        and figures["history"]["kept"] > 0
    figures["budget_ok"] = figures["after_gc"]["ratio"] <= 10 and history_ok
    figures["budget_ok_in_use"] = figures["after_gc"]["ratio_in_use"] <= 10 and history_ok
    figures["budget_ok_unmounted"] = figures["after_gc_unmounted"]["ratio"] <= 10 and history_ok
    return figures


def _history_check(mnt: Path, query: dict) -> dict:
    """The database's history after gc against the default policy: the
    versions ``policy.select`` keeps (no pins but the head: the bench makes
    no snapshot, fork or turn) are those ``query`` lists as not pruned, and
    every kept version's ``versions/<N>`` reads back whole: its listed
    size, and the newest one the database's bytes now."""
    from chronicle.store.gc.policy import DEFAULT_POLICY, VersionInfo, select

    versions = [v for v in query["versions"] if v.get("hash") is not None]
    infos = [VersionInfo(v["seq"], _time_ns(v["time"])) for v in versions]
    want = select(infos, DEFAULT_POLICY, [max(v.seq for v in infos)] if infos else [], time.time_ns())
    kept = [v for v in versions if not v.get("pruned")]
    reads_ok = True
    for v in kept:
        data = (mnt / ".chronicle" / "versions" / "bench.db" / str(v["version"])).read_bytes()
        reads_ok &= len(data) == v["size"]
    if kept:
        reads_ok &= data == (mnt / "bench.db").read_bytes()
    return {"versions": len(versions), "kept": len(kept), "policy_keeps": len(want),
            "kept_as_policy": {v["seq"] for v in kept} == want, "reads_ok": reads_ok}


def _time_ns(text: str) -> int:
    from datetime import datetime

    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


def pack_breakdown(store_path: Path) -> dict:
    """The packs on disk against the chunk index: count, bytes, bytes of
    live chunks (refcount > 0, with their 44-byte record headers), of dead
    ones, of delta chunks, and the largest packs with their live fraction.
    Opens the store (a second opener is fine while it is mounted)."""
    from chronicle.store.chunks.packs import RECORD_HEADER

    store = Store.open(store_path)
    try:
        sizes = store.chunks.reader.list_packs()
        live: dict[int, int] = {}
        dead: dict[int, int] = {}
        delta = 0
        with store.env.begin() as txn:
            for _chunk_id, record in store.chunks.iter_index(txn):
                side = live if record.refcount else dead
                side[record.pack_no] = side.get(record.pack_no, 0) + RECORD_HEADER.size + record.stored_len
                if record.base is not None and record.refcount:
                    delta += record.stored_len
        largest = sorted(sizes, key=lambda p: -sizes[p])[:5]
        return {"packs": len(sizes), "bytes": sum(sizes.values()), "live_bytes": sum(live.values()),
                "dead_bytes": sum(dead.values()), "live_delta_bytes": delta,
                "largest": [{"pack": f"{p:x}", "bytes": sizes[p], "live": round(live.get(p, 0) / sizes[p], 2)}
                            for p in largest]}
    finally:
        store.close()


def content_bytes(store_path: Path, hashes: set[str]) -> dict:
    """Of the contents whose BLAKE3 hash (hex) is in ``hashes``: how many,
    their logical bytes, their distinct chunks and those chunks' stored bytes
    (each chunk counted once over all of them)."""
    from chronicle.store.meta.schema import ContentRecord

    store = Store.open(store_path)
    try:
        found = logical = 0
        chunks: set[bytes] = set()
        with store.env.begin() as txn:
            with txn.cursor(db=store.dbs["contents"]) as cur:
                for key, raw in cur:
                    record = ContentRecord.decode(bytes(raw), bytes(key))
                    if record.hash is None or record.hash.hex() not in hashes:
                        continue
                    found += 1
                    logical += record.size
                    chunks.update(bytes(e[0]) for e in store.nodes.iter_extents(record, txn))
            stored = 0
            for chunk_id in chunks:
                record = store.chunks.record(chunk_id, txn)
                stored += record.stored_len if record is not None else 0
        return {"contents": found, "logical_bytes": logical, "chunks": len(chunks), "stored_bytes": stored}
    finally:
        store.close()


def click_replay(work: Path, bare: str | None, commits: int) -> dict:
    """The click-replay job (module docstring): ``replay_meta.click_replay``'s
    figures, with the budgets; the per-database table is printed to stderr."""
    repo = Path(bare) if bare else gitrepo.build_repo(Path(os.environ.get("CHRONICLE_CACHE", Path.home() / ".cache"
                                                                          / "chronicle")) / "bench", 300, commits)
    figures = replay_meta.click_replay(work, repo, commits)
    print(replay_meta.format_table(figures["databases"]), file=sys.stderr)
    metadata = max(figures["meta_used_bytes"], figures["data_mdb_bytes"])     # the file as it is left on disk
    figures["budget_ok"] = (metadata <= 0.5 * figures["chunks_bytes"]
                            and figures["daemon_peak_rss_bytes"] < 300_000_000)
    return figures


NPM_PACKAGE = {"name": "bench-app", "version": "1.0.0", "private": True,
               "dependencies": {"express": "4.21.2", "lodash": "4.17.21", "commander": "12.1.0",
                                "debug": "4.4.0", "uuid": "11.0.5", "chalk": "4.1.2", "dayjs": "1.11.13",
                                "yargs": "17.7.2"}}


def _store_bytes(store: Path) -> tuple[int, int]:
    """(packs, metadata) bytes allocated on disk."""
    return _du(store / "packs"), _du(store / "meta")


def _tree_bytes(path: Path) -> tuple[int, int]:
    """(files, apparent bytes) below ``path`` (``du -b``'s figure, files only)."""
    files = size = 0
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            files += 1
            size += f.stat().st_size
    return files, size


def meta_breakdown(store_path: Path) -> dict:
    """Bytes of LMDB pages in use per named database (branch + leaf +
    overflow pages x page size), the free-list's pages, and the file's size:
    where the metadata goes. Opens the store (it must not be mounted)."""
    store = Store.open(store_path)
    try:
        with store.env.begin() as txn:
            out = {}
            for name in schema.DATABASES:
                st = txn.stat(store.dbs[name])
                used = (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
                if used:
                    out[name] = {"bytes": used, "entries": st["entries"]}
        info = store.env.info()
        page = store.env.stat()["psize"]
        out["_in_use_bytes"] = sum(v["bytes"] for v in out.values())
        out["_file_bytes"] = (info["last_pgno"] + 1) * page
        return out
    finally:
        store.close()


def npm_rounds(work: Path, rounds: int) -> dict:
    npm = shutil.which("npm")
    if npm is None:
        return {"skipped": "npm is not installed (apt-get install npm, or the npm of a Node.js install)"}
    store, mnt, cache = work / "npm-store", work / "npm-mnt", work / "npm-cache"
    mnt.mkdir()
    log = work / "npm-daemon.log"
    proc, _ = procs.spawn(procs.mount_command(store, "bench", mnt, []), log, env=dict(os.environ), cwd=REPO)
    figures: dict = {"rounds": rounds}
    try:
        procs.wait_for_mount(mnt, proc.pid, timeout=60, log_path=log)
        project = mnt / "app"
        project.mkdir()
        (project / "package.json").write_text(json.dumps(NPM_PACKAGE, indent=2) + "\n")
        times = []
        for n in range(rounds):
            t = time.monotonic()
            subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefer-offline", "--cache", str(cache),
                            "--loglevel", "error"], cwd=project, check=True, capture_output=True, text=True,
                           timeout=900)
            times.append(time.monotonic() - t)
            if n == 0:
                figures["install_files"], figures["install_bytes"] = _tree_bytes(project / "node_modules")
                figures["install_du_bytes"] = _du(project / "node_modules")
            shutil.rmtree(project / "node_modules")
            print(f"  npm round {n + 1}/{rounds}: {times[-1]:.1f} s", file=sys.stderr)
        figures["install_seconds"] = [round(x, 1) for x in times]
        figures["before_gc"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
        dry = json.loads(subprocess.run(CHRONICLE + ["gc", "--dry-run", "-s", str(store), "-w", "bench", "--json"],
                                        capture_output=True, text=True, check=True).stdout)
        gc = json.loads(subprocess.run(CHRONICLE + ["gc", "-s", str(store), "-w", "bench", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
        figures["dry_run"] = {"dropped_versions": dry["workspaces"][0]["dropped_versions"],
                              "dropped_inodes": dry["workspaces"][0].get("dropped_inodes"),
                              "dropped_lines": dry["workspaces"][0].get("dropped_lines"),
                              "freed_bytes": dry["freed_bytes"]}
        figures["gc"] = gc
        figures["after_gc"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
        mounted = meta_breakdown(store)          # (a second opener: the daemon's close is the last, not this one)
        figures["after_gc"]["metadata_in_use_bytes"] = mounted["_in_use_bytes"]
        figures["after_gc"]["metadata_file_bytes"] = mounted["_file_bytes"]
        figures["stats"] = json.loads((mnt / ".chronicle" / "stats").read_text())
    finally:
        procs.unmount(mnt)
        proc.wait(timeout=60)
    gc2 = json.loads(subprocess.run(CHRONICLE + ["gc", "-s", str(store), "-w", "bench", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    figures["gc_unmounted"] = gc2
    figures["after_gc_unmounted"] = dict(zip(("packs_bytes", "metadata_bytes"), _store_bytes(store)))
    figures["metadata_breakdown"] = meta_breakdown(store)
    figures["after_gc_unmounted"]["metadata_in_use_bytes"] = figures["metadata_breakdown"]["_in_use_bytes"]
    figures["after_gc_unmounted"]["metadata_file_bytes"] = figures["metadata_breakdown"]["_file_bytes"]
    install = figures["install_bytes"]
    for key in ("after_gc", "after_gc_unmounted"):
        total = figures[key]["packs_bytes"] + figures[key]["metadata_bytes"]
        figures[key]["ratio"] = round(total / install, 2)
    in_use = figures["after_gc"]["packs_bytes"] + figures["after_gc"]["metadata_in_use_bytes"]
    figures["after_gc"]["ratio_in_use"] = round(in_use / install, 2)      # LMDB pages in use, not the file
    figures["budget_ok"] = figures["after_gc"]["ratio"] <= 2.0
    figures["budget_ok_in_use"] = figures["after_gc"]["ratio_in_use"] <= 2.0
    figures["budget_ok_unmounted"] = figures["after_gc_unmounted"]["ratio"] <= 2.0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    parser.add_argument("--inserts", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workloads", default="gc-events,sqlite-wal,npm")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--metadata", action="store_true", help="also run click-replay")
    parser.add_argument("--git-repo", help="bare repository for click-replay")
    parser.add_argument("--commits", type=int)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--beside-idle", action="store_true",
                        help="gc-events: gc beside another process holding the store open, idle (a mount daemon)")
    args = parser.parse_args()
    events = args.events or (100_000 if args.quick else 1_000_000)
    inserts = args.inserts or (2_000 if args.quick else 20_000)
    work = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=args.workdir))
    out = {}
    try:
        if "gc-events" in args.workloads:
            out["gc-events"] = gc_events(work, events, args.beside_idle)
            print(json.dumps({"gc-events": out["gc-events"]}, indent=2))
        if "sqlite-wal" in args.workloads:
            out["sqlite-wal"] = sqlite_wal(work, inserts)
            print(json.dumps({"sqlite-wal": out["sqlite-wal"]}, indent=2))
        if args.metadata or "click-replay" in args.workloads:
            out["click-replay"] = click_replay(work, args.git_repo, args.commits or (30 if args.quick else 300))
            print(json.dumps({"click-replay": out["click-replay"]}, indent=2))
        if "npm" in args.workloads:
            out["npm"] = npm_rounds(work, args.rounds or (5 if args.quick else 20))
            print(json.dumps({"npm": out["npm"]}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
