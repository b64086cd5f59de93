"""Metadata: the LMDB layout, the journal, the versioned tree, crash recovery.

- ``schema`` — the named databases, key encodings and record formats;
- ``journal`` — :class:`~chronicle.store.meta.journal.EventWriter`: one
  event (one seq) is one write transaction with its log line and path entries;
- ``tree`` — :class:`~chronicle.store.meta.tree.TreeView`: the tree of a
  workspace (and its fork layers) at any seq, one seek per lookup;
- ``recovery`` — the synced-state protocol that survives a machine crash.

Threads: LMDB read transactions may be used from any thread; a write
transaction is begun and committed inside one synchronous call.
"""
