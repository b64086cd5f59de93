"""A real FUSE mount of a store whose packs are in SeaweedFS."""

from __future__ import annotations

import hashlib
import os
import shutil

from chronicle.store.store import Store


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_mount_write_fsync_unmount_wipe_cache_remount_read_back(tmp_path, s3_location, seaweed, mount_factory):
    store_dir = tmp_path / "s3store"
    Store.init(store_dir, s3_location.url, endpoint=s3_location.endpoint, cache_size=64 * 1024 * 1024).close()
    m = mount_factory(store=store_dir)
    big = os.urandom(6 * 1024 * 1024) + bytes(2 * 1024 * 1024)
    with open(m.path / "big.bin", "wb") as f:
        f.write(big)
        f.flush()
        os.fsync(f.fileno())
    (m.path / "dir").mkdir()
    for i in range(20):
        (m.path / "dir" / f"small{i}.txt").write_text(f"file {i}\n" * (i + 1))
    os.sync()
    m.stop()

    cache = store_dir / "cache" / "s3"
    assert not list((cache / "outbox").iterdir()) and not list((cache / "spool").iterdir())
    shutil.rmtree(cache / "blocks")                       # nothing local left of the packs
    listed = seaweed.client().list_objects_v2(Bucket=s3_location.bucket, Prefix=s3_location.prefix + "packs/")
    assert sum(o["Size"] for o in listed["Contents"]) > 6 * 1024 * 1024     # random bytes do not compress

    m = mount_factory.restart(m)
    assert _digest(m.path / "big.bin") == hashlib.sha256(big).hexdigest()
    for i in range(20):
        assert (m.path / "dir" / f"small{i}.txt").read_text() == f"file {i}\n" * (i + 1)
    assert (m.path / ".chronicle" / "versions" / "big.bin" / "1").read_bytes()[:1024] == big[:1024]
    m.stop()
