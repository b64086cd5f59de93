"""An agent that keeps a to-do list and notes as files in its workspace.

Every turn changes files two ways, and Chronicle attributes all of it to the
turn (``chronicle agent show NAME N``, ``.chronicle/log``):

- ordinary Python file I/O (``open``/``write`` on relative paths: the worker's
  current directory is the workspace);
- child processes: ``sed -i`` ticks an item off, and ``git`` commits the
  workspace after every turn (the repository lives in the workspace too).

Messages (``{"text": ...}``; ``chronicle agent chat`` turns a plain line into one):

    todo: ITEM      add "- [ ] ITEM" to todo.md
    done: ITEM      tick it off with sed -i ("- [x] ITEM")
    anything else   append it to notes.md

Run it::

    printf 'todo: write the report\\ndone: write the report\\n' | \\
        chronicle agent chat examples/file_agent.py:FileAgent --id files
"""

from __future__ import annotations

import asyncio
import os
import subprocess

from agent_runtime import AgentContext, BaseAgent, DeltaState

GIT = ["git", "-c", "user.name=file-agent", "-c", "user.email=file-agent@localhost", "-c", "init.defaultBranch=main"]


def run(*argv: str) -> str:
    """Run a child process in the workspace (the current directory); its output, stripped."""
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return done.stdout.strip()


class FileAgent(BaseAgent):
    class State(DeltaState):
        _version = 1
        _entity_type = "file_agent"
        todo: list[str] = []          # open items
        done: list[str] = []          # ticked-off items
        notes: int = 0                # lines in notes.md
        commits: list[str] = []       # git commit ids, one per turn

    async def on_message(self, ctx: AgentContext, message: dict) -> None:
        text = str(message.get("text", "")).strip()
        kind, _, item = text.partition(":")
        kind, item = kind.strip().lower(), item.strip()
        if kind == "todo" and item:
            with open("todo.md", "a") as f:                       # ordinary file I/O
                f.write(f"- [ ] {item}\n")
            ctx.state.todo.append(item)
            said = f"added {item!r} to todo.md"
        elif kind == "done" and item in ctx.state.todo:
            with open("todo.md") as f:
                lines = f.read().splitlines()
            line = lines.index(f"- [ ] {item}") + 1
            await asyncio.to_thread(run, "sed", "-i", rf"{line}s/^- \[ \]/- [x]/", "todo.md")   # a child process
            ctx.state.todo.remove(item)
            ctx.state.done.append(item)
            said = f"ticked off {item!r} (line {line} of todo.md, with sed -i)"
        elif kind == "done":
            said = f"{item!r} is not on the to-do list"
        else:
            with open("notes.md", "a") as f:
                f.write(text + "\n")
            ctx.state.notes += 1
            said = f"noted in notes.md (line {ctx.state.notes})"
        commit = await asyncio.to_thread(self._commit, f"turn {ctx.turn}: {text}")
        if commit:
            ctx.state.commits.append(commit)
        msg = await ctx.send_message("")
        for word in f"{said}; {len(ctx.state.todo)} open, {len(ctx.state.done)} done".split(" "):
            await msg.stream_token(word + " ")
        await msg.stream_token(f"[git {commit[:7]}]" if commit else "[nothing to commit]", final=True)

    @staticmethod
    def _commit(subject: str) -> str | None:
        if not os.path.isdir(".git"):
            run(*GIT, "init", "-q")
        run(*GIT, "add", "-A")
        if not run(*GIT, "status", "--porcelain"):
            return None
        run(*GIT, "commit", "-q", "-m", subject)
        return run(*GIT, "rev-parse", "HEAD")
