"""The namespace: a workspace at its head, and the mutations that make history.

Modules, from the top down (each imports only those below it):

- ``workspace`` — :class:`~chronicle.store.namespace.workspace.Workspace`:
  lookups and every mutation (create, mkdir, link, unlink, rename, setattr,
  xattrs, ...), one event each. One object composed of the collaborators
  below; its public mutation API is :meth:`Workspace.event`;
- ``restore`` — bringing back a file's version or the whole tree of a past
  seq as new events, written with that public API alone;
- ``files`` — :class:`~chronicle.store.namespace.files.OpenFiles`
  (``ws.files``): open-file state (handle counts, overlays) and the
  three-phase commit that turns writes into versions; and
  :class:`~chronicle.store.namespace.files.ReadTracker`, the open turn's
  read-set gathered in memory as the mount serves reads;
- ``head`` — :class:`~chronicle.store.namespace.head.PathLinks`
  (``ws.links``: the name each inode was reached by, hence an event's path)
  and :class:`~chronicle.store.namespace.head.WorkspaceEvent` (an event that
  updates the workspace's caches once it commits);
- ``staging``, ``stream`` — a file's writes before commit: the sparse overlay
  of an in-place edit, the chunk-while-you-write stream of a new file; a
  file rewritten whole keeps the content it replaces (its **prior**) as the
  delta bases of its new chunks;
- ``content`` — :class:`~chronicle.store.namespace.content.ContentMap`: a
  content record (extent list of chunks, inline or a tree) read as bytes;
  ``build_content``, which re-cuts only what changed and updates the tree.

Vocabulary: **head** (the workspace's current state, seq ``head_seq``),
**event** (one mutation: one seq, one LMDB write transaction, one log
line), **actor** (uid, gid, pid of who asked), **link** (a ``(parent ino,
name)`` entry reaching an inode), **read-set** (the file versions and byte
ranges a turn read), **overlay** (uncommitted writes of one
open file), **version** (a numbered entry of a path's history with new
content), **content** (an extent list of chunks and holes, inline or a tree
of extent nodes, keyed by its content hash: the tree hash over the chunk
ids, ``chunks.tree``).

Threads — who may call what:

- a writable ``Workspace`` and everything reached through it (``ws.files``,
  ``ws.links``, ``restore_*``) are used by one thread at a time: the FUSE
  loop thread in the daemon, the main thread in the CLI. Nothing here
  locks; only one process holds a workspace writable (the workspace lock).
  Mutations must never overlap: an event takes seq ``head_seq + 1`` and the
  caches are updated after its commit, so a caller that hands a long
  mutation (``restore_tree``) to a worker thread must keep every other call
  on the workspace out until it returns. Reads of committed state through
  ``ws.view(seq)`` with the caller's own read transaction touch no cache
  and are safe from any thread.
- worker threads may run ``ws.files.commit_build(overlay)`` (CDC, BLAKE3,
  zstd, pack writes) and ``ws.files.wait_stream(ino)``, while the caller
  keeps every other call on that inode out (the FUSE adapter holds the
  inode's lock); a stream's own chunking runs on a small pool
  (``stream``);
- ``ContentMap`` reads and ``build_content`` are safe from any thread.
- a read-only ``Workspace`` (``writable=False``: the CLI's reads, another
  process's view of a mounted workspace) caches no attributes and may be
  used from any thread, one thread at a time.
"""
