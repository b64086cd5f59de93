"""DeltaState: an agent's typed state that records each change as JSON Patch.

Vocabulary:

- **field** — a name declared on a ``DeltaState`` subclass by a class
  annotation, usually with a default (``count: int = 0``). Names starting with
  ``_`` and ``ClassVar`` annotations are not fields; ``_version`` and
  ``_entity_type`` are class-level settings.
- **state JSON** — ``{field: value, ...}``, every value a JSON value (RFC 8259:
  ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists, dicts with
  ``str`` keys). :meth:`DeltaState.to_json` gives it.
- **op** — one RFC 6902 JSON Patch operation (``add``, ``remove`` or
  ``replace``) with an RFC 6901 JSON Pointer ``path`` whose first token is the
  field name, e.g. ``{"op": "add", "path": "/history/0", "value": "hi"}``.
- **patch** — the list of ops recorded since the last
  :meth:`DeltaState.drain_patch`. Applying it, in order, to the state JSON
  taken at that drain gives the state JSON now.
- **tracked container** — the ``list``/``dict`` subclasses of
  :mod:`agent_runtime.tracked` that hold container values in the state. They
  record each change *when it happens* (not by diffing), at any depth.
- **schema** — what a field's annotation allows, checked on every assignment
  and on every value put into a container. Supported annotations: ``int``,
  ``float`` (an ``int`` is accepted), ``str``, ``bool`` (not an ``int``),
  ``None``, ``list[X]``, ``dict[str, X]`` (bare ``list``/``dict`` hold any JSON),
  ``X | Y``, ``Optional[X]``, ``Union[...]``, ``typing.Any`` (any JSON value),
  nested to any depth. In a union of several list (or dict) types the items may
  be of any of their item types.

Value semantics: a container assigned or appended into the state is *copied*
into new tracked containers, as a JSON document would hold it. After
``state.a = state.b`` or ``lst.append(other)`` the two places are independent,
and changing the object you passed in changes nothing in the state. A container
that leaves the state (popped, replaced, cleared, or dropped by
:meth:`DeltaState.reset_to`) still works as a list or dict but records nothing.
Assigning a container to the place that already holds it (as ``+=`` does)
changes and records nothing more.

Errors: :class:`~chronicle.errors.StateError` for a value of the wrong type, a
value that is not JSON (a set, a tuple, an object, a non-``str`` dict key, NaN
or infinity), an unknown or missing field, an unsupported annotation (raised
when the class is defined), and stored data that cannot be loaded or migrated.
A call that raises changes nothing and records nothing.

Limits: annotations are evaluated when the class is defined, so with
``from __future__ import annotations`` they may name only module-level types.
Code that changes a list through CPython's C API instead of its methods
(``heapq``) bypasses the recording; use the list's methods. ``list.sort``,
``reverse`` and ``clear`` (and ``dict.clear``) record one ``replace`` of the
whole container.

Threads: a state belongs to one turn of one agent at a time; nothing here is
thread-safe.
"""

from __future__ import annotations

import math
import re
import reprlib
import types
import typing
from typing import Any, ClassVar

from chronicle.errors import StateError

from agent_runtime.tracked import Mismatch, TrackedDict, TrackedList, pointer, to_plain

__all__ = ["DeltaState", "StateError"]

_MISSING: Any = object()
_KINDS = frozenset({"null", "bool", "int", "float", "str", "list", "dict"})
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


# --- schemas: what an annotation allows ------------------------------------


class _Schema:
    """The JSON kinds a value may have, and the schemas of list items and dict values."""

    __slots__ = ("name", "kinds", "list_item", "dict_item")

    def __init__(
        self,
        name: str,
        kinds: frozenset[str],
        list_item: _Schema | None = None,
        dict_item: _Schema | None = None,
    ) -> None:
        self.name = name
        self.kinds = kinds
        self.list_item = list_item
        self.dict_item = dict_item

    @property
    def is_any(self) -> bool:
        return self is _ANY

    def adopt(self, value: Any) -> Any:
        """``value`` as stored: a normalised scalar or new detached tracked containers.

        Raises :class:`~agent_runtime.tracked.Mismatch`.
        """
        return _adopt(self, value, set())

    def __repr__(self) -> str:
        return f"<schema {self.name}>"


_ANY = _Schema("Any", _KINDS)
_ANY.list_item = _ANY
_ANY.dict_item = _ANY
_SCALARS = {
    int: _Schema("int", frozenset({"int"})),
    float: _Schema("float", frozenset({"int", "float"})),
    str: _Schema("str", frozenset({"str"})),
    bool: _Schema("bool", frozenset({"bool"})),
    type(None): _Schema("None", frozenset({"null"})),
}


def _union(arms: list[_Schema], name: str | None = None) -> _Schema:
    if any(arm.is_any for arm in arms):
        return _ANY
    if len(arms) == 1:
        return arms[0]
    lists = [arm.list_item for arm in arms if arm.list_item is not None]
    dicts = [arm.dict_item for arm in arms if arm.dict_item is not None]
    return _Schema(
        name or " | ".join(arm.name for arm in arms),
        frozenset().union(*(arm.kinds for arm in arms)),
        _union(lists) if lists else None,
        _union(dicts) if dicts else None,
    )


def _schema_of(tp: Any, where: str) -> _Schema:
    """The schema for annotation ``tp``; StateError naming ``where`` if unsupported."""
    if tp is Any:
        return _ANY
    if tp is None:
        tp = type(None)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if tp is list:
        return _Schema("list", frozenset({"list"}), list_item=_ANY)
    if tp is dict:
        return _Schema("dict", frozenset({"dict"}), dict_item=_ANY)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        item = _schema_of(args[0], where) if args else _ANY
        return _Schema(f"list[{item.name}]", frozenset({"list"}), list_item=item)
    if origin is dict:
        if args and args[0] is not str:
            raise StateError(f"{where}: dict keys must be str in JSON, not {_type_name(args[0])}")
        item = _schema_of(args[1], where) if args else _ANY
        return _Schema(f"dict[str, {item.name}]", frozenset({"dict"}), dict_item=item)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_schema_of(arg, where) for arg in args])
    raise StateError(
        f"{where}: unsupported annotation {_type_name(tp)}; use int, float, str, bool, None, "
        "list[...], dict[str, ...], a union of these, or typing.Any"
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp)


def _describe(value: Any) -> str:
    kind = "list" if isinstance(value, list) else "dict" if isinstance(value, dict) else type(value).__name__
    return f"{kind} ({_short.repr(value)})"


def _classify(value: Any) -> tuple[str | None, Any]:
    """``(JSON kind or None, value normalised to the exact built-in type)``."""
    t = type(value)
    if t is str:
        return "str", value
    if t is int:
        return "int", value
    if t is float:
        return "float", value
    if t is bool:
        return "bool", value
    if value is None:
        return "null", value
    if isinstance(value, list):
        return "list", value
    if isinstance(value, dict):
        return "dict", value
    # Subclasses (enums, numpy floats) are stored as the plain value json would write.
    if isinstance(value, str):
        return "str", str.__str__(value)
    if isinstance(value, int):
        return "int", int.__int__(value)
    if isinstance(value, float):
        return "float", float.__float__(value)
    return None, value


def _adopt(schema: _Schema, value: Any, active: set[int]) -> Any:
    kind, value = _classify(value)
    if kind is None:
        hint = " (use a list)" if isinstance(value, (set, frozenset, tuple)) else ""
        expected = "a JSON value" if schema.is_any else f"{schema.name}"
        raise Mismatch(f"expected {expected}, got {_describe(value)}, which is not a JSON value{hint}")
    if kind not in schema.kinds:
        raise Mismatch(f"expected {schema.name}, got {_describe(value)}")
    if kind == "float" and not math.isfinite(value):
        raise Mismatch(f"expected {schema.name}, got float ({value!r}): JSON has no NaN or infinity")
    if kind != "list" and kind != "dict":
        return value
    if id(value) in active:
        raise Mismatch("the value contains itself")
    active.add(id(value))
    try:
        if kind == "list":
            item = schema.list_item
            assert item is not None
            items = []
            for i, v in enumerate(value):
                try:
                    items.append(_adopt(item, v, active))
                except Mismatch as err:
                    err.tokens.append(str(i))
                    raise
            return TrackedList(item, items)
        item = schema.dict_item
        assert item is not None
        pairs = []
        for k, v in value.items():
            if type(k) is not str:
                if not isinstance(k, str):
                    raise Mismatch(f"dict keys must be str in JSON, got {_describe(k)}")
                k = str.__str__(k)
            try:
                pairs.append((k, _adopt(item, v, active)))
            except Mismatch as err:
                err.tokens.append(k)
                raise
        return TrackedDict(item, pairs)
    finally:
        active.discard(id(value))


# --- fields ------------------------------------------------------------------


class _Field:
    """The descriptor standing for one field on a ``DeltaState`` subclass."""

    __slots__ = ("name", "schema", "default", "owner")

    def __init__(self, owner: type, name: str, schema: _Schema, default: Any) -> None:
        self.owner = owner
        self.name = name
        self.schema = schema
        self.default = default  # plain JSON, or _MISSING for a required field
        if default is not _MISSING:
            try:
                self.default = to_plain(schema.adopt(default))
            except Mismatch as err:
                where = pointer([name, *reversed(err.tokens)])
                raise StateError(f"{owner.__qualname__}.{name}: bad default at {where}: {err.reason}") from None

    def __get__(self, obj: DeltaState | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._values[self.name]

    def __set__(self, obj: DeltaState, value: Any) -> None:
        obj._assign(self, value)

    def __delete__(self, obj: DeltaState) -> None:
        raise StateError(f"{type(obj).__name__}.{self.name}: a field cannot be deleted; assign a value instead")

    def __repr__(self) -> str:
        return f"<field {self.owner.__qualname__}.{self.name}: {self.schema.name}>"


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# --- the state ---------------------------------------------------------------


class DeltaState:
    """Base class of an agent's state: typed fields whose changes are recorded.

    Declare fields as annotated class attributes with defaults::

        class State(DeltaState):
            _version = 1                # bump it and override migrate() when the shape changes
            _entity_type = "my_agent"   # default: the class name in snake_case
            count: int = 0
            history: list[str] = []     # each instance gets its own copy

    ``State(**fields)`` builds an instance from the defaults and the given
    values, recording nothing. Then every assignment to a field and every change
    to a container in it (at any depth) is checked against the annotation and
    recorded as a JSON Patch op (see the module docstring).

    Raises :class:`~chronicle.errors.StateError` for an unknown field, a field
    with no default left out, or a value of the wrong type or not JSON.
    """

    _version: ClassVar[int] = 1
    _entity_type: ClassVar[str] = "delta_state"
    _state_fields: ClassVar[dict[str, _Field]] = {}

    _values: dict[str, Any]
    _ops: list[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__qualname__
        if "_entity_type" not in cls.__dict__:
            cls._entity_type = _snake_case(cls.__name__)
        if not isinstance(cls._entity_type, str) or not cls._entity_type:
            raise StateError(f"{name}._entity_type must be a non-empty str, not {cls._entity_type!r}")
        if type(cls._version) is not int or cls._version < 1:
            raise StateError(f"{name}._version must be an int of at least 1, not {cls._version!r}")
        try:
            hints = typing.get_type_hints(cls)
        except Exception as err:  # NameError, TypeError: an annotation that does not evaluate
            raise StateError(f"{name}: cannot evaluate the field annotations: {err}") from err

        fields: dict[str, _Field] = {}
        for base in reversed(cls.__mro__[1:]):
            if issubclass(base, DeltaState):
                fields.update(base._state_fields)
        own = [n for n in cls.__dict__.get("__annotations__", {}) if not n.startswith("_")]
        for field_name in own:
            hint = hints[field_name]
            if hint is ClassVar or typing.get_origin(hint) is ClassVar:
                continue
            if field_name in DeltaState.__dict__:
                raise StateError(f"{name}.{field_name}: the name is taken by a DeltaState method")
            schema = _schema_of(hint, f"{name}.{field_name}")
            fields[field_name] = _Field(cls, field_name, schema, cls.__dict__.get(field_name, _MISSING))
        for field_name, field in list(fields.items()):
            if field_name not in own and field_name in cls.__dict__:
                # A subclass that sets an inherited field's default without the annotation.
                fields[field_name] = _Field(cls, field_name, field.schema, cls.__dict__[field_name])
        for field_name, field in fields.items():
            if field.owner is cls:
                setattr(cls, field_name, field)
        cls._state_fields = fields

    def __init__(self, **fields: Any) -> None:
        cls = type(self)
        unknown = [n for n in fields if n not in cls._state_fields]
        if unknown:
            raise StateError(f"{cls.__name__}: no field named {unknown[0]!r}{self._field_list()}")
        object.__setattr__(self, "_ops", [])
        object.__setattr__(self, "_values", {})
        self._install(self._build(fields, "arguments"))

    # -- reading and recording ---------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The state JSON: ``{field: value}``, a deep copy of plain JSON types only."""
        return {name: to_plain(value) for name, value in self._values.items()}

    def drain_patch(self) -> list[dict[str, Any]]:
        """The ops recorded since the last drain, oldest first; clears them.

        Each op is ``{"op": "add"|"remove"|"replace", "path": str[, "value": ...]}``
        (RFC 6902). The caller owns the returned list.
        """
        ops = self._ops
        object.__setattr__(self, "_ops", [])
        return ops

    @property
    def pending_patch(self) -> list[dict[str, Any]]:
        """A copy of the ops recorded since the last drain, without clearing them."""
        return to_plain(self._ops)

    def _record(self, op: dict[str, Any]) -> None:
        self._ops.append(op)

    def _value_error(self, tokens: list[str], reason: str) -> StateError:
        at = f" at {pointer(tokens)}" if len(tokens) > 1 else ""
        return StateError(f"{type(self).__name__}.{tokens[0]}{at}: {reason}")

    # -- writing fields ------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        field = type(self)._state_fields.get(name)
        if field is None:
            raise StateError(f"{type(self).__name__}: no field named {name!r}{self._field_list()}")
        self._assign(field, value)

    def __delattr__(self, name: str) -> None:
        raise StateError(f"{type(self).__name__}.{name}: state attributes cannot be deleted")

    def _assign(self, field: _Field, value: Any) -> None:
        old = self._values[field.name]
        if value is old and isinstance(old, (TrackedList, TrackedDict)):
            return  # state.items += [...]: the list changed itself and recorded it
        new = self._adopt_field(field, value)
        self._values[field.name] = new
        self._attach(field.name, new)
        self._detach(old)
        self._record({"op": "replace", "path": pointer([field.name]), "value": to_plain(new)})

    def _adopt_field(self, field: _Field, value: Any) -> Any:
        try:
            return field.schema.adopt(value)
        except Mismatch as err:
            raise self._value_error([field.name, *reversed(err.tokens)], err.reason) from None

    def _attach(self, name: str, value: Any) -> None:
        if isinstance(value, (TrackedList, TrackedDict)):
            value._parent = self
            value._key = name

    @staticmethod
    def _detach(value: Any) -> None:
        if isinstance(value, (TrackedList, TrackedDict)):
            value._parent = None

    def _build(self, data: dict[str, Any], source: str) -> dict[str, Any]:
        """Checked, stored values for every field from ``data``, else its default."""
        cls = type(self)
        values = {}
        for name, field in cls._state_fields.items():
            if name in data:
                value = data[name]
            elif field.default is not _MISSING:
                value = field.default
            else:
                raise StateError(f"{cls.__name__}: the field {name!r} has no default and is missing from the {source}")
            values[name] = self._adopt_field(field, value)
        return values

    def _install(self, values: dict[str, Any]) -> None:
        for old in self._values.values():
            self._detach(old)
        object.__setattr__(self, "_values", values)
        for name, value in values.items():
            self._attach(name, value)

    @classmethod
    def _field_list(cls) -> str:
        names = ", ".join(cls._state_fields) or "none"
        return f" (fields: {names}; declare a field with a class annotation)"

    # -- loading -------------------------------------------------------------

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int | None = None) -> typing.Self:
        """An instance from stored state JSON, with no ops recorded.

        ``version`` is the ``_version`` the data was stored under (None: this
        class's). Older data is first passed through :meth:`migrate`. A field
        missing from ``data`` takes its default.

        Raises :class:`~chronicle.errors.StateError` if the version is newer
        than the class's, if migration fails, or if the data has unknown fields
        or values that do not fit.
        """
        if version is None:
            version = cls._version
        if type(version) is not int:
            raise StateError(f"{cls.__name__}: the stored version must be an int, not {version!r}")
        if version > cls._version:
            raise StateError(
                f"{cls.__name__}: the stored state is version {version}, newer than this code's "
                f"version {cls._version}; run the newer agent code"
            )
        if not isinstance(data, dict):
            raise StateError(f"{cls.__name__}: state JSON must be a dict, not {type(data).__name__}")
        if version < cls._version:
            data = cls.migrate(to_plain(data), version)
            if not isinstance(data, dict):
                raise StateError(f"{cls.__name__}.migrate must return a dict, not {type(data).__name__}")
            cls._check_data(data, after_migrate=True)
        else:
            cls._check_data(data)
        self = cls.__new__(cls)
        object.__setattr__(self, "_ops", [])
        object.__setattr__(self, "_values", {})
        self._install(self._build(data, "stored data"))
        return self

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Convert state JSON stored under ``from_version`` to this class's ``_version``.

        Override it as a classmethod when you bump ``_version``. ``data`` is a
        deep copy you may change; return the state JSON for the current version
        (fields left out take their defaults). The default raises
        :class:`~chronicle.errors.StateError`.
        """
        raise StateError(
            f"{cls.__name__}: the stored state is version {from_version} but the class is at _version "
            f"{cls._version}; implement the classmethod migrate(cls, data, from_version) to convert it"
        )

    def reset_to(self, data: dict[str, Any]) -> None:
        """Set every field from state JSON ``data`` in place, recording nothing.

        Clears the pending ops. A field missing from ``data`` takes its
        default. Containers held before are dropped from the state (changing
        them afterwards records nothing). Checks all of ``data`` first; on
        :class:`~chronicle.errors.StateError` the state is unchanged.
        """
        type(self)._check_data(data)
        values = self._build(data, "data")
        self._install(values)
        object.__setattr__(self, "_ops", [])

    @classmethod
    def _check_data(cls, data: Any, after_migrate: bool = False) -> None:
        if not isinstance(data, dict):
            raise StateError(f"{cls.__name__}: state JSON must be a dict, not {type(data).__name__}")
        unknown = [k for k in data if k not in cls._state_fields]
        if unknown:
            hint = " after migrate" if after_migrate else ""
            raise StateError(
                f"{cls.__name__}: the state JSON{hint} has the unknown field {unknown[0]!r}{cls._field_list()}; "
                "bump _version and convert old data in migrate"
            )

    # -- Python protocols ------------------------------------------------------

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={to_plain(value)!r}" for name, value in self._values.items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, DeltaState)
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __copy__(self) -> typing.Self:
        return type(self).from_json(self.to_json())

    def __deepcopy__(self, memo: dict) -> typing.Self:
        return type(self).from_json(self.to_json())

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self).from_json, (self.to_json(),)

    @classmethod
    def field_names(cls) -> list[str]:
        """The field names, in declaration order (base classes' first)."""
        return list(cls._state_fields)

