"""``chronicle receipt`` on a store that is not mounted: make, show at a
point, verify (exit 1 when a stored receipt no longer matches), forks, and
one-line errors for bad input."""

from __future__ import annotations

import json

from chronicle.cli import cli
from chronicle.store.meta import schema
from chronicle.store.store import Store
from storeutil import A, write


def run(runner, *args, code=0):
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output + result.stderr
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def test_receipt_commands(runner, tmp_path):
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    sub, _ = ws.mkdir(ws.root, b"sub", 0o755, A)
    write(ws, sub, b"a.txt", b"one\n")
    first_seq = ws.head_seq
    write(ws, ws.root, b"b.txt", b"two\n")
    head_seq = ws.head_seq
    st.close()
    s = ["-s", path, "-w", "w"]

    head = json.loads(run(runner, "receipt", *s, "--json").stdout)
    assert (head["seq"], head["files"], head["dirs"]) == (head_seq, 2, 1) and len(head["root"]) == 64
    text = run(runner, "receipt", *s).stdout
    assert text == f"{head['root']} seq {head_seq} (2 files, 1 directories, 0 others, 8 bytes)\n"
    early = json.loads(run(runner, "receipt", *s, "--at", first_seq, "--json").stdout)
    assert early["root"] != head["root"] and early["files"] == 1
    assert "matches the stored tree" in run(runner, "receipt", *s, "--verify").stdout
    assert json.loads(run(runner, "receipt", *s, "--verify", "--at", first_seq, "--json").stdout)["ok"] is True

    run(runner, "fork", *s, "--at", first_seq, "f")
    fork = json.loads(run(runner, "receipt", "-s", path, "-w", "f", "--json").stdout)
    assert fork["root"] == early["root"] and fork["computed"]["base"] == first_seq

    st = Store.open(path)                 # a stored receipt that the tree no longer gives
    with st.env.begin(write=True) as txn:
        forged = json.dumps({**head, "root": "ab" * 32}).encode()
        txn.put(schema.event_key(st.workspace_record("w").id, head_seq), forged, db=st.dbs["receipts"])
    st.close()
    bad = run(runner, "receipt", *s, "--verify", code=1)
    assert f"does NOT match the stored tree (it hashes to {head['root']})" in bad.stdout

    for args, message in ((["--at", "01"], "not a seq"), (["--at", "999"], "does not exist yet"),
                          (["--at", "nope"], "no seq, time, snapshot or turn"),
                          (["--verify", "--at", "0"], "no receipt is stored at seq 0")):
        result = runner.invoke(cli, ["receipt", *map(str, s), *args], catch_exceptions=False)
        assert result.exit_code in (1, 2) and not result.stdout
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "no workspace named" in run(runner, "receipt", "-s", path, "-w", "zz", code=1).stderr
