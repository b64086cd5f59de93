"""Chunk codec: zstd compression and BLAKE3 verification of one chunk.

A chunk is stored as ``(codec, payload)``: ``CODEC_ZSTD`` when zstd makes it
at least 1/32 smaller, else ``CODEC_RAW`` (incompressible data is not worth
the decompression on every read). Decoding always checks the BLAKE3 of the
result against the chunk id, so a damaged pack is reported as
:class:`~chronicle.errors.Corrupt` instead of returned as data.

Threads: all functions are safe to call from any thread; zstd contexts are
kept per thread because ``zstandard`` contexts are not thread-safe. zstd and
blake3 release the GIL while they work.

zstd format: RFC 8878. BLAKE3: see ``chronicle.store.chunks.ids``.
"""

from __future__ import annotations

import threading

import zstandard

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import hash_bytes, to_hex

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)

DEFAULT_LEVEL = 3

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def encode(data: bytes | memoryview, level: int = DEFAULT_LEVEL) -> tuple[int, bytes | memoryview]:
    """Compress one chunk. Returns ``(codec, payload)``; an incompressible
    chunk's payload is ``data`` itself (not copied)."""
    packed = _compressor(level).compress(data)
    if len(packed) + (len(data) >> 5) < len(data):
        return CODEC_ZSTD, packed
    return CODEC_RAW, data


def decode(codec: int, payload: bytes, raw_len: int, chunk_id: bytes, *, verify: bool = True) -> bytes:
    """Return the chunk's bytes from its stored form.

    Raises :class:`Corrupt` when the codec is unknown, the payload does not
    decompress to ``raw_len`` bytes, or (``verify``) its BLAKE3 is not ``chunk_id``.
    """
    if codec == CODEC_RAW:
        data = bytes(payload)
    elif codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"chunk {to_hex(chunk_id)} does not decompress: {exc}") from None
    else:
        raise Corrupt(f"chunk {to_hex(chunk_id)} has unknown codec {codec}")
    if len(data) != raw_len:
        raise Corrupt(f"chunk {to_hex(chunk_id)} has {len(data)} bytes, expected {raw_len}")
    if verify and hash_bytes(data) != chunk_id:
        raise Corrupt(f"chunk {to_hex(chunk_id)} does not match its hash")
    return data
