"""The ``chronicle`` command line (SPEC §2): parse, call the store, print.

Store selection: ``--store`` / ``--workspace`` if given; otherwise the mount
that a PATH argument (or the current directory) lies in (``chronicle.locate``);
otherwise ``$CHRONICLE_HOME/store`` and workspace ``default``. PATH arguments
are relative to the workspace root, or to the current directory inside a mount.

Read commands open the store without taking a workspace's writer lock, so they
work while a daemon has it mounted. Commands that change a mounted workspace
(``restore``, ``snapshot``) go through the mount's ``ctl`` file, so the daemon
(its only writer) applies them and the mount shows them at once.

Errors: a :class:`ChronicleError` is one line ``chronicle: error: ...`` and its
``exit_code``; bad arguments are click usage errors (exit 2); anything else is
one line ``chronicle: internal error: ...`` and exit 1 (a traceback only with
``--debug`` or ``CHRONICLE_DEBUG=1``).

Layout: :mod:`~chronicle.cli.app` holds the group, its error handling and the
shared options and printing helpers; the commands are in
:mod:`~chronicle.cli.mounts` (init, mount, umount, workspaces, ui),
:mod:`~chronicle.cli.history` (log, show/cat, diff, blame, grep, hash),
:mod:`~chronicle.cli.points` (receipt, restore, snapshot, snapshots, fork) and
:mod:`~chronicle.cli.store_cmds` (policy, gc, fsck, stats) and
:mod:`~chronicle.cli.doctor` (doctor: an S3 endpoint's conformance), each registering
on :data:`cli` when imported; ``chronicle agent ...`` is
:mod:`chronicle.agent_cli`. Public surface: :data:`cli` and :func:`main`.
"""

from __future__ import annotations

from chronicle.agent_cli import agent
from chronicle.cli import doctor, history, mounts, points, store_cmds
from chronicle.cli.app import cli

__all__ = ["cli", "main"]
_COMMANDS = (doctor, history, mounts, points, store_cmds)      # imported for their commands, registered on cli

cli.add_command(agent)


def main() -> None:
    cli(prog_name="chronicle")
