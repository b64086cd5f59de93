"""The web timeline's server over HTTP: who may use it, CSRF, bad input, permissions, and speed.

``chronicle ui`` runs in a subprocess on a store built through the store API;
requests are made with :mod:`http.client`, so each test sets exactly the
headers a browser, another site's page or another user would send.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import subprocess
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from chronicle.store.history import points
from chronicle.store.store import Store

try:
    from . import uiutil
except ImportError:
    import uiutil


def request(url: str, path: str, method: str = "GET", body: dict | None = None,
            headers: dict | None = None) -> tuple[int, dict, str]:
    """``(status, headers, text)`` of one request to the server at ``url``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        data = urlencode(body).encode() if body is not None else None
        sent = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
        sent.update(headers or {})
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def error_line(text: str) -> str:
    found = re.search(r'<p class="error" id="error">(.*?)</p>', text, re.S)
    assert found, text[:500]
    return found.group(1)


@pytest.fixture
def served(tmp_path, ui_server):
    store = uiutil.build_store(tmp_path / "store")
    url, proc = ui_server(store)
    return store, url


def token_and_cookie(url: str) -> tuple[str, str]:
    status, headers, text = request(url, "/w/notes/snapshot?name=s1")
    assert status == 200
    token = re.search(r'name="csrf" value="([^"]+)"', text).group(1)
    cookie = headers["set-cookie"].split(";", 1)[0]
    assert "SameSite=Strict" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    return token, cookie


def snapshot_names(store: Path) -> list[str]:
    with Store.open(store) as st:
        return [s["name"] for s in points.snapshots(st.open_workspace("notes"))]


def test_pages_answer_with_a_strict_content_policy(served):
    _store, url = served
    status, headers, text = request(url, "/")
    assert status == 200 and "bot2" in text
    assert headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert headers["x-frame-options"] == "DENY"
    status, headers, css = request(url, "/static/pygments.css")
    assert status == 200 and ".hl" in css and headers["content-type"].startswith("text/css")


def test_other_sites_and_hosts_are_refused(served):
    store, url = served
    own = f"http://{urlsplit(url).netloc}"
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Host": "evil.example"},
                    {"Host": f"evil.example:{urlsplit(url).port}"}):
        status, _h, text = request(url, "/agents/bot", headers=headers)
        assert status == 403, (headers, status)
        assert "Traceback" not in text
    status, _h, _t = request(url, "/agents/bot", headers={"Sec-Fetch-Site": "same-origin", "Origin": own})
    assert status == 200
    status, _h, _t = request(url, "/agents/bot", headers={"Host": "localhost:1"})
    assert status == 200                          # a loopback name on any port


def test_a_change_needs_its_own_origin_and_the_csrf_token(served):
    store, url = served
    own = f"http://{urlsplit(url).netloc}"
    token, cookie = token_and_cookie(url)
    tries = [
        ({"name": "s1"}, {"Origin": own, "Cookie": cookie}, "CSRF token"),                 # no token
        ({"name": "s1", "csrf": token}, {"Origin": own}, "CSRF token"),                    # no cookie
        ({"name": "s1", "csrf": "x" * 43}, {"Origin": own, "Cookie": cookie}, "CSRF token"),
        ({"name": "s1", "csrf": token}, {"Cookie": cookie}, "own pages"),                  # no Origin, no Referer
        ({"name": "s1", "csrf": token}, {"Cookie": cookie, "Referer": "http://evil.example/"}, "own pages"),
        ({"name": "s1", "csrf": token}, {"Origin": "http://evil.example", "Cookie": cookie}, "other origins"),
        ({"name": "s1", "csrf": token}, {"Origin": own, "Cookie": cookie, "Sec-Fetch-Site": "cross-site"},
         "other sites"),
    ]
    for body, headers, why in tries:
        status, _h, text = request(url, "/w/notes/snapshot", "POST", body, headers)
        assert status == 403 and why in error_line(text), (body, headers, status)
    assert snapshot_names(store) == ["planned"]
    status, headers, _t = request(url, "/w/notes/snapshot", "POST", {"name": "s1", "csrf": token},
                                  {"Origin": own, "Cookie": cookie})
    assert status == 303 and headers["location"].startswith("/w/notes?done=")
    status, _h, _t = request(url, "/w/notes/snapshot", "POST", {"name": "s2", "csrf": token},
                             {"Referer": own + "/w/notes", "Cookie": cookie})
    assert status == 303
    assert snapshot_names(store) == ["planned", "s1", "s2"]
    # A confirmation page (GET) changes nothing, whatever it is sent.
    assert request(url, "/w/notes/restore?path=notes/todo.md&version=1")[0] == 200
    assert request(url, "/agents/bot/fork?at=2")[0] == 200
    with Store.open(store) as st:
        assert sorted(w.name for w in st.workspaces()) == ["bot", "bot2", "notes"]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root and the system python3 to act as another user")
def test_only_its_user_may_connect(served):
    _store, url = served
    client = ("import http.client, sys; c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30); "
              "c.request('GET', '/'); r = c.getresponse(); print(r.status); print(r.read().decode())")
    parts = urlsplit(url)
    done = subprocess.run(["/usr/bin/python3", "-c", client, parts.hostname, str(parts.port)], user="nobody",
                          capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
    status, _, text = done.stdout.partition("\n")
    assert status == "403", done.stderr
    assert f"not uid {pwd.getpwnam('nobody').pw_uid}" in error_line(text)


@pytest.mark.parametrize("path, status, message", [
    ("/agents/ghost", 404, "no agent named 'ghost'"),
    ("/agents/bot/turns/99", 404, "agent 'bot' has no turn 99 (its turns are 0 to 5)"),
    ("/agents/bot/turns/01", 400, "must be a number"),
    ("/agents/bot?page=x", 400, "page must be a number"),
    ("/w/ghost", 404, "no workspace named 'ghost'"),
    ("/w/notes/file?path=nope.txt", 404, "never existed"),
    ("/w/notes/file?path=../etc/passwd", 400, "not a path inside the workspace"),
    ("/w/notes/file", 400, "give a file path"),
    ("/w/notes/file?path=notes/todo.md&v=9", 404, "has no version 9"),
    ("/w/notes/file?path=notes/todo.md&a=1&b=7", 404, "has no version 7"),
    ("/w/notes/tree?at=no-such-snapshot", 404, "no-such-snapshot"),
    ("/w/notes/tree?at=999", 404, "999"),
    ("/w/notes/tree?path=missing", 404, "missing"),
    ("/w/notes/snapshot?name=12", 400, "12"),
    ("/agents/bot/rollback", 400, "the turn to roll back to is missing"),
    ("/no/such/page", 404, "Not Found"),
])
def test_bad_input_is_one_line_on_an_error_page(served, path, status, message):
    _store, url = served
    got, _h, text = request(url, path)
    line = error_line(text)
    assert got == status and message in line.replace("&#39;", "'"), (got, line)
    assert "Traceback" not in text and "internal error" not in line and "\n" not in line


def test_ten_thousand_turns_open_in_under_a_second(tmp_path, ui_server, browser):
    started = time.monotonic()
    store = uiutil.build_store(tmp_path / "store", turns=10_000, files_every=500)
    built = time.monotonic() - started
    url, _proc = ui_server(store)
    request(url, "/")                                    # the server is warm
    timings = {}
    for path in ("/agents/bot", "/agents/bot?page=100", "/agents/bot?page=200", "/agents/bot/turns/5000",
                 "/agents/bot/turns/10000", "/agents/bot2"):
        t = time.monotonic()
        status, _h, text = request(url, path)
        timings[path] = time.monotonic() - t
        assert status == 200, path
    status, _h, text = request(url, "/agents/bot")
    assert text.count('<tr class="turn') == 50 and "page 1 of 201" in text and 'data-turn="10000"' in text
    assert 'data-turn="0"' in request(url, "/agents/bot?page=200")[2]
    t = time.monotonic()
    browser.goto(url + "/agents/bot")
    in_browser = time.monotonic() - t
    assert browser.locator("tr.turn").count() == 50
    print(f"\n10,000 turns: store built in {built:.1f} s; " + ", ".join(f"{p} {s * 1000:.0f} ms"
                                                                     for p, s in timings.items())
          + f"; the first page in the browser {in_browser * 1000:.0f} ms")
    assert max(timings.values()) < 1.0 and in_browser < 1.0, timings


def as_nobody(argv: list[str]) -> list[str]:
    """``argv`` (a ``python -m ...`` without the interpreter) run as uid nobody by
    the system python3 with this venv's packages (a venv under /root cannot be
    executed by another user, its packages can be read)."""
    path = ":".join([str(uiutil.REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={path}", "/usr/bin/python3", *argv]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root and the system python3 to serve a store as another user")
def test_the_timeline_shows_what_its_user_may_read(ui_server):
    """Served by uid nobody, a file only root may read is left out of the tree and its history is refused."""
    where = Path(tempfile.mkdtemp(prefix="chronicle-ui-nobody-"))    # pytest's temp dirs are root's alone
    try:
        served_as_nobody(ui_server, where)
    finally:
        ui_server.stop()
        shutil.rmtree(where, ignore_errors=True)


def served_as_nobody(ui_server, where: Path) -> None:
    os.chmod(where, 0o755)
    store = uiutil.build_store(where / "store")
    with Store.open(store) as st:
        ws = st.open_workspace("notes", writable=True)
        uiutil.write(ws, b"secret.txt", b"the password\n")
        ws.setattr(ws.lookup(ws.root, b"secret.txt")[0], uiutil.A, mode=0o600)
        ws.mkdir(ws.root, b"private", 0o700, uiutil.A)
        uiutil.write(ws, b"private/plan.txt", b"the plan\n")
        st.release_workspace(ws)
    nobody = pwd.getpwnam("nobody")
    for root, dirs, files in os.walk(store):
        for name in dirs + files:
            os.chown(os.path.join(root, name), nobody.pw_uid, nobody.pw_gid)
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    probe = subprocess.run(as_nobody(["-c", "import chronicle.ui.app"]), capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid nobody cannot import this checkout's packages: {probe.stderr.strip()[-200:]}")
    ui_server.argv = as_nobody(["-m", "chronicle"])
    url, _proc = ui_server(store)
    status, _h, text = request(url, "/w/notes/tree")
    assert status == 200
    # As ls shows them: the names in a directory it may list, not what it may not read or search.
    assert re.findall(r'<tr class="entry \w+">\s*<td><a [^>]*>([^<]+?)/?</a>', text) == \
        ["notes", "private", "README.md", "secret.txt"]
    assert request(url, "/w/notes/file?path=README.md")[0] == 200
    for path in ("/w/notes/file?path=secret.txt", "/w/notes/tree?path=secret.txt", "/w/notes/tree?path=private",
                 "/w/notes/file?path=private/plan.txt"):
        status, _h, text = request(url, path)
        assert status == 403 and "permission denied" in error_line(text), path
    status, _h, text = request(url, "/w/notes")
    assert status == 200 and "secret.txt" in text and "private/plan.txt" not in text
    # Root (the test) sees it: the same store served by root.
    url, _proc = ui_server(store)
    assert "the plan" in request(url, "/w/notes/tree?path=private/plan.txt")[2]


def test_the_command_fails_in_one_line(tmp_path, ui_server):
    store = uiutil.build_store(tmp_path / "store")
    url, _proc = ui_server(store)
    busy = str(urlsplit(url).port)

    def ui(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "chronicle", "ui", *args], capture_output=True, text=True,
                              env=ui_server.env, timeout=60)

    for args, message in [
        (("--store", str(tmp_path / "none")), "no Chronicle store"),
        (("--store", str(store), "--port", busy), f"cannot listen on 127.0.0.1:{busy}: the port is in use"),
        (("--store", str(store), "--host", "no-such-host.invalid", "--port", "0"), "cannot listen on"),
    ]:
        done = ui(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and lines and lines[-1].startswith("chronicle: error: "), done.stderr
        assert message in lines[-1] and "Traceback" not in done.stderr, done.stderr
    done = ui("--store", str(store), "--port", "70000")
    assert done.returncode == 2 and "70000" in done.stderr
