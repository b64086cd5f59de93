"""``.chronicle/turns/<agent>/<n>`` lists the turn's read-set as the caller
may see it (issue 12 §2; the rules of "Who sees what"), on a real root mount
reached by another user (the fixtures of ``test_history_permissions``)."""

from __future__ import annotations

import json

from chronicle.control import ControlChannel

from test_history_permissions import as_user, other_user, pytestmark, root_mount  # noqa: F401  (fixtures)


def test_turn_node_lists_reads_the_caller_may_read(root_mount, other_user):
    m = root_mount.path
    (m / "p").write_text("secret\n")
    (m / "p").chmod(0o600)
    (m / "open").write_text("public\n")
    with ControlChannel(m) as ctl:
        ctl.request({"cmd": "turn-begin", "agent": "a", "turn": 1})
        assert (m / "p").read_text() == "secret\n" and (m / "open").read_text() == "public\n"
        (m / ".chronicle" / "log").read_bytes()
        ctl.request({"cmd": "turn-end"})
    node = m / ".chronicle" / "turns" / "a" / "1"
    as_root = json.loads(node.read_text())
    assert [(r["path"], r["version"], r["ranges"]) for r in as_root["reads"]] == [("open", 1, [[0, 7]]),
                                                                                ("p", 1, [[0, 7]])]
    shown = as_user("cat", str(node))
    assert shown.returncode == 0, shown.stderr
    assert [r["path"] for r in json.loads(shown.stdout)["reads"]] == ["open"]
