"""Fixtures of the S3 backend's tests: one real SeaweedFS server per session.

- ``seaweed`` -- a :class:`tools.seaweed.SeaweedServer` on 127.0.0.1 (session
  scope): started once, with its data under the session's tmp dir and the
  bucket ``chronicle-test``; its credentials are put in the environment (as
  a user would set them) for the whole session; stopped by PID at the end.
- ``s3_location`` -- a fresh ``s3://chronicle-test/<unique prefix>`` of that
  server for one test, so tests never see each other's objects.
- ``s3_backend`` -- an :class:`S3Backend` on that location with its cache
  under the test's tmp dir, closed after the test.
"""

from __future__ import annotations

import itertools
import os

import pytest

from chronicle.store.chunks.backends.s3 import S3Backend, S3Location
from tools.seaweed import SeaweedServer

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    saved = {k: os.environ.get(k) for k in server.env}
    server.start()
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_location(seaweed, request) -> S3Location:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return S3Location.parse(f"s3://{seaweed.bucket}/t{os.getpid()}-{next(_prefixes)}-{name}",
                            endpoint=seaweed.endpoint)


@pytest.fixture
def s3_backend(s3_location, tmp_path):
    backend = S3Backend(s3_location, tmp_path / "cache", cache_size=64 * 1024 * 1024, attempts=2)
    try:
        yield backend
    finally:
        backend.close()
