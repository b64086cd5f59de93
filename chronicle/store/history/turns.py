"""The turn log: turn labels, turn records, state snapshots and agent records.

Vocabulary (SPEC §4, §5):

- **turn** — one numbered step of an agent (``agent``, ``turn`` N): for the
  agent runtime one call of ``on_message``, a lifecycle hook that changed
  something, a rollback, or the agent's origin (turn 0); for any other client
  of ``ctl`` whatever it brackets with ``turn-begin``/``turn-end``.
- **turn label** — the seq range of a workspace a turn covered (database
  ``turns``, key ws, agent, turn)::

      {"agent", "turn", "message_id", "begin_seq", "end_seq", "begin_time", "end_time",
       "interrupted"?: true, "receipt"?: "<hex root>"}

  While a label is open (``end_seq`` null) every file event committed carries
  ``{"agent", "turn", "message_id"}`` (:attr:`Workspace.turn`), and
  ``turn:AGENT:N`` names the tree at ``end_seq``; ``receipt`` is the root of
  the receipt of that tree (``chronicle.store.history.receipts``), made when
  the turn ended and kept in its record too. ``end_seq < begin_seq``: the
  turn had no file events. ``interrupted``: the mount daemon stopped before
  the turn ended (the next daemon ended it at its head). A fork sees its
  parent's labels that ended at or before the fork seq.
- **turn record** — what the runtime's turn did (database ``agent_turns``, key
  agent, turn; only for the agent whose workspace has its name)::

      {"turn", "kind", "status", "message_id", "message", "reply", "messages",
       "error", "patch": [JSON Patch ops], "usage": {...}, "begin_seq", "end_seq",
       "time", "end_time", "duration_ms", "snapshot": bool,
       "rollback_to"?, "forked_from"?, "migrated_from"?, "target"?,
       "steps"?: [{"name", "result", "seq", "time"}], "attempts"?: N,
       "undone"?: {"to_seq"}, "suspend"?: {timer}, "compaction"?: {...}, "receipt"?: "<hex root>"}

  ``steps``: its completed durable steps (:meth:`TurnLog.step`; while the
  turn runs each is its own key in database ``agent_steps``, key agent,
  turn, step index — O(1) per step, the ``running`` record is not
  rewritten — and :meth:`TurnLog.record` shows them in ``steps``; the
  turn's final record holds them and their keys are dropped); ``attempts``:
  runs of the turn; ``undone``: a turn that did not complete whose files (if any) the
  runtime put back after its end (a restore to ``to_seq``, unlabelled events
  after ``end_seq``: ``turn:AGENT:N`` still shows the attempt's tree).

  ``suspend``: the turn ended in ``ctx.sleep``/``pause`` and left this timer
  (the agent record's ``timer``, below); ``compaction``: the compaction point
  it recorded (``ctx.compact``): ``{"summary", "keep_last", "summarises":
  [turns], "state_turn"}``, its state snapshot kept with it.

  ``kind``: ``create`` (turn 0)/``fork`` (the fork turn), ``message``, ``wake``
  (a timer's ``on_wake``, its ``message`` the wake event), ``init``/``idle``/
  ``shutdown`` (hooks), ``rollback``. ``status`` is ``running`` (written with
  the label when the turn begins), then one of :data:`FINAL_STATUSES` —
  ``completed``, ``failed`` (the handler raised), ``cancelled``,
  ``interrupted`` (the worker, the runtime or the mount daemon stopped during
  it). Only a completed turn's ``patch`` changed the state. ``begin_seq``/
  ``end_seq`` are its label's. A turn that began without a record (a hook) gets
  one at its end only if it changed something (its patch, its files), did not
  complete, or the caller asks to keep it; otherwise its number is used again.
- **state snapshot** — the full state JSON after a turn (database
  ``agent_states``, key agent, turn): ``{"version", "entity_type", "state"}``,
  kept for turn 0, every N-th turn, rollbacks and migrations. The state after
  turn N is the latest snapshot at or before N with the patches of the
  completed turns after it applied in order: one snapshot and fewer than N
  patches, however long the log.
- **JSON Patch** — a turn record's ``patch``: RFC 6902 operations that take
  the state before the turn to the state after it (applied with the
  ``jsonpatch`` library).
- **agent record** — database ``agents``, key agent id (the name of its
  workspace)::

      {"id", "target", "cwd", "created", "entity_type", "state_version",
       "parent": null | {"agent", "turn"},     # a fork: whose state and files it started from
       "first_turn"?: N,                      # a fork's own first turn (= parent turn): it numbers on
       "last_turn": N, "message_turns": N,    # the turn counters
       "history_from": N, "total_usage": {...}, "last_turn_usage": {...},
       "status": "created" | "running" | "sleeping" | "stopped",
       "timer"?: null | {"kind": "sleep" | "pause", "reason", "due": epoch s | null,
                         "until": ISO | null, "turn", "set"},   # a durable timer (agent_runtime.timers)
       "quota_keys"?: [keys]}                 # the class's quota_keys

History is never rewritten: a turn record changes only from ``running`` to a
final status; a rollback is a new turn.

**Who writes.** Labels, records, snapshots and the turn counters of the agent
record are written by one process: the workspace's writer, the holder of its
writer lock (``Store.open_workspace(writable=True)``) — every write method
here takes a writable :class:`Workspace` and raises :class:`ReadOnly`
otherwise. The agent runtime mounts an agent's workspace with a daemon
subprocess (``chronicle mount --foreground``, ``agent_runtime.process.
WorkspaceMount``), and that daemon holds the lock while mounted; so the runtime
sends its records over the workspace's ``ctl`` channel (``turn-begin`` carries
the ``running`` record, ``turn-end`` the outcome and the state snapshot;
``chronicle.fs.ctl``) and the daemon writes label, record, snapshot and
counters in one LMDB transaction, beside the file events they describe (the
runtime cannot be the writer: the daemon holds the lock whenever the files
change, and a label and its record must end at the same seq). When the
workspace is not mounted (creating or forking an agent) the runtime takes the
writer lock itself for that one transaction; deleting an agent drops its
records after its workspace is gone. The runtime writes the other
fields of the agent record (:meth:`TurnLog.update`) — its ``timer`` too,
after the turn that set it ended (the turn record's ``suspend``, written by
the daemon, is its copy in the history); LMDB serialises write
transactions across processes, so each read-modify-write sees the other's.
Everyone reads, in any process.

Errors: :class:`AgentNotFound`, :class:`AgentExists`, :class:`NotFound` (no
such turn), :class:`InvalidArgument` (a malformed label or record, a turn out
of order, a turn still open or none open), :class:`ReadOnly` (a write through
a workspace that is not the writer), :class:`Corrupt` (a log that cannot be
replayed).

Threads: a :class:`TurnLog` holds no transaction; each method opens its own
(a write: one transaction inside one call). :meth:`TurnLog.end_label` changes
the workspace's open label and belongs to the workspace's thread;
:meth:`TurnLog.record_end` may run in a worker thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonpatch
import lmdb

from chronicle.errors import AgentExists, AgentNotFound, Corrupt, InvalidArgument, NotFound, ReadOnly
from chronicle.store.history.receipts import Receipts
from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time

if TYPE_CHECKING:                      # (store.py and namespace/ import this module)
    from chronicle.store.namespace.workspace import Workspace
    from chronicle.store.store import Store

log = logging.getLogger(__name__)

FINAL_STATUSES = ("completed", "failed", "cancelled", "interrupted")
TURN_MAX = 2 ** 32 - 1

# The fields every turn record has, with their values before the turn ran.
RECORD_FIELDS: dict[str, Any] = {
    "turn": None, "kind": None, "status": "running", "message_id": None, "message": None, "reply": "",
    "messages": [], "patch": [], "error": None, "usage": {}, "begin_seq": None, "end_seq": None,
    "time": None, "end_time": None, "duration_ms": None, "snapshot": False}

RUNTIME_STOPPED = "the runtime stopped during this turn"
DAEMON_STOPPED = "the mount daemon stopped during this turn"


def turn_key(agent: str, turn: int) -> bytes:
    """Key of a turn record or state snapshot: agent id, 0x00, turn u32."""
    return agent.encode() + b"\x00" + schema.U32.pack(turn)


def _agent_prefix(agent: str) -> bytes:
    return agent.encode() + b"\x00"


def _turn_of_key(key: bytes) -> int:
    return schema.U32.unpack(key[-4:])[0]


def now_iso() -> str:
    """The current time as the log writes it (ISO-8601 UTC, ns)."""
    return iso_time(time.time_ns())


def add_usage(total: dict, usage: dict | None) -> dict:
    """``total`` plus ``usage``, counter by counter (numbers only)."""
    out = dict(total)
    for key, value in (usage or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


def check_label(agent: object, turn: object) -> None:
    """Raise :class:`InvalidArgument` unless ``agent`` (1 to 255 bytes of
    UTF-8 without NUL or ``:``) and ``turn`` (0 .. 2**32-1) can name a turn
    (``turn:AGENT:N`` could not name the turns of an agent with a ``:``)."""
    try:
        agent_bytes = agent.encode("utf-8")              # type: ignore[union-attr]
    except (UnicodeEncodeError, AttributeError):
        raise InvalidArgument("the agent name must be valid Unicode text") from None
    if not agent_bytes or b"\x00" in agent_bytes or len(agent_bytes) > 255:
        raise InvalidArgument("the agent name must be 1 to 255 bytes, without NUL")
    if b":" in agent_bytes:
        raise InvalidArgument(f"the agent name {agent!r} has a ':' (turn:AGENT:N could not name its turns)")
    if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn <= TURN_MAX:
        raise InvalidArgument(f"the turn number must be between 0 and {TURN_MAX}")


def _check_fields(record: object, what: str) -> dict:
    """A record (or outcome) given by a client: a JSON object whose standard
    fields have their types. Returns it; raises :class:`InvalidArgument`."""
    if not isinstance(record, dict):
        raise InvalidArgument(f"the {what} must be a JSON object")
    kinds = {"kind": str, "message_id": str, "message": dict, "reply": str, "messages": list, "patch": list,
             "error": str, "usage": dict, "time": str, "duration_ms": (int, float)}
    for name, kind in kinds.items():
        value = record.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InvalidArgument(f"{name!r} of the {what} has the wrong type")
    for op in record.get("patch") or []:
        if not (isinstance(op, dict) and isinstance(op.get("op"), str) and isinstance(op.get("path"), str)):
            raise InvalidArgument(f"the patch of the {what} is not a list of RFC 6902 operations")
    return record


def _check_snapshot(snapshot: object) -> dict:
    if not (isinstance(snapshot, dict) and "state" in snapshot and isinstance(snapshot.get("version"), int)):
        raise InvalidArgument('a state snapshot is {"version": int, "entity_type", "state"}')
    return snapshot


@dataclass(frozen=True, slots=True)
class StateAt:
    """The state JSON after turn ``turn``, stored under state ``version``."""

    turn: int
    state: dict
    version: int
    entity_type: str | None
    snapshot_turn: int          # the snapshot it was rebuilt from
    patches: int                # how many patches were applied on top


@dataclass(frozen=True, slots=True)
class EndedLabel:
    """A label :meth:`TurnLog.end_label` closed, not yet written (see :meth:`TurnLog.record_end`)."""

    agent: str
    turn: int
    message_id: str | None
    end_seq: int
    end_time: str


class TurnLog:
    """The turn log of one open :class:`~chronicle.store.store.Store` (module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self.env: lmdb.Environment = store.env
        self.labels_db = store.dbs["turns"]
        self.agents_db = store.dbs["agents"]
        self.records_db = store.dbs["agent_turns"]
        self.states_db = store.dbs["agent_states"]
        self.steps_db = store.dbs["agent_steps"]
        self._step_names: tuple[bytes, list[str]] | None = None   # the open turn's step names (step())

    # -- agent records -------------------------------------------------------------------

    def get(self, agent: str, txn: lmdb.Transaction | None = None) -> dict:
        """The agent record. Raises :class:`AgentNotFound`."""
        if txn is None:
            with self.env.begin() as rtxn:
                return self.get(agent, rtxn)
        raw = txn.get(agent.encode(), db=self.agents_db) if agent else None
        if raw is None:
            raise AgentNotFound(f"no agent named {agent!r} in {self.store.path}")
        return json.loads(raw)

    def exists(self, agent: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(agent.encode(), db=self.agents_db) is not None

    def agents(self) -> list[dict]:
        """Every agent record, by id."""
        with self.env.begin() as txn, txn.cursor(db=self.agents_db) as cur:
            return [json.loads(value) for _key, value in cur]

    def create_agent(self, ws: Workspace, record: dict, snapshot: dict, origin: dict) -> None:
        """Add the agent of workspace ``ws`` (its writer) with its first turn
        (``record["first_turn"]``, default 0; a fork's is its fork turn) — a
        label of no events at the head, a completed record of ``origin``'s
        fields (``{"kind": "create" | "fork", ...}``) — and that turn's state
        snapshot, in one transaction. Leftover records of a deleted agent of
        the same name are dropped. Raises :class:`AgentExists`, :class:`ReadOnly`.
        """
        agent = record["id"]
        self._check_writer(ws, agent)
        first = record.get("first_turn", 0)
        check_label(agent, first)
        now = now_iso()
        head = ws.head_seq
        label = {"agent": agent, "turn": first, "message_id": None, "begin_seq": head + 1, "end_seq": head,
                 "begin_time": now, "end_time": now}
        turn0 = {**RECORD_FIELDS, "status": "completed", **origin, "turn": first, "begin_seq": head + 1,
                 "end_seq": head, "time": now, "end_time": now, "duration_ms": 0.0, "snapshot": True}
        with self.env.begin(write=True) as txn:
            if txn.get(agent.encode(), db=self.agents_db) is not None:
                raise AgentExists(f"agent {agent!r} already exists")
            self._delete_records(txn, agent)
            txn.put(agent.encode(), json.dumps(record).encode(), db=self.agents_db)
            self._put_label(txn, ws, label)
            txn.put(turn_key(agent, first), json.dumps(turn0).encode(), db=self.records_db)
            txn.put(turn_key(agent, first), json.dumps(snapshot).encode(), db=self.states_db)
        self.store.note_commit()

    def update(self, agent: str, **fields: Any) -> dict:
        """Set fields of the agent record other than its turn counters; returns
        the new record. Raises :class:`AgentNotFound`."""
        with self.env.begin(write=True) as txn:
            record = self.get(agent, txn)
            record.update(fields)
            txn.put(agent.encode(), json.dumps(record).encode(), db=self.agents_db)
        self.store.note_commit()
        return record

    def delete_agent(self, agent: str) -> None:
        """Remove the agent record, its turn records and its snapshots (its
        workspace, with its labels, is ``Store.delete_workspace``'s). Raises
        :class:`AgentNotFound`."""
        with self.env.begin(write=True) as txn:
            self.get(agent, txn)
            txn.delete(agent.encode(), db=self.agents_db)
            self._delete_records(txn, agent)
        self.store.note_commit()

    def _delete_records(self, txn: lmdb.Transaction, agent: str) -> None:
        prefix = _agent_prefix(agent)
        for db in (self.records_db, self.states_db, self.steps_db):
            with txn.cursor(db=db) as cur:
                if not cur.set_range(prefix):
                    continue
                while cur.key()[:len(prefix)] == prefix:
                    if not cur.delete():
                        break

    # -- reading labels ------------------------------------------------------------------

    def label(self, ws: Workspace, agent: str, turn: int) -> dict | None:
        """The label of ``turn`` of ``agent`` in ``ws`` or, in a fork, in an
        ancestor if it ended at or before the fork seq; None if there is none."""
        if not isinstance(turn, int) or not 0 <= turn <= TURN_MAX:
            return None
        with self.env.begin() as txn:
            for layer in ws.history.layers:
                raw = txn.get(schema.turn_key(layer.ws, agent.encode(), turn), db=self.labels_db)
                if raw is not None:
                    label = json.loads(raw)
                    end = label.get("end_seq")
                    if layer.ws == ws.id or (end is not None and end <= layer.bound):
                        return label
        return None

    def labels(self, ws: Workspace, agent: str | None = None) -> list[dict]:
        """The labels ``ws`` sees (see :meth:`label`), of one agent or all:
        the oldest fork layer first, by agent then turn within a layer."""
        out = []
        with self.env.begin() as txn, txn.cursor(db=self.labels_db) as cur:
            for layer in reversed(ws.history.layers):
                prefix = schema.ws_key(layer.ws) + (agent.encode() + b"\x00" if agent else b"")
                if cur.set_range(prefix):
                    for key, value in cur:
                        if key[:len(prefix)] != prefix:
                            break
                        label = json.loads(value)
                        end = label.get("end_seq")
                        if layer.ws == ws.id or (end is not None and end <= layer.bound):
                            out.append(label)
        return out

    # -- reading turn records ------------------------------------------------------------

    def record(self, agent: str, turn: int, txn: lmdb.Transaction | None = None) -> dict | None:
        """The turn record of ``turn``, or None."""
        if txn is None:
            with self.env.begin() as rtxn:
                return self.record(agent, turn, rtxn)
        if not isinstance(turn, int) or turn < 0 or turn > TURN_MAX:
            return None
        raw = txn.get(turn_key(agent, turn), db=self.records_db)
        if raw is None:
            return None
        record = json.loads(raw)
        if record.get("status") == "running":
            self._add_steps(txn, agent, turn, record)
        return record

    def records(self, agent: str, since: int = 0, until: int | None = None,
                txn: lmdb.Transaction | None = None) -> Iterator[dict]:
        """Turn records with ``since <= turn <= until``, oldest first."""
        if txn is None:
            with self.env.begin() as rtxn:
                yield from self.records(agent, since, until, rtxn)
            return
        prefix = _agent_prefix(agent)
        with txn.cursor(db=self.records_db) as cur:
            if not cur.set_range(turn_key(agent, max(0, since))):
                return
            for key, value in cur:
                if key[:len(prefix)] != prefix:
                    break
                if until is not None and _turn_of_key(key) > until:
                    break
                record = json.loads(value)
                if record.get("status") == "running":
                    self._add_steps(txn, agent, _turn_of_key(key), record)
                yield record

    @staticmethod
    def inherited_from(info: dict, turn: int) -> str | None:
        """The parent whose turn ``turn`` the agent of record ``info`` inherited
        (a fork numbers on from its fork turn: turns before its
        ``first_turn`` are its parent's), or None (the agent's own turn)."""
        parent = info.get("parent")
        if parent and turn < info.get("first_turn", 0):
            return parent["agent"]
        return None

    def lineage_record(self, agent: str, turn: int) -> tuple[str, dict] | None:
        """``(owner, record)`` of ``turn`` along ``agent``'s lineage (its own
        or an ancestor's), or None. Raises :class:`AgentNotFound`."""
        for _depth in range(64):
            inherited = self.inherited_from(self.get(agent), turn) if isinstance(turn, int) else None
            if inherited is None:
                record = self.record(agent, turn)
                return None if record is None else (agent, record)
            agent = inherited
        return None

    def lineage(self, agent: str) -> list[tuple[str, dict]]:
        """``(owner, record)`` of every turn along ``agent``'s lineage, oldest
        first: the inherited ones, then its own. Raises :class:`AgentNotFound`."""
        info = self.get(agent)
        out: list[tuple[str, dict]] = []
        first, parent = info.get("first_turn", 0), info.get("parent")
        if parent and first > 0:
            try:
                out = [(owner, rec) for owner, rec in self.lineage(parent["agent"]) if rec["turn"] < first]
            except AgentNotFound:
                out = []
        out.extend((agent, rec) for rec in self.records(agent))
        return out

    def state_at(self, agent: str, turn: int | None = None) -> StateAt:
        """The state JSON after ``turn`` (default: the last turn).

        Raises :class:`AgentNotFound`, :class:`NotFound` (no such turn) and
        :class:`Corrupt` if the log cannot be replayed.
        """
        with self.env.begin() as txn:
            info = self.get(agent, txn)
            last = info["last_turn"]
            if turn is None:
                turn = last
            if turn < 0 or turn > last:
                raise NotFound(f"agent {agent!r} has no turn {turn} (its turns are 0 to {last})")
            inherited = self.inherited_from(info, turn)
            if inherited is not None:
                return self.state_at(inherited, turn)
            snap_turn, snap = self._snapshot_at(txn, agent, turn)
            state = snap["state"]
            applied = 0
            for record in self.records(agent, snap_turn + 1, turn, txn):
                patch = record.get("patch")
                if record.get("status") != "completed" or not patch:
                    continue
                try:
                    jsonpatch.apply_patch(state, patch, in_place=True)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
                        KeyError, IndexError) as exc:
                    raise Corrupt(f"the turn log of agent {agent!r} cannot be replayed at turn "
                                  f"{record['turn']}: {exc}") from None
                applied += 1
        return StateAt(turn, state, snap["version"], snap.get("entity_type"), snap_turn, applied)

    def _snapshot_at(self, txn: lmdb.Transaction, agent: str, turn: int) -> tuple[int, dict]:
        """``(turn, snapshot)`` of the latest snapshot at or before ``turn``."""
        prefix = _agent_prefix(agent)
        with txn.cursor(db=self.states_db) as cur:
            found = cur.set_range(turn_key(agent, turn + 1)) if turn < TURN_MAX else False
            moved = cur.prev() if found else cur.last()
            if moved and cur.key()[:len(prefix)] == prefix:
                return _turn_of_key(cur.key()), json.loads(cur.value())
        raise Corrupt(f"agent {agent!r} has no state snapshot at or before turn {turn}")

    def turn_events(self, agent: str, record: dict) -> list[dict]:
        """The ``.chronicle/log`` events of a turn, oldest first: those in its
        seq range that carry its label (an interrupted turn whose end was not
        recorded: those carrying its label from its first seq on)."""
        begin, end = record.get("begin_seq"), record.get("end_seq")
        if begin is None or (end is not None and end < begin):
            return []
        ws = self.store.open_workspace(agent)
        out = []
        with self.env.begin() as txn:
            for line in ws.history.log_lines(txn, begin, end):
                event = json.loads(line)
                label = event.get("turn") or {}
                if label.get("agent") == agent and label.get("turn") == record["turn"]:
                    out.append(event)
                elif end is None and out:
                    break
        return out

    # -- writing turns (the workspace's writer) ------------------------------------------

    def begin(self, ws: Workspace, agent: str, turn: int, message_id: str | None = None,
              record: dict | None = None) -> dict:
        """Open the label of ``turn`` of ``agent`` in ``ws``: the events that
        follow carry it. With ``record`` (the turn's fields known at its
        start: ``kind``, ``message``, ``time``, extras) also write the turn
        record, ``running``, and count the turn in the agent record — all in
        one transaction. Returns the label.

        Raises :class:`InvalidArgument` (a bad agent name or turn number, a
        turn still open, a record for an agent other than the workspace's or
        for a number that is not the agent's next), :class:`AgentNotFound`
        (a record for an agent that does not exist), :class:`ReadOnly`.
        """
        check_label(agent, turn)
        if message_id is not None and not isinstance(message_id, str):
            raise InvalidArgument("the message id must be a string")
        self._check_writer(ws, agent if record is not None else None)
        if ws.turn is not None:
            raise InvalidArgument(f"turn {ws.turn['turn']} of agent {ws.turn['agent']!r} is still open; "
                                  "end it with turn-end first")
        if record is not None:
            _check_fields(record, "turn record")
            if not isinstance(record.get("kind"), str):
                raise InvalidArgument("a turn record needs its 'kind' (a string)")
        now = now_iso()
        label = {"agent": agent, "turn": turn, "message_id": message_id, "begin_seq": ws.head_seq + 1,
                 "end_seq": None, "begin_time": now}
        with self.env.begin(write=True) as txn:
            if record is not None:
                info = self.get(agent, txn)
                self._check_next(info, turn, txn)
                running = {**RECORD_FIELDS, **record, "turn": turn, "status": "running", "message_id": message_id,
                           "begin_seq": label["begin_seq"], "end_seq": None, "time": record.get("time") or now,
                           "end_time": None}
                self._count_turn(info, running)
                txn.put(turn_key(agent, turn), json.dumps(running).encode(), db=self.records_db)
                txn.put(agent.encode(), json.dumps(info).encode(), db=self.agents_db)
            self._put_label(txn, ws, label)
        self.store.note_commit()
        ws.turn = {"agent": agent, "turn": turn, "message_id": message_id}    # only once it is recorded
        return label

    def check_end(self, ws: Workspace, outcome: dict | None = None, snapshot: dict | None = None) -> None:
        """Raise what :meth:`end` would raise before it changes anything:
        :class:`InvalidArgument` (no turn open; a malformed outcome, one
        without a final status, one for a turn already recorded final or for
        a number that is not the agent's next), :class:`AgentNotFound`,
        :class:`ReadOnly`."""
        if ws.turn is None:
            raise InvalidArgument("no turn is open")
        agent, turn = ws.turn["agent"], ws.turn["turn"]
        self._check_writer(ws, agent if outcome is not None or snapshot is not None else None)
        if outcome is None:
            if snapshot is not None:
                raise InvalidArgument("a state snapshot comes with the turn's record")
            return
        _check_fields(outcome, "turn outcome")
        if outcome.get("status") not in FINAL_STATUSES:
            raise InvalidArgument(f"a turn ends {', '.join(FINAL_STATUSES)}, not {outcome.get('status')!r}")
        if snapshot is not None:
            _check_snapshot(snapshot)
        with self.env.begin() as txn:
            info = self.get(agent, txn)
            old = self.record(agent, turn, txn)
            if old is None:
                if not isinstance(outcome.get("kind"), str):
                    raise InvalidArgument("the record of a turn that began without one needs its 'kind'")
                self._check_next(info, turn, txn)
            elif old.get("status") != "running":
                raise InvalidArgument(f"turn {turn} of agent {agent!r} is already recorded {old.get('status')}")

    def end_label(self, ws: Workspace) -> EndedLabel:
        """Close the open label at the head: later events carry no label. The
        closing is written by :meth:`record_end`. Raises :class:`InvalidArgument`
        if no turn is open."""
        if ws.turn is None:
            raise InvalidArgument("no turn is open")
        open_label, ws.turn = ws.turn, None
        return EndedLabel(open_label["agent"], open_label["turn"], open_label.get("message_id"), ws.head_seq,
                          now_iso())

    def record_end(self, ws: Workspace, ended: EndedLabel, outcome: dict | None = None,
                   snapshot: dict | None = None, keep: bool = False) -> tuple[dict, dict | None]:
        """Write the end of a turn in one transaction: its label; its record
        (``outcome``'s fields on the ``running`` record, or a new record for a
        turn that began without one if it changed something, did not
        complete, or ``keep``); ``snapshot``, the state after it; the agent's
        counters. No ``outcome`` and a ``running`` record: the record becomes
        ``interrupted`` (its runtime lost the turn). Returns ``(label, record
        or None)``. Raises as :meth:`check_end` (call that first: the label is
        closed already). Label and record get the ``receipt`` of the tree at
        the end (made first, in its own transaction; left out, with a
        warning, if the tree cannot be read)."""
        agent, turn = ended.agent, ended.turn
        try:
            receipt = Receipts(ws).make(ended.end_seq)["root"]
        except Corrupt as exc:
            log.warning("no receipt for turn %s of agent %r: %s", turn, agent, exc)
            receipt = None
        with self.env.begin(write=True) as txn:
            raw = txn.get(schema.turn_key(ws.id, agent.encode(), turn), db=self.labels_db)
            label = json.loads(raw) if raw is not None else {"agent": agent, "turn": turn,
                                                              "message_id": ended.message_id,
                                                              "begin_seq": ended.end_seq + 1, "end_seq": None}
            label.update(end_seq=ended.end_seq, end_time=ended.end_time)
            if receipt is not None:
                label["receipt"] = receipt
            self._put_label(txn, ws, label)
            record = None
            if agent == ws.name and (outcome is not None or txn.get(agent.encode(), db=self.agents_db)):
                record = self._end_record(txn, agent, label, outcome, snapshot, keep)
        self.store.note_commit()
        return label, record

    def end(self, ws: Workspace, outcome: dict | None = None, *, snapshot: dict | None = None,
            keep: bool = False) -> tuple[dict, dict | None]:
        """:meth:`check_end`, :meth:`end_label` and :meth:`record_end` in one
        call (open files must be committed first). Returns ``(label, record or None)``."""
        self.check_end(ws, outcome, snapshot)
        return self.record_end(ws, self.end_label(ws), outcome, snapshot, keep)

    def step(self, ws: Workspace, name: str, result: Any) -> dict:
        """Record ``{"name", "result", "seq" (the head), "time"}`` as the next
        step of the open turn (its own key in ``agent_steps``; the ``running``
        record shows it in ``steps``); returns it. Raises
        :class:`InvalidArgument` (no turn open, no ``running`` record, a bad
        or already used name), :class:`ReadOnly`."""
        if ws.turn is None:
            raise InvalidArgument("no turn is open; a step belongs to a turn")
        agent, turn = ws.turn["agent"], ws.turn["turn"]
        self._check_writer(ws, agent)
        if not isinstance(name, str) or not name or len(name.encode("utf-8", "replace")) > 1024 or "\x00" in name:
            raise InvalidArgument("a step name is a non-empty string of at most 1024 bytes, without NUL")
        step = {"name": name, "result": result, "seq": ws.head_seq, "time": now_iso()}
        prefix = turn_key(agent, turn)
        with self.env.begin(write=True) as txn:
            raw = txn.get(prefix, db=self.records_db)
            if raw is None or json.loads(raw).get("status") != "running":
                raise InvalidArgument(f"turn {turn} of agent {agent!r} has no running record to add a step to")
            names = self._names_of_steps(txn, prefix)
            if name in names:
                raise InvalidArgument(f"step {name!r} was already recorded in turn {turn}; step names are "
                                      "unique within a turn")
            txn.put(prefix + schema.U32.pack(len(names)), json.dumps(step).encode(), db=self.steps_db)
        names.append(name)                  # (after the commit: a failed one leaves the cache as the store)
        self.store.note_commit()
        return step

    def _names_of_steps(self, txn: lmdb.Transaction, prefix: bytes) -> list[str]:
        """The names of the steps recorded under ``prefix`` (agent, turn), in
        order: kept from the last :meth:`step` while the store has exactly
        that many (two point reads), else read from the store."""
        cached = self._step_names
        if cached is not None and cached[0] == prefix:
            count = len(cached[1])
            if (count == 0 or txn.get(prefix + schema.U32.pack(count - 1), db=self.steps_db) is not None) \
                    and txn.get(prefix + schema.U32.pack(count), db=self.steps_db) is None:
                return cached[1]
        names = [json.loads(value).get("name") for value in self._step_values(txn, prefix)]
        self._step_names = (prefix, names)
        return names

    def _step_values(self, txn: lmdb.Transaction, prefix: bytes) -> Iterator[bytes]:
        with txn.cursor(db=self.steps_db) as cur:
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:len(prefix)] != prefix or len(key) != len(prefix) + 4:
                        break
                    yield value

    def _add_steps(self, txn: lmdb.Transaction, agent: str, turn: int, record: dict) -> None:
        """A ``running`` record with the steps recorded in ``agent_steps`` after its own."""
        steps = [json.loads(value) for value in self._step_values(txn, turn_key(agent, turn))]
        if steps:
            record["steps"] = (record.get("steps") or []) + steps

    def _drop_steps(self, txn: lmdb.Transaction, agent: str, turn: int) -> None:
        prefix = turn_key(agent, turn)
        with txn.cursor(db=self.steps_db) as cur:
            if cur.set_range(prefix):
                while cur.key()[:len(prefix)] == prefix and len(cur.key()) == len(prefix) + 4:
                    if not cur.delete():
                        break

    def close_interrupted(self, ws: Workspace) -> int:
        """End the labels of ``ws`` a daemon that stopped mid-turn left open:
        ``"interrupted": true`` at the head seq, and their ``running`` records
        ``interrupted``, in one transaction. Returns how many. Raises :class:`ReadOnly`."""
        self._check_writer(ws, None)
        now = now_iso()
        count = 0
        prefix = schema.ws_key(ws.id)
        with self.env.begin(write=True) as txn:
            found = []
            with txn.cursor(db=self.labels_db) as cur:
                if cur.set_range(prefix):
                    for key, value in cur:
                        if key[:4] != prefix:
                            break
                        if b'"end_seq": null' in value:     # open (json.dumps' spelling): the few to parse
                            found.append(json.loads(value))
            for label in found:
                if label.get("end_seq") is not None or label.get("begin_seq", 0) > ws.head_seq + 1:
                    continue
                label.update(end_seq=ws.head_seq, end_time=now, interrupted=True)
                self._put_label(txn, ws, label)
                if label["agent"] == ws.name:
                    old = self.record(label["agent"], label["turn"], txn)
                    if old is not None and old.get("status") == "running":
                        self._end_record(txn, label["agent"], label, {"status": "interrupted",
                                                                      "error": DAEMON_STOPPED}, None, False)
                count += 1
        if count:
            self.store.note_commit()
        return count

    # -- internals -------------------------------------------------------------------------

    def _check_writer(self, ws: Workspace, agent: str | None) -> None:
        if not ws.writable:
            raise ReadOnly(f"the turn log of workspace {ws.name!r} is written by its writer (the mount daemon "
                           "while it is mounted); open it for writing or use its ctl channel")
        if agent is not None and agent != ws.name:
            raise InvalidArgument(f"turn records are kept for the agent of the workspace's name "
                                  f"({ws.name!r}), not {agent!r}")

    def _check_next(self, info: dict, turn: int, txn: lmdb.Transaction) -> None:
        if turn != info["last_turn"] + 1 or self.record(info["id"], turn, txn) is not None:
            raise InvalidArgument(f"turn {turn} of agent {info['id']!r} is not its next turn "
                                  f"(last is {info['last_turn']})")

    def _put_label(self, txn: lmdb.Transaction, ws: Workspace, label: dict) -> None:
        key = schema.turn_key(ws.id, label["agent"].encode(), label["turn"])
        txn.put(key, json.dumps(label).encode(), db=self.labels_db)

    @staticmethod
    def _count_turn(info: dict, record: dict) -> None:
        info["last_turn"] = record["turn"]
        if record.get("kind") == "message":
            info["message_turns"] = info.get("message_turns", 0) + 1

    def _end_record(self, txn: lmdb.Transaction, agent: str, label: dict, outcome: dict | None,
                    snapshot: dict | None, keep: bool) -> dict | None:
        """The final record of ``label``'s turn (written with the agent's
        counters and ``snapshot``), or None if there is none to write."""
        turn = label["turn"]
        info = self.get(agent, txn)
        old = self.record(agent, turn, txn)
        if old is not None and old.get("status") != "running":
            raise InvalidArgument(f"turn {turn} of agent {agent!r} is already recorded {old.get('status')}")
        if outcome is None:
            if old is None:
                return None
            outcome = {"status": "interrupted", "error": RUNTIME_STOPPED}
        base = old if old is not None else {**RECORD_FIELDS, "message_id": label.get("message_id"),
                                            "time": label.get("begin_time")}
        record = {**base, **outcome, "turn": turn, "begin_seq": label.get("begin_seq"),
                  "end_seq": label.get("end_seq"), "end_time": label.get("end_time") or now_iso()}
        if record["status"] != "completed":
            record["patch"] = []
        if label.get("receipt"):
            record["receipt"] = label["receipt"]
        if old is None:
            files_changed = (record["end_seq"] or 0) >= (record["begin_seq"] or 0)
            if not (keep or record["patch"] or files_changed or record["status"] != "completed"):
                return None
            self._check_next(info, turn, txn)
            self._count_turn(info, record)
        record["snapshot"] = snapshot is not None
        usage = record.get("usage") or {}
        info["total_usage"] = add_usage(info.get("total_usage") or {}, usage)
        if record.get("kind") == "message":
            info["last_turn_usage"] = add_usage({}, usage)
        txn.put(turn_key(agent, turn), json.dumps(record).encode(), db=self.records_db)
        if record.get("steps"):
            self._drop_steps(txn, agent, turn)           # (old, a running record, showed them: now in record)
        if snapshot is not None:
            txn.put(turn_key(agent, turn), json.dumps(snapshot).encode(), db=self.states_db)
        txn.put(agent.encode(), json.dumps(info).encode(), db=self.agents_db)
        return record


__all__ = ["DAEMON_STOPPED", "EndedLabel", "FINAL_STATUSES", "RECORD_FIELDS", "RUNTIME_STOPPED", "StateAt",
           "TurnLog", "add_usage", "check_label", "now_iso", "turn_key"]
