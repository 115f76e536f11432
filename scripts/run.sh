#!/usr/bin/env bash
# The run command: installs the node into .venv and starts every service with ./edge.toml.
# Usage: ./scripts/run.sh [extra edge run args]   (Ctrl-C stops it cleanly)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/venv.sh
# First start: nobody can log in to the console yet, so say how to make the first admin.
if [[ "$(.venv/bin/edge --config edge.toml user list --json 2>/dev/null || true)" == "[]" ]]; then
  cat >&2 <<HINT
run.sh: no console user yet. Make the first admin, in another terminal in $(pwd):
    ./scripts/edge user add admin --role admin     (it asks for the new password twice)
  then log in at http://127.0.0.1:8080/ (the console, [console] port in edge.toml).
HINT
fi
exec .venv/bin/edge --config edge.toml run "$@"
