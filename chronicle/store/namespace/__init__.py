"""The namespace: a workspace at its head, and the mutations that make history.

- ``workspace`` — :class:`~chronicle.store.namespace.workspace.Workspace`:
  lookups and every mutation (create, write, rename, unlink, ...), one event
  each;
- ``files`` — open-file state: which handles wrote, and committing versions;
- ``staging``, ``stream`` — a file's writes before commit: the sparse overlay
  of an in-place edit, the chunk-while-you-write stream of a new file;
- ``content`` — :class:`~chronicle.store.namespace.content.ContentMap`: a
  content record (extent list of chunks) read as bytes;
- ``restore`` — bringing back a file or the whole tree as new events.

Threads: a writable Workspace is used from one thread (the FUSE loop, or the
CLI); content builds run in worker threads.
"""
