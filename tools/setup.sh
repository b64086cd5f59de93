#!/usr/bin/env bash
# Install everything Chronicle needs on Debian 12 and leave a ready venv in .venv.
#
# Idempotent: apt packages are installed only when missing, the venv is created
# once and re-synced with requirements.lock whenever the lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# fuse3: fusermount3 and the kernel helper; libfuse3-dev + pkg-config + gcc +
# python3-dev: pyfuse3 ships as an sdist and compiles against libfuse3.
# chromium: the headless browser of the web timeline's tests (tests/ui, driven by Playwright).
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv git sqlite3 tar bc curl chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.chronicle-lock
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing pinned Python packages into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "^WARNING: Location .file:" || true; }
    .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location .file:" || true; }
    echo "$want" > "$stamp"
fi
