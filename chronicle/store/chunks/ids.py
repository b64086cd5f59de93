"""Identifiers of the store: chunk ids, content ids, and their text forms.

- **chunk id** — the 32-byte BLAKE3 hash of a chunk's uncompressed bytes.
- **content id** — the 32-byte BLAKE3 hash of a whole file's content; it names
  one extent list (see ``chronicle.store.namespace.content``) and is the ``hash`` the
  magic files and the CLI show, as lowercase hex.
- **HOLE_ID** — 32 zero bytes; in an extent list it marks a hole (a run of
  zeros with no data stored). No real chunk has this id.
- **PRUNED_ID** — 32 ``0xff`` bytes; as an inode record's content it marks a
  version GC pruned (``chronicle.store.gc.prune``): reading it raises
  :class:`~chronicle.errors.Pruned`. No real content has this id.

BLAKE3: https://github.com/BLAKE3-team/BLAKE3-specs (``blake3`` package).
"""

from __future__ import annotations

import blake3

from chronicle.errors import InvalidArgument

ID_SIZE = 32
HOLE_ID = bytes(ID_SIZE)
PRUNED_ID = b"\xff" * ID_SIZE
EMPTY_CONTENT_ID = blake3.blake3(b"").digest()

# blake3 uses its own threads above this size; below it that costs more than it saves.
_MULTITHREAD_THRESHOLD = 1 << 20


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 digest (32 bytes) of ``data``. Releases the GIL for large inputs."""
    if len(data) >= _MULTITHREAD_THRESHOLD:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def new_hasher(*, parallel: bool = False) -> blake3.blake3:
    """An incremental BLAKE3 hasher (``update(bytes)``, ``digest()``).
    ``parallel``: large updates use all cores (BLAKE3 is a tree hash)."""
    if parallel:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def to_hex(ident: bytes) -> str:
    """Lowercase hex of a 32-byte id."""
    return ident.hex()


def from_hex(text: str) -> bytes:
    """Parse a 64-digit hex id; raises :class:`InvalidArgument` otherwise."""
    try:
        ident = bytes.fromhex(text)
    except ValueError:
        raise InvalidArgument(f"not a hex id: {text!r}") from None
    if len(ident) != ID_SIZE:
        raise InvalidArgument(f"an id has {2 * ID_SIZE} hex digits, not {len(text)}: {text!r}")
    return ident
