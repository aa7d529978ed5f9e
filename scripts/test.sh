#!/usr/bin/env bash
# Set up from scratch (virtual environment, packages) and run the checks CI runs: formatter, linter, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser tests drive Debian's Chromium; install it when missing and we may (root, or sudo without a password).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || echo "could not install chromium" >&2
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || echo "could not install chromium" >&2
  fi
fi
bash scripts/setup.sh dev
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# End-to-end speed, quick mode (full width, 1 layer): prints its figures; fails only if our decode is slower
# than the reference-style path measured in the same run (skips when ../shared/models is absent).
.venv/bin/python benchmarks/bench_generate.py --quick
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
