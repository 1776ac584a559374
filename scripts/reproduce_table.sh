#!/usr/bin/env bash
# Reproduce one paper table here (one job after the other), then print it:
#   scripts/reproduce_table.sh cm_table2 'train_overrides=["trainer=gpu"]'
# Extra arguments are lt_diffusion.table overrides; the table lands in outputs/tables/.
set -euo pipefail
table=${1:?usage: $0 <table, e.g. cm_table2> [lt_diffusion.table overrides...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m lt_diffusion.table "table=$table" "$@"
