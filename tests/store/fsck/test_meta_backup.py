"""The metadata backup (issue 7 §4): a store whose metadata file cannot be
opened at all (both LMDB meta pages, or its table of databases, damaged)
opens from the newest backup generation Chronicle keeps, says what may be
lost, and fsck reports which metadata is in use."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from storeutil import read, write

from chronicle.errors import StoreError
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta import backup
from chronicle.store.store import Store

PAGE = os.sysconf("SC_PAGE_SIZE")
CLI = [sys.executable, "-m", "chronicle"]


def smash_meta_pages(store_path) -> None:
    with open(store_path / "meta" / "data.mdb", "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * PAGE + 16)
            f.write(os.urandom(64))


def test_backups_are_checked_copies_and_a_few_are_kept(store, ws):
    write(ws, ws.root, b"a", b"one\n")
    first = store.backup_metadata()
    assert first is not None and (first.path / "data.mdb").is_file()
    assert first.heads == {"w": ws.head_seq}
    assert store.backup_metadata() is None                    # nothing new: no second copy
    for n in range(backup.KEEP + 2):
        write(ws, ws.root, b"a", f"v{n}\n".encode())
        store.backup_metadata()
    kept = backup.generations(store.path)
    assert len(kept) == backup.KEEP and kept[0].heads == {"w": ws.head_seq}
    assert [g.txnid for g in kept] == sorted((g.txnid for g in kept), reverse=True)
    mode = os.stat(kept[0].path / "data.mdb").st_mode & 0o777
    assert mode == 0o600 and os.stat(store.path / backup.BACKUP_DIR).st_mode & 0o777 == 0o700


def test_backup_is_due_after_commits_and_the_interval(store, ws):
    store.backup_metadata()                                   # (creating the workspace was a commit)
    assert not store.backup_due(0)
    write(ws, ws.root, b"a", b"one\n")
    assert store.backup_due(0) and not store.backup_due(3600)
    store.backup_metadata()
    assert not store.backup_due(0)


def test_unopenable_metadata_opens_from_the_newest_backup(tmp_path, caplog):
    st = Store.init(tmp_path / "store")
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"kept", b"backed up\n")
    gen = st.backup_metadata()
    write(ws, ws.root, b"later", b"after the backup\n")
    st.close()
    smash_meta_pages(tmp_path / "store")
    with caplog.at_level(logging.WARNING), Store.open(tmp_path / "store") as st:
        ws = st.open_workspace("w")
        assert read(ws, b"kept") == b"backed up\n"
        with pytest.raises(Exception):
            read(ws, b"later")                                # made after the backup: lost, and said so
        report = fsck(st)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "restored from the backup" in warned and f"'w' after seq {gen.heads['w']}" in warned
    assert report.metadata_in_use.startswith("backup of ")
    note = [p for p in report.problems if p.kind == "metadata-from-backup"]
    assert note and note[0].severity == "warning" and "kept at" in note[0].message
    kept = backup.restored_note(tmp_path / "store")["damaged_file"]
    assert kept and os.path.exists(kept)                      # the damaged file is kept
    with Store.open(tmp_path / "store") as st:
        repaired = fsck(st, repair=True)
        assert any(p.kind == "metadata-from-backup" and p.repaired for p in repaired.problems)
        assert fsck(st).metadata_in_use == "live" and fsck(st).clean


def test_unopenable_metadata_without_a_backup_is_one_clear_error(tmp_path):
    st = Store.init(tmp_path / "store")
    ws = st.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"a", b"x\n")
    st.close()
    smash_meta_pages(tmp_path / "store")
    with pytest.raises(StoreError, match="both meta pages are damaged.*no sound metadata backup"):
        Store.open(tmp_path / "store")
    proc = subprocess.run(CLI + ["fsck", "--store", str(tmp_path / "store")], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "internal error" not in out and "Traceback" not in out
    assert out.count("\n") == 1 and "no sound metadata backup" in out


def test_the_cli_shows_the_backups(store, ws):
    write(ws, ws.root, b"a", b"one\n")
    store.backup_metadata()
    proc = subprocess.run(CLI + ["fsck", "--json", "--store", str(store.path)], capture_output=True, text=True)
    doc = json.loads(proc.stdout)
    assert doc["metadata_in_use"] == "live" and doc["metadata_backups"] == 1 and doc["metadata_backup_newest"]


def test_two_backups_of_the_same_transaction_at_once_both_succeed(tmp_path):
    """The daemon's backup at unmount and another process's may race for one
    generation (seen: ENOTEMPTY from the rename); one wins, the other returns None."""
    import threading

    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"f", b"data\n")
    errors, results = [], []
    barrier = threading.Barrier(4)

    def one():
        barrier.wait()
        try:
            results.append(backup.take(store.env, store.dbs, store.path, store.modes))
        except Exception as exc:   # noqa: BLE001 - what the test is about
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []
    assert len(backup.generations(tmp_path / "s")) == 1
    assert sum(r is not None for r in results) >= 1
