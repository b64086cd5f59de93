"""Content-defined chunking (CDC) of file content.

Chunk boundaries are chosen by the content (FastCDC, Xia et al., "The Design
of Fast Content-Defined Chunking for Data Deduplication Based Storage
Systems", IEEE TPDS 2020), so an insertion in a file changes only the chunks
around it and the rest deduplicate against the previous version. We use the
maintained Cython implementation ``pyfastcdc`` (FastCDC 2020, normalized
chunking level 1).

Sizes: the nominal average is 32 KiB, min 8 KiB, max 128 KiB; pyfastcdc's
real average is about avg + min (≈ 40 KiB). Smaller chunks dedup better but
cost more metadata per byte; 100 versions of a 10 MiB file, each with a small
insertion, then cost well under 3x the file's size (see tests).

Threads: a :class:`Chunker` holds no state between calls and may be shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pyfastcdc import FastCDC

AVG_SIZE = 32 * 1024
MIN_SIZE = 8 * 1024
MAX_SIZE = 128 * 1024


class Readable(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


class Chunker:
    """Cuts a byte stream into content-defined chunks.

    ``cut(buf)`` and ``cut_stream(reader)`` yield ``memoryview`` chunks in
    order; their concatenation is the input. A chunk's view is valid only
    until the next one is produced (copy it to keep it).
    """

    def __init__(self, avg_size: int = AVG_SIZE, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE):
        self.avg_size, self.min_size, self.max_size = avg_size, min_size, max_size
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size, normalized_chunking=1)

    def cut(self, buf: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Chunks of an in-memory buffer."""
        view = memoryview(buf)
        for chunk in self._cdc.cut_buf(view):
            yield view[chunk.offset:chunk.offset + chunk.length]

    def split(self, buf: bytes | bytearray | memoryview) -> list[memoryview]:
        """The chunks of an in-memory buffer, in order, as views of it (valid
        as long as ``buf`` is; one list instead of a generator: a stream's
        batch of ~200 chunks)."""
        return [chunk.data for chunk in self._cdc.cut_buf(buf)]

    def cut_stream(self, reader: Readable) -> Iterator[memoryview]:
        """Chunks of a stream read with ``readinto`` until it returns 0.

        Memory stays bounded (a few ``max_size`` buffers) whatever the length.
        """
        for chunk in FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size,
                             normalized_chunking=1).cut_stream(reader):
            yield memoryview(chunk.data)
