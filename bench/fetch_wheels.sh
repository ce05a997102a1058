#!/usr/bin/env bash
# Download exactly the wheels bench/gpu_check.sh needs on the GPU machine (which has torch 2.11 and no package
# index) into the git-ignored .whl/: our pins of transformers and peft, bitsandbytes (QLoRA), and a DeepSpeed wheel
# built here (a source package). About 60 MB: within the 64 MiB a working tree may carry. Run from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" constraints.txt | head -n1; }
mkdir -p .whl
PIP="${PIP:-.venv/bin/pip}"
"$PIP" download --no-deps --only-binary=:all: --dest .whl "$(pin transformers)" "$(pin peft)" "$(pin bitsandbytes)"
"$PIP" wheel --no-deps --wheel-dir .whl "$(pin deepspeed)"
du -ch .whl/*.whl | tail -n1
