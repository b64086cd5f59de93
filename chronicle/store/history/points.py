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
                              (UTC years 0001 to 9999)
  ==========================  ===============================================

  Numbers (a seq, a turn's N, and a version number elsewhere) are
  **canonical**: ASCII decimal digits, no sign, no leading zero, no spaces
  (:func:`parse_number`), so each number has one spelling; ``01``, `` 1``,
  ``+1`` or ``٣`` name nothing. An agent name has no ``:`` (``turn:a:b:1``
  could not say where it ends).

- a **snapshot** is a name for a seq (``{"name", "seq", "time"}``, database
  ``snapshots``). A name that reads as another point form (``12``, ``012``,
  ``turn:a:1``, ``snapshot:x``, ``2026-01-01...``) is refused: it would
  shadow that point or be shadowed by it. A fork sees its parent's snapshots up to the fork seq and
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
from chronicle.store.history.turns import TURN_MAX, check_label
from chronicle.store.meta.journal import iso_time, parse_iso_time

if TYPE_CHECKING:       # types only: namespace imports history (paths), so history imports no namespace
    from chronicle.store.namespace.workspace import Workspace

_NUMBER = re.compile(r"0|[1-9][0-9]*")         # canonical: ASCII digits, no sign, no leading zero
_NUMBER_LIKE = re.compile(r"\s*[+-]?\d+\s*")    # what a reader would take for a number (any script)
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_POINT_PREFIXES = ("turn:", "snapshot:")
SNAPSHOT_NAME_MAX = 255      # bytes of UTF-8: the name is a directory name under .chronicle/snapshots


@dataclass(frozen=True, slots=True)
class TurnLabel:
    """``AGENT:N``: turn ``number`` of ``agent``."""

    agent: str
    number: int


# -- snapshots -----------------------------------------------------------------------------


def parse_number(text: str) -> int | None:
    """The value of ``text`` if it is a canonical number (ASCII decimal
    digits, no sign, no leading zero, no spaces: ``0``, ``17``), else None."""
    return int(text) if isinstance(text, str) and _NUMBER.fullmatch(text) else None


def check_snapshot_name(name: str) -> None:
    """Raise :class:`InvalidArgument` unless ``name`` can name a snapshot: valid
    Unicode, 1–255 bytes of UTF-8, no ``/`` or NUL, not ``.`` or ``..``, and
    not a name that reads as a seq, a turn or a time (module docstring)."""
    try:
        encoded = name.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise InvalidArgument("a snapshot name must be valid Unicode text") from None
    if not name or "/" in name or "\x00" in name or len(encoded) > SNAPSHOT_NAME_MAX or name in (".", ".."):
        raise InvalidArgument(f"invalid snapshot name {name!r}")
    if _NUMBER_LIKE.fullmatch(name) or name.startswith(_POINT_PREFIXES) or _TIME.match(name):
        raise InvalidArgument(f"invalid snapshot name {name!r}: it reads as a seq, a turn, a time or snapshot:NAME "
                              "(choose a name that starts with a letter, e.g. 'v1')")


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
    (``turn:`` not followed by ``AGENT:N``, a number that is not canonical,
    a malformed ISO-8601 time or one outside the years 0001 to 9999).
    """
    text = str(point)
    seq = parse_number(text)
    if seq is not None:
        if seq > ws.head_seq:
            raise NotFound(f"seq {seq} does not exist yet (head is {ws.head_seq})")
        return seq
    if _NUMBER_LIKE.fullmatch(text):
        raise InvalidArgument(f"{text!r} is not a seq: write a seq in plain decimal digits, like 17")
    if text.startswith("turn:"):
        try:
            label = parse_turn_label(text)
        except InvalidArgument as exc:
            raise InvalidArgument(f"a turn point is turn:AGENT:N, not {text!r} ({exc})") from None
        return turn_end_seq(ws, label)
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
    """``AGENT:N`` or ``turn:AGENT:N``: an agent name (1 to 255 bytes of
    UTF-8, no NUL, no ``:``) and a canonical turn number (0 .. 2**32-1).
    Raises :class:`InvalidArgument`."""
    body = text[len("turn:"):] if text.startswith("turn:") else text
    agent, sep, digits = body.rpartition(":")
    number = parse_number(digits)
    if not sep or not agent or number is None:
        raise InvalidArgument(f"expected AGENT:N (e.g. planner:3; N in plain decimal digits), not {text!r}")
    if number > TURN_MAX:
        raise InvalidArgument(f"expected AGENT:N with N at most {TURN_MAX}, not {text!r}")
    check_label(agent, number)
    return TurnLabel(agent, number)


def _time_ns(text: str) -> int:
    try:
        return parse_iso_time(text)
    except ValueError:
        raise InvalidArgument(f"not an ISO-8601 time in the years 0001 to 9999 UTC: {text!r}") from None


# -- ranges --------------------------------------------------------------------------------


def since_seq(ws: Workspace, point: str) -> int:
    """The first seq ``--since point`` lets through (module docstring).
    Raises as :func:`resolve_point`."""
    seq = resolve_point(ws, point)
    text = str(point)
    if parse_number(text) is not None:
        return seq
    if text.startswith(_POINT_PREFIXES) or snapshot_seq(ws, text) is not None:
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
