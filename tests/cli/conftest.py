"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest
from click.testing import CliRunner


@pytest.fixture
def runner(tmp_path, monkeypatch) -> CliRunner:
    """click's runner with a private ``$CHRONICLE_HOME``, run from the test's temp dir."""
    monkeypatch.setenv("CHRONICLE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHRONICLE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()
