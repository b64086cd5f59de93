"""The pruned marks GC writes read back as the text marks, whatever form the entries and log lines were stored in."""

from __future__ import annotations

import time

from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.gc.prune import mark_pruned
from chronicle.store.meta import schema
from chronicle.store.meta.schema import P_CONTENT, P_PRUNED, PathEntry
from tests.storeutil import history, log_lines, write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _entries(store, ws) -> dict[bytes, bytes]:
    with ws.read_txn() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=store.dbs["paths"])}


def test_text_entries_of_before_packed_fragments_are_marked_as_their_text(store, ws):
    """Entries as format 4 wrote them before packed fragments (``encode_text``:
    the hash cut out of the text) are marked from the log line (packed
    ``events`` record): each mark reads as the text mark of the fragment and
    is stored packed; history and log show what a store of packed entries shows."""
    names = [b"a", b"b", "é ü".encode(), b"\xff\xfe", b'q"uote\\']
    write(ws, ws.root, b"a", b"0")
    for i in range(6):
        for name in names:
            write(ws, ws.root, name, b"v%d" % i)
    ws.store.sync()
    before = _entries(store, ws)
    with store.env.begin(write=True) as txn:       # back to the text form of before packed fragments
        for key, raw in before.items():
            txn.put(key, PathEntry.decode(raw, key).encode_text(), db=store.dbs["paths"])
    texts = {key: PathEntry.decode(raw, key) for key, raw in before.items()}
    assert any(PathEntry.decode(raw, key).encode_text()[0] & 128 for key, raw in before.items())   # P_HASH_CUT
    dryrun.set_policy(store, ws.id, Policy(keep_last=2))
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["pruned_versions"] == 21
    marked = 0
    for key, raw in _entries(store, ws).items():
        entry, old = PathEntry.decode(raw, key), texts[key]
        if not entry.flags & P_PRUNED:
            assert entry == old
            continue
        marked += 1
        assert old.flags & P_CONTENT and not entry.flags & P_CONTENT and entry.content == b""
        assert entry.fragment == mark_pruned(old.fragment)
        assert (entry.ino, entry.origin, entry.path) == (old.ino, old.origin, old.path)
        assert schema.entry_is_packed(raw)           # stored packed, as gc of a packed entry stores it
    assert marked == 21
    assert [bool(v.get("pruned")) for v in history(ws, b"a")] == [True] * 5 + [False] * 2
    assert all("hash" not in v for v in history(ws, b"a")[:5])
    assert sum(bool(line.get("pruned")) for line in log_lines(ws)) == 21
