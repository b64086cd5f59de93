"""Garbage collection: retention policies, leases, prune, sweep, compaction.

Vocabulary: a **policy** (``policy.Policy``) is per workspace, stored in
``policies`` (``schema``); **pins** are the seqs whose trees always stay (the
head, snapshots, fork points of the workspace's forks, the ends of its last
``keep_turns`` turns, and the seqs open ``at/`` handles read, announced in
**leases**, ``leases``); :func:`policy.select` picks, per path, the versions a
policy keeps; ``dryrun`` says what GC would drop and free without changing
anything; a **candidate** is a dropped version; **pruning** it
(``prune``) rewrites its inode records to the content ``PRUNED_ID`` and marks
its path entry and log line ``"pruned": true``; a **dead record** is a
deleted file's last inode record, rewritten once no process holds the file
open (``prune.DeadRecord``); the **sweep** deletes
contents at refcount 0 and makes chunks **dead** (refcount 0);
**compaction** rewrites packs whose live fraction is low and deletes the old
ones — restic's ``prune`` repack, made online with leases rather than an
exclusive lock (``sweep`` explains the order that makes it crash-safe);
**unversioned** records (``unversioned``) are those of deleted ignored
paths nothing pins, which GC removes whole, their log lines folded into one
``"dropped"`` summary line per run; ``collect`` runs the whole and stores its result; ``stats`` caches what a
policy would free (``chronicle stats``, ``.chronicle/stats``).

Threads: plain synchronous functions; each opens its own LMDB transactions,
none longer than ``prune.BATCH_SECONDS`` (the daemon runs them in a worker
thread). A :class:`leases.Lease` may be called from any thread;
``stats.refresh_in_background`` starts its own worker thread.
"""
