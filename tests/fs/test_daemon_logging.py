"""The daemon's logging: a reply to a request the kernel no longer waits for
is not an error (mount tests fail on any daemon ERROR)."""

from __future__ import annotations

import logging

from chronicle.fs.daemon import _InterruptedReplies


def records(caplog, *args: object) -> list[tuple[str, str]]:
    log = logging.getLogger("pyfuse3.test")
    log.addFilter(_InterruptedReplies())
    with caplog.at_level(logging.DEBUG, logger="pyfuse3.test"):
        log.error("fuse_release(): fuse_reply_* failed with %s", *args)
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_an_interrupted_reply_is_logged_at_debug(caplog):
    assert records(caplog, "No such file or directory") == [
        ("DEBUG", "fuse_release(): fuse_reply_* failed with No such file or directory")]


def test_other_reply_failures_stay_errors(caplog):
    assert records(caplog, "Invalid argument") == [
        ("ERROR", "fuse_release(): fuse_reply_* failed with Invalid argument")]
