"""Agents and their turn logs: the agent runtime's records in the store.

Vocabulary (SPEC §5):

- **agent** — a named agent whose code is ``target`` (``module:Class``) and
  whose files live in the workspace of the same name. Its **agent record**
  (JSON, database ``agents``)::

      {"id", "target", "cwd", "created", "entity_type", "state_version",
       "parent": null | {"agent", "turn"},     # a fork: whose state and files it started from
       "last_turn": N,                        # the highest turn number used
       "message_turns": N,                    # how many of them were on_message turns
       "history_from": N,                     # history() shows message turns after N
       "total_usage": {...}, "last_turn_usage": {...},
       "status": "created" | "running" | "sleeping" | "stopped"}   # as the last runtime left it

- **turn** — one numbered entry of the agent's turn log (database
  ``agent_turns``), numbered 0, 1, 2, ... per agent. Turn 0 is the agent's
  origin (``kind`` ``create`` or ``fork``). A ``message`` turn is one call of
  ``on_message``; ``init``/``idle``/``shutdown`` turns are lifecycle hooks
  that changed something; a ``rollback`` turn brought files and state back.
  The same number labels the turn's file events in the workspace (the mount's
  ``turn-begin``/``turn-end``), so ``turn:AGENT:N`` names the tree at its end.
  A **turn record**::

      {"turn", "kind", "status", "message_id", "message", "reply", "messages",
       "error", "patch": [RFC 6902 ops], "usage": {...}, "begin_seq", "end_seq",
       "time", "end_time", "duration_ms", "snapshot": bool,
       "rollback_to"?, "forked_from"?, "migrated_from"?, "target"?}

  ``begin_seq``/``end_seq`` are the workspace seqs the turn's label covered
  (``end_seq < begin_seq``: no file events; ``end_seq`` null: the mount died
  before the turn ended). ``status`` is ``running`` (written when the turn
  begins), then one of ``completed``, ``failed`` (the handler raised),
  ``cancelled``, ``interrupted`` (the worker or the runtime died during it).
  Only a completed turn's ``patch`` changed the state.

- **state snapshot** — the full state JSON after a turn (database
  ``agent_states``): ``{"version", "entity_type", "state"}``, kept for turn 0,
  every N-th turn, rollbacks and migrations. The state after turn N is the
  latest snapshot at or before N with the patches of the completed turns
  after it applied in order (RFC 6902, the ``jsonpatch`` library), so loading
  an agent reads one snapshot and at most N-1 patches, however long its log.

History is never rewritten: turn records change only from ``running`` to
their final status; a rollback is a new turn.

Threads: an :class:`AgentLog` holds no transaction; each method opens and
commits its own (one write transaction inside one call).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonpatch

from chronicle.errors import AgentExists, AgentNotFound, Corrupt, InvalidArgument, NotFound
from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time

FINAL_STATUSES = ("completed", "failed", "cancelled", "interrupted")


def turn_key(agent: str, turn: int) -> bytes:
    return agent.encode() + b"\x00" + schema.U32.pack(turn)


def _agent_prefix(agent: str) -> bytes:
    return agent.encode() + b"\x00"


def _turn_of_key(key: bytes) -> int:
    return schema.U32.unpack(key[-4:])[0]


def now_iso() -> str:
    return iso_time(time.time_ns())


def add_usage(total: dict, usage: dict | None) -> dict:
    """``total`` plus ``usage``, counter by counter (numbers only)."""
    out = dict(total)
    for key, value in (usage or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


@dataclass(frozen=True, slots=True)
class StateAt:
    """The state JSON after turn ``turn``, stored under state ``version``."""

    turn: int
    state: dict
    version: int
    entity_type: str | None
    snapshot_turn: int          # the snapshot it was rebuilt from
    patches: int                # how many patches were applied on top


class AgentLog:
    """The agent records of one open :class:`~chronicle.store.store.Store`."""

    def __init__(self, store):
        self.store = store
        self.env = store.env
        self.agents_db = store.dbs["agents"]
        self.turns_db = store.dbs["agent_turns"]
        self.states_db = store.dbs["agent_states"]

    # -- agents ------------------------------------------------------------------------

    def get(self, agent: str, txn=None) -> dict:
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

    def create(self, record: dict, turn0: dict, snapshot: dict) -> None:
        """Add a new agent with its turn 0 and that turn's state snapshot.

        Raises :class:`AgentExists`.
        """
        agent = record["id"]
        with self.env.begin(write=True) as txn:
            if txn.get(agent.encode(), db=self.agents_db) is not None:
                raise AgentExists(f"agent {agent!r} already exists")
            # Leftovers of a deleted agent of the same name would mix into its log.
            self._delete_records(txn, agent)
            txn.put(agent.encode(), json.dumps(record).encode(), db=self.agents_db)
            txn.put(turn_key(agent, 0), json.dumps(turn0).encode(), db=self.turns_db)
            txn.put(turn_key(agent, 0), json.dumps(snapshot).encode(), db=self.states_db)
        self.store.note_commit()

    def update(self, agent: str, **fields: Any) -> dict:
        """Set fields of the agent record; returns the new record."""
        with self.env.begin(write=True) as txn:
            record = self.get(agent, txn)
            record.update(fields)
            txn.put(agent.encode(), json.dumps(record).encode(), db=self.agents_db)
        self.store.note_commit()
        return record

    def delete(self, agent: str) -> None:
        """Remove the agent record, its turn log and its snapshots (not its workspace)."""
        with self.env.begin(write=True) as txn:
            self.get(agent, txn)
            txn.delete(agent.encode(), db=self.agents_db)
            self._delete_records(txn, agent)
        self.store.note_commit()

    def _delete_records(self, txn, agent: str) -> None:
        prefix = _agent_prefix(agent)
        for db in (self.turns_db, self.states_db):
            with txn.cursor(db=db) as cur:
                if not cur.set_range(prefix):
                    continue
                while cur.key()[:len(prefix)] == prefix:
                    if not cur.delete():
                        break

    # -- turns -------------------------------------------------------------------------

    def turn(self, agent: str, turn: int, txn=None) -> dict | None:
        if txn is None:
            with self.env.begin() as rtxn:
                return self.turn(agent, turn, rtxn)
        if turn < 0 or turn > 0xFFFFFFFF:
            return None
        raw = txn.get(turn_key(agent, turn), db=self.turns_db)
        return None if raw is None else json.loads(raw)

    def turns(self, agent: str, since: int = 0, until: int | None = None, txn=None) -> Iterator[dict]:
        """Turn records with ``since <= turn <= until``, oldest first."""
        if txn is None:
            with self.env.begin() as rtxn:
                yield from self.turns(agent, since, until, rtxn)
            return
        prefix = _agent_prefix(agent)
        with txn.cursor(db=self.turns_db) as cur:
            if not cur.set_range(turn_key(agent, max(0, since))):
                return
            for key, value in cur:
                if key[:len(prefix)] != prefix:
                    break
                if until is not None and _turn_of_key(key) > until:
                    break
                yield json.loads(value)

    def begin_turn(self, agent: str, record: dict) -> None:
        """Write a new turn (usually ``running``) as the agent's next number.

        Raises :class:`InvalidArgument` if ``record["turn"]`` is not
        ``last_turn + 1``.
        """
        self.put_turn(agent, record, new=True)

    def put_turn(self, agent: str, record: dict, *, new: bool = False, snapshot: dict | None = None) -> dict:
        """Write a turn record (and the state snapshot after it), updating the
        agent's counters in the same transaction. ``new``: the turn takes the
        next number. A record reaching a final status adds its usage to the
        agent's totals. Returns the agent record.
        """
        n = record["turn"]
        with self.env.begin(write=True) as txn:
            info = self.get(agent, txn)
            old = self.turn(agent, n, txn)
            if new:
                if n != info["last_turn"] + 1 or old is not None:
                    raise InvalidArgument(f"turn {n} of agent {agent!r} is not its next turn "
                                          f"(last is {info['last_turn']})")
                info["last_turn"] = n
                if record.get("kind") == "message":
                    info["message_turns"] = info.get("message_turns", 0) + 1
            elif old is None:
                raise NotFound(f"agent {agent!r} has no turn {n}")
            was_final = old is not None and old.get("status") in FINAL_STATUSES
            if record.get("status") in FINAL_STATUSES and not was_final:
                usage = record.get("usage") or {}
                info["total_usage"] = add_usage(info.get("total_usage") or {}, usage)
                if record.get("kind") == "message":
                    info["last_turn_usage"] = add_usage({}, usage)
            txn.put(turn_key(agent, n), json.dumps(record).encode(), db=self.turns_db)
            if snapshot is not None:
                txn.put(turn_key(agent, n), json.dumps(snapshot).encode(), db=self.states_db)
            txn.put(agent.encode(), json.dumps(info).encode(), db=self.agents_db)
        self.store.note_commit()
        return info

    # -- state -------------------------------------------------------------------------

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
            snap_turn, snap = self._snapshot_at(txn, agent, turn)
            state = snap["state"]
            applied = 0
            for record in self.turns(agent, snap_turn + 1, turn, txn):
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

    def _snapshot_at(self, txn, agent: str, turn: int) -> tuple[int, dict]:
        """``(turn, snapshot)`` of the latest snapshot at or before ``turn``."""
        prefix = _agent_prefix(agent)
        with txn.cursor(db=self.states_db) as cur:
            found = cur.set_range(turn_key(agent, turn + 1)) if turn < 0xFFFFFFFF else False
            moved = cur.prev() if found else cur.last()
            if moved and cur.key()[:len(prefix)] == prefix:
                return _turn_of_key(cur.key()), json.loads(cur.value())
        raise Corrupt(f"agent {agent!r} has no state snapshot at or before turn {turn}")

    # -- file events -------------------------------------------------------------------

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


__all__ = ["AgentLog", "StateAt", "FINAL_STATUSES", "add_usage", "now_iso", "turn_key"]
