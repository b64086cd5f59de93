"""``mount.fuse.chronicle``: the mount(8) helper behind ``mount -t fuse.chronicle`` and ``/etc/fstab``.

For a file system type ``fuse.TYPE``, util-linux mount(8) runs the first
``mount.fuse.TYPE`` it finds in ``/sbin``, ``/sbin/fs.d`` or ``/sbin/fs``
(``/sbin`` is ``/usr/sbin`` on a merged-/usr system) — only without one does
it fall back to ``mount.fuse3``, which would run a program named ``chronicle``
with mount's arguments (mount.fuse3(8)). sshfs, s3ql and juicefs ship such a
helper too. mount(8) calls it as (mount(8), "EXTERNAL HELPERS")::

    mount.fuse.chronicle SOURCE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]

after dropping the options that are its own (``defaults``, ``noauto``,
``x-*``) and unescaping the fstab fields (``\\040`` is a space). It still
passes some options only mount(8), systemd or fusermount care about; they
are accepted and dropped here: ``_netdev``, ``nofail``, ``auto``,
``noauto``, ``user``, ``users``, ``nouser``, ``owner``, ``group``,
``defaults``, ``x-*``, ``comment=*``, ``user=*`` (mount.fuse3's list, plus
the systemd and util-linux userspace ones).

**SOURCE** is ``STORE#WORKSPACE``, or ``STORE`` for the workspace
``default``: the store directory (absolute, or relative to mount's working
directory), a ``#``, the workspace name. ``#`` because it cannot occur in a
workspace name (so splitting at the last ``#`` is never ambiguous, even for
a store path holding one), it is not whitespace (an fstab field ends at
whitespace; a space in the store path is written ``\\040``), fstab treats it
as a comment only at the start of a line, it is FUSE's own
``TYPE#SOURCE`` separator, and it stays free of the ``:`` of URLs and of
``host:path`` sources. The helper only opens the store the way every
Chronicle command does, so it serves whatever backend the store was created
with (``store.json``; a local directory or S3). The daemon names every
mount ``STORE#WORKSPACE`` (``chronicle.fs.daemon.fs_name``), so mount(8)
finds an fstab line's mount in ``/proc/self/mountinfo`` and a second
``mount -a`` leaves it be.

**Options** (``-o``, comma-separated): the mount options of
``chronicle mount -o`` (``chronicle.mounting.FUSE_OPTIONS``: ``ro``, ``rw``,
``allow_other``, ``allow_root``, ``nosuid``/``suid``, ``nodev``/``dev``,
``noexec``/``exec``, ``noatime``), the dropped ones above, and Chronicle's
own: ``gc_interval=SECONDS`` and ``sync_interval=SECONDS`` (the daemon's
``CHRONICLE_GC_INTERVAL``, ``CHRONICLE_SYNC_INTERVAL``). Anything else is an
error naming the option, unless ``-s`` (sloppy) is given, which drops it
with a warning. ``-f`` (fake) checks everything and mounts nothing; ``-v``
says what is mounted; ``-n`` is accepted (no ``/etc/mtab`` is written);
``-N`` is refused. The store must exist (``chronicle init``): a mistyped
fstab line must not create an empty store; the workspace is created on its
first mount, as ``chronicle mount`` does.

It returns once the mount serves, while the daemon (started as
``chronicle mount`` starts it: detached, its log in
``STORE/run/mount-WORKSPACE.log``) goes on serving — what mount(8) and
systemd's mount units wait for. Exit status (mount(8)'s): 0 mounted, 1 bad
arguments or options, 32 the mount failed; the reason is one line
``mount.fuse.chronicle: error: ...`` on stderr.

:func:`install` writes the helper into ``/sbin`` (``chronicle
install-mount-helper``): a small script naming this interpreter and this
Chronicle, so mount(8) runs it with neither a venv activated nor ``PATH``
(systemd at boot) and its daemon runs the same code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chronicle import mounting
from chronicle.errors import ChronicleError, InvalidArgument

PROG = "mount.fuse.chronicle"
FS_TYPE = "fuse.chronicle"
SOURCE_SEPARATOR = "#"
HELPER_DIR = Path("/sbin")
EXIT_USAGE = 1          # mount(8): incorrect invocation or permissions
EXIT_FAILURE = 32       # mount(8): mount failure

# Passed by mount(8) but meant for it, systemd or fusermount3; no meaning to the file system.
IGNORED = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner",
                     "group"})
IGNORED_PREFIXES = ("x-", "comment=", "user=")
# Chronicle's own options: the daemon's environment variable each one sets.
CHRONICLE_OPTIONS = {"gc_interval": "CHRONICLE_GC_INTERVAL", "sync_interval": "CHRONICLE_SYNC_INTERVAL"}
_MARK = "# written by `chronicle install-mount-helper`"
USAGE = f"""usage: {PROG} STORE[#WORKSPACE] MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]] [-t {FS_TYPE}]

Mount workspace WORKSPACE (default 'default') of the Chronicle store STORE at MOUNTPOINT;
mount(8) runs it for `mount -t {FS_TYPE}` and /etc/fstab lines of type {FS_TYPE}.
Options: ro, rw, allow_other, allow_root, nosuid, suid, nodev, dev, noexec, exec, noatime,
gc_interval=SECONDS, sync_interval=SECONDS; mount(8)'s and systemd's own (_netdev, nofail,
noauto, user, x-systemd.*, ...) are ignored. -s: ignore unknown options; -f: check, do not
mount; -v: say what is mounted. Exit status: 0 mounted, 1 bad arguments, 32 mount failed."""


def parse_source(source: str) -> tuple[Path, str]:
    """``STORE#WORKSPACE`` (or ``STORE``: workspace ``default``) →
    ``(absolute store path, workspace)``, split at the last ``#`` (module
    docstring). Raises :class:`InvalidArgument` for an empty store part or
    a name that is not a valid workspace name."""
    from chronicle.store.store import check_workspace_name

    store, sep, workspace = source.rpartition(SOURCE_SEPARATOR)
    if not sep:
        store, workspace = source, mounting.DEFAULT_WORKSPACE
    if not store:
        raise InvalidArgument(f"source {source!r} names no store: write STORE#WORKSPACE, e.g. /srv/chronicle#agent1")
    if not workspace:
        raise InvalidArgument(f"source {source!r} names no workspace after '#': write STORE#WORKSPACE, "
                              "or STORE alone for the workspace 'default'")
    try:
        check_workspace_name(workspace)
    except ChronicleError as err:
        raise InvalidArgument(f"source {source!r}: {err}") from None
    return Path(os.path.abspath(store)), workspace


def parse_options(texts: list[str], *, sloppy: bool = False,
                  warn=lambda line: print(line, file=sys.stderr)) -> tuple[tuple[str, ...], dict[str, str]]:
    """The ``-o`` arguments (each comma-separated) → ``(FUSE options, daemon
    environment)``: mount(8)'s and systemd's options dropped, Chronicle's own
    turned into environment variables, the rest checked by
    ``mounting.fuse_options``. Raises :class:`InvalidArgument` for an
    unknown option (``sloppy``: ``warn`` is called with a line and it is
    dropped) or a Chronicle option without a non-negative number."""
    fuse: list[str] = []
    env: dict[str, str] = {}
    for text in texts:
        for option in text.split(","):
            option = option.strip()
            name, eq, value = option.partition("=")
            if not option or option in IGNORED or option.startswith(IGNORED_PREFIXES):
                continue
            if name in CHRONICLE_OPTIONS:
                try:
                    if not eq or float(value) < 0:
                        raise ValueError
                except ValueError:
                    raise InvalidArgument(f"mount option {name}= takes a number of seconds >= 0, "
                                          f"not {option!r}") from None
                env[CHRONICLE_OPTIONS[name]] = value
                continue
            if option in mounting.FUSE_OPTIONS:
                fuse.append(option)
                continue
            if sloppy:
                warn(f"{PROG}: warning: ignoring unknown mount option {option!r} (-s)")
                continue
            known = sorted(mounting.FUSE_OPTIONS | {f"{n}=SECONDS" for n in CHRONICLE_OPTIONS})
            raise InvalidArgument(f"unknown mount option {option!r}: Chronicle takes {', '.join(known)} "
                                  f"(and ignores {', '.join(sorted(IGNORED))}, x-*)")
    return mounting.fuse_options(fuse), env


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InvalidArgument(f"{message} (usage: {PROG} STORE[#WORKSPACE] MOUNTPOINT [-o OPTIONS]; --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, add_help=False,
                     description="mount(8) helper: mount a Chronicle workspace (type fuse.chronicle).")
    parser.add_argument("source", metavar="STORE[#WORKSPACE]")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-t", dest="type")
    parser.add_argument("-N", dest="namespace")
    for flag in ("s", "f", "n", "v"):
        parser.add_argument(f"-{flag}", dest=flag, action="store_true")
    return parser


def daemon_env(extra: dict[str, str]) -> dict[str, str]:
    """The daemon's environment: ours, ``extra`` (Chronicle's options), the
    directory of this Chronicle first on ``PYTHONPATH`` (the daemon runs the
    helper's code, whatever ``PATH`` or venv mount(8) runs in), and ``HOME``
    and ``PATH`` if unset: mount(8) runs the helper of a ``user`` mount with
    an emptied environment, systemd at boot with little (mount.fuse3 sets
    ``HOME`` too)."""
    import pwd

    env = dict(os.environ)
    env.update(extra)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if "HOME" not in env:
        try:
            env["HOME"] = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            env["HOME"] = "/"
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name) and mount; see the module
    docstring. Returns the exit status; raises :class:`ChronicleError`."""
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    args = _parser().parse_args(argv)
    if args.type is not None and args.type not in (FS_TYPE, "chronicle"):
        raise InvalidArgument(f"{PROG} mounts type {FS_TYPE}, not {args.type!r}")
    if args.namespace is not None:
        raise InvalidArgument(f"{PROG} does not mount in another namespace (-N): run mount(8) inside it")
    store, workspace = parse_source(args.source)
    options, extra_env = parse_options(args.options, sloppy=args.s)
    mountpoint = Path(os.path.abspath(args.mountpoint))
    from chronicle.store.store import Store

    Store.open(store).close()          # StoreNotFound: a mistyped fstab line must not create a store
    described = f"workspace {workspace!r} of {store} at {mountpoint}" + (f" ({','.join(options)})" if options else "")
    if args.f:
        if args.v:
            print(f"{PROG}: would mount {described}")
        return 0
    mounting.mount(store, workspace, mountpoint, options=options, create_store=False, env=daemon_env(extra_env))
    if args.v:
        print(f"{PROG}: mounted {described}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``mount.fuse.chronicle`` program: :func:`run`, with an error as
    one line on stderr and mount(8)'s exit status (module docstring)."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ChronicleError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, InvalidArgument) else EXIT_FAILURE
    except OSError as exc:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "") if exc.strerror else str(exc)
        print(f"{PROG}: error: {' '.join(text.split())}", file=sys.stderr)
        return EXIT_FAILURE


def helper_script() -> str:
    """The text of the installed helper: this interpreter (``sys.executable``,
    a venv's python as it is, not resolved) runs this Chronicle's :func:`main`."""
    root = str(Path(__file__).resolve().parent.parent)
    return (f"#!{sys.executable}\n{_MARK}: mount(8)'s helper for type {FS_TYPE},\n"
            f"# running Chronicle from {root}. Run that command again after moving it.\n"
            f"import sys\nsys.path.insert(0, {root!r})\n"
            "from chronicle.mount_helper import main\nsys.exit(main())\n")


def install(directory: Path = HELPER_DIR, *, force: bool = False) -> Path:
    """Write ``DIRECTORY/mount.fuse.chronicle`` (mode 0755, replaced
    atomically) and return its path. Raises :class:`~chronicle.errors.Exists`
    if a file there was not written by this function (unless ``force``),
    ``OSError`` if the directory cannot be written (not root)."""
    from chronicle.errors import Exists

    path = Path(directory) / PROG
    try:
        current = path.read_text(errors="replace")
    except FileNotFoundError:
        current = None
    if current is not None and _MARK not in current and not force:
        raise Exists(f"{path} exists and was not written by chronicle install-mount-helper (--force replaces it)")
    tmp = path.with_name(f".{PROG}.{os.getpid()}")
    tmp.write_text(helper_script())
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def uninstall(directory: Path = HELPER_DIR) -> Path | None:
    """Remove the helper :func:`install` wrote; its path, or None if there was none of ours."""
    path = Path(directory) / PROG
    try:
        if _MARK not in path.read_text(errors="replace"):
            return None
    except FileNotFoundError:
        return None
    path.unlink()
    return path


if __name__ == "__main__":
    sys.exit(main())
