"""Tracked containers: a list and a dict that record their own changes.

Vocabulary (shared with :mod:`agent_runtime.delta_state`):

- **op** — one RFC 6902 JSON Patch operation, a dict such as
  ``{"op": "add", "path": "/history/3", "value": "hi"}``. Only ``add``,
  ``remove`` and ``replace`` are produced.
- **patch** — a list of ops, applied in order.
- **path** — an RFC 6901 JSON Pointer: ``/`` then each token, where ``~`` in a
  token is written ``~0`` and ``/`` is written ``~1``. The first token is a
  field name.
- **root** — the object at the top of a tree of tracked containers (a
  ``DeltaState``). It takes recorded ops (``_record``) and turns a value that
  does not fit into a :class:`~chronicle.errors.StateError` (``_value_error``).
- **tracked container** — a :class:`TrackedList` or :class:`TrackedDict`. It
  holds only JSON values: ``None``, ``bool``, ``int``, finite ``float``,
  ``str``, and tracked containers; each child container links back to its
  parent. Every mutating method changes the container and then, if the
  container is *attached* (its chain of parents reaches a root), records the ops
  that make the same change to the JSON document, with paths computed at that
  moment. A container that was removed from the state is *detached*: it still
  behaves as a list or dict, but records nothing.
- **item schema** — the object each container asks to check and convert a
  value before it is stored (``adopt(value) -> stored value``, raising
  :class:`Mismatch`). ``delta_state`` provides it; this module only calls it.
  Adopting copies containers into new tracked ones, so a value is never stored
  in two places (JSON value semantics, no aliasing).

Paths of list children: a child caches its index; a list remembers the
smallest position where a change may have shifted its children (``_stale``)
and renumbers from there only when a child below asks for its path, so an
insert at the front costs one pass, not one per later nested change.

A method that raises leaves the container unchanged and records nothing
(values are checked and copied before the first change; ``sort`` sorts a copy).

Threads: none of this is thread-safe; a state belongs to one turn at a time.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from typing import Any, Protocol, SupportsIndex

from chronicle.errors import StateError

__all__ = [
    "ItemSchema",
    "Mismatch",
    "TrackedDict",
    "TrackedList",
    "escape_token",
    "pointer",
    "to_plain",
]

_MISSING: Any = object()


def escape_token(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901 §3): ``~`` → ``~0``, ``/`` → ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer(tokens: Iterable[str]) -> str:
    """The JSON Pointer (RFC 6901) for ``tokens``, outermost first; ``""`` for none."""
    return "".join("/" + escape_token(t) for t in tokens)


def to_plain(value: Any) -> Any:
    """A deep copy of a JSON value with plain ``list``/``dict`` in place of tracked ones."""
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


class Mismatch(Exception):
    """Internal: a value does not fit its schema or is not JSON.

    ``reason`` is the message for the user; ``tokens`` is the path from the
    value that was offered down to the part that is wrong, *innermost first*
    (each level appends its token while the exception travels up).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tokens: list[str] = []


class ItemSchema(Protocol):
    """What a container asks to check and store a new child value."""

    def adopt(self, value: Any) -> Any:
        """The value to store: a normalised scalar or a new detached tracked container.

        Raises :class:`Mismatch` if ``value`` does not fit.
        """
        ...


class _Node:
    """Behaviour shared by both containers: locating and recording."""

    __slots__ = ()
    _parent: Any
    _key: str | None
    _index: int
    _item: ItemSchema

    def _locate(self) -> tuple[Any, list[str]] | None:
        """``(root, tokens of this container's path)``, or None when detached."""
        tokens: list[str] = []
        node: _Node = self
        parent = node._parent
        while parent is not None:
            if isinstance(parent, TrackedList):
                tokens.append(str(parent._index_of(node)))
            else:
                tokens.append(node._key)  # type: ignore[arg-type]
            if not isinstance(parent, _Node):
                tokens.reverse()
                return parent, tokens
            node = parent
            parent = node._parent
        return None

    def _where(self) -> tuple[Any, str] | None:
        """``(root, JSON Pointer of this container)``, or None when detached."""
        located = self._locate()
        if located is None:
            return None
        return located[0], pointer(located[1])

    def _adopt(self, value: Any, token: str) -> Any:
        """``value`` checked and copied for storing under ``token`` of this container."""
        try:
            return self._item.adopt(value)
        except Mismatch as err:
            err.tokens.append(token)
            raise self._error(err) from None

    def _error(self, err: Mismatch) -> StateError:
        inner = list(reversed(err.tokens))
        located = self._locate()
        if located is None:
            return StateError(f"in a container no longer part of the state, at {pointer(inner) or '/'}: {err.reason}")
        root, tokens = located
        return root._value_error(tokens + inner, err.reason)

    def _record_each(self, ops: Iterable[tuple[str, str, Any]]) -> None:
        """Record ``(op, token, value)`` triples, paths relative to this container."""
        where = self._where()
        if where is None:
            return
        root, base = where
        for op, token, value in ops:
            rec = {"op": op, "path": base + "/" + escape_token(token)}
            if op != "remove":
                rec["value"] = to_plain(value)
            root._record(rec)

    def _record_whole(self) -> None:
        """Record a ``replace`` of this whole container with its current content."""
        where = self._where()
        if where is not None:
            root, base = where
            root._record({"op": "replace", "path": base, "value": to_plain(self)})

    def __copy__(self) -> Any:
        # A plain shallow copy, as list.copy and dict.copy give.
        return list(self) if isinstance(self, list) else dict(self)  # type: ignore[call-overload]

    def __deepcopy__(self, memo: dict) -> Any:
        return to_plain(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # Pickles as the plain value: the link to a parent is not data.
        plain = to_plain(self)
        return type(plain), (plain,)


def _detach(value: Any) -> None:
    if isinstance(value, _Node):
        value._parent = None


class TrackedList(_Node, list):
    """A ``list`` whose mutations are recorded as JSON Patch ops.

    Python's list behaviour is kept (the same results and the same exceptions)
    with these differences, all from JSON value semantics: a stored container is
    a copy of the one given; ``sort`` is all-or-nothing; ``*=`` repeats copies.
    ``sort``, ``reverse`` and ``clear`` record one ``replace`` of the whole list.
    Raises :class:`~chronicle.errors.StateError` for a value that is not JSON or
    not of the declared item type.
    """

    __slots__ = ("_parent", "_key", "_index", "_item", "_stale")

    def __init__(self, item: ItemSchema, values: Iterable[Any] = ()) -> None:
        """A detached list of already adopted ``values`` checked by ``item``."""
        list.__init__(self, values)
        self._parent = None
        self._key = None
        self._index = -1
        self._item = item
        for i, v in enumerate(self):
            self._link(v, i)
        self._stale = len(self)

    # -- index bookkeeping ---------------------------------------------------

    def _index_of(self, child: _Node) -> int:
        if 0 <= child._index < self._stale:
            return child._index
        start = self._stale
        for i, v in enumerate(itertools.islice(list.__iter__(self), start, None), start):
            if isinstance(v, _Node):
                v._index = i
        self._stale = len(self)
        return child._index

    def _link(self, value: Any, index: int) -> None:
        if isinstance(value, _Node):
            value._parent = self
            value._key = None
            value._index = index

    def _shifted(self, start: int) -> None:
        """Children at ``start`` and after may have moved."""
        if start < self._stale:
            self._stale = start

    def _norm(self, index: SupportsIndex, message: str) -> int:
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(message)
        return i

    # -- adding ----------------------------------------------------------------

    def append(self, value: Any) -> None:
        n = len(self)
        new = self._adopt(value, str(n))
        list.append(self, new)
        self._link(new, n)
        if self._stale == n:
            self._stale = n + 1
        self._record_each([("add", str(n), new)])

    def insert(self, index: SupportsIndex, value: Any) -> None:
        n = len(self)
        i = operator.index(index)
        i = max(0, i + n) if i < 0 else min(i, n)
        new = self._adopt(value, str(i))
        list.insert(self, i, new)
        self._link(new, i)
        self._shifted(i)
        self._record_each([("add", str(i), new)])

    def extend(self, values: Iterable[Any]) -> None:
        items = list(values)  # first, so that lst.extend(lst) sees the old content
        n = len(self)
        new = [self._adopt(v, str(n + j)) for j, v in enumerate(items)]
        list.extend(self, new)
        for j, v in enumerate(new):
            self._link(v, n + j)
        if self._stale == n:
            self._stale = len(self)
        self._record_each([("add", str(n + j), v) for j, v in enumerate(new)])

    def __iadd__(self, values: Iterable[Any]) -> TrackedList:  # type: ignore[override,misc]
        self.extend(values)
        return self

    def __imul__(self, times: SupportsIndex) -> TrackedList:  # type: ignore[override,misc]
        k = operator.index(times)
        if k <= 0:
            self.clear()
        elif k > 1 and len(self):
            self.extend(to_plain(self) * (k - 1))
        return self

    # -- removing --------------------------------------------------------------

    def pop(self, index: SupportsIndex = -1) -> Any:
        if not len(self):
            raise IndexError("pop from empty list")
        i = self._norm(index, "pop index out of range")
        old = list.pop(self, i)
        _detach(old)
        self._shifted(i)
        self._record_each([("remove", str(i), None)])
        return old

    def remove(self, value: Any) -> None:
        try:
            i = list.index(self, value)
        except ValueError:
            raise ValueError("list.remove(x): x not in list") from None
        self.pop(i)

    def clear(self) -> None:
        old = list(self)
        list.clear(self)
        for v in old:
            _detach(v)
        self._stale = 0
        self._record_whole()

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        if not isinstance(index, slice):
            self.pop(self._norm(index, "list assignment index out of range"))
            return
        positions = range(*index.indices(len(self)))
        if not positions:
            return
        get = list.__getitem__
        old = [get(self, i) for i in positions]
        list.__delitem__(self, index)
        for v in old:
            _detach(v)
        self._shifted(min(positions))
        # Highest index first, so each op's index is still the one it names.
        self._record_each([("remove", str(i), None) for i in sorted(positions, reverse=True)])

    # -- replacing -------------------------------------------------------------

    def __setitem__(self, index: SupportsIndex | slice, value: Any) -> None:
        if isinstance(index, slice):
            self._set_slice(index, value)
            return
        i = self._norm(index, "list assignment index out of range")
        old = list.__getitem__(self, i)
        if value is old and isinstance(old, _Node):
            return  # lst[i] += ...: the child changed itself and recorded it
        new = self._adopt(value, str(i))
        list.__setitem__(self, i, new)
        self._link(new, i)
        _detach(old)
        self._record_each([("replace", str(i), new)])

    def _set_slice(self, index: slice, values: Iterable[Any]) -> None:
        items = list(values)
        start, stop, step = index.indices(len(self))
        if step != 1:
            positions = range(start, stop, step)
            if len(items) != len(positions):
                raise ValueError(
                    f"attempt to assign sequence of size {len(items)} to extended slice of size {len(positions)}"
                )
            new = [self._adopt(v, str(i)) for i, v in zip(positions, items)]
            get = list.__getitem__
            for i, v in zip(positions, new):
                old = get(self, i)
                list.__setitem__(self, i, v)
                self._link(v, i)
                _detach(old)
            self._record_each([("replace", str(i), v) for i, v in zip(positions, new)])
            return
        k = max(0, stop - start)  # lst[5:2] = x inserts at 5, as list does
        m = len(items)
        new = [self._adopt(v, str(start + j)) for j, v in enumerate(items)]
        old = list.__getitem__(self, slice(start, start + k))
        list.__setitem__(self, slice(start, start + k), new)
        for v in old:
            _detach(v)
        for j, v in enumerate(new):
            self._link(v, start + j)
        if m != k:
            self._shifted(start + min(m, k))
        ops: list[tuple[str, str, Any]] = [("replace", str(start + j), new[j]) for j in range(min(m, k))]
        ops += [("remove", str(i), None) for i in range(start + k - 1, start + m - 1, -1)]
        ops += [("add", str(start + j), new[j]) for j in range(k, m)]
        self._record_each(ops)

    # -- reordering ------------------------------------------------------------

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        ordered = sorted(self, key=key, reverse=reverse)  # may raise: the list is untouched
        list.__setitem__(self, slice(None), ordered)
        self._stale = 0
        self._record_whole()

    def reverse(self) -> None:
        list.reverse(self)
        self._stale = 0
        self._record_whole()


class TrackedDict(_Node, dict):
    """A ``dict`` with ``str`` keys whose mutations are recorded as JSON Patch ops.

    Setting a new key records ``add``, an existing one ``replace``; ``del``,
    ``pop`` and ``popitem`` record ``remove``; ``clear`` records one ``replace``
    of the whole dict with ``{}``. ``update`` (and ``|=``) checks every value
    before it changes anything. Raises :class:`~chronicle.errors.StateError`
    for a key that is not a ``str`` or a value that is not JSON or not of the
    declared value type; ``KeyError`` as ``dict`` does.
    """

    __slots__ = ("_parent", "_key", "_index", "_item")

    def __init__(self, item: ItemSchema, values: Iterable[tuple[str, Any]] = ()) -> None:
        """A detached dict of already adopted ``values`` checked by ``item``."""
        dict.__init__(self, values)
        self._parent = None
        self._key = None
        self._index = -1
        self._item = item
        for k, v in self.items():
            self._link(v, k)

    def _link(self, value: Any, key: str) -> None:
        if isinstance(value, _Node):
            value._parent = self
            value._key = key

    def _check_key(self, key: Any) -> str:
        if type(key) is str:
            return key
        if isinstance(key, str):
            return str.__str__(key)
        err = Mismatch(f"dict keys must be str in JSON, got {type(key).__name__} ({key!r})")
        raise self._error(err)

    def _prepare(self, pairs: Iterable[tuple[Any, Any]]) -> list[tuple[str, Any]]:
        """Check and copy every new value before anything changes."""
        out = []
        seen: set[str] = set()
        for key, value in pairs:
            key = self._check_key(key)
            current = dict.get(self, key, _MISSING)
            if value is current and key not in seen and isinstance(current, _Node):
                out.append((key, _MISSING))  # the value already stored there
            else:
                out.append((key, self._adopt(value, key)))
            seen.add(key)
        return out

    def _apply(self, prepared: list[tuple[str, Any]]) -> None:
        ops = []
        for key, new in prepared:
            if new is _MISSING:
                continue
            old = dict.get(self, key, _MISSING)
            dict.__setitem__(self, key, new)
            self._link(new, key)
            if old is _MISSING:
                ops.append(("add", key, new))
            else:
                _detach(old)
                ops.append(("replace", key, new))
        self._record_each(ops)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._apply(self._prepare([(key, value)]))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:  # type: ignore[override]
        pairs: list[tuple[Any, Any]] = []
        if hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]
        else:
            for n, item in enumerate(other):
                try:
                    pair = tuple(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{n} to a sequence"
                    ) from None
                if len(pair) != 2:
                    raise ValueError(f"dictionary update sequence element #{n} has length {len(pair)}; 2 is required")
                pairs.append(pair)
        pairs.extend(kwargs.items())
        self._apply(self._prepare(pairs))

    def __ior__(self, other: Any) -> TrackedDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def __delitem__(self, key: Any) -> None:
        old = dict.pop(self, key)  # KeyError as dict gives it
        _detach(old)
        self._record_each([("remove", key, None)])

    def pop(self, key: Any, *default: Any) -> Any:
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        old = dict.pop(self, key)
        _detach(old)
        self._record_each([("remove", key, None)])
        return old

    def popitem(self) -> tuple[str, Any]:
        key, old = dict.popitem(self)
        _detach(old)
        self._record_each([("remove", key, None)])
        return key, old

    def clear(self) -> None:
        old = list(dict.values(self))
        dict.clear(self)
        for v in old:
            _detach(v)
        self._record_whole()

    @classmethod
    def fromkeys(cls, keys: Iterable[Any], value: Any = None) -> dict:  # type: ignore[override]
        return dict.fromkeys(keys, value)
