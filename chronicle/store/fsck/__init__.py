"""fsck: verify every chunk hash, reference and refcount; repair; report.

- ``checks`` — :func:`~chronicle.store.fsck.checks.fsck`, the entry point;
- ``tree`` — the per-workspace checks (inodes, dirents, path index);
- ``report`` — findings and their severities.

Threads: fsck runs in one thread on a store no process is writing.
"""
