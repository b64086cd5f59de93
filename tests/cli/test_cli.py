"""The ``chronicle`` command line against stores built with the Python API (no mount).

Every store is closed before the CLI runs: one process must not have the
same LMDB environment open twice.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from chronicle.cli import cli
from chronicle.store.history.turns import TurnLog
from chronicle.store.meta.journal import iso_time
from chronicle.store.model import Actor
from chronicle.store.store import Store

ACTOR = Actor(os.getuid(), os.getgid(), 4242)
BINARY_V1 = bytes(range(256)) * 4
BINARY_V2 = b"\x00\xff" * 300


def write(ws, path: bytes, data: bytes) -> int:
    """Create or overwrite ``path`` with ``data`` as one version; returns the head seq."""
    parent_path, _, name = path.rpartition(b"/")
    parent = ws.resolve(parent_path)[0]
    try:
        ino, _ = ws.lookup(parent, name)
        created = False
    except Exception:
        ino, _ = ws.create(parent, name, 0o100644, ACTOR)
        created = True
    ws.files.open(ino, created=created)
    ws.files.truncate(ino, 0)
    ws.files.write(ino, 0, data, ACTOR.pid)
    ws.files.commit(ino, ACTOR.pid)
    ws.files.release(ino)
    return ws.head_seq


@pytest.fixture
def store(tmp_path):
    """A store with workspace ``default``:

    seq 1 create notes.txt, 2 write v1 "one\\n", 3 write v2 "one\\ntwo\\n" (snapshot "first"),
    4 mkdir src, 5-6 src/data.bin (binary v1), 7 write src/data.bin v2, 8 write notes.txt v3.
    """
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    write(ws, b"notes.txt", b"one\n")
    write(ws, b"notes.txt", b"one\ntwo\n")
    ws.snapshot("first")
    ws.mkdir(ws.root, b"src", 0o755, ACTOR)
    write(ws, b"src/data.bin", BINARY_V1)
    write(ws, b"src/data.bin", BINARY_V2)
    write(ws, b"notes.txt", b"one\ntwo\nthree")
    st.close()
    return path


def run(runner, *args, code=0):
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output + result.stderr
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def fails(runner, *args, code=None, match=None):
    """Run a command that must fail with a one-line error."""
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code != 0, result.stdout
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if code != 2 or match is not None:
        lines = result.stderr.strip().splitlines()
        if result.exit_code != 2:
            assert len(lines) == 1 and lines[0].startswith("chronicle: error: "), result.stderr
        if match:
            assert re.search(match, result.stderr), result.stderr
    return result


def log_json(runner, store, *args):
    out = run(runner, "log", "--store", store, "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


# -- init ---------------------------------------------------------------------------------------


def test_init_and_init_twice(runner, tmp_path):
    result = run(runner, "init", tmp_path / "s")
    assert "Initialized" in result.stdout
    assert (tmp_path / "s" / "store.json").exists()
    fails(runner, "init", tmp_path / "s", code=1, match="already exists")


def test_init_backends(runner, tmp_path):
    # an S3 store is checked before anything is created (tests/s3 run the real thing against SeaweedFS)
    fails(runner, "init", tmp_path / "s3", "--backend", "s3://bucket/prefix", "--endpoint", "http://127.0.0.1:9",
          code=1, match="cannot reach s3://bucket/prefix at http://127.0.0.1:9|no AWS credentials")
    fails(runner, "init", tmp_path / "s3", "--backend", "s3://Bucket/prefix", code=2, match="not a valid bucket")
    fails(runner, "init", tmp_path / "s3", "--cache-size", "1G", code=2, match="--backend s3://")
    fails(runner, "init", tmp_path / "x", "--backend", "ftp", code=2, match="unknown backend")
    assert not (tmp_path / "s3").exists()


def test_init_on_a_file(runner, tmp_path):
    (tmp_path / "file").write_text("x")
    fails(runner, "init", tmp_path / "file", code=1)


def test_version_and_help(runner):
    assert re.search(r"\d+\.\d+", run(runner, "--version").stdout)
    assert "restore" in run(runner, "--help").stdout


# -- log --------------------------------------------------------------------------------------------


def test_log_workspace_text(runner, store):
    lines = run(runner, "log", "--store", store).stdout.splitlines()
    assert len(lines) == 8
    assert [int(line.split()[0]) for line in lines] == list(range(1, 9))
    assert "write" in lines[1] and "notes.txt" in lines[1] and "v1" in lines[1]
    assert "mkdir" in lines[3] and "src" in lines[3]
    # aligned: the path starts in the same column on every line
    columns = {line.index("notes.txt") for line in lines if line.endswith("notes.txt")}
    assert len(columns) == 1


def test_log_workspace_json(runner, store):
    events = log_json(runner, store)
    assert [e["seq"] for e in events] == list(range(1, 9))
    assert events[2] == {**events[2], "event": "write", "path": "notes.txt", "version": 2, "size": 8}
    assert all("turn" in e and "time" in e for e in events)


def test_log_since_until(runner, store):
    assert [e["seq"] for e in log_json(runner, store, "--since", 3, "--until", 5)] == [3, 4, 5]
    assert [e["seq"] for e in log_json(runner, store, "--since", 7)] == [7, 8]
    # a snapshot names a state: --since gives what came after it, --until includes it
    assert [e["seq"] for e in log_json(runner, store, "--since", "first")] == [4, 5, 6, 7, 8]
    assert [e["seq"] for e in log_json(runner, store, "--until", "first")] == [1, 2, 3]
    events = log_json(runner, store)
    t = events[4]["time"]
    assert [e["seq"] for e in log_json(runner, store, "--since", t)][0] == 5
    assert [e["seq"] for e in log_json(runner, store, "--until", t)][-1] == 5
    assert log_json(runner, store, "--since", "2000-01-01T00:00:00Z")[0]["seq"] == 1
    assert log_json(runner, store, "--since", iso_time(time.time_ns() + 10**12)) == []


def test_log_path(runner, store):
    text = run(runner, "log", "--store", store, "notes.txt").stdout.splitlines()
    assert len(text) == 3 and all("notes.txt" in line for line in text)
    doc = json.loads(run(runner, "log", "--store", store, "--json", "notes.txt").stdout)
    assert doc["path"] == "notes.txt"
    assert [v["version"] for v in doc["versions"]] == [1, 2, 3]
    assert [v["size"] for v in doc["versions"]] == [4, 8, 13]
    doc = json.loads(run(runner, "log", "--store", store, "--json", "notes.txt", "--since", 3).stdout)
    assert [v["version"] for v in doc["versions"]] == [2, 3]
    doc = json.loads(run(runner, "log", "--store", store, "--json", "./src/../notes.txt", "--until", "first").stdout)
    assert [v["version"] for v in doc["versions"]] == [1, 2]


def test_log_turn(runner, tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    write(ws, b"a.txt", b"before")
    TurnLog(st).begin(ws, "planner", 1, "m-1")
    write(ws, b"a.txt", b"during")
    write(ws, b"b.txt", b"new")
    TurnLog(st).end(ws)
    write(ws, b"a.txt", b"after")
    st.close()
    events = log_json(runner, path, "--turn", "planner:1")
    assert [e["path"] for e in events] == ["a.txt", "b.txt", "b.txt"]
    assert all(e["turn"] == {"agent": "planner", "turn": 1, "message_id": "m-1"} for e in events)
    assert "planner:1" in run(runner, "log", "--store", path, "--turn", "planner:1").stdout
    doc = json.loads(run(runner, "log", "--store", path, "--json", "a.txt", "--turn", "turn:planner:1").stdout)
    assert [v["version"] for v in doc["versions"]] == [2]
    fails(runner, "log", "--store", path, "--turn", "planner:9", code=1, match="no turn 9")
    fails(runner, "log", "--store", path, "--turn", "planner", code=2)
    # restore of the whole workspace to the end of the turn
    run(runner, "restore", "--store", path, "--at", "turn:planner:1")
    assert run(runner, "cat", "--store", path, "a.txt").stdout == "during"


# -- show / cat / diff ------------------------------------------------------------------------------


def test_show_and_cat_versions(runner, store):
    assert run(runner, "show", "--store", store, "notes.txt").stdout_bytes == b"one\ntwo\nthree"
    assert run(runner, "cat", "--store", store, "notes.txt@1").stdout_bytes == b"one\n"
    assert run(runner, "cat", "--store", store, "notes.txt@2").stdout_bytes == b"one\ntwo\n"
    assert run(runner, "cat", "--store", store, "src/data.bin@1").stdout_bytes == BINARY_V1
    assert run(runner, "show", "--store", store, "/src/data.bin").stdout_bytes == BINARY_V2


def test_cat_large_file_in_pieces(runner, tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    data = os.urandom(3 << 20) + b"tail"
    write(ws, b"big", data)
    st.close()
    assert run(runner, "cat", "--store", path, "big").stdout_bytes == data


def test_diff(runner, store):
    out = run(runner, "diff", "--store", store, "notes.txt").stdout
    assert "--- a/notes.txt@2" in out and "+++ b/notes.txt@3" in out
    assert "+three" in out and "\\ No newline at end of file" in out
    out = run(runner, "diff", "--store", store, "notes.txt", 1).stdout
    assert "+two" in out and "+three" in out and "--- a/notes.txt@1" in out
    out = run(runner, "diff", "--store", store, "notes.txt", 2, 1).stdout
    assert "-two" in out and "+++ b/notes.txt@1" in out
    assert run(runner, "diff", "--store", store, "notes.txt", 2, 2).stdout == ""
    out = run(runner, "diff", "--store", store, "src/data.bin").stdout
    assert out.strip() == "Binary versions 1 and 2 of src/data.bin differ"


# -- restore ----------------------------------------------------------------------------------------


def test_restore_file(runner, store):
    out = run(runner, "restore", "--store", store, "notes.txt", "--version", 1).stdout
    assert "Restored notes.txt to version 1 (seq 9)" in out
    assert run(runner, "cat", "--store", store, "notes.txt").stdout_bytes == b"one\n"
    event = log_json(runner, store)[-1]
    assert event["event"] == "restore" and event["restored"] == 1 and event["version"] == 4
    out = run(runner, "restore", "--store", store, "notes.txt", "--version", 1).stdout
    assert "Nothing to restore" in out


def test_restore_at(runner, store):
    out = run(runner, "restore", "--store", store, "--at", "first").stdout
    assert "to seq 3 (seq 9, 3 path(s) changed)" in out
    assert run(runner, "cat", "--store", store, "notes.txt").stdout_bytes == b"one\ntwo\n"
    doc = json.loads(run(runner, "log", "--store", store, "--json", "src").stdout)
    assert doc["versions"][-1]["event"] == "restore"
    run(runner, "restore", "--store", store, "--at", 8)
    assert run(runner, "cat", "--store", store, "notes.txt").stdout_bytes == b"one\ntwo\nthree"
    assert "Nothing to restore" in run(runner, "restore", "--store", store, "--at", 10).stdout


def test_restore_bad_usage(runner, store):
    fails(runner, "restore", "--store", store, code=2)
    fails(runner, "restore", "--store", store, "notes.txt", code=2)
    fails(runner, "restore", "--store", store, "notes.txt", "--version", 1, "--at", 3, code=2)
    fails(runner, "restore", "--store", store, "notes.txt", "--version", 99, code=1, match="no version 99")
    fails(runner, "restore", "--store", store, "--at", "nonsense", code=1, match="nonsense")
    fails(runner, "restore", "--store", store, "--at", 999, code=1, match="does not exist")
    fails(runner, "restore", "--store", store, "--at", "turn:x", code=2, match="turn:AGENT:N")
    fails(runner, "restore", "--store", store, "--at", "2026-13-45T00:00:00Z", code=2, match="ISO-8601")


# -- snapshots, fork, workspaces, stats ---------------------------------------------------------------


def test_snapshot_and_snapshots(runner, store):
    assert "at seq 8" in run(runner, "snapshot", "--store", store, "v1").stdout
    items = json.loads(run(runner, "snapshots", "--store", store, "--json").stdout)
    assert [(s["name"], s["seq"]) for s in items] == [("first", 3), ("v1", 8)]
    assert all(s["time"].endswith("Z") for s in items)
    text = run(runner, "snapshots", "--store", store).stdout
    assert "first" in text and "v1" in text
    fails(runner, "snapshot", "--store", store, "v1", code=1, match="already exists")
    fails(runner, "snapshot", "--store", store, "a/b", code=2, match="invalid snapshot name")


def test_fork_then_log(runner, store):
    assert "at seq 3 as 'exp'" in run(runner, "fork", "--store", store, "--at", "first", "exp").stdout
    events = log_json(runner, store, "--workspace", "exp")
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert run(runner, "cat", "--store", store, "-w", "exp", "notes.txt").stdout_bytes == b"one\ntwo\n"
    run(runner, "fork", "--store", store, "head-copy")
    assert len(log_json(runner, store, "--workspace", "head-copy")) == 8
    fails(runner, "fork", "--store", store, "exp", code=1, match="already exists")
    fails(runner, "fork", "--store", store, "--at", 99, "other", code=1)
    fails(runner, "fork", "--store", store, "bad/name", code=2)


def test_workspaces(runner, store):
    run(runner, "fork", "--store", store, "--at", 3, "exp")
    rows = json.loads(run(runner, "workspaces", "--store", store, "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["default"]["head_seq"] == 8 and by_name["default"]["parent"] is None
    assert by_name["default"]["files"] == 2
    assert by_name["default"]["size"] == 13 + len(BINARY_V2)
    assert by_name["exp"] == {**by_name["exp"], "parent": "default", "fork_seq": 3, "files": 1, "size": 8,
                              "mountpoint": None}
    text = run(runner, "workspaces", "--store", store).stdout
    assert "default@3" in text and "NAME" in text
    rows = json.loads(run(runner, "workspaces", "--store", store, "--json", "--no-size").stdout)
    assert "size" not in rows[0]


def test_stats_json(runner, store):
    figures = json.loads(run(runner, "stats", "--store", store, "--json").stdout)
    assert figures["workspaces"] == 1 and figures["head_seq"] == 8 and figures["workspace"] == "default"
    assert figures["workspace_events"] == 8 and figures["snapshots"] == 1
    assert figures["logical_bytes"] >= 13 + len(BINARY_V2)
    assert os.path.isabs(figures["store"])
    assert "logical bytes" in run(runner, "stats", "--store", store).stdout


def test_default_store_from_chronicle_home(runner, tmp_path):
    run(runner, "init", tmp_path / "home" / "store")
    fails(runner, "log", code=1, match="no workspace named 'default'")
    figures = json.loads(run(runner, "stats", "--json").stdout)
    assert "workspace" not in figures and figures["workspaces"] == 0


# -- bad input --------------------------------------------------------------------------------------


def test_bad_inputs(runner, store, tmp_path):
    fails(runner, "log", "--store", tmp_path / "nowhere", code=2, match="no Chronicle store")
    fails(runner, "log", "--store", store, "--workspace", "nope", code=1, match="no workspace named 'nope'")
    fails(runner, "log", "--store", store, "missing.txt", code=1, match="never existed")
    fails(runner, "cat", "--store", store, "missing.txt", code=1, match="never existed")
    fails(runner, "cat", "--store", store, "notes.txt@99", code=1, match="no version 99")
    fails(runner, "cat", "--store", store, "src", code=1, match="is a directory")
    fails(runner, "diff", "--store", store, "notes.txt", 1, 99, code=1, match="no version 99")
    fails(runner, "diff", "--store", store, "notes.txt", "x", code=2)
    fails(runner, "log", "--store", store, "--since", "no-such-point", code=1)
    fails(runner, "log", "--store", store, "../outside", code=2, match="outside the workspace")
    fails(runner, "stats", "--store", store, "--workspace", "nope", code=1)
    fails(runner, "snapshots", "--store", store, "-w", "nope", code=1)
    fails(runner, "gc", "--store", store, "-w", "nope", code=1, match="no workspace named 'nope'")
    fails(runner, "frobnicate", code=2)


def test_internal_error_is_one_line(runner, store, monkeypatch):
    from chronicle import mounting

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nbadly")

    monkeypatch.setattr(mounting, "mount", boom)
    result = runner.invoke(cli, ["mount", "--store", str(store), "mnt"])
    assert result.exit_code == 1
    assert result.stderr == "chronicle: internal error: RuntimeError: something broke badly\n"
    result = runner.invoke(cli, ["--debug", "mount", "--store", str(store), "mnt"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_fsck(runner, store):
    pytest.importorskip("chronicle.store.fsck.checks", reason="chronicle.store.fsck.checks is not in the tree yet")
    out = run(runner, "fsck", "--store", store).stdout
    assert "clean" in out
    report = json.loads(run(runner, "fsck", "--store", store, "--json").stdout)
    assert report is not None


# -- through a real mount -------------------------------------------------------------------------


def test_commands_inside_a_mount(mount, mount_target, runner, monkeypatch):
    """Store and workspace found from the mount; changes go through ``ctl``."""
    from chronicle import control
    from chronicle.errors import ChronicleError
    from chronicle.locate import locate

    if mount_target != "chronicle":
        pytest.skip("needs a Chronicle mount")
    root = mount.path
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_bytes(b"first\n")
    (root / "sub" / "b.txt").write_bytes(b"second\n")
    store, workspace, rel = locate(root / "sub" / "b.txt")
    assert (os.path.realpath(store), workspace, rel) == (os.path.realpath(mount.store), mount.workspace, "sub/b.txt")
    assert locate(root.parent) is None

    monkeypatch.chdir(root / "sub")
    doc = json.loads(run(runner, "log", "--json", "b.txt").stdout)
    assert doc["path"] == "sub/b.txt" and [v["version"] for v in doc["versions"]] == [1, 2]
    assert run(runner, "cat", "b.txt@1").stdout_bytes == b"first\n"
    assert json.loads(run(runner, "stats", "--json").stdout)["workspace"] == mount.workspace

    assert "at seq" in run(runner, "snapshot", "s1").stdout
    assert (root / ".chronicle" / "snapshots" / "s1" / "sub" / "b.txt").read_bytes() == b"second\n"
    fails(runner, "snapshot", "s1", code=1, match="already exists")

    run(runner, "restore", "b.txt", "--version", 1)
    assert (root / "sub" / "b.txt").read_bytes() == b"first\n"
    (root / "new.txt").write_bytes(b"x")
    out = run(runner, "restore", "--at", "s1").stdout
    assert "to seq" in out and "path(s) changed" in out
    assert not (root / "new.txt").exists()
    assert (root / "sub" / "b.txt").read_bytes() == b"second\n"

    assert control.send(root, {"cmd": "sync"})["ok"] is True
    with pytest.raises(ChronicleError, match="unknown command"):
        control.send(root, {"cmd": "nope"})
    with control.ControlChannel(root) as channel:
        assert channel.request({"cmd": "snapshot", "name": "s2"})["name"] == "s2"
        assert channel.request({"cmd": "sync"})["ok"] is True
