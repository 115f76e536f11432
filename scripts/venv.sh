#!/usr/bin/env bash
# Create .venv (once) and install the project into it; "test" adds the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    # Debian splits venv out of python3; install it when we can.
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && python3 -m venv .venv
    else
      echo "venv.sh: python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
extras=""
[[ "${1:-}" == "test" ]] && extras="[test]"
# The runtime dependencies at exactly the image's versions (image/requirements.lock, from image/lock.py),
# so the tests and the type check (tests/test_types.py) see what the node runs, not the newest release.
.venv/bin/python -m pip install -q --disable-pip-version-check -c image/requirements.lock -e ".${extras}"
