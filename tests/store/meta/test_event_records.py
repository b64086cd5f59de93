"""Compact event records (meta.events): the log rendered from them is, byte
for byte, the JSON text the journal wrote before; old text records still read."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.gc.prune import _marked_entry, mark_pruned
from chronicle.store.meta import events, schema
from chronicle.store.meta.schema import P_CONTENT, P_HASH_CUT, P_PRUNED, PathEntry
from chronicle.store.namespace import restore
from chronicle.store.store import Store
from tests.storeutil import A, write

LATER = 2 ** 62


def _rich_history(tmp_path, monkeypatch):
    """A store whose log has every kind of line; and the JSON text the journal
    would have stored for each (ws, seq) before records were packed."""
    texts: dict[tuple[int, int], bytes] = {}
    real_encode = events.encode

    def recording(time_ns, line):
        texts[(line_ws[0], line["seq"])] = json.dumps(line).encode()
        return real_encode(time_ns, line)

    line_ws = [0]
    monkeypatch.setattr(events, "encode", recording)
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    line_ws[0] = ws.id
    write(ws, ws.root, b"a.txt", b"one\n")
    write(ws, ws.root, b"a.txt", b"two\n")
    ws.turn = {"agent": "bot", "turn": 3, "message_id": None}
    write(ws, ws.root, b"caf\xc3\xa9-\xff\xfe.bin", b"\x00\x01")           # non-UTF-8 name: lone surrogates
    ws.turn = {"agent": "b\u00f6t \"q\"", "turn": 4, "message_id": "m-1", "extra": [1, 2]}   # another shape
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    ws.rename(ws.root, b"a.txt", d, b"b.txt", 0, A)                       # rename to a free path
    write(ws, ws.root, b"c", b"c\n")
    ws.rename(ws.root, b"c", d, b"b.txt", 0, A)                           # rename over a file
    ws.turn = None
    ws.symlink(ws.root, b"ln", b"dir/b.txt", A)
    ino, _ = ws.resolve(b"dir/b.txt")
    ws.link(ino, ws.root, b"hard", A)
    ws.setattr(ino, A, mode=0o600)
    ws.setattr(ino, A, uid=7, gid=8)
    ws.setattr(ino, A, mtime_ns=1_000_000_123)
    ws.setxattr(ino, b"user.k", b"v", A)
    ws.removexattr(ino, b"user.k", A)
    long_dir = b"/".join([b"d" * 200] * 3)
    parent = ws.root
    for part in long_dir.split(b"/"):
        parent, _ = ws.mkdir(parent, part, 0o755, A)
    write(ws, parent, b"long-file", b"deep\n")                          # a path longer than PATH_KEY_MAX
    ws.unlink(ws.root, b"hard", A)
    restore.restore_file(ws, b"dir/b.txt", 1, A)
    for i in range(4):
        write(ws, ws.root, b"p", b"p %d\n" % i)
    return store, ws, texts


def _log(ws) -> list[bytes]:
    with ws.read_txn() as txn:
        return [line for _seq, line in ws.history.log_entries(txn)]


def test_the_log_rendered_from_packed_records_is_the_text_the_journal_wrote(tmp_path, monkeypatch):
    store, ws, texts = _rich_history(tmp_path, monkeypatch)
    with ws.read_txn() as txn:
        raws = {schema.event_key_seq(k): bytes(v) for k, v in txn.cursor(db=store.dbs["events"])}
    assert all(raw[0] == events.PACKED for raw in raws.values())           # every line of this history packs
    lines = _log(ws)
    assert lines == [texts[(ws.id, seq)] for seq in sorted(raws)]
    assert sum(map(len, raws.values())) < 0.6 * sum(map(len, lines))      # (its 600-byte paths are kept whole)
    kinds = {json.loads(line)["event"] for line in lines}
    assert {"write", "rename", "mkdir", "symlink", "link", "chmod", "chown", "utimens", "setxattr",
            "removexattr", "delete", "restore"} <= kinds
    with ws.read_txn() as txn:
        assert ws.history.event(txn, 3) == json.loads(texts[(ws.id, 3)])
    store.close()


def test_gc_marks_packed_records_as_it_marked_text(tmp_path, monkeypatch):
    store, ws, texts = _rich_history(tmp_path, monkeypatch)
    texts = dict(texts)                         # as written (the marks gc packs are recorded too)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    collect.collect(store, ["w"], now_ns=LATER)
    lines = {json.loads(line)["seq"]: line for line in _log(ws)}
    pruned = [seq for seq, line in lines.items() if json.loads(line).get("pruned")]
    assert pruned
    for seq in pruned:
        assert lines[seq] == mark_pruned(texts[(ws.id, seq)])              # as the text mark would read
    store.close()


def test_old_text_records_read_as_before_beside_packed_ones(tmp_path, monkeypatch):
    store, ws, texts = _rich_history(tmp_path, monkeypatch)
    packed = _log(ws)
    with store.env.begin(write=True) as txn:                               # every other record as a format-3 line
        for (ws_id, seq), text in texts.items():
            if seq % 2:
                txn.put(schema.event_key(ws_id, seq), text, db=store.dbs["events"])
    assert _log(ws) == packed
    assert fsck(store).clean
    with ws.read_txn() as txn:
        assert ws.history.seq_at_time(txn, LATER) == ws.head_seq
    store.close()


_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]) | st.sampled_from("\udcff\udc80\"\\\n"),
                max_size=30)
_scalar = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | _text | \
    st.text("0123456789abcdef", min_size=64, max_size=64) | st.floats(allow_nan=False, allow_infinity=False)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(_text, inner, max_size=3), max_leaves=6)
_names = st.sampled_from(events.FIELDS + ("other", "x-y")) | _text.filter(lambda t: t not in ("seq", "time", "event",
                                                                                                "path", "turn", "pid"))


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(1, (1 << 64) - 1), time_ns=st.integers(0, 253402300799 * 10 ** 9).map(lambda n: n // 1000 * 1000),
       event=st.sampled_from(events.EVENTS) | _text, path=st.none() | _text,
       fields=st.lists(st.tuples(_names, _value), max_size=5, unique_by=lambda kv: kv[0]),
       turn=st.none() | st.fixed_dictionaries({"agent": _text, "turn": st.integers(0, 99),
                                               "message_id": st.none() | _text}) | st.dictionaries(_text, _scalar),
       pid=st.integers(0, 1 << 31), pruned=st.booleans())
def test_any_line_renders_back_to_the_same_text(seq, time_ns, event, path, fields, turn, pid, pruned):
    line = {"seq": seq, "time": events.iso_time(time_ns), "event": event, "path": path}
    for k, v in fields:
        line[k] = v
    line["turn"], line["pid"] = turn, pid
    if pruned:
        line["pruned"] = True
    raw = events.encode(time_ns, line)
    assert events.render(seq, raw) == json.dumps(line).encode()
    assert events.decode(seq, raw) == json.loads(json.dumps(line))
    assert events.time_of(seq, raw) == line["time"]


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(1, (1 << 64) - 1), path=_text, other=_text,
       fields=st.lists(st.tuples(_names, _value), max_size=5, unique_by=lambda kv: kv[0]),
       digest=st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex), pruned=st.booleans())
def test_gc_marks_a_packed_line_in_place_as_mark_pruned_does(seq, path, other, fields, digest, pruned):
    """``mark_pruned_if_at`` (one unpack, no rendering: gc's fast path) gives
    the record ``mark_pruned`` gives, for the line's own path only, once."""
    line = {"seq": seq, "time": events.iso_time(10 ** 15), "event": "write", "path": path}
    if digest is not None:
        line["hash"] = digest
    for k, v in fields:
        if k not in ("hash", "pruned"):
            line[k] = v
    line["turn"], line["pid"] = None, 7
    if pruned:
        line["pruned"] = True
    raw = events.encode(10 ** 15, line)
    if raw[0] != events.PACKED:
        return
    if other != path:
        assert events.mark_pruned_if_at(raw, other) is None
    marked = events.mark_pruned_if_at(raw, path)
    if pruned:
        assert marked is None
        return
    assert events.render(seq, marked) == events.render(seq, events.mark_pruned(seq, raw, mark_pruned))
    assert events.is_pruned(seq, marked) and events.mark_pruned_if_at(marked, path) is None


def test_a_damaged_packed_record_is_a_value_error():
    raw = events.encode(10 ** 15, {"seq": 1, "time": events.iso_time(10 ** 15), "event": "write", "path": "a",
                                   "turn": None, "pid": 1})
    with pytest.raises(ValueError):
        events.render(1, raw[:-3])
    with pytest.raises(ValueError):
        events.decode(1, bytes((events.PACKED,)) + b"\xc1")


def test_path_entries_are_packed_and_older_forms_read_back_the_same_fragment(tmp_path, monkeypatch):
    store, ws, _texts = _rich_history(tmp_path, monkeypatch)
    packed = hashed = fast = keyed = 0
    with ws.read_txn() as txn:
        for _key, raw in txn.cursor(db=store.dbs["paths"]):
            entry = PathEntry.decode(raw, _key)
            assert not entry.flags & P_HASH_CUT and not raw[0] & P_HASH_CUT
            # the entry as format 3 wrote it (the whole fragment as text) reads as the same entry
            old = b"".join((struct.pack("<BQII", entry.flags, entry.ino, len(entry.origin), len(entry.path)),
                            entry.content if entry.flags & P_CONTENT else b"", entry.origin, entry.path,
                            entry.fragment))
            assert PathEntry.decode(old) == entry
            # and as format 4 wrote it before packing (its hash cut out where derivable)
            assert PathEntry.decode(entry.encode_text()) == entry
            assert PathEntry.decode(entry.encode()) == entry      # as main packed it: seq and path in it
            assert PathEntry.decode(entry.encode(_key), _key) == entry and raw == entry.encode(_key)
            if raw != entry.encode():                   # its seq or path left to the key: it needs the key
                keyed += len(raw) < len(entry.encode())
                assert len(raw) <= len(entry.encode())
                with pytest.raises(ValueError):
                    PathEntry.decode(raw)
            if schema.entry_is_packed(raw):
                packed += 1
                assert len(raw) < len(old) - 60
                assert fragment_seq(entry) == schema.path_key_seq(_key)
                if entry.flags & P_CONTENT:                    # gc marks it without the text (most)
                    marked = PathEntry.decode(_marked_entry(raw, _key), _key)
                    assert marked.fragment == mark_pruned(entry.fragment) and marked.flags & P_PRUNED
                    fast += schema.pruned_entry(raw) is not None
                if entry.content and b'"hash": "' + entry.content.hex().encode() + b'"' in entry.fragment:
                    hashed += 1
                    assert entry.content.hex().encode() not in raw     # the hash is a mark, not 32 more bytes
    assert packed >= 20 and hashed >= 8 and fast >= 8 and keyed >= 15
    store.close()


def fragment_seq(entry: PathEntry) -> int:
    return json.loads(b"{" + entry.fragment)["seq"]


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 127), ino=st.integers(0, (1 << 64) - 1), content=st.binary(min_size=32, max_size=32),
       origin=st.binary(max_size=40), path=st.binary(max_size=40), before=st.binary(max_size=300),
       after=st.binary(max_size=80), with_hash=st.booleans())
def test_any_path_entry_reads_back_as_written(flags, ino, content, origin, path, before, after, with_hash):
    content = content if flags & P_CONTENT else b""
    needle = b', "hash": "' + content.hex().encode() + b'"' if with_hash and content else b""
    entry = PathEntry(flags, ino, content, origin, before + needle + after, path)
    raw = entry.encode()
    assert PathEntry.decode(raw) == entry and not raw[0] & P_HASH_CUT
    old = entry.encode_text()
    if entry.fragment[:1] not in (b"\x01", b"\x02"):    # (the journal's fragments start with '"seq"')
        assert PathEntry.decode(old) == entry
    assert bool(old[0] & P_HASH_CUT) == bool(needle or content and b', "hash": "' + content.hex().encode() + b'"'
                                              in before + after)


_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from("\udcff\udc80\"\\\n\u00e9"), max_size=30)
_VALUE = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | _TEXT | \
    st.sampled_from(["0" * 64, "ab" * 32, "AB" * 32])


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(0, (1 << 64) - 1), time_us=st.integers(0, 253402300799999999), event=st.sampled_from(
       list(events.EVENTS) + ["other"]), path=st.none() | _TEXT, fields=st.dictionaries(
       st.sampled_from(list(events.FIELDS) + ["x-y"]), _VALUE, max_size=5), turn=st.none() | st.fixed_dictionaries(
       {"agent": _TEXT, "turn": st.integers(0, 99), "message_id": st.none() | _TEXT}), pid=st.integers(0, 1 << 31),
       pruned=st.booleans(), content=st.binary(min_size=32, max_size=32), hash_is_content=st.booleans())
def test_a_log_shaped_fragment_is_packed_and_renders_byte_identical(seq, time_us, event, path, fields, turn, pid,
                                                                   pruned, content, hash_is_content):
    line = {"seq": seq, "time": events.iso_time(time_us * 1000), "event": event, "path": path}
    for k, v in fields.items():
        if k not in ("seq", "time", "event", "path", "turn", "pid", "pruned"):
            line[k] = v
    if hash_is_content:
        line["hash"] = content.hex()
    line["turn"], line["pid"] = turn, pid
    if pruned:
        line["pruned"] = True
    fragment = json.dumps(line)[1:].encode()
    entry = PathEntry(P_CONTENT, 5, content, b"", fragment)
    raw = entry.encode()
    assert schema.entry_is_packed(raw)
    assert PathEntry.decode(raw).fragment == fragment
    assert mark_pruned(PathEntry.decode(raw).fragment) == mark_pruned(fragment)
    packed_mark = schema.pruned_entry(raw)                   # gc's mark, in the packed form
    if packed_mark is not None:
        assert PathEntry.decode(packed_mark) == PathEntry(P_PRUNED, 5, b"", b"", mark_pruned(fragment))
    key = schema.path_key(1, b"a", 3)
    assert PathEntry.decode(_marked_entry(raw, key), key) == PathEntry(P_PRUNED, 5, b"", b"", mark_pruned(fragment))
    # under the key of its own seq and path, both are left out of the record and come back from the key
    own = os.fsencode(path) if isinstance(path, str) else b"x"
    key = schema.path_key(1, own, seq)
    keyed = entry.encode(key)
    assert PathEntry.decode(keyed, key) == PathEntry.decode(raw) == entry
    assert len(keyed) <= len(raw)
    if isinstance(path, str) and len(path) >= 3 and not schema.is_long(own):
        assert len(keyed) < len(raw)
    assert PathEntry.decode(_marked_entry(keyed, key), key) == PathEntry(P_PRUNED, 5, b"", b"", mark_pruned(fragment))
    # gc's plan reads the time, size and turn label of the packed fragment itself, as the JSON says
    stored = keyed[schema.entry_fragment_at(keyed):]
    label = (turn["agent"], turn["turn"]) if turn else None
    size = line.get("size")
    assert events.fragment_facts(stored) == (time_us * 1000, size if type(size) is int else 0, label)
    packed_mark = schema.pruned_entry(keyed)
    if packed_mark is not None:
        assert PathEntry.decode(packed_mark, key) == PathEntry(P_PRUNED, 5, b"", b"", mark_pruned(fragment))
