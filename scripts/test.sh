#!/usr/bin/env bash
# Install everything into .venv (created if missing), lint with ruff and run the whole test suite.
# Used by `make test` and by CI (.ci/run). Installs Debian's chromium for the browser test
# when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
fi
# Lint first (rules in pyproject.toml [tool.ruff.lint]): a finding fails the run.
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q "$@"
