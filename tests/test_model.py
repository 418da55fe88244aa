"""Discriminator, projection and focal loss: names, shapes, gradients and known values."""
import copy
import math

import pytest
import torch

from loss import FocalLoss
from model import Discriminator, LinearWithKnownRows, PatchMaker, Projection


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_discriminator_shapes_names_and_gradients(n_layers):
    torch.manual_seed(0)
    disc = Discriminator(16, n_layers=n_layers, hidden=8)
    x = torch.randn(10, 16)
    out = disc(x)
    assert out.shape == (10, 1)
    assert torch.all((out > 0) & (out < 1))
    out.sum().backward()
    for name, param in disc.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    names = set(disc.state_dict())
    assert "tail.0.weight" in names and "tail.0.bias" not in names
    for k in range(1, n_layers):
        assert {f"body.block{k}.0.weight", f"body.block{k}.1.running_mean"} <= names


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_discriminator_continues_from_its_first_linear_layer(n_layers):
    torch.manual_seed(0)
    disc = Discriminator(16, n_layers=n_layers, hidden=8)
    x = torch.randn(10, 16)
    split = copy.deepcopy(disc)  # train mode: each pass moves the BatchNorm running averages
    assert torch.equal(split.from_first_linear(split.first_linear()(x)), disc(x))
    for ours, theirs in zip(split.buffers(), disc.buffers()):
        assert torch.equal(ours, theirs)
    first = "body.block1.0.weight" if n_layers > 1 else "tail.0.weight"
    assert split.first_linear().weight is dict(split.named_parameters())[first]


@pytest.mark.parametrize("known_rows, rows, dim", [(3, 7, 5), (64, 128, 32), (2048, 4096, 512)])
def test_linear_with_known_rows_is_f_linear_bit_for_bit(known_rows, rows, dim):
    """Output, input, weight and bias gradients of LinearWithKnownRows equal those of F.linear through autograd; its
    known rows are used as given (not recomputed) and only the other rows reach the matrix product."""
    generator = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(dim, dim)
    features = torch.randn(rows, dim, generator=generator)
    upstream = torch.randn(rows, dim, generator=generator)
    outcomes = []
    for reuse in (False, True):
        linear.zero_grad(set_to_none=True)
        inputs = features.clone().requires_grad_(True)
        if reuse:
            with torch.no_grad():
                known = linear(features[:known_rows])
            out = LinearWithKnownRows.apply(inputs, linear.weight, linear.bias, known)
        else:
            out = linear(inputs)
        (out * upstream).sum().backward()
        outcomes.append([out.detach(), inputs.grad, linear.weight.grad, linear.bias.grad])
    for plain, reused in zip(*outcomes):
        assert torch.equal(plain, reused)

    marked = torch.full((known_rows, dim), 7.0)
    out = LinearWithKnownRows.apply(features, linear.weight, linear.bias, marked)
    assert torch.equal(out[:known_rows], marked)
    assert torch.equal(out[known_rows:], linear(features)[known_rows:].detach())


def test_projection_names_and_default_single_linear():
    assert list(Projection(12, 12).state_dict()) == ["layers.0fc.weight", "layers.0fc.bias"]
    proj = Projection(12, 12, n_layers=2)
    assert list(proj.state_dict()) == ["layers.0fc.weight", "layers.0fc.bias", "layers.1fc.weight", "layers.1fc.bias"]
    assert proj(torch.randn(3, 12)).shape == (3, 12)
    x = torch.randn(3, 12)  # no activation between the layers: two affine maps in a row
    assert torch.allclose(proj(x), proj.layers[1](proj.layers[0](x)))


def test_xavier_normal_init_scale():
    torch.manual_seed(0)
    proj = Projection(512, 512)
    # Xavier normal: std = sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 1024)
    assert proj.layers[0].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.02)
    disc = Discriminator(512, n_layers=2, hidden=256)  # every Linear layer of the discriminator too
    assert disc.body.block1[0].weight.std().item() == pytest.approx(math.sqrt(2 / (512 + 256)), rel=0.02)
    assert disc.tail[0].weight.std().item() == pytest.approx(math.sqrt(2 / (256 + 1)), rel=0.1)
    # Normal, not uniform (same std): 2 (1 - Phi(sqrt 3)) = 8.33 % of a normal's values lie beyond sqrt(3) std,
    # where a uniform of that std has none.
    weight = proj.layers[0].weight
    beyond = (weight.abs() > math.sqrt(3) * math.sqrt(2 / 1024)).float().mean().item()
    assert beyond == pytest.approx(math.erfc(math.sqrt(3) / math.sqrt(2)), abs=0.005)


def test_focal_loss_known_value():
    s = 0.8
    probs = torch.tensor([[1 - s, s], [1 - 0.3, 0.3]])
    target = torch.tensor([[1.0], [0.0]])
    smooth = 1e-5
    pt1 = smooth * (1 - s) + (1 - smooth) * s + smooth
    pt2 = (1 - smooth) * 0.7 + smooth * 0.3 + smooth
    expected = (-(1 - pt1) ** 2 * math.log(pt1) - (1 - pt2) ** 2 * math.log(pt2)) / 2
    assert FocalLoss()(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_is_small_for_confident_correct_predictions():
    probs = torch.tensor([[0.01, 0.99], [0.99, 0.01]])
    target = torch.tensor([[1.0], [0.0]])
    assert FocalLoss()(probs, target).item() < 1e-5


def test_patch_maker_unfold_and_score():
    maker = PatchMaker(3, stride=1)
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    patches, grid = maker.patchify(x, return_spatial_info=True)
    assert grid == [3, 3] and patches.shape == (1, 9, 1, 3, 3)
    assert torch.equal(patches[0, 4, 0], x[0, 0])  # the centre patch is the whole map
    assert torch.equal(patches[0, 0, 0], torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 3, 4]]))  # zero padding
    scores = torch.tensor([[0.1], [0.9], [0.3], [0.2]])
    assert maker.score(maker.unpatch_scores(scores, batchsize=2)).tolist() == pytest.approx([0.9, 0.3])
