"""The worker: one agent in its own process (``python -m agent_runtime.worker``).

Started by the coordinator with ``--fd N --agent ID --target MODULE:CLASS``
in the agent's directory (where its module is importable from), it imports
the class and speaks :mod:`agent_runtime.protocol` on fd N: ``loaded``, then
on ``start`` it loads the state and changes its current directory to the
workspace, then serves ``run``/``cancel``/``load``/``exit`` until ``exit`` or
EOF. Its environment is the runtime's allowlist (``agent_runtime.process.
WORKER_ENV``); ``start`` adds the variables its class asks for
(``BaseAgent.worker_env``).

Turn semantics: before each run the worker holds ``committed``, the state
JSON as of the last completed turn. A run that returns drains the state's
patch, applies it to ``committed`` (``jsonpatch``, in place: O(patch), not
O(state)) and reports it; a run that raises or is cancelled resets the state
to ``committed`` (``DeltaState.reset_to``) and reports an empty patch. A
patch that does not apply would mean the recording is wrong: the worker
reports a fatal ``error`` and exits, and the coordinator restarts it from the
store.

Steps: ``ctx.step`` sends ``step`` and waits for ``stepped`` (the
coordinator recorded it through the workspace's ``ctl``). A ``run`` may carry
the ``steps`` an earlier attempt of the turn completed (their results are
returned, not recomputed) and ``init`` (a new worker re-running a turn calls
``on_init`` first, inside the turn).

Threads: one asyncio loop; the handler runs as a task beside the reader, so a
``cancel`` line reaches it while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import socket
import sys
import traceback
from typing import Any

import jsonpatch

from chronicle.errors import AgentError, ChronicleError, StateError, UsageError

from agent_runtime.agent import AgentContext, BaseAgent, RetryPolicy, TurnSuspended
from agent_runtime.loader import load_agent_class
from agent_runtime.protocol import Channel

log = logging.getLogger("agent_runtime.worker")

HOOKS = {"message": "on_message", "wake": "on_wake", "init": "on_init", "idle": "on_idle_timeout",
         "shutdown": "on_shutdown"}


class _ChannelSink:
    def __init__(self, worker: Worker):
        self.worker = worker

    async def message(self, message: int) -> None:
        await self.worker.channel.send({"ev": "message", "turn": self.worker.ctx.turn, "message": message})

    async def token(self, message: int, token: str, final: bool) -> None:
        await self.worker.channel.send({"ev": "token", "turn": self.worker.ctx.turn, "message": message,
                                        "token": token, "final": final})

    async def step(self, name: str, result: Any) -> int | None:
        worker = self.worker
        waiter = worker.step_waiter = asyncio.get_running_loop().create_future()
        try:
            await worker.channel.send({"ev": "step", "turn": worker.ctx.turn, "name": name, "result": result})
            answer = await waiter
        finally:
            worker.step_waiter = None
        if answer.get("error"):
            raise UsageError(f"step {name!r} could not be recorded: {answer['error']}")
        return answer.get("seq")

    def notify(self, event: dict) -> None:
        self.worker.channel.send_nowait({**event, "turn": self.worker.ctx.turn})


class Worker:
    def __init__(self, channel: Channel, agent_id: str, cls: type[BaseAgent]):
        self.channel = channel
        self.agent_id = agent_id
        self.cls = cls
        self.agent = cls()
        self.ctx: AgentContext | None = None
        self.committed: dict | None = None
        self.task: asyncio.Task | None = None
        self.task_turn: int | None = None
        self.task_kind: str | None = None
        self.step_waiter: asyncio.Future | None = None

    # -- commands ------------------------------------------------------------------------

    async def serve(self) -> int:
        while True:
            command = await self.channel.receive()
            if command is None or command.get("op") == "exit":
                await self._stop_task()
                return 0
            op = command.get("op")
            try:
                if op == "start":
                    await self.start(command)
                elif op == "run":
                    if self.task is not None and not self.task.done():
                        raise AgentError("a run arrived while another was running")
                    self.task_turn, self.task_kind = command.get("turn"), command.get("kind")
                    self.task = asyncio.create_task(self.run(command))
                elif op == "cancel":
                    if self.task is not None and not self.task.done() and self.task_turn == command.get("turn"):
                        self.task.cancel()
                elif op == "stepped":
                    if self.step_waiter is not None and not self.step_waiter.done():
                        self.step_waiter.set_result(command)
                elif op == "load":
                    await self.load(command)
                elif op == "quota":
                    if self.ctx is not None and isinstance(command.get("until"), (int, float)):
                        key = str(command.get("key"))
                        self.ctx._quota[key] = max(command["until"], self.ctx._quota.get(key, 0.0))
                elif op == "wakeup":
                    if self.ctx is not None:
                        self.ctx._woken(command.get("event") or {})
                else:
                    raise AgentError(f"unknown op {op!r}")
            except ChronicleError as exc:
                await self.fatal(exc)
                return 2

    async def start(self, command: dict) -> None:
        version = command.get("version")
        state = self.cls.State.from_json(command["state"], version)
        workspace = command["workspace"]
        for name, value in (command.get("env") or {}).items():     # the class's worker_env
            os.environ[name] = value
        os.environ["AGENT_WORKSPACE"] = workspace
        os.chdir(workspace)
        self.ctx = AgentContext(self.agent_id, workspace, state, _ChannelSink(self))
        self.committed = state.to_json()
        migrated = version is not None and version < self.cls.State._version
        await self.channel.send({"ev": "started", "version": self.cls.State._version,
                                 "migrated_from": version if migrated else None,
                                 "state": self.committed if migrated else None})

    async def load(self, command: dict) -> None:
        assert self.ctx is not None
        fresh = self.cls.State.from_json(command["state"], command.get("version"))
        self.ctx.state.reset_to(fresh.to_json())
        self.committed = self.ctx.state.to_json()
        await self.channel.send({"ev": "state", "version": self.cls.State._version, "state": self.committed})

    async def fatal(self, exc: BaseException) -> None:
        log.error("fatal: %s", exc)
        try:
            await self.channel.send({"ev": "error", "kind": type(exc).__name__, "error": str(exc)})
        except (ConnectionError, OSError):
            pass

    async def _stop_task(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except BaseException:
                pass

    # -- turns ---------------------------------------------------------------------------

    async def run(self, command: dict) -> None:
        ctx = self.ctx
        assert ctx is not None and self.committed is not None
        kind = command.get("kind", "message")
        turn = command.get("turn")
        ctx._begin(turn, command.get("message_id"), command.get("steps"))
        status, error, result, retry = "completed", None, None, False
        try:
            if command.get("init"):             # a re-run on a new worker: on_init first, in the same turn
                outcome = self.agent.on_init(ctx)
                if inspect.isawaitable(outcome):
                    await outcome
            hook = getattr(self.agent, HOOKS[kind])
            outcome = hook(ctx, command.get("message")) if kind in ("message", "wake") else hook(ctx)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if kind == "idle":
                result = bool(outcome)
        except TurnSuspended:
            pass                            # ctx.sleep / pause: the turn ends here, completed
        except asyncio.CancelledError:
            status = "cancelled"
        except BaseException as exc:        # SystemExit too: the agent keeps serving
            status = "failed"
            retry = isinstance(exc, Exception) and self.cls.retry_policy.retries(exc)
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log.error("turn %s (%s) failed:\n%s", turn, kind, traceback.format_exc().rstrip())
        finally:
            messages = [m.text for m in ctx.messages]
            usage = ctx.usage
            suspend, compaction = ctx._suspend, ctx._compaction
            ctx._end()
        patch: list = []
        if status == "completed":
            patch = ctx.state.drain_patch()
            text = json.dumps(patch)            # before applying: the patch's values join `committed`
            try:
                jsonpatch.apply_patch(self.committed, patch, in_place=True)
            except Exception as exc:
                await self.fatal(StateError(f"turn {turn}: the recorded patch does not apply: {exc}"))
                os._exit(3)
            patch = json.loads(text)
        else:
            ctx.state.reset_to(self.committed)
        done: dict[str, Any] = {"ev": "done", "turn": turn, "status": status, "patch": patch,
                                "messages": messages, "usage": usage, "error": error, "result": result,
                                "retry": retry}
        if status == "completed" and suspend is not None:
            done["suspend"] = suspend
        if status == "completed" and compaction is not None:
            done["compaction"] = compaction
        if command.get("snapshot") or "compaction" in done:
            done["state"] = self.committed          # the state after the run, whatever its status
        await self.channel.send(done)


async def _main(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.fd)
    channel = await Channel.open(sock)
    try:
        try:
            cls = load_agent_class(args.target, os.getcwd())
            worker = Worker(channel, args.agent, cls)
        except ChronicleError as exc:
            await channel.send({"ev": "error", "kind": type(exc).__name__, "error": str(exc)})
            return 2
        except Exception as exc:
            await channel.send({"ev": "error", "kind": "AgentLoadError",
                                "error": f"bad agent class {args.target!r}: {type(exc).__name__}: {exc}"})
            return 2
        try:
            defaults = cls.State().to_json()
        except StateError:
            defaults = None
        policy = cls.retry_policy if isinstance(cls.retry_policy, RetryPolicy) else RetryPolicy()
        names = cls.worker_env
        if isinstance(names, str) or not isinstance(names, (tuple, list)) \
                or not all(isinstance(n, str) and n and "=" not in n and "\x00" not in n for n in names):
            await channel.send({"ev": "error", "kind": "AgentLoadError",
                                "error": f"bad agent class {args.target!r}: worker_env must be a tuple of "
                                         f"environment variable names, not {names!r}"})
            return 2
        await channel.send({"ev": "loaded", "pid": os.getpid(), "entity_type": cls.State._entity_type,
                            "version": cls.State._version, "defaults": defaults,
                            "atomic_turns": bool(cls.atomic_turns), "retry": policy.to_json(),
                            "quota_keys": [str(k) for k in cls.quota_keys or ()], "env": list(names),
                            "track_reads": bool(getattr(cls, "track_reads", True))})
        return await worker.serve()
    except (ConnectionError, BrokenPipeError):
        return 0
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_runtime.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--target", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker[{args.agent}]: %(message)s")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
