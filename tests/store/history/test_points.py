"""Points in history (``chronicle.store.history.points``), no mount: every
point form, bad forms and future seqs, snapshots through fork layers, and
the ``--since/--until/--turn`` ranges of ``chronicle log``.

Turn records come from the turn log through ``Store.get_turn``; here that
call is stubbed with plain records, so these tests pin the contract points
rely on (``begin_seq``, ``end_seq``) and nothing of how the log stores them.
"""

from __future__ import annotations

import json

import pytest

from chronicle.errors import Exists, InvalidArgument, NotFound
from chronicle.store.history import points
from chronicle.store.history.points import TurnLabel
from storeutil import A




@pytest.fixture
def ws(store):
    """A workspace with 6 events: mkdir d, then chmods of d (seq 2..6)."""
    ws = store.open_workspace("w", writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    for n in range(5):
        ws.setattr(d, A, mode=0o700 + n)
    return ws


@pytest.fixture
def turns(store, monkeypatch):
    """``{(agent, n): record}`` that ``Store.get_turn`` answers from."""
    records: dict[tuple[str, int], dict] = {}
    monkeypatch.setattr(store, "get_turn", lambda ws, agent, n: records.get((agent, n)))
    return records


def time_of(ws, seq: int) -> str:
    with ws.read_txn() as txn:
        return ws.history.event(txn, seq)["time"]


# -- resolve_point ------------------------------------------------------------------------------


def test_a_seq_names_itself_up_to_the_head(ws):
    assert [points.resolve_point(ws, p) for p in ("0", "3", "6", 4)] == [0, 3, 6, 4]
    with pytest.raises(NotFound, match="does not exist yet"):
        points.resolve_point(ws, "7")
    for other_spelling in (" 6 ", "06", "+6", "٦", -1):       # one spelling per seq (issue 7 §9)
        with pytest.raises(InvalidArgument, match="not a seq"):
            points.resolve_point(ws, other_spelling)


def test_a_time_names_the_last_seq_at_or_before_it(ws):
    assert points.resolve_point(ws, time_of(ws, 4)) == 4
    assert points.resolve_point(ws, "2000-01-01T00:00:00Z") == 0
    assert points.resolve_point(ws, "2999-01-01T00:00:00Z") == ws.head_seq
    for bad in ("2024-13-45T00:00:00Z", "2024-01-01T99:00:00Z", "2024-01-01 garbage"):
        with pytest.raises(InvalidArgument):
            points.resolve_point(ws, bad)


def test_a_snapshot_names_its_seq_with_or_without_the_prefix(ws):
    assert points.put_snapshot(ws, "before", 3) == 3
    ws.snapshot("now")
    assert points.resolve_point(ws, "before") == 3
    assert points.resolve_point(ws, "snapshot:before") == 3
    assert points.resolve_point(ws, "snapshot:now") == ws.head_seq
    assert [(s["name"], s["seq"]) for s in points.snapshots(ws)] == [("before", 3), ("now", 6)]
    assert points.snapshot_seq(ws, "missing") is None
    with pytest.raises(NotFound):
        points.resolve_point(ws, "snapshot:missing")
    with pytest.raises(NotFound, match="no seq, time, snapshot or turn"):
        points.resolve_point(ws, "no-such-point")


def test_snapshot_names_are_checked_and_unique(ws):
    points.put_snapshot(ws, "s", 1)
    with pytest.raises(Exists):
        points.put_snapshot(ws, "s", 2)
    for bad in ("", ".", "..", "a/b", "nul\x00", "x" * 256, "\udcff"):
        with pytest.raises(InvalidArgument):
            points.put_snapshot(ws, bad, 1)
    points.put_snapshot(ws, "é" * 127, 1)       # 254 bytes of UTF-8


def test_a_turn_names_the_seq_at_its_end(ws, turns):
    turns[("bot", 1)] = {"turn": 1, "begin_seq": 2, "end_seq": 4}
    turns[("bot", 2)] = {"turn": 2, "begin_seq": 5, "end_seq": None}
    assert points.resolve_point(ws, "turn:bot:1") == 4
    with pytest.raises(NotFound, match="has not ended"):
        points.resolve_point(ws, "turn:bot:2")
    with pytest.raises(NotFound, match="no turn 9"):
        points.resolve_point(ws, "turn:bot:9")
    for bad in ("turn:bot", "turn:bot:x", "turn:a:b:1", "turn:"):
        with pytest.raises(InvalidArgument, match="turn:AGENT:N"):
            points.resolve_point(ws, bad)


def test_turn_labels_parse_with_or_without_the_prefix():
    assert points.parse_turn_label("planner:3") == TurnLabel("planner", 3)
    assert points.parse_turn_label("turn:planner:3") == TurnLabel("planner", 3)
    for bad in ("planner", "planner:x", ":3", "turn:", "", "planner:03"):
        with pytest.raises(InvalidArgument, match="AGENT:N"):
            points.parse_turn_label(bad)
    with pytest.raises(InvalidArgument, match="has a ':'"):     # turn:ns:agent:12 could not say where it ends
        points.parse_turn_label("ns:agent:12")


def test_a_fork_sees_its_parents_points_up_to_the_fork_seq(store, ws):
    points.put_snapshot(ws, "early", 2)
    store.fork("w", 4, "w2")
    points.put_snapshot(ws, "late", 5)
    fork = store.open_workspace("w2", writable=True)
    d, _ = fork.resolve(b"d")
    fork.setattr(d, A, mode=0o755)
    points.put_snapshot(fork, "mine", fork.head_seq)
    assert [s["name"] for s in points.snapshots(fork)] == ["early", "mine"]
    assert points.resolve_point(fork, "early") == 2
    assert points.resolve_point(fork, "mine") == 5 == fork.head_seq
    with pytest.raises(NotFound):
        points.resolve_point(fork, "late")
    # Times before the fork seq are the parent's events; after, the fork's own.
    assert points.resolve_point(fork, time_of(ws, 3)) == 3
    assert points.resolve_point(fork, time_of(fork, 5)) == 5
    assert points.resolve_point(ws, "6") == 6
    with pytest.raises(NotFound):
        points.resolve_point(fork, "6")


# -- ranges ---------------------------------------------------------------------------------------


def test_since_a_seq_or_an_exact_time_includes_it_and_a_snapshot_or_turn_does_not(ws, turns):
    points.put_snapshot(ws, "snap", 3)
    turns[("bot", 1)] = {"turn": 1, "begin_seq": 2, "end_seq": 4}
    assert points.since_seq(ws, "3") == 3
    assert points.since_seq(ws, time_of(ws, 3)) == 3
    assert points.since_seq(ws, "snap") == 4
    assert points.since_seq(ws, "snapshot:snap") == 4
    assert points.since_seq(ws, "turn:bot:1") == 5
    assert points.since_seq(ws, "2999-01-01T00:00:00Z") == ws.head_seq + 1


def test_seq_range_intersects_since_until_and_turn(ws, turns):
    turns[("bot", 1)] = {"turn": 1, "begin_seq": 2, "end_seq": 4}
    turns[("bot", 2)] = {"turn": 2, "begin_seq": 5, "end_seq": None}       # still open
    assert points.seq_range(ws) == (0, 6)
    assert points.seq_range(ws, since="2", until="5") == (2, 5)
    assert points.seq_range(ws, turn=TurnLabel("bot", 1)) == (2, 4)
    assert points.seq_range(ws, since="3", turn=TurnLabel("bot", 1)) == (3, 4)
    assert points.seq_range(ws, turn=TurnLabel("bot", 2)) == (5, 6)
    lo, hi = points.seq_range(ws, since="5", until="2")
    assert lo > hi                                                           # empty
    with pytest.raises(NotFound, match="in workspace 'w'"):
        points.seq_range(ws, turn=TurnLabel("bot", 9))
    with pytest.raises(NotFound):
        points.seq_range(ws, until="99")


def test_a_snapshot_resolves_and_lists_with_its_time(store, ws):
    points.put_snapshot(ws, "s", 2)
    assert points.resolve_point(ws, "s") == 2
    assert json.loads(json.dumps(points.snapshots(ws)))[0]["time"].endswith("Z")
