#!/usr/bin/env bash
# README command one: set up cax in ./.venv and run the demo on the embedded Runs DB (no server).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
rm -rf demo
exec .venv/bin/cax demo demo
