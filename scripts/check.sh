#!/usr/bin/env bash
# Every check a change must pass before the tests: `bash scripts/check.sh` (a few seconds).
#   ruff check          lint: pyflakes (unused or undefined names), pycodestyle, import order,
#                       bugbear (likely bugs), pyupgrade (Python 3.10 syntax); rules in pyproject.toml
#   ruff format --check the one code style; `ruff format .` applies it
#   mypy                types of alexnet_lab/, strict (config in pyproject.toml)
# CI (.ci/run) runs this before the tests and fails on any finding; pre-commit runs the same.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
