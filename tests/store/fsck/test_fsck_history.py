"""fsck and the path history (issue 7 §1: "a commit that cannot be recorded
is never silent"): a file whose current content no path entry records is
reported, and long paths (digest keys) check clean and are named whole."""

from __future__ import annotations

from chronicle.store.fsck.checks import ERROR, fsck
from chronicle.store.meta import schema
from chronicle.store.store import Store
from storeutil import A, write


def test_a_version_missing_from_the_path_index_is_reported(tmp_path):
    with Store.init(tmp_path / "s") as st:
        ws = st.open_workspace("w", writable=True, create=True)
        d, _ = ws.mkdir(ws.root, b"d" * 250, 0o755, A)
        e, _ = ws.mkdir(d, b"e" * 250, 0o755, A)
        write(ws, e, b"f", b"one")
        write(ws, e, b"f", b"two")
        lost_seq = ws.head_seq
        write(ws, ws.root, b"ok", b"fine")
        assert fsck(st).clean
        path = b"d" * 250 + b"/" + b"e" * 250 + b"/f"
        with st.env.begin(write=True) as txn:        # what a lost path-index write leaves
            assert txn.delete(schema.path_key(ws.id, path, lost_seq), db=st.dbs["paths"])
        report = fsck(st)
    found = [p for p in report.problems if p.kind == "history-missing"]
    assert [(p.severity, p.details["path"]) for p in found] == [(ERROR, path.decode())]
    assert not report.clean


def test_a_store_with_paths_past_path_max_checks_clean(tmp_path):
    with Store.init(tmp_path / "s") as st:
        ws = st.open_workspace("w", writable=True, create=True)
        ino = ws.root
        for i in range(20):                            # 20 x 256 bytes: past PATH_MAX
            ino, _ = ws.mkdir(ino, b"%03d" % i + b"x" * 252, 0o755, A)
        write(ws, ino, b"f", b"deep")
        report = fsck(st)
    assert report.clean, [p.as_dict() for p in report.problems]
