#!/usr/bin/env bash
# The study loop (bench/study_loop.py) with a real nnU-Net budget on a CUDA host, as one prepared script.
#
# Needs a checkout with `make install` done (its torch with CUDA: the lock's torch wheel is the CUDA build on
# Linux x86_64) and one NVIDIA GPU. It starts the embedded stack (PostgreSQL, Redis, the API and one worker
# on sam + cpu + train), runs the loop with device cuda and writes the table and every row under var/:
#
#   bench/gpu_study_loop.sh                 # nnU-Net's own budget: 1000 epochs x 250 iterations (a day per training)
#   EPOCHS=50 bench/gpu_study_loop.sh       # a shorter budget (about 50 x 250 iterations per training)
#   bench/gpu_study_loop.sh --url https://host --token T   # against a deployment whose GPU workers serve `train`
#
# It prints the card first (nvidia-smi) and the loop's last line last; report both with the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-var/study-loop-gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
args=(--gpu --out "$OUT/table.md" --json "$OUT/rows.json")
if [[ -n "${EPOCHS:-}" ]]; then args+=(--epochs "$EPOCHS"); fi
exec "$PYTHON" bench/study_loop.py "${args[@]}" "$@"
