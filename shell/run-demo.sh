#!/usr/bin/env bash
# The embedded demo: builds a small MVTec-layout dataset from scikit-image texture photographs with
# synthetic defects (NOT MVTec AD; see datasets/demo.py), then trains and tests GLASS on the CPU with
# EfficientNet-Lite0 (ImageNet weights that install offline) at a CPU-sized profile.
# Override: DEMO_DIR=/tmp/demo RESULTS=/tmp/demo-results EPOCHS=4 CLASSES="brick" bash shell/run-demo.sh
# (a results folder that already holds a class trained for EPOCHS or more only tests it; give another RESULTS
# to train anew)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # first: makes the caller's relative paths absolute, then cd's to the repository
DEMO_DIR=${DEMO_DIR:-demo_data}
RESULTS=${RESULTS:-results/demo}
CLASSES=${CLASSES:-"brick grass"}
EPOCHS=${EPOCHS:-8}

"$PYTHON" -m datasets.demo "$DEMO_DIR" --classes "$(echo $CLASSES | tr ' ' ',')"

"$PYTHON" main.py \
    --gpu "${GPU:-0}" \
    --seed 0 \
    --test ckpt \
    --results_path "$RESULTS" \
  net \
    -b efficientnet_lite0 \
    -le blocks.2 \
    -le blocks.4 \
    --pretrain_embed_dimension 512 \
    --target_embed_dimension 512 \
    --patchsize 3 \
    --meta_epochs "$EPOCHS" \
    --eval_epochs 1 \
    --dsc_layers 2 \
    --dsc_hidden 512 \
    --pre_proj 1 \
    --mining 1 \
    --noise 0.015 \
    --radius 0.75 \
    --p 0.5 \
    --step 20 \
    --limit 64 \
  dataset \
    --distribution 2 \
    --mean 0.5 \
    --std 0.1 \
    --fg 0 \
    --rand_aug 1 \
    --batch_size 8 \
    --resize 128 \
    --imagesize 128 \
    $(class_flags $CLASSES) mvtec "$DEMO_DIR/demo" "$DEMO_DIR/textures"
