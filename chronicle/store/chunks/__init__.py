"""Chunks: how file content is cut, named, compressed and kept.

- **chunk** — a piece of content cut by content-defined chunking (``chunker``,
  FastCDC), named by the BLAKE3 of its bytes, its **chunk id** (``ids``).
- **codec** — how a chunk is stored: zstd when that saves at least 1/32, raw
  otherwise; decoding verifies the BLAKE3 (``codec``).
- **pack** — an append-only file (or object) holding many encoded chunks; a
  **chunk backend** (``backends``) stores packs and reads byte ranges of them.
- **chunk index** — LMDB ``chunks``: chunk id -> (pack, offset, length,
  codec, **refcount**); ``index.ChunkStore`` puts and gets chunks through it.

Threads: everything here may be called from any thread.
"""
