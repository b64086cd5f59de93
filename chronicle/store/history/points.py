"""Points in a workspace's history: names for seqs, and seq ranges.

Vocabulary:

- a **point** names one seq (one exact state of the whole tree, SPEC §1).
  Its forms, tried in this order (:func:`resolve_point`):

  ==========================  ===============================================
  form                        the seq
  ==========================  ===============================================
  ``17``                      that seq (at most the head)
  ``turn:AGENT:N``            the end of that turn (its ``end_seq``)
  ``snapshot:NAME``, ``NAME``  the seq the snapshot names
  ``2026-01-02T03:04:05Z``    the last seq at or before that ISO-8601 time
  ==========================  ===============================================

- a **snapshot** is a name for a seq (``{"name", "seq", "time"}``, database
  ``snapshots``). A fork sees its parent's snapshots up to the fork seq and
  its own after; its own win on a name clash.
- a **range** is the inclusive seq interval ``(lo, hi)`` that ``--since``,
  ``--until`` and ``--turn`` select (:func:`seq_range`); ``lo > hi`` is empty.
  ``--since`` a seq or an exact event time includes that seq; ``--since`` a
  snapshot, a turn or a time between events starts after the state it names.

Turn records are read through ``Store.get_turn`` (the turn log owns them).

Threads: plain functions; each opens its own LMDB transaction (a write
transaction only in :func:`put_snapshot`, begun and committed inside it).
Any thread.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chronicle.errors import Exists, InvalidArgument, NotFound
from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time, parse_iso_time

if TYPE_CHECKING:       # types only: namespace imports history (paths), so history imports no namespace
    from chronicle.store.namespace.workspace import Workspace

_SEQ = re.compile(r"\d+")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}")
SNAPSHOT_NAME_MAX = 255      # bytes of UTF-8: the name is a directory name under .chronicle/snapshots


@dataclass(frozen=True, slots=True)
class TurnLabel:
    """``AGENT:N``: turn ``number`` of ``agent``."""

    agent: str
    number: int


# -- snapshots -----------------------------------------------------------------------------


def check_snapshot_name(name: str) -> None:
    """Raise :class:`InvalidArgument` unless ``name`` can name a snapshot: valid
    Unicode, 1–255 bytes of UTF-8, no ``/`` or NUL, not ``.`` or ``..``."""
    try:
        encoded = name.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise InvalidArgument("a snapshot name must be valid Unicode text") from None
    if not name or "/" in name or "\x00" in name or len(encoded) > SNAPSHOT_NAME_MAX or name in (".", ".."):
        raise InvalidArgument(f"invalid snapshot name {name!r}")


def put_snapshot(ws: Workspace, name: str, seq: int) -> int:
    """Name ``seq`` of ``ws`` ``name``; returns ``seq``.

    Raises :class:`InvalidArgument` (:func:`check_snapshot_name`) or
    :class:`Exists` if ``ws`` already has a snapshot of that name.
    """
    check_snapshot_name(name)
    store = ws.store
    key = schema.named_key(ws.id, name.encode())
    with store.env.begin(write=True) as txn:
        if txn.get(key, db=store.dbs["snapshots"]) is not None:
            raise Exists(f"snapshot {name!r} already exists")
        txn.put(key, json.dumps({"name": name, "seq": seq, "time": iso_time(time.time_ns())}).encode(),
                db=store.dbs["snapshots"])
    store.note_commit()
    return seq


def snapshots(ws: Workspace) -> list[dict]:
    """``[{"name": str, "seq": int, "time": ISO-8601}]`` of ``ws`` through its
    fork layers, sorted by ``(seq, name)``."""
    store = ws.store
    out = {}
    with store.env.begin() as txn, txn.cursor(db=store.dbs["snapshots"]) as cur:
        for layer in reversed(ws.history.layers):
            prefix = schema.ws_key(layer.ws)
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:4] != prefix:
                        break
                    snap = json.loads(value)
                    if snap["seq"] <= layer.bound:
                        out[snap["name"]] = snap
    return sorted(out.values(), key=lambda s: (s["seq"], s["name"]))


def snapshot_seq(ws: Workspace, name: str) -> int | None:
    """The seq snapshot ``name`` of ``ws`` names, or None."""
    for snap in snapshots(ws):
        if snap["name"] == name:
            return snap["seq"]
    return None


# -- points --------------------------------------------------------------------------------


def resolve_point(ws: Workspace, point: str | int) -> int:
    """The seq ``point`` names (module docstring: its forms).

    Raises :class:`NotFound` (a seq after the head, an unknown name, a turn
    that does not exist or has not ended) or :class:`InvalidArgument`
    (``turn:`` not followed by ``AGENT:N``, a malformed ISO-8601 time).
    """
    text = str(point).strip()
    if _SEQ.fullmatch(text):
        seq = int(text)
        if seq > ws.head_seq:
            raise NotFound(f"seq {seq} does not exist yet (head is {ws.head_seq})")
        return seq
    if text.startswith("turn:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise InvalidArgument(f"a turn point is turn:AGENT:N, not {text!r}")
        return turn_end_seq(ws, TurnLabel(parts[1], int(parts[2])))
    name = text[len("snapshot:"):] if text.startswith("snapshot:") else text
    seq = snapshot_seq(ws, name)
    if seq is not None:
        return seq
    if _TIME.match(text):
        with ws.read_txn() as txn:
            return ws.history.seq_at_time(txn, _time_ns(text))
    raise NotFound(f"no seq, time, snapshot or turn named {text!r}")


def turn_end_seq(ws: Workspace, label: TurnLabel) -> int:
    """The seq at the end of a turn. Raises :class:`NotFound` if the turn does
    not exist or has not ended."""
    record = ws.store.get_turn(ws, label.agent, label.number)
    if record is None:
        raise NotFound(f"no turn {label.number} of agent {label.agent!r}")
    if record.get("end_seq") is None:
        raise NotFound(f"turn {label.number} of agent {label.agent!r} has not ended")
    return record["end_seq"]


def parse_turn_label(text: str) -> TurnLabel:
    """``AGENT:N`` or ``turn:AGENT:N`` (the agent may contain ``:``).
    Raises :class:`InvalidArgument`."""
    body = text[len("turn:"):] if text.startswith("turn:") else text
    agent, sep, number = body.rpartition(":")
    if not sep or not agent or not number.isdigit():
        raise InvalidArgument(f"expected AGENT:N (e.g. planner:3), not {text!r}")
    return TurnLabel(agent, int(number))


def _time_ns(text: str) -> int:
    try:
        return parse_iso_time(text)
    except ValueError:
        raise InvalidArgument(f"not an ISO-8601 time: {text!r}") from None


# -- ranges --------------------------------------------------------------------------------


def since_seq(ws: Workspace, point: str) -> int:
    """The first seq ``--since point`` lets through (module docstring).
    Raises as :func:`resolve_point`."""
    seq = resolve_point(ws, point)
    text = point.strip()
    if text.isdigit():
        return seq
    if text.startswith(("turn:", "snapshot:")) or snapshot_seq(ws, text) is not None:
        return seq + 1
    with ws.read_txn() as txn:         # a time: seq is the last event at or before it
        event = ws.history.event(txn, seq) if seq else None
    exact = event is not None and event.get("time") == iso_time(_time_ns(text))
    return seq if exact else seq + 1


def seq_range(ws: Workspace, since: str | None = None, until: str | None = None,
              turn: TurnLabel | None = None) -> tuple[int, int]:
    """The inclusive ``(lo, hi)`` seq range ``--since/--until/--turn`` select,
    within ``(0, head)``; ``lo > hi`` when it is empty.

    Raises as :func:`resolve_point`; :class:`NotFound` for an unknown turn.
    """
    lo, hi = 0, ws.head_seq
    if since is not None:
        lo = max(lo, since_seq(ws, since))
    if until is not None:
        hi = min(hi, resolve_point(ws, until))
    if turn is not None:
        record = ws.store.get_turn(ws, turn.agent, turn.number)
        if record is None:
            raise NotFound(f"no turn {turn.number} of agent {turn.agent!r} in workspace {ws.name!r}")
        lo = max(lo, record.get("begin_seq") or 0)
        if record.get("end_seq") is not None:
            hi = min(hi, record["end_seq"])
    return lo, hi
