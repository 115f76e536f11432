#!/usr/bin/env bash
# The run command: installs the node into .venv and starts every service with ./edge.toml.
# Usage: ./scripts/run.sh [extra edge run args]   (Ctrl-C stops it cleanly)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/venv.sh
exec .venv/bin/edge --config edge.toml run "$@"
