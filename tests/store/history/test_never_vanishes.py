"""History never vanishes (issue 7 §2, SPEC §4 "a path that was deleted
still has a history"), no mount.

A path deleted and then arrived at by a rename keeps its own versions and
its delete, then the rename and the history it followed; the hypothesis
state machine drives random create/write/rename/unlink/mkdir/rmdir/restore
sequences and checks after every step that every version ever closed is
still listed in ``query/<path>`` and ``versions/<path>/`` of the path it was
recorded at, and reads back byte-exact."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from chronicle.store.chunks.tree import hash_data
from chronicle.errors import ChronicleError
from chronicle.store.chunks.ids import to_hex
from chronicle.store.history.nodes import VersionFile, VersionsDir
from chronicle.store.history.views import HistoryViews
from chronicle.store.namespace.restore import restore_file
from chronicle.store.store import Store
from storeutil import A, history, write


def test_a_deleted_path_renamed_onto_keeps_its_own_history(ws):
    """The issue's reproduction: ``echo one > g; echo two > g; rm g; echo other > f; mv f g``."""
    write(ws, ws.root, b"g", b"one\n")
    write(ws, ws.root, b"g", b"two\n")
    ws.unlink(ws.root, b"g", A)
    write(ws, ws.root, b"f", b"other\n")
    ws.rename(ws.root, b"f", ws.root, b"g", 0, A)
    got = [(v["version"], v["event"], v["path"]) for v in history(ws, b"g")]
    assert got == [(1, "write", "g"), (2, "write", "g"), (2, "delete", "g"), (3, "write", "f"), (3, "rename", "g")]
    views = HistoryViews(ws)
    assert [name for name, _ in views.listing(VersionsDir(b"g"))] == [b"1", b"2", b"3"]
    assert [views.open(VersionFile(b"g", n)).read(0, 100) for n in (1, 2, 3)] == [b"one\n", b"two\n", b"other\n"]
    write(ws, ws.root, b"g", b"again\n")          # numbering goes on from what is listed
    assert [v["version"] for v in history(ws, b"g")][-1] == 4


def test_renamed_back_and_forth_each_entry_is_listed_once(ws):
    write(ws, ws.root, b"a", b"1")
    for _ in range(40):                            # would branch 2**40 ways without the memo
        ws.rename(ws.root, b"a", ws.root, b"b", 0, A)
        ws.rename(ws.root, b"b", ws.root, b"a", 0, A)
    write(ws, ws.root, b"a", b"2")
    entries = history(ws, b"a")
    assert len({(v["seq"], v["path"]) for v in entries}) == len(entries)
    assert [v["version"] for v in entries if v["event"] == "write"] == [1, 2]


def test_a_name_that_extends_another_is_listed_after_both_are_deleted(ws):
    for name in (b"a", b"a-b", b"ab", b"a.txt"):
        write(ws, ws.root, name, b"x")
        ws.unlink(ws.root, name, A)
    with ws.read_txn() as txn:
        assert ws.history.children_with_history(txn, b"") == {b"a", b"a-b", b"ab", b"a.txt"}


def test_a_deleted_directory_recreated_by_a_move_keeps_the_files_old_history(ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"x", b"1")
    ws.unlink(d, b"x", A)
    ws.rmdir(ws.root, b"d", A)
    e, _ = ws.mkdir(ws.root, b"e", 0o755, A)
    write(ws, e, b"x", b"2")
    ws.rename(ws.root, b"e", ws.root, b"d", 0, A)
    write(ws, e, b"x", b"3")
    got = [(v["event"], v["path"]) for v in history(ws, b"d/x")]
    assert got == [("write", "d/x"), ("delete", "d/x"), ("write", "e/x"), ("write", "d/x")]
    assert [v["version"] for v in history(ws, b"d/x")] == [1, 1, 2, 3]


# -- the state machine ------------------------------------------------------------------------

PATHS = [b"a", b"b", b"d/a"]
ANY = PATHS + [b"d"]


class NeverVanishes(RuleBasedStateMachine):
    """Random mutations of one workspace; ``closed`` is every version ever
    recorded: ``(path recorded at, seq, bytes)``."""

    def __init__(self):
        super().__init__()
        self.store = Store.init(_tmp.mktemp("nv") / "store")
        self.ws = self.store.open_workspace("w", writable=True, create=True)
        self.views = HistoryViews(self.ws)
        self.closed: list[tuple[bytes, int, bytes]] = []

    def teardown(self):
        self.store.close()

    def _parent(self, path: bytes) -> tuple[int, bytes] | None:
        head, _, name = path.rpartition(b"/")
        try:
            parent, _kind = self.ws.resolve(head)
        except ChronicleError:
            return None
        return parent, name

    def _note(self, path: bytes, data: bytes, before: int) -> None:
        if self.ws.head_seq == before:
            return                                   # same content: no version (SPEC §1)
        with self.ws.read_txn() as txn:
            seq, entry = self.ws.history.own_entries(txn, path)[-1]
        assert seq == self.ws.head_seq and entry.content == hash_data(data)
        self.closed.append((path, seq, data))

    @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=64))
    def write_file(self, path, data):
        found = self._parent(path)
        if found is None:
            return
        before = self.ws.head_seq
        try:
            write(self.ws, *found, data)
        except ChronicleError:
            return                                   # a directory there, or no directory d
        self._note(path, data, before)

    @rule(src=st.sampled_from(ANY), dst=st.sampled_from(ANY))
    def rename(self, src, dst):
        a, b = self._parent(src), self._parent(dst)
        if a is None or b is None:
            return
        try:
            self.ws.rename(*a, *b, 0, A)
        except ChronicleError:
            pass

    @rule(path=st.sampled_from(PATHS))
    def unlink(self, path):
        found = self._parent(path)
        if found is not None:
            try:
                self.ws.unlink(*found, A)
            except ChronicleError:
                pass

    @rule()
    def mkdir_or_rmdir(self):
        try:
            self.ws.mkdir(self.ws.root, b"d", 0o755, A)
        except ChronicleError:
            try:
                self.ws.rmdir(self.ws.root, b"d", A)
            except ChronicleError:
                pass

    @rule(path=st.sampled_from(PATHS), pick=st.integers(0, 50))
    def restore(self, path, pick):
        with self.ws.read_txn() as txn:
            try:
                numbers = sorted(self.ws.history.content_versions(txn, path))
            except ChronicleError:
                return
        if not numbers:
            return
        number = numbers[pick % len(numbers)]
        data = self.views.open(VersionFile(path, number)).read(0, 1 << 20)
        before = self.ws.head_seq
        try:
            restore_file(self.ws, path, number, A)
        except ChronicleError:
            return
        self._note(path, data, before)

    @invariant()
    def every_closed_version_is_listed_and_reads_back(self):
        by_path: dict[bytes, list[tuple[int, bytes]]] = {}
        for path, seq, data in self.closed:
            by_path.setdefault(path, []).append((seq, data))
        for path, recorded in by_path.items():
            doc = json.loads(self.views.query(path))
            listed = {(v["seq"], v.get("hash")): v["version"] for v in doc["versions"]}
            numbers = [v["version"] for v in doc["versions"]]
            assert numbers == sorted(numbers)
            names = [name for name, node in self.views.listing(VersionsDir(path)) if isinstance(node, VersionFile)]
            with self.ws.read_txn() as txn:
                versions = self.ws.history.content_versions(txn, path)
            assert names == [str(n).encode() for n in sorted(versions)]
            by_seq = {v.seq: n for n, v in versions.items()}
            for seq, data in recorded:
                number = listed.get((seq, to_hex(hash_data(data))))
                assert number is not None, (path, seq, data, doc)
                assert by_seq.get(seq) == number
                assert self.views.open(VersionFile(path, number)).read(0, 1 << 20) == data


def test_every_version_ever_closed_stays_listed_and_readable(tmp_path_factory):
    global _tmp
    _tmp = tmp_path_factory
    run_state_machine_as_test(NeverVanishes, settings=settings(
        max_examples=100, stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


_tmp = None
