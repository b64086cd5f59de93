"""``.chronicle/blame/``, ``hash/`` and ``turns/`` of a real mount (SPEC §4,
issue 12): blame as JSON Lines following a rename, content by hash (a
prefix; an unknown hash ENOENT, a bad one EINVAL), what a turn wrote."""

from __future__ import annotations

from chronicle.store.chunks.tree import hash_data

import errno
import json
import os

import pytest

from test_magic import Ctl, magic


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def test_blame_hash_and_turns_through_the_mount(mount):
    root = mount.path
    (root / "d").mkdir()
    (root / "d" / "old.txt").write_bytes(b"one\ntwo\n")
    os.rename(root / "d" / "old.txt", root / "d" / "new.txt")
    with Ctl(mount) as ctl:
        ctl.ok({"cmd": "turn-begin", "agent": "alice", "turn": 1})
        (root / "d" / "new.txt").write_bytes(b"one\nTWO\nthree\n")
        ctl.ok({"cmd": "turn-end"})

    m = magic(mount)
    assert os.listdir(m / "blame") == ["d"]
    assert os.listdir(m / "blame" / "d") == ["new.txt", "old.txt"]
    records = [json.loads(x) for x in (m / "blame" / "d" / "new.txt").read_bytes().splitlines()]
    assert [(r["line"], r["version"], r["path"], r["text"]) for r in records] == [
        (1, 1, "d/old.txt", "one"), (2, 2, "d/new.txt", "TWO"), (3, 2, "d/new.txt", "three")]
    assert records[1]["turn"]["agent"] == "alice" and records[0]["turn"] is None

    full = hash_data(b"one\nTWO\nthree\n").hex()
    doc = json.loads((m / "hash" / full[:8]).read_bytes())
    assert doc["hash"] == full
    assert [(v["path"], v["version"]) for v in doc["versions"]] == [("d/new.txt", 2)]
    assert os.listdir(m / "hash") == []
    assert errno_of(os.stat, m / "hash" / ("0" * 64)) == errno.ENOENT
    assert errno_of(os.stat, m / "hash" / "xyz") == errno.EINVAL

    assert os.listdir(m / "turns") == ["alice"]
    assert os.listdir(m / "turns" / "alice") == ["1"]
    turn = json.loads((m / "turns" / "alice" / "1").read_bytes())
    assert turn["paths"] == ["d/new.txt"]
    assert turn["status"] == "ended"
    assert {e["event"] for e in turn["events"]} >= {"write"}
    assert errno_of(os.stat, m / "turns" / "alice" / "2") == errno.ENOENT
    assert errno_of(os.stat, m / "turns" / "bob") == errno.ENOENT
    assert errno_of(os.open, m / "blame" / "d" / "new.txt", os.O_WRONLY) in (errno.EROFS, errno.EACCES)
