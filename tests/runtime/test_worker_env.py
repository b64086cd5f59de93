"""The worker's environment is an allowlist (issue 8: no credentials of the runtime leak into an agent).

Real mounts and worker processes (the ``env`` fixture of ``test_agent_runtime``).
The runtime's environment holds secrets (``AWS_SECRET_ACCESS_KEY``,
``GITHUB_TOKEN``); the agent reports what it sees at import time, in its
handler, and in a child process it starts: none of them, but the allowlist,
the names ``Runtime(worker_env=...)`` adds, and (from ``on_init`` on) those
its class asks for in ``worker_env``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chronicle.errors import AgentLoadError, UsageError
from agent_runtime import Runtime
from agent_runtime.process import worker_environment

try:
    from .test_agent_runtime import env   # noqa: F401  (the fixture)
except ImportError:
    from test_agent_runtime import env     # noqa: F401

AGENT = '''
import json, os, subprocess
from agent_runtime import BaseAgent

AT_IMPORT = sorted(os.environ)

class EnvAgent(BaseAgent):
    worker_env = ("MY_API_KEY", "NOT_SET_ANYWHERE")

    async def on_message(self, ctx, message):
        child = subprocess.run(["env", "-0"], capture_output=True, text=True, check=True).stdout
        seen = {"import": AT_IMPORT, "handler": dict(os.environ),
                "child": sorted(e.split("=", 1)[0] for e in child.split("\\0") if e)}
        msg = await ctx.send_message("")
        await msg.stream_token(json.dumps(seen), final=True)

class BadEnv(BaseAgent):
    worker_env = "MY_API_KEY"          # a string, not a tuple of names
'''

SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-secret", "GITHUB_TOKEN": "ghp_secret", "HTTPS_PROXY": "http://u:pw@proxy"}


@pytest.fixture
def secrets(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MY_API_KEY", "key-for-the-agent")
    monkeypatch.setenv("RUNTIME_EXTRA", "extra-for-every-worker")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")


def test_worker_sees_the_allowlist_and_what_is_asked_for_only(env, secrets):
    (env.src / "envagent.py").write_text(AGENT)

    async def program(rt):
        await rt.create("e", "envagent:EnvAgent", cwd=env.src)
        result = await rt.ask("e", {})
        assert result["status"] == "completed", result
        return json.loads(result["reply"])

    seen = env.run(program, worker_env=["RUNTIME_EXTRA"])
    handler = seen["handler"]
    for where in ("import", "handler", "child"):
        names = set(seen[where])
        assert not names & set(SECRETS), (where, sorted(names & set(SECRETS)))
        assert {"PATH", "LC_ALL", "AGENT_WORKSPACE", "AGENT_ID", "RUNTIME_EXTRA", "AGENT_TEST_TRACE"} <= names, where
    # The class's names: from on_init on (not while its module is imported), to its children too.
    assert "MY_API_KEY" not in seen["import"]
    assert handler["MY_API_KEY"] == "key-for-the-agent" and "MY_API_KEY" in seen["child"]
    assert "NOT_SET_ANYWHERE" not in handler
    assert handler["RUNTIME_EXTRA"] == "extra-for-every-worker"
    assert handler["AGENT_ID"] == "e"
    assert not any(v in json.dumps(seen) for v in SECRETS.values())


def test_bad_worker_env_is_a_clear_error(env):
    (env.src / "envagent.py").write_text(AGENT)
    with pytest.raises(UsageError, match="'A=B' is not an environment variable name"):
        Runtime(env.store, worker_env=["A=B"])

    async def program(rt):
        with pytest.raises(AgentLoadError, match="worker_env must be a tuple of environment variable names"):
            await rt.create("bad", "envagent:BadEnv", cwd=env.src)

    env.run(program)


def test_worker_environment_allowlist(monkeypatch):
    """The allowlist itself, without a worker: names in, everything else out."""
    environ = {"PATH": "/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_CTYPE": "C", "AWS_ACCESS_KEY_ID": "x",
               "OPENAI_API_KEY": "y", "SSH_AUTH_SOCK": "/tmp/agent", "PYTHONPATH": "/opt/lib",
               "CHRONICLE_AGENT_ENV": "OPENAI_API_KEY, MISSING"}
    env = worker_environment((), environ)
    assert set(env) == {"PATH", "HOME", "LANG", "LC_CTYPE", "PYTHONPATH", "OPENAI_API_KEY"}
    assert env["PYTHONPATH"].endswith("/opt/lib") and env["PYTHONPATH"] != "/opt/lib"
    assert "SSH_AUTH_SOCK" in worker_environment(["SSH_AUTH_SOCK"], environ)
    # The allowlist is what the worker of a real runtime gets (the CLI's too): checked in a subprocess.
    code = ("import os, json; from agent_runtime.process import worker_environment; "
            "print(json.dumps(sorted(worker_environment())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**environ, "PYTHONPATH": str(env["PYTHONPATH"].split(":")[0])}).stdout
    assert "AWS_ACCESS_KEY_ID" not in json.loads(out) and "OPENAI_API_KEY" in json.loads(out)
