"""The sweep's recorded chunk references (``gc_drops``): a gc stopped at any commit of its sweep leaves a store
fsck reports clean, whose refcounts count what is still owed, and the next gc frees the rest of what was promised."""

from __future__ import annotations

import random
import shutil

import pytest

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun, sweep
from chronicle.store.gc.policy import Policy
from chronicle.store.meta import schema
from chronicle.store.store import Store
from tests.storeutil import read, write
from tests.store.gc.test_gc_batches import LATER


class Stop(Exception):
    pass


def _build(path) -> dict[bytes, bytes]:
    """30 files, 3 versions each (40-90 KiB: several chunks; later versions share a prefix with the first)."""
    rng = random.Random(3)
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    head = {}
    for round_ in range(3):
        for i in range(30):
            name = b"f%02d" % i
            base = head.get(name, rng.randbytes(40_000))[:40_000]
            head[name] = base + rng.randbytes(rng.randint(1, 50_000)) if round_ else base
            write(ws, ws.root, name, head[name])
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    store.close()
    return head


def _small_batches(monkeypatch) -> None:
    monkeypatch.setattr(sweep, "_FIRST_BATCH", 4)
    monkeypatch.setattr(sweep, "next_batch_size", lambda size, n, seconds: 4)
    monkeypatch.setattr(sweep, "_GIVE_BACK_SECONDS", 0.0)
    monkeypatch.setattr(sweep, "_CLOCK_EVERY", 16)
    monkeypatch.setattr(sweep, "GIVE_BACK_EVERY", 60)         # pass 2 runs within pass 1 too


def _stop_at(k: int):
    """A progress callback raising after the sweep's ``k``-th commit (as a kill between two commits would)."""
    seen = [0]
    phases: list[str] = []

    def progress(phase: str, _done: int, _total: int) -> None:
        if phase.startswith("sweep"):
            seen[0] += 1
            phases.append(phase)
            if seen[0] == k:
                raise Stop

    return progress, seen, phases


def _owed(store) -> tuple[int, bool]:
    with store.env.begin() as txn:
        return txn.stat(store.dbs["gc_drops"])["entries"], txn.get(sweep.DROPS_DONE_KEY, db=store.dbs["meta"]) is not None


def _clean(store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("drops") / "s"
    return path, _build(path)


def test_sweep_stopped_at_every_commit_then_gc_again(template, tmp_path, monkeypatch):
    path, head = template
    _small_batches(monkeypatch)
    probe = tmp_path / "probe"
    shutil.copytree(path, probe)
    store = Store.open(probe)
    try:
        promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
        progress, seen, phases = _stop_at(0)
        whole = collect.collect(store, ["w"], now_ns=LATER, wait=0, progress=progress)
        assert _owed(store) == (0, False)
    finally:
        store.close()
    assert whole["freed_bytes"] == promised["freed_bytes"] > 0
    commits = seen[0]
    assert commits > 10                                  # pass 1, pass 2 and the records' deletion: several each
    assert "sweep" in phases[phases.index("sweep chunks"):]      # pass 2 ran within pass 1 too (GIVE_BACK_EVERY)
    states = set()
    for k in range(1, commits + 1):
        copy = tmp_path / f"k{k}"
        shutil.copytree(path, copy)
        store = Store.open(copy)
        try:
            with pytest.raises(Stop):
                collect.collect(store, ["w"], now_ns=LATER, wait=0, progress=_stop_at(k)[0])
            first = store.stats()
            records, marked = _owed(store)
            states.add((records > 0, marked))
            _clean(store)                                # refcounts count what is still owed
            again = dryrun.dry_run(store, ["w"], now_ns=LATER)
            result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
            assert result["freed_bytes"] == again["freed_bytes"]
            assert first["stored_bytes"] - result["freed_bytes"] == whole_stored_after(store)
            assert _owed(store) == (0, False)
            _clean(store)
            ws = store.open_workspace("w")
            for name, data in head.items():
                assert read(ws, name) == data
            assert dryrun.dry_run(store, ["w"], now_ns=LATER)["freed_bytes"] == 0
        finally:
            store.close()
        shutil.rmtree(copy)
    assert {(True, False), (True, True)} <= states       # stopped in pass 1 and in pass 2 both


def whole_stored_after(store) -> int:
    with store.env.begin() as txn:
        return schema.read_totals(txn, store.dbs["meta"])["stored_bytes"]


def test_a_damaged_drops_record_is_reported_by_fsck(store, ws):
    write(ws, ws.root, b"f", b"x" * 5000)
    with store.env.begin(write=True) as txn:
        txn.put(schema.U64.pack(1), b"\x01" + b"\x00" * 7, db=store.dbs["gc_drops"])
    report = fsck(store)
    assert any(p.kind == "gc-drops-corrupt" for p in report.problems)
