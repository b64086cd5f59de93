"""Delta chunks in a real store: small in-place edits of a big file cost a
few hundred bytes of chunks each, every version reads back, GC keeps the
bases a kept version needs and frees them with their last delta, and a
killed writer leaves fsck clean."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.store.chunks import codec
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.store import Store
from tests.store.gc.test_collect import LATER, du, read_at
from tests.storeutil import A, write

REPO = Path(__file__).resolve().parents[3]


def stored_chunks(store: Store) -> tuple[int, dict[int, int]]:
    """Stored bytes of every chunk in the index, and how many chunks per codec."""
    total, codecs = 0, {}
    with store.env.begin() as txn:
        for _cid, rec in store.chunks.iter_index(txn):
            total += rec.stored_len
            codecs[rec.codec] = codecs.get(rec.codec, 0) + 1
    return total, codecs


def edit(ws, ino: int, offset: int, patch: bytes, *, sync: bool = True) -> int:
    """open + pwrite + fsync + close of an existing file: one version; returns the head seq."""
    ws.files.open(ino)
    ws.files.write(ino, offset, patch, A.pid)
    ws.files.commit(ino)
    if sync:
        ws.store.sync()
    ws.files.release(ino)
    return ws.head_seq


def clean(store: Store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def test_sixteen_ten_byte_edits_of_32_mib_grow_the_chunks_by_a_few_kib(store, ws):
    rng = random.Random(11)
    data = bytearray(rng.randbytes(32 << 20))
    ino = write(ws, ws.root, b"big", bytes(data))
    versions = {ws.head_seq: bytes(data)}
    before, _ = stored_chunks(store)
    for _ in range(16):
        off = rng.randrange(len(data) - 10)
        patch = rng.randbytes(10)
        data[off:off + 10] = patch
        versions[edit(ws, ino, off, patch)] = bytes(data)
    after, codecs = stored_chunks(store)
    assert after - before < 16 * 1024                     # was 16 whole ~40 KiB chunks: 0.7 MiB
    assert codecs[codec.CODEC_DELTA] >= 16
    store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
    for seq, expected in versions.items():
        assert read_at(ws, seq, b"big") == expected
    clean(store)


def test_a_ten_byte_prepend_stores_a_delta_of_the_first_chunk(store, ws):
    data = random.Random(6).randbytes(8 << 20)
    ino = write(ws, ws.root, b"f", data)
    before, _ = stored_chunks(store)
    edit(ws, ino, 0, b"0123456789" + data)                # everything shifts by 10 bytes
    after, _ = stored_chunks(store)
    assert after - before < 1024                          # was one whole new chunk (~60 KiB)
    assert read_at(ws, ws.head_seq, b"f") == b"0123456789" + data


def test_gc_keeps_the_bases_a_kept_version_needs_and_frees_them_with_it(store, ws):
    rng = random.Random(5)
    data = bytearray(rng.randbytes(2 << 20))
    ino = write(ws, ws.root, b"f", bytes(data))
    for i in range(6):                                    # the same chunk edited again and again: a chain
        off = 100_000 + 7 * i
        patch = rng.randbytes(10)
        data[off:off + 10] = patch
        edit(ws, ino, off, patch, sync=False)
    head = bytes(data)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert result["pruned_versions"] == 6
    store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
    assert read_at(ws, ws.head_seq, b"f") == head         # its delta's bases were kept
    _, codecs = stored_chunks(store)
    assert codecs.get(codec.CODEC_DELTA, 0) >= 1
    clean(store)                                          # refcounts exact, bases counted

    packs_before = du(store.packs_dir)
    write(ws, ws.root, b"f", rng.randbytes(2 << 20))      # nothing of the old content is used any more
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert result["freed_bytes"] == promised["freed_bytes"]    # the dry run counts the cascade too
    assert result["freed_chunks"] == promised["freed_chunks"] > 50
    _, codecs = stored_chunks(store)
    assert codecs.get(codec.CODEC_DELTA, 0) == 0          # every delta and every base went
    assert du(store.packs_dir) < packs_before + (1 << 20)
    clean(store)


def test_bases_of_dead_deltas_in_packs_not_rewritten_stay_until_those_go(store, ws):
    rng = random.Random(8)
    data = bytearray(rng.randbytes(1 << 20))
    ino = write(ws, ws.root, b"f", bytes(data))
    store.chunks.writer.rotate()                          # the base chunks in a pack of their own
    for i in range(3):
        patch = rng.randbytes(10)
        data[5000 + i:5010 + i] = patch
        edit(ws, ino, 5000 + i, patch)
    write(ws, ws.root, b"big", rng.randbytes(4 << 20))    # the deltas' pack is mostly live data
    store.chunks.writer.rotate()
    write(ws, ws.root, b"f", rng.randbytes(1 << 20))      # old f: its bases and deltas all dead
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    first = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert first["packs_deleted"] >= 1                    # the bases' pack went: the held ones were copied
    _, codecs = stored_chunks(store)
    assert codecs.get(codec.CODEC_DELTA, 0) == 3          # dead, in a pack that stays
    clean(store)                                          # each still decodes against its base
    collect.collect(store, ["w"], now_ns=LATER, wait=0, threshold=1.01)
    clean(store)
    with store.env.begin() as txn:
        left = [rec for _cid, rec in store.chunks.iter_index(txn) if rec.refcount == 0]
    assert left == []                                     # the deltas, then their bases, dropped


_KILLED_WRITER = textwrap.dedent("""
    import os, random, signal, sys
    from chronicle.store.store import Store
    from tests.storeutil import A, write
    store = Store.open(sys.argv[1])
    ws = store.open_workspace("w", writable=True)
    ino, _ = ws.resolve(b"f")
    ws.files.open(ino)
    ws.files.write(ino, 123_456, b"0123456789", A.pid)
    overlay = ws.files.commit_begin(ino)
    built = ws.files.commit_build(overlay)               # the delta is in a pack, not yet in the index
    store.chunks.flush()
    ids = [built.record.chunk_id(i) for i in range(built.record.extent_count)]
    assert any(store.chunks.record(c).codec == 2 for c in ids)      # CODEC_DELTA, pending
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_9_between_writing_a_delta_and_its_commit_leaves_fsck_clean(tmp_path):
    path = tmp_path / "store"
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    data = random.Random(3).randbytes(1 << 20)
    write(ws, ws.root, b"f", data)
    store.close()
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = Store.open(path)
    try:
        clean(store)
        ws = store.open_workspace("w")
        assert read_at(ws, ws.head_seq, b"f") == data
    finally:
        store.close()


_OPS = st.lists(st.tuples(st.sampled_from(["patch", "patch", "append", "truncate"]),
                          st.floats(0, 1), st.integers(1, 3000)), min_size=1, max_size=12)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, seed=st.integers(0, 2**16), keep=st.integers(1, 4))
def test_random_edit_sequences_read_back_every_version_and_gc_stays_exact(tmp_path_factory, ops, seed, keep):
    rng = random.Random(seed)
    store = Store.init(tmp_path_factory.mktemp("s") / "store")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        data = bytearray(rng.randbytes(300_000))
        ino = write(ws, ws.root, b"f", bytes(data))
        versions = [(ws.head_seq, bytes(data))]
        for kind, where, n in ops:
            ws.files.open(ino)
            if kind == "truncate":
                size = int(where * len(data))
                ws.files.truncate(ino, size, A.pid)
                del data[size:]
            else:
                off = len(data) if kind == "append" else int(where * len(data))
                patch = rng.randbytes(n)
                ws.files.write(ino, off, patch, A.pid)
                data[off:off + n] = patch
            ws.files.commit(ino)
            ws.files.release(ino)
            if ws.head_seq != versions[-1][0]:
                versions.append((ws.head_seq, bytes(data)))
        store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
        for seq, expected in versions:
            assert read_at(ws, seq, b"f") == expected
        clean(store)
        dryrun.set_policy(store, ws.id, Policy(keep_last=keep))
        collect.collect(store, ["w"], now_ns=LATER, wait=0, threshold=1.01)
        store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
        for seq, expected in versions[-keep:]:
            assert read_at(ws, seq, b"f") == expected
        clean(store)
    finally:
        store.close()


def test_fsck_names_the_files_a_damaged_base_takes_with_it(tmp_path):
    path = tmp_path / "store"
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    rng = random.Random(2)
    data = bytearray(rng.randbytes(200_000))
    ino = write(ws, ws.root, b"f", bytes(data))
    with ws.read_txn() as txn:
        base_id = ws.view(ws.head_seq).attrs(txn, ino).content
    base_chunk = store.content_map(base_id).record.chunk_id(0)
    edit(ws, ino, 10, b"0123456789")
    base = store.chunks.record(base_chunk)
    store.close()
    with open(next(p for p in (path / "packs").rglob("*.pack") if p.name == f"{base.pack_no:010x}.pack"),
              "r+b") as f:
        f.seek(base.offset + 1000)
        f.write(b"\xff" * 32)
    store = Store.open(path)
    try:
        report = fsck(store)
        lost = [p for p in report.problems if p.kind == "chunk-base-lost"]
        assert len(lost) == 1 and lost[0].severity == "error"
        assert f"stored as a delta of chunk {base_chunk.hex()[:16]}" in lost[0].message and "w:f v2" in lost[0].message
        assert any(p.kind == "chunk-corrupt" and "w:f v1" in p.message for p in report.problems)
    finally:
        store.close()
