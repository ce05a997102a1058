#!/usr/bin/env bash
# The one GPU run: install the carried wheels (.whl/, from bench/fetch_wheels.sh) into build/wheels-site without
# an index, then bench/gpu_check.py (at most 9 minutes; JSON + markdown table under build/gpu_check/).
#   bash bench/gpu_check.sh                 # one H200
#   bash bench/gpu_check.sh --device cpu --size tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target build/wheels-site .whl/*.whl
    export PYTHONPATH="$PWD/build/wheels-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/: running with the packages installed here (missing ones are skipped)" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
