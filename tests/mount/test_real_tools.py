"""Real tools work unchanged inside the mount (SPEC §3): git, tar, venv + pip, sqlite WAL.

Each test gets a fresh mount (the ``mount`` fixture) and runs the real program
in it, with no network and no user configuration (HOME points into the test's
temporary directory). Trees are compared by names, types, modes, contents,
symlink targets, hard-link groups and whole-second mtimes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import sqlite3
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest


# --- helpers -----------------------------------------------------------------

@pytest.fixture
def tool_env(tmp_path) -> dict[str, str]:
    """An environment with no user or system configuration and no network use."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Chronicle Tests", "GIT_AUTHOR_EMAIL": "tests@chronicle.invalid",
        "GIT_COMMITTER_NAME": "Chronicle Tests", "GIT_COMMITTER_EMAIL": "tests@chronicle.invalid",
        # No detached background gc/maintenance that would hold the mount busy.
        "GIT_CONFIG_COUNT": "3",
        "GIT_CONFIG_KEY_0": "gc.autoDetach", "GIT_CONFIG_VALUE_0": "false",
        "GIT_CONFIG_KEY_1": "maintenance.autoDetach", "GIT_CONFIG_VALUE_1": "false",
        "GIT_CONFIG_KEY_2": "init.defaultBranch", "GIT_CONFIG_VALUE_2": "main",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_CONFIG_FILE": os.devnull,
    })
    return env


def run(cmd, *, cwd=None, env=None, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure, fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}", pytrace=False)
    return proc


def make_tree(root: Path, seed: int = 0, hard_links: bool = True) -> None:
    """A small source-like tree: nested dirs, text and binary files, an
    executable, an empty file, odd names, symlinks and (optionally) hard links."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in ("src/pkg/sub", "docs", "data/empty-dir", "odd names/ünïcødé"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(12):
        lines = [f"line {j} of module {i}: {rnd.getrandbits(64):x}" for j in range(rnd.randint(1, 200))]
        (root / "src/pkg" / f"mod{i}.py").write_text("\n".join(lines) + "\n")
    for i in range(5):
        (root / "src/pkg/sub" / f"part{i}.txt").write_text(f"part {i}\n" * rnd.randint(1, 50))
    (root / "docs/README.md").write_text("# A tree\n\nGenerated for the real-tools tests.\n")
    (root / "data/blob.bin").write_bytes(rnd.randbytes(300_000))
    (root / "data/zeros.bin").write_bytes(bytes(70_000))
    (root / "data/empty").write_bytes(b"")
    (root / "odd names/with space.txt").write_text("space\n")
    (root / "odd names/ünïcødé/naïve.txt").write_text("unicode\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    (root / "docs/private.txt").write_text("mode 600\n")
    (root / "docs/private.txt").chmod(0o600)
    os.symlink("docs/README.md", root / "readme-link")
    os.symlink("../src/pkg", root / "data/pkg-link")
    os.symlink("does-not-exist", root / "dangling")
    if hard_links:
        os.link(root / "data/blob.bin", root / "data/blob-hardlink.bin")


def tree_state(root: Path, mtimes: bool = True) -> dict:
    """Comparable description of a tree (no inode numbers, whole-second mtimes)."""
    state: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            mtime = int(st_.st_mtime) if mtimes else None
            if stat.S_ISLNK(st_.st_mode):
                state[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st_.st_mode), mtime)
            else:
                inodes.setdefault(st_.st_ino, []).append(rel)
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                state[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_size, digest, mtime)
    state[".hard-links"] = tuple(sorted(tuple(sorted(p)) for p in inodes.values() if len(p) > 1))
    return state


def assert_same_tree(expected: Path, actual: Path, mtimes: bool = True) -> None:
    a, b = tree_state(expected, mtimes), tree_state(actual, mtimes)
    if a != b:
        diffs = [f"{k}: expected {a.get(k)}, got {b.get(k)}" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
        pytest.fail(f"{actual} differs from {expected}:\n" + "\n".join(diffs[:30]), pytrace=False)


# --- git ---------------------------------------------------------------------

def test_git(mount, tool_env):
    repo = mount.path / "repo"
    make_tree(repo, seed=1, hard_links=False)

    def git(*args, cwd=repo):
        return run(["git", *args], cwd=cwd, env=tool_env).stdout

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    git("fsck", "--full", "--strict", "--no-progress")
    assert git("status", "--porcelain", "--untracked-files=all") == ""

    # A second commit: edit, delete, rename, add; then repack everything.
    (repo / "src/pkg/mod0.py").write_text("changed\n")
    (repo / "docs/README.md").unlink()
    (repo / "src/pkg/mod1.py").rename(repo / "src/pkg/renamed.py")
    (repo / "new.txt").write_text("new\n")
    assert git("status", "--porcelain") != ""
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    git("gc", "-q", "--aggressive", "--prune=now")
    git("fsck", "--full", "--strict", "--no-progress")
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    assert len(git("log", "--oneline").splitlines()) == 2

    # A clone inside the mount checks out the same files (git keeps no empty
    # directories and no permission bits but the executable one).
    clone = mount.path / "clone"
    git("clone", "-q", "--no-local", str(repo), str(clone), cwd=mount.path)
    assert git("rev-parse", "HEAD", cwd=clone) == git("rev-parse", "HEAD")
    git("fsck", "--full", "--strict", "--no-progress", cwd=clone)
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""

    def as_git_sees_it(root: Path) -> dict:
        return {path: (entry[0], entry[1] & 0o100) + entry[2:] if entry[0] == "file" else entry
                for path, entry in tree_state(root, mtimes=False).items()
                if path != ".hard-links" and not path.startswith(".git") and entry[0] != "dir"}
    assert as_git_sees_it(clone) == as_git_sees_it(repo)


# --- tar ---------------------------------------------------------------------

def test_tar_roundtrip(mount, tmp_path, tool_env):
    src = tmp_path / "src"
    make_tree(src, seed=2)
    # A file with a hole, and a wider tree of many small files.
    with open(src / "data/sparse.bin", "wb") as f:
        f.write(b"begin")
        f.seek(3 * 2**20)
        f.write(b"end")
    for i in range(200):
        d = src / "many" / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * (i % 7))
    # Old, distinct whole-second mtimes (tar keeps seconds): a file whose
    # mtime is lost and replaced by "now" shows up however fast the test runs.
    for n, (dirpath, dirnames, filenames) in enumerate(os.walk(src, topdown=False)):
        for m, name in enumerate(dirnames + filenames):
            t = 1_000_000_000 + 1000 * n + m
            os.utime(os.path.join(dirpath, name), (t, t), follow_symlinks=False)

    # Create an archive into the mount, extract it inside the mount.
    archive = mount.path / "archive.tar"
    run(["tar", "-C", src, "-cf", archive, "."], env=tool_env)
    inside = mount.path / "extracted"
    inside.mkdir()
    run(["tar", "-C", inside, "-xpf", archive], env=tool_env)
    assert_same_tree(src, inside)

    # And back out of the mount onto ext4.
    back = tmp_path / "back.tar"
    run(["tar", "-C", inside, "-cf", back, "."], env=tool_env)
    out = tmp_path / "out"
    out.mkdir()
    run(["tar", "-C", out, "-xpf", back], env=tool_env)
    assert_same_tree(src, out)
    members = run(["tar", "-tf", archive], env=tool_env).stdout.splitlines()
    assert len(members) == len(tree_state(src))  # every entry, plus "./" for the root


# --- python venv + pip -------------------------------------------------------

def build_wheel(dist: Path, name: str = "chronicle_probe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (PEP 427): a package, METADATA, WHEEL,
    entry_points.txt and RECORD with urlsafe-base64 sha256 digests."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": textwrap.dedent(f"""\
            from importlib import resources

            def greet(who):
                return f"hello {{who}} from {name} {version}"

            def main():
                print(greet("console script"))
                print(resources.files(__name__).joinpath("data.txt").read_text().strip())
            """).encode(),
        f"{name}/data.txt": b"package data travels with the wheel\n",
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                  f"Version: {version}\nSummary: Chronicle real-tools test wheel\n").encode(),
        f"{dist_info}/WHEEL": (b"Wheel-Version: 1.0\nGenerator: chronicle-tests\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        f"{dist_info}/entry_points.txt": f"[console_scripts]\nchronicle-probe = {name}:main\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    dist.mkdir(parents=True, exist_ok=True)
    wheel = dist / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.mark.slow
def test_venv_pip_install_local_wheel(mount, tmp_path, tool_env):
    wheel = build_wheel(tmp_path / "dist")
    venv = mount.path / "venv"
    run([sys.executable, "-m", "venv", venv], env=tool_env, timeout=600)
    python = venv / "bin" / "python"
    assert run([python, "-m", "pip", "--version"], env=tool_env).stdout.startswith("pip ")

    run([python, "-m", "pip", "install", "--no-index", "--no-cache-dir", wheel], env=tool_env, timeout=600)
    out = run([python, "-c", "import chronicle_probe, sys; print(chronicle_probe.greet('mount')); "
                             "print(chronicle_probe.__file__.startswith(sys.prefix))"],
              env=tool_env).stdout.split("\n")
    assert out[:2] == ["hello mount from chronicle_probe 1.0", "True"]
    out = run([venv / "bin" / "chronicle-probe"], env=tool_env).stdout.split("\n")
    assert out[:2] == ["hello console script from chronicle_probe 1.0", "package data travels with the wheel"]
    # pip byte-compiled the package into the mount.
    assert list((venv / "lib").glob("python3*/site-packages/chronicle_probe/__pycache__/*.pyc"))

    run([python, "-m", "pip", "uninstall", "-y", "chronicle-probe"], env=tool_env)
    gone = run([python, "-c", "import chronicle_probe"], env=tool_env, check=False)
    assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr


# --- sqlite in WAL mode ------------------------------------------------------

def test_sqlite_wal(mount):
    db = mount.path / "data.db"
    rnd = random.Random(3)
    expected: dict[int, bytes] = {}
    writer = sqlite3.connect(db, isolation_level=None)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        writer.execute("PRAGMA synchronous=FULL")
        writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        for txn in range(300):
            writer.execute("BEGIN IMMEDIATE")
            for _ in range(rnd.randint(1, 8)):
                key = rnd.randrange(500)
                if key in expected and rnd.random() < 0.2:
                    writer.execute("DELETE FROM t WHERE id = ?", (key,))
                    del expected[key]
                else:
                    # Up to 20 KB: bigger than a page, so overflow pages too.
                    value = rnd.randbytes(rnd.choice([10, 200, 3000, 20_000]))
                    writer.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (key, value))
                    expected[key] = value
            writer.execute("COMMIT")
            if txn % 25 == 0:
                # A second connection sees every committed transaction (WAL + shared memory).
                assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == len(expected)
            if txn % 100 == 99:
                writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert (mount.path / "data.db-wal").exists()
        assert writer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # Another process writes through the same WAL while our connections stay open.
        child = textwrap.dedent("""
            import sqlite3, sys
            con = sqlite3.connect(sys.argv[1], isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT OR REPLACE INTO t VALUES (9999, ?)", (b"from another process",))
            con.execute("COMMIT")
            con.close()
        """)
        run([sys.executable, "-c", child, db])
        expected[9999] = b"from another process"
        assert reader.execute("SELECT v FROM t WHERE id = 9999").fetchone()[0] == b"from another process"
    finally:
        reader.close()
        writer.close()

    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert dict(con.execute("SELECT id, v FROM t")) == expected
    finally:
        con.close()
