"""The runtime's side of the ctl turn commands, against a real mount daemon
(no runtime, no worker): turn records travel with ``turn-begin``/``turn-end``
and the daemon, the workspace's writer, writes them with the label
(``chronicle.store.history.turns``, ``chronicle.fs.ctl``)."""

from __future__ import annotations

import json

import pytest

from chronicle.control import ControlChannel
from chronicle.errors import InvalidArgument

pytestmark = pytest.mark.mount


def test_turn_begin_and_end_carry_the_record_and_snapshot(agent_mount):
    mount, store, log = agent_mount
    with ControlChannel(mount.path) as ctl:
        ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1, "message_id": "m1",
                     "record": {"kind": "message", "message": {"text": "hi"}}})
        running = log.record("bot", 1)
        assert running["status"] == "running" and running["message"] == {"text": "hi"}
        (mount.path / "a.txt").write_text("in the turn\n")
        end = ctl.request({"cmd": "turn-end", "record": {"status": "completed", "reply": "done",
                                                         "patch": [{"op": "replace", "path": "/n", "value": 1}]},
                           "snapshot": {"version": 1, "entity_type": None, "state": {"n": 1}}})
    assert end["recorded"] is True and end["turn"]["end_seq"] == end["seq"]
    record = log.record("bot", 1)
    assert record["status"] == "completed" and record["snapshot"] is True
    assert (record["begin_seq"], record["end_seq"]) == (end["turn"]["begin_seq"], end["turn"]["end_seq"])
    assert {e["path"] for e in log.turn_events("bot", record)} == {"a.txt"}
    assert log.state_at("bot").snapshot_turn == 1 and log.state_at("bot").state == {"n": 1}


def test_fields_longer_than_a_line_go_ahead_as_turn_data(agent_mount):
    mount, _store, log = agent_mount
    text = json.dumps({"record": {"kind": "message", "message": {"text": "y" * (3 << 20)}}})
    pieces = [text[i:i + (1 << 18)] for i in range(0, len(text), 1 << 18)]
    with ControlChannel(mount.path) as ctl:
        for piece in pieces:
            ctl.request({"cmd": "turn-data", "data": piece})
        with pytest.raises(InvalidArgument, match="characters were sent ahead"):
            ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1, "turn_data": len(text) - 1})
        assert ctl.request({"cmd": "turn-data", "data": "{}"})["chars"] == 2    # (the pieces were used up)
        with pytest.raises(InvalidArgument, match="does not name it"):
            ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1})
        for piece in pieces:
            ctl.request({"cmd": "turn-data", "data": piece})
        ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1, "turn_data": len(text)})
        assert log.record("bot", 1)["message"]["text"] == "y" * (3 << 20)
        ctl.request({"cmd": "turn-end", "record": {"status": "cancelled"}})
    assert log.record("bot", 1)["status"] == "cancelled"


def test_a_refused_turn_end_changes_nothing(agent_mount):
    mount, store, log = agent_mount
    with ControlChannel(mount.path) as ctl:
        ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1, "record": {"kind": "message"}})
        for command in [{"keep": "yes"}, {"record": {"status": "running"}},
                        {"record": {"status": "completed", "patch": [1]}},
                        {"snapshot": {"version": 1, "state": {}}}]:             # (a snapshot without a record)
            with pytest.raises(InvalidArgument):
                ctl.request({"cmd": "turn-end", **command})
            assert log.record("bot", 1)["status"] == "running"
        ctl.request({"cmd": "turn-end"})                          # no outcome: the runtime lost the turn
        assert log.record("bot", 1)["status"] == "interrupted"
        # A label of another agent is only a label; a record for it is refused.
        ctl.request({"cmd": "turn-begin", "agent": "alice", "turn": 7})
        with pytest.raises(InvalidArgument, match="agent of the workspace"):
            ctl.request({"cmd": "turn-end", "record": {"status": "completed", "kind": "x"}})
        assert ctl.request({"cmd": "turn-end"})["recorded"] is False


def test_step_records_a_result_at_the_head_seq(agent_mount):
    mount, _store, log = agent_mount
    with ControlChannel(mount.path) as ctl:
        with pytest.raises(InvalidArgument, match="no turn is open"):
            ctl.request({"cmd": "step", "name": "s", "result": 1})
        ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 1, "record": {"kind": "message"}})
        (mount.path / "a.txt").write_text("before the step\n")
        first = ctl.request({"cmd": "step", "name": "fetch", "result": {"pages": [1, 2]}})
        with pytest.raises(InvalidArgument, match="step 'fetch' was already recorded in turn 1"):
            ctl.request({"cmd": "step", "name": "fetch", "result": 2})
        with pytest.raises(InvalidArgument, match="needs 'result'"):
            ctl.request({"cmd": "step", "name": "other"})
        with pytest.raises(InvalidArgument, match="needs 'name'"):
            ctl.request({"cmd": "step", "result": 1})
        running = log.record("bot", 1)
        assert [(s["name"], s["result"], s["seq"]) for s in running["steps"]] == [("fetch", {"pages": [1, 2]},
                                                                                  first["seq"])]
        assert first["seq"] >= running["begin_seq"]                  # the file's events are before the step
        ctl.request({"cmd": "turn-end", "record": {"status": "completed"}})
    assert [s["name"] for s in log.record("bot", 1)["steps"]] == ["fetch"]      # kept in the final record


def test_quiet_turn_commands_answer_only_when_they_fail(agent_mount):
    """``"quiet": true``: a turn command that succeeds queues no reply (the
    write returning says so); one that fails fails the write (EBADMSG) and its
    error reply is read — the replies of later commands stay in step."""
    mount, _store, log = agent_mount
    with ControlChannel(mount.path) as ctl:
        record = {"kind": "message", "message": {"text": "quiet"}}
        assert ctl.request_quiet({"cmd": "turn-begin", "agent": "bot", "turn": 1, "record": record}) is True
        assert log.record("bot", 1)["status"] == "running"
        with pytest.raises(InvalidArgument, match="still open"):       # fails: its reply is read and raised
            ctl.request_quiet({"cmd": "turn-begin", "agent": "bot", "turn": 2, "record": record})
        (mount.path / "q.txt").write_text("in the turn\n")
        assert ctl.request_quiet({"cmd": "step", "name": "s1", "result": [1]}) is True
        with pytest.raises(InvalidArgument, match="already recorded"):
            ctl.request_quiet({"cmd": "step", "name": "s1", "result": [2]})
        assert ctl.request({"cmd": "sync"})["seq"] >= 1                # no stale reply in between
        assert ctl.request_quiet({"cmd": "turn-end", "record": {"status": "completed"}}) is True
        final = log.record("bot", 1)
        assert final["status"] == "completed" and [s["name"] for s in final["steps"]] == ["s1"]
        with pytest.raises(InvalidArgument, match="no turn is open"):
            ctl.request_quiet({"cmd": "turn-end", "record": {"status": "completed"}})
        with pytest.raises(InvalidArgument, match="can be sent quiet"):
            ctl.request_quiet({"cmd": "sync"})
        # A line too long for one request is not sent quiet (the caller sends it as usual).
        assert ctl.request_quiet({"cmd": "turn-begin", "agent": "bot", "turn": 2,
                                  "record": {"kind": "message", "message": {"text": "x" * (70 << 10)}}}) is False
        assert log.record("bot", 2) is None
        # The same commands without "quiet" answer as before.
        assert "seq" in ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": 2, "record": record})
        assert ctl.request({"cmd": "turn-end", "record": {"status": "completed"}})["recorded"] is True
