"""``chronicle.store.meta.journal``: one event is one seq and one write
transaction; an aborted event leaves no trace; the log line's fields."""

from __future__ import annotations

import json
import re

import pytest

from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.meta import schema
from chronicle.store.meta.journal import EventWriter, iso_time, parse_iso_time
from chronicle.store.meta.schema import P_ARRIVED, P_BUMPS, P_CONTENT, P_GONE, PathEntry
from chronicle.store.model import Actor
from storeutil import A, history, log_lines, write




def snapshot(store) -> dict[str, list]:
    """Every record of every database, for before/after comparisons."""
    out = {}
    with store.env.begin() as txn:
        for name in schema.DATABASES:
            with txn.cursor(db=store.dbs[name]) as cur:
                out[name] = [(bytes(k), bytes(v)) for k, v in cur]
    return out


def seqs_written(store, ws_id: int, seq: int) -> dict[str, int]:
    """How many records of ``seq`` each versioned database holds."""
    counts = {}
    with store.env.begin() as txn:
        with txn.cursor(db=store.dbs["inodes"]) as cur:
            counts["inodes"] = sum(1 for k, _ in cur if k[:4] == schema.ws_key(ws_id)
                                   and schema.inode_key_seq(k) == seq)
        with txn.cursor(db=store.dbs["dirent_hist"]) as cur:
            counts["dirent_hist"] = sum(1 for k, _ in cur if k[:4] == schema.ws_key(ws_id)
                                        and schema.split_dirent_hist_key(k[12:])[1] == seq)
        with txn.cursor(db=store.dbs["paths"]) as cur:
            counts["paths"] = sum(1 for k, _ in cur if k[:4] == schema.ws_key(ws_id)
                                  and schema.path_key_seq(k) == seq)
        counts["events"] = int(txn.get(schema.event_key(ws_id, seq), db=store.dbs["events"]) is not None)
        counts["head"] = schema.U64.unpack(txn.get(schema.ws_key(ws_id), db=store.dbs["heads"]))[0]
    return counts


def test_an_event_is_one_seq_for_all_its_records(store, ws):
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    write(ws, d, b"f", b"x")
    seq = ws.head_seq + 1
    ws.rename(d, b"f", ws.root, b"g", 0, A)             # one event: two dirents, three inodes, two paths
    assert ws.head_seq == seq
    assert seqs_written(store, ws.id, seq) == {"inodes": 3, "dirent_hist": 2, "paths": 2, "events": 1,
                                               "head": seq}
    assert [line["seq"] for line in log_lines(ws)] == list(range(1, seq + 1))


def test_an_aborted_event_leaves_no_trace_and_its_seq_is_used_next(store, ws):
    f = write(ws, ws.root, b"f", b"x")
    before, head = snapshot(store), ws.head_seq
    with pytest.raises(RuntimeError):
        with ws.event(A) as w:
            w.put_attrs(f, ws.head_attrs(f).replace(mode=0o100600))
            w.del_dirent(ws.root, b"f")
            w.path_entry(b"f", "delete", ino=f, flags=P_GONE)
            w.log("delete", b"f")
            raise RuntimeError("the mutation failed half way")
    with ws.event(A) as w:                                # nothing logged: aborted too
        w.put_attrs(f, ws.head_attrs(f).replace(mode=0o100600))
    assert snapshot(store) == before and ws.head_seq == head
    ws.setattr(f, A, mode=0o600)
    assert ws.head_seq == head + 1 and log_lines(ws)[-1]["seq"] == head + 1


def test_a_log_line_has_its_fields_in_order_without_nones(store, ws):
    ws.turn = {"agent": "bot", "turn": 3, "message_id": None}
    now = 1_764_000_000_123_456_789
    with ws.event(Actor(1, 2, 77), now_ns=now) as w:
        w.log("rename", b"d/\xffname", from_="a", version=None, size=5, exchange=True)
    line = log_lines(ws)[-1]
    assert list(line) == ["seq", "time", "event", "path", "from", "size", "exchange", "turn", "pid"]
    assert line["seq"] == ws.head_seq and line["time"] == "2025-11-24T16:00:00.123456Z"
    assert line["path"] == "d/\udcffname"                  # os.fsdecode: undecodable bytes survive (SPEC §4)
    assert line["turn"] == {"agent": "bot", "turn": 3, "message_id": None} and line["pid"] == 77


def test_a_path_entry_numbers_versions_and_a_rename_continues_its_origin(store, ws):
    f = write(ws, ws.root, b"a", b"one")
    write(ws, ws.root, b"a", b"two")
    content = ws.head_attrs(f).content
    with store.env.begin(write=True) as txn:
        w = EventWriter(txn, store.dbs, ws.id, ws.head_seq + 1, is_fork=False, turn=None, pid=1,
                        history=ws.history)
        assert w.path_entry(b"b", "rename", ino=f, flags=P_ARRIVED | P_CONTENT, content=content,
                            origin=b"a") == 2                       # continues a's history
        assert w.path_entry(b"b", "write", ino=f, flags=P_BUMPS | P_CONTENT, content=content) == 3
        key = schema.path_key(ws.id, b"b", w.seq)
        entry = PathEntry.decode(txn.get(key, db=store.dbs["paths"]), key)
        txn.abort()
    assert entry.ino == f and entry.content == content
    assert [v["version"] for v in history(ws, b"a")] == [1, 2]


def test_put_attrs_counts_one_reference_on_the_content(store, ws):
    f = write(ws, ws.root, b"f", b"counted")
    attrs = ws.head_attrs(f)
    with store.env.begin() as txn:
        count = schema.content_header(txn.get(attrs.content, db=store.dbs["contents"]), attrs.content)[1]
    ws.setattr(f, A, mode=0o600)                          # a new inode record naming the same content
    with store.env.begin() as txn:
        assert schema.content_header(txn.get(attrs.content, db=store.dbs["contents"]), attrs.content)[1] == count + 1
    empty, _ = ws.create(ws.root, b"empty", 0o100644, A)
    with store.env.begin() as txn:
        before = txn.get(EMPTY_CONTENT_ID, db=store.dbs["contents"])
    ws.setattr(empty, A, mode=0o600)
    with store.env.begin() as txn:                        # the empty content is never counted
        assert txn.get(EMPTY_CONTENT_ID, db=store.dbs["contents"]) == before


def test_times_are_iso_8601_utc_with_microseconds():
    ns = 1_700_000_000_000_001_999
    text = iso_time(ns)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    assert parse_iso_time(text) == ns // 1000 * 1000
    assert parse_iso_time("2023-11-14T22:13:20") == 1_700_000_000 * 10 ** 9     # naive means UTC
    with pytest.raises(ValueError):
        parse_iso_time("yesterday")
    assert json.loads(json.dumps(text)) == text
