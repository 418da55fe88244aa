"""Feature pipeline: hooks that stop early, patch unfolding, alignment, pooling, segmentor."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import backbones
import common
from utils import IMAGENET_MEAN, IMAGENET_STD, GlassError


@pytest.fixture(scope="module")
def lite0():
    return backbones.load("efficientnet_lite0")


def load_tire_batch(tire_root, size, count=2):
    paths = sorted((tire_root / "tire" / "test" / "cut").glob("*.png"))[:count]
    tf = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def test_real_image_embeddings_have_one_row_per_stride8_location(lite0, tire_root):
    images = load_tire_batch(tire_root, 128)
    embedder = common.PatchEmbedder(lite0, ["blocks.2", "blocks.4"], torch.device("cpu"), (3, 128, 128), 256, 128)
    features, grids = embedder(images)
    assert grids == [[16, 16], [8, 8]]
    assert features.shape == (2 * 16 * 16, 128)
    assert torch.isfinite(features).all() and features.std() > 0


def test_the_first_layer_given_sets_the_grid_whatever_its_depth(lite0, tire_root):
    # Layers keep the order given: deeper first, the 4 x 4 grid of blocks.4 (stride 16 at 64 px) is the reference.
    images = load_tire_batch(tire_root, 64)
    embedder = common.PatchEmbedder(lite0, ["blocks.4", "blocks.2"], torch.device("cpu"), (3, 64, 64), 96, 48)
    assert embedder.feature_dimensions == [112, 40]
    maps = embedder.layer_features(images)
    assert [tuple(m.shape) for m in maps] == [(2, 112, 4, 4), (2, 40, 8, 8)]
    features, grids = embedder(images)
    assert grids == [[4, 4], [8, 8]]
    assert torch.equal(features, reference_order_embedding(maps, 96, 48))


def test_hooks_stop_the_backbone_after_the_last_wanted_layer(lite0):
    later_calls = []
    handle = lite0.blocks[5].register_forward_hook(lambda *args: later_calls.append(1))
    try:
        aggregator = common.NetworkFeatureAggregator(lite0, ["blocks.2", "blocks.4"], torch.device("cpu"))
        outputs = aggregator(torch.zeros(1, 3, 64, 64))
    finally:
        handle.remove()
    assert set(outputs) == {"blocks.2", "blocks.4"} and not later_calls
    assert aggregator.feature_dimensions((3, 64, 64)) == [40, 112]


def test_the_dimension_probe_updates_batchnorm_once_in_training_mode_as_the_reference(tire_root):
    # The reference's backbones come in training mode and its probe (a ones image) runs them whole, so every
    # BatchNorm folds the probe's statistics into its running averages.
    cpu = torch.device("cpu")
    backbone = backbones.load("efficientnet_lite0")
    pristine = {name: value.clone() for name, value in backbone.named_buffers()}
    by_hand = backbones.load("efficientnet_lite0")
    generator_before = torch.get_rng_state()
    embedder = common.PatchEmbedder(backbone, ["blocks.2", "blocks.4"], cpu, (3, 64, 64), 128, 128)
    generator_after = torch.get_rng_state()

    torch.set_rng_state(generator_before)
    by_hand.train()
    with torch.no_grad():
        by_hand(torch.ones(1, 3, 64, 64))  # through the classifier: nothing stops it
    by_hand.eval()
    assert torch.equal(torch.get_rng_state(), generator_after)
    buffers = dict(backbone.named_buffers())
    for name, value in by_hand.named_buffers():
        assert torch.equal(buffers[name], value), name
    # Every BatchNorm moved, the classifier's last one (after the wanted layers) too, and only once.
    assert not torch.equal(buffers["blocks.2.0.bn1.running_mean"], pristine["blocks.2.0.bn1.running_mean"])
    assert not torch.equal(buffers["bn2.running_var"], pristine["bn2.running_var"])
    assert int(buffers["bn2.num_batches_tracked"]) == int(pristine["bn2.num_batches_tracked"]) + 1
    # The backbone is left in eval mode, and the features are those of the updated statistics.
    assert not backbone.training
    images = load_tire_batch(tire_root, 64)
    outputs = {}
    by_hand.blocks[2].register_forward_hook(lambda module, inputs, output: outputs.update(blocks2=output))
    with torch.no_grad():
        by_hand(images)
    assert torch.equal(embedder.layer_features(images)[0], outputs["blocks2"])


def test_the_dimension_probe_draws_what_the_whole_backbone_draws_in_training_mode():
    # AlexNet's classifier has Dropout, after the wanted layers: the reference's probe draws there, which moves
    # the random stream that initialises the projection and the discriminator next.
    torch.manual_seed(0)
    backbone = backbones.load("alexnet", pretrained=False)
    by_hand = copy.deepcopy(backbone)
    generator_before = torch.get_rng_state()
    aggregator = common.NetworkFeatureAggregator(backbone, ["features.3", "features.6"], torch.device("cpu"))
    assert aggregator.feature_dimensions((3, 64, 64)) == [192, 384]
    generator_after = torch.get_rng_state()
    torch.set_rng_state(generator_before)
    with torch.no_grad():
        by_hand.train()(torch.ones(1, 3, 64, 64))
    assert not torch.equal(generator_after, generator_before)
    assert torch.equal(torch.get_rng_state(), generator_after)
    assert not backbone.training


def test_the_references_index_first_layer_names_find_the_same_layers(lite0):
    # The reference reads "2.blocks" as index 2 of "blocks" (and cannot read "blocks.2"); both work here.
    assert common.resolve_layer(lite0, "2.blocks") is common.resolve_layer(lite0, "blocks.2") is lite0.blocks[2][-1]
    aggregator = common.NetworkFeatureAggregator(lite0, ["2.blocks", "4.blocks"], torch.device("cpu"))
    lite0.eval()
    reference_order = aggregator(torch.ones(1, 3, 64, 64))
    module_path = common.NetworkFeatureAggregator(lite0, ["blocks.2", "blocks.4"], torch.device("cpu"))
    lite0.eval()
    path_order = module_path(torch.ones(1, 3, 64, 64))
    assert torch.equal(reference_order["2.blocks"], path_order["blocks.2"])
    assert torch.equal(reference_order["4.blocks"], path_order["blocks.4"])
    with pytest.raises(GlassError, match="layer '9.blocks' not found"):
        common.resolve_layer(lite0, "9.blocks")


def test_unknown_layer_is_a_one_line_error(lite0):
    with pytest.raises(GlassError, match="layer 'layer2' not found.*blocks") as info:
        common.NetworkFeatureAggregator(lite0, ["layer2"], torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_token_and_channels_last_layers_become_maps():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # a class token, then 2 x 2 patches
    maps = common.to_feature_map(tokens, prefix_tokens=1)
    assert maps.shape == (2, 3, 2, 2)
    for i in range(2):
        for j in range(2):  # patches row by row after the class token
            assert torch.equal(maps[:, :, i, j], tokens[:, 1 + 2 * i + j])
    assert torch.equal(common.to_feature_map(tokens[:, 1:]), maps)  # no class token: all tokens are patches
    # A layer before the class token is prepended (ViT's patch_embed) has a square number of tokens: all patches.
    assert torch.equal(common.to_feature_map(tokens[:, 1:], prefix_tokens=1), maps)
    nhwc = torch.randn(2, 4, 5, 3)
    assert torch.equal(common.to_feature_map(nhwc, channels_last=True), nhwc.permute(0, 3, 1, 2))
    assert common.to_feature_map(nhwc) is nhwc  # (B, C, H, W) maps pass as they are
    with pytest.raises(GlassError, match="5 tokens .0 class/distillation tokens first., which do not form a square grid"):
        common.to_feature_map(tokens)


@pytest.mark.parametrize("name, layers, channels, grid", [
    ("vit_small", ["blocks.4", "blocks.8"], [384, 384], 14),  # one class token
    ("vit_deit_distilled", ["blocks.2", "blocks.4"], [768, 768], 14),  # class and distillation tokens
    ("vit_swin_base", ["layers.1", "layers.2"], [256, 512], 28),  # (B, H, W, C) stages
])
def test_transformer_backbones_give_maps_of_their_patch_tokens(tire_root, name, layers, channels, grid):
    backbone = backbones.load(name, pretrained=False)  # random weights: the layout does not depend on them
    embedder = common.PatchEmbedder(backbone, layers, torch.device("cpu"), (3, 224, 224), 64, 64)
    assert embedder.feature_dimensions == channels
    captured = {}
    handle = backbone.get_submodule(layers[0]).register_forward_hook(lambda m, i, out: captured.setdefault("raw", out))
    images = load_tire_batch(tire_root, 224)
    maps = embedder.layer_features(images)
    handle.remove()
    raw = captured["raw"]
    assert maps[0].shape == (2, channels[0], grid, grid)
    if raw.dim() == 3:
        prefix = raw.shape[1] - grid * grid
        assert prefix == backbone.num_prefix_tokens > 0
        assert torch.equal(maps[0][:, :, 3, 5], raw[:, prefix + 3 * grid + 5])
    else:
        assert torch.equal(maps[0][:, :, 3, 5], raw[:, 3, 5])
    embeddings, grids = embedder.embed_layer_features(maps)
    assert embeddings.shape == (2 * grid * grid, 64) and grids[0] == [grid, grid]


def test_transformer_at_another_image_size_is_a_one_line_error():
    backbone = backbones.load("vit_small", pretrained=False)
    with pytest.raises(GlassError, match=r"cannot take 128x128 images \(Input height \(128\) doesn't match model "
                                         r"\(224\)\.\): choose another --imagesize"):
        common.PatchEmbedder(backbone, ["blocks.4"], torch.device("cpu"), (3, 128, 128), 64, 64)


def test_align_patches_is_bilinear_per_component():
    patches = torch.arange(16.0).reshape(1, 4, 1, 2, 2)  # grid 2x2, one channel, 2x2 patches
    aligned = common.align_patches(patches, [2, 2], [4, 4])
    assert aligned.shape == (1, 16, 1, 2, 2)
    component = patches[0, :, 0, 0, 0].reshape(1, 1, 2, 2)
    expected = torch.nn.functional.interpolate(component, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(aligned[0, :, 0, 0, 0], expected.flatten())
    assert torch.equal(common.align_patches(patches, [2, 2], [2, 2]), patches)


def test_mean_mapper_and_aggregator_pool_adaptively():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert common.MeanMapper(2)(x).tolist() == [[1.5, 3.5]]
    stacked = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])  # 1 patch, 2 layers, 2 dims
    assert common.Aggregator(2)(stacked).tolist() == [[2.0, 6.0]]


def test_segmentor_upsamples_bilinearly_with_pixel_centres_and_blurs_with_mirrored_borders():
    # 2 x 2 -> 4 x 4 with align_corners=False: output pixel centres at input coordinates -0.25, 0.25, 0.75, 1.25,
    # clamped at the borders: weights along each axis (1, 0), (.75, .25), (.25, .75), (0, 1).
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=(4, 4))
    up = segmentor.upsample(torch.tensor([[[0.0, 4.0], [8.0, 12.0]]]))[0]
    axis = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    assert np.allclose(up, axis @ np.array([[0.0, 4.0], [8.0, 12.0]]) @ axis.T, atol=1e-6)
    # The blur is scipy's sigma-4 Gaussian with 'reflect' borders (d c b a | a b c d), truncated at 4 sigma.
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=(40, 40))
    scores = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(0))
    raw, blurred = segmentor.upsample(scores)[0].astype(np.float64), segmentor.convert_to_segmentation(scores)[0]
    taps = np.exp(-0.5 * (np.arange(-16, 17) / 4.0) ** 2)
    taps /= taps.sum()
    padded = np.pad(raw, 16, mode="symmetric")  # numpy's 'symmetric' is scipy's 'reflect'
    by_hand = np.array([[(padded[i:i + 33, j:j + 33] * np.outer(taps, taps)).sum() for j in range(40)]
                        for i in range(40)])
    assert np.allclose(blurred, by_hand, atol=1e-5)


@pytest.mark.parametrize("grid, size", [((2, 2), (4, 4)), ((5, 7), (40, 56)), ((16, 16), (128, 128)), ((9, 9), (4, 6))])
def test_segmentor_products_give_the_upsampled_and_blurred_maps(grid, size):
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=size)
    scores = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1))
    by_products, exact = np.stack(segmentor.convert_by_products(scores)), np.stack(segmentor.convert_to_segmentation(scores))
    assert by_products.shape == exact.shape == (3, *size)
    assert np.abs(by_products - exact).max() < 1e-6
    assert segmentor.operators(grid)[0] is segmentor.operators(grid)[0]  # built once per grid
    # the upsampling matrix of 2 -> 4 values (pixel centres, clamped borders), as in the test above
    assert np.allclose(common.upsampling_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-12)


def test_ensure_eval_sets_evaluation_mode_only_where_needed():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    module.eval()
    module[1][0].train()  # one submodule in training mode
    common.ensure_eval(module)
    assert not any(sub.training for sub in module.modules())
    calls = []
    module.eval = lambda: calls.append(1)
    common.ensure_eval(module)
    assert calls == []  # all in evaluation mode already: not walked again


def test_segmentor_upsamples_and_blurs():
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=(32, 32))
    flat = segmentor.convert_to_segmentation(torch.full((1, 4, 4), 0.25))
    assert flat[0].shape == (32, 32) and np.allclose(flat[0], 0.25, atol=1e-6)
    peak = torch.zeros(1, 4, 4)
    peak[0, 1, 1] = 1.0
    blurred = segmentor.convert_to_segmentation(peak)[0]
    raw = segmentor.upsample(peak)[0]
    assert blurred.max() < raw.max()  # smoothing spreads the peak
    assert np.unravel_index(blurred.argmax(), blurred.shape) == pytest.approx((10, 10), abs=3)

    # sigma 4: a Gaussian blur adds sigma^2 = 16 to the spatial variance of a map along each axis (a central
    # peak on a larger map, so that the borders do not matter).
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=(96, 96))
    peak = torch.zeros(1, 8, 8)
    peak[0, 3:5, 3:5] = 1.0
    raw, blurred = segmentor.upsample(peak)[0], segmentor.convert_to_segmentation(peak)[0]

    def variances(image: np.ndarray) -> np.ndarray:
        weights = image / image.sum()
        rows, cols = np.indices(image.shape)
        return np.array([((rows - (weights * rows).sum()) ** 2 * weights).sum(),
                         ((cols - (weights * cols).sum()) ** 2 * weights).sum()])

    assert variances(blurred.astype(np.float64)) - variances(np.asarray(raw, dtype=np.float64)) == \
        pytest.approx([16.0, 16.0], rel=0.01)


# --------------------------------------------------------------------------------------------------
# The fast CPU embedding (PatchEmbedder._embed_rows) against the pipeline written out step by step.

def reference_order_embedding(layer_maps, pretrain_dim, target_dim, patchsize=3):
    """The spec's feature pipeline in its plain order: unfold each layer into (B, positions, C, p, p)
    patches, bilinearly resize every patch component of the deeper layers to the first layer's grid,
    flatten each patch and pool it with adaptive_avg_pool1d, stack the layers, pool again."""
    pad = (patchsize - 1) // 2
    patches, grids = [], []
    for fmap in layer_maps:
        b, c, h, w = fmap.shape
        unfolded = torch.nn.functional.unfold(fmap, kernel_size=patchsize, padding=pad, stride=1)
        patches.append(unfolded.reshape(b, c, patchsize, patchsize, h * w).permute(0, 4, 1, 2, 3))
        grids.append((h, w))
    for i in range(1, len(patches)):
        b, _, c, p, _ = patches[i].shape
        (h, w), (rh, rw) = grids[i], grids[0]
        planes = patches[i].reshape(b, h, w, c, p, p).permute(0, 3, 4, 5, 1, 2).reshape(-1, 1, h, w)
        planes = torch.nn.functional.interpolate(planes, size=(rh, rw), mode="bilinear", align_corners=False)
        patches[i] = planes.reshape(b, c, p, p, rh, rw).permute(0, 4, 5, 1, 2, 3).reshape(b, rh * rw, c, p, p)
    pooled = []
    for x in patches:
        flat = x.reshape(-1, 1, int(np.prod(x.shape[-3:])))
        pooled.append(torch.nn.functional.adaptive_avg_pool1d(flat, pretrain_dim).squeeze(1))
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return torch.nn.functional.adaptive_avg_pool1d(stacked, target_dim).reshape(len(pooled[0]), -1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bit pattern (so -0.0 differs from 0.0 and NaNs compare by payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = torch.int32 if a.dtype == torch.float32 else torch.int64
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length,output", [(360, 512), (1008, 512), (1024, 512), (4608, 1536), (100, 7), (7, 100), (9, 9)])
def test_pool_rows_is_adaptive_avg_pool1d_bit_for_bit(length, output, dtype):
    gen = torch.Generator().manual_seed(length * 7 + output)
    values = (torch.randn(length, 37, generator=gen) * torch.exp(3 * torch.randn(length, 37, generator=gen))).to(dtype)
    values[:4, 0] = -0.0  # an all -0.0 window pools to +0.0 in the kernel (it starts its sum at 0)
    values[5 % length, 1], values[6 % length, 2], values[3, 3] = float("inf"), float("-inf"), float("nan")
    expected = torch.nn.functional.adaptive_avg_pool1d(values.t().reshape(37, 1, length), output).reshape(37, output).t()
    assert same_bits(common.pool_rows(values, output), expected)


@pytest.mark.parametrize("length,output", [(360, 512), (1008, 512), (4608, 1536), (100, 7), (7, 100), (9, 9)])
def test_pooling_matrix_is_adaptive_avg_pool1d_of_an_identity(length, output):
    identity = torch.eye(length, dtype=torch.float64)
    expected = torch.nn.functional.adaptive_avg_pool1d(identity.reshape(length, 1, length), output).squeeze(1).t()
    assert torch.equal(common.pooling_matrix(length, output), expected)
    values = torch.randn(length, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    assert torch.allclose(common.pooling_matrix(length, output) @ values, common.pool_rows(values, output))


@pytest.mark.parametrize("size,layers,dims,batch", [
    (128, ["blocks.2", "blocks.4"], (512, 512), 8),  # the CPU calibration profile
    (128, ["blocks.2", "blocks.4"], (512, 512), 1),
    (96, ["blocks.1", "blocks.2", "blocks.4"], (300, 200), 3),  # three layers, uneven windows
    (64, ["blocks.2", "blocks.4"], (128, 128), 2),  # the tests' tiny profile
])
def test_fast_embedding_equals_the_reference_order_bit_for_bit(lite0, tire_root, size, layers, dims, batch):
    images = load_tire_batch(tire_root, size, count=batch)
    embedder = common.PatchEmbedder(lite0, layers, torch.device("cpu"), (3, size, size), *dims)
    maps = embedder.layer_features(images)
    assert embedder._rows_path_applies(maps)
    fast, grids = embedder.embed_layer_features(maps)
    stepwise, stepwise_grids = embedder.embed_layer_features_stepwise(maps)
    expected = reference_order_embedding(maps, *dims)
    assert grids == stepwise_grids and fast.is_contiguous()
    assert same_bits(fast, expected) and same_bits(stepwise, expected)
    # float64 maps take the fast path too
    assert same_bits(embedder.embed_layer_features([m.double() for m in maps])[0],
                     reference_order_embedding([m.double() for m in maps], *dims))


@pytest.mark.parametrize("patchsize", [1, 5])
def test_the_patchsize_given_to_glass_shapes_the_embedding(tire_root, patchsize):
    """--patchsize reaches the embedder that GLASS.load builds: p x p neighbourhoods (1: the position alone)."""
    import glass

    cpu = torch.device("cpu")
    model = glass.GLASS(cpu)
    model.load(backbones.load("efficientnet_lite0"), ["blocks.2", "blocks.4"], cpu, (3, 64, 64), 96, 48,
               patchsize=patchsize, dsc_hidden=16)
    maps = model.embedder.layer_features(load_tire_batch(tire_root, 64))
    expected = reference_order_embedding(maps, 96, 48, patchsize=patchsize)
    assert not same_bits(expected, reference_order_embedding(maps, 96, 48, patchsize=3))
    assert same_bits(model.embedder.embed_layer_features(maps)[0], expected)
    assert same_bits(model.embedder.embed_layer_features_stepwise(maps)[0], expected)


def test_embedding_keeps_the_stepwise_path_when_gradients_are_wanted(lite0):
    embedder = common.PatchEmbedder(lite0, ["blocks.2", "blocks.4"], torch.device("cpu"), (3, 64, 64), 64, 64)
    maps = [m.clone().requires_grad_(True) for m in embedder.layer_features(torch.randn(2, 3, 64, 64))]
    assert not embedder._rows_path_applies(maps)
    features, _ = embedder.embed_layer_features(maps)
    features.sum().backward()
    assert all(m.grad is not None for m in maps)
    with torch.no_grad():
        assert embedder._rows_path_applies(maps)


def test_a_frozen_backbone_gives_its_eval_mode_features_while_training_and_a_trained_one_after(tire_root):
    # The reference: backbone in training mode only while training it (--train_backbone, not evaluating); otherwise
    # eval mode under no_grad, so a frozen backbone's BatchNorm layers use (and keep) their running statistics.
    cpu = torch.device("cpu")
    images = load_tire_batch(tire_root, 64)
    for train_backbone in (False, True):
        backbone = backbones.load("efficientnet_lite0")
        embedder = common.PatchEmbedder(backbone, ["blocks.2"], cpu, (3, 64, 64), 64, 64, train_backbone=train_backbone)
        by_hand = backbones.load("efficientnet_lite0")
        by_hand.load_state_dict(backbone.state_dict())  # after the probe: the statistics every feature uses
        captured = {}
        by_hand.blocks[2].register_forward_hook(lambda module, inputs, output: captured.update(blocks2=output))
        with torch.no_grad():
            by_hand(images)
        buffers = {name: value.clone() for name, value in backbone.named_buffers()}

        training = embedder.layer_features(images, evaluation=False)[0]
        if not train_backbone:
            assert torch.equal(training, captured["blocks2"]) and not training.requires_grad
            for name, value in backbone.named_buffers():
                assert torch.equal(value, buffers[name]), name
        else:  # batch statistics, gradients, and every BatchNorm before blocks.2 updated
            assert training.requires_grad and not torch.allclose(training, captured["blocks2"])
            assert not torch.equal(backbone.bn1.running_mean, buffers["bn1.running_mean"])
        # Evaluation: eval mode again, whatever the training call left.
        by_hand.load_state_dict(backbone.state_dict())
        with torch.no_grad():
            by_hand(images)
        evaluated = embedder.layer_features(images)[0]
        assert not backbone.training and torch.equal(evaluated, captured["blocks2"])
