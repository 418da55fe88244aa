"""`--fuse_head`: inference through the folded linear stages (model.FusedHead) scores as the step-by-step path
(embedding, projection, discriminator) up to rounding, follows the weights, and leaves training unchanged."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import backbones
import common
import glass
import model as model_module
from conftest import TINY_NET, run_main, tiny_dataset_args
from datasets.mvtec import DatasetSplit, MVTecDataset
from test_resume import CLASS_DIR, flatten, read_rows

# Scores are probabilities in [0, 1]; the folded sums run in another order, so they differ in the last bits only.
TOLERANCE = 1e-5


def build(layers, dims, patchsize=3, pre_proj=1, dsc_layers=2, dsc_hidden=64, size=64) -> glass.GLASS:
    torch.manual_seed(0)
    backbone = backbones.load("efficientnet_lite0")
    backbone.name, backbone.seed = "efficientnet_lite0", None
    model = glass.GLASS(torch.device("cpu"))
    model.load(backbone=backbone, layers_to_extract_from=layers, device=torch.device("cpu"), input_shape=(3, size, size),
               pretrain_embed_dimension=dims[0], target_embed_dimension=dims[1], patchsize=patchsize,
               dsc_layers=dsc_layers, dsc_hidden=dsc_hidden, pre_proj=pre_proj)
    for module in model.discriminator.modules():  # running averages of a trained discriminator, not 0 and 1
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.3, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tire_images(tiny_tire) -> torch.Tensor:
    """Five real test images (good and defective) of tire at 64 px."""
    dataset = MVTecDataset(str(tiny_tire), str(tiny_tire), dataset_name="mvtec", classname="tire", resize=64,
                           imagesize=64, split=DatasetSplit.TEST)
    return torch.stack([dataset[i]["image"] for i in range(0, len(dataset), 4)][:5])


def predictions(model: glass.GLASS, images: torch.Tensor, fused: bool):
    model.fuse_head = fused
    scores, maps = model._predict(images)
    return torch.tensor(scores), torch.from_numpy(np.stack(maps))


@pytest.mark.parametrize("layers, dims, patchsize, pre_proj, dsc_layers, forms", [
    # the deeper layer upsampled to the first's grid; both layers factored: 40 and 112 channels pooled to 64
    # components each, in 8 blocks of 5 channels and 16 blocks of 7
    (["blocks.2", "blocks.4"], (128, 128), 3, 1, 2, [(8, True), (16, True)]),
    # downsampled instead; no projection; the tail alone (width 1: one convolution per layer is cheaper)
    (["blocks.4", "blocks.2"], (96, 80), 3, 0, 1, [(1, False), (1, False)]),
    # one layer, a wider patch, two projection layers, two blocks (80 channels x 25 taps pooled to 48: factored)
    (["blocks.3"], (64, 48), 5, 2, 3, [(16, True)]),
])
def test_fused_head_scores_as_the_step_by_step_path(tire_images, layers, dims, patchsize, pre_proj, dsc_layers, forms):
    model = build(layers, dims, patchsize, pre_proj, dsc_layers)
    model._eval_mode()
    with torch.no_grad():
        maps = model._layer_features(tire_images, evaluation=True)
        step_by_step = model._discriminate(model._project(model.embedder.embed_layer_features(maps)[0]))
    fused = model._fused_scores(maps)
    head = model._fused_head()
    assert [(groups, getattr(head, f"mix{i}") is not None) for i, groups in enumerate(head.groups)] == forms
    assert fused.shape == step_by_step.shape == (len(tire_images) * model.feature_grid()[0] * model.feature_grid()[1], 1)
    assert step_by_step.std() > 1e-2  # scores that vary, so that closeness says something
    assert (fused - step_by_step).abs().max() < TOLERANCE

    scores, maps_exact = predictions(model, tire_images, fused=False)
    fused_scores, fused_maps = predictions(model, tire_images, fused=True)
    assert torch.allclose(fused_scores, scores, rtol=0, atol=TOLERANCE)
    assert torch.allclose(fused_maps, maps_exact, rtol=0, atol=TOLERANCE)
    assert not torch.equal(fused_maps, maps_exact)  # another path (if equal, the flag did nothing)


def test_fused_head_follows_the_weights(tire_images):
    model = build(["blocks.2", "blocks.4"], (64, 64))
    first = predictions(model, tire_images, fused=True)[0]
    head, poolings = model._fused[1], model._fused_poolings()
    predictions(model, tire_images, fused=True)
    assert model._fused[1] is head  # unchanged weights: built once
    optimiser = torch.optim.SGD([*model.discriminator.parameters(), *model.pre_projection.parameters()], lr=0.5)
    for parameter in optimiser.param_groups[0]["params"]:
        parameter.grad = torch.randn_like(parameter)
    optimiser.step()  # in place, as training steps
    after_step = predictions(model, tire_images, fused=True)[0]
    assert model._fused[1] is not head
    assert model._fused_poolings() is poolings  # the weight-independent part is kept
    assert not torch.allclose(after_step, first, atol=1e-3)
    assert torch.allclose(after_step, predictions(model, tire_images, fused=False)[0], rtol=0, atol=TOLERANCE)
    model.discriminator.body[0][1].running_var.mul_(2.0)  # a loaded checkpoint's running averages, in place
    assert torch.allclose(predictions(model, tire_images, fused=True)[0],
                          predictions(model, tire_images, fused=False)[0], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("length, rows, groups", [
    (36, 4, 4),   # 4 channels x 9 taps, windows of 9: one channel per row
    (36, 8, 4),   # windows of 4.5 (overlapping): two rows per channel
    (36, 6, 2),   # windows of 6 straddle channels 0 and 1, 2 and 3: blocks of 2 channels, 3 rows
    (36, 5, 1),   # 5 rows share no divisor with 4 channels
    (27, 3, 3),   # 3 channels of 9 taps
])
def test_channel_groups_finds_the_pooling_blocks(length, rows, groups):
    pooling = common.pooling_matrix(length, rows).reshape(rows, length // 9, 9)
    assert model_module.channel_groups(pooling) == groups
    assert model_module.channel_groups(torch.ones(6, 4, 9)) == 1  # every row reads every channel


def test_fold_norm_is_the_batchnorm_in_evaluation():
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(5, 3).double(), torch.nn.BatchNorm1d(3).double()
    norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0), norm.weight.data.normal_(), norm.bias.data.normal_()
    norm.eval()
    weight, bias = model_module.fold_norm(linear.weight.detach(), linear.bias.detach(), norm)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.allclose(x @ weight.T + bias, norm(linear(x)), rtol=0, atol=1e-12)


def read_predictions(folder):
    with open(folder / "predictions.csv") as handle:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(handle)}


def test_fuse_head_leaves_training_unchanged_and_scores_alike(trained_tire, tiny_tire, dtd_root, tmp_path, caplog):
    caplog.set_level("INFO")
    results = tmp_path / "fused"
    assert run_main(["--results_path", results, *TINY_NET, "--fuse_head", *tiny_dataset_args(tiny_tire, dtd_root)]) == 0
    assert "--fuse_head: evaluation and inference score layer maps" in caplog.text
    assert "(the test images' layer maps, which --fuse_head reads)" in caplog.text
    config = json.loads((results / CLASS_DIR / "config.json").read_text())
    assert config["net"]["fuse_head"] is True
    # The same training (ckpt.pth: weights, optimisers, generators, all bit for bit), evaluated through the fused
    # head: only the recorded best metrics may differ, in their last digits (no image or pixel changes its rank).
    fused_state, exact_state = (dict(flatten(torch.load(folder / CLASS_DIR / "ckpt.pth", weights_only=True)))
                                for folder in (results, trained_tire))
    assert fused_state.keys() == exact_state.keys()
    for key, value in exact_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fused_state[key], value), key
        elif key.startswith("/best_record"):
            assert fused_state[key] == pytest.approx(value, abs=1e-4), key
        else:
            assert fused_state[key] == value, key
    fused_rows, exact_rows = read_rows(results), read_rows(trained_tire)
    assert [row["Row Names"] for row in fused_rows] == [row["Row Names"] for row in exact_rows] == ["mvtec_tire", "Mean"]
    for key, value in exact_rows[0].items():
        if key not in ("Row Names", "epoch", "best_epoch"):
            assert float(fused_rows[0][key]) == pytest.approx(float(value), abs=1e-4), key

    # predict --fuse_head on a copy of the exact run's class: the same decisions, scores within rounding.
    copy = tmp_path / "copy"
    shutil.copytree(trained_tire / "models", copy / "models", ignore=shutil.ignore_patterns("tb"))
    images = [str(p) for p in sorted((tiny_tire / "tire" / "test").glob("*/*.png"))[::3]]
    outputs = {}
    for flag in ([], ["--fuse_head"]):
        out = tmp_path / f"out{len(flag)}"
        assert run_main(["--results_path", copy, "predict", "-d", "tire", "--threshold", "0.5", *flag,
                         "--output", out, *images]) == 0
        outputs[bool(flag)] = read_predictions(out)
    assert outputs[True].keys() == outputs[False].keys() and len(outputs[True]) == len(images)
    for image, score in outputs[False].items():
        assert outputs[True][image] == pytest.approx(score, abs=TOLERANCE)
    assert outputs[True] != outputs[False]
