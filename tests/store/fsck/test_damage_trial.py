"""The trial of issue 7 §4, a fast subset (``tools/meta_damage.py`` is the
long one): a store of 265 files in nested directories with history, one
page of its ``data.mdb`` overwritten with random bytes at a time.

Must hold: fsck runs to its end and names the damage (never an "internal
error", never a process killed by LMDB's own assertions), ``fsck --repair``
leaves a store fsck finds clean of damage in which every file keeps its name
and its bytes (what the damaged records said is derived again from their
twins), and a damaged meta page opens from the other one.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from storeutil import read, write

from chronicle.store.fsck.checks import fsck
from chronicle.store.meta import schema
from chronicle.store.meta.salvage import scan
from chronicle.store.model import Attrs
from chronicle.store.store import Store
from tools import meta_damage as trial

PAGES = 12          # random data pages (plus both meta pages)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, bytes], int]:
    return trial.build(tmp_path_factory.mktemp("trial"), seed=1)


def damaged(built, tmp_path: Path, page: int, seed: int) -> Path:
    pristine, _expected, _live = built
    copy = tmp_path / f"store-{page}"
    shutil.copytree(pristine, copy)
    trial.damage(copy, page, "page", random.Random(seed))
    return copy


@pytest.mark.parametrize("n", range(PAGES))
def test_a_damaged_page_is_named_and_repair_keeps_every_file(built, tmp_path, n):
    _pristine, expected, live = built
    page = trial.plan(live, PAGES, 5)[2 + n]
    copy = damaged(built, tmp_path, page, 100 + n)
    with Store.open(copy) as st:                            # reads the damaged file by hand, salvages it
        report = fsck(st)
    damage = [p for p in report.problems if p.kind == "meta-damaged"]
    assert all("cannot be read" in p.message and p.details["db"] in schema.DATABASES for p in damage)
    if damage:                                              # the damaged file is kept
        assert list((copy / "meta" / "backup").glob("data.mdb.damaged-*"))
    reports = trial.repair_in_process(copy)
    assert all(p.repaired for p in reports[0].problems if p.kind == "meta-damaged")
    with Store.open(copy) as st:
        again = fsck(st)
    assert not [p.message for p in again.problems if p.kind in ("meta-damaged", "names-lost", "dangling-dirent")]
    good, wrong = trial.read_back(copy, expected)
    assert (good, wrong) == (len(expected), []), (page, [p.message for p in report.problems][:5])


@pytest.mark.parametrize("slot", [0, 1])
def test_a_damaged_meta_page_opens_from_the_other(built, tmp_path, slot):
    _pristine, expected, _live = built
    copy = damaged(built, tmp_path, slot, slot)
    with Store.open(copy) as st:
        report = fsck(st)
    assert not [p for p in report.problems if p.kind == "meta-damaged"]
    good, wrong = trial.read_back(copy, expected)
    # the older meta page is the commit before the last: at most the last file's last write is missing
    assert good >= len(expected) - 1 and set(wrong) <= {"last"}


def test_the_cli_names_the_damage_and_repairs_it(built, tmp_path):
    _pristine, expected, live = built
    for page in trial.pages_holding(built[0] / "meta" / "data.mdb", b"f003.txt"):   # a page of records
        copy = damaged(built, tmp_path, page, 3)
        with scan(copy / "meta") as walk:
            if walk.damaged:
                break
    else:
        pytest.fail("no page holding f003.txt is read as a tree page")
    checked = trial.run_fsck(copy)
    assert not checked.aborted and checked.exit == 1 and checked.damaged >= 1, checked.text
    repaired = trial.run_fsck(copy, "--repair")
    assert not repaired.aborted and repaired.exit == 0, repaired.text
    again = trial.run_fsck(copy)
    assert not again.aborted and again.damaged == 0, again.text
    out = subprocess.run(trial.CLI + ["fsck", "--store", str(copy)], capture_output=True, text=True)
    assert "internal error" not in out.stdout + out.stderr
    assert trial.read_back(copy, expected) == (len(expected), [])


def test_repair_mends_a_damaged_content_id_from_the_path_entry(tmp_path):
    """A flipped byte inside a well-formed inode record (LMDB cannot see it):
    fsck names the file, and repair takes the content its path entry of the
    same event recorded."""
    st = Store.init(tmp_path / "store")
    ws = st.open_workspace("w", writable=True, create=True)
    ino = write(ws, ws.root, b"f", b"the content\n")
    with st.env.begin(write=True) as txn:
        with txn.cursor(db=st.dbs["inodes"]) as cur:
            prefix = schema.inode_prefix(ws.id, ino)
            assert cur.set_range(prefix)
            key, raw = bytes(cur.key()), bytes(cur.value())
        attrs = Attrs.decode(raw)
        txn.put(key, attrs.replace(content=bytes(32 * [7])).encode(), db=st.dbs["inodes"])
    st.close()
    with Store.open(tmp_path / "store") as st:
        report = fsck(st, repair=True)
        assert any(p.kind == "content-missing" and p.repaired for p in report.problems), report.problems
    with Store.open(tmp_path / "store") as st:
        assert fsck(st).clean
        assert read(st.open_workspace("w"), b"f") == b"the content\n"
