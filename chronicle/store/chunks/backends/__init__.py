"""Chunk backends: where pack bytes live.

- ``base`` — the :class:`~base.ChunkBackend` protocol, documented method by
  method (durability on return, idempotence, permanent versus transient
  errors), and :class:`~base.ObjectWriter`, an object being written.
- ``local`` — :class:`~local.LocalBackend`, objects as files under the store
  directory, with the ``run/active`` registrations that let any process make
  every process's pack data durable.

A backend stores bytes at names; it knows nothing of chunks or pack records
(``chronicle.store.chunks.packs``). The store picks one when it opens (the
``backend`` of ``store.json``; ``file`` is the only one today).

Threads: a backend may be called from any thread (``base``).
"""
