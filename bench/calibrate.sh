#!/usr/bin/env bash
# The calibration runs: the CPU profile of the reference's published figures (EfficientNet-Lite0,
# blocks.2 + blocks.4, 512-d, 128 px, 10 epochs, seed 0) on the real classes in ../shared/data.
# Usage: bash bench/calibrate.sh [tire|magnetic_tile ...]      (RESULTS=... to choose the output folder, SEED=... another seed,
#        NET_EXTRA="--onednn" more `net` options, DATA=... the shared data folder, PYTHON=... another interpreter)
set -euo pipefail
case "${DATA:-}" in ""|/*) ;; *) DATA=$PWD/$DATA ;; esac  # given paths are the caller's, as _common.sh makes RESULTS
source "$(dirname "${BASH_SOURCE[0]}")/../shell/_common.sh"  # then: the repository root, .venv's Python or python3
DATA=${DATA:-../shared/data}
RESULTS=${RESULTS:-results/calibration}
CLASSES=("$@")
[ ${#CLASSES[@]} -gt 0 ] || CLASSES=(tire magnetic_tile)
if [ ! -d "$DATA" ]; then
  echo "Error: DATA=$DATA is not a folder: set DATA to the shared data folder (mvtec3d/, magnetic_tile/," \
       "dtd/images/ inside)" >&2
  exit 2
fi

for class in "${CLASSES[@]}"; do
  case "$class" in
    tire) root="$DATA/mvtec3d" ;;
    magnetic_tile) root="$DATA/magnetic_tile" ;;
    *) echo "Error: unknown class $class: give tire or magnetic_tile (or none for both)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  "$PYTHON" main.py --gpu 0 --seed "${SEED:-0}" --test ckpt --results_path "$RESULTS/$class" \
    net -b efficientnet_lite0 -le blocks.2 -le blocks.4 \
        --pretrain_embed_dimension 512 --target_embed_dimension 512 --patchsize 3 \
        --meta_epochs 10 --eval_epochs 1 --dsc_layers 2 --dsc_hidden 512 --pre_proj 1 \
        --mining 1 --noise 0.015 --radius 0.75 --p 0.5 --step 20 --limit 392 ${NET_EXTRA:-} \
    dataset --distribution 2 --mean 0.5 --std 0.1 --fg 0 --rand_aug 1 --batch_size 8 \
        --resize 128 --imagesize 128 -d "$class" mvtec "$root" "$DATA/dtd/images"
  echo "$class: $(( $(date +%s) - start )) s wall"
done
