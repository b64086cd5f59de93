"""The adapter's MutationGate and worker-thread jobs, driven without a mount.

A job (``ChronicleOperations.run_exclusive``) runs in a worker thread while
the workspace is locked against mutation: mutations wait for it, a job waits
for mutations in flight, and lookups and stats are answered meanwhile from
the committed tree, their path links recorded once the job is done.
"""

from __future__ import annotations

import os
import stat
import threading
from types import SimpleNamespace

import pyfuse3
import trio

from chronicle.fs.gate import MutationGate
from chronicle.store.model import Actor
from chronicle.store.namespace.restore import restore_tree

ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=4242, umask=0o022)
FILE = stat.S_IFREG | 0o644



def blocked_job(started: threading.Event, release: threading.Event):
    def job() -> str:
        started.set()
        assert release.wait(30)
        return "done"
    return job


def test_reads_answer_and_mutations_wait_while_a_job_runs(fs):
    order: list[str] = []

    async def main():
        d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
        fs.ws.forget(d.st_ino)                        # no cached link: a lookup must record it
        started, release = threading.Event(), threading.Event()
        async with trio.open_nursery() as nursery:
            async def run_job():
                order.append(await fs.run_exclusive(blocked_job(started, release)))
            nursery.start_soon(run_job)
            await trio.to_thread.run_sync(started.wait)
            assert fs.gate.exclusive

            async def mutate():
                await fs.mkdir(ROOT, b"e", 0o755, CTX)
                order.append("mkdir")
            nursery.start_soon(mutate)
            await trio.sleep(0.05)
            assert order == []                          # the mutation waits at the gate
            entry = await fs.lookup(ROOT, b"d", CTX)    # reads are answered meanwhile
            assert entry.st_ino == d.st_ino and stat.S_ISDIR(entry.st_mode)
            assert (await fs.getattr(ROOT, CTX)).st_ino == ROOT
            assert fs.ws.links.path_of(d.st_ino) is None      # not recorded while the job owns the caches
            release.set()
        assert order == ["done", "mkdir"]
        assert fs.ws.links.path_of(d.st_ino) == b"d"          # recorded after the job
        assert not fs.gate.exclusive

    trio.run(main)


def test_a_job_waits_for_the_mutations_in_flight():
    gate = MutationGate()
    order: list[str] = []

    async def main():
        finish = trio.Event()

        async def mutation():
            async with gate.mutation():
                order.append("mutation starts")
                await finish.wait()
                order.append("mutation ends")

        async def job():
            async with gate.hold():
                order.append("job")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mutation)
            await trio.sleep(0.01)
            nursery.start_soon(job)
            await trio.sleep(0.01)
            assert order == ["mutation starts"]
            finish.set()
        assert order == ["mutation starts", "mutation ends", "job"]

    trio.run(main)


def test_restore_tree_runs_as_a_job_and_the_tree_is_restored(fs):
    actor = Actor(CTX.uid, CTX.gid, CTX.pid)

    async def main():
        keep = fs.ws.snapshot("before")
        for i in range(50):
            info, entry = await fs.create(ROOT, b"f%02d" % i, FILE, os.O_WRONLY, CTX)
            await fs.write(info.fh, 0, b"x" * i)
            await fs.release(info.fh)
        changes = await fs.run_exclusive(restore_tree, fs.ws, keep, actor)
        assert changes.paths == 50
        assert fs.ws.readdir(fs.ws.root) == []
        assert await fs.lookup(ROOT, b"f01", CTX) is not None   # a negative entry (st_ino 0)
        assert (await fs.lookup(ROOT, b"f01", CTX)).st_ino == 0

    trio.run(main)
