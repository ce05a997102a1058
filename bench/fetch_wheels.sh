#!/usr/bin/env bash
# Download exactly the wheels bench/gpu_check.sh needs on the GPU machine (its own Python 3.12 with torch 2.11 and
# transformers 5.17, no package index) into the git-ignored .whl/: our pins of transformers and peft, bitsandbytes
# (QLoRA), and what our code imports that the machine lacks (soundfile with cffi + pycparser, num2words). 59.3 MB
# (2026-12-04): with the tracked tree 61.1 MiB, within the 64 MiB a device call may carry. `WITH_DEEPSPEED=1` also
# builds a DeepSpeed wheel (a source package), which the check does not use and which would not fit beside the rest.
# Run from anywhere; needs an index (this machine's pip).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" constraints.txt | head -n1; }
PIP="${PIP:-python3 -m pip}"
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    --dest .whl "$(pin transformers)" "$(pin peft)" "$(pin bitsandbytes)" "$(pin soundfile)" "$(pin num2words)" \
    "$(pin cffi)" "$(pin pycparser)"
if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then
    $PIP wheel --no-deps --wheel-dir .whl "$(pin deepspeed)"
fi
du -cb .whl/*.whl | tail -n1
