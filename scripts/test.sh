#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite (CPU only):
#   scripts/test.sh [pytest options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup-env.sh" server,operator,dev
cd "$root"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
