#!/usr/bin/env bash
# README command two: set up everything the tests need, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-deps.sh
scripts/bootstrap.sh test
exec .venv/bin/python -m pytest "$@"
