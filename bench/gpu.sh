#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md, in one go on one CUDA GPU:
#   1. model-only MAE training steps of the base backbone with mae-base.yaml's decoder (fp32 and bf16, against
#      transformers' ViTMAE and a full-token step), batch 128;
#   2. short real runs of the base recipes through `accelerate launch` (loader, model, optimiser, logging):
#      mae-base (300 steps), combined-base (200 steps), then full-base fine-tuning (200 steps) of the backbone
#      the mae-base run exported; GPU memory and utilisation sampled every second by nvidia-smi.
# usage: bash bench/gpu.sh SHARDS OUT [STAGE ...]   (SHARDS: a `shards pack irmas-train ... --val-fraction` folder;
#   OUT: a folder; STAGEs: model-speed mae-base combined-base full-base, default all; full-base needs mae-base)
# Each stage writes its JSON into OUT as it finishes, so a run cut short keeps what it measured.
# A small pack makes epochs of a few batches, and each epoch starts its DataLoader workers anew (seconds each):
# data.batches_per_epoch=400 makes one epoch span the run, as an epoch of a real collection does.
set -u
shards=$1
out=$2
shift 2
stages=${*:-model-speed mae-base combined-base full-base}
epoch=data.batches_per_epoch=400
runs=$(mktemp -d)
gpu1=recipes/accelerate/gpu-1.yaml
nvidia-smi --query-gpu=timestamp,name,memory.used,utilization.gpu --format=csv -l 1 >"$out/nvidia-smi.csv" &
smi=$!
trap 'kill $smi' EXIT
step() { echo "== $1 $(date +%T)"; [[ " $stages " == *" $1 "* ]]; }
step model-speed &&
    python bench/pretrain_speed.py --device cuda --size base --decoder 512x8 --batch 128 --steps 10 --rounds 3 \
    >"$out/model-speed.json"
step mae-base &&
    python bench/recipe_speed.py recipes/pretrain/mae-base.yaml --accelerate $gpu1 --steps 300 --keep "$runs/mae" \
        "data.train=[$shards/train]" $epoch >"$out/mae-base.json"
step combined-base &&
    python bench/recipe_speed.py recipes/pretrain/combined-base.yaml --accelerate $gpu1 --steps 200 \
        "data.train=[$shards/train]" $epoch >"$out/combined-base.json"
step full-base &&
    python bench/recipe_speed.py recipes/finetune/full-base.yaml --accelerate $gpu1 --steps 200 \
        backbone="$runs/mae/backbone" data.train="$shards/train" data.val="$shards/val" $epoch >"$out/full-base.json"
echo "== done $(date +%T)"
