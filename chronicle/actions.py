"""The changes the CLI and the web timeline make, in one place: restore a file, take a snapshot, roll back or fork an agent.

``chronicle restore``/``snapshot``/``agent rollback``/``agent fork`` and the
web timeline's confirmed actions (``chronicle.ui``) call these functions, so
both front ends take the same path:

- a workspace that is mounted is changed through its mount's ``ctl`` file
  (the daemon is its only writer, and the mount shows the change at once);
  one that is not is opened for writing here (its writer lock is taken for
  the one change and given back);
- an agent that a ``chronicle agent serve`` runs is rolled back through that
  coordinator; otherwise a :class:`~agent_runtime.runtime.Runtime` in this
  process does it (it starts the agent's worker and mounts its workspace for
  as long as the rollback takes). A fork needs no running agent.

Errors are :class:`~chronicle.errors.ChronicleError`\\ s, as the store, the
control channel and the runtime raise them (``NotFound``, ``StoreLocked``,
``Exists``, ``AgentNotFound``, ...).

Threads: the plain functions block (LMDB, the control file, HTTP to a
coordinator); the ``async`` ones belong to the caller's asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chronicle import control
from chronicle.store.model import Actor
from chronicle.store.namespace.restore import restore_file
from chronicle.store.store import Store

from agent_runtime.client import ServeClient
from agent_runtime.runtime import Runtime


@dataclass(frozen=True)
class Restored:
    """What a file restore did: ``seq`` of its event (None: nothing changed)."""

    seq: int | None


def actor() -> Actor:
    """This process as the actor of a change (uid, gid, pid)."""
    return Actor(os.getuid(), os.getgid(), os.getpid())


def restore_version(store: Store, workspace: str, path: bytes, number: int) -> Restored:
    """Bring file ``path`` (bytes, relative to the workspace root) of
    ``workspace`` back to its version ``number``, as a new event. Raises
    :class:`NotFound` (no such path or version), :class:`StoreLocked`."""
    mounted = store.mount_info(workspace)
    if mounted is not None:
        reply = control.send(mounted["mountpoint"], {"cmd": "restore", "path": os.fsdecode(path), "version": number})
        return Restored(reply.get("seq") if reply.get("changed", True) else None)
    ws = store.open_workspace(workspace, writable=True)
    try:
        return Restored(restore_file(ws, path, number, actor()).seq)
    finally:
        store.release_workspace(ws)


def take_snapshot(store: Store, workspace: str, name: str) -> int | None:
    """Name the current head seq of ``workspace`` ``name``; returns that seq
    (None if a mount did not say). Raises :class:`Exists`,
    :class:`InvalidArgument` (a name that reads as another point), :class:`StoreLocked`."""
    mounted = store.mount_info(workspace)
    if mounted is not None:
        return control.send(mounted["mountpoint"], {"cmd": "snapshot", "name": name}).get("seq")
    ws = store.open_workspace(workspace, writable=True)
    try:
        return ws.snapshot(name)
    finally:
        store.release_workspace(ws)


def coordinator(store_path: Path) -> ServeClient | None:
    """A client of the ``chronicle agent serve`` serving the store, if one runs."""
    return ServeClient.for_store(store_path)


async def rollback_agent(store_path: Path, agent: str, to: int, **runtime_options: Any) -> dict:
    """Roll agent ``agent`` back to the end of its turn ``to`` (a new turn);
    returns the new turn record. Through the store's coordinator if one runs
    (its blocking HTTP call runs in a thread), else a :class:`Runtime` of
    ``runtime_options`` in this process, closed afterwards."""
    client = await asyncio.to_thread(coordinator, store_path)
    if client is not None:
        return await asyncio.to_thread(client.rollback, agent, to)
    rt = Runtime(store_path, create_store=False, **runtime_options)
    try:
        return await rt.rollback(agent, to)
    finally:
        await rt.close()


async def fork_agent(store_path: Path, agent: str, new: str, at: int | None, **runtime_options: Any) -> dict:
    """Fork agent ``agent`` at the end of its turn ``at`` (default: its last
    ended turn) as a new agent ``new``; returns the new agent's record."""
    rt = Runtime(store_path, create_store=False, **runtime_options)
    try:
        return await rt.fork(agent, new, at)
    finally:
        await rt.close()


__all__ = ["Restored", "actor", "coordinator", "fork_agent", "restore_version", "rollback_agent",
           "take_snapshot"]
