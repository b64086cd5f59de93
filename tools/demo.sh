#!/usr/bin/env bash
# Chronicle's main job on real input, on the embedded default store:
# mount a workspace, do real work in it with ordinary tools, show its history.
#
#   tools/demo.sh [--keep]     (--keep leaves the workspace mounted at the end)
#
# Installs what it needs first (tools/setup.sh). The store is the default one
# ($CHRONICLE_HOME/store, else ~/.local/share/chronicle/store); the workspace
# is "demo", mounted at ${CHRONICLE_DEMO_MOUNT:-/tmp/chronicle-demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh

KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
MNT="${CHRONICLE_DEMO_MOUNT:-/tmp/chronicle-demo}"
CHRONICLE="$PWD/.venv/bin/chronicle"
PY="$PWD/.venv/bin/python -I"      # -I: the workspace's own copy of the stdlib must not shadow ours

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; (set +o pipefail; eval "$@"); }

cleanup() {
    cd /
    if [ "$KEEP" = 0 ] && mountpoint -q "$MNT" 2>/dev/null; then
        "$CHRONICLE" umount "$MNT" || fusermount3 -u -z "$MNT" || true
    fi
}
trap cleanup EXIT

step "Mount workspace 'demo' of the default store at $MNT"
mountpoint -q "$MNT" 2>/dev/null && "$CHRONICLE" umount "$MNT"
show "$CHRONICLE" mount --workspace demo "$MNT"
cd "$MNT"
if [ -n "$(ls -A .)" ]; then
    echo "(the workspace has files from an earlier run: removing them — they stay in its history)"
    rm -rf ./* ./.[!.]* 2>/dev/null || true
fi

STDLIB="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
step "Copy in a real source tree: this machine's Python standard library ($STDLIB)"
start=$(date +%s.%N)
tar -C "$STDLIB" --exclude=__pycache__ --exclude=site-packages --exclude=test --exclude=idlelib -cf - . | tar -xf -
end=$(date +%s.%N)
printf '%s files, %s, in %.1f s\n' "$(find . -type f | wc -l)" "$(du -sh . | cut -f1)" "$(echo "$end - $start" | bc)"

step "git init, add, commit inside the mount"
export GIT_AUTHOR_NAME=demo GIT_AUTHOR_EMAIL=demo@example.com GIT_COMMITTER_NAME=demo GIT_COMMITTER_EMAIL=demo@example.com
show "git init -q && git add -A && git commit -q -m 'Python stdlib' && git log --oneline"

step "Edit a file with sed -i, then with an editor-style atomic save (temp file + rename)"
show "sed -i 's/^r\"\"\"JSON (JavaScript Object Notation)/r\"\"\"JSON (edited with sed -i)/' json/__init__.py"
show "head -1 json/__init__.py"
$PY - <<'EOF'
import os
path = "json/__init__.py"
text = open(path).read()
tmp = path + ".swp"
with open(tmp, "w") as f:                      # what editors do: write a temp file...
    f.write("# Edited by the Chronicle demo with an atomic save.\n" + text)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)                          # ...and rename it over the original
print("atomic save of", path, "done")
EOF
show "git commit -q -am 'Edit json' && git log --oneline"

step "History of json/__init__.py through the magic files"
show "cat .chronicle/query/json/__init__.py | $PY -m json.tool | head -40"
show "ls .chronicle/versions/json/__init__.py/"
show "head -3 .chronicle/versions/json/__init__.py/1"

step "The workspace's history with the CLI"
show "$CHRONICLE log | tail -8"
show "$CHRONICLE log json/__init__.py"
show "$CHRONICLE diff json/__init__.py 1 | head -20"

step "Restore version 1 (recorded as a new event; history is never rewritten)"
show "$CHRONICLE restore json/__init__.py --version 1"
show "head -2 json/__init__.py"
show "git status --short"
show "$CHRONICLE log json/__init__.py"

step "The whole tree as it was before the edits, and the store's figures"
first_commit_seq=$($PY -c 'import json,sys; v=json.load(open(".chronicle/query/json/__init__.py"))["versions"]; print(v[0]["seq"])')
show "ls .chronicle/at/$first_commit_seq/ | head -5"
show "$CHRONICLE stats"

if [ "$KEEP" = 1 ]; then
    step "Left mounted at $MNT (unmount with: $CHRONICLE umount $MNT)"
else
    step "Unmount (the history stays in the store; mount again to continue)"
    cd /
    show "$CHRONICLE umount $MNT"
fi
