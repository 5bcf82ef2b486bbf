#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite (CPU only):
#   scripts/test.sh [pytest options...]
# The static gates (lint, format, types, import contracts) run first; any failure stops here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup-env.sh" server,operator,dev
cd "$root"
bin=.venv/bin

failed=()
gate() {  # gate NAME COMMAND...: run one gate, remember it if it fails
  local name=$1
  shift
  echo "== $name"
  if ! "$@"; then
    failed+=("$name")
  fi
}
gate "ruff check" "$bin/ruff" check .
gate "ruff format --check" "$bin/ruff" format --check .
gate "mypy" "$bin/mypy"
gate "lint-imports" "$bin/lint-imports"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed gates: ${failed[*]}" >&2
  exit 1
fi

set +e
"$bin/python" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
