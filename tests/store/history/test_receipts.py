"""Receipts (chronicle.store.history.receipts): the documented construction,
incrementality (directory hashes recomputed in proportion to the change, not
the tree), past points, forks, sparse contents, verification, turn ends — and
a hypothesis test that the incremental root, the from-scratch root and
``tools/receipt.py`` over a checkout of the tree all agree."""

from __future__ import annotations

import json
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.store.chunks.tree import hash_data
from chronicle.errors import ChronicleError, NotFound
from chronicle.store.history import receipts as receipts_mod
from chronicle.store.history.receipts import DIR_DOMAIN, EMPTY_DIR, Receipts
from chronicle.store.history.turns import TurnLog
from chronicle.store.meta import schema
from chronicle.store.model import KIND_DIR
from chronicle.store.namespace.restore import restore_tree
from chronicle.store.namespace.workspace import Workspace
from chronicle.store.store import Store
from storeutil import A, write, write_format3
from tools.receipt import tree as checkout_tree

REPO = Path(__file__).resolve().parents[3]


def checkout(ws: Workspace, dest: Path, seq: int | None = None) -> Path:
    """Write the tree of ``ws`` at ``seq`` (default: the head) into ``dest``,
    as ``cp -a`` of a mount would: contents, modes, symlinks, special files."""
    view = ws.view(seq if seq is not None else ws.head_seq)
    base = os.fsencode(dest)
    os.makedirs(base, exist_ok=True)
    dirs = []
    with ws.read_txn() as txn:
        for path, ino, _kind in view.walk(txn):
            attrs = view.attrs(txn, ino)
            target = os.path.join(base, path)
            if attrs.is_dir:
                os.mkdir(target)
                dirs.append((target, attrs.mode))
            elif attrs.is_file:
                with open(target, "wb") as f:
                    f.write(ws.store.content_map(attrs.content).read(0, attrs.size))
                os.chmod(target, stat.S_IMODE(attrs.mode))
            elif attrs.is_symlink:
                os.symlink(attrs.target, target)
            else:
                os.mknod(target, attrs.mode, attrs.rdev)
    for target, mode in reversed(dirs):
        os.chmod(target, stat.S_IMODE(mode))
    return dest


def _entry(name: bytes, kind: bytes, mode: int, digest: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + kind + struct.pack(">I", mode) + digest


def _dir(*entries: bytes) -> bytes:
    return blake3.blake3(DIR_DOMAIN + b"".join(entries)).digest()


def test_the_documented_construction(ws, tmp_path):
    """A known answer built from the README's bytes: a file, an empty directory,
    a directory with a file, a symlink, a FIFO and two names of one hard-linked
    file; the store and tools/receipt.py over a checkout give it."""
    sub, _ = ws.mkdir(ws.root, b"sub", 0o750, A)
    ws.mkdir(ws.root, b"empty", 0o700, A)
    f = write(ws, ws.root, b"f.txt", b"hello\n")
    ws.setattr(f, A, mode=0o640)
    write(ws, sub, b"x", b"")
    ws.symlink(ws.root, b"ln", b"f.txt", A)
    ws.create(ws.root, b"fifo", stat.S_IFIFO | 0o600, A)
    ws.link(f, sub, b"hard", A)
    h = lambda data: blake3.blake3(data).digest()        # noqa: E731
    sub_hash = _dir(_entry(b"hard", b"f", 0o640, hash_data(b"hello\n")), _entry(b"x", b"f", 0o644, h(b"")))
    expected = _dir(_entry(b"empty", b"d", 0o700, EMPTY_DIR),
                    _entry(b"f.txt", b"f", 0o640, hash_data(b"hello\n")),
                    _entry(b"fifo", b"o", stat.S_IFIFO | 0o600, h(struct.pack(">Q", 0))),
                    _entry(b"ln", b"l", 0, h(b"f.txt")),
                    _entry(b"sub", b"d", 0o750, sub_hash))
    receipt = Receipts(ws).make()
    assert receipt["root"] == expected.hex()
    assert (receipt["files"], receipt["dirs"], receipt["others"], receipt["bytes"]) == (3, 2, 2, 12)
    assert checkout_tree(os.fsencode(checkout(ws, tmp_path / "co")))["root"] == expected.hex()
    assert EMPTY_DIR == blake3.blake3(b"chronicle-receipt-v1 dir\n").digest()


def _grid(ws: Workspace, dirs: int, files: int) -> list[int]:
    inos = []
    for d in range(dirs):
        dino, _ = ws.mkdir(ws.root, b"d%03d" % d, 0o755, A)
        inos.append(dino)
        for i in range(files):
            write(ws, dino, b"f%03d" % i, b"content %d %d\n" % (d, i))
    return inos


def test_recomputes_only_the_directories_on_the_changed_paths(ws):
    dirs = _grid(ws, 40, 25)
    receipts = Receipts(ws)
    first = receipts.make()
    assert first["computed"]["full"] and first["computed"]["dirs"] == 41 and first["files"] == 1000
    write(ws, dirs[7], b"f003", b"changed")
    one = receipts.make()
    # the root (40 entries) and d007 (25 entries): not the 1,000 files
    assert one["computed"] == {**one["computed"], "base": first["seq"], "dirs": 2, "entries": 65, "full": None}
    assert one["root"] != first["root"] and one["root"] == receipts.compute()["root"]
    for d in (1, 2, 3):
        write(ws, dirs[d], b"new", b"x")
    ws.rename(dirs[4], b"f000", dirs[5], b"moved", 0, A)
    three = receipts.make()
    assert three["computed"]["dirs"] == 6 and three["computed"]["full"] is None
    assert three["root"] == receipts.compute()["root"] and three["files"] == 1003
    # a directory moved elsewhere keeps its hash: only its old and new parents are recomputed
    deep, _ = ws.mkdir(dirs[0], b"deep", 0o755, A)
    receipts.make()
    ws.rename(dirs[0], b"deep", dirs[9], b"deep", 0, A)
    moved = receipts.make()
    assert moved["computed"]["dirs"] == 3 and moved["root"] == receipts.compute()["root"]
    assert receipts.make() == moved                       # stored: nothing to compute
    assert receipts.get(moved["seq"]) == moved


def test_a_large_directory_reads_only_its_changed_names(ws, tmp_path):
    big, _ = ws.mkdir(ws.root, b"big", 0o755, A)
    for i in range(600):
        write(ws, big, b"f%04d" % i, b"%d" % i)
    sub, _ = ws.mkdir(big, b"sub", 0o755, A)
    write(ws, sub, b"deep", b"deep")
    receipts = Receipts(ws)
    first = receipts.make()
    assert first["computed"]["entries"] == 1 + 601 + 1
    write(ws, big, b"f0300", b"changed")
    one = receipts.make()
    assert (one["computed"]["dirs"], one["computed"]["entries"]) == (2, 2)   # root: "big"; big: "f0300"
    assert one["root"] == receipts.compute()["root"] and one["bytes"] == first["bytes"] - 3 + 7
    ws.unlink(big, b"f0000", A)                                      # the first name, a new last one,
    write(ws, big, b"zzz", b"last")                                  # one in the middle moved, one below
    ws.rename(big, b"f0400", big, b"f0400.moved", 0, A)
    write(ws, sub, b"deep", b"deeper")
    ws.setattr(ws.lookup(big, b"f0500")[0], A, mode=0o600)
    many = receipts.make()
    assert many["computed"]["dirs"] == 3 and many["computed"]["entries"] == 1 + 6 + 1
    fresh = receipts.compute()
    assert {k: many[k] for k in ("root", "files", "dirs", "others", "bytes")} == \
        {k: fresh[k] for k in ("root", "files", "dirs", "others", "bytes")}
    assert checkout_tree(os.fsencode(checkout(ws, tmp_path / "co")))["root"] == many["root"]


def test_past_points_and_verify(ws):
    dirs = _grid(ws, 5, 5)
    receipts = Receipts(ws)
    early = ws.head_seq
    write(ws, dirs[0], b"f000", b"later")
    late = receipts.make()
    middle = receipts.make(early)                 # made after a later one: from scratch
    write(ws, dirs[1], b"f001", b"again")
    write(ws, dirs[2], b"f002", b"and again")
    between = receipts.make(late["seq"] + 1)      # from the receipt before it
    head = receipts.make()
    for r in (middle, late, between, head):
        assert r["root"] == receipts.compute(r["seq"])["root"]
        assert receipts.verify(r["seq"])["ok"]
    assert between["computed"]["base"] == late["seq"] and head["computed"]["base"] == between["seq"]
    assert receipts.verify()["seq"] == head["seq"]
    with pytest.raises(NotFound):
        receipts.verify(early - 1)
    with pytest.raises(NotFound):
        receipts.make(ws.head_seq + 1)
    # a receipt that no longer matches the stored tree is reported, not accepted
    with ws.store.env.begin(write=True) as txn:
        key = schema.event_key(ws.id, late["seq"])
        forged = {**late, "root": "00" * 32}
        txn.put(key, json.dumps(forged).encode(), db=ws.store.dbs["receipts"])
    result = receipts.verify(late["seq"])
    assert not result["ok"] and result["recomputed"] == late["root"] and result["root"] == "00" * 32


def test_whole_tree_restore_and_hard_links_recompute_from_scratch(ws):
    dirs = _grid(ws, 3, 3)
    receipts = Receipts(ws)
    at = receipts.make()["seq"]
    write(ws, dirs[0], b"f000", b"changed")
    receipts.make()
    restore_tree(ws, at, A)
    restored = receipts.make()
    assert "whole-tree restore" in restored["computed"]["full"]
    assert restored["root"] == receipts.get(at)["root"]
    ino, _ = ws.lookup(dirs[1], b"f001")
    ws.link(ino, dirs[2], b"other-name", A)
    receipts.make()
    write(ws, dirs[1], b"f001", b"through one name")      # the other name's directory changes too
    linked = receipts.make()
    assert "more than one link" in linked["computed"]["full"]
    assert linked["root"] == receipts.compute()["root"]


def test_a_fork_covers_its_own_tree_from_its_parents_receipt(store, ws):
    dirs = _grid(ws, 10, 10)
    parent = Receipts(ws).make()
    store.fork("w", None, "f")
    fork = store.open_workspace("f", writable=True)
    assert Receipts(fork).make()["root"] == parent["root"]
    d3, _ = fork.lookup(fork.root, b"d003")
    write(fork, d3, b"f000", b"fork's own")
    mine = Receipts(fork).make()
    assert mine["computed"]["dirs"] == 2 and mine["computed"]["base"] == parent["seq"]
    assert mine["root"] == Receipts(fork).compute()["root"] != parent["root"]
    write(ws, dirs[3], b"f000", b"parent's own")          # the parent goes on: the fork does not see it
    assert Receipts(ws).make()["root"] != mine["root"]
    assert Receipts(fork).make() == mine


def test_a_format3_content_is_hashed_once_by_reading(ws, tmp_path, monkeypatch):
    ino = write_format3(ws, ws.root, b"sparse", b"tail", hole=4 << 20)    # format 3's "too sparse to hash"
    write_format3(ws, ws.root, b"dense", random.Random(3).randbytes(250_000))                  # keyed by its whole-file BLAKE3
    with ws.read_txn() as txn:
        attrs = ws.view().attrs(txn, ino)
        assert schema.content_header(txn.get(attrs.content, db=ws.dbs["contents"]), attrs.content)[2] is None
    receipts = Receipts(ws)
    first = receipts.make()
    assert first["root"] == checkout_tree(os.fsencode(checkout(ws, tmp_path / "co")))["root"]
    monkeypatch.setattr(Receipts, "_hash_by_reading", lambda self, c: pytest.fail("read an unchanged file"))
    write(ws, ws.root, b"neighbour", b"x")                # the root is recomputed, the sparse file not read
    second = receipts.make()
    assert second["root"] == receipts.compute()["root"] != first["root"]


def test_every_turn_end_stores_a_receipt(ws):
    log = TurnLog(ws.store)
    log.begin(ws, "planner", 1)
    write(ws, ws.root, b"plan.md", b"step 1\n")
    label, _record = log.end(ws)
    receipt = Receipts(ws).get(label["end_seq"])
    assert label["receipt"] == receipt["root"] == Receipts(ws).compute(label["end_seq"])["root"]
    log.begin(ws, "planner", 2)
    label2, _ = log.end(ws)                                # no events: the same tree, the same receipt
    assert label2["receipt"] == label["receipt"]
    with ws.read_txn() as txn:
        stored = json.loads(txn.get(schema.turn_key(ws.id, b"planner", 1), db=ws.dbs["turns"]))
    assert stored["receipt"] == receipt["root"]


def test_an_agents_turn_record_carries_its_receipt(store):
    ws = store.open_workspace("bot", writable=True, create=True)
    log = TurnLog(store)
    log.create_agent(ws, {"id": "bot", "last_turn": 0, "message_turns": 0}, {"version": 1, "state": {}},
                     {"kind": "create"})
    log.begin(ws, "bot", 1, "m1", record={"kind": "message"})
    write(ws, ws.root, b"out.txt", b"reply\n")
    label, record = log.end(ws, {"status": "completed", "reply": "done"})
    assert record["receipt"] == label["receipt"] == Receipts(ws).get(label["end_seq"])["root"]
    assert log.record("bot", 1)["receipt"] == label["receipt"]


NAMES = [b"a", b"b", b"c d", "é".encode(), b"x" * 40]
MODES = [0o644, 0o600, 0o755, 0o700, 0o4755]
DATA = [b"", b"one", b"two\n" * 3, bytes(range(256))]

_write = st.tuples(st.just("write"), st.integers(0, 99), st.sampled_from(NAMES), st.sampled_from(DATA))
ops = st.lists(st.one_of(
    _write, _write,
    st.tuples(st.just("mkdir"), st.integers(0, 99), st.sampled_from(NAMES)),
    st.tuples(st.just("remove"), st.integers(0, 99)),
    st.tuples(st.just("rename"), st.integers(0, 99), st.integers(0, 99), st.sampled_from(NAMES)),
    st.tuples(st.just("chmod"), st.integers(0, 99), st.sampled_from(MODES)),
    st.tuples(st.just("symlink"), st.integers(0, 99), st.sampled_from(NAMES)),
    st.tuples(st.just("link"), st.integers(0, 99), st.integers(0, 99), st.sampled_from(NAMES)),
    st.tuples(st.just("receipt")),
    st.tuples(st.just("past"), st.integers(0, 1000)),
), min_size=10, max_size=80)


def _nodes(ws: Workspace) -> list[tuple[int, bytes, int, int]]:
    """``(parent, name, ino, kind)`` of every node of the head tree, and the
    root as ``(0, b"", root, dir)``, each looked up from the root as the
    kernel does (so the workspace knows their paths, as the daemon does)."""
    out = [(0, b"", ws.root, KIND_DIR)]
    view = ws.view()
    with ws.read_txn() as txn:
        stack = [ws.root]
        while stack:
            parent = stack.pop()
            for name, ino, kind in view.entries(txn, parent):
                ws.lookup(parent, name, txn)
                out.append((parent, name, ino, kind))
                if kind == KIND_DIR:
                    stack.append(ino)
    return out


def _apply(ws: Workspace, receipts: Receipts, op: tuple) -> None:
    nodes = _nodes(ws)
    dirs = [n for n in nodes if n[3] == KIND_DIR]
    pick = lambda seq, i: seq[i % len(seq)]                # noqa: E731
    kind = op[0]
    if kind == "write":
        write(ws, pick(dirs, op[1])[2], op[2], op[3])
    elif kind == "mkdir":
        ws.mkdir(pick(dirs, op[1])[2], op[2], 0o755, A)
    elif kind == "remove":
        parent, name, _ino, node_kind = pick(nodes[1:] or nodes, op[1])
        if parent:
            (ws.rmdir if node_kind == KIND_DIR else ws.unlink)(parent, name, A)
    elif kind == "rename":
        parent, name, _ino, _k = pick(nodes[1:] or nodes, op[1])
        if parent:
            ws.rename(parent, name, pick(dirs, op[2])[2], op[3], 0, A)
    elif kind == "chmod":
        ws.setattr(pick(nodes, op[1])[2], A, mode=op[2])
    elif kind == "symlink":
        ws.symlink(pick(dirs, op[1])[2], op[2], b"../target", A)
    elif kind == "link":
        files = [n for n in nodes if n[3] != KIND_DIR]
        if files:
            ws.link(pick(files, op[1])[2], pick(dirs, op[2])[2], op[3], A)
    elif kind == "receipt":
        receipts.make()
    elif kind == "past":
        receipts.make(op[1] % (ws.head_seq + 1))


@pytest.mark.parametrize("listing_min", [0, receipts_mod.LISTING_MIN_ENTRIES])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(0, 1000), st.lists(st.sampled_from(range(len(NAMES))), max_size=6))
def test_incremental_equals_from_scratch_equals_a_checkout(listing_min, ops, fork_at, fork_writes):
    """With listings kept for every directory (0) and only for large ones (the default)."""
    saved, receipts_mod.LISTING_MIN_ENTRIES = receipts_mod.LISTING_MIN_ENTRIES, listing_min
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        try:
            ws = store.open_workspace("w", writable=True, create=True)
            receipts = Receipts(ws)
            receipts.make()
            for name in NAMES[:3]:                        # a seed tree two levels deep for the ops to change
                top, _ = ws.mkdir(ws.root, name, 0o755, A)
                below, _ = ws.mkdir(top, NAMES[3], 0o700, A)
                for parent in (top, below):
                    for other in NAMES[:2]:
                        write(ws, parent, other, name + other)
            for op in ops:
                try:
                    _apply(ws, receipts, op)
                except ChronicleError:
                    pass                                  # an operation the tree refuses (EEXIST, ENOTEMPTY, ...)
            head = receipts.make()
            assert head["root"] == receipts.compute()["root"]
            assert checkout_tree(os.fsencode(checkout(ws, Path(tmp) / "co")))["root"] == head["root"]
            with ws.read_txn() as txn, txn.cursor(db=store.dbs["receipts"]) as cur:
                stored = [json.loads(v) for k, v in cur if k[:4] == schema.ws_key(ws.id)]
            for r in stored:
                assert r["root"] == receipts.compute(r["seq"])["root"], r
            # A fork at a random seq: its receipts start from its parent's and cover its own tree.
            store.fork("w", fork_at % (ws.head_seq + 1), "f")
            fork = store.open_workspace("f", writable=True)
            forked = Receipts(fork)
            forked.make()
            for i in fork_writes:
                try:
                    _apply(fork, forked, ("write", i * 7, NAMES[i], DATA[i % len(DATA)]))
                except ChronicleError:
                    pass
            mine = forked.make()
            assert mine["root"] == forked.compute()["root"]
            assert checkout_tree(os.fsencode(checkout(fork, Path(tmp) / "fork-co")))["root"] == mine["root"]
        finally:
            store.close()
            receipts_mod.LISTING_MIN_ENTRIES = saved


def test_the_standalone_verifier(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"data")
    os.symlink("d/f", tmp_path / "l")
    tool = [sys.executable, str(REPO / "tools" / "receipt.py")]
    out = subprocess.run([*tool, str(tmp_path), "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result == {**checkout_tree(os.fsencode(tmp_path)), "files": 1, "dirs": 1, "others": 1, "bytes": 4}
    bad = subprocess.run([*tool, str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr
