"""Fuzzing the control file (issue 7 §9): random command lines against a real
mount's ``.chronicle/ctl``.

Whatever a client writes — JSON objects with real and made-up commands and
fields of any type, other JSON values, or any bytes — every non-blank line
gets exactly one reply line, ``{"ok": true, ...}`` or ``{"ok": false, "error":
"<one line>"}`` and never an internal error; the daemon logs no WARNING, ERROR
or traceback (the ``daemon_log`` guard fails the test on any); and the mount
still serves afterwards. The workspace is ``bot``, whose agent exists, so turn
commands with records reach the turn log's checks too.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.history.turns import TurnLog
from chronicle.store.store import Store

pytestmark = pytest.mark.mount

AGENT = "bot"
COMMANDS = ["snapshot", "restore", "turn-begin", "turn-end", "turn-data", "sync", "receipt"]
FIELDS = ["cmd", "name", "path", "version", "at", "verify", "agent", "turn", "message_id", "record", "snapshot", "keep",
          "turn_data", "data", "status", "kind", "patch", "state", "entity_type"]
POINTS = ["1", "0", "01", " 1", "٣", "-1", "99999999999999999999999", "9999-12-31T23:59:59.999999Z",
          "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2026-13-45T99:00:00Z", "turn:bot:0",
          "turn:bot:99999999999999999999", "turn:a:b:1", "turn:" + "a" * 600 + ":1", "snapshot:s", "s", "12"]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("ctl is Chronicle's own")


@pytest.fixture
def bot(mount_factory, tmp_path):
    """A mount of workspace ``bot`` whose agent exists (turn 0), with a file ``f`` of two versions."""
    path = tmp_path / "store"
    with Store.init(path) as store:
        store.create_workspace(AGENT)
        ws = store.open_workspace(AGENT, writable=True)
        record = {"id": AGENT, "target": "m:C", "cwd": "/", "created": "t", "entity_type": None,
                  "state_version": 1, "parent": None, "last_turn": 0, "message_turns": 0, "history_from": 0,
                  "total_usage": {}, "last_turn_usage": {}, "status": "created"}
        TurnLog(store).create_agent(ws, record, {"version": 1, "entity_type": None, "state": {"n": 0}},
                                    {"kind": "create"})
        store.release_workspace(ws)
    mount = mount_factory(store=path, workspace=AGENT)
    (mount.path / "f").write_text("one\n")
    (mount.path / "f").write_text("two\n")
    return mount


class Ctl:
    """One read-write handle of ``ctl``: a line in, the replies that are ready out."""

    def __init__(self, mount):
        self.fd = os.open(mount.path / ".chronicle" / "ctl", os.O_RDWR)

    def __enter__(self) -> Ctl:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def exchange(self, line: bytes) -> list[dict]:
        view = memoryview(line + b"\n")
        while view:
            view = view[os.write(self.fd, view):]
        raw = b""
        while piece := os.read(self.fd, 1 << 20):
            raw += piece
        assert raw == b"" or raw.endswith(b"\n"), raw[-200:]
        return [json.loads(r) for r in raw.split(b"\n")[:-1]]


def check_replies(line: bytes, replies: list[dict]) -> None:
    """One reply per non-blank line; each is ok, or an error in one line that is no internal error."""
    assert len(replies) == (1 if line.strip() else 0), (line[:200], replies)
    for reply in replies:
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            error = reply.get("error")
            assert isinstance(error, str) and error and "\n" not in error, reply
            # the catch-all's reply starts so (fs/ctl.py); an error may echo the line's own words
            assert not error.startswith("internal error"), (line[:200], reply)


def still_serves(mount) -> None:
    probe = mount.path / "probe.txt"
    probe.write_text("alive\n")
    assert probe.read_text() == "alive\n"
    assert os.listdir(mount.path / ".chronicle" / "versions" / "probe.txt")
    with Ctl(mount) as ctl:
        assert ctl.exchange(b'{"cmd": "sync"}')[0]["ok"] is True


# -- strategies ---------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2, 2 ** 33), st.sampled_from([2 ** 32 - 1, 2 ** 32, 2 ** 64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.sampled_from(POINTS),
    st.sampled_from(["bot", "", "a:b", "a" * 300, "\x00", "f", "/f", "../f", ".chronicle/ctl", "completed", "message"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                                                                         inner, max_size=4)), max_leaves=12)


def _zone(d) -> str:
    return ["Z", "+14:00", "-12:00", "", ".5Z"][d.microsecond % 5]


_points = st.one_of(
    st.sampled_from(POINTS), st.integers(-2, 2 ** 70), st.text(max_size=20),
    st.one_of(st.datetimes(), st.datetimes(min_value=datetime(9999, 12, 31)),
              st.datetimes(max_value=datetime(1, 1, 1, 12))).map(lambda d: d.isoformat() + _zone(d)),
    st.builds(lambda a, n: f"turn:{a}:{n}", st.sampled_from(["bot", "a:b", "", "\udcff"]) | st.text(max_size=5),
              st.integers(-1, 2 ** 70).map(str) | st.sampled_from(["01", "٣", " 1", ""])))
_turns = st.integers(-1, 4) | st.sampled_from([2 ** 32 - 1, 2 ** 32, 2 ** 64]) | _scalars
_records = st.dictionaries(
    st.sampled_from(["kind", "status", "message", "reply", "patch", "usage", "error", "time", "duration_ms",
                     "messages", "begin_seq", "end_seq", "turn", "snapshot"]),
    st.sampled_from(["message", "completed", "failed", "cancelled", "interrupted", "running"]) | _values,
    max_size=5)
# The fields each real command reads, with values of the right type, the wrong type, or out of range.
SHAPES = {
    "snapshot": {"name": st.sampled_from(["s", "12", "turn:a:1", "2026-01-01T00:00:00Z", " 1", "", "a/b"])
                 | _scalars},
    "restore": {"at": _points, "path": st.sampled_from(["f", "/f", "nope", "", ".chronicle/log"]) | _scalars,
                "version": _turns},
    "turn-begin": {"agent": st.sampled_from([AGENT, "a:b", "", "a" * 300]) | _scalars, "turn": _turns,
                   "message_id": _scalars, "record": _records | _values},
    "turn-end": {"record": _records | _values, "snapshot": _values, "keep": _scalars},
    "turn-data": {"data": st.sampled_from(['{"record": {"kind": "message"}}', "{", "[]"]) | _scalars,
                  "turn_data": _turns},
    "sync": {},
}


@st.composite
def commands(draw) -> dict:
    """A JSON object that mostly looks like a command: a real ``cmd`` with some
    of its fields, of random values, and maybe fields it does not read."""
    name = draw(st.sampled_from(COMMANDS) | _scalars)
    command = {"cmd": name}
    shape = SHAPES.get(name, {}) if isinstance(name, str) else {}
    for field in draw(st.lists(st.sampled_from(sorted(shape)), unique=True)) if shape else []:
        command[field] = draw(shape[field])
    for field in draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=2, unique=True)):
        command.setdefault(field, draw(_values))
    return command


def _dump(value) -> bytes:
    return json.dumps(value).encode()        # NaN and Infinity as Python writes them, which json.loads reads


lines = st.one_of(
    commands().map(_dump),
    _values.map(_dump),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=100).map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")),
)

_FUZZ = settings(max_examples=400, deadline=None)


# -- the tests ----------------------------------------------------------------------------------


def test_every_ctl_line_gets_one_clean_reply(bot):
    @_FUZZ
    @given(line=lines)
    def fuzz(line):
        with Ctl(bot) as ctl:
            check_replies(line, ctl.exchange(line))

    fuzz()
    still_serves(bot)


def test_ctl_lines_in_one_handle_and_one_write(bot):
    """Several lines on one handle, sent in one write: a reply for each, in order."""
    @_FUZZ
    @given(batch=st.lists(lines, min_size=1, max_size=8))
    def fuzz(batch):
        with Ctl(bot) as ctl:
            replies = ctl.exchange(b"\n".join(batch))
        wanted = [line for line in batch if line.strip()]
        assert len(replies) == len(wanted), (batch, replies)
        for line, reply in zip(wanted, replies):
            check_replies(line, [reply])

    fuzz()
    still_serves(bot)


def test_the_mount_serves_after_the_fuzz(bot):
    """The bad input of the issue, then the mount still serves (the fuzz tests end the same way)."""
    with Ctl(bot) as ctl:
        for point in POINTS:
            line = _dump({"cmd": "restore", "at": point})
            check_replies(line, ctl.exchange(line))
        for name in ("12", "turn:a:1", "2026-01-01T00:00:00Z", " 1"):
            reply = ctl.exchange(_dump({"cmd": "snapshot", "name": name}))[0]
            assert reply["ok"] is False and "reads as a seq" in reply["error"], reply
        reply = ctl.exchange(_dump({"cmd": "turn-begin", "agent": "a:b", "turn": 1}))[0]
        assert reply["ok"] is False and "has a ':'" in reply["error"], reply
    still_serves(bot)
