#!/usr/bin/env bash
# GLASS on your own data. Put each class in MVTec AD layout:
#   DATAPATH/<class>/train/good/*.png                       normal training images
#   DATAPATH/<class>/test/good/*.png                        normal test images
#   DATAPATH/<class>/test/<defect>/*.png                    defective test images
#   DATAPATH/<class>/ground_truth/<defect>/<name>_mask.png  their masks (same size, non-zero = defect)
# Masks are optional: without ground_truth/ the pixel metrics are reported as n/a (image metrics only); with
# masks for some defect images only, pixel metrics use the images whose ground truth is known. The layout is
# checked before training and every problem is listed at once.
# Manifold hypothesis (--distribution 2) and no foreground masks (--fg 0), as the reference's custom script;
# the dataset name `mvtec`, as there, names the class folders (results/models/backbone_0/mvtec_<class>), so this
# script finds the checkpoints of the reference's custom runs (`custom` instead names them custom_<class>).
# Override: DATAPATH=/data/mine AUGPATH=/data/dtd/images CLASSES="part_a part_b" bash shell/run-custom.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # first: makes the caller's relative paths absolute, then cd's to the repository
DATAPATH=${DATAPATH:-/root/dataset/Custom}
AUGPATH=${AUGPATH:-/root/dataset/dtd/images}
RESULTS=${RESULTS:-results}
CLASSES=${CLASSES:-"class1 class2"}
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
    --distribution 2 \
    --mean 0.5 \
    --std 0.1 \
    --fg 0 \
    --rand_aug 1 \
    --batch_size 8 \
    --resize 288 \
    --imagesize 288 \
    ${DATASET_EXTRA:-} \
    $(class_flags $CLASSES) mvtec "$DATAPATH" "$AUGPATH"
