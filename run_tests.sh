#!/usr/bin/env bash
# Installs what the tests need (into ./.venv unless a virtualenv is active) and runs them.
# Usage: ./run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
source tools/env.sh
if [ "${CI:-}" = "true" ] || [ "${SPLITFORMER_BUILD_FAST_RNNT:-0}" = "1" ]; then
  bash tools/install_fast_rnnt.sh
  bash tools/install_browser.sh
fi
python -m pytest -q "$@" tests
