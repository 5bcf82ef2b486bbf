# Sourced by the gpu-call-*.sh scripts on the device machine (repo root, .whl/ carried): installs the
# carried wheels and puts the server, bench and training packages on the path. Needs OUT (the device tool sets it).
OUT=${OUT:?run through the device tool, or set OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/bench:$PWD/training PYTHONUNBUFFERED=1
nvidia-smi -L
