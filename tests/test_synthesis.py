"""GAS, LAS and hard-sample mining on tiny tensors with known answers."""
import contextlib
import copy
from unittest import mock

import pytest
import torch

import glass
import model
from glass import (
    FrozenTrueHalf, ascent_gradient_from_scores, ascent_pass_is_exact, global_anomaly_synthesis, hard_sample_mining,
    local_anomaly_synthesis, truncate_to_band,
)
from model import Discriminator, LinearWithKnownRows, OneDNNLinearMode, onednn_linear, onednn_linear_available


def test_truncate_to_band_clamps_distances_and_keeps_directions():
    anchors = torch.zeros(3, 2)
    points = torch.tensor([[0.1, 0.0], [0.0, 0.7], [3.0, 4.0]])
    out = truncate_to_band(points, anchors, 0.5, 1.0)
    assert torch.allclose(torch.norm(out, dim=1), torch.tensor([0.5, 0.7, 1.0]), atol=1e-6)
    assert torch.allclose(out[2], torch.tensor([0.6, 0.8]), atol=1e-6)


@pytest.mark.parametrize("hypersphere", [0, 1])
def test_gas_moves_features_into_the_truncation_band(hypersphere):
    torch.manual_seed(0)
    disc = Discriminator(8, n_layers=2, hidden=16)
    true_feats = torch.randn(64, 8, requires_grad=True)
    center = torch.zeros(64, 8)
    r_t = torch.tensor([2.0])
    gas = global_anomaly_synthesis(disc, true_feats, center, r_t, noise_std=0.015, steps=5, hypersphere=hypersphere, mining=1, radius=0.75)
    # With 5 steps the truncation at step 5 is the last move.
    if hypersphere == 0:
        dist = torch.norm(gas.gaus_feats - true_feats, dim=1)
        assert torch.all(dist >= 0.5 - 1e-5) and torch.all(dist <= 1.0 + 1e-5)
    else:
        dist = torch.norm(gas.gaus_feats - center, dim=1)
        assert torch.all(dist >= 2.0 - 1e-5) and torch.all(dist <= 4.0 + 1e-5)
    assert gas.r_g.item() > 0
    # The final loss reaches the true features (and through them the projection) for the backward pass.
    gas.bce_loss.backward()
    assert true_feats.grad is not None and torch.isfinite(true_feats.grad).all()

@pytest.mark.parametrize("steps", [0, 3, 4, 9])
def test_r_g_is_measured_at_the_last_truncation_and_nan_without_one(steps):
    # Truncation (and r_g) comes after every 5th ascent step; with fewer steps there is none to measure.
    torch.manual_seed(0)
    disc = Discriminator(8, n_layers=2, hidden=16)
    true_feats, center = torch.randn(64, 8, requires_grad=True), torch.zeros(64, 8)
    calls = []
    with mock.patch.object(glass, "quantile_radius", side_effect=lambda d, q: calls.append(d.clone()) or torch.quantile(d, q)):
        gas = global_anomaly_synthesis(disc, true_feats, center, torch.tensor([2.0]), 0.015, steps, 0, 1, 0.75)
    assert len(calls) == steps // 5
    if calls:
        assert gas.r_g.item() == torch.quantile(calls[-1], 0.75).item() > 0
    else:
        assert torch.isnan(gas.r_g).all()



def test_gas_without_mining_is_plain_gaussian_noise():
    torch.manual_seed(0)
    disc = Discriminator(8, n_layers=2, hidden=16)
    true_feats = torch.randn(32, 8)
    torch.manual_seed(1)
    gas = global_anomaly_synthesis(disc, true_feats, torch.zeros(32, 8), torch.tensor([1.0]), 0.015, 20, 0, 0, 0.75)
    torch.manual_seed(1)
    expected = true_feats + torch.normal(0, 0.015, true_feats.shape)
    assert torch.equal(gas.gaus_feats, expected)


def test_las_pushes_only_masked_features_on_the_hypersphere():
    feats = torch.tensor([[0.1, 0.0], [0.0, 0.2], [5.0, 0.0], [0.3, 0.4]])
    mask = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    center = torch.zeros(4, 2)
    out, r_f = local_anomaly_synthesis(feats, mask, center, torch.tensor([1.0]), hypersphere=1, radius=0.75)
    assert torch.allclose(torch.norm(out, dim=1), torch.tensor([2.0, 0.2, 4.0, 2.0]), atol=1e-6)
    assert torch.equal(out[1], feats[1])
    # r_f: 0.75 quantile of the masked distances [0.1, 5.0, 0.5], linear interpolation: 0.5 + 0.5 * (5.0 - 0.5)
    assert r_f.item() == pytest.approx(2.75)
    same, _ = local_anomaly_synthesis(feats, mask, center, torch.tensor([1.0]), hypersphere=0, radius=0.75)
    assert torch.equal(same, feats)


def test_las_on_a_leaf_that_requires_gradients_keeps_them():
    # With --pre_proj 0 the trainer's fake features are leaves that require gradients; the reference's in-place
    # write crashes there. Out of place, the pushed rows carry the gradient of the band truncation.
    feats = torch.tensor([[0.1, 0.0], [0.0, 0.2], [5.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0], [0.0], [1.0]])
    out, _ = local_anomaly_synthesis(feats, mask, torch.zeros(3, 2), torch.tensor([1.0]), hypersphere=1, radius=0.75)
    out.sum().backward()
    assert torch.equal(feats.grad[1], torch.ones(2))  # unmasked row: identity
    assert not torch.equal(feats.grad[0], torch.ones(2))  # masked row: through the rescaling to 2 r_t


def test_hard_sample_mining_keeps_the_largest_errors():
    scores = torch.tensor([[0.1], [0.9], [0.4], [0.6]])
    labels = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    kept_scores, kept_labels = hard_sample_mining(scores, labels, 0.5)
    # squared errors 0.01, 0.81, 0.36, 0.16 -> median 0.26 -> keep 0.9 and 0.4
    assert kept_scores.flatten().tolist() == pytest.approx([0.9, 0.4])
    assert kept_labels.flatten().tolist() == [0.0, 1.0]
    all_scores, _ = hard_sample_mining(scores, labels, 0)
    assert torch.equal(all_scores, scores)
    # "At or above" the quantile: with an odd count the median is one of the errors, and it is kept.
    kept_scores, _ = hard_sample_mining(scores[:3], labels[:3], 0.5)  # errors 0.01, 0.81, 0.36: median 0.36
    assert kept_scores.flatten().tolist() == pytest.approx([0.9, 0.4])
    kept_scores, kept_labels = hard_sample_mining(scores, labels, 1.0)  # only the largest error, 0.81
    assert kept_scores.flatten().tolist() == pytest.approx([0.9]) and kept_labels.flatten().tolist() == [0.0]


def run_gas(disc, true_feats, hypersphere, frozen: bool, by_hand: bool = True):
    """GAS with the plain passes or through a FrozenTrueHalf (ascent steps, and the final pass where the first
    Linear layer has a bias), then the backward pass of its final loss."""
    torch.manual_seed(1)
    calls, finals = [], []
    frozen_half = FrozenTrueHalf(disc, true_feats)
    frozen_half.by_hand &= by_hand
    reuse_final = frozen and frozen_half.reusable_in_final_pass

    def ascent(gaus_feats):
        calls.append(len(gaus_feats))
        return frozen_half.gradient(gaus_feats)

    def final(gaus_feats):
        finals.append(len(gaus_feats))
        return frozen_half.final_scores(gaus_feats)
    gas = global_anomaly_synthesis(disc, true_feats, torch.zeros_like(true_feats), torch.tensor([2.0]), noise_std=0.015,
                                   steps=10, hypersphere=hypersphere, mining=1, radius=0.75,
                                   ascent_gradient=ascent if frozen else None, final_scores=final if reuse_final else None)
    assert calls == ([len(true_feats)] * 10 if frozen else [])  # every ascent step, not the final one
    assert finals == ([len(true_feats)] if reuse_final else [])
    gas.bce_loss.backward()
    return gas


@pytest.mark.parametrize("hypersphere", [0, 1])
@pytest.mark.parametrize("rows, dim, n_layers, by_hand", [
    (64, 8, 1, False), (64, 8, 2, True), (64, 8, 2, False), (48, 8, 3, False), (1024, 128, 2, True),
    (1024, 128, 2, False), (2 * 256, 512, 2, True),
])
def test_frozen_true_half_gives_the_plain_passes_bits(hypersphere, rows, dim, n_layers, by_hand):
    """GAS through FrozenTrueHalf.gradient, by hand (one hidden block on the CPU) or through autograd, trains to
    the bits of the plain passes: losses, scores, features, BatchNorm's running averages and every gradient."""
    outcomes = []
    for frozen in (False, True):
        torch.manual_seed(0)
        disc = Discriminator(dim, n_layers=n_layers, hidden=dim)
        true_feats = (torch.randn(rows, dim) * 0.5).requires_grad_(True)
        assert FrozenTrueHalf(disc, true_feats).by_hand == (n_layers == 2)
        assert FrozenTrueHalf(disc, true_feats).reusable_in_final_pass == (n_layers > 1)  # the tail has no bias
        gas = run_gas(disc, true_feats, hypersphere, frozen, by_hand)
        outcomes.append([gas.bce_loss, gas.true_scores, gas.gaus_scores, gas.gaus_feats, gas.r_g, true_feats.grad,
                         *disc.buffers(), *(p.grad for p in disc.parameters())])
    plain, frozen = outcomes
    assert len(plain) == len(frozen)
    for a, b in zip(plain, frozen):
        assert torch.equal(a, b)


def one_ulp_up(tensor: torch.Tensor) -> torch.Tensor:
    """Every value moved to the next float above it."""
    return torch.nextafter(tensor, torch.full_like(tensor, float("inf")))


def test_ascent_probe_accepts_exact_passes_and_refuses_others(monkeypatch):
    torch.manual_seed(0)
    disc = Discriminator(32, n_layers=2, hidden=32)
    true_feats = torch.randn(256, 32)
    before = [b.clone() for b in disc.buffers()]
    state = torch.random.get_rng_state()
    assert ascent_pass_is_exact(disc, true_feats, 0.015)
    # The probe works on copies and leaves the random stream alone.
    assert all(torch.equal(a, b) for a, b in zip(before, disc.buffers()))
    assert torch.equal(state, torch.random.get_rng_state())

    # A device whose matrix product gave a row other bits in a smaller batch: one ulp on the true half.
    frozen_init = FrozenTrueHalf.__init__

    def off_by_one_ulp(self, *args):
        frozen_init(self, *args)
        self.true_half.copy_(one_ulp_up(self.true_half))
    monkeypatch.setattr(FrozenTrueHalf, "__init__", off_by_one_ulp)
    assert not ascent_pass_is_exact(disc, true_feats, 0.015)
    monkeypatch.setattr(FrozenTrueHalf, "__init__", frozen_init)

    # Same gradient, but BatchNorm's running mean one ulp off after the pass by hand: refused as well.
    by_hand = FrozenTrueHalf._gradient_by_hand

    def running_mean_off_by_one_ulp(self, gaus_feats):
        gradient = by_hand(self, gaus_feats)
        mean = self.discriminator.body[0][1].running_mean
        mean.copy_(one_ulp_up(mean))
        return gradient
    monkeypatch.setattr(FrozenTrueHalf, "_gradient_by_hand", running_mean_off_by_one_ulp)
    assert not ascent_pass_is_exact(disc, true_feats, 0.015)
    monkeypatch.setattr(FrozenTrueHalf, "_gradient_by_hand", by_hand)

    # With final_pass it also checks GAS's final pass through final_scores: its weight gradient one ulp off.
    backward = LinearWithKnownRows.backward

    def weight_gradient_off_by_one_ulp(ctx, grad):
        grads = backward(ctx, grad)
        return grads[0], one_ulp_up(grads[1]), *grads[2:]
    monkeypatch.setattr(LinearWithKnownRows, "backward", staticmethod(weight_gradient_off_by_one_ulp))
    assert ascent_pass_is_exact(disc, true_feats, 0.015)
    assert not ascent_pass_is_exact(disc, true_feats, 0.015, final_pass=True)
    monkeypatch.setattr(LinearWithKnownRows, "backward", staticmethod(backward))
    assert ascent_pass_is_exact(disc, true_feats, 0.015, final_pass=True)
    # A discriminator without hidden blocks has no bias to reuse the first layer with: only the ascent step is checked.
    assert ascent_pass_is_exact(Discriminator(32, n_layers=1, hidden=32), true_feats, 0.015, final_pass=True)


def test_frozen_true_half_runs_the_true_half_through_the_first_layer_once():
    """Through autograd (a deeper discriminator), every ascent step runs only the synthetic half through the first
    Linear layer: the true half's output is computed once, when the FrozenTrueHalf is made."""
    torch.manual_seed(0)
    disc = Discriminator(8, n_layers=3, hidden=8)
    rows = []
    disc.first_linear().register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    true_feats = torch.randn(12, 8)
    half = FrozenTrueHalf(disc, true_feats)
    assert not half.by_hand and rows == [12]
    gaus_feats = (true_feats[:5] + 0.1).requires_grad_(True)
    for _ in range(3):
        half.gradient(gaus_feats)
    assert rows == [12, 5, 5, 5]


def test_gradient_by_hand_only_where_it_is_autograd_s_computation():
    """The hand-written backward covers the default discriminator in training mode on the CPU in float32; any
    other layer stack, BatchNorm setting or dtype goes through autograd."""
    feats = torch.randn(16, 8)

    def by_hand(disc, true_feats=feats):
        return FrozenTrueHalf(disc, true_feats).by_hand

    assert by_hand(Discriminator(8, n_layers=2, hidden=8))
    assert not by_hand(Discriminator(8, n_layers=3, hidden=8))
    assert not by_hand(Discriminator(8, n_layers=2, hidden=8).double(), feats.double())
    cumulative = Discriminator(8, n_layers=2, hidden=8)
    cumulative.body[0][1].momentum = None  # running averages with 1 / num_batches_tracked
    assert not by_hand(cumulative)
    assert not by_hand(Discriminator(8, n_layers=2, hidden=8).eval())


needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN Linear kernel")


@needs_onednn
def test_onednn_linear_layers_compute_what_torch_s_do():
    """Small integers: every product and sum is exact in float32, so oneDNN's Linear layers (forward, and the
    input, weight and bias gradients) must give torch's values exactly; 3-D inputs are left to torch."""
    x = (torch.arange(24, dtype=torch.float32).reshape(6, 4) - 10).requires_grad_(True)
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2, 0, 3], [4, 1, -1, 0], [0, 0, 2, -5]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(onednn_linear(x.detach(), layer.weight.detach()), x.detach() @ layer.weight.detach().T)
    upstream = torch.arange(18, dtype=torch.float32).reshape(6, 3) - 7
    outcomes = []
    for mode in (contextlib.nullcontext(), OneDNNLinearMode()):
        x.grad = None
        layer.zero_grad()
        with mode:
            out = layer(x)
        out.backward(upstream)
        outcomes.append([out, x.grad, layer.weight.grad, layer.bias.grad])
    for torch_value, onednn_value in zip(*outcomes):
        assert torch.equal(torch_value, onednn_value)
    routed = []
    apply = model.OneDNNLinear.apply
    with mock.patch.object(model.OneDNNLinear, "apply", lambda *args: routed.append(args[0].dim()) or apply(*args)):
        with OneDNNLinearMode():
            layer(x)
            layer(x.detach().reshape(2, 3, 4))  # (B, tokens, C), as in transformer backbones: torch's own
    assert routed == [2]


@needs_onednn
def test_onednn_ascent_pass_is_the_plain_pass_up_to_rounding(monkeypatch):
    """--onednn: the pass by hand with its two matrix products (and the true half's) through oneDNN gives the
    plain pass's gradient and BatchNorm running averages up to float32 rounding."""
    calls = []
    monkeypatch.setattr(glass, "onednn_linear", lambda *args: calls.append(len(args[0])) or onednn_linear(*args))
    torch.manual_seed(0)
    disc = Discriminator(128, n_layers=2, hidden=128)
    true_feats = torch.randn(512, 128) * 0.5
    gaus_feats = (true_feats + 0.015 * torch.randn(512, 128)).requires_grad_(True)
    frozen_disc = copy.deepcopy(disc)
    plain = ascent_gradient_from_scores(disc(torch.cat([true_feats, gaus_feats])), gaus_feats)
    frozen = FrozenTrueHalf(frozen_disc, true_feats, onednn=True)
    assert frozen.by_hand and frozen.onednn
    gradient = frozen.gradient(gaus_feats)
    assert calls == [512, 512, 512]  # the true half once; the synthetic half forward, and its gradient back
    torch.testing.assert_close(gradient, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))
    for ours, theirs in zip(frozen_disc.buffers(), disc.buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Where the pass by hand does not apply, neither does oneDNN.
    assert not FrozenTrueHalf(Discriminator(128, n_layers=3, hidden=128), true_feats, onednn=True).onednn


def backbone_training(tire_root, **options):
    """A tiny model that trains its backbone (--train_backbone) and a batch of two real images with a Perlin-like
    mask to step on."""
    import backbones
    from test_common import load_tire_batch

    torch.manual_seed(0)
    trained = glass.GLASS(torch.device("cpu"))
    trained.load(backbone=backbones.load("efficientnet_lite0"), layers_to_extract_from=["blocks.2", "blocks.4"],
                 device=torch.device("cpu"), input_shape=(3, 64, 64), pretrain_embed_dimension=32,
                 target_embed_dimension=32, dsc_hidden=16, step=2, train_backbone=True, **options)
    trained.center = torch.zeros(64, 32)
    images = load_tire_batch(tire_root, 64)
    mask_s = torch.zeros(2, 8, 8)
    mask_s[:, 2:5, 3:6] = 1
    return trained, {"image": images, "aug": images.flip(-1), "mask_s": mask_s}


def test_train_backbone_adds_every_step_s_gradient_to_the_backbone_s_as_the_reference(tire_root):
    # The reference clears the projection's and the discriminator's gradients before each step, never the
    # backbone's: AdamW then steps on their running sum.
    trained, batch = backbone_training(tire_root)
    weight, tail = trained.backbone.conv_stem.weight, trained.discriminator.tail[0].weight
    step_gradients, tail_gradients = [], []
    weight.register_hook(lambda grad: step_gradients.append(grad.clone()))
    tail.register_hook(lambda grad: tail_gradients.append(grad.clone()))
    projection_gradients = []
    trained.pre_projection.layers[0].weight.register_hook(lambda grad: projection_gradients.append(grad.clone()))
    trained._train_step(batch)
    trained._train_step(batch)
    assert len(step_gradients) == 2 and not torch.equal(step_gradients[0], step_gradients[1])
    assert torch.equal(weight.grad, step_gradients[0] + step_gradients[1])
    assert len(tail_gradients) == 2 and torch.equal(tail.grad, tail_gradients[1])
    projection = trained.pre_projection.layers[0].weight  # cleared before each step too
    assert len(projection_gradients) == 2 and torch.equal(projection.grad, projection_gradients[1])


def test_train_backbone_steps_the_backbone_with_adamw_at_lr_as_the_reference(tire_root):
    # The reference: AdamW(backbone.parameters(), lr), stepped after each backward pass. One step of the trainer
    # moves a backbone weight exactly as one step of a fresh AdamW(lr) on the gradient that step gave it.
    lr = 0.003  # not the default, so that it must reach the backbone's optimiser
    trained, batch = backbone_training(tire_root, lr=lr)
    weight = trained.backbone.conv_stem.weight
    before = weight.detach().clone()
    gradients = []
    weight.register_hook(lambda grad: gradients.append(grad.clone()))
    trained._train_step(batch)

    expected = torch.nn.Parameter(before.clone())
    expected.grad = gradients[0]
    torch.optim.AdamW([expected], lr).step()
    assert len(gradients) == 1 and gradients[0].abs().max() > 0
    assert not torch.equal(expected, before)  # the step moves the weight, so the comparison below means something
    assert torch.equal(weight.detach(), expected.detach())
