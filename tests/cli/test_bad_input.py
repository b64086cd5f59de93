"""Bad input never reaches "internal error" (issue 7 §9): the CLI's argument
parsers, points (times, turns, numbers), snapshot, workspace and agent names,
and ``agent serve``'s request guard.

Every refusal is one clear line (``chronicle: error: ...`` or click's
``Error: ...``) with exit status 1 or 2, never ``internal error`` and never a
traceback. The last tests are hypothesis fuzz tests of the parsers: random
argument strings for log/show/diff/restore/fork/snapshot and the point
options, against a real store (no mount: ``tests/mount/test_ctl_fuzz.py``
fuzzes the mounted ``ctl`` protocol).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.cli import cli
from chronicle.errors import InvalidArgument
from chronicle.store.history import points
from chronicle.store.meta.journal import iso_time, parse_iso_time
from chronicle.store.model import Actor
from chronicle.store.store import Store

ACTOR = Actor(os.getuid(), os.getgid(), 4242)
REPO = Path(__file__).resolve().parents[2]

FAR_TIME = "9999-12-31T23:59:59.999999Z"            # the last microsecond iso_time can write
PAST_9999 = "9999-12-31T23:59:59-01:00"             # 10000-01-01T00:59:59Z
BEFORE_0001 = "0001-01-01T00:00:00+01:00"           # 0000-12-31T23:00:00Z


def write(ws, name: bytes, data: bytes) -> None:
    try:
        ino, _ = ws.lookup(ws.root, name)
        created = False
    except Exception:
        ino, _ = ws.create(ws.root, name, 0o100644, ACTOR)
        created = True
    ws.files.open(ino, created=created)
    ws.files.truncate(ino, 0)
    ws.files.write(ino, 0, data, ACTOR.pid)
    ws.files.commit(ino, ACTOR.pid)
    ws.files.release(ino)


@pytest.fixture
def store(tmp_path):
    """Workspace ``default``: f written three times (seqs 1-4), snapshot ``first`` at seq 2."""
    path = tmp_path / "store"
    st_ = Store.init(path)
    ws = st_.open_workspace("default", writable=True, create=True)
    write(ws, b"f", b"one\n")
    ws.snapshot("first")
    write(ws, b"f", b"two\n")
    write(ws, b"f", b"three\n")
    st_.close()
    return path


def invoke(runner, *args):
    return runner.invoke(cli, [str(a) for a in args])


def clean(result, codes=(0, 1, 2)):
    """No internal error, no traceback, a documented exit status; an error is
    one line (``chronicle: error: ...``, or click's usage text ending in ``Error: ...``)."""
    out = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "internal error" not in out and "Traceback" not in out, out
    assert result.exit_code in codes, (result.exit_code, out)
    if result.exit_code:
        err = result.stderr.strip()
        if err.startswith("chronicle: error: "):
            assert "\n" not in err, err
        else:                           # click's usage error (it quotes the argument, whatever it holds)
            assert err.startswith("Usage: ") and "\nError: " in err, err
    return result


def refused(runner, *args, code: int, match: str):
    result = clean(invoke(runner, *args), codes=(code,))
    assert re.search(match, result.stderr), result.stderr
    return result


# -- times ------------------------------------------------------------------------------------


def test_times_are_exact_and_stay_in_the_years_iso_time_can_write():
    assert parse_iso_time(FAR_TIME) == 253402300799999999000      # (a float timestamp rounded it up a second)
    assert iso_time(parse_iso_time(FAR_TIME)) == FAR_TIME
    assert iso_time(parse_iso_time("0999-01-01T00:00:00Z")) == "0999-01-01T00:00:00.000000Z"   # padded
    for bad in (PAST_9999, BEFORE_0001):
        with pytest.raises(ValueError, match="0001 to 9999"):
            parse_iso_time(bad)


def test_a_time_beyond_9999_is_a_clear_error_everywhere(runner, store):
    # The last microsecond of 9999 is a time like any other: after every event.
    assert clean(invoke(runner, "log", "--store", store, "--since", FAR_TIME)).stdout == ""
    assert len(clean(invoke(runner, "log", "--store", store, "--until", FAR_TIME)).stdout.splitlines()) == 4
    assert "Nothing to restore" in clean(invoke(runner, "restore", "--store", store, "--at", FAR_TIME)).stdout
    assert "at seq 4" in clean(invoke(runner, "fork", "--store", store, "--at", FAR_TIME, "far")).stdout
    # Past it, or before year 1 in UTC: refused in one line.
    for bad in (PAST_9999, BEFORE_0001):
        for args in (("log", "--since", bad), ("log", "--until", bad), ("restore", "--at", bad),
                     ("fork", "--at", bad, "x"), ("log", "f", "--since", bad)):
            refused(runner, *args, "--store", store, code=2, match="years 0001 to 9999 UTC")
    # A year before 1000 compares as a time (it used to be written "999-...", after "2026-...").
    assert clean(invoke(runner, "log", "--store", store, "--until", "0999-01-01T00:00:00Z")).stdout == ""


# -- turns and numbers ------------------------------------------------------------------------


def test_turn_labels_are_checked_before_any_lookup(runner, store):
    for label, match in [("a:99999999999999999999999", "at most 4294967295"),
                         ("a" * 600 + ":1", "1 to 255 bytes"),
                         ("a:b:1", "has a ':'"),
                         ("a:01", "plain decimal"), ("a:٣", "plain decimal"), ("a: 1", "plain decimal"),
                         ("\udcff:1", "valid Unicode")]:
        refused(runner, "log", "--store", store, "--turn", label, code=2, match=match)
        refused(runner, "log", "--store", store, "--since", "turn:" + label, code=2, match="turn:AGENT:N")
    with pytest.raises(InvalidArgument, match="has a ':'"):
        points.parse_turn_label("ns:agent:12")


def test_numbers_have_one_spelling(runner, store):
    for text in ("01", " 1", "1 ", "+1", "-1", "٣", "１"):
        assert points.parse_number(text) is None
        refused(runner, "log", "--store", store, "--since", text, code=2, match="not a seq")
    assert points.parse_number("0") == 0 and points.parse_number("17") == 17
    assert clean(invoke(runner, "show", "--store", store, "f@2")).stdout == "two\n"
    refused(runner, "show", "--store", store, "f@02", code=1, match="no history for 'f@02'")
    refused(runner, "show", "--store", store, "f@٢", code=1, match="no history for")


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["12", "0", "012", " 3", "٣", "+1", "turn:a:1", "snapshot:x",
                                  "2026-01-01T00:00:00Z", "2026-01-01"])
def test_a_snapshot_name_that_reads_as_another_point_is_refused(runner, store, name):
    refused(runner, "snapshot", "--store", store, name, code=2, match="reads as a seq, a turn, a time")
    assert clean(invoke(runner, "snapshots", "--store", store, "--json")).stdout.count('"name"') == 1


def test_ordinary_snapshot_names_still_work(runner, store):
    for name in ("v12", "before-refactor", "a 1", "x:1", "release 2026-01-01"):
        clean(invoke(runner, "snapshot", "--store", store, name), codes=(0,))
    assert clean(invoke(runner, "log", "--store", store, "--since", "first")).stdout.split()[0] == "3"


def test_an_empty_workspace_name_is_not_the_default(runner, store):
    for args in (("log",), ("show", "f"), ("snapshot", "x"), ("snapshots",), ("restore", "--at", "1"),
                 ("fork", "y"), ("stats",), ("diff", "f")):
        refused(runner, *args, "--store", store, "--workspace", "", code=2, match="invalid workspace name ''")
    assert clean(invoke(runner, "snapshots", "--store", store, "--json")).stdout.count('"name"') == 1


@pytest.mark.parametrize("args", [
    ("chat", "x:Y", "--id", ""), ("chat", "x:Y", "--id", "a:b"), ("chat", "x:Y", "--id", "a" * 600),
    ("turns", ""), ("turns", "\udcff"), ("show", "a" * 600, "1"), ("state", "a:b"), ("rollback", "", "--to", "1"),
    ("delete", "--yes", "\udcff"), ("cancel", ""), ("fork", "a", ""), ("fork", "", "b"), ("stale", "a:b"),
])
def test_an_agent_id_that_cannot_be_one_is_refused_before_any_lookup(runner, store, args):
    refused(runner, "agent", *args, "--store", store, code=2, match="invalid workspace name")


# -- agent serve: the request guard -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """One raw HTTP request; ``(status, body)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def serve(tmp_path):
    """``chronicle agent serve`` on an empty store: ``(port, stderr of the run)`` once stopped."""
    port = _free_port()
    err = open(tmp_path / "serve.err", "w+")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CHRONICLE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "chronicle", "agent", "serve", "--store", str(tmp_path / "st"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("Serving the agents of")
        yield port, lambda: (proc.send_signal(signal.SIGTERM), proc.wait(60), err.seek(0), err.read())[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def test_serve_refuses_bad_hosts_and_web_pages_with_json_and_logs_no_traceback(serve):
    port, stop = serve
    get = b"GET /agents HTTP/1.1\r\nConnection: close\r\n"
    assert _raw(port, get + b"Host: 127.0.0.1\r\n\r\n") == (200, b"[]")
    # HTTP/1.1 without Host: aiohttp's parser refuses it (its plain 400); once it logged a traceback.
    assert _raw(port, get + b"\r\n")[0] == 400
    assert _raw(port, b"GET /agents HTTP/1.1\r\n\r\n")[0] == 400
    assert _raw(port, b"\x16\x03\x01 not http at all\r\n\r\n")[0] == 400
    # HTTP/1.0 without Host: refused by the guard (it was let through).
    status, body = _raw(port, b"GET /agents HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(body) == {"error": "the request has no Host header", "kind": "BadRequest"}
    # Malformed Host headers: 400 (they were a 500 with a traceback each).
    for host in (b"a:b:c", b"127.0.0.1:99999", b"127.0.0.1:abc", b"[::1]:x", b"::1", b"[", b""):
        status, body = _raw(port, get + b"Host: " + host + b"\r\n\r\n")
        assert (status, json.loads(body)["kind"]) == (400, "BadRequest"), host
    for host in (b"[::1]:80", b"localhost", b"localhost:8765", b"127.0.0.1:"):
        assert _raw(port, get + b"Host: " + host + b"\r\n\r\n")[0] == 200, host
    for host in (b"example.com", b"example.com:8765", b"\xff", b"[2001:db8::1]"):
        status, body = _raw(port, get + b"Host: " + host + b"\r\n\r\n")
        assert (status, json.loads(body)["kind"]) == (403, "Forbidden"), host
    # A browser's cross-site or same-site request (no Origin on a GET): 403; its own or a typed URL: served.
    for site in (b"cross-site", b"same-site", b"Cross-Site"):
        status, body = _raw(port, get + b"Host: 127.0.0.1\r\nSec-Fetch-Site: " + site + b"\r\n\r\n")
        assert (status, json.loads(body)["kind"]) == (403, "Forbidden"), site
    for site in (b"none", b"same-origin"):
        assert _raw(port, get + b"Host: 127.0.0.1\r\nSec-Fetch-Site: " + site + b"\r\n\r\n")[0] == 200
    # Agent ids that cannot be one: 400 before any lookup (a long one was MDB_BAD_VALSIZE, a 500).
    for agent in ("a" * 600, "\udcff", "a:b", ""):
        body = json.dumps({"id": agent}).encode()
        head = b"POST /agents HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        status, reply = _raw(port, head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert (status, json.loads(reply)["kind"]) == (400, "UsageError"), agent
    log = stop()
    assert "Traceback" not in log and " ERROR " not in log and " WARNING " not in log, log


# -- fuzz: the argument parsers -------------------------------------------------------------------


def _zone(d) -> str:
    return ["Z", "+14:00", "-12:00", "", "+23:59"][d.microsecond % 5]


_digits = st.text("0123456789", min_size=1, max_size=25)
_numbers = st.one_of(_digits, st.integers(-10, 10**30).map(str),
                     st.sampled_from(["٣", "１", " 1", "+1", "0x1", "1e3"]))
_times = st.one_of(
    st.one_of(st.datetimes(), st.datetimes(min_value=datetime(9999, 12, 31)),
              st.datetimes(max_value=datetime(1, 1, 1, 12))).map(lambda d: d.isoformat() + _zone(d)),
    st.sampled_from([FAR_TIME, PAST_9999, BEFORE_0001, "0001-01-01T00:00:00Z", "2026-13-45T99:00:00Z",
                     "2026-01-01", "2026-01-01T00:00:00.123456789Z", "2026-W01", "9999-99-99"]))
_agents = st.one_of(st.text(max_size=12), st.sampled_from(["a", "a" * 300, "a:b", "\udcff", ""]))
_turns = st.builds(lambda a, n, p: p + a + ":" + n, _agents, _numbers, st.sampled_from(["", "turn:"]))
_points = st.one_of(_numbers, _times, _turns, st.text(max_size=20),
                    st.sampled_from(["first", "snapshot:first", "snapshot:", "turn:", ":", "@", ""]))
_words = st.one_of(_points, st.sampled_from(["f", "f@1", "f@01", "f@", "@1", "..", "../x", "/", "default", "--json"]))

_COMMANDS = {
    "log": [("--since", _points), ("--until", _points), ("--turn", _turns), ("--json", None), (None, _words)],
    "show": [(None, _words)],
    "diff": [(None, _words), (None, _numbers), (None, _numbers)],
    "restore": [("--at", _points), ("--version", _numbers), (None, _words)],
    "fork": [("--at", _points), (None, _words)],
    "snapshot": [(None, _words)],
    "snapshots": [("--json", None)],
    "receipt": [("--at", _points), ("--verify", None), ("--json", None)],
}


@st.composite
def _command_lines(draw):
    command = draw(st.sampled_from(sorted(_COMMANDS)))
    args = [command]
    for option, values in _COMMANDS[command]:
        if draw(st.booleans()):
            if option is not None:
                args.append(option)
            if values is not None:
                args.append(draw(values))
    if draw(st.booleans()):
        args += ["--workspace", draw(st.one_of(st.just("default"), _words))]
    return args


_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(args=_command_lines())
def test_fuzz_structured_command_lines(runner, store, args):
    clean(invoke(runner, *args, "--store", store))


@_FUZZ
@given(args=st.lists(st.one_of(_words, st.sampled_from(["--since", "--until", "--turn", "--at", "--version",
                                                         "--workspace", "-w", "--json"]), st.text(max_size=8)),
                     max_size=6),
       command=st.sampled_from(["log", "show", "diff", "restore", "fork", "snapshot", "snapshots", "receipt"]))
def test_fuzz_random_argument_strings(runner, store, command, args):
    clean(invoke(runner, command, *args, "--store", store))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(_points, _times, _turns, st.text()))
def test_fuzz_point_parsers_raise_only_their_errors(text):
    """The parsers under every front end: a value or InvalidArgument, nothing else."""
    for parse in (points.parse_turn_label, points.check_snapshot_name):
        try:
            parse(text)
        except InvalidArgument as exc:
            assert "\n" not in str(exc)
    number = points.parse_number(text)
    assert number is None or str(number) == text
    try:
        ns = parse_iso_time(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert parse_iso_time(iso_time(ns)) == ns          # exact to the microsecond, and writable
