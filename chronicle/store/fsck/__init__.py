"""fsck: verify every chunk hash, reference and refcount; repair; report.

- ``checks`` — :func:`~chronicle.store.fsck.checks.fsck`, the entry point;
- ``tree`` — the per-workspace checks (inodes, dirents, path index);
- ``nodes`` — the extent trees of format-4 contents (node hashes, heights,
  refcounts; the files of a content whose node is lost);
- ``damage`` — naming what a damaged metadata range held;
- ``rebuild`` — checks of a salvaged copy of damaged metadata
  (``meta.salvage``), swapped in by ``--repair``;
- ``report`` — findings and their severities.

Threads: fsck runs in one thread on a store no process is writing.
"""
