"""History: what happened to a workspace, read back.

Vocabulary (SPEC §1, §4):

- **event** — one mutation, numbered by its **seq**; its ``.chronicle/log``
  line is kept in the ``events`` database. A seq names one state of the tree.
- **history** of a path — its numbered **versions**, following renames as
  ``git log --follow`` does; a deleted path keeps its history.
- **point** — a name for a seq: a seq, an ISO-8601 time, a snapshot name
  (``snapshot:NAME``) or ``turn:AGENT:N``; **snapshot** — a stored name for
  a seq; **range** — the seqs ``--since/--until/--turn`` select.
- **layer** — a workspace's own records up to a bound; a fork reads its
  parent's layer up to the fork seq, so every read here goes through the
  workspace's layers.
- **node** — one entry of the ``.chronicle/`` tree (a typed value: query,
  versions, at, snapshots, a past inode, log, stats, ctl).

Modules, lowest first:

- ``paths`` — :class:`~chronicle.store.history.paths.History`: path
  histories, events by seq, the log from any seq, time → seq;
- ``points`` — point resolution, snapshots, seq ranges (over ``paths`` and
  the turn records of ``Store.get_turn``);
- ``access`` — who may read which version, log line or directory of
  history (a :class:`~chronicle.store.history.access.Caller`: uid and groups);
- ``views`` — :class:`~chronicle.store.history.views.HistoryViews`: every
  ``.chronicle/`` node's lookup, listing, attributes and content, FUSE-free
  (over ``paths`` and ``points``); the mount (``chronicle.fs.magic``) and
  the CLI (``log``, ``show``, ``diff``) both read it;
- ``blame`` — which version last changed each line (or 4 KiB range) of a file;
- ``search`` — content by BLAKE3 hash, grep over the head or every version,
  what a turn changed;
- ``queries`` — the ``blame/``, ``hash/`` and ``turns/`` nodes the views
  dispatch to (over ``blame`` and ``search``);
- ``receipts`` — :class:`~chronicle.store.history.receipts.Receipts`: the
  Merkle root of a whole tree at a seq (a **receipt**, its construction
  documented there and in the README), recomputing only the directories on
  the paths of the events since the previous receipt; written by any
  process (a receipt is a function of its tree), at every turn end by the
  writer;
- ``reads`` — read-sets: the file versions (and byte ranges) each turn
  read, written at the turn's end by the mount daemon, and the completed
  turns whose read files changed since (:class:`~chronicle.store.history.reads.ReadLog`);
- ``turns`` — the turn log: :class:`~chronicle.store.history.turns.TurnLog`,
  turn labels (a workspace's seq ranges per turn), the agent runtime's turn
  records, durable steps (a key each while their turn runs), state snapshots
  and agent records; written by the workspace's
  writer only (see ``turns``), read by everyone.

Threads: nothing here holds a transaction between calls: each call opens
its own read transaction (``points.put_snapshot`` and ``receipts`` their own
write transactions, begun and committed inside one call), so any thread may call. The
FUSE loop may call the views inline: their calls are short (a lookup is a
few index reads; opening ``log`` is O(1) and each read renders only what it
returns). This package imports no FUSE, trio or namespace module at run
time (``Workspace`` is a type-only import: the namespace imports ``paths``).
"""
