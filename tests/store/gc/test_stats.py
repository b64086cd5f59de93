"""The cached retention figures of ``chronicle stats`` (``gc.stats``) against a real store."""

from __future__ import annotations

import time

import pytest

from chronicle.store.gc import collect, dryrun
from chronicle.store.gc import stats as gc_stats
from chronicle.store.gc.policy import Policy
from tests.storeutil import write

LATER = time.time_ns() + 400 * 86400 * 10**9


def test_figures_come_from_the_cache_and_say_how_fresh_they_are(store, ws):
    for i in range(3):
        write(ws, ws.root, b"f", bytes([i]) * 30_000)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    empty = gc_stats.figures(store, ws)
    assert empty["retention_as_of"] is None and empty["policy_would_drop_versions"] is None
    assert empty["last_gc"] is None
    fresh = gc_stats.refresh(store, ws, now_ns=LATER)
    assert fresh["retention_behind"] == 0 and fresh["retention_as_of_seq"] == ws.head_seq
    assert fresh["policy_would_drop_versions"] == 2 and fresh["policy_would_drop_logical_bytes"] == 60_000
    assert fresh["head_logical_bytes"] == fresh["history_logical_bytes"] == 30_000
    write(ws, ws.root, b"g", b"x" * 10)             # create and write: two events
    behind = gc_stats.figures(store, ws)
    assert behind["retention_behind"] == 2 and behind["policy_would_drop_versions"] == 2    # as cached
    with pytest.raises(TimeoutError):
        gc_stats.refresh(store, ws, deadline=time.monotonic() - 1)
    assert gc_stats.current(store, ws, deadline=time.monotonic() - 1)["retention_behind"] == 2   # the cache
    assert gc_stats.current(store, ws, deadline=time.monotonic() + 30)["retention_behind"] == 0


def test_gc_stores_what_it_left(store, ws):
    for i in range(4):
        write(ws, ws.root, b"f", bytes([i]) * 30_000)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    result = collect.collect(store, ["w"], now_ns=LATER)
    after = gc_stats.figures(store, ws)
    assert after["retention_behind"] == 0 and after["policy_would_drop_versions"] == 0
    assert after["history_versions"] == 1 and after["history_logical_bytes"] == after["head_logical_bytes"] == 30_000
    assert after["last_gc"]["pruned_versions"] == 3 == result["pruned_versions"]
    assert after["last_gc"]["duration_seconds"] == pytest.approx(sum(result["seconds"].values()), abs=0.01)
