"""Metadata: the LMDB layout, the journal, the versioned tree, crash recovery.

- ``schema`` — the named databases, key encodings and record formats;
- ``nodes`` — :class:`~chronicle.store.meta.nodes.NodeStore`: the extent-tree
  nodes of format-4 contents (``content_nodes``), read through a cache, walked
  in order (the one iterator over a content's extents), and their reference
  counts when a content is written or freed;
- ``journal`` — :class:`~chronicle.store.meta.journal.EventWriter`: one
  event (one seq) is one write transaction with its log line and path entries;
- ``events`` — the packed ``events`` record and the SPEC §4 JSON line
  rendered from it (the same bytes the text record held);
- ``tree`` — :class:`~chronicle.store.meta.tree.TreeView`: the tree of a
  workspace (and its fork layers) at any seq, one seek per lookup;
- ``recovery`` — the synced-state protocol that survives a machine crash,
  the metadata reserve on a full disk, and a damaged meta page rewritten
  from the other;
- ``pages`` — :class:`~chronicle.store.meta.pages.PageWalk`: ``data.mdb``
  read by hand, page by page, past any damage (LMDB must never read a
  damaged page: some of its checks abort the process);
- ``damaged`` — walking a database through LMDB past the pages it reports
  damaged (``DamagedRange``: a key range that cannot be read);
- ``salvage`` — a fresh file of every readable record, with what damaged
  records said derived again from their twins; ``Store.open`` salvages a
  damaged file before LMDB sees it, fsck reports it;
- ``backup`` — the metadata backup generations (``meta-backup/``) and the
  fall back to them when the live file cannot be opened at all;
- ``compact`` — a mostly free metadata file replaced by a compacted copy
  at the last close of the store.

Threads: LMDB read transactions may be used from any thread; a write
transaction is begun and committed inside one synchronous call.
"""
