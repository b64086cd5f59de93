"""Run inside ``unshare --mount --propagation private`` by ``test_fstab.py``: real ``mount -t
fuse.chronicle`` and ``mount --fstab FILE`` runs, with the helper installed by ``chronicle
install-mount-helper`` into an overlay of /usr/sbin that only this mount namespace sees.

``python fstab_driver.py WORK`` reads ``WORK/plan.json`` ({"store", "mountpoints": [3 paths]}),
writes each daemon's pid to ``WORK/pids`` as soon as it is known (the test stops what is left)
and prints one JSON object of what it saw. Every mount it made is unmounted before it exits.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from chronicle import procs

REPO = Path(__file__).resolve().parent.parent.parent


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


def daemon_pid(work: Path, mountpoint: str) -> int:
    with open(Path(mountpoint) / ".chronicle" / "stats") as f:
        pid = int(json.load(f)["pid"])
    with open(work / "pids", "a") as f:
        f.write(f"{pid}\n")
    return pid


def main() -> None:
    work = Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    store, (first, second, third) = plan["store"], plan["mountpoints"]
    out: dict = {}
    upper, overlay_work = work / "sbin-upper", work / "sbin-work"
    upper.mkdir()
    overlay_work.mkdir()
    sbin = os.path.realpath("/sbin")
    ran = sh("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={sbin},upperdir={upper},workdir={overlay_work}", sbin)
    assert ran.returncode == 0, ran.stderr
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        ran = subprocess.run([sys.executable, "-m", "chronicle", "install-mount-helper"], env=env,
                             capture_output=True, text=True, timeout=60)
        out["install"] = [ran.returncode, ran.stdout.strip(), ran.stderr.strip()]
        out["installed"] = (upper / "mount.fuse.chronicle").is_file()

        # 1. mount -t fuse.chronicle, read-only
        ran = sh("mount", "-t", "fuse.chronicle", f"{store}#agent1", first, "-o", "ro")
        out["ro_mount"] = [ran.returncode, ran.stderr.strip()]
        if ran.returncode == 0:
            pid = daemon_pid(work, first)
            out["ro_types"] = procs.mount_entries(first)
            out["ro_read"] = (Path(first) / "hello.txt").read_text()
            try:
                (Path(first) / "new.txt").write_text("no")
                out["ro_write"] = "written"
            except OSError as exc:
                out["ro_write"] = errno.errorcode.get(exc.errno, str(exc.errno))
            ran = sh("umount", first)
            out["ro_umount"] = [ran.returncode, ran.stderr.strip(), procs.wait_gone(pid, 60)]

        # 2. an fstab line: a space (\040) in the store path and the mountpoint, mount(8)'s and
        #    systemd's options beside Chronicle's
        fstab = work / "fstab"
        escaped = {p: p.replace(" ", "\\040") for p in (store, second)}
        fstab.write_text("# a test fstab\n"
                         f"{escaped[store]}#agent2  {escaped[second]}  fuse.chronicle  "
                         "defaults,_netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30,"
                         "allow_other,gc_interval=0  0  0\n")
        ran = sh("mount", "--all", "--fstab", str(fstab))
        out["fstab_mount"] = [ran.returncode, ran.stderr.strip()]
        if ran.returncode == 0:
            pid = daemon_pid(work, second)
            out["fstab_types"] = procs.mount_entries(second)
            ran = sh("findmnt", "--noheadings", "--output", "SOURCE", "--mountpoint", second)
            out["fstab_source"] = ran.stdout.strip()
            ran = sh("mount", "--all", "--fstab", str(fstab))      # mounted already: mount(8) sees it
            out["fstab_again"] = [ran.returncode, ran.stderr.strip(), procs.mount_entries(second)]
            (Path(second) / "from-fstab.txt").write_text("written through an fstab mount\n")
            ran = sh("umount", second)
            out["fstab_umount"] = [ran.returncode, ran.stderr.strip(), procs.wait_gone(pid, 60)]

        # 3. a bad option: refused before anything is mounted
        ran = sh("mount", "-t", "fuse.chronicle", f"{store}#agent3", third, "-o", "ro,bogus_option")
        out["bad_option"] = [ran.returncode, ran.stderr.strip(), procs.mount_entries(third)]
    finally:
        for mountpoint in (first, second, third):
            procs.unmount(mountpoint)
        sh("umount", sbin)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
