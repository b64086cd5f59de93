"""Leases across processes: liveness, pins, packs, settledness; the pruned mark's text edit."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from chronicle.store.gc.leases import read_leases, writers_settled
from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.gc.prune import _HASH_FIELD, _marked_entry, content_entry_fields, mark_pruned
from chronicle.store.meta import schema
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, P_PRUNED, PathEntry
from tests.storeutil import write


def test_a_lease_of_a_process_that_is_gone_is_removed(store, ws):
    write(ws, ws.root, b"f", b"x" * 100_000)            # the first chunk write announces the lease
    mine = read_leases(store.run_dir)
    assert len(mine) == 1 and mine[0].packs and mine[0].busy_since is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = store.run_dir / "leases" / f"{dead.stdout.strip()}-0000.json"
    stale.write_text(json.dumps({"pid": int(dead.stdout), "heartbeat": 1, "pins": [[1, 2]], "packs": [7],
                                 "busy_since": 1}))
    assert [lease.pid for lease in read_leases(store.run_dir)] == [mine[0].pid]
    assert not stale.exists()
    store.close()
    assert read_leases(store.run_dir) == []             # closing the store removes its lease


def test_writers_settled_needs_a_fresh_heartbeat_and_no_old_dedup_hit(store, ws):
    write(ws, ws.root, b"f", b"y" * 50_000)
    since = time.time_ns()
    lease = read_leases(store.run_dir)[0]
    assert "not refreshed" in writers_settled([lease], since)
    store.lease.refresh(force=True)
    assert writers_settled(read_leases(store.run_dir), since) is None
    store.chunks.put(b"\x07" * 32, b"z")                 # a new chunk: written, pending (not a dedup hit)
    store.lease.refresh(force=True)
    assert writers_settled(read_leases(store.run_dir), since) is None
    assert read_leases(store.run_dir)[0].packs


def test_mark_pruned_is_a_text_edit_of_the_json():
    line = b'{"seq": 5, "time": "2026-01-01T00:00:00.000001Z", "event": "write", "path": "a \\"hash\\": x", ' \
           b'"size": 3, "hash": "abc123", "turn": null, "pid": 9}'
    marked = json.loads(mark_pruned(line))
    assert marked == {"seq": 5, "time": "2026-01-01T00:00:00.000001Z", "event": "write", "path": 'a "hash": x',
                      "size": 3, "turn": None, "pid": 9, "pruned": True}
    fragment = line[1:]                                  # a path entry's fragment has no leading brace
    assert json.loads(b"{" + mark_pruned(fragment))["pruned"] is True


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["seq", "path", "size", "mode", "x"]),
                       st.one_of(st.integers(), st.text(max_size=12), st.none())),
       st.one_of(st.none(), st.text(alphabet="0123456789abcdef", max_size=64), st.text(max_size=8)),
       st.booleans())
def test_mark_pruned_equals_the_regex_edit(fields, hash_value, with_hash):
    """The sliced edit is the regex edit it replaced, for every line shape."""
    fields = dict(fields)
    if with_hash:
        fields["hash"] = hash_value
    text = json.dumps(fields).encode()
    if not text.endswith(b"}") or text == b"{}":
        return
    expected = _HASH_FIELD.sub(b"", text, count=1)
    expected = expected[:expected.rindex(b"}")] + b', "pruned": true}'
    assert mark_pruned(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32), st.binary(max_size=40),
       st.binary(max_size=40), st.sampled_from([b'"version": 2, "hash": "ab12", "size": 3}', b'"version": 1}']))
def test_the_pruned_mark_cut_from_bytes_is_the_encoded_mark(ino, content, origin, path, fragment):
    """Pruning cuts the mark from the entry's bytes; it is what encoding the marked entry gives."""
    entry = PathEntry(P_CONTENT | P_BUMPS, ino, content, origin, fragment, path)
    marked = PathEntry(P_BUMPS | P_PRUNED, ino, b"", origin, mark_pruned(fragment), path)
    key = schema.path_key(1, path or b"p", 5)
    assert _marked_entry(entry.encode(key), key) == marked.encode(key)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32), st.binary(max_size=40),
       st.binary(max_size=40), st.binary(max_size=60))
def test_content_entry_fields_are_the_decoded_fields(ino, content, origin, path, fragment):
    entry = PathEntry(P_CONTENT | P_BUMPS, ino, content, origin, fragment, path)
    key = schema.path_key(1, path or b"p", 5)
    assert content_entry_fields(entry.encode(key), key) == (ino, content, path, fragment)


def test_a_rotation_request_seals_our_pack_and_close_sealed_drops_it_from_the_lease(store, ws):
    import os

    from chronicle.store.gc.leases import request_rotation

    write(ws, ws.root, b"f", os.urandom(200_000))
    pack = store.chunks.writer.current_pack
    assert pack in read_leases(store.run_dir)[0].packs or pack in store.chunks.lease_state()[0]
    assert not store.lease.take_rotation()
    request_rotation(store.run_dir, [pack + 1])            # not ours: nothing happens
    store.lease.refresh(force=True)
    assert not store.lease.take_rotation() and pack in store.chunks.writer.open_packs()
    time.sleep(0.05)                                        # a later mtime than the first request's
    request_rotation(store.run_dir, [pack])
    store.lease.refresh(force=True)
    assert store.lease.take_rotation() and not store.lease.take_rotation()     # said once
    store.chunks.writer.close_sealed()
    store.lease.refresh(force=True)
    assert pack not in read_leases(store.run_dir)[0].packs                    # GC may compact it now
    write(ws, ws.root, b"g", b"after")
    assert store.chunks.writer.current_pack != pack
