"""GC's batches are gathered in a read transaction and applied in a write one: a commit in between is seen."""

from __future__ import annotations

import os
import time

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun, prune, sweep
from chronicle.store.gc.policy import Policy
from tests.storeutil import history, read, write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _clean(store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def _between(monkeypatch, module, commit) -> list[int]:
    """Make ``commit()`` run once between ``module._gather`` and the write transaction after it."""
    calls: list[int] = []
    gather = module._gather

    def gather_then_commit(*args, **kwargs):
        work = gather(*args, **kwargs)
        if not calls:
            commit()
        calls.append(1)
        return work

    monkeypatch.setattr(module, "_gather", gather_then_commit)
    return calls


def test_a_commit_between_gather_and_apply_prunes_as_if_none_came(store, ws, monkeypatch):
    datas = [os.urandom(3000) for _ in range(6)]
    for data in datas:
        write(ws, ws.root, b"f", data)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    checked_in = []
    prune_in = prune._prune_in
    monkeypatch.setattr(prune, "_prune_in", lambda *a, **k: checked_in.append(1) or prune_in(*a, **k))
    calls = _between(monkeypatch, prune, lambda: write(ws, ws.root, b"g", b"written meanwhile"))
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert calls and checked_in                       # the batch was checked again in the write transaction
    assert result["pruned_versions"] == 5
    assert result["freed_contents"] == promised["freed_contents"] == 5
    assert [v.get("pruned", False) for v in history(ws, b"f")] == [True] * 5 + [False]
    assert read(ws, b"f") == datas[-1] and read(ws, b"g") == b"written meanwhile"
    _clean(store)


def test_a_content_used_again_between_gather_and_apply_is_not_swept(store, ws, monkeypatch):
    datas = [os.urandom(3000) for _ in range(3)]
    for data in datas:
        write(ws, ws.root, b"f", data)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    # the sweep's batch counts datas[0]'s content as garbage; a commit then uses it again
    calls = _between(monkeypatch, sweep, lambda: write(ws, ws.root, b"g", datas[0]))
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert calls
    assert result["pruned_versions"] == 2
    assert result["freed_contents"] == 1              # datas[1]'s; datas[0]'s is g's now
    assert read(ws, b"g") == datas[0] and read(ws, b"f") == datas[2]
    _clean(store)
