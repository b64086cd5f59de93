"""fsync from several processes at once (SPEC §3, "Durability"), on a real mount.

The mount shares one ``Store.sync`` among the fsyncs that arrive together
(``chronicle.fs.groupsync``). What a user relies on: every fsync that
returned is durable against a machine crash, whoever else was syncing at the
time. A machine crash is simulated after ``kill -9`` of the daemon: the
store is opened with another boot id (``CHRONICLE_BOOT_ID``), which rolls the
metadata back to the last recorded sync (``chronicle.store.meta.recovery``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fsutil import payload

from chronicle.store.fsck.checks import fsck
from chronicle.store.store import Store
from storeutil import read


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("durability of the Chronicle daemon")


# Appends to its own file and fsyncs after each append, printing how many returned.
WRITER = textwrap.dedent("""
    import os, sys
    path, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(rounds):
        os.write(fd, b"%d:%d;" % (seed, i))
        os.fsync(fd)
    print(rounds, flush=True)
    os.pause()                      # keep the file open until killed
""")


def test_fsyncs_of_several_processes_all_survive_a_crash(mount_factory, monkeypatch):
    m = mount_factory()
    root = m.path
    (root / "d").mkdir()
    (root / "d" / "other.txt").write_bytes(payload(3, 5000))   # closed, never fsynced: not promised
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(root / "d" / f"w{k}.log"), str(k), "25"],
                                stdout=subprocess.PIPE, text=True) for k in range(4)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "25"          # all 25 fsyncs returned
        m.kill()
    finally:
        for w in writers:
            w.kill()
            w.wait()
    monkeypatch.setenv("CHRONICLE_BOOT_ID", "a-later-boot")    # the machine went down with the daemon
    with Store.open(m.store) as st:
        ws = st.open_workspace("test")
        for k in range(4):
            assert read(ws, b"d/w%d.log" % k) == b"".join(b"%d:%d;" % (k, i) for i in range(25))
        assert fsck(st).clean
