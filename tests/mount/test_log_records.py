"""Packed event records and cut path entries (issue 9 §6) show the same JSON,
byte for byte, as the text records format 3 stored: ``.chronicle/log``,
``.chronicle/query/<path>`` of a real mount and ``chronicle log --json``,
read from a store, then from the same store with every record rewritten the
old way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mounts
import pytest

from chronicle.store.meta import events, schema
from chronicle.store.meta.schema import P_CONTENT, PathEntry
from chronicle.store.model import Actor
from chronicle.store.store import Store
from tools.storeapi import write_file

NAMES = [b"a.txt", b"dir/b.txt", b"caf\xc3\xa9-\xff.bin", b"ln", b"p"]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


def _history(path) -> bytes:
    """A history with renames, turn labels, a non-UTF-8 name and a path longer than a key; its long path."""
    actor = Actor(os.getuid(), os.getgid(), os.getpid())
    with Store.init(path) as store:
        ws = store.open_workspace(mounts.DEFAULT_WORKSPACE, writable=True, create=True)
        write_file(ws, ws.root, b"a.txt", b"one\n", actor)
        ws.turn = {"agent": "bot", "turn": 1, "message_id": None}
        write_file(ws, ws.root, b"a.txt", b"two\n", actor)
        write_file(ws, ws.root, NAMES[2], b"\x00\xff", actor)
        d, _ = ws.mkdir(ws.root, b"dir", 0o755, actor)
        ws.rename(ws.root, b"a.txt", d, b"b.txt", 0, actor)
        ws.turn = {"agent": "b\u00f6t", "turn": 2, "message_id": "m-2"}
        write_file(ws, ws.root, b"a.txt", b"three\n", actor)
        ws.symlink(ws.root, b"ln", b"dir/b.txt", actor)
        ws.turn = None
        parent, long_path = ws.root, []
        for _ in range(3):
            parent, _ = ws.mkdir(parent, b"d" * 200, 0o755, actor)
            long_path.append(b"d" * 200)
        write_file(ws, parent, b"deep", b"deep\n", actor)
        for i in range(3):
            write_file(ws, ws.root, b"p", b"p %d\n" % i, actor)
        ino, _ = ws.resolve(b"p")
        ws.setattr(ino, actor, mode=0o600)
        return b"/".join(long_path + [b"deep"])


def _as_format_3(path) -> int:
    """Rewrite every event record as its JSON text and every path entry
    without the cut hash (what format 3 wrote); how many records changed."""
    changed = 0
    with Store.open(path) as store, store.env.begin(write=True) as txn:
        for key, raw in list(txn.cursor(db=store.dbs["events"])):
            if raw[:1] == bytes((events.PACKED,)):
                txn.put(key, events.render(schema.event_key_seq(key), raw), db=store.dbs["events"])
                changed += 1
        for key, raw in list(txn.cursor(db=store.dbs["paths"])):
            e = PathEntry.decode(raw, key)
            old = b"".join((schema._PATH_ENTRY_HEAD.pack(e.flags, e.ino, len(e.origin), len(e.path)),
                            e.content if e.flags & P_CONTENT else b"", e.origin, e.path, e.fragment))
            if old != bytes(raw):
                txn.put(key, old, db=store.dbs["paths"])
                changed += 1
    return changed


def _shown(mount_factory, store, long_path: bytes) -> dict:
    mount = mount_factory(store=store)
    shown = {"log": (mount.path / ".chronicle" / "log").read_bytes()}
    for name in NAMES + [long_path]:
        shown[name] = (mount.path / ".chronicle" / "query").joinpath(os.fsdecode(name)).read_bytes()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for args in (["log", "--json"], ["log", "--json", "p"], ["log", "--json", "--since", "3", "dir/b.txt"]):
        shown[" ".join(args)] = subprocess.run(
            [sys.executable, "-m", "chronicle", *args, "-s", str(store), "-w", mounts.DEFAULT_WORKSPACE],
            capture_output=True, check=True, env=env).stdout
    mount.stop()
    return shown


def test_the_log_and_queries_read_the_same_from_packed_and_from_text_records(mount_factory):
    store = mount_factory.new_store()
    long_path = _history(store)
    packed = _shown(mount_factory, store, long_path)
    lines = [json.loads(line) for line in packed["log"].splitlines()]
    assert {"write", "rename", "mkdir", "symlink", "chmod"} <= {line["event"] for line in lines}
    assert any(line["turn"] for line in lines) and any("\\udcff" in line for line in packed["log"].decode().splitlines())
    assert _as_format_3(store) > len(lines)               # every event and the entries with a hash
    assert _shown(mount_factory, store, long_path) == packed
