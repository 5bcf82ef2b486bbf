#!/usr/bin/env bash
# Create (or reuse) ./.venv and install SynerDiff with the given extras.
#   scripts/setup-env.sh server            # the engine + HTTP server
#   scripts/setup-env.sh server,operator,dev
# Torch: a CPU build by default (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch" for CUDA).
set -euo pipefail
extras=${1:-server}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
"$py" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel first, so that no dependency pulls a multi-GB CUDA build.
python -c 'import torch' 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[${extras}]" 2>&1 | grep -v '^WARNING: Location' || true
python -c 'import synerdiff' # fails loudly if the install did not work
