#!/usr/bin/env bash
# Reproduce one paper table on a SLURM cluster: every run is one array task (train, then
# evaluate); preempted or timed-out tasks are requeued and resume from their last checkpoint.
#   PARTITION=gpu GPUS=4 scripts/slurm_table.sh cm_table2
# Run it on the login node (it submits and then waits to aggregate; run it inside tmux or
# screen, or again later with launch=false to aggregate the finished records).
set -euo pipefail
table=${1:?usage: $0 <table> [lt_diffusion.table overrides...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPUS=${GPUS:-1}
trainer=gpu
if [ "$GPUS" -gt 1 ]; then trainer=ddp; fi
"$PY" -m lt_diffusion.table "table=$table" hydra/launcher=slurm \
    "hydra.launcher.partition=${PARTITION:-null}" \
    "hydra.launcher.gpus_per_node=$GPUS" "hydra.launcher.tasks_per_node=$GPUS" \
    "hydra.launcher.cpus_per_task=${CPUS_PER_TASK:-8}" "hydra.launcher.mem_gb=${MEM_GB:-64}" \
    "hydra.launcher.timeout_min=${TIMEOUT_MIN:-1440}" \
    "train_overrides=[\"trainer=$trainer\", \"trainer.devices=$GPUS\"]" \
    "$@"
