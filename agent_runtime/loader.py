"""``MODULE:CLASS`` targets: checking them (coordinator) and importing them (worker).

``MODULE`` is a dotted module name importable from the agent's directory (the
current directory when the agent was created) or a path to a ``.py`` file
(relative to that directory, or absolute). ``CLASS`` names a
:class:`~agent_runtime.agent.BaseAgent` subclass in it (``Outer.Inner`` for a
nested one).

Errors: :class:`~chronicle.errors.AgentLoadError` with a message that says
which part is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path

from chronicle.errors import AgentLoadError

from agent_runtime.agent import BaseAgent
from agent_runtime.delta_state import DeltaState

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_target(target: str) -> tuple[str, str]:
    """``(module, class path)`` of ``MODULE:CLASS``. Raises :class:`AgentLoadError`."""
    if not isinstance(target, str) or target.count(":") < 1:
        raise AgentLoadError(f"bad agent class {target!r}: expected MODULE:CLASS, e.g. my_agent:MyAgent "
                             "or path/to/agent.py:MyAgent")
    module, _, name = target.rpartition(":")
    if not module:
        raise AgentLoadError(f"bad agent class {target!r}: the module part before ':' is empty")
    if not _DOTTED.match(name):
        raise AgentLoadError(f"bad agent class {target!r}: {name!r} is not a class name")
    if not module.endswith(".py") and not _DOTTED.match(module):
        raise AgentLoadError(f"bad agent class {target!r}: {module!r} is neither a dotted module name "
                             "nor a path to a .py file")
    return module, name


def normalise_target(target: str, cwd: str | os.PathLike) -> str:
    """``target`` with a ``.py`` path made absolute (against ``cwd``); checks the
    syntax and that the file exists. Raises :class:`AgentLoadError`."""
    module, name = parse_target(target)
    if module.endswith(".py"):
        path = Path(cwd, module).resolve()
        if not path.is_file():
            raise AgentLoadError(f"bad agent class {target!r}: no file {path}")
        module = str(path)
    return f"{module}:{name}"


def load_agent_class(target: str, cwd: str | os.PathLike) -> type[BaseAgent]:
    """Import ``target`` with ``cwd`` first on ``sys.path``. Raises :class:`AgentLoadError`."""
    module_name, name = parse_target(target)
    cwd = os.fspath(cwd)
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            path = Path(cwd, module_name).resolve()
            if not path.is_file():
                raise AgentLoadError(f"bad agent class {target!r}: no file {path}")
            sys.path.insert(0, str(path.parent))        # its sibling modules import as usual
            spec = importlib.util.spec_from_file_location(f"_chronicle_agent_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise AgentLoadError(f"bad agent class {target!r}: cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except AgentLoadError:
        raise
    except ModuleNotFoundError as exc:
        raise AgentLoadError(f"bad agent class {target!r}: cannot import {module_name!r} from {cwd}: "
                             f"{exc}") from None
    except BaseException as exc:   # anything the module's code raises while importing
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
        raise AgentLoadError(f"bad agent class {target!r}: importing {module_name!r} failed: "
                             f"{type(exc).__name__}: {exc}{where}") from None
    obj = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AgentLoadError(f"bad agent class {target!r}: {module_name!r} has no {name!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseAgent)):
        raise AgentLoadError(f"bad agent class {target!r}: {name!r} is not a subclass of "
                             "agent_runtime.BaseAgent")
    state = getattr(obj, "State", None)
    if not (isinstance(state, type) and issubclass(state, DeltaState)):
        raise AgentLoadError(f"bad agent class {target!r}: {name}.State must be a DeltaState subclass")
    return obj


__all__ = ["load_agent_class", "normalise_target", "parse_target"]
