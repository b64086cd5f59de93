"""Chunks: how file content is cut, named, compressed, packed and kept.

Vocabulary:

- **chunk** — a piece of content cut by content-defined chunking (``chunker``,
  FastCDC), named by the BLAKE3 of its bytes, its **chunk id** (``ids``).
- **codec** — how a chunk is stored: zstd when that saves at least 1/32, raw
  otherwise, or a **delta**: zstd with the chunk it replaces (its **base**)
  as a raw-content dictionary, zstd's ``--patch-from``; decoding verifies
  the BLAKE3 (``codec``).
- **pack** — an object holding many encoded chunks as self-describing
  **records**, named ``packs/<group>/<pack_no>.pack``; a chunk's
  **location** is (pack number, payload offset, stored length). ``packs``
  is the pack *format* and its buffered writer (:class:`~packs.PackWriter`,
  with its flusher thread) and reader.
- **chunk backend** — the *place* where pack bytes live: named objects
  written once (created, appended, closed), read by byte range, listed by
  prefix, deleted, made durable (``backends``: the protocol in
  ``backends.base``, the local directory in ``backends.local``, an S3
  bucket with its local block cache in ``backends.s3``/``backends.cache``).
- **extent tree** and **content hash** — a file's extent list as a
  persistent Merkle tree of nodes with content-defined boundaries, and the
  file's hash as its root (``tree``: pure functions, no LMDB; the nodes live
  in ``meta.nodes``), with the canonical chunking that makes the hash a
  function of the bytes (``tree.hash_file``, ``chronicle hash``).
- **chunk index** — LMDB ``chunks``: chunk id -> (pack, offset, length,
  codec, **refcount**, base of a delta); ``index.ChunkStore`` puts and gets
  chunks through it and a cache of decoded chunks. A live delta holds one
  reference on its base (``index``, "Delta chunks").

Layers, each importing only those before it (restic's DAG)::

    ids -> codec -> chunker -> tree -> backends (base, local, cache, s3, conformance) -> packs -> index

The format is kept apart from the place so that the second backend (S3,
issue 10) stores the same packs without knowing their records, and GC
(issue 9) lists, rewrites and deletes packs through the same two layers;
nothing above ``index`` (the namespace, fsck, the store) knows a pack path.

Threads: everything here may be called from any thread (see each module for
what it serialises).
"""
