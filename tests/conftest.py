"""Shared fixtures: real FUSE mounts of the test target (see ``mounts.py``).

All mount fixtures are opt-in; a test that asks for none of them mounts nothing.

- ``mount`` -- a fresh store mounted for this test alone (function scope).
- ``mount_factory`` -- start, kill -9 and restart mounts within one test::

      m = mount_factory()                  # fresh store
      m.kill()                             # kill -9 the daemon by PID (mount goes stale)
      m = mount_factory.restart(m)         # same store, workspace, mountpoint
      m = mount_factory.restart(m, clean_stale=False)  # the daemon must clean the stale mount

- ``session_mount`` / ``module_mount`` -- one daemon shared by all tests of the
  session / module (for expensive suites); use ``m.mkdtemp()`` for a fresh
  directory per test. Only the log lines written during a test count for it.
- ``session_mount_handle`` / ``module_mount_handle`` -- ``.get()`` the shared
  mount, restarting its daemon on the same store if it died (a test that
  keeps going after a crash, like the model test, uses these).
- ``daemon_log`` -- the per-test log guard: any WARNING/ERROR record (or
  uncaught traceback, or daemon death) fails the test, except what the test
  allows with ``daemon_log.expect(r"regex")`` or the marker
  ``@pytest.mark.daemon_log_expected(r"regex", ...)`` (no argument: allow all
  log records). ``daemon_log.records()`` gives the records for assertions.
- ``mount_target`` -- ``$CHRONICLE_TEST_TARGET``: ``chronicle`` (default),
  ``passthrough`` or ``plain``.

A test that needs FUSE and cannot get it fails (it is never skipped).
"""

from __future__ import annotations

import os
import time

import pytest

# The runtime's tests run agents as root without isolation (their agents write trace files the test
# reads, outside any view); tests/runtime/test_isolation.py asks for isolation explicitly.
os.environ.setdefault("CHRONICLE_NO_ISOLATION", "1")
# Workers inherit only an allowlist of the environment (agent_runtime.process.WORKER_ENV); the test
# agents' trace file is named in AGENT_TEST_TRACE, passed on by name.
os.environ.setdefault("CHRONICLE_AGENT_ENV", "AGENT_TEST_TRACE")

try:  # tests/ may become a package one day
    from . import mounts
except ImportError:
    import mounts

MOUNT_FIXTURES = frozenset({"mount", "mount_factory", "session_mount", "module_mount",
                            "session_mount_handle", "module_mount_handle"})


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "daemon_log_expected(*patterns): WARNING/ERROR records of the mount daemon matching "
        "these regexes (all, if none given) do not fail the test")


def pytest_collection_modifyitems(config, items):
    # Tests that mount get the `mount` marker, so `-m "not mount"` deselects them.
    for item in items:
        if MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mount)


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _or_fail(fn, *args, **kwargs):
    """``fn(...)``, with a ``MountError`` turned into a plain test failure (its message has the log)."""
    try:
        return fn(*args, **kwargs)
    except mounts.MountError as exc:
        message = str(exc)
    _fail(message)  # outside `except`: no "during handling of the above exception" noise


@pytest.fixture(scope="session")
def mount_target() -> str:
    return _or_fail(mounts.target_from_env)


@pytest.fixture
def daemon_log(request):
    """Fails the test at teardown with any unexpected daemon log problem."""
    allowed: list[str] = []
    allow_all = False
    for marker in request.node.iter_markers("daemon_log_expected"):
        if marker.args:
            allowed.extend(marker.args)
        else:
            allow_all = True
    guard = mounts.DaemonLogGuard(allowed, allow_all)
    yield guard
    problems = guard.problems()
    if problems:
        _fail("the mount daemon reported problems during this test:\n\n" + "\n\n".join(problems))


@pytest.fixture
def mount_factory(tmp_path, daemon_log, mount_target):
    """Starts mounts for this test (see the module docstring); cleans all up at teardown."""
    factory = mounts.MountFactory(tmp_path / "mounts", mount_target, guard=daemon_log)
    try:
        yield _FailingFactory(factory)
    finally:
        factory.close()


class _FailingFactory:
    """``MountFactory`` whose start errors are test failures with the daemon's log."""

    def __init__(self, factory: mounts.MountFactory):
        self._factory = factory

    def __call__(self, *args, **kwargs) -> mounts.Mount:
        return _or_fail(self._factory, *args, **kwargs)

    def restart(self, *args, **kwargs) -> mounts.Mount:
        return _or_fail(self._factory.restart, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._factory, name)


@pytest.fixture
def mount(mount_factory) -> mounts.Mount:
    """A fresh store mounted for this test; unmounted and checked at teardown."""
    return mount_factory()


def _shared(tmp_path_factory, target: str, name: str):
    shared = mounts.SharedMount(tmp_path_factory.mktemp(name), target)
    try:
        yield shared
    finally:
        problems = shared.close()
        if problems:
            _fail(f"the shared {name} daemon reported problems at unmount:\n\n" + "\n\n".join(problems))


@pytest.fixture(scope="session")
def _session_shared(tmp_path_factory, mount_target):
    yield from _shared(tmp_path_factory, mount_target, "session-mount")


@pytest.fixture(scope="module")
def _module_shared(tmp_path_factory, mount_target):
    yield from _shared(tmp_path_factory, mount_target, "module-mount")


class SharedMountHandle:
    """A shared mount as one test sees it.

    ``get()`` returns the running mount; if its daemon died (in this test or
    before), it is restarted on the same store and the death is reported to
    this test. Log lines count from when this test first got the mount.
    """

    def __init__(self, shared: mounts.SharedMount, guard: mounts.DaemonLogGuard):
        self._shared = shared
        self._guard = guard
        self._current: mounts.Mount | None = None
        self._since = time.monotonic()

    def get(self) -> mounts.Mount:
        mount, problems = _or_fail(self._shared.get)
        self._guard.add_problems(problems)
        if mount is not self._current:
            # A daemon started before this test: only the lines from now on are ours.
            ours = mount.started_at >= self._since
            self._guard.watch(mount, since=0 if ours else None, shared=True)
            self._current = mount
        return mount


@pytest.fixture
def session_mount_handle(_session_shared, daemon_log) -> SharedMountHandle:
    """For tests that must survive a daemon crash on the session mount (e.g. the model test)."""
    return SharedMountHandle(_session_shared, daemon_log)


@pytest.fixture
def module_mount_handle(_module_shared, daemon_log) -> SharedMountHandle:
    return SharedMountHandle(_module_shared, daemon_log)


@pytest.fixture
def session_mount(session_mount_handle) -> mounts.Mount:
    """The session-wide mount; this test's log lines are checked at its teardown."""
    return session_mount_handle.get()


@pytest.fixture
def module_mount(module_mount_handle) -> mounts.Mount:
    """The module-wide mount; this test's log lines are checked at its teardown."""
    return module_mount_handle.get()
