#!/usr/bin/env bash
# Stop the local stack started by up.sh (same RSHNL_STACK_DIR) and check that nothing is left.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
STATE=${RSHNL_STACK_DIR:-/tmp/rshnl-stack}
PY=${PYTHON:-$root/.venv/bin/python}
"$PY" "$here/stop.py" "$STATE"
