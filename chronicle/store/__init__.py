"""The Chronicle store: content-addressed chunks, versioned metadata, workspaces.

Plain synchronous code with no FUSE and no trio in it (a test asserts it);
the mount (``chronicle.fs``), the CLI and the agent runtime are its clients.
Its rooms, lowest first — each imports only from rooms above it in this list:

=====================  ==================================================================
``model``              domain types with no storage: :class:`~chronicle.store.model.Attrs`,
                       :class:`~chronicle.store.model.Actor`, dirent kinds
``chunks/``            chunk ids (BLAKE3), the codec (zstd), the chunker (FastCDC), the
                       chunk backend seam (``backends/``: where pack bytes live) and the
                       chunk index (LMDB: chunk id -> location, refcount)
``meta/``              the LMDB layout and record codecs, the journal (one event = one
                       write transaction), the versioned tree reader, crash recovery
``history/``           path history (follows renames), points (seq, time, snapshot,
                       turn), the FUSE-free views of ``.chronicle/``, the turn log
``gc/``                retention policies and the versions they keep, ignore rules, the GC
                       dry run (pruning comes later)
``namespace/``         the workspace at its head: mutations, open files, staging,
                       streams, content maps, restore
``fsck/``              checks, repair and the report
``store``              :class:`~chronicle.store.store.Store`: opening, workspaces,
                       forks, durability (sync)
=====================  ==================================================================

Words (SPEC §1): a **store** holds many **workspaces**; a **seq** numbers a
workspace's events; a **version** is one recorded content of a path; a
**chunk** is a CDC piece of content named by its BLAKE3; a **snapshot** names
a seq; a **fork** reads through to its parent at its fork seq.

Threads: each room's ``__init__`` says which thread may call it. LMDB write
transactions begin and commit inside one synchronous call.
"""
