"""The runner's host seam (no mount, no worker): ``agent_runtime.runner`` needs
only :class:`RunnerHost`, which :class:`Runtime` provides, and never imports
the runtime back."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import get_type_hints

import agent_runtime.runner as runner_module
from agent_runtime.runner import RunnerHost
from agent_runtime.runtime import Runtime


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (type-checking blocks too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_runner_never_imports_the_runtime():
    assert "agent_runtime.runtime" not in imported_modules(Path(runner_module.__file__))


def test_the_runtime_is_a_runner_host(tmp_path):
    members = {name for name, _ in inspect.getmembers(RunnerHost) if not name.startswith("_")}
    members |= set(get_type_hints(RunnerHost))
    assert members >= {"store", "turn_log", "idle_timeout", "start_timeout", "cancel_grace", "snapshot_every",
                       "workspace_mount", "worker_log", "spawn_worker", "runner_finished"}
    rt = Runtime(tmp_path / "store")
    try:
        missing = [name for name in members if not hasattr(rt, name)]
        assert missing == []
        for name in members:
            if inspect.isfunction(getattr(RunnerHost, name, None)):
                expected = list(inspect.signature(getattr(RunnerHost, name)).parameters)[1:]
                assert list(inspect.signature(getattr(rt, name)).parameters) == expected, name
    finally:
        rt.store.close()


def test_the_runner_calls_no_private_method_of_its_host():
    source = Path(runner_module.__file__).read_text()
    calls = {node.attr for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
             and node.value.attr == "host"}
    assert calls and not [name for name in calls if name.startswith("_")]
