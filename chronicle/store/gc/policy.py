"""Retention policies and the selection of the versions a policy keeps.

A **policy** (:class:`Policy`) says which versions of a path GC may drop.
It is data: one record per workspace (``schema.POLICIES``); a workspace
without one has :data:`DEFAULT_POLICY`. The rules are those of ``restic
forget`` and ``borg prune``, applied to each path's versions rather than to
whole snapshots:

- ``keep_last`` N — the N newest versions;
- ``keep_within`` D — every version made within D (seconds) of *now* (its age <= D);
- ``keep_hourly``/``keep_daily``/``keep_weekly`` N — walking the versions
  newest first, the newest version of each hour / day / ISO week (UTC), for
  the N newest buckets that have a version (restic: "for the last N hours
  which have one or more snapshots, keep only the most recent one");
- ``keep_turns`` K — the tree at the end of each of the last K turns (a pin,
  collected by the caller, see below);
- ``ignore`` — gitignore patterns of paths that keep no history at all
  (their latest content only); with the ``.chronicleignore`` file.

**Pins** are seqs whose whole tree must stay readable: the head, every
snapshot, the fork seq of every fork of the workspace, the end of each of
the last ``keep_turns`` turns (and open views). A pin at seq S keeps,
of each path, the version that was current at S: the newest one with seq <= S,
if the path was not deleted (or renamed away) between it and S. So a deleted
path's versions are kept by the rules alone, as git and restic keep a
deleted file only in the commits and snapshots that still hold it.

:func:`select` is pure (no store, no FUSE): given one path's versions and
the pins it returns the seqs kept, the union of every rule. It is
idempotent (selecting again from what it kept keeps all of it) and monotonic
(a larger N or D never keeps less).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from chronicle.errors import InvalidArgument

NS = 1_000_000_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([0-9]+)([smhdw])")
COUNT_MAX = 1 << 31


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``30m``, ``12h``, ``7d``, ``2w`` (also
    ``90s``, and sums like ``1d12h``). Raises :class:`InvalidArgument`."""
    given = text.strip()
    if not given or _DURATION.sub("", given):
        raise InvalidArgument(f"bad duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 30m, 12h, 7d, 2w)")
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(given))
    if seconds > 1000 * 365 * 86400:
        raise InvalidArgument(f"duration {text!r} is longer than 1000 years")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest of ``Nw``/``Nd``/``Nh``/``Nm``/``Ns`` that is exact."""
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def check_count(name: str, value: int | None) -> None:
    """Raises :class:`InvalidArgument` unless ``value`` is None or 0 .. 2**31."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= COUNT_MAX):
        raise InvalidArgument(f"--{name.replace('_', '-')} must be a whole number from 0 to {COUNT_MAX}, not {value!r}")


def check_pattern(pattern: str) -> None:
    """Raises :class:`InvalidArgument` for an empty pattern or one with a NUL or newline."""
    if not pattern.strip() or "\0" in pattern or "\n" in pattern or "\r" in pattern:
        raise InvalidArgument(f"bad ignore pattern {pattern!r}: one gitignore line, not empty")


_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_turns")


@dataclass(frozen=True, slots=True)
class Policy:
    """A retention policy (module docstring). None means "this rule keeps
    nothing"; ``keep_within`` is in seconds."""

    keep_last: int | None = None
    keep_within: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_turns: int | None = None
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in _COUNTS:
            check_count(name, getattr(self, name))
        if self.keep_within is not None and (not isinstance(self.keep_within, int) or self.keep_within < 0):
            raise InvalidArgument(f"keep_within must be seconds >= 0, not {self.keep_within!r}")
        for pattern in self.ignore:
            check_pattern(pattern)

    def as_dict(self) -> dict:
        """JSON shape (``chronicle policy show --json``): the fields, with
        ``keep_within`` also as text (``"24h"``) and ``ignore`` a list."""
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        d["keep_within_text"] = format_duration(self.keep_within) if self.keep_within is not None else None
        return d

    def encode(self) -> bytes:
        """The ``policies`` record: JSON of the fields."""
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Policy:
        """From :meth:`encode`. Raises :class:`InvalidArgument` if damaged."""
        try:
            d = json.loads(raw)
            return cls(**{k: d.get(k) for k in _COUNTS + ("keep_within",)}, ignore=tuple(d.get("ignore") or ()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"damaged policy record: {exc}") from None

    def changed(self, *, ignore_add: Iterable[str] = (), ignore_remove: Iterable[str] = (), **fields) -> Policy:
        """A copy with ``fields`` set (None values left as they are) and
        patterns added / removed (in order, each once)."""
        given = {k: v for k, v in fields.items() if v is not None}
        patterns = [p for p in self.ignore]
        for p in ignore_add:
            check_pattern(p)
            if p not in patterns:
                patterns.append(p)
        drop = set(ignore_remove)
        return replace(self, **given, ignore=tuple(p for p in patterns if p not in drop))


# The default (README "Retention"): everything for a day, then hourly for two
# days, daily for a month, weekly for a year; always the last 10 versions of
# a path and the trees of the last 20 turns. Dependency trees, byte-code
# caches and SQLite's write-ahead files change constantly and are rebuilt or
# meaningless on their own: latest content only.
DEFAULT_POLICY = Policy(keep_last=10, keep_within=24 * 3600, keep_hourly=48, keep_daily=30, keep_weekly=52,
                        keep_turns=20, ignore=("node_modules/", "__pycache__/", "*.pyc", "*.db-wal", "*.db-shm"))


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version of a path: its seq, its time (ns since the epoch, UTC), its turn label or None."""

    seq: int
    time_ns: int
    turn: tuple[str, int] | None = None


def _bucket(kind: str, time_ns: int) -> tuple:
    d = datetime.fromtimestamp(time_ns // NS, timezone.utc)
    if kind == "hourly":
        return (d.year, d.month, d.day, d.hour)
    if kind == "daily":
        return (d.year, d.month, d.day)
    iso = d.isocalendar()
    return (iso[0], iso[1])


def select(versions: Sequence[VersionInfo], policy: Policy, pins: Iterable[int], now_ns: int,
           gone: Sequence[int] = ()) -> set[int]:
    """The seqs of ``versions`` (one path's, any order) that ``policy`` keeps
    (module docstring): pinned versions, ``keep_last``, ``keep_within``
    (against ``now_ns``, ns since the epoch) and the bucket rules. ``gone``:
    the seqs at which the path went away (deleted, renamed away); a pin
    after a removal keeps nothing of what came before it. Pure."""
    ordered = sorted(versions, key=lambda v: v.seq)
    seqs = [v.seq for v in ordered]
    removals = sorted(gone)
    kept: set[int] = set()
    for pin in pins:
        i = bisect_right(seqs, pin)
        if i and not _gone_between(removals, seqs[i - 1], pin):
            kept.add(seqs[i - 1])
    newest_first = ordered[::-1]
    if policy.keep_last:
        kept.update(v.seq for v in newest_first[:policy.keep_last])
    if policy.keep_within is not None:
        cutoff = now_ns - policy.keep_within * NS
        kept.update(v.seq for v in ordered if v.time_ns >= cutoff)
    for kind, count in (("hourly", policy.keep_hourly), ("daily", policy.keep_daily),
                        ("weekly", policy.keep_weekly)):
        if not count:
            continue
        seen: set[tuple] = set()
        for v in newest_first:
            b = _bucket(kind, v.time_ns)
            if b not in seen:
                if len(seen) == count:
                    break
                seen.add(b)
                kept.add(v.seq)
    return kept


def _gone_between(removals: Sequence[int], after: int, upto: int) -> bool:
    """True if a removal seq lies in ``(after, upto]``."""
    i = bisect_right(removals, after)
    return i < len(removals) and removals[i] <= upto
