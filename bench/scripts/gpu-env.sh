# Sourced by the measure-*.sh scripts on the GPU machine (repo root, wheels in .whl/): installs the
# wheels from .whl/ and puts the server, bench and training packages on the path. Needs OUT, the directory results go to.
OUT=${OUT:?set OUT to the directory for results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/bench:$PWD/training PYTHONUNBUFFERED=1
nvidia-smi -L
