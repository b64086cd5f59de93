"""Chunk codec: zstd compression and BLAKE3 verification of one chunk.

A chunk is stored as ``(codec, payload)``: ``CODEC_ZSTD`` when zstd makes it
at least 1/32 smaller, else ``CODEC_RAW`` (incompressible data is not worth
the decompression on every read). Decoding always checks the BLAKE3 of the
result against the chunk id, so a damaged pack is reported as
:class:`~chronicle.errors.Corrupt` instead of returned as data.

``CODEC_DELTA``: a chunk that replaces another one (the same region of the
previous version of a file, after a small edit) may be stored as a zstd
frame compressed with the replaced chunk's bytes — its **base** — as a
raw-content dictionary: zstd's "patch from" (``zstd --patch-from=OLD NEW``,
https://github.com/facebook/zstd/wiki/Zstandard-as-a-patching-engine;
python-zstandard's ``ZstdCompressionDict(base, dict_type=DICT_TYPE_RAWCONTENT)``).
A 10-byte edit of a 40 KiB chunk of random data is then stored in about 70
bytes instead of 40 KiB. The payload is the base's chunk id (32 bytes) and
the frame (:func:`encode_delta`), so a pack record stays self-describing;
decoding needs the base's bytes (:func:`decode`'s ``base``). The chunk id is
still the BLAKE3 of the uncompressed bytes.

Threads: all functions are safe to call from any thread; zstd contexts are
kept per thread because ``zstandard`` contexts are not thread-safe. zstd and
blake3 release the GIL while they work.

zstd format: RFC 8878. BLAKE3: see ``chronicle.store.chunks.ids``.
"""

from __future__ import annotations

import threading

import zstandard

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import ID_SIZE, hash_bytes, to_hex

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_DELTA = 2
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_DELTA)

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


def encode_delta(data: bytes | memoryview, base_id: bytes, base: bytes,
                 level: int = DEFAULT_LEVEL) -> bytes:
    """The ``CODEC_DELTA`` payload of ``data`` against the base chunk
    ``base_id`` whose bytes are ``base``: ``base_id`` then a zstd frame
    compressed with ``base`` as a raw-content dictionary (module docstring).
    The caller decides whether it is worth storing (``ChunkStore.put``)."""
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True,
                                     write_dict_id=False).compress(data)
    return base_id + frame


def delta_base(payload: bytes | memoryview) -> bytes:
    """The base chunk id a ``CODEC_DELTA`` payload names (its first 32 bytes)."""
    return bytes(payload[:ID_SIZE])


def decode(codec: int, payload: bytes, raw_len: int, chunk_id: bytes, *, verify: bool = True,
           base: bytes | None = None) -> bytes:
    """Return the chunk's bytes from its stored form; a ``CODEC_DELTA``
    payload needs its base chunk's bytes (``base``).

    Raises :class:`Corrupt` when the codec is unknown, a delta has no
    ``base``, the payload does not decompress to ``raw_len`` bytes, or
    (``verify``) its BLAKE3 is not ``chunk_id``.
    """
    if codec == CODEC_RAW:
        data = bytes(payload)
    elif codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"chunk {to_hex(chunk_id)} does not decompress: {exc}") from None
    elif codec == CODEC_DELTA:
        if base is None or len(payload) < ID_SIZE:
            raise Corrupt(f"chunk {to_hex(chunk_id)} is a delta whose base cannot be read")
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        try:
            data = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
                memoryview(payload)[ID_SIZE:], max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"chunk {to_hex(chunk_id)} does not decompress against its base: {exc}") from None
    else:
        raise Corrupt(f"chunk {to_hex(chunk_id)} has unknown codec {codec}")
    if len(data) != raw_len:
        raise Corrupt(f"chunk {to_hex(chunk_id)} has {len(data)} bytes, expected {raw_len}")
    if verify and hash_bytes(data) != chunk_id:
        raise Corrupt(f"chunk {to_hex(chunk_id)} does not match its hash")
    return data
