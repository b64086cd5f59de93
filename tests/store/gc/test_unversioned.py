"""GC drops the records of deleted ignored paths (``gc.unversioned``): npm-like churn stays bounded."""

from __future__ import annotations

import json
import time

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.history import points
from chronicle.store.meta import schema
from chronicle.store.meta.journal import parse_iso_time as points_time
from tests.storeutil import A, log_lines, names_at_every_seq, read, write

LATER = time.time_ns() + 400 * 86400 * 10**9


def _clean(store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def _count(store, db: str, ws_id: int) -> int:
    prefix = schema.ws_key(ws_id)
    with store.env.begin() as txn, txn.cursor(db=store.dbs[db]) as cur:
        n = 0
        if cur.set_range(prefix):
            for key, _v in cur:
                if key[:4] != prefix:
                    break
                n += 1
        return n


def _install(ws, files: int = 30, tag: bytes = b"") -> None:
    nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
    for p in range(3):
        pkg = ws.mkdir(nm, b"pkg%d" % p, 0o755, A)[0]
        for i in range(files // 3):
            write(ws, pkg, b"f%d.js" % i, b"x" * 200 + tag + bytes([p, i]))
            write(ws, pkg, b"f%d.js" % i, b"y" * 300 + tag + bytes([p, i]))
        ws.symlink(pkg, b"link", b"f0.js", A)


def _remove(ws) -> None:
    with ws.read_txn() as txn:
        view = ws.view()
        nm, _kind = view.resolve(txn, b"node_modules")
        pkgs = [(name, ino) for name, ino, _k in view.entries(txn, nm)]
        files = {ino: [name for name, _i, _k in view.entries(txn, ino)] for _n, ino in pkgs}
    for name, ino in pkgs:
        for f in files[ino]:
            ws.unlink(ino, f, A)
        ws.rmdir(nm, name, A)
    ws.rmdir(ws.root, b"node_modules", A)


def test_rounds_of_install_and_remove_leave_no_records_behind(store, ws):
    write(ws, ws.root, b"package.json", b'{"name": "app"}')
    for r in range(4):
        _install(ws, tag=b"%d" % r)
        _remove(ws)
        write(ws, ws.root, b"package.json", b'{"name": "app", "round": %d}' % r)
    before = {db: _count(store, db, ws.id) for db in ("inodes", "dirent_hist", "paths", "events")}
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    mine = promised["workspaces"][0]
    assert mine["dropped_inodes"] == 4 * (1 + 3 * 12)          # node_modules, 3 packages, 10 files + a link each
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["dropped_inodes"] == mine["dropped_inodes"]
    assert result["dropped_lines"] == mine["dropped_lines"] > 0
    for k in ("freed_contents", "freed_chunks", "freed_bytes"):
        assert promised[k] == result[k]
    after = {db: _count(store, db, ws.id) for db in ("inodes", "dirent_hist", "paths", "events")}
    with store.env.begin() as txn, txn.cursor(db=store.dbs["paths"]) as cur:
        left = [bytes(k) for k, _v in cur if b"node_modules" in bytes(k)]
    assert left == []
    assert after["dirent_hist"] < 10 and after["inodes"] < 30, (before, after)
    assert after["events"] < before["events"] / 10
    lines = log_lines(ws)
    summaries = [line for line in lines if line["event"] == "dropped"]
    assert len(summaries) == 4 and all(s["path"] == "node_modules" for s in summaries)
    assert sum(s["events"] for s in summaries) == result["dropped_lines"]
    assert json.loads(read(ws, b"package.json"))["round"] == 3
    with ws.read_txn() as txn:                      # times still bisect across the summarised runs
        for line in lines:
            if line["path"] == "package.json":
                stamp = points_time(line["time"])
                assert ws.history.seq_at_time(txn, stamp) == line["seq"]
    names_at_every_seq(ws)
    _clean(store)
    again = dryrun.dry_run(store, ["w"], now_ns=LATER)
    assert again["workspaces"][0]["dropped_inodes"] == 0 and again["freed_bytes"] == 0
    assert again["workspaces"][0]["dropped_lines"] == 0


def test_a_snapshot_inside_a_round_keeps_that_round(store, ws):
    _install(ws, files=6, tag=b"a")
    snap = ws.head_seq
    points.put_snapshot(ws, "mid", snap)
    _remove(ws)
    _install(ws, files=6, tag=b"b")
    _remove(ws)
    collect.collect(store, ["w"], now_ns=LATER)
    view = ws.view(snap)
    with ws.read_txn() as txn:
        ino, _k = view.resolve(txn, b"node_modules/pkg0/f0.js")
        attrs = view.attrs(txn, ino)
    assert ws.store.content_map(attrs.content).read(0, attrs.size).startswith(b"y" * 300 + b"a")
    with store.env.begin() as txn, txn.cursor(db=store.dbs["paths"]) as cur:
        kept = {bytes(k) for k, _v in cur if b"node_modules/pkg0/f0.js" in bytes(k)}
    assert kept                                                 # the pinned round's entries stay
    names_at_every_seq(ws)
    _clean(store)


def test_a_live_ignored_tree_and_versioned_files_are_untouched(store, ws):
    _install(ws, files=6)
    write(ws, ws.root, b"app.py", b"v1")
    write(ws, ws.root, b"app.py", b"v2")
    nm_lines = sum(1 for line in log_lines(ws) if "node_modules" in line["path"])
    app_lines = [line for line in log_lines(ws) if line["path"] == "app.py"]
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["dropped_inodes"] == 0
    assert read(ws, b"node_modules/pkg1/f1.js").startswith(b"y" * 300)
    assert [line for line in log_lines(ws) if line["path"] == "app.py"] == app_lines
    # the superseded lines (first writes, creates) go; each file's current version keeps its line
    kept = [line for line in log_lines(ws) if "node_modules" in line["path"] and line["event"] != "dropped"]
    assert 0 < len(kept) < nm_lines
    names_at_every_seq(ws)
    _clean(store)


def test_a_deleted_ignored_file_still_open_keeps_its_records(store, ws):
    nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
    ino = write(ws, nm, b"open.js", b"z" * 1000)
    ws.files.open(ino)
    try:
        ws.unlink(nm, b"open.js", A)
        result = collect.collect(store, ["w"], now_ns=LATER)
        assert result["dropped_inodes"] == 0
        _clean(store)
    finally:
        ws.files.release(ino)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["dropped_inodes"] == 1
    _clean(store)


def test_runs_of_later_gcs_extend_the_earlier_summaries(store, ws):
    write(ws, ws.root, b"package.json", b"{}")
    _install(ws, files=6, tag=b"a")
    _remove(ws)
    first = collect.collect(store, ["w"], now_ns=LATER)
    _install(ws, files=6, tag=b"b")
    _remove(ws)
    second = collect.collect(store, ["w"], now_ns=LATER)
    assert first["dropped_lines"] > 0 and second["dropped_lines"] > 0
    summaries = [line for line in log_lines(ws) if line["event"] == "dropped"]
    assert len(summaries) == 1                                  # one run: nothing else happened in between
    assert summaries[0]["events"] == first["dropped_lines"] + second["dropped_lines"]
    assert summaries[0]["through"] == ws.head_seq - 1                # the head keeps its line (a pin)
    _clean(store)
