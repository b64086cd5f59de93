"""The turn log at store level (``chronicle.store.history.turns``): no mount, no worker.

Turn labels, turn records and their statuses, state snapshots and the state at
turn N, fork layers, ``turn:AGENT:N`` points, and who may write: these call
``TurnLog`` as the mount daemon's ``ctl`` turn commands and the runtime do.
"""

from __future__ import annotations

import jsonpatch
import pytest

from chronicle.errors import AgentExists, AgentNotFound, Corrupt, InvalidArgument, NotFound, ReadOnly
from chronicle.store.history.turns import DAEMON_STOPPED, RUNTIME_STOPPED, TurnLog
from chronicle.store.history import points
from chronicle.store.store import Store
from storeutil import write




@pytest.fixture
def log(store):
    return TurnLog(store)



def new_agent(store, log, name="bot", state=None) -> object:
    """A workspace and its agent with turn 0, as ``Runtime.create`` makes them; the
    workspace open for writing (as the mount daemon holds it)."""
    store.create_workspace(name)
    ws = store.open_workspace(name, writable=True)
    record = {"id": name, "target": "m:C", "cwd": "/", "created": "t", "entity_type": "e", "state_version": 1,
              "parent": None, "last_turn": 0, "message_turns": 0, "history_from": 0, "total_usage": {},
              "last_turn_usage": {}, "status": "created"}
    log.create_agent(ws, record, {"version": 1, "entity_type": "e", "state": state or {"n": 0, "notes": []}},
                     {"kind": "create", "target": "m:C"})
    return ws


def message_turn(log, ws, patch, *, status="completed", files=(), snapshot=None, usage=None):
    """One message turn: begin with the running record, write ``files``, end with the outcome."""
    n = log.get(ws.name)["last_turn"] + 1
    log.begin(ws, ws.name, n, f"m{n}", record={"kind": "message", "message": {"text": f"hi {n}"}})
    assert log.record(ws.name, n)["status"] == "running"
    for name in files:
        write(ws, ws.root, name, b"turn %d\n" % n)
    return log.end(ws, {"status": status, "patch": patch, "reply": f"done {n}", "messages": [f"done {n}"],
                        "usage": usage or {}}, snapshot=snapshot)


# -- labels ------------------------------------------------------------------------------


def test_a_label_brackets_the_events_of_its_turn(store, log):
    ws = store.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"before", b"x")
    label = log.begin(ws, "alice", 1, "msg-1")
    assert label["begin_seq"] == ws.head_seq + 1 and label["end_seq"] is None
    assert ws.turn == {"agent": "alice", "turn": 1, "message_id": "msg-1"}
    write(ws, ws.root, b"in", b"y")
    with pytest.raises(InvalidArgument, match="still open"):
        log.begin(ws, "alice", 2)
    ended, record = log.end(ws)
    assert record is None                                   # alice is no agent of this store: a label only
    assert ws.turn is None and ended["end_seq"] == ws.head_seq and ended["begin_seq"] == label["begin_seq"]
    assert store.get_turn(ws, "alice", 1) == ended
    assert [x["turn"] for x in store.turns(ws, "alice")] == [1]
    with pytest.raises(InvalidArgument, match="no turn is open"):
        log.end(ws)
    assert points.resolve_point(ws, "turn:alice:1") == ended["end_seq"]


@pytest.mark.parametrize("agent, turn", [("", 1), ("a\x00b", 1), ("a" * 256, 1), ("\ud800", 1), ("a", -1),
                                         ("a", 2 ** 32), ("a", True), (7, 1)])
def test_a_bad_label_is_refused_and_labels_nothing(store, log, agent, turn):
    ws = store.open_workspace("w", writable=True, create=True)
    with pytest.raises(InvalidArgument):
        log.begin(ws, agent, turn)
    assert ws.turn is None and store.turns(ws) == []


def test_only_the_workspace_writer_writes_the_turn_log(store, log):
    new_agent(store, log)
    store.release_workspace(store.open_workspace("bot"))
    reader = store.open_workspace("bot")                     # not the writer
    with pytest.raises(ReadOnly):
        log.begin(reader, "bot", 1)
    with pytest.raises(ReadOnly):
        log.close_interrupted(reader)
    assert store.turns(reader) == [log.label(reader, "bot", 0)]   # everyone reads


def test_a_label_left_open_by_a_crash_is_ended_as_interrupted(tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    TurnLog(st).begin(ws, "bot", 1, "m1")
    write(ws, ws.root, b"during", b"turn")
    st.close()                          # the daemon died before turn-end
    with Store.open(path) as st:
        ws = st.open_workspace("w", writable=True)
        assert TurnLog(st).close_interrupted(ws) == 1
        label = st.get_turn(ws, "bot", 1)
        assert label["interrupted"] is True and label["end_seq"] == ws.head_seq
        assert points.resolve_point(ws, "turn:bot:1") == ws.head_seq
        assert TurnLog(st).close_interrupted(ws) == 0


# -- records and their statuses --------------------------------------------------------------


def test_turn_zero_is_the_origin_label_record_and_snapshot(store, log):
    ws = new_agent(store, log)
    info = log.get("bot")
    assert info["last_turn"] == 0 and info["message_turns"] == 0
    zero = log.record("bot", 0)
    assert zero["kind"] == "create" and zero["status"] == "completed" and zero["snapshot"] is True
    assert (zero["begin_seq"], zero["end_seq"]) == (1, 0)
    assert store.get_turn(ws, "bot", 0)["end_seq"] == 0
    assert log.state_at("bot").state == {"n": 0, "notes": []}
    with pytest.raises(AgentExists):
        log.create_agent(ws, {**info}, {"version": 1, "state": {}}, {"kind": "create"})


def test_a_record_goes_from_running_to_its_final_status_only(store, log):
    ws = new_agent(store, log)
    label, record = message_turn(log, ws, [{"op": "replace", "path": "/n", "value": 1}], files=[b"a.txt"],
                                 usage={"tokens": 5})
    assert record["status"] == "completed" and record["reply"] == "done 1" and record["message_id"] == "m1"
    assert (record["begin_seq"], record["end_seq"]) == (label["begin_seq"], label["end_seq"])
    assert record["end_seq"] - record["begin_seq"] + 1 == 2                 # create + write of a.txt
    assert log.record("bot", 1) == record
    info = log.get("bot")
    assert info["last_turn"] == 1 and info["message_turns"] == 1
    assert info["total_usage"] == {"tokens": 5} and info["last_turn_usage"] == {"tokens": 5}
    events = log.turn_events("bot", record)
    assert [e["path"] for e in events] == ["a.txt", "a.txt"]
    assert all(e["turn"] == {"agent": "bot", "turn": 1, "message_id": "m1"} for e in events)
    # A final record is history: it is never written again.
    with pytest.raises(InvalidArgument, match="not its next turn"):
        log.begin(ws, "bot", 1, None, record={"kind": "message"})
    assert ws.turn is None and log.record("bot", 1) == record


def test_a_turn_that_is_not_completed_changes_no_state(store, log):
    ws = new_agent(store, log)
    for status in ("failed", "cancelled", "interrupted"):
        _label, record = message_turn(log, ws, [{"op": "replace", "path": "/n", "value": 9}], status=status)
        assert record["status"] == status and record["patch"] == []
    assert log.state_at("bot").state["n"] == 0
    assert log.get("bot")["message_turns"] == 3
    log.begin(ws, "bot", 4, None, record={"kind": "message"})
    with pytest.raises(InvalidArgument, match="a turn ends"):
        log.end(ws, {"status": "running"})
    log.end(ws, {"status": "completed"})


def test_records_are_checked_before_anything_changes(store, log):
    ws = new_agent(store, log)
    with pytest.raises(InvalidArgument, match="not its next turn"):
        log.begin(ws, "bot", 5, None, record={"kind": "message"})
    with pytest.raises(InvalidArgument, match="kind"):
        log.begin(ws, "bot", 1, None, record={"message": {}})
    with pytest.raises(InvalidArgument, match="agent of the workspace"):
        log.begin(ws, "other", 1, None, record={"kind": "message"})
    with pytest.raises(InvalidArgument, match="RFC 6902"):
        log.begin(ws, "bot", 1, None, record={"kind": "message", "patch": ["nope"]})
    assert ws.turn is None and store.turns(ws, "bot") == [store.get_turn(ws, "bot", 0)]
    plain = store.open_workspace("plain", writable=True, create=True)
    with pytest.raises(AgentNotFound):
        log.begin(plain, "plain", 1, None, record={"kind": "message"})
    log.begin(ws, "bot", 1, None, record={"kind": "message"})
    with pytest.raises(InvalidArgument, match="snapshot"):
        log.end(ws, {"status": "completed"}, snapshot={"state": {}})      # no version
    assert ws.turn is not None                                          # nothing changed: still open
    log.end(ws, {"status": "completed"})


def test_a_turn_that_began_without_a_record_is_kept_only_if_it_changed_something(store, log):
    ws = new_agent(store, log)
    hook = {"kind": "idle", "status": "completed", "patch": []}
    log.begin(ws, "bot", 1)
    assert log.end(ws, hook)[1] is None and log.get("bot")["last_turn"] == 0       # number 1 is free again
    log.begin(ws, "bot", 1)
    assert log.end(ws, hook, keep=True)[1]["kind"] == "idle"
    log.begin(ws, "bot", 2)
    write(ws, ws.root, b"hook.txt", b"x")
    assert log.end(ws, hook)[1]["end_seq"] == ws.head_seq                         # files changed
    log.begin(ws, "bot", 3)
    assert log.end(ws, {**hook, "patch": [{"op": "add", "path": "/x", "value": 1}]})[1]["patch"]
    log.begin(ws, "bot", 4)
    assert log.end(ws, {**hook, "status": "failed", "error": "boom"})[1]["status"] == "failed"
    assert [r["kind"] for r in log.records("bot")] == ["create", "idle", "idle", "idle", "idle"]
    assert log.get("bot")["message_turns"] == 0 and log.state_at("bot").state["x"] == 1


def test_a_running_record_whose_runtime_is_gone_is_interrupted(store, log):
    ws = new_agent(store, log)
    log.begin(ws, "bot", 1, "m1", record={"kind": "message", "message": {"text": "hi"}})
    label, record = log.end(ws)                     # a new runtime ends the label it found open
    assert record["status"] == "interrupted" and record["error"] == RUNTIME_STOPPED
    assert record["end_seq"] == label["end_seq"]


def test_a_running_record_whose_daemon_died_is_interrupted_at_the_next_start(tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = new_agent(st, TurnLog(st))
    TurnLog(st).begin(ws, "bot", 1, "m1", record={"kind": "message"})
    write(ws, ws.root, b"half", b"done")
    st.close()
    with Store.open(path) as st:
        log = TurnLog(st)
        ws = st.open_workspace("bot", writable=True)
        assert log.close_interrupted(ws) == 1
        record = log.record("bot", 1)
        assert record["status"] == "interrupted" and record["error"] == DAEMON_STOPPED
        assert record["end_seq"] == ws.head_seq and record["patch"] == []
        assert log.state_at("bot").turn == 1


# -- state at turn N -------------------------------------------------------------------------


def test_the_state_at_turn_n_is_a_snapshot_and_the_patches_after_it(store, log):
    ws = new_agent(store, log)
    state = {"n": 0, "notes": []}
    states = [jsonpatch.apply_patch(state, [])]
    for n in range(1, 8):
        patch = [{"op": "replace", "path": "/n", "value": n}, {"op": "add", "path": "/notes/-", "value": f"t{n}"}]
        state = jsonpatch.apply_patch(state, patch)
        status = "failed" if n == 5 else "completed"
        if status == "failed":
            state = states[-1]
        snapshot = {"version": 1, "entity_type": "e", "state": state} if n == 4 else None
        _label, record = message_turn(log, ws, patch, status=status, snapshot=snapshot)
        assert record["snapshot"] is (n == 4)
        states.append(state)
    for n in range(8):
        at = log.state_at("bot", n)
        assert at.state == states[n] and at.version == 1 and at.entity_type == "e"
        assert at.snapshot_turn == (4 if n >= 4 else 0)
    assert log.state_at("bot").patches == 2                 # turns 6 and 7 (5 failed) on snapshot 4
    with pytest.raises(NotFound):
        log.state_at("bot", 8)
    with pytest.raises(AgentNotFound):
        log.state_at("nobody")


def test_a_patch_that_does_not_apply_is_corrupt(store, log):
    ws = new_agent(store, log)
    message_turn(log, ws, [{"op": "remove", "path": "/missing"}])
    with pytest.raises(Corrupt, match="cannot be replayed at turn 1"):
        log.state_at("bot")


# -- forks and points ------------------------------------------------------------------------


def test_a_fork_sees_its_parents_turns_up_to_the_fork_seq(store, log):
    parent = new_agent(store, log, "a")
    message_turn(log, parent, [], files=[b"one"])
    fork_seq = parent.head_seq
    log.begin(parent, "a", 2, None, record={"kind": "message"})     # open at the fork: not the fork's
    write(parent, parent.root, b"two", b"2")
    store.fork("a", fork_seq, "b")
    log.end(parent, {"status": "completed"})
    message_turn(log, parent, [], files=[b"three"])
    child = store.open_workspace("b", writable=True)
    assert [(x["agent"], x["turn"]) for x in store.turns(child)] == [("a", 0), ("a", 1)]
    assert store.get_turn(child, "a", 1) == store.get_turn(parent, "a", 1)
    assert store.get_turn(child, "a", 2) is None and store.get_turn(parent, "a", 2) is not None
    assert points.resolve_point(child, "turn:a:1") == fork_seq
    with pytest.raises(NotFound):
        points.resolve_point(child, "turn:a:2")
    # The fork's own agent starts its own log at the fork seq.
    info = {**log.get("a"), "id": "b", "parent": {"agent": "a", "turn": 1}, "last_turn": 0, "message_turns": 0}
    log.create_agent(child, info, {"version": 1, "state": log.state_at("a", 1).state},
                     {"kind": "fork", "forked_from": {"agent": "a", "turn": 1}})
    zero = log.record("b", 0)
    assert zero["kind"] == "fork" and (zero["begin_seq"], zero["end_seq"]) == (fork_seq + 1, fork_seq)
    message_turn(log, child, [], files=[b"mine"])
    assert [(x["agent"], x["turn"]) for x in store.turns(child)] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [x["turn"] for x in store.turns(parent, "a")] == [0, 1, 2, 3]


def test_turn_points(store, log):
    ws = new_agent(store, log)
    label, _ = message_turn(log, ws, [], files=[b"x"])
    assert points.resolve_point(ws, "turn:bot:1") == label["end_seq"]
    log.begin(ws, "bot", 2, None, record={"kind": "message"})
    with pytest.raises(NotFound, match="has not ended"):
        points.resolve_point(ws, "turn:bot:2")
    log.end(ws, {"status": "completed"})
    for bad in ("turn:bot", "turn:bot:x", "turn:bot:1:2"):
        with pytest.raises(InvalidArgument):
            points.resolve_point(ws, bad)
    with pytest.raises(NotFound):
        points.resolve_point(ws, "turn:bot:99")
    with pytest.raises(NotFound):
        points.resolve_point(ws, "turn:nobody:1")


def test_deleting_an_agent_drops_its_records_and_a_new_one_starts_clean(store, log):
    ws = new_agent(store, log)
    message_turn(log, ws, [{"op": "replace", "path": "/n", "value": 3}])
    store.release_workspace(ws)
    store.delete_workspace("bot")
    log.delete_agent("bot")
    with pytest.raises(AgentNotFound):
        log.get("bot")
    assert list(log.records("bot")) == []
    ws = new_agent(store, log)
    assert [r["turn"] for r in log.records("bot")] == [0] and log.state_at("bot").state["n"] == 0
    assert store.turns(ws) == [store.get_turn(ws, "bot", 0)]


def test_a_fork_numbers_on_from_its_fork_turn(store, log):
    ws = new_agent(store, log, "a")
    for n in (1, 2, 3):
        message_turn(log, ws, [{"op": "replace", "path": "/n", "value": n}])
    fork_seq = log.record("a", 2)["end_seq"]
    store.release_workspace(ws)
    store.fork("a", fork_seq, "b")
    child = store.open_workspace("b", writable=True)
    info = {**log.get("a"), "id": "b", "parent": {"agent": "a", "turn": 2}, "first_turn": 2, "last_turn": 2,
            "message_turns": 0}
    log.create_agent(child, info, {"version": 1, "state": log.state_at("a", 2).state},
                     {"kind": "fork", "forked_from": {"agent": "a", "turn": 2}})
    assert log.record("b", 2)["kind"] == "fork" and log.record("b", 0) is None
    assert points.resolve_point(child, "turn:b:2") == fork_seq
    label, _ = message_turn(log, child, [{"op": "replace", "path": "/n", "value": 30}])
    assert label["turn"] == 3
    assert [(owner, r["turn"]) for owner, r in log.lineage("b")] == [("a", 0), ("a", 1), ("b", 2), ("b", 3)]
    assert log.lineage_record("b", 1) == ("a", log.record("a", 1))
    assert log.state_at("b", 1).state == log.state_at("a", 1).state and log.state_at("b").state["n"] == 30


def test_steps_are_kept_in_the_running_record(store, log):
    ws = new_agent(store, log)
    with pytest.raises(InvalidArgument, match="no turn is open"):
        log.step(ws, "s", 1)
    log.begin(ws, "bot", 1, None)                           # a label without a record: no step
    with pytest.raises(InvalidArgument, match="no running record"):
        log.step(ws, "s", 1)
    log.end(ws)
    log.begin(ws, "bot", 1, "m", record={"kind": "message"})
    write(ws, ws.root, b"f", b"x")
    step = log.step(ws, "fetch", [1, "two"])
    assert step["seq"] == ws.head_seq and step["result"] == [1, "two"]
    for bad in ("", "a\x00b", "x" * 1025, 7):
        with pytest.raises(InvalidArgument, match="step name"):
            log.step(ws, bad, 1)
    with pytest.raises(InvalidArgument, match="already recorded"):
        log.step(ws, "fetch", 2)
    log.end(ws, {"status": "completed"})
    assert [s["name"] for s in log.record("bot", 1)["steps"]] == ["fetch"]
    with pytest.raises(InvalidArgument):
        log.step(ws, "late", 1)


def test_steps_have_their_own_keys_and_the_final_record_holds_them(store, log):
    """A step is one new key (``agent_steps``): the ``running`` record is not
    rewritten however many steps the turn has; readers see them in ``steps``;
    the turn's end moves them into its record and drops the keys."""
    ws = new_agent(store, log)
    log.begin(ws, "bot", 1, "m", record={"kind": "message", "message": {"text": "x" * 1000}})

    def running_raw():
        with store.env.begin() as txn:
            return bytes(txn.get(b"bot\x00" + (1).to_bytes(4, "big"), db=store.dbs["agent_turns"]))

    def step_keys():
        with store.env.begin() as txn:
            return [bytes(k) for k, _ in txn.cursor(db=store.dbs["agent_steps"])]

    before = running_raw()
    for i in range(50):
        log.step(ws, f"s{i}", {"i": i})
    assert running_raw() == before                           # never rewritten
    assert step_keys() == [b"bot\x00" + (1).to_bytes(4, "big") + i.to_bytes(4, "big") for i in range(50)]
    running = log.record("bot", 1)
    assert running["status"] == "running" and [s["result"]["i"] for s in running["steps"]] == list(range(50))
    assert [s["name"] for s in list(log.records("bot"))[-1]["steps"]] == [f"s{i}" for i in range(50)]
    # Another writer's TurnLog (another ctl handle) adds a step: names stay unique across both.
    other = TurnLog(store)
    other.step(ws, "from-other", 1)
    with pytest.raises(InvalidArgument, match="already recorded"):
        log.step(ws, "from-other", 2)
    with pytest.raises(InvalidArgument, match="already recorded"):
        other.step(ws, "s3", 2)
    log.step(ws, "last", 3)
    _, record = log.end(ws, {"status": "completed"})
    names = [f"s{i}" for i in range(50)] + ["from-other", "last"]
    assert [s["name"] for s in record["steps"]] == names
    assert [s["name"] for s in log.record("bot", 1)["steps"]] == names
    assert step_keys() == []
    # The next turn starts with no steps, and its names may repeat the last turn's.
    log.begin(ws, "bot", 2, "m2", record={"kind": "message"})
    assert "steps" not in log.record("bot", 2)
    log.step(ws, "s0", 0)
    assert [s["name"] for s in log.record("bot", 2)["steps"]] == ["s0"]
