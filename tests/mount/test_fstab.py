"""``mount -t fuse.chronicle`` and an ``/etc/fstab`` line, through mount(8) itself.

The helper is installed with ``chronicle install-mount-helper`` into an overlay of ``/sbin`` that
only a private mount namespace sees (``unshare --mount --propagation private``), so the machine's
``/sbin`` is never touched; ``fstab_driver.py`` runs the mounts inside it and unmounts them, and
this test stops by pid any daemon the driver left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chronicle import procs
from chronicle.store.store import Store
from storeutil import read, write

pytestmark = [pytest.mark.mount, pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare"),
                                                    reason="mount(8) of a FUSE type and unshare need root")]
REPO = Path(__file__).resolve().parent.parent.parent


def test_mount_t_fuse_chronicle_and_an_fstab_line(tmp_path):
    store = tmp_path / "a store"                  # a space: written \040 in the fstab line
    st = Store.init(store)
    ws = st.open_workspace("agent1", writable=True, create=True)
    write(ws, ws.root, b"hello.txt", b"hello from the store\n")
    st.close()
    mountpoints = [str(tmp_path / "ro"), str(tmp_path / "from fstab"), str(tmp_path / "bad")]
    for m in mountpoints:
        os.mkdir(m)
    work = tmp_path / "work"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps({"store": str(store), "mountpoints": mountpoints}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    try:
        ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                              str(Path(__file__).with_name("fstab_driver.py")), str(work)],
                             capture_output=True, text=True, env=env, timeout=300)
    finally:
        pids = [int(p) for p in (work / "pids").read_text().split()] if (work / "pids").exists() else []
        for pid in pids:                          # daemons the driver did not see exit: stop them (SIGTERM unmounts)
            if procs.alive(pid):
                os.kill(pid, signal.SIGTERM)
                procs.wait_gone(pid, 30)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])

    assert out["install"][0] == 0 and out["installed"], out["install"]
    # mount -t fuse.chronicle STORE#WORKSPACE MOUNTPOINT -o ro: mounted, readable, read-only
    assert out["ro_mount"] == [0, ""]
    assert out["ro_types"] == ["fuse.chronicle"]
    assert out["ro_read"] == "hello from the store\n"
    assert out["ro_write"] == "EROFS"
    assert out["ro_umount"] == [0, "", True]
    # the fstab line (mount --all): mount(8)'s and systemd's options accepted, the workspace created,
    # a write committed
    assert out["fstab_mount"] == [0, ""]
    assert out["fstab_types"] == ["fuse.chronicle"]
    assert out["fstab_source"] == f"{store}#agent2"              # findmnt and df show the fstab line's source,
    assert out["fstab_again"] == [0, "", ["fuse.chronicle"]]     # so a second mount -a leaves it be
    assert out["fstab_umount"] == [0, "", True]
    with Store.open(store) as st:
        assert sorted(w.name for w in st.workspaces()) == ["agent1", "agent2"]
        ws = st.open_workspace("agent2")
        assert read(ws, b"from-fstab.txt") == b"written through an fstab mount\n"
    # a bad option: mount(8) fails with the helper's one line, nothing is mounted
    code, stderr, mounted = out["bad_option"]
    assert code != 0 and mounted == []
    assert "mount.fuse.chronicle: error: unknown mount option 'bogus_option'" in stderr
