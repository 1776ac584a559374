#!/usr/bin/env bash
# Packs into .gpu/ (ignored) what scripts/gpu_figures.sh needs on a lent GPU machine and that
# machine lacks (docs/benchmarks.md, "On a lent GPU"). It has Python 3.12 with torch, lightning,
# torchmetrics, diffusers' and transformers' neighbours, but no network, so this carries:
#   - wheels for CPython 3.12 of the packages below, at the versions this venv runs (the ones the
#     test suite passes with);
#   - the Inception weights the evaluations use, in fp16: the fp32 file (96 MB) is over what one
#     call may carry (64 MiB with the repo); the benchmark times the network, and load_state_dict
#     casts the values back to fp32, so the speed is the same.
# Usage: scripts/gpu_kit.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
KIT=.gpu
LIMIT_MIB=64
# Imported by the training and evaluation benchmarks and missing on the GPU machine: hydra and its
# parser, torch-fidelity, diffusers and what it imports (importlib-metadata), pydantic (the
# records) and its own; typing-extensions is there, but maybe older than pydantic asks for.
# antlr4-python3-runtime is published as a source archive only, so its pure-Python wheel is
# built here.
WHEELS="hydra-core omegaconf torch-fidelity diffusers importlib-metadata pydantic pydantic-core
annotated-types typing-inspection typing-extensions"
BUILT="antlr4-python3-runtime"

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$KIT"
mkdir -p "$KIT/wheels"
for name in $WHEELS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$KIT/wheels" "$name==$(version "$name")"
done
for name in $BUILT; do
    "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" "$name==$(version "$name")"
done

"$PY" - "$KIT/inception-fp16.pth" <<'EOF'
import sys

import torch

from lt_diffusion.evaluation.inception import load_extractor

_, info = load_extractor("cpu")  # the weights an evaluation here would use
state = torch.load(info["weights_path"], map_location="cpu", weights_only=True)
half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
torch.save(half, sys.argv[1])
print(f"weights: {info['weights']} ({info['source']}) -> {sys.argv[1]} in fp16")
EOF

# What the run should report as the code it timed.
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/dirty: /'; } \
    >"$KIT/commit"

find "$KIT/wheels" -name '*.whl' -printf '  %9s  %f\n' | sort -k2
kit=$(du -sb "$KIT" | cut -f1)
repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$((kit + repo))
echo "kit $((kit / 1048576)) MiB + tracked files $((repo / 1048576)) MiB = $((total / 1048576)) MiB" \
    "(a call carries at most $LIMIT_MIB MiB)"
if ((total > LIMIT_MIB * 1048576)); then
    echo "too large to travel with one call: drop a wheel or the weights" >&2
    exit 1
fi
