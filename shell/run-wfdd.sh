#!/usr/bin/env bash
# GLASS on WFDD with the paper's settings (WideResNet-50, layer2+layer3, 1536-d, 640 epochs, 288 px).
# Override the paths: DATAPATH=/data/wfdd AUGPATH=/data/dtd/images bash shell/run-wfdd.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # first: makes the caller's relative paths absolute, then cd's to the repository
DATAPATH=${DATAPATH:-/root/dataset/WFDD}
AUGPATH=${AUGPATH:-/root/dataset/dtd/images}
RESULTS=${RESULTS:-results}
CLASSES=${CLASSES:-"grey_cloth grid_cloth yellow_cloth pink_flower"}
require_data_folders

"$PYTHON" main.py \
    --gpu "${GPU:-0}" \
    --seed 0 \
    --test ckpt \
    --results_path "$RESULTS" \
  net \
    -b wideresnet50 \
    -le layer2 \
    -le layer3 \
    --pretrain_embed_dimension 1536 \
    --target_embed_dimension 1536 \
    --patchsize 3 \
    --meta_epochs "${EPOCHS:-640}" \
    --eval_epochs 1 \
    --dsc_layers 2 \
    --dsc_hidden 1024 \
    --pre_proj 1 \
    --mining 1 \
    --noise 0.015 \
    --radius 0.75 \
    --p 0.5 \
    --step 20 \
    --limit 392 \
    ${NET_EXTRA:-} \
  dataset \
    --distribution 0 \
    --mean 0.5 \
    --std 0.1 \
    --fg 1 \
    --rand_aug 1 \
    --batch_size 8 \
    --resize 288 \
    --imagesize 288 \
    ${DATASET_EXTRA:-} \
    $(class_flags $CLASSES) wfdd "$DATAPATH" "$AUGPATH"
