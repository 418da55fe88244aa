"""Feature pipeline: hooks that stop early, patch unfolding, alignment, pooling, segmentor."""
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


def test_unknown_layer_is_a_one_line_error(lite0):
    with pytest.raises(GlassError, match="layer 'layer2' not found.*blocks") as info:
        common.NetworkFeatureAggregator(lite0, ["layer2"], torch.device("cpu"))
    assert "\n" not in str(info.value)


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


def test_segmentor_upsamples_and_blurs():
    segmentor = common.RescaleSegmentor(torch.device("cpu"), target_size=(32, 32))
    flat = segmentor.convert_to_segmentation(torch.full((1, 4, 4), 0.25))
    assert flat[0].shape == (32, 32) and np.allclose(flat[0], 0.25, atol=1e-6)
    peak = torch.zeros(1, 4, 4)
    peak[0, 1, 1] = 1.0
    blurred = segmentor.convert_to_segmentation(peak)[0]
    raw = segmentor.upsample(peak)[0]
    assert blurred.max() < raw.max()  # sigma-4 smoothing spreads the peak
    assert np.unravel_index(blurred.argmax(), blurred.shape) == pytest.approx((10, 10), abs=3)
