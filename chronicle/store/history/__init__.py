"""History: what happened to a workspace, read back.

- ``paths`` — :class:`~chronicle.store.history.paths.History`: the versions of
  a path (following renames, as ``git log --follow``), events by seq;
- ``turns`` — the turn log: :class:`~chronicle.store.history.turns.TurnLog`,
  turn labels (a workspace's seq ranges per turn), the agent runtime's turn
  records, state snapshots and agent records; written by the workspace's
  writer only, read by everyone.

Threads: readers open their own read transactions; any thread. The turn
log's writes take the workspace's writer (see ``turns``).
"""
