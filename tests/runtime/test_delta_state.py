"""DeltaState: typed fields, JSON values, and the recorded JSON Patch.

The main property: for any sequence of mutations, the recorded patch applied
with the ``jsonpatch`` library (RFC 6902) to the state JSON before the sequence
gives the state JSON after it — for the whole sequence and for each operation.
The same operations run on plain lists and dicts (a model), so the tracked
containers must also behave as Python's do.
"""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any, ClassVar, Optional

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.errors import UsageError
import agent_runtime
from agent_runtime import DeltaState, StateError


def canon(value: Any) -> str:
    """JSON text that tells 1, 1.0 and True apart (== does not)."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def replay(doc: dict, ops: list[dict]) -> dict:
    # jsonpatch inserts op values by reference; copy so a later op cannot change them.
    return jsonpatch.apply_patch(doc, copy.deepcopy(ops))


# --- the property test ---------------------------------------------------------


class Tree(DeltaState):
    n: int = 0
    f: float = 0.5
    s: str = ""
    flag: Optional[bool] = None
    items: list[Any] = [[[[1, "a"]]], {"a": {"b/c": [{"~": []}]}}, 3, [[], {}], {"k": [[1], []]}]
    table: dict[str, Any] = {"x": {"y~": {"z": [1, [2, [3, {}]]]}}, "p/q": []}
    raw: list = []


KEYS = st.text(alphabet="ab/~01", max_size=3)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(-4, 4, allow_nan=False, allow_infinity=False)
    | st.text(alphabet="ab/~", max_size=3)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8
)
CONTAINER_FIELDS = ("items", "table", "raw")


def containers(state: Tree, model: dict) -> list[tuple[Any, Any, Any, Any]]:
    """Every container in the state: ``(real, model, real parent or state, key)``."""
    out = []

    def walk(real: Any, plain: Any, parent: Any, key: Any) -> None:
        if isinstance(real, list):
            out.append((real, plain, parent, key))
            for i, (r, p) in enumerate(zip(real, plain)):
                walk(r, p, real, i)
        elif isinstance(real, dict):
            out.append((real, plain, parent, key))
            for k in real:
                walk(real[k], plain[k], real, k)

    for name in CONTAINER_FIELDS:
        walk(getattr(state, name), model[name], state, name)
    return out


def nested_ids(value: Any) -> set[int]:
    """The ids of the containers inside ``value`` (not ``value`` itself)."""
    out: set[int] = set()
    children = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, list) else []
    for child in children:
        if isinstance(child, (list, dict)):
            out.add(id(child))
            out |= nested_ids(child)
    return out


def model_imul(m: list, k: int) -> None:
    if k <= 0:
        m.clear()
    else:
        m.extend([copy.deepcopy(x) for x in m * (k - 1)])


def model_sort(m: list, key: Any, reverse: bool) -> None:
    m[:] = sorted(m, key=key, reverse=reverse)  # DeltaState's sort is all-or-nothing


def augment(state: Tree, parent: Any, key: Any, fn: Any) -> Any:
    """``parent[key] op= x`` or ``state.key op= x``, as Python runs augmented assignment."""
    if parent is state:
        value = fn(getattr(state, key))
        setattr(state, key, value)
    else:
        parent[key] = fn(parent[key])


def _iadd(vs: list) -> Any:
    def fn(x: Any) -> Any:
        x += vs
        return x

    return fn


def _imul(k: int) -> Any:
    def fn(x: Any) -> Any:
        x *= k
        return x

    return fn


def _ior(other: Any) -> Any:
    def fn(x: Any) -> Any:
        x |= other
        return x

    return fn


def draw_slice(data: st.DataObject, n: int) -> slice:
    bound = st.none() | st.integers(-n - 2, n + 2)
    return slice(data.draw(bound), data.draw(bound), data.draw(st.sampled_from([None, 1, 2, 3, -1, -2, 0])))


def list_op(data: st.DataObject, state: Tree, r: list, m: list, parent: Any, key: Any, others: list) -> tuple:
    """One random list operation as ``(label, real thunk, model thunk)``."""
    n = len(m)
    index = st.integers(-n - 2, n + 2)
    name = data.draw(
        st.sampled_from(
            # Hypothesis draws the first ones more often: those that move later items first.
            [
                "insert", "pop_i", "del_slice", "set_slice", "remove", "del_i", "append", "set_i", "extend",
                "insert_existing", "slice_existing", "reverse", "sort", "iadd", "imul", "pop", "clear",
                "append_existing", "set_existing", "extend_existing",
            ]
        )
    )
    v = data.draw(VALUES)
    vs = data.draw(st.lists(VALUES, max_size=4))
    o_real, o_plain = others[data.draw(st.integers(0, len(others) - 1))]
    if name == "append":
        return name, lambda: r.append(v), lambda: m.append(copy.deepcopy(v))
    if name == "insert":
        i = data.draw(index)
        return f"insert({i})", lambda: r.insert(i, v), lambda: m.insert(i, copy.deepcopy(v))
    if name == "extend":
        return name, lambda: r.extend(iter(vs)), lambda: m.extend(copy.deepcopy(vs))
    if name == "iadd":
        return name, lambda: augment(state, parent, key, _iadd(vs)), lambda: m.extend(copy.deepcopy(vs))
    if name == "imul":
        k = data.draw(st.integers(-1, 3))
        return f"imul({k})", lambda: augment(state, parent, key, _imul(k)), lambda: model_imul(m, k)
    if name == "pop":
        return name, lambda: r.pop(), lambda: m.pop()
    if name == "pop_i":
        i = data.draw(index)
        return f"pop({i})", lambda: r.pop(i), lambda: m.pop(i)
    if name == "remove":
        x = copy.deepcopy(data.draw(st.sampled_from(m))) if m and data.draw(st.booleans()) else v
        return f"remove({x!r})", lambda: r.remove(x), lambda: m.remove(x)
    if name == "del_i":
        i = data.draw(index)
        return f"del [{i}]", lambda: r.__delitem__(i), lambda: m.__delitem__(i)
    if name == "del_slice":
        sl = draw_slice(data, n)
        return f"del [{sl}]", lambda: r.__delitem__(sl), lambda: m.__delitem__(sl)
    if name == "set_i":
        i = data.draw(index)
        return f"[{i}] =", lambda: r.__setitem__(i, v), lambda: m.__setitem__(i, copy.deepcopy(v))
    if name == "set_slice":
        sl = draw_slice(data, n)
        if sl.step not in (None, 1, 0) and data.draw(st.booleans()):
            vs = data.draw(st.lists(VALUES, min_size=len(range(*sl.indices(n))), max_size=len(range(*sl.indices(n)))))
        return f"[{sl}] = {len(vs)}", lambda: r.__setitem__(sl, vs), lambda: m.__setitem__(sl, copy.deepcopy(vs))
    if name == "clear":
        return name, r.clear, m.clear
    if name == "sort":
        sort_key = data.draw(st.sampled_from([None, canon]))
        rev = data.draw(st.booleans())
        return (
            f"sort({sort_key}, {rev})",
            lambda: r.sort(key=sort_key, reverse=rev),
            lambda: model_sort(m, sort_key, rev),
        )
    if name == "reverse":
        return name, r.reverse, m.reverse
    if name == "append_existing":
        return name, lambda: r.append(o_real), lambda: m.append(copy.deepcopy(o_plain))
    if name == "insert_existing":
        i = data.draw(index)
        return f"insert({i}, existing)", lambda: r.insert(i, o_real), lambda: m.insert(i, copy.deepcopy(o_plain))
    if name == "set_existing":
        i = data.draw(index)
        return f"[{i}] = existing", lambda: r.__setitem__(i, o_real), lambda: m.__setitem__(i, copy.deepcopy(o_plain))
    if name == "extend_existing":
        return name, lambda: r.extend(o_real), lambda: m.extend(copy.deepcopy(o_plain))
    sl = draw_slice(data, n)
    sl = slice(sl.start, sl.stop)
    return f"[{sl}] = existing", lambda: r.__setitem__(sl, o_real), lambda: m.__setitem__(sl, copy.deepcopy(o_plain))


def dict_op(data: st.DataObject, state: Tree, r: dict, m: dict, parent: Any, key: Any, others: list) -> tuple:
    """One random dict operation as ``(label, real thunk, model thunk)``."""
    name = data.draw(
        st.sampled_from(
            [
                "set", "del", "update_map", "update_pairs", "update_kw", "ior", "pop", "pop_default", "popitem",
                "setdefault", "clear", "set_existing", "update_existing",
            ]
        )
    )
    k = data.draw(st.sampled_from(sorted(m)) | KEYS) if m else data.draw(KEYS)
    v = data.draw(VALUES)
    new = data.draw(st.dictionaries(KEYS, VALUES, max_size=3))
    o_real, o_plain = others[data.draw(st.integers(0, len(others) - 1))]
    if name == "set":
        return f"[{k!r}] =", lambda: r.__setitem__(k, v), lambda: m.__setitem__(k, copy.deepcopy(v))
    if name == "del":
        return f"del [{k!r}]", lambda: r.__delitem__(k), lambda: m.__delitem__(k)
    if name == "update_map":
        return name, lambda: r.update(new), lambda: m.update(copy.deepcopy(new))
    if name == "update_pairs":
        pairs = list(new.items()) + [(k, v)]
        return name, lambda: r.update(iter(pairs)), lambda: m.update(copy.deepcopy(pairs))
    if name == "update_kw":
        return name, lambda: r.update(**new), lambda: m.update(**copy.deepcopy(new))
    if name == "ior":
        return name, lambda: augment(state, parent, key, _ior(new)), lambda: m.update(copy.deepcopy(new))
    if name == "pop":
        return f"pop({k!r})", lambda: r.pop(k), lambda: m.pop(k)
    if name == "pop_default":
        return f"pop({k!r}, d)", lambda: r.pop(k, v), lambda: m.pop(k, v)
    if name == "popitem":
        return name, r.popitem, m.popitem
    if name == "setdefault":
        return f"setdefault({k!r})", lambda: r.setdefault(k, v), lambda: m.setdefault(k, copy.deepcopy(v))
    if name == "clear":
        return name, r.clear, m.clear
    if name == "set_existing":
        return f"[{k!r}] = existing", lambda: r.__setitem__(k, o_real), lambda: m.__setitem__(k, copy.deepcopy(o_plain))
    if not isinstance(o_real, dict):
        o_real, o_plain = r, m  # d.update(d)
    return name, lambda: r.update(o_real), lambda: m.update(copy.deepcopy(o_plain))


def field_op(data: st.DataObject, state: Tree, model: dict, others: list) -> tuple:
    """One random assignment to a field as ``(label, real thunk, model thunk)``."""
    name = data.draw(st.sampled_from(["n", "s", "f", "flag", "items", "table", "raw", "copy_field"]))
    if name == "n":
        k = data.draw(st.integers(-3, 3))

        def real() -> None:
            state.n += k

        return "n +=", real, lambda: model.__setitem__("n", model["n"] + k)
    if name == "s":
        t = data.draw(st.text(alphabet="ab/~", max_size=2))

        def real_s() -> None:
            state.s += t

        return "s +=", real_s, lambda: model.__setitem__("s", model["s"] + t)
    if name == "f":
        x = data.draw(st.integers(-3, 3) | st.floats(-3, 3))
        return "f =", lambda: setattr(state, "f", x), lambda: model.__setitem__("f", x)
    if name == "flag":
        b = data.draw(st.sampled_from([None, True, False]))
        return "flag =", lambda: setattr(state, "flag", b), lambda: model.__setitem__("flag", b)
    if name == "copy_field":
        return "items = raw", lambda: setattr(state, "items", state.raw), lambda: model.__setitem__(
            "items", copy.deepcopy(model["raw"])
        )
    value = data.draw(st.dictionaries(KEYS, VALUES, max_size=3) if name == "table" else st.lists(VALUES, max_size=3))
    return f"{name} =", lambda: setattr(state, name, value), lambda: model.__setitem__(name, copy.deepcopy(value))


def run(real: Any, plain: Any) -> tuple[Any, type | None, Any, type | None]:
    try:
        r, r_err = real(), None
    except Exception as err:  # the same exception type must come from both sides
        r, r_err = None, type(err)
    try:
        m, m_err = plain(), None
    except Exception as err:
        m, m_err = None, type(err)
    return r, r_err, m, m_err


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_recorded_patch_replays_every_mutation(data: st.DataObject) -> None:
    state = Tree()
    model = state.to_json()
    start = state.to_json()
    everything: list[dict] = []
    last: Any = None
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        before = state.to_json()
        found = containers(state, model)
        others = [(r, m) for r, m, _, _ in found]
        # Often change the container changed last again, or work inside it: a
        # child whose index just moved is where a stale path would show.
        inside = nested_ids(last)
        below = [c for c in found if id(c[0]) in inside]
        again = [c for c in found if c[0] is last]
        choice = data.draw(st.integers(0, 7))
        if choice == 0:
            label, real, plain = field_op(data, state, model, others)
        else:
            pool = again if again and choice <= 2 else below if below and choice <= 5 else found
            r, m, parent, key = pool[data.draw(st.integers(0, len(pool) - 1))]
            last = r
            make = list_op if isinstance(r, list) else dict_op
            label, real, plain = make(data, state, r, m, parent, key, others)
        got, got_err, want, want_err = run(real, plain)
        assert got_err is want_err, label
        ops = state.drain_patch()
        after = state.to_json()
        assert canon(after) == canon(model), label
        if got_err is None:
            assert canon(got) == canon(want), label
        else:
            assert ops == [], label
            assert canon(after) == canon(before), label
        assert canon(replay(before, ops)) == canon(after), (label, ops)
        everything += ops
    assert canon(replay(start, everything)) == canon(state.to_json())


# --- unit tests ------------------------------------------------------------------


class Agentish(DeltaState):
    _version = 1
    _entity_type = "my_agent"
    count: int = 0
    history: list[str] = []
    ratio: float = 0.0
    name: str = "x"
    on: bool = False
    maybe: int | None = None
    opt: Optional[str] = None
    nested: list[list[dict[str, int]]] = []
    table: dict[str, list[int]] = {}
    anything: Any = None


def test_the_seed_example_records_and_replays() -> None:
    state = Agentish()
    before = state.to_json()
    state.count += 1
    state.history.append("hello")
    assert state.pending_patch == [
        {"op": "replace", "path": "/count", "value": 1},
        {"op": "add", "path": "/history/0", "value": "hello"},
    ]
    assert replay(before, state.drain_patch()) == state.to_json()
    assert state.drain_patch() == []


def test_class_settings_are_not_fields() -> None:
    class PlainName(DeltaState):
        limit: ClassVar[int] = 3
        _private: int = 0
        x: int = 1

    assert PlainName._entity_type == "plain_name"
    assert PlainName._version == 1
    assert PlainName.field_names() == ["x"]
    assert PlainName().to_json() == {"x": 1}
    assert Agentish._entity_type == "my_agent"
    with pytest.raises(StateError, match="no field named '_version'"):
        Agentish()._version = 2  # type: ignore[misc]


def test_mutable_defaults_are_never_shared() -> None:
    a, b = Agentish(), Agentish()
    a.history.append("a")
    a.table["k"] = [1]
    a.nested.append([{"x": 1}])
    assert b.history == [] and b.table == {} and b.nested == []
    assert Agentish().to_json()["history"] == []
    assert a.history is not b.history


def test_constructor_takes_fields_and_records_nothing() -> None:
    state = Agentish(count=3, history=["a"])
    assert state.count == 3 and state.history == ["a"]
    assert state.pending_patch == []
    with pytest.raises(StateError, match="no field named 'cont'"):
        Agentish(cont=1)

    class Required(DeltaState):
        x: int

    with pytest.raises(StateError, match="'x' has no default"):
        Required()
    assert Required(x=2).x == 2


@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [
        ("count", "5", "int", "str"),
        ("count", True, "int", "bool"),
        ("count", 1.5, "int", "float"),
        ("ratio", "x", "float", "str"),
        ("ratio", False, "float", "bool"),
        ("name", 1, "str", "int"),
        ("on", 1, "bool", "int"),
        ("history", "abc", "list[str]", "str"),
        ("maybe", "1", "int | None", "str"),
        ("opt", 2, "str | None", "int"),
        ("table", [], "dict[str, list[int]]", "list"),
    ],
)
def test_assignment_type_errors_name_field_expected_and_got(field: str, value: Any, expected: str, got: str) -> None:
    state = Agentish()
    with pytest.raises(StateError) as err:
        setattr(state, field, value)
    message = str(err.value)
    assert f"Agentish.{field}" in message
    assert f"expected {expected}, got {got}" in message
    assert state.pending_patch == [] and state.to_json() == Agentish().to_json()


def test_accepted_values() -> None:
    state = Agentish()
    state.ratio = 2  # an int is a float
    state.maybe = None
    state.maybe = 4
    state.opt = "s"
    state.anything = {"a": [1, None, {"b": 2.5}]}
    state.nested = [[{"a": 1}], []]
    assert state.to_json()["ratio"] == 2
    assert state.to_json()["anything"] == {"a": [1, None, {"b": 2.5}]}


def test_nested_type_errors_give_the_path() -> None:
    state = Agentish()
    with pytest.raises(StateError, match=r"Agentish.nested at /nested/0/1/a: expected int, got str"):
        state.nested = [[{"a": 1}, {"a": "no"}]]
    state.nested = [[{"a": 1}]]
    with pytest.raises(StateError, match=r"at /nested/0/0/b: expected int, got bool"):
        state.nested[0][0]["b"] = True
    with pytest.raises(StateError, match=r"at /history/0: expected str, got int"):
        state.history.append(1)
    with pytest.raises(StateError, match=r"at /table/k/1: expected int, got NoneType"):
        state.table["k"] = [1, None]
    state.drain_patch()
    # Checked before anything changes: nothing half done, nothing recorded.
    with pytest.raises(StateError):
        state.history.extend(["a", "b", 3])
    with pytest.raises(StateError):
        state.history[0:0] = ["a", 3]
    with pytest.raises(StateError):
        state.table.update({"a": [1], "b": ["x"]})
    with pytest.raises(StateError):
        state.table.setdefault("c", None)
    assert state.history == [] and state.table == {}
    assert state.pending_patch == []


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1, 2}, "set"),
        ((1, 2), "tuple"),
        (object(), "object"),
        ({1: "a"}, "dict keys must be str"),
        (float("nan"), "NaN"),
        (float("inf"), "NaN or infinity"),
        (-float("inf"), "NaN or infinity"),
        ([1, {"a": {2}}], "set"),
        (b"bytes", "bytes"),
    ],
)
def test_non_json_values_fail_at_assignment(value: Any, words: str) -> None:
    state = Agentish()
    with pytest.raises(StateError, match=words):
        state.anything = value
    with pytest.raises(StateError, match=words):
        state.anything = [[value]]
    assert state.pending_patch == []


def test_non_json_values_fail_in_containers() -> None:
    state = Agentish(anything={"d": {}, "l": []})
    with pytest.raises(StateError, match=r"Agentish.anything at /anything/d: dict keys must be str"):
        state.anything["d"][3] = 1
    with pytest.raises(StateError, match="not a JSON value"):
        state.anything["l"].append({1})
    with pytest.raises(StateError, match="NaN"):
        state.anything["l"].insert(0, float("nan"))
    loop: list = []
    loop.append(loop)
    with pytest.raises(StateError, match="contains itself"):
        state.anything = loop
    assert state.pending_patch == []


def test_unknown_and_deleted_attributes_are_errors() -> None:
    state = Agentish()
    with pytest.raises(StateError, match="no field named 'cuont'"):
        state.cuont = 1  # type: ignore[attr-defined]
    with pytest.raises(StateError, match="cannot be deleted"):
        del state.count
    with pytest.raises(AttributeError):
        state.cuont  # type: ignore[attr-defined]  # noqa: B018


def test_bad_declarations_fail_when_the_class_is_defined() -> None:
    with pytest.raises(StateError, match="unsupported annotation"):

        class Tup(DeltaState):
            t: tuple[int, int] = (1, 2)

    with pytest.raises(StateError, match="dict keys must be str"):

        class IntKeys(DeltaState):
            d: dict[int, str] = {}

    with pytest.raises(StateError, match="bad default at /n: expected int, got str"):

        class BadDefault(DeltaState):
            n: int = "0"  # type: ignore[assignment]

    with pytest.raises(StateError, match="taken by a DeltaState method"):

        class Shadow(DeltaState):
            to_json: int = 0  # type: ignore[assignment]

    with pytest.raises(StateError, match="_version"):

        class BadVersion(DeltaState):
            _version = "2"  # type: ignore[assignment]


def test_subclass_inherits_fields_and_may_change_a_default() -> None:
    class Base(DeltaState):
        a: int = 1
        items: list[int] = []

    class Child(Base):
        a = 5
        b: str = "b"

    assert Child.field_names() == ["a", "items", "b"]
    assert Child().to_json() == {"a": 5, "items": [], "b": "b"}
    assert Base().a == 1
    with pytest.raises(StateError, match="expected int"):
        Child().a = "x"


def test_subclasses_of_str_and_int_are_stored_plain() -> None:
    import enum

    class Colour(str, enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    state = Agentish()
    state.name = Colour.RED
    state.count = Level.HIGH
    assert type(state.name) is str and state.name == "red"
    assert type(state.to_json()["count"]) is int


def test_augmented_assignment_on_a_container_records_only_the_change() -> None:
    state = Agentish(history=["a"], table={"k": [1]})
    state.history += ["b"]
    state.table["k"] += [2]
    state.table |= {"j": []}
    assert state.drain_patch() == [
        {"op": "add", "path": "/history/1", "value": "b"},
        {"op": "add", "path": "/table/k/1", "value": 2},
        {"op": "add", "path": "/table/j", "value": []},
    ]


def test_containers_are_copied_in_no_aliasing() -> None:
    state = Agentish()
    before = state.to_json()
    mine = ["a"]
    state.history = mine
    mine.append("b")
    assert state.history == ["a"]
    state.table["x"] = [1]
    state.table["y"] = state.table["x"]
    state.table["y"].append(2)
    assert state.table == {"x": [1], "y": [1, 2]}
    state.anything = [[1]]
    state.anything.append(state.anything[0])
    state.anything[1].append(9)
    assert state.to_json()["anything"] == [[1], [1, 9]]
    assert replay(before, state.drain_patch()) == state.to_json()


def test_paths_follow_a_child_whose_index_changed() -> None:
    state = Agentish(anything=[[0], [1], {"k": [2]}])
    last = state.anything[2]
    inner = last["k"]
    state.anything.insert(0, "new")
    state.anything.pop(1)
    del state.anything[0:1]
    inner.append(3)
    assert state.drain_patch()[-1] == {"op": "add", "path": "/anything/1/k/1", "value": 3}
    state.anything.reverse()
    last["k"].append(4)
    assert state.drain_patch()[-1] == {"op": "add", "path": "/anything/0/k/2", "value": 4}


def test_removed_containers_record_nothing() -> None:
    state = Agentish(anything={"a": [1], "b": [2]}, history=["x"])
    a = state.anything["a"]
    popped = state.anything.pop("b")
    history = state.history
    state.history = []
    state.drain_patch()
    a.append(5)  # still in the state
    popped.append(6)
    history.append("gone")
    assert state.drain_patch() == [{"op": "add", "path": "/anything/a/1", "value": 5}]
    assert state.to_json()["anything"] == {"a": [1, 5]}
    assert state.history == []


@pytest.mark.parametrize(
    ("key", "token"), [("a/b", "a~1b"), ("m~n", "m~0n"), ("~1", "~01"), ("/~", "~1~0"), ("", "")]
)
def test_json_pointer_escapes_keys(key: str, token: str) -> None:
    state = Agentish()
    before = state.to_json()
    state.table[key] = [1]
    state.table[key].append(2)
    state.table[key] = []
    del state.table[key]
    assert [op["path"] for op in state.pending_patch] == [
        f"/table/{token}",
        f"/table/{token}/1",
        f"/table/{token}",
        f"/table/{token}",
    ]
    assert replay(before, state.drain_patch()) == state.to_json()


def test_pending_patch_is_a_copy() -> None:
    state = Agentish()
    state.anything = {"a": [1]}
    view = state.pending_patch
    view[0]["value"]["a"].append(2)
    view.clear()
    assert state.pending_patch == [{"op": "replace", "path": "/anything", "value": {"a": [1]}}]


def test_to_json_is_plain_and_deep_copied() -> None:
    state = Agentish(nested=[[{"a": 1}]])
    data = state.to_json()
    assert type(data["nested"]) is list and type(data["nested"][0][0]) is dict
    data["nested"][0][0]["a"] = 2
    assert state.nested[0][0]["a"] == 1
    assert json.loads(json.dumps(state.nested)) == [[{"a": 1}]]


def test_from_json_and_reset_to_record_nothing() -> None:
    data = {"count": 2, "history": ["a"], "table": {"k": [1]}}
    state = Agentish.from_json(data)
    assert state.pending_patch == []
    assert state.count == 2 and state.name == "x"  # a missing field takes its default
    data["history"].append("b")
    assert state.history == ["a"]
    old_table = state.table
    state.count = 9
    state.table["k"].append(2)
    state.reset_to({"count": 1, "table": {"j": []}})
    assert state.pending_patch == []
    assert state.count == 1 and state.table == {"j": []} and state.history == []
    old_table["k"].append(3)  # no longer part of the state
    assert state.pending_patch == []
    state.table["j"].append(1)
    assert state.drain_patch() == [{"op": "add", "path": "/table/j/0", "value": 1}]


def test_reset_to_checks_everything_first() -> None:
    state = Agentish(count=3)
    state.history.append("a")
    with pytest.raises(StateError, match="expected str"):
        state.reset_to({"count": 0, "history": [1]})
    with pytest.raises(StateError, match="unknown field 'nope'"):
        state.reset_to({"nope": 1})
    assert state.count == 3 and state.history == ["a"]
    assert len(state.pending_patch) == 1


def test_from_json_rejects_bad_data() -> None:
    with pytest.raises(StateError, match="unknown field 'old'"):
        Agentish.from_json({"old": 1})
    with pytest.raises(StateError, match="Agentish.count: expected int, got str"):
        Agentish.from_json({"count": "1"})
    with pytest.raises(StateError, match="must be a dict"):
        Agentish.from_json([])  # type: ignore[arg-type]


class V1(DeltaState):
    _version = 1
    name: str = ""


class V3(DeltaState):
    _version = 3
    first: str = ""
    last: str = ""
    tags: list[str] = []

    @classmethod
    def migrate(cls, data: dict, from_version: int) -> dict:
        if from_version == 1:
            first, _, last = data.pop("name").partition(" ")
            data.update(first=first, last=last)
            from_version = 2
        if from_version == 2:
            data["tags"] = sorted(data.pop("labels", {}))
        return data


def test_old_state_is_migrated() -> None:
    stored = {"name": "Ada Lovelace"}
    state = V3.from_json(stored, version=1)
    assert state.to_json() == {"first": "Ada", "last": "Lovelace", "tags": []}
    assert stored == {"name": "Ada Lovelace"}  # migrate got a copy
    assert state.pending_patch == []
    state2 = V3.from_json({"first": "A", "last": "B", "labels": {"y": 1, "x": 2}}, version=2)
    assert state2.tags == ["x", "y"]
    assert V3.from_json({"first": "A"}, version=3).first == "A"


def test_newer_state_is_rejected() -> None:
    with pytest.raises(StateError, match="version 4, newer than this code's version 3"):
        V3.from_json({}, version=4)


def test_missing_migrate_is_a_clear_error() -> None:
    class V2(DeltaState):
        _version = 2
        name: str = ""

    with pytest.raises(StateError, match=r"version 1 but the class is at _version 2; implement the classmethod migr"):
        V2.from_json({"name": "x"}, version=1)


def test_migrate_must_give_a_known_dict() -> None:
    class Broken(DeltaState):
        _version = 2
        x: int = 0

        @classmethod
        def migrate(cls, data: dict, from_version: int) -> Any:
            return data if data.get("keep") else None

    with pytest.raises(StateError, match="migrate must return a dict"):
        Broken.from_json({}, version=1)
    with pytest.raises(StateError, match="unknown field 'keep'"):
        Broken.from_json({"keep": True}, version=1)


def test_copy_pickle_and_equality() -> None:
    state = Agentish(history=["a"], table={"k": [1]})
    state.count = 1
    for twin in (copy.deepcopy(state), pickle.loads(pickle.dumps(state)), copy.copy(state)):
        assert twin == state and twin.pending_patch == []
        twin.history.append("b")
        assert state.history == ["a"]
    assert copy.deepcopy(state.table) == {"k": [1]} and type(copy.deepcopy(state.table)) is dict
    assert pickle.loads(pickle.dumps(state.history)) == ["a"]
    assert "Agentish(count=1" in repr(state)


def test_list_methods_keep_python_behaviour() -> None:
    state = Agentish(history=["a", "b", "c"])
    with pytest.raises(IndexError, match="pop index out of range"):
        state.history.pop(7)
    with pytest.raises(IndexError, match="assignment index out of range"):
        state.history[3] = "x"
    with pytest.raises(ValueError, match="not in list"):
        state.history.remove("z")
    with pytest.raises(ValueError, match="extended slice of size 2"):
        state.history[::2] = ["x"]
    with pytest.raises(TypeError):
        state.anything = [1, "a"]
        state.anything.sort()
    assert state.anything == [1, "a"]
    with pytest.raises(KeyError):
        state.table.pop("nope")
    with pytest.raises(KeyError):
        state.table.popitem()
    assert state.history.pop(-1) == "c"
    assert state.history.copy() == ["a", "b"] and type(state.history.copy()) is list


def test_package_exports() -> None:
    assert set(agent_runtime.__all__) >= {"DeltaState", "StateError"}
    assert issubclass(StateError, UsageError)


def test_update_with_values_already_in_place() -> None:
    state = Agentish(anything={"a": [1], "b": [2]})
    before = state.to_json()
    a = state.anything["a"]
    state.anything.update(state.anything)  # d.update(d) changes nothing
    assert state.pending_patch == [] and state.anything["a"] is a
    state.anything.update([("a", [9]), ("a", a)])  # in order, as dict does: a ends up back
    assert state.anything["a"] == [1]
    assert replay(before, state.drain_patch()) == state.to_json()


def test_list_element_augmented_assignment() -> None:
    state = Agentish(anything=[[1], {"k": "s"}])
    before = state.to_json()
    state.anything[0] += [2]
    state.anything[0] *= 2
    state.anything[1]["k"] += "t"
    assert state.pending_patch == [
        {"op": "add", "path": "/anything/0/1", "value": 2},
        {"op": "add", "path": "/anything/0/2", "value": 1},
        {"op": "add", "path": "/anything/0/3", "value": 2},
        {"op": "replace", "path": "/anything/1/k", "value": "st"},
    ]
    assert replay(before, state.drain_patch()) == state.to_json()


RESHAPE = {
    "insert": lambda lst: lst.insert(0, "x"),
    "pop": lambda lst: lst.pop(0),
    "remove": lambda lst: lst.remove("s"),
    "del": lambda lst: lst.__delitem__(1),
    "del_step": lambda lst: lst.__delitem__(slice(None, None, 2)),
    "grow_slice": lambda lst: lst.__setitem__(slice(0, 1), ["x", "y"]),
    "shrink_slice": lambda lst: lst.__setitem__(slice(0, 2), ["x"]),
    "step_slice": lambda lst: lst.__setitem__(slice(None, None, -2), ["a", "b", "c"]),
    "reverse": lambda lst: lst.reverse(),
    "sort": lambda lst: lst.sort(key=canon),
    "imul": lambda lst: lst.__imul__(2),
}
THEN = {
    "nothing": lambda lst: None,
    "append": lambda lst: lst.append([]),
    "extend": lambda lst: lst.extend([{}, "z"]),
    "insert_end": lambda lst: lst.insert(len(lst), []),
    "set_first": lambda lst: lst.__setitem__(0, "w"),
    "iadd": lambda lst: lst.__iadd__([[]]),
}


@pytest.mark.parametrize("then", THEN)
@pytest.mark.parametrize("reshape", RESHAPE)
def test_children_paths_after_the_list_is_reshaped(reshape: str, then: str) -> None:
    state = Agentish(anything=[[0], "s", [2], {"k": 3}, [4]])
    before = state.to_json()
    lst = state.anything
    children = [c for c in lst if isinstance(c, (list, dict))]
    RESHAPE[reshape](lst)
    THEN[then](lst)
    for child in children:
        if isinstance(child, list):
            child.append(9)
        else:
            child["n"] = 9
    assert replay(before, state.drain_patch()) == state.to_json()
