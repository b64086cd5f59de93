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
blake3 release the GIL while they work; :func:`encode_many` compresses half
of a batch on a shared one-thread pool while the caller does the other.

zstd format: RFC 8878. BLAKE3: see ``chronicle.store.chunks.ids``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import zstandard

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import ID_SIZE, hash_bytes, to_hex

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_DELTA = 2
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_DELTA)

DEFAULT_LEVEL = 3
SAMPLE = 4096               # bytes tried first at each end: if they do not compress, neither does the chunk
SAMPLE_MIN = 16 * 1024      # smaller chunks are compressed whole at once
PARALLEL_MIN = 4            # fewer chunks (~40 KiB: ~100 us of zstd each) are compressed in the caller's thread

_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_executor_pid = 0
_executor_lock = threading.Lock()


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


def encode(data: bytes | memoryview, level: int = DEFAULT_LEVEL, *,
           sample: bool = True) -> tuple[int, bytes | memoryview]:
    """Compress one chunk. Returns ``(codec, payload)``; an incompressible
    chunk's payload is ``data`` itself (not copied).

    ``sample``: a chunk of at least :data:`SAMPLE_MIN` bytes whose first
    and last :data:`SAMPLE` bytes zstd cannot shrink by 1/32 is taken as
    incompressible without compressing the rest: 10 us instead of 100 us
    for 40 KiB of random bytes, for ~10 % more zstd time on a compressible
    one (so a caller that just saw its previous chunk compress passes
    False). On 340 MiB of real files (a Python venv's libraries,
    ``/usr/lib``, ``/usr/share/doc``: 8,000 files) it stored 0.01 % more
    bytes than compressing every chunk whole (5 chunks of 9,000 kept raw)."""
    if sample and len(data) >= SAMPLE_MIN and not _sample_shrinks(memoryview(data), level):
        return CODEC_RAW, data
    packed = _compressor(level).compress(data)
    if _shrinks(packed, len(data)):
        return CODEC_ZSTD, packed
    return CODEC_RAW, data


def _sample_shrinks(view: memoryview, level: int) -> bool:
    """True if zstd shrinks the first or the last :data:`SAMPLE` bytes by 1/32."""
    comp = _compressor(level)
    return _shrinks(comp.compress(view[:SAMPLE]), SAMPLE) or _shrinks(comp.compress(view[-SAMPLE:]), SAMPLE)


def _shrinks(packed: bytes, raw_len: int) -> bool:
    """True if ``packed`` is at least 1/32 smaller than ``raw_len`` bytes."""
    return len(packed) + (raw_len >> 5) < raw_len


def encode_many(datas: list[bytes | memoryview], level: int = DEFAULT_LEVEL, *,
                sample: bool = True) -> list[tuple[int, bytes | memoryview]]:
    """:func:`encode` of each of ``datas``, in order. From :data:`PARALLEL_MIN`
    chunks on, the first half is compressed by a thread of a shared pool
    while the caller compresses the second (zstd releases the GIL: two
    cores compress); fewer, all in the caller's thread."""
    if len(datas) < PARALLEL_MIN:
        return [encode(d, level, sample=sample) for d in datas]
    half = len(datas) // 2
    first = _pool().submit(lambda: [encode(d, level, sample=sample) for d in datas[:half]])
    second = [encode(d, level, sample=sample) for d in datas[half:]]
    return first.result() + second


def hash_many(datas: list[bytes | memoryview]) -> list[bytes]:
    """:func:`~chronicle.store.chunks.ids.hash_bytes` of each of ``datas``,
    in order, split as :func:`encode_many` splits (BLAKE3 releases the GIL
    for inputs over 2 KiB: two cores hash a streamed batch)."""
    if len(datas) < PARALLEL_MIN:
        return [hash_bytes(d) for d in datas]
    half = len(datas) // 2
    first = _pool().submit(lambda: [hash_bytes(d) for d in datas[:half]])
    second = [hash_bytes(d) for d in datas[half:]]
    return first.result() + second


def _pool() -> ThreadPoolExecutor:
    """The compression pool of this process (a forked child makes its own:
    the parent's thread is not there)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chronicle-zstd")
            _executor_pid = os.getpid()
        return _executor


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
