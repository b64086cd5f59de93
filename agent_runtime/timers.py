"""Durable timers, compaction points and quota backoff: the runtime's bookkeeping for them.

**Timers.** A turn that ends in ``ctx.sleep``/``sleep_until``/``pause``
leaves a timer, stored in the agent record's ``timer`` field (the part of
the record the runtime writes, ``TurnLog.update``; the turn record carries a
copy as ``suspend``, written with the turn by the workspace's writer)::

    {"kind": "sleep" | "pause", "reason", "due": epoch s | null, "until": ISO | null,
     "turn": N (the turn that set it), "set": ISO}

A :class:`TimerScheduler` holds one asyncio timer per sleeping agent of this
runtime; ``Runtime.start_timers`` (``chronicle agent serve`` on start)
schedules every stored ``sleep`` timer of the store, a past one at once. A
``pause`` is never scheduled. Any message or wake turn clears the timer.

**Compaction points.** ``ctx.compact(summary, keep_last=N)`` makes the turn
record carry ``compaction``: ``{"summary", "keep_last", "summarises": [turn
numbers], "state_turn"}`` (:func:`compaction_point`); the turn keeps a state
snapshot.

**Quotas.** A :class:`QuotaRegistry` per runtime: key -> the end of its
backoff, the hits and the last agent that hit it.

Threads: everything here belongs to the runtime's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone

from chronicle.store.history.turns import TurnLog, now_iso


def iso(epoch: float) -> str:
    """``2026-12-01T21:30:00.123Z`` for a time in seconds since the epoch."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timer_record(turn: int, request: dict) -> dict:
    """The timer a suspended turn ``turn`` leaves, from the worker's ``suspend`` (module docstring)."""
    due = request.get("due")
    due = float(due) if isinstance(due, (int, float)) and not isinstance(due, bool) else None
    return {"kind": "pause" if due is None else "sleep", "reason": str(request.get("reason") or ""),
            "due": due, "until": iso(due) if due is not None else None, "turn": turn, "set": now_iso()}


def describe_wait(timer: dict | None) -> str | None:
    """``sleeping until T (reason)`` / ``paused (reason)`` for an agent record's timer, or None."""
    if not isinstance(timer, dict):
        return None
    reason = f" ({timer['reason']})" if timer.get("reason") else ""
    if timer.get("kind") == "pause":
        return f"paused{reason}"
    return f"sleeping until {timer.get('until')}{reason}"


def wake_event(timer: dict) -> dict:
    """What ``on_wake`` receives for a due timer: ``{"reason", "kind", "due", "set_in_turn", "late_s"}``."""
    due = timer.get("due") or time.time()
    return {"reason": timer.get("reason", ""), "kind": "sleep", "due": timer.get("until") or iso(due),
            "set_in_turn": timer.get("turn"), "late_s": round(max(0.0, time.time() - due), 3)}


def compaction_point(log: TurnLog, agent: str, turn: int, request: dict) -> dict:
    """The compaction point of turn ``turn``: the message and wake turns since
    the agent's history start that no earlier point summarised, but the last
    ``keep_last`` of them."""
    info = log.get(agent)
    earlier: set[int] = set()
    candidates = []
    for rec in log.records(agent, info.get("history_from", 0) + 1, turn - 1):
        earlier.update((rec.get("compaction") or {}).get("summarises") or [])
        if rec.get("kind") in ("message", "wake"):
            candidates.append(rec["turn"])
    candidates = [t for t in candidates if t not in earlier]
    keep = int(request.get("keep_last") or 0)
    summarised = candidates[:len(candidates) - keep] if keep else candidates
    return {"summary": str(request.get("summary") or ""), "keep_last": keep, "summarises": summarised,
            "state_turn": turn}


class TimerScheduler:
    """One pending wake per agent: ``fire(agent, timer)`` is called when the timer is due."""

    def __init__(self, fire: Callable[[str, dict], None]):
        self._fire = fire
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def schedule(self, agent: str, timer: dict) -> None:
        """(Re)schedule ``agent``'s ``sleep`` timer; a ``pause`` only cancels the pending one."""
        self.cancel(agent)
        if timer.get("kind") != "sleep" or timer.get("due") is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, float(timer["due"]) - time.time())
        self._handles[agent] = loop.call_later(delay, self._due, agent, timer)

    def _due(self, agent: str, timer: dict) -> None:
        self._handles.pop(agent, None)
        self._fire(agent, timer)

    def cancel(self, agent: str) -> None:
        handle = self._handles.pop(agent, None)
        if handle is not None:
            handle.cancel()

    def pending(self) -> dict[str, float]:
        """Agent -> when its wake is due (the loop's clock, seconds)."""
        return {agent: handle.when() for agent, handle in self._handles.items()}

    def close(self) -> None:
        for agent in list(self._handles):
            self.cancel(agent)


class QuotaRegistry:
    """Backoffs by quota key (module docstring)."""

    def __init__(self) -> None:
        self._keys: dict[str, dict] = {}

    def hit(self, key: str, until: float, agent: str) -> float:
        """Record a hit of ``key`` until ``until`` (epoch s; a later backoff wins). Returns the backoff's end."""
        entry = self._keys.setdefault(key, {"until": 0.0, "hits": 0, "agent": None})
        entry["until"] = max(entry["until"], until)
        entry["hits"] += 1
        entry["agent"] = agent
        return entry["until"]

    def until(self, keys: list[str]) -> float | None:
        """When the latest backoff among ``keys`` ends, or None if none is backing off now."""
        now = time.time()
        ends = [self._keys[k]["until"] for k in keys if k in self._keys and self._keys[k]["until"] > now]
        return max(ends) if ends else None

    def active(self) -> dict[str, float]:
        """Key -> the end of its backoff (epoch s), for the keys backing off now."""
        now = time.time()
        return {k: e["until"] for k, e in self._keys.items() if e["until"] > now}

    def describe(self, keys: list[str] | None = None) -> dict[str, dict]:
        """Key -> ``{"until": ISO, "remaining_s", "backing_off", "hits", "last_agent"}`` (every key
        hit so far, or those of ``keys``)."""
        now = time.time()
        return {k: {"until": iso(e["until"]), "remaining_s": round(max(0.0, e["until"] - now), 3),
                    "backing_off": e["until"] > now, "hits": e["hits"], "last_agent": e["agent"]}
                for k, e in sorted(self._keys.items()) if keys is None or k in keys}


__all__ = ["QuotaRegistry", "TimerScheduler", "compaction_point", "describe_wait", "iso", "timer_record",
           "wake_event"]
