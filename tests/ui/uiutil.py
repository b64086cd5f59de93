"""Helpers of the web timeline's tests: a store built through the store API, and ``chronicle ui`` servers.

- :func:`build_store` makes a store with workspace ``notes`` (three versions
  of ``notes/todo.md``, a snapshot ``planned``, a ``README.md``) and agent
  ``bot`` whose N turns each write ``log.txt`` and ``turn-K.txt`` (every
  ``files_every``-th turn) and patch its state, plus agent ``bot2``, a fork of
  ``bot`` at turn 2 — written as the mount daemon and the runtime write them
  (``TurnLog``), no mount, no worker.
- :class:`Servers` starts ``python -m chronicle ui --store STORE --port 0`` in
  subprocesses, reads each one's URL line, and stops them by PID (SIGTERM).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonpatch

from chronicle.store.history.turns import TurnLog
from chronicle.store.model import Actor
from chronicle.store.store import Store
from tools.storeapi import write_file

REPO = Path(__file__).resolve().parents[2]
A = Actor(uid=os.getuid(), gid=os.getgid(), pid=4242)


def write(ws, path: bytes, data: bytes) -> None:
    """create (or truncate) + write + close ``path`` (parents must exist), as ``open(..., "wb")`` does."""
    parent = ws.root
    *dirs, name = path.split(b"/")
    for d in dirs:
        parent = ws.lookup(parent, d)[0]
    write_file(ws, parent, name, data, A)


def agent_record(name: str, parent: dict | None = None) -> dict:
    return {"id": name, "target": "examples/none.py:Bot", "cwd": "/", "created": "2026-01-01T00:00:00Z",
            "entity_type": "bot", "state_version": 1, "parent": parent, "last_turn": 0, "message_turns": 0,
            "history_from": 0, "total_usage": {}, "last_turn_usage": {}, "status": "stopped"}


def message_turn(log: TurnLog, ws, n: int, patch: list, files: dict[bytes, bytes], snapshot: dict | None) -> None:
    """One completed message turn, as the runtime records it (a state snapshot when given)."""
    log.begin(ws, ws.name, n, f"m{n}", record={"kind": "message", "message": {"text": f"please do step {n}"}})
    for path, content in files.items():
        write(ws, path, content)
    log.end(ws, {"status": "completed", "patch": patch, "reply": f"did step {n}", "messages": [f"did step {n}"],
                 "usage": {"input_tokens": 10 * n, "output_tokens": n}}, snapshot=snapshot)


def build_store(path: Path, turns: int = 5, files_every: int = 1) -> Path:
    """The store of the module docstring at ``path``; returns ``path``."""
    store = Store.init(path)
    try:
        notes = store.open_workspace("notes", writable=True, create=True)
        notes.mkdir(notes.root, b"notes", 0o755, A)
        for text in (b"- [ ] write\n", b"- [x] write\n- [ ] test\n", b"- [x] write\n- [x] test\n- [ ] ship\n"):
            write(notes, b"notes/todo.md", text)
        notes.snapshot("planned")
        write(notes, b"README.md", b"# Notes\n\nA workspace of notes.\n")
        store.release_workspace(notes)

        log = TurnLog(store)
        store.create_workspace("bot")
        ws = store.open_workspace("bot", writable=True)
        log.create_agent(ws, agent_record("bot"), {"version": 1, "entity_type": "bot",
                                                  "state": {"count": 0, "done": [], "mood": "fresh"}},
                         {"kind": "create", "target": "examples/none.py:Bot"})
        lines = b""
        state = {"count": 0, "done": [], "mood": "fresh"}
        for n in range(1, turns + 1):
            lines += b"step %d\n" % n
            patch = [{"op": "replace", "path": "/count", "value": n}, {"op": "add", "path": "/done/-", "value": n}]
            if n == 3:
                patch.append({"op": "replace", "path": "/mood", "value": "busy"})
            files = {b"log.txt": lines, b"turn-%d.txt" % n: b"written by turn %d\n" % n} if n % files_every == 0 else {}
            jsonpatch.apply_patch(state, patch, in_place=True)
            snapshot = {"version": 1, "entity_type": "bot", "state": state} if n % 100 == 0 else None   # as the runtime
            message_turn(log, ws, n, patch, files, snapshot)
        store.release_workspace(ws)

        end = log.record("bot", 2)["end_seq"]
        store.fork("bot", end, "bot2")
        child = store.open_workspace("bot2", writable=True)
        record = agent_record("bot2", {"agent": "bot", "turn": 2})
        record.update(first_turn=2, last_turn=2)
        log.create_agent(child, record, {"version": 1, "entity_type": "bot", "state": log.state_at("bot", 2).state},
                         {"kind": "fork", "forked_from": {"agent": "bot", "turn": 2}})
        store.release_workspace(child)
    finally:
        store.close()
    return path


# -- the server ---------------------------------------------------------------------------------


class Servers:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PYTHONPATH=str(REPO), CHRONICLE_HOME=str(tmp_path / "home"))
        self.env.pop("CHRONICLE_DEBUG", None)
        self.argv = [sys.executable, "-m", "chronicle"]        # how the next server is started

    def __call__(self, store: Path, *extra: str, timeout: float = 60.0) -> tuple[str, subprocess.Popen]:
        proc = subprocess.Popen([*self.argv, "ui", "--store", str(store), "--port", "0", *extra], env=self.env,
                                cwd="/", stdout=subprocess.PIPE,
                                stderr=open(self.tmp / f"ui-{len(self.procs)}.log", "w"), text=True)
        self.procs.append(proc)
        self.argv = [sys.executable, "-m", "chronicle"]
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                break
            if proc.poll() is not None:
                break
        if " at http://" not in line:
            raise AssertionError(f"chronicle ui did not start: {line!r}; stderr: {self.logs()}")
        url = line.split(" at ", 1)[1].split(" ", 1)[0].rstrip("/")
        return url, proc

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("ui-*.log")))

    def stop(self) -> list[str]:
        """Stop every server started (SIGTERM by PID); the problems: one that would not stop, a
        traceback or an ERROR on a server's stderr. Safe to call twice."""
        problems = []
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    problems.append(f"chronicle ui (pid {proc.pid}) did not stop on SIGTERM")
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            if not proc.stdout.closed:
                proc.stdout.close()
        text = self.logs()
        problems += [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line]
        return problems


