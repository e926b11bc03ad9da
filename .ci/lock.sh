#!/usr/bin/env bash
# Refresh constraints.txt, the lock of the tested stack: resolve requirements*.txt afresh in a new virtualenv with
# HOLD held, and write the exact version of everything installed. Then run the whole CI (.ci/run) on the new lock
# before committing it. Held by default: torch (the CPU wheel CI runs on) and transformers at the version the GPU
# machine runs, which is also requirements.txt's floor, so that CI's two runs (lock, newest) cover both ends.
#   bash .ci/lock.sh                                   # then: bash .ci/run
#   HOLD="torch==2.13.0 transformers==5.24.0" bash .ci/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HOLD=${HOLD:-"torch==2.13.0 transformers==5.17.0"}

venv=$(mktemp -d)/venv
python3 -m venv "$venv"
tr ' ' '\n' <<<"$HOLD" > "$venv/hold.txt"
PIP_CONSTRAINT="$venv/hold.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$venv/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt
{
  echo "# The tested stack: exact versions CI ran the suite on (Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), CPU). Install with"
  echo "#   pip install -r requirements.txt -c constraints.txt"
  echo "# requirements.txt holds the supported ranges. Refresh: bash .ci/lock.sh (held: $HOLD), then bash .ci/run."
  # torch without its local label (+cpu), so that a GPU machine gets the same release as a CUDA build
  "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
