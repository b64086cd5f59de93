"""Garbage collection: retention policies, the selection of kept versions, the dry run.

Vocabulary: a **policy** (``policy.Policy``) is per workspace, stored in
``policies`` (``schema``); **pins** are the seqs whose trees always stay (the
head, snapshots, fork points of the workspace's forks, the ends of its last
``keep_turns`` turns); :func:`policy.select` picks, per path, the versions a
policy keeps; ``dryrun`` says what GC would drop and free without changing
anything. Pruning, freeing chunks and compacting packs come later: they will
use the same selection.

Threads: plain synchronous functions; each opens its own LMDB transactions.
"""
