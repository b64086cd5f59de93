"""Chunk backends: where pack bytes live.

- ``base`` — the :class:`~base.ChunkBackend` protocol, documented method by
  method (durability on return, idempotence, permanent versus transient
  errors), and :class:`~base.ObjectWriter`, an object being written.
- ``local`` — :class:`~local.LocalBackend`, objects as files under the store
  directory, with the ``run/active`` registrations that let any process make
  every process's pack data durable.
- ``s3`` — :class:`~s3.S3Backend`, objects in an S3-compatible bucket
  (boto3): spool files uploaded create-only at close, an outbox of uploads
  to retry, range reads through ``cache``.
- ``cache`` — :class:`~cache.BlockCache`, the bounded, persistent LRU cache
  of 1 MiB object blocks the S3 backend reads through (SQLite index).
- ``conformance`` — what ``chronicle doctor`` probes of an S3 endpoint
  (conditional writes, range reads, listings).

A backend stores bytes at names; it knows nothing of chunks or pack records
(``chronicle.store.chunks.packs``). The store picks one when it opens (the
``backend`` of ``store.json``: ``file`` or ``s3://BUCKET/PREFIX``).

Threads: a backend may be called from any thread (``base``).
"""
