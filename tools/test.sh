#!/usr/bin/env bash
# Install what is needed (tools/setup.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g. tools/test.sh -k store -x
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
exec .venv/bin/python -m pytest "$@"
