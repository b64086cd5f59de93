"""The control channel ``.chronicle/ctl`` (SPEC §4).

Protocol: open the file read-write, write one JSON object per line, read one
JSON reply line per command on the same handle: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Commands:

=================================================================  ==========================================
command                                                            does
=================================================================  ==========================================
``{"cmd": "snapshot", "name": N}``                                 names the head seq; reply has ``seq``
``{"cmd": "restore", "path": P, "version": N}``                    file restore (new events)
``{"cmd": "restore", "at": POINT}``                                whole-tree restore to a seq, time,
                                                                   snapshot or ``turn:AGENT:N``
``{"cmd": "turn-begin", "agent": A, "turn": N, "message_id": M}``  label the following events
``{"cmd": "turn-end"}``                                            end the label; reply has the label (``turn``)
``{"cmd": "step", "name": S, "result": JSON}``                     a durable step of the open turn; reply ``seq``
``{"cmd": "sync"}``                                                commit open files, make all durable
``{"cmd": "receipt", "at"?: POINT, "verify"?: bool}``              the receipt of the tree at POINT (default:
                                                                   the head, open files committed first); with
                                                                   ``verify``: check the stored one
=================================================================  ==========================================

The turn commands take optional fields for the agent runtime's turn records
(``chronicle.store.history.turns``), written in the label's transaction:
``turn-begin`` ``"record": {"kind", "message", "time", ...}`` (the turn's
``running`` record); ``turn-end`` ``"record": {"status", "patch", "reply",
"messages", "usage", "error", "duration_ms", ...}`` (its outcome),
``"snapshot": {"version", "entity_type", "state"}`` and ``"keep": bool``.
``turn-begin`` ``"track_reads": false`` records no read-set for the turn
(default true: the file versions the turn reads are kept at its end,
``chronicle.store.history.reads``).
Fields too long for one line go ahead in ``{"cmd": "turn-data", "data": S}``
pieces (S: a piece of the JSON text of an object of those fields), and the
turn command says ``"turn_data": N`` (the characters sent).

Who may: the handle's opener only (``chronicle.fs.magic`` lets only the
user who mounted the workspace and root open ``ctl``); a file ``restore``
also needs the opener's write permission on the file (on its directory if
it must be created again), else ``PermissionDenied``.

Malformed input (not JSON, not an object, unknown command, missing or
wrong-typed fields, an over-long line) gets an error reply; the daemon logs
nothing for it and keeps serving. The reply is ready when ``write`` returns.

**Quiet turn commands.** ``turn-begin``, ``turn-end`` and ``step`` with
``"quiet": true`` queue no reply when they succeed: the ``write`` returning
says so (the command ran and was committed before it returned), which
saves a ``read`` — a FUSE round trip — per command (the agent runtime's
per-turn cost). When one fails, its error reply is queued as usual and the
``write`` fails with ``EBADMSG``; the client then reads the reply.

Threads: commands run on the FUSE loop as mutations under the adapter's
:class:`~chronicle.fs.operations.MutationGate`, except the long one: a
whole-tree ``restore --at`` runs in a worker thread holding the gate
(``ChronicleOperations.run_exclusive``), so the mount keeps answering
lookups and stats meanwhile; ``sync`` waits for ``Store.sync`` in a worker
thread (``sync_limiter``); ``receipt`` computes in a worker thread (it reads
committed records only, ``chronicle.store.history.receipts``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import TYPE_CHECKING

import pyfuse3
import trio

from chronicle.errors import ChronicleError, InvalidArgument, PermissionDenied
from chronicle.store.history import points
from chronicle.store.history.access import Access, caller_of
from chronicle.store.history.reads import FileRead, ReadLog
from chronicle.store.history.receipts import Receipts
from chronicle.store.history.turns import EndedLabel, TurnLog
from chronicle.store.model import Actor
from chronicle.store.namespace.restore import restore_file, restore_tree

if TYPE_CHECKING:                      # (operations imports magic, which imports this module)
    from chronicle.fs.operations import ChronicleOperations

log = logging.getLogger("chronicle.fs")

MAX_LINE = 1 << 20
MAX_TURN_DATA = 1 << 30      # characters of turn-data per turn command (a state snapshot may be large)


class CtlSession:
    """One open handle of ``ctl``: its pending input and replies."""

    def __init__(self, ops: ChronicleOperations, ctx: pyfuse3.RequestContext):
        self.ops = ops
        self.actor = Actor(ctx.uid, ctx.gid, ctx.pid)
        self.caller = caller_of(ctx.uid, ctx.gid, ctx.pid)
        self._input = bytearray()
        self._output = bytearray()
        self._discarding = False     # inside an over-long line: drop bytes up to its newline
        self.turn_log = TurnLog(ops.store)
        self.read_log = ReadLog(ops.store)
        self._turn_data: list[str] = []  # turn-data pieces for the next turn command
        self._turn_chars = 0
        self._quiet = False              # the command being run asked for no reply on success

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the pending replies (``b""``: none pending)."""
        out = bytes(self._output[:size])
        del self._output[:size]
        return out

    async def write(self, data: bytes) -> int:
        """Take ``data`` (any split of the command lines); runs each complete
        line and queues its reply before returning. Returns ``len(data)``;
        raises ``FUSEError(EBADMSG)`` if a quiet command failed (module docstring)."""
        self._input += data
        failed = False
        while True:
            newline = self._input.find(b"\n")
            if self._discarding:
                if newline < 0:
                    self._input.clear()
                    break
                del self._input[:newline + 1]
                self._discarding = False
                continue
            if newline < 0:
                if len(self._input) > MAX_LINE:
                    self._input.clear()
                    self._discarding = True          # one reply per line, however long
                    self._reply({"ok": False, "error": f"command line longer than {MAX_LINE} bytes"})
                break
            line = bytes(self._input[:newline])
            del self._input[:newline + 1]
            if len(line) > MAX_LINE:
                self._reply({"ok": False, "error": f"command line longer than {MAX_LINE} bytes"})
            elif line.strip():
                self._quiet = False
                reply = await self.execute(line)
                if not (self._quiet and reply["ok"]):
                    self._reply(reply)
                failed = failed or (self._quiet and not reply["ok"])
        if failed:
            raise pyfuse3.FUSEError(errno.EBADMSG)      # a quiet command failed: its reply is queued
        return len(data)

    def _reply(self, reply: dict) -> None:
        self._output += json.dumps(reply).encode() + b"\n"

    async def execute(self, line: bytes) -> dict:
        """Run one command line; always returns a reply."""
        try:
            try:
                command = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"not JSON: {exc}") from None
            except RecursionError:
                raise InvalidArgument("not JSON this parser accepts: nested too deeply") from None
            if not isinstance(command, dict):
                raise InvalidArgument("a command is a JSON object like {\"cmd\": \"sync\"}")
            name = command.get("cmd")
            handler = COMMANDS.get(name) if isinstance(name, str) else None
            if handler is None:
                raise InvalidArgument(f"unknown command {name!r}; commands: {', '.join(sorted(COMMANDS))}")
            self._quiet = command.get("quiet") is True and name in QUIET_COMMANDS
            if handler in (CtlSession.restore, CtlSession.receipt):
                result = await handler(self, command)          # takes the gate as it needs
            else:
                async with self.ops.gate.mutation():
                    result = await handler(self, command)
            return {"ok": True, **result}
        except ChronicleError as exc:
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except Exception as exc:
            log.exception("ctl command failed: %r", line[:200])
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    # -- commands ----------------------------------------------------------------------

    async def snapshot(self, command: dict) -> dict:
        """``{"name", "seq"}``: the head seq named ``name``."""
        name = _field(command, "name", str)
        seq = self.ops.ws.snapshot(name)
        return {"name": name, "seq": seq}

    async def restore(self, command: dict) -> dict:
        """A file restore (``path``, ``version``: on the loop, one path) or a
        whole-tree restore (``at``: in a worker thread holding the gate, then
        the kernel's caches of what changed are invalidated). Raises
        ``InvalidArgument``, ``NotFound``, ``Busy`` (uncommitted writes)."""
        ws = self.ops.ws
        if "at" in command:
            point = command["at"]
            if not isinstance(point, (str, int)) or isinstance(point, bool):
                raise InvalidArgument("'at' is a seq, an ISO-8601 time, a snapshot name or turn:AGENT:N")
            if isinstance(point, str):
                _check_text("at", point)
            seq = points.resolve_point(ws, str(point))
            await self.ops.flush_kernel_writes()        # the kernel's dirty pages reach us before, not after
            # Seconds for a large tree: in a worker, the workspace locked against mutation.
            changes = await self.ops.run_exclusive(restore_tree, ws, seq, self.actor)
            await self.ops.invalidate_changed(changes.inodes, changes.entries)
            return {"seq": ws.head_seq, "at": seq, "paths": changes.paths, "changed": changes.paths > 0}
        path = command.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidArgument("command 'restore' needs 'path' (a string) and 'version', or 'at'")
        try:
            raw_path = os.fsencode(path)           # paths in our JSON are os.fsdecode'd
        except UnicodeEncodeError:
            raise InvalidArgument("'path' is not a path this system can encode") from None
        version = _field(command, "version", int)
        with ws.read_txn() as txn:
            allowed = Access(ws, self.caller).may_change(txn, raw_path.strip(b"/"))
        if not allowed:
            raise PermissionDenied(f"restore {path!r}: permission denied (the file, or its directory "
                                   "if it must be created again, is not writable by you)")
        await self.ops.flush_kernel_writes()
        async with self.ops.gate.mutation():                 # one path: on the loop
            changes = restore_file(ws, raw_path.strip(b"/"), version, self.actor)
        await self.ops.invalidate_changed(changes.inodes, changes.entries)
        return {"seq": ws.head_seq, "path": path, "version": version, "changed": changes.paths > 0}

    # Turn commands (the turn log: chronicle.store.history.turns). The daemon is the
    # workspace's writer, so it writes label, record and snapshot in one transaction.

    async def turn_begin(self, command: dict) -> dict:
        """``turn-begin``: open a turn label; with ``record``, its ``running``
        turn record too; from now on its reads are gathered unless
        ``track_reads`` is false (files open now drop their cached pages, so
        their reads reach the daemon). Reply: ``{"seq"}`` (the head before the turn)."""
        command = await self._with_turn_data(command)
        agent = _field(command, "agent", str)
        turn = _field(command, "turn", int)
        track = command.get("track_reads", True)
        if not isinstance(track, bool):
            raise InvalidArgument("'track_reads' must be true or false")
        message_id = command.get("message_id")
        if message_id is not None and not isinstance(message_id, (str, int)) or isinstance(message_id, bool):
            raise InvalidArgument("'message_id' must be a string")
        if isinstance(message_id, str):
            _check_text("message_id", message_id)
        self.turn_log.begin(self.ops.ws, agent, turn, None if message_id is None else str(message_id),
                            record=command.get("record"))
        self.ops.reads.begin(agent, turn, enabled=track)
        if track and self.ops.ws.files:
            await self.ops.invalidate(list(self.ops.ws.files), [])
        return {"seq": self.ops.ws.head_seq}

    async def turn_end(self, command: dict) -> dict:
        """``turn-end``: commit open files, end the label; with ``record`` (the
        outcome: ``status`` and what the turn did) and ``snapshot``, write the
        turn record and the state after it in the same transaction (``keep``:
        also for a turn that began without a record and changed nothing).
        Reply: ``{"seq", "turn": label, "recorded": bool}``."""
        command = await self._with_turn_data(command)
        ws, outcome, snapshot = self.ops.ws, command.get("record"), command.get("snapshot")
        keep = command.get("keep", False)
        if not isinstance(keep, bool):
            raise InvalidArgument("'keep' must be true or false")
        self.turn_log.check_end(ws, outcome, snapshot)
        await self.ops.commit_all()
        ended = self.turn_log.end_label(ws)                 # no event after this carries the label
        reads = self.ops.reads.end()                        # every read answered before this command
        # Off the loop: the turn end also computes the tree's receipt, which is
        # incremental but from scratch for a workspace's first one (~0.2 s per
        # 10,000 files), and a state snapshot may be large.
        label, record = await trio.to_thread.run_sync(self._record_end, ended, outcome, snapshot, keep, reads)
        return {"seq": ws.head_seq, "turn": label, "recorded": record is not None}

    def _record_end(self, ended: EndedLabel, outcome: dict | None, snapshot: dict | None, keep: bool,
                    reads: list[FileRead]) -> tuple[dict, dict | None]:
        """Worker thread: the turn's read-set (one transaction, if it read
        anything), then its end (``TurnLog.record_end``): whoever sees the
        turn ended sees its reads."""
        self.read_log.record(self.ops.ws, ended.agent, ended.turn, reads)
        return self.turn_log.record_end(self.ops.ws, ended, outcome, snapshot, keep)

    async def step(self, command: dict) -> dict:
        """``step``: commit open files, then record a completed durable step
        (``name``, its JSON ``result``) of the open turn, at the head seq
        (``TurnLog.step``: its own key, O(1)). Reply: ``{"seq", "name"}``."""
        command = await self._with_turn_data(command)
        name = _field(command, "name", str)
        if "result" not in command:
            raise InvalidArgument("command 'step' needs 'result' (any JSON value)")
        await self.ops.commit_all()
        step = self.turn_log.step(self.ops.ws, name, command["result"])
        return {"seq": step["seq"], "name": name}

    async def turn_data(self, command: dict) -> dict:
        """``turn-data``: a piece of the JSON object of fields for this handle's
        next turn command, for records longer than a line (that command says
        how many characters with ``"turn_data": N``). Reply: ``{"chars"}`` so far."""
        data = command.get("data")
        if not isinstance(data, str):
            raise InvalidArgument("'data' must be a string")
        if self._turn_chars + len(data) > MAX_TURN_DATA:
            self._turn_data, self._turn_chars = [], 0
            raise InvalidArgument(f"turn data longer than {MAX_TURN_DATA} characters")
        self._turn_data.append(data)
        self._turn_chars += len(data)
        return {"chars": self._turn_chars}

    async def _with_turn_data(self, command: dict) -> dict:
        """``command`` with the fields sent ahead in ``turn-data`` (which are
        used up, whatever happens)."""
        parts, chars = self._turn_data, self._turn_chars
        self._turn_data, self._turn_chars = [], 0
        expected = command.get("turn_data")
        if expected is None:
            if parts:
                raise InvalidArgument("turn-data was sent, but this command does not name it ('turn_data')")
            return command
        if not isinstance(expected, int) or isinstance(expected, bool) or expected != chars:
            raise InvalidArgument(f"'turn_data' says {expected!r} characters were sent ahead; {chars} were")
        text = "".join(parts)
        try:
            fields = await trio.to_thread.run_sync(json.loads, text) if chars > 1 << 16 else json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidArgument("the turn data is not a JSON object") from None
        if not isinstance(fields, dict):
            raise InvalidArgument("the turn data is not a JSON object")
        return {**fields, **command}

    async def receipt(self, command: dict) -> dict:
        """``receipt``: commit open files, then the receipt of the tree at
        ``at`` (default: the head; made and stored if new). Reply:
        ``{"receipt": {...}}``; with ``"verify": true`` the stored receipt
        at ``at`` (default: the latest) checked from scratch: ``{"verified":
        bool, "root", "recomputed", "seq", "receipt"}``. Raises
        ``InvalidArgument``, ``NotFound``."""
        ws, point, verify = self.ops.ws, command.get("at"), command.get("verify", False)
        if not isinstance(verify, bool):
            raise InvalidArgument("'verify' must be true or false")
        if point is not None and (not isinstance(point, (str, int)) or isinstance(point, bool)):
            raise InvalidArgument("'at' is a seq, an ISO-8601 time, a snapshot name or turn:AGENT:N")
        if isinstance(point, str):
            _check_text("at", point)
        async with self.ops.gate.mutation():     # the point's tree, committed; then mutations go on
            await self.ops.commit_all()
            seq = ws.head_seq if point is None else points.resolve_point(ws, str(point))
        receipts = Receipts(ws)
        if verify:
            result = await trio.to_thread.run_sync(receipts.verify, None if point is None else seq)
            return {"verified": result.pop("ok"), **result}
        return {"receipt": await trio.to_thread.run_sync(receipts.make, seq)}

    async def sync(self, command: dict) -> dict:
        """Commit open files, then ``Store.sync`` in a worker thread."""
        await self.ops.commit_all()
        await self.ops.sync()
        return {"seq": self.ops.ws.head_seq}


QUIET_COMMANDS = frozenset({"turn-begin", "turn-end", "step"})

COMMANDS = {
    "snapshot": CtlSession.snapshot,
    "restore": CtlSession.restore,
    "turn-begin": CtlSession.turn_begin,
    "turn-end": CtlSession.turn_end,
    "turn-data": CtlSession.turn_data,
    "step": CtlSession.step,
    "sync": CtlSession.sync,
    "receipt": CtlSession.receipt,
}


def _field(command: dict, name: str, kind: type):
    """A required field of ``kind``: strings must be valid UTF-8 without NUL,
    integers in ``0 .. 2**32-1`` (what the store can hold)."""
    value = command.get(name)
    if value is None:
        raise InvalidArgument(f"command {command.get('cmd')!r} needs {name!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{name!r} must be {'an integer' if kind is int else 'a string'}")
    if kind is str:
        _check_text(name, value)
    elif kind is int and not 0 <= value < 2 ** 32:
        raise InvalidArgument(f"{name!r} must be between 0 and {2 ** 32 - 1}")
    return value


def _check_text(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name!r} is not valid Unicode text") from None
    if "\x00" in value:
        raise InvalidArgument(f"{name!r} contains a NUL character")
