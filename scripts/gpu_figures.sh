#!/usr/bin/env bash
# The GPU figures in one run on a lent GPU machine (docs/benchmarks.md, "On a lent GPU"): the
# training benchmark (DDPM + CFG at batch 64 and 128, CBDM at 48, beside the papers' fp32 loop
# and diffusers' bf16 + compile U-Net; a run that misses its target is profiled) and the
# evaluation benchmark (DDIM-50 + CFG generation, 50k Inception features, the cm_paper
# protocol's estimate). Needs the kit that scripts/gpu_kit.sh packs into .gpu/ here.
#
#   bash scripts/gpu_figures.sh [train] [eval]     # default both; output to $OUT/
#
# Each stage has its own time limit, so the whole run stays under about 8 minutes and a stage
# that runs long still leaves the other's figures; rows are written as they are measured.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
STAGES=${*:-train eval}
DEST=${OUT:-outputs/gpu_figures}
PY=${PY:-python3}
TRAIN_S=${TRAIN_S:-330}
EVAL_S=${EVAL_S:-150}
# The CPU rehearsal at tiny sizes sets these (docs/benchmarks.md).
read -ra train_args <<<"${TRAIN_ARGS---cifar}"
read -ra eval_args <<<"${EVAL_ARGS---protocol}"
mkdir -p "$DEST"
for stage in $STAGES; do
    case $stage in train | eval) ;; *) echo "unknown stage '$stage': train, eval" >&2 && exit 2 ;; esac
done
if [[ ! -f .gpu/inception-fp16.pth ]]; then
    echo "no kit in .gpu/: run scripts/gpu_kit.sh on the machine you call from, carry .gpu" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "code: $(head -1 .gpu/commit)$(grep -q dirty .gpu/commit && echo ' (with uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
} | tee "$DEST/device.txt"

status=0
for stage in $STAGES; do
    echo "== $stage"
    if [[ $stage == train ]]; then
        timeout "$TRAIN_S" "$PY" scripts/bench_train.py "${train_args[@]}" \
            2>"$DEST/train.err" | tee "$DEST/train.txt"
    else
        timeout "$EVAL_S" "$PY" scripts/bench_eval.py --weights .gpu/inception-fp16.pth "${eval_args[@]}" \
            2>"$DEST/eval.err" | tee "$DEST/eval.txt"
    fi
    rc=${PIPESTATUS[0]}
    if ((rc == 124)); then
        echo "$stage: stopped at its limit; the rows above are what it measured"
    elif ((rc != 0)); then
        echo "$stage: exit $rc; the end of $DEST/$stage.err:" && tail -20 "$DEST/$stage.err"
    fi
    ((rc != 0)) && status=1
done
exit $status
