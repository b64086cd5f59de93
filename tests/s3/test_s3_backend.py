"""The S3 backend against a real SeaweedFS server: the ``base`` contract, the
spool/outbox, the block cache, and errors when the bucket cannot be reached."""

from __future__ import annotations

import os

import pytest

from chronicle.errors import Busy, Corrupt, Exists, InvalidArgument, NotFound, StoreError, Unavailable
from chronicle.store.chunks.backends.base import ChunkBackend, ObjectWriter
from chronicle.store.chunks.backends.cache import BlockCache
from chronicle.store.chunks.backends.s3 import S3Backend, S3Location

MIB = 1024 * 1024


def _keys(seaweed, location: S3Location) -> dict[str, int]:
    answer = seaweed.client().list_objects_v2(Bucket=location.bucket, Prefix=location.prefix)
    return {o["Key"][len(location.prefix):]: o["Size"] for o in answer.get("Contents", ())}


def test_protocol(s3_backend):
    assert isinstance(s3_backend, ChunkBackend)
    w = s3_backend.create("packs/000001/0000000001.pack")
    assert isinstance(w, ObjectWriter)
    w.close()


def test_writer_uploads_at_close_create_only(s3_backend, s3_location, seaweed):
    name = "packs/000001/0000000001.pack"
    w = s3_backend.create(name)
    w.append([b"hello ", b"world"])
    w.append([memoryview(b"!" * 10)])
    assert s3_backend.read(name, 6, 5) == b"world"         # readable while open, from the spool
    assert s3_backend.size(name) == 21
    assert name not in _keys(seaweed, s3_location)         # nothing in the bucket before close
    with pytest.raises(Busy):
        s3_backend.delete(name)
    w.sync()
    w.close()
    w.close()                                              # idempotent
    assert _keys(seaweed, s3_location) == {name: 21}
    body = seaweed.client().get_object(Bucket=s3_location.bucket, Key=s3_location.prefix + name)["Body"].read()
    assert body == b"hello world" + b"!" * 10
    assert not list(s3_backend.outbox_dir.iterdir()) and not list(s3_backend.spool_dir.iterdir())
    again = s3_backend.create(name)                        # local only: the bucket is asked at close
    again.append([b"other bytes"])
    with pytest.raises(Exists):
        again.close()                                      # create-only: the first object stays
    assert _keys(seaweed, s3_location) == {name: 21}
    s3_backend.sync()                                      # the refused object is kept aside, not retried
    assert (s3_backend.cache_dir / "collided" / name.replace("/", "+")).read_bytes() == b"other bytes"


def test_close_refuses_a_name_taken_meanwhile(s3_backend, s3_location, seaweed):
    name = "packs/000001/0000000002.pack"
    w = s3_backend.create(name)
    w.append([b"mine"])
    seaweed.client().put_object(Bucket=s3_location.bucket, Key=s3_location.prefix + name, Body=b"theirs")
    with pytest.raises(Exists):
        w.close()
    assert seaweed.client().get_object(Bucket=s3_location.bucket,
                                       Key=s3_location.prefix + name)["Body"].read() == b"theirs"


def test_put_is_exclusive_and_idempotent(s3_backend):
    s3_backend.put("packs/000002/0000000200.pack", b"abc")
    s3_backend.put("packs/000002/0000000200.pack", b"abc")           # same bytes: nothing happens
    with pytest.raises(Exists):
        s3_backend.put("packs/000002/0000000200.pack", b"abd")
    assert s3_backend.read("packs/000002/0000000200.pack", 0, 3) == b"abc"


def test_range_reads_across_blocks_and_past_the_end(s3_location, tmp_path):
    backend = S3Backend(s3_location, tmp_path / "c", cache_size=8 * MIB, attempts=2)
    try:
        data = os.urandom(3 * MIB + 123)
        w = backend.create("packs/000003/0000000300.pack")
        w.append([data])
        w.close()
        backend.cache.drop("packs/000003/0000000300.pack")          # read from the bucket, not the filled cache
        assert backend.read("packs/000003/0000000300.pack", MIB - 5, 10) == data[MIB - 5:MIB + 5]
        assert backend.read("packs/000003/0000000300.pack", 0, len(data)) == data
        assert backend.read("packs/000003/0000000300.pack", len(data) - 1, 1) == data[-1:]
        with pytest.raises(Corrupt):
            backend.read("packs/000003/0000000300.pack", len(data) - 2, 3)
        with pytest.raises(Corrupt):
            backend.read("packs/000003/0000000300.pack", 4 * MIB, 1)
        with pytest.raises(NotFound):
            backend.read("packs/000003/0000000301.pack", 0, 1)
        with pytest.raises(NotFound):
            backend.size("packs/000003/0000000301.pack")
        with pytest.raises(InvalidArgument):
            backend.read("../etc/passwd", 0, 1)
    finally:
        backend.close()


def test_list_in_name_order_with_sizes_and_prefixes(s3_backend):
    names = ["packs/000010/0000001003.pack", "packs/000001/0000000105.pack", "packs/000010/0000001001.pack"]
    for i, name in enumerate(names):
        s3_backend.put(name, b"x" * (i + 1))
    listed = list(s3_backend.list("packs/"))
    assert [i.name for i in listed] == sorted(names)
    assert {i.name: i.size for i in listed} == {names[0]: 1, names[1]: 2, names[2]: 3}
    assert [i.name for i in s3_backend.list("packs/000010/")] == sorted(names[::2])
    assert list(s3_backend.list("packs/0002")) == []


def test_delete(s3_backend, s3_location, seaweed):
    name = "packs/000004/0000000400.pack"
    s3_backend.put(name, b"data")
    assert s3_backend.read(name, 0, 4) == b"data"
    s3_backend.delete(name)
    s3_backend.delete(name)                                         # idempotent
    assert name not in _keys(seaweed, s3_location)
    with pytest.raises(NotFound):
        s3_backend.read(name, 0, 4)
    assert s3_backend.cache.total() == 0


def test_cache_serves_reads_evicts_lru_and_survives_restart(s3_location, tmp_path, seaweed):
    cache_dir = tmp_path / "cache"
    backend = S3Backend(s3_location, cache_dir, cache_size=3 * MIB, attempts=2)
    blobs = {}
    for i in range(4):
        name = f"packs/000005/000000050{i}.pack"
        blobs[name] = os.urandom(MIB)
        backend.put(name, blobs[name])
    names = sorted(blobs)
    for name in names[:3]:
        assert backend.read(name, 10, 100) == blobs[name][10:110]
    assert backend.cache.total() == 3 * MIB
    assert backend.cache.get(names[0], 0) is not None
    backend.read(names[3], 0, 1)                    # a fourth block: the least recently used one goes
    assert backend.cache.total() == 3 * MIB
    assert backend.cache.get(names[1], 0) is None
    assert backend.cache.get(names[3], 0) is not None
    backend.close()

    # delete the objects from the bucket behind the cache's back: what is cached still reads, after a restart
    for name in names:
        seaweed.client().delete_object(Bucket=s3_location.bucket, Key=s3_location.prefix + name)
    again = S3Backend(s3_location, cache_dir, cache_size=3 * MIB, attempts=2)
    try:
        assert again.cache.total() == 3 * MIB
        assert again.read(names[3], 5, 50) == blobs[names[3]][5:55]
        assert again.read(names[0], 0, MIB) == blobs[names[0]]
        with pytest.raises(NotFound):
            again.read(names[1], 0, 1)              # evicted, and gone from the bucket
    finally:
        again.close()


def test_cache_reconcile_removes_what_a_crash_left(tmp_path):
    cache = BlockCache(tmp_path / "c", 10 * MIB)
    cache.put("packs/000001/0000000001.pack", 0, b"a" * 100)
    (cache.blocks_dir / "packs+000001+0000000002.pack.0").write_bytes(b"stray")     # renamed, never committed
    (cache.blocks_dir / "packs+000001+0000000001.pack.0").unlink()                 # counted, file gone
    cache.reconcile()
    assert cache.total() == 0 and not list(cache.blocks_dir.iterdir())


def test_unreachable_endpoint_fails_fast_and_cached_data_still_reads(s3_location, tmp_path):
    cache_dir = tmp_path / "cache"
    good = S3Backend(s3_location, cache_dir, cache_size=8 * MIB, attempts=2)
    good.put("packs/000006/0000000600.pack", b"cached bytes")
    assert good.read("packs/000006/0000000600.pack", 0, 6) == b"cached"
    good.close()

    dead = S3Location(s3_location.bucket, s3_location.prefix, "http://127.0.0.1:9", None)     # nothing listens
    backend = S3Backend(dead, cache_dir, cache_size=8 * MIB, attempts=2, connect_timeout=1, read_timeout=2)
    try:
        assert backend.read("packs/000006/0000000600.pack", 7, 5) == b"bytes"
        # bounded, not a hang: each request is tried `attempts` times, each try with its timeouts
        tries = []
        backend.client.meta.events.register("before-send.s3.GetObject", lambda **kw: tries.append(1))
        assert (backend.client.meta.config.connect_timeout, backend.client.meta.config.read_timeout) == (1, 2)
        with pytest.raises(Unavailable, match="cannot reach"):
            backend.read("packs/000006/0000000601.pack", 0, 1)
        assert len(tries) == 2
        with pytest.raises(Unavailable):
            list(backend.list("packs/"))
        w = backend.create("packs/000006/0000000602.pack")      # writing needs no network
        w.append([b"offline"])
        with pytest.raises(Unavailable):
            w.close()
        assert backend.read("packs/000006/0000000602.pack", 0, 7) == b"offline"
    finally:
        backend.close()


def test_failed_upload_waits_in_the_outbox_and_sync_uploads_it(s3_location, tmp_path, seaweed):
    """The bucket goes away between create and close: close raises, the
    object stays readable from the outbox, and a later sync uploads it."""
    cache_dir = tmp_path / "cache"
    backend = S3Backend(s3_location, cache_dir, cache_size=8 * MIB, attempts=1, connect_timeout=1)
    name = "packs/000007/0000000700.pack"
    w = backend.create(name)
    w.append([b"precious"])
    good_client = backend.client
    dead = S3Location(s3_location.bucket, s3_location.prefix, "http://127.0.0.1:9", None)
    from chronicle.store.chunks.backends.s3 import make_client
    backend.client = make_client(dead, connect_timeout=1, attempts=1)
    try:
        with pytest.raises(Unavailable):
            w.close()
        assert backend.read(name, 0, 8) == b"precious"
        assert backend.needs_sync()
        with pytest.raises(Unavailable):
            backend.sync()
        backend.client = good_client
        assert [i.name for i in backend.list("packs/")] == [name]         # listed from the outbox
        backend.sync()
        assert not backend.needs_sync()
        assert _keys(seaweed, s3_location) == {name: 8}
    finally:
        backend.client = good_client
        backend.close()


def test_a_dead_writers_spool_is_uploaded_by_the_next_sync(s3_location, tmp_path, seaweed):
    """A process killed with a pack open leaves its spool file; its bytes may
    be referred to by committed metadata, so the next sync uploads them."""
    import subprocess
    import sys
    cache_dir = tmp_path / "cache"
    code = (f"import os, sys\nfrom chronicle.store.chunks.backends.s3 import S3Backend, S3Location\n"
            f"loc = S3Location.parse({s3_location.url!r}, endpoint={s3_location.endpoint!r})\n"
            f"b = S3Backend(loc, {str(cache_dir)!r}, attempts=1)\n"
            f"w = b.create('packs/000008/0000000800.pack')\nw.append([b'left behind'])\n"
            f"os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code], env=os.environ, check=False)
    backend = S3Backend(s3_location, cache_dir, attempts=2)
    try:
        assert backend.read("packs/000008/0000000800.pack", 0, 4) == b"left"
        backend.sync()
        assert _keys(seaweed, s3_location) == {"packs/000008/0000000800.pack": 11}
        assert not list(backend.spool_dir.iterdir())
    finally:
        backend.close()


def test_missing_bucket_is_a_clear_error(seaweed, tmp_path):
    loc = S3Location.parse("s3://no-such-bucket-here/x", endpoint=seaweed.endpoint)
    backend = S3Backend(loc, tmp_path / "c", attempts=1)
    try:
        with pytest.raises(StoreError, match="bucket .*exist"):     # SeaweedFS answers AccessDenied, AWS NoSuchBucket
            backend.put("packs/000001/0000000001.pack", b"x")
    finally:
        backend.close()


@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "file:///x", "s3://ab", "s3://bucket/a//b"])
def test_bad_locations(url):
    with pytest.raises(InvalidArgument):
        S3Location.parse(url)


def test_cached_only_reads_raise_not_cached_and_fetch_brings_the_block(s3_location, tmp_path):
    from chronicle.store.chunks.backends.base import NotCached
    for cache_size in (8 * MIB, 0):                 # a cache that keeps nothing still serves the retry
        backend = S3Backend(s3_location, tmp_path / f"c{cache_size}", cache_size=cache_size, attempts=2)
        try:
            name = "packs/000009/0000000900.pack"
            if cache_size:
                backend.put(name, b"0123456789" * 1000)
            backend.cache.drop(name)
            with backend.cached_only(), pytest.raises(NotCached) as miss:
                backend.read(name, 5, 10)
            assert backend.read(name, 0, 1) == b"0"       # outside the block: fetches as usual
            backend._recent.clear()
            backend.cache.drop(name)
            miss.value.fetch()
            with backend.cached_only():
                assert backend.read(name, 5, 10) == b"5678901234"
        finally:
            backend.close()


def test_a_failed_sync_leaves_no_sealed_pack_behind(s3_location, tmp_path, seaweed):
    """Packs sealed before a sync whose uploads fail are all uploaded by the
    next sync (none stays an open writer that a later sync would skip)."""
    import secrets
    from chronicle.store.chunks.backends.s3 import make_client
    from chronicle.store.chunks.packs import PackWriter
    backend = S3Backend(s3_location, tmp_path / "cache", attempts=1, connect_timeout=1)
    writer = PackWriter(backend, max_pack_size=5000)
    try:
        locations = [writer.append(secrets.token_bytes(32), 0, 2000, os.urandom(2000)) for _ in range(8)]
        assert len({loc.pack_no for loc in locations}) >= 3
        good = backend.client
        dead = S3Location(s3_location.bucket, s3_location.prefix, "http://127.0.0.1:9", None)
        backend.client = make_client(dead, connect_timeout=1, attempts=1)
        with pytest.raises(Unavailable):
            writer.sync()
        assert not backend._writers                             # every sealed pack went to the outbox
        backend.client = good
        writer.sync()
        in_bucket = _keys(seaweed, s3_location)
        assert len(in_bucket) == len({loc.pack_no for loc in locations})
        assert not backend.needs_sync()
    finally:
        writer.close()
        backend.close()
