"""``chronicle blame``, ``grep`` and ``log --changed-in`` (issue 12) against
stores built with the Python API (no mount)."""

from __future__ import annotations

import json

import blake3
import pytest

from chronicle.store.chunks.tree import hash_data
from chronicle.store.history.turns import TurnLog
from chronicle.store.store import Store
from test_cli import ACTOR, fails, run, write


@pytest.fixture
def store(tmp_path):
    """notes.txt: v1 "one\\ntwo\\n", v2 (turn planner:1) "one\\nTWO\\nthree\\n" then renamed to
    doc.txt by the same turn; copy.txt holds v1's content; bin has a NUL."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    write(ws, b"notes.txt", b"one\ntwo\n")
    write(ws, b"copy.txt", b"one\ntwo\n")
    write(ws, b"bin", b"two\0two")
    TurnLog(st).begin(ws, "planner", 1, "m-1")
    write(ws, b"notes.txt", b"one\nTWO\nthree\n")
    ws.rename(ws.root, b"notes.txt", ws.root, b"doc.txt", 0, ACTOR)
    TurnLog(st).end(ws)
    st.close()
    return path


def test_blame_text_and_json(runner, store):
    out = run(runner, "blame", "--store", store, "doc.txt").stdout.splitlines()
    assert len(out) == 3
    assert out[0].startswith("1 ") and out[0].endswith(" - 1) one")
    assert " planner:1 2) TWO" in out[1]
    records = [json.loads(x) for x in run(runner, "blame", "--store", store, "--json", "doc.txt").stdout.splitlines()]
    assert [(r["version"], r["path"]) for r in records] == [(1, "notes.txt"), (2, "notes.txt"), (2, "notes.txt")]
    old = run(runner, "blame", "--store", store, "--json", "doc.txt@1").stdout.splitlines()
    assert [json.loads(x)["text"] for x in old] == ["one", "two"]
    assert "0+7)" in run(runner, "blame", "--store", store, "bin").stdout
    fails(runner, "blame", "--store", store, "nope", code=1, match="never existed")
    fails(runner, "blame", "--store", store, "doc.txt@9", code=1, match="no version 9")


def test_grep_head_history_and_ranges(runner, store):
    assert run(runner, "grep", "--store", store, "two|TWO").stdout.splitlines() == ["copy.txt:2:two", "doc.txt:2:TWO"]
    hist = run(runner, "grep", "--store", store, "--history", "(?i)two").stdout.splitlines()
    assert hist == ["copy.txt@1:2:two", "doc.txt@1:2:two", "doc.txt@2:2:TWO"]
    assert run(runner, "grep", "--store", store, "--turn", "planner:1", "three").stdout == "doc.txt@2:3:three\n"
    assert run(runner, "grep", "--store", store, "two", "copy.txt").stdout == "copy.txt:2:two\n"
    line = json.loads(run(runner, "grep", "--store", store, "--json", "three").stdout)
    assert line == {"path": "doc.txt", "version": None, "line": 3, "text": "three"}
    assert run(runner, "grep", "--store", store, "absent", code=1).stdout == ""
    fails(runner, "grep", "--store", store, "(", code=2, match="bad regular expression")


def test_log_changed_in(runner, store):
    assert run(runner, "log", "--store", store, "--changed-in", "planner:1").stdout.splitlines() == [
        "doc.txt", "notes.txt"]
    doc = json.loads(run(runner, "log", "--store", store, "--json", "--changed-in", "planner:1").stdout)
    assert doc["agent"] == "planner" and doc["turn"] == 1 and doc["status"] == "ended"
    fails(runner, "log", "--store", store, "--changed-in", "planner:2", code=1, match="no turn 2")
    fails(runner, "log", "--store", store, "--changed-in", "planner", code=2)
    fails(runner, "log", "--store", store, "--changed-in", "planner:1", "doc.txt", code=2)


def test_hash_prints_the_hash_a_file_has_in_chronicle(runner, store, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\nTWO\nthree\n")
    big = bytes(range(256)) * 20_000                               # several chunks
    (tmp_path / "big").write_bytes(big)
    out = run(runner, "hash", "a.txt", "big").stdout.splitlines()
    versions = json.loads(run(runner, "log", "--store", store, "--json", "doc.txt").stdout)["versions"]
    doc = [v for v in versions if v.get("hash")][-1]
    assert out[0] == f"{doc['hash']}  a.txt"                      # what log shows for the same bytes
    assert out[1] == f"{hash_data(big).hex()}  big" and hash_data(big) != blake3.blake3(big).digest()
    fails(runner, "hash", "missing", code=1, match="No such file")
    fails(runner, "hash", ".", match="not a regular file")
