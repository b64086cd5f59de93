"""GC on a live mount: a full disk reclaimed before ENOSPC, gc during concurrent writes, background gc."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.mount.test_full_disk import fsck_clean, make_ballast, try_write

CLI = [sys.executable, "-m", "chronicle"]
REPO = Path(__file__).resolve().parents[2]
NO_HISTORY = ["--keep-last", "1", "--keep-within", "0s", "--keep-hourly", "0", "--keep-daily", "0",
              "--keep-weekly", "0", "--keep-turns", "0"]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's gc")


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def small_ext4(tmp_path):
    """A 64 MiB ext4 file system on a loop device at ``tmp_path/disk``; unmounted and detached afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)   # mount -o loop detaches at umount
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_is_reclaimed_then_the_write_succeeds(small_ext4, mount_factory, daemon_log):
    daemon_log.expect(r"No space|no space|ENOSPC|disk is full")
    store = small_ext4 / "store"
    cli("init", store)
    m = mount_factory(store=store)
    cli("policy", "set", "-s", store, "-w", m.workspace, *NO_HISTORY)
    root = m.path
    for _ in range(4):                                    # 4 versions of 8 MiB: 3 the policy lets go
        (root / "big").write_bytes(os.urandom(8 << 20))
    ballast = make_ballast(small_ext4, leave=3 << 20)
    data = os.urandom(8 << 20)
    try:
        assert try_write(root / "new.bin", data) == 0     # ENOSPC only after freeing what the policy allows
        assert (root / "new.bin").read_bytes() == data
        assert "gc (disk full)" in m.log_text()
        query = json.loads((root / ".chronicle" / "query" / "big").read_text())
        assert sum(1 for v in query["versions"] if v.get("pruned")) == 3
    finally:
        ballast.unlink()
    m.stop()
    fsck_clean(store)


def test_gc_during_concurrent_writes_loses_nothing(mount_factory):
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    root = m.path
    rng = random.Random(int(os.environ.get("GC_MOUNT_SEED", "11")))
    latest: dict[str, bytes] = {}
    shared = os.urandom(300_000)                          # rewritten often: dedup hits on chunks gc frees
    stop = threading.Event()
    errors: list[BaseException] = []
    gaps: list[float] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                name = f"f{rng.randrange(12)}"
                data = shared if rng.random() < 0.3 else os.urandom(rng.randrange(1, 400_000))
                (root / name).write_bytes(data)
                latest[name] = data
                i += 1
        except BaseException as exc:                      # noqa: BLE001 - reported by the test
            errors.append(exc)

    def prober() -> None:                                 # how long a lookup waits while gc runs
        while not stop.is_set():
            t = time.monotonic()
            os.stat(root)
            os.listdir(root)
            gaps.append(time.monotonic() - t)
            time.sleep(0.005)

    threads = [threading.Thread(target=writer), threading.Thread(target=prober)]
    for t in threads:
        t.start()
    try:
        freed = 0
        for _ in range(5):
            time.sleep(rng.uniform(0.2, 0.8))
            out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
            freed += out["freed_bytes"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    for name, data in latest.items():
        assert (root / name).read_bytes() == data, name
    assert freed > 0
    m.stop()
    fsck_clean(m.store)
    gaps.sort()
    print(f"lookup latency during gc: median {gaps[len(gaps) // 2] * 1000:.1f} ms, "
          f"p99 {gaps[int(len(gaps) * 0.99)] * 1000:.1f} ms, max {gaps[-1] * 1000:.1f} ms over {len(gaps)} probes")
    assert gaps[int(len(gaps) * 0.99)] < 1.0


def test_background_gc_applies_the_policy(mount_factory, monkeypatch):
    monkeypatch.setenv("CHRONICLE_GC_INTERVAL", "1")
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    for i in range(4):
        (m.path / "f").write_bytes(os.urandom(100_000))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:              # pruned marks first; the run's log line once it ends
        query = json.loads((m.path / ".chronicle" / "query" / "f").read_text())
        if sum(1 for v in query["versions"] if v.get("pruned")) == 3 and "gc (policy)" in m.log_text():
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"background gc did not prune: {m.log_tail()}")
    m.stop()
    fsck_clean(m.store)


def test_open_at_handle_pins_its_version_across_processes(mount_factory):
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    old = os.urandom(200_000)
    (m.path / "f").write_bytes(old)
    seq = json.loads((m.path / ".chronicle" / "query" / "f").read_text())["versions"][-1]["seq"]
    for _ in range(3):
        (m.path / "f").write_bytes(os.urandom(200_000))
    with open(m.path / ".chronicle" / "at" / str(seq) / "f", "rb") as handle:
        out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
        assert out["pruned_versions"] == 2                # the version the handle reads stays
        assert handle.read() == old
    out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
    assert out["pruned_versions"] == 1                    # closed: now it goes
    with pytest.raises(OSError) as exc:
        (m.path / ".chronicle" / "at" / str(seq) / "f").read_bytes()
    assert exc.value.errno == errno.ENODATA
    m.stop()
    fsck_clean(m.store)


def test_a_pruned_version_says_so_in_show_and_versions(mount_factory):
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    for i in range(3):
        (m.path / "f").write_text(f"version {i + 1}\n" * 5000)
    cli("gc", "-s", m.store, "-w", m.workspace)
    shown = cli("show", "-s", m.store, "-w", m.workspace, "f@1", check=False)
    assert shown.returncode == 1 and "pruned by gc" in shown.stderr and "Traceback" not in shown.stderr
    assert shown.stderr.strip().count("\n") == 0                       # one line
    missing = cli("show", "-s", m.store, "-w", m.workspace, "f@9", check=False)
    assert missing.returncode != 0 and "no version 9" in missing.stderr
    assert cli("show", "-s", m.store, "-w", m.workspace, "f@3").stdout == "version 3\n" * 5000
    with pytest.raises(OSError) as exc:
        (m.path / ".chronicle" / "versions" / "f" / "1").read_bytes()
    assert exc.value.errno == errno.ENODATA
    m.stop()


def test_a_deleted_files_content_is_freed_when_the_policy_drops_it(mount_factory):
    """rm of a file whose versions the policy no longer keeps: gc (from the CLI,
    the workspace still mounted) gives its bytes back and the history shows the mark."""
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY, "--keep-last", "0")
    (m.path / "big").write_bytes(os.urandom(3 << 20))
    (m.path / "small").write_bytes(b"stays")
    held = open(m.path / "held", "wb")                    # deleted while open: kept until closed
    held.write(os.urandom(1 << 20))
    held.flush()
    os.fsync(held.fileno())
    (m.path / "big").unlink()
    (m.path / "held").unlink()
    # the deleted file is freed once the daemon's lease was refreshed after the deletion
    # (gc.leases: every LEASE_INTERVAL, plus DELETION_MARGIN_NS; later on a loaded machine)
    deadline = time.monotonic() + 30
    while True:
        promised = json.loads(cli("gc", "--dry-run", "-s", m.store, "-w", m.workspace, "--json").stdout)
        if promised["freed_raw_bytes"] >= 3 << 20 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    stats = json.loads((m.path / ".chronicle" / "stats").read_text())
    out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
    assert out["freed_bytes"] == promised["freed_bytes"] and out["freed_raw_bytes"] >= 3 << 20
    assert out["freed_raw_bytes"] < (3 << 20) + (1 << 20)          # not the open one
    query = json.loads((m.path / ".chronicle" / "query" / "big").read_text())
    assert [bool(v.get("pruned")) for v in query["versions"] if "size" in v] == [True]
    assert (m.path / "small").read_bytes() == b"stays"
    held.close()
    freed, deadline = 0, time.monotonic() + 30            # once a lease refresh shows it closed
    while freed < 1 << 20 and time.monotonic() < deadline:
        time.sleep(0.5)
        freed += json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)["freed_raw_bytes"]
    assert freed >= 1 << 20
    assert stats["stored_bytes"] > 0
    m.stop()
    fsck_clean(m.store)


def test_stats_file_shows_what_the_cli_shows_without_a_dry_run_on_the_loop(mount_factory):
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    for i in range(4):
        (m.path / "f").write_bytes(bytes([i]) * 40_000)
    stats_file = m.path / ".chronicle" / "stats"
    t = time.monotonic()
    first = json.loads(stats_file.read_text())
    assert time.monotonic() - t < 2.0
    assert first["retention_as_of"] is None               # not computed on the loop: closing the file starts it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        served = json.loads(stats_file.read_text())
        if served["retention_behind"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the stats cache was not refreshed: {served}")
    assert served["policy_would_drop_versions"] == 3 and served["policy_would_drop_logical_bytes"] == 3 * 40_000
    assert served["head_logical_bytes"] == 40_000 and served["history_logical_bytes"] == 40_000
    shown = json.loads(cli("stats", "-s", m.store, "-w", m.workspace, "--json").stdout)
    extras = {"pid", "open_files", "store"}
    assert set(served) - extras == set(shown) - extras
    for key in ("policy_would_drop_versions", "policy_would_free_bytes", "policy_would_free_chunks",
                "head_logical_bytes", "history_logical_bytes", "history_versions", "retention_as_of_seq"):
        assert served[key] == shown[key], key
    out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
    after = json.loads(stats_file.read_text())
    assert after["last_gc"]["pruned_versions"] == 3 == out["pruned_versions"]
    assert after["last_gc"]["freed_bytes"] == out["freed_bytes"] and after["last_gc"]["duration_seconds"] >= 0
    assert after["policy_would_drop_versions"] == 0 and after["history_logical_bytes"] == 40_000
    text = cli("stats", "-s", m.store, "-w", m.workspace).stdout
    assert "pruned 3 versions" in text and "retention as of:" in text
    m.stop()


def test_cli_gc_compacts_the_pack_the_daemon_is_writing(mount_factory):
    """The dead chunks sit in the pack the mount daemon still appends to: the
    CLI's gc asks the daemon to seal it, then rewrites it (disk space comes back while mounted)."""
    m = mount_factory()
    cli("policy", "set", "-s", m.store, "-w", m.workspace, *NO_HISTORY)
    for _ in range(4):                                    # 4 MiB: one pack, the daemon's current one
        data = os.urandom(1 << 20)
        (m.path / "f").write_bytes(data)
    packs = Path(m.store) / "packs"
    before = sum(f.stat().st_size for f in packs.rglob("*") if f.is_file())
    out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
    assert out["freed_raw_bytes"] >= 3 << 20 and not out["deferred"], out
    assert out["packs_deleted"] >= 1 and out["reclaimed_bytes"] >= 2 << 20, out
    after = sum(f.stat().st_size for f in packs.rglob("*") if f.is_file())
    assert after <= before - (2 << 20)
    assert (m.path / "f").read_bytes() == data
    (m.path / "g").write_bytes(b"written after the rotation")          # the daemon starts a new pack
    assert (m.path / "g").read_bytes() == b"written after the rotation"
    m.stop()
    fsck_clean(m.store)


def test_mounted_gc_compacts_after_sqlite_wal_churn(mount_factory):
    """SQLite in WAL mode rewrites its ``-wal`` and ``-shm`` files with bytes
    they had before (commits that reference no new chunk): a gc while the
    mount is up, with the default policy, still rewrites the daemon's pack —
    the packs' disk bytes go down — and every kept version of the database
    reads back byte-identical afterwards (the newest is the database now)."""
    import sqlite3

    m = mount_factory()
    db = sqlite3.connect(m.path / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    for i in range(1500):
        db.execute("INSERT INTO t (body) VALUES (?)", (f"row {i} " + "x" * 60,))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    versions_dir = m.path / ".chronicle" / "versions" / "t.db"
    before = {n: (versions_dir / n).read_bytes() for n in os.listdir(versions_dir)}
    packs = Path(m.store) / "packs"
    packed = sum(f.stat().st_size for f in packs.rglob("*") if f.is_file())
    out = json.loads(cli("gc", "-s", m.store, "-w", m.workspace, "--json").stdout)
    assert out["freed_bytes"] > 0 and not out["deferred"], out
    assert out["packs_deleted"] >= 1 and out["reclaimed_bytes"] > 0, out
    assert sum(f.stat().st_size for f in packs.rglob("*") if f.is_file()) < packed - out["freed_bytes"] // 2
    query = json.loads((m.path / ".chronicle" / "query" / "t.db").read_text())
    kept = [str(v["version"]) for v in query["versions"] if "hash" in v and not v.get("pruned")]
    assert kept and set(kept) <= set(before)
    for n in kept:
        assert (versions_dir / n).read_bytes() == before[n], n
    assert (versions_dir / kept[-1]).read_bytes() == (m.path / "t.db").read_bytes()
    check = sqlite3.connect(m.path / "t.db")
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 1500
    check.close()
    m.stop()
    fsck_clean(m.store)
