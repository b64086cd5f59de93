"""``mount.fuse.chronicle`` without a mount: its SOURCE and option parsing, its exit statuses and
one-line errors as mount(8) shows them, and ``chronicle install-mount-helper`` (into a temporary
directory; ``tests/mount/test_fstab.py`` mounts through mount(8) itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chronicle import mount_helper
from chronicle.cli import cli
from chronicle.errors import InvalidArgument
from chronicle.store.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("source, store, workspace", [
    ("/srv/chronicle#agent1", "/srv/chronicle", "agent1"),
    ("/srv/chronicle", "/srv/chronicle", "default"),                 # no '#': the default workspace
    ("/srv/a#b/store#w-1.x", "/srv/a#b/store", "w-1.x"),             # split at the last '#'
    ("/srv/my store#w", "/srv/my store", "w"),                       # mount(8) unescaped fstab's \040
])
def test_a_source_names_a_store_and_a_workspace(source, store, workspace):
    assert mount_helper.parse_source(source) == (Path(store), workspace)


def test_a_relative_store_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mount_helper.parse_source("st#w") == (tmp_path / "st", "w")


@pytest.mark.parametrize("source, says", [
    ("#w", "names no store"),
    ("/srv/s#", "names no workspace"),
    ("/srv/s#bad name", "invalid workspace name"),
])
def test_a_bad_source_is_refused_with_the_form_it_takes(source, says):
    with pytest.raises(InvalidArgument, match=says):
        mount_helper.parse_source(source)


def test_options_for_mount_and_systemd_are_dropped_and_chronicles_become_the_daemons_environment():
    fuse, env = mount_helper.parse_options(
        ["ro,noexec,nosuid,nodev,allow_other,_netdev,nofail,user", "gc_interval=0,x-systemd.automount,defaults"])
    assert fuse == ("ro", "noexec", "nosuid", "nodev", "allow_other")
    assert env == {"CHRONICLE_GC_INTERVAL": "0"}
    assert mount_helper.parse_options(["rw,sync_interval=2.5"]) == ((), {"CHRONICLE_SYNC_INTERVAL": "2.5"})


@pytest.mark.parametrize("options, says", [
    ("ro,bogus", "unknown mount option 'bogus'"),
    ("gc_interval=soon", "gc_interval= takes a number of seconds"),
    ("sync_interval", "sync_interval= takes a number of seconds"),
    ("ro,rw", "contradict"),
])
def test_bad_options_are_refused_by_name(options, says):
    with pytest.raises(InvalidArgument, match=says):
        mount_helper.parse_options([options])


def test_sloppy_drops_an_unknown_option_with_a_warning():
    warnings = []
    assert mount_helper.parse_options(["ro,bogus"], sloppy=True, warn=warnings.append) == (("ro",), {})
    assert warnings == ["mount.fuse.chronicle: warning: ignoring unknown mount option 'bogus' (-s)"]


def _helper(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "chronicle.mount_helper", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def test_exit_statuses_and_messages_are_mounts(tmp_path):
    Store.init(tmp_path / "st").close()
    (tmp_path / "mnt").mkdir()
    ran = _helper(f"{tmp_path}/st#w", str(tmp_path / "mnt"), "-o", "ro,bogus")
    assert ran.returncode == 1                                        # mount(8): bad invocation
    assert ran.stderr.startswith("mount.fuse.chronicle: error: unknown mount option 'bogus'")
    ran = _helper(f"{tmp_path}/nothing#w", str(tmp_path / "mnt"))
    assert ran.returncode == 32                                       # mount(8): mount failure
    assert "no Chronicle store at" in ran.stderr and not (tmp_path / "nothing").exists()   # not created
    ran = _helper(f"{tmp_path}/st#w", str(tmp_path / "mnt"), "-t", "fuse.sshfs")
    assert ran.returncode == 1 and "mounts type fuse.chronicle, not 'fuse.sshfs'" in ran.stderr
    ran = _helper(f"{tmp_path}/st#w", str(tmp_path / "mnt"), "-N", "/proc/1/ns/mnt")
    assert ran.returncode == 1 and "-N" in ran.stderr
    ran = _helper(str(tmp_path / "st"))
    assert ran.returncode == 1 and "MOUNTPOINT" in ran.stderr and "Traceback" not in ran.stderr
    # -f (fake) checks everything and mounts nothing; -v says what
    ran = _helper("-f", "-v", f"{tmp_path}/st#w", str(tmp_path / "mnt"), "-o", "ro,_netdev", "-t", "fuse.chronicle")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"mount.fuse.chronicle: would mount workspace 'w' of {tmp_path}/st at {tmp_path}/mnt (ro)"
    assert not os.path.ismount(tmp_path / "mnt")


def test_install_writes_a_helper_that_runs_this_chronicle_and_remove_takes_it_back(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    helper = tmp_path / "mount.fuse.chronicle"
    assert helper.stat().st_mode & 0o777 == 0o755
    assert helper.read_text().startswith(f"#!{sys.executable}\n")
    ran = subprocess.run([str(helper), "--help"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})                 # no venv, no PYTHONPATH: boot's environment
    assert ran.returncode == 0 and ran.stdout.startswith("usage: mount.fuse.chronicle STORE[#WORKSPACE] MOUNTPOINT")
    assert runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path)]).exit_code == 0   # again: replaced
    result = runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path), "--remove"])
    assert result.exit_code == 0 and not helper.exists()


def test_install_leaves_a_helper_it_did_not_write_unless_forced(tmp_path):
    helper = tmp_path / "mount.fuse.chronicle"
    helper.write_text("#!/bin/sh\nexec someone-elses-helper\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path)])
    assert result.exit_code != 0 and "was not written by chronicle install-mount-helper" in result.output
    assert "someone-elses-helper" in helper.read_text()
    assert runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path), "--remove"]).exit_code == 0
    assert helper.exists()                                            # --remove takes only ours
    assert runner.invoke(cli, ["install-mount-helper", "--dir", str(tmp_path), "--force"]).exit_code == 0
    assert "chronicle.mount_helper" in helper.read_text()


def test_chronicle_mount_refuses_an_unknown_option_before_mounting(tmp_path):
    result = CliRunner().invoke(cli, ["mount", "--store", str(tmp_path / "st"), "-o", "ro,fast", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "chronicle: error: unknown mount option 'fast'" in result.output
    assert not (tmp_path / "st").exists() and not (tmp_path / "m").exists()
