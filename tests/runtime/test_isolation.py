"""Isolated agents (SPEC §5, last bullet; issue 8 point 7): real mounts, real isolated workers, as root.

Two agents run a shell agent whose messages list commands; each escape attempt
from one of them fails — the other agent's workspace (absolute and relative),
the store's files, ``/proc/<other worker>/root``, ``/etc/shadow`` — while
``git``, ``sed``, ``python`` and ``pip install`` of a local wheel work in its
own workspace. Cleanup: the runtime is closed, then every mount under the
store is unmounted (by path) and every worker still alive is killed by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import zipfile
from pathlib import Path

import pytest

from chronicle.errors import AgentError
from agent_runtime import Runtime
from agent_runtime import isolation
from agent_runtime.isolation import AGENT_UID

try:
    from .. import mounts
except ImportError:
    import mounts

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root (tested as root in CI)")]

SHELL = '''
import json, subprocess
from agent_runtime import BaseAgent, DeltaState

class Shell(BaseAgent):
    class State(DeltaState):
        _entity_type = "shell"
        n: int = 0

    async def on_message(self, ctx, message):
        ctx.state.n += 1
        out = []
        for cmd in message.get("cmds", []):
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            out.append({"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()})
        msg = await ctx.send_message("")
        await msg.stream_token(json.dumps(out), final=True)
'''

# Each probe prints one word: what happened when the agent tried.
PROBE = textwrap.dedent('''
    import os, sys
    path, mode = sys.argv[1], sys.argv[2]
    try:
        if mode == "w":
            open(path, "a").close()
        elif mode == "ls":
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        print("OPEN")
    except FileNotFoundError:
        print("ENOENT")
    except PermissionError:
        print("EACCES")
    except OSError as exc:
        print(type(exc).__name__)
''')


def wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (PEP 427) of ``chronohello 1.0``."""
    path = directory / "chronohello-1.0-py3-none-any.whl"
    files = {"chronohello.py": "GREETING = 'hello from a wheel'\n",
             "chronohello-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: chronohello\nVersion: 1.0\n",
             "chronohello-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "chronohello-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("chronohello-1.0.dist-info/RECORD", record)
    return path


class Env:
    def __init__(self, tmp_path: Path):
        self.store = tmp_path / "store"
        self.src = tmp_path / "src"
        self.src.mkdir()
        (self.src / "shell.py").write_text(SHELL)
        (self.src / "probe.py").write_text(PROBE)
        self.worker_pids: list[int] = []

    def run(self, program, **kwargs):
        async def main():
            kwargs.setdefault("isolation", True)
            rt = Runtime(self.store, **kwargs)
            try:
                return await program(rt)
            finally:
                for agent in rt.list_agents():
                    if agent["worker_pid"]:
                        self.worker_pids.append(agent["worker_pid"])
                await asyncio.wait_for(rt.close(), 120)
        return asyncio.run(main())

    def cleanup(self) -> list[str]:
        return mounts.stop_workers(self.worker_pids, self.store)


@pytest.fixture
def env(tmp_path):
    reason = mounts.fuse_unavailable_reason()
    if reason:
        pytest.fail(f"this test needs FUSE and cannot get it: {reason}")
    e = Env(tmp_path)
    yield e
    assert e.cleanup() == []


async def shell(rt: Runtime, agent: str, *cmds: str) -> list[dict]:
    result = await rt.ask(agent, {"cmds": list(cmds)}, timeout=120)
    assert result["status"] == "completed", result
    return json.loads(result["reply"])


def test_two_isolated_agents_cannot_reach_each_other_or_the_store(env):
    async def program(rt):
        for name in ("a", "b"):
            await rt.create(name, "shell:Shell", cwd=env.src)
        ws_a, ws_b = rt.mountpoint("a"), rt.mountpoint("b")
        (ws_b / "secret.txt").write_text("b's")                  # as root, through b's mount
        os.chown(ws_b / "secret.txt", AGENT_UID, AGENT_UID)
        b_pid = rt.worker_pid("b")
        daemon_b = rt.store.mount_info("b")["pid"]
        probe = f"python {env.src}/probe.py"
        out = await shell(
            rt, "a",
            "id -u; id -g; id -G",
            "grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd):' /proc/self/status",
            f"{probe} {ws_b}/secret.txt r", f"{probe} {ws_b}/new.txt w", f"{probe} {ws_b} ls",
            f"{probe} ../b/workspace/secret.txt r", f"{probe} ../../agents/b/workspace ls",
            f"{probe} {env.store}/meta/data.mdb r", f"{probe} {env.store}/packs ls",
            f"{probe} {env.store}/run ls",
            f"{probe} /proc/{b_pid}/root ls", f"{probe} /proc/{daemon_b}/root ls",
            f"{probe} /proc/{os.getpid()}/root ls",
            f"{probe} /etc/shadow r", f"{probe} .chronicle/ctl w", f"{probe} .chronicle/ctl r",
            "grep -c ' - fuse.chronicle' /proc/self/mountinfo",
            "grep ' - fuse.chronicle' /proc/self/mountinfo | cut -d' ' -f5",
            f"kill -0 {b_pid}",
        )
        words = [o["out"] for o in out]
        assert words[0].split() == [str(AGENT_UID), str(AGENT_UID), str(AGENT_UID)]
        status = dict(line.split(":\t") for line in words[1].splitlines())
        assert status == {"NoNewPrivs": "1", "CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16}
        assert words[2:13] == ["ENOENT"] * 11, out        # b, the store, other processes: not there at all
        assert words[13] == "EACCES"                        # /etc/shadow: the uid may not
        assert words[14:16] == ["EACCES", "EACCES"]         # its ctl: the runtime's, not the agent's
        assert words[16:18] == ["1", str(ws_a)]             # its own workspace: the only Chronicle mount
        assert out[18]["rc"] != 0                           # b's worker cannot be signalled
        assert (ws_b / "secret.txt").read_text() == "b's" and not (ws_b / "new.txt").exists()
        # Outside the namespaces, the kernel's ptrace check refuses another uid /proc/PID/root
        # of the worker itself (unshare -> process 1 of its namespace -> the worker).
        a_pid = rt.worker_pid("a")
        for _ in range(2):
            a_pid = int(Path(f"/proc/{a_pid}/task/{a_pid}/children").read_text().split()[0])
        assert os.stat(f"/proc/{a_pid}").st_uid == AGENT_UID
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", f"/proc/{a_pid}/root/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode != 0 and b"Permission denied" in err
    env.run(program)


def test_git_sed_python_and_pip_work_in_the_workspace(env):
    async def program(rt):
        await rt.create("w", "shell:Shell", cwd=env.src)
        ws = rt.mountpoint("w")
        whl = wheel(ws)                                           # written as root: readable by the agent
        out = await shell(
            rt, "w",
            "git init -q repo && cd repo && printf 'one\\ntwo\\n' > f.txt && git add f.txt"
            " && git -c user.name=a -c user.email=a@b commit -qm first && git log --oneline | wc -l",
            "sed -i 's/two/TWO/' repo/f.txt && cat repo/f.txt | tail -1",
            "python -c 'import sys; print(sys.version_info[0])'",
            f"python -m pip install -q --no-index --disable-pip-version-check --target lib {whl.name}"
            " && python -c 'import sys; sys.path.insert(0, \"lib\"); import chronohello; print(chronohello.GREETING)'",
            "echo private > /tmp/x && cat /tmp/x && ls -ld $HOME | cut -c1-10",
        )
        assert [o["rc"] for o in out] == [0] * 5, out
        assert [o["out"] for o in out] == ["1", "TWO", "3", "hello from a wheel", "private\ndrwxrwxrwt"]
        assert (ws / "repo" / "f.txt").read_text() == "one\nTWO\n"
        assert (ws / "lib" / "chronohello.py").exists()
        assert (ws / "repo" / "f.txt").stat().st_uid == AGENT_UID
        assert os.stat(ws).st_uid == AGENT_UID
        files = [f["path"] for f in rt.show_turn("w", 1)["files"]]
        assert "repo/f.txt" in files and "lib/chronohello.py" in files
    env.run(program)


def test_a_fork_writes_its_inherited_files_and_a_plain_agent_is_adopted(env):
    async def program(rt):
        await rt.create("p", "shell:Shell", cwd=env.src)
        await shell(rt, "p", "mkdir d && echo one > d/f.txt")
        t1 = rt.turns("p")[-1]["turn"]
        await rt.fork("p", "q", at=t1)
        out = await shell(rt, "q", "echo two >> d/f.txt && cat d/f.txt && rm d/f.txt && ls d | wc -l")
        assert out[0]["rc"] == 0 and out[0]["out"] == "one\ntwo\n0", out
    env.run(program)

    async def plain(rt):                       # created without isolation: root's files
        await rt.create("r", "shell:Shell", cwd=env.src)
        await shell(rt, "r", "mkdir d && echo one > d/f.txt && id -u")
    env.run(plain, isolation=False)

    async def later(rt):
        out = await shell(rt, "r", "echo two >> d/f.txt && cat d/f.txt && id -u")
        assert out[0]["out"] == f"one\ntwo\n{AGENT_UID}", out
        assert os.stat(rt.mountpoint("r") / "d" / "f.txt").st_uid == AGENT_UID
    env.run(later)


def test_isolation_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(isolation, "_checked", {})
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(AgentError, match=r"isolation is not available: it needs root .*--no-isolation"):
        isolation.check()


def test_the_no_isolation_switches(monkeypatch, tmp_path):
    monkeypatch.delenv(isolation.NO_ISOLATION_ENV, raising=False)
    assert isolation.isolation_default() is True
    monkeypatch.setenv(isolation.NO_ISOLATION_ENV, "1")
    assert isolation.isolation_default() is False
    monkeypatch.setenv(isolation.NO_ISOLATION_ENV, "0")
    assert isolation.isolation_default() is True


def test_kill_9_of_an_isolated_worker_ends_everything_it_started(env):
    marker = "3141.5926"

    def leftovers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    async def program(rt):
        await rt.create("k", "shell:Shell", cwd=env.src)
        reply = await rt.send("k", {"cmds": [f"setsid sleep {marker} > /dev/null 2>&1 < /dev/null &", "sleep 60"]})
        while not leftovers():                                        # a daemon outside its process group
            await asyncio.sleep(0.05)
        pid = rt.worker_pid("k")
        os.kill(pid, signal.SIGKILL)                                  # the unshare holding its namespaces
        assert (await reply.result(30))["status"] == "interrupted"
        for _ in range(100):
            if not leftovers():
                break
            await asyncio.sleep(0.05)
        assert leftovers() == []                                      # its PID namespace went with it
        out = await shell(rt, "k", "id -u")                           # and it comes back, isolated
        assert out[0]["out"] == str(AGENT_UID) and rt.worker_pid("k") != pid
        assert rt.state("k")["n"] == 1
    env.run(program)
