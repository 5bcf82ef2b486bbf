#!/usr/bin/env bash
# One command from a fresh clone to a running server on the embedded model:
#   scripts/serve.sh [synerdiff serve options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup-env.sh" server
exec "$root/.venv/bin/synerdiff" serve "$@"
