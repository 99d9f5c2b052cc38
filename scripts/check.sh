#!/usr/bin/env bash
# Every check a change must pass before the tests: `bash scripts/check.sh` (a few seconds).
#   lint-imports        the layers of DESIGN.md (import-linter; contracts in pyproject.toml): a module that
#                       imports one above it, or one that imports it back, fails here with the import named
#   ruff check          lint: pyflakes (unused or undefined names), pycodestyle, import order,
#                       bugbear (likely bugs), pyupgrade (Python 3.10 syntax); rules in pyproject.toml
#   ruff format --check the one code style; `ruff format .` applies it
#   mypy                types of alexnet_lab/, strict (config in pyproject.toml)
# CI (.ci/run) runs this before the tests and fails on any finding; pre-commit runs the same.
set -euo pipefail
cd "$(dirname "$0")/.."
lint-imports --no-cache  # first: it takes well under a second
ruff check .
ruff format --check .
mypy
