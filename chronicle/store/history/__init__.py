"""History: what happened to a workspace, read back.

- ``paths`` — :class:`~chronicle.store.history.paths.History`: the versions of
  a path (following renames, as ``git log --follow``), events by seq;
- ``turns`` — agents, their turn logs and state snapshots.

Threads: readers open their own read transactions; any thread.
"""
