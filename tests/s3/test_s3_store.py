"""A store whose packs are in a SeaweedFS bucket: init, writes through the
store API, reads after the local cache is wiped, gc deleting pack objects,
and the ``chronicle init`` command."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from click.testing import CliRunner

from chronicle.cli import cli
from chronicle.errors import Exists, StoreError
from chronicle.store.chunks.backends.s3 import S3Backend
from chronicle.store.chunks.packs import parse_pack_name
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.store import Store
from tests.storeutil import write

LATER = time.time_ns() + 400 * 86400 * 10**9


def _packs_in_bucket(seaweed, location) -> dict[int, int]:
    client = seaweed.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket,
                                                                  Prefix=location.prefix + "packs/"):
        for obj in page.get("Contents", ()):
            found[parse_pack_name(obj["Key"][len(location.prefix):])] = obj["Size"]
    return found


def _read(ws, path: bytes) -> bytes:
    view = ws.view(ws.head_seq)
    with ws.read_txn() as txn:
        ino, _kind = view.resolve(txn, path)
        attrs = view.attrs(txn, ino)
    return ws.store.content_map(attrs.content).read(0, attrs.size)


def _init(tmp_path, s3_location, **kw) -> Store:
    return Store.init(tmp_path / "store", s3_location.url, endpoint=s3_location.endpoint, **kw)


def test_store_on_s3_writes_reads_back_after_wiping_the_cache(tmp_path, s3_location, seaweed):
    store = _init(tmp_path, s3_location, cache_size=32 * 1024 * 1024)
    assert isinstance(store.chunks.backend, S3Backend)
    config = json.loads((tmp_path / "store" / "store.json").read_text())
    assert config["backend"] == s3_location.url and config["s3"]["endpoint"] == s3_location.endpoint
    assert "AWS" not in json.dumps(config) and os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(config)
    ws = store.open_workspace("w", writable=True, create=True)
    files = {f"f{i}".encode(): os.urandom(50_000 * (i + 1)) + bytes(100_000) for i in range(6)}
    for name, data in files.items():
        write(ws, ws.root, name, data)
    store.sync()
    packs = _packs_in_bucket(seaweed, s3_location)
    assert packs and sum(packs.values()) > 300_000            # the chunks are in the bucket once synced
    assert not list((tmp_path / "store" / "packs").rglob("*.pack"))       # and not in the store directory
    store.close()

    shutil.rmtree(tmp_path / "store" / "cache" / "s3" / "blocks")          # a machine with a cold cache
    store = Store.open(tmp_path / "store")
    try:
        ws = store.open_workspace("w")
        for name, data in files.items():
            assert _read(ws, name) == data
        report = fsck(store)
        assert report.clean, [(p.kind, p.message) for p in report.problems]
    finally:
        store.close()


def test_gc_deletes_pack_objects_in_the_bucket(tmp_path, s3_location, seaweed):
    store = _init(tmp_path, s3_location)
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        for i in range(6):
            write(ws, ws.root, b"f", os.urandom(300_000))
            store.sync()                                       # each sync closes (uploads) its pack
        before = _packs_in_bucket(seaweed, s3_location)
        assert len(before) >= 6
        dryrun.set_policy(store, ws.id, Policy(keep_last=1))
        result = collect.collect(store, ["w"], now_ns=LATER)
        assert result["packs_deleted"] >= 5
        after = _packs_in_bucket(seaweed, s3_location)
        assert sum(after.values()) < 0.4 * sum(before.values())
        assert len(set(before) - set(after)) == result["packs_deleted"]
        head = _read(ws, b"f")
        assert len(head) == 300_000
        report = fsck(store)
        assert report.clean, [(p.kind, p.message) for p in report.problems]
    finally:
        store.close()


def test_init_refuses_a_prefix_that_holds_packs_and_a_missing_bucket(tmp_path, s3_location, seaweed):
    seaweed.client().put_object(Bucket=s3_location.bucket, Key=s3_location.prefix + "packs/000001/0000000001.pack",
                                Body=b"someone else's")
    with pytest.raises(Exists, match="already holds packs"):
        _init(tmp_path, s3_location)
    assert not (tmp_path / "store").exists()
    with pytest.raises(StoreError, match="bucket"):
        Store.init(tmp_path / "s2", "s3://no-such-bucket-x/p", endpoint=s3_location.endpoint)


def test_cli_init_with_an_s3_backend(tmp_path, s3_location):
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(tmp_path / "s"), "--backend", s3_location.url,
                                 "--endpoint", s3_location.endpoint, "--cache-size", "64M"])
    assert result.exit_code == 0, result.output
    assert s3_location.url in result.output
    config = json.loads((tmp_path / "s" / "store.json").read_text())
    assert config["s3"] == {"endpoint": s3_location.endpoint, "region": None, "cache_size": 64 * 1024 * 1024}

    result = runner.invoke(cli, ["init", str(tmp_path / "t"), "--endpoint", "http://x:1"])
    assert result.exit_code == 2 and "--backend s3://" in result.output
    result = runner.invoke(cli, ["init", str(tmp_path / "t"), "--backend", "s3://Bad_Name/x"])
    assert result.exit_code == 2 and "bucket name" in result.output
    result = runner.invoke(cli, ["init", str(tmp_path / "t"), "--backend", s3_location.url + "-x",
                                 "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach" in result.output
    assert "Traceback" not in result.output


def test_sync_fails_while_the_bucket_is_unreachable_and_succeeds_after(tmp_path, s3_location, seaweed):
    from chronicle.errors import Unavailable
    from chronicle.store.chunks.backends.s3 import S3Location, make_client
    store = _init(tmp_path, s3_location)
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        write(ws, ws.root, b"before", b"cached " * 1000)
        store.sync()
        backend = store.chunks.backend
        good = backend.client
        dead = S3Location(s3_location.bucket, s3_location.prefix, "http://127.0.0.1:9", None)
        backend.client = make_client(dead, connect_timeout=1, attempts=1)
        data = os.urandom(200_000)
        write(ws, ws.root, b"during", data)                 # close: on the local disk (SPEC §3)
        with pytest.raises(Unavailable, match="cannot reach"):
            store.sync()                                    # fsync: not in the bucket, so it fails
        assert store.dirty
        assert _read(ws, b"during") == data                 # from the outbox
        assert _read(ws, b"before") == b"cached " * 1000    # from the cache
        backend.client = good
        store.sync()
        assert not backend.needs_sync()
        assert sum(_packs_in_bucket(seaweed, s3_location).values()) > 200_000
    finally:
        store.close()
