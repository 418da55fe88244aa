"""One training step of GLASS against the same step written out here from the spec, plain autograd only.

The trainer's step (`GLASS._train_step`) runs GAS through the frozen true half and a hand-written
backward pass; the step below is written from `../shared/glass_spec.md` ("Model", "Training": one training
step) with torch modules built here: projection Linear, discriminator Linear -> BatchNorm1d ->
LeakyReLU(0.2) -> Linear (no bias) -> Sigmoid, Adam(lr, weight decay 1e-5) and AdamW(2 lr), Gaussian
noise, gradient ascent with truncation every 5 steps, LAS, hard-sample mining, focal loss. Both start from
the same weights, embeddings, centre and seed; the logged statistics and every gradient, weight and
BatchNorm buffer after the step must be the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import backbones
import glass

DIM, HIDDEN, BATCH, GRID = 32, 16, 2, 8
LR, NOISE, RADIUS, P, MARGIN = 1e-3, 0.02, 0.6, 0.4, 0.4  # not the defaults, so that each must reach the step


def focal_loss(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The spec's focal loss: one-hot target clamped to [1e-5, 1 - 1e-5], pt = target . input + 1e-5."""
    one_hot = torch.nn.functional.one_hot(labels.reshape(-1).long(), 2).to(probabilities.dtype)
    pt = (one_hot.clamp(1e-5, 1 - 1e-5) * probabilities).sum(1) + 1e-5
    return (-(1 - pt) ** 2 * pt.log()).mean()


def band(points, anchors, low, high, length=None):
    """Points moved along their offsets from ``anchors`` so that the offset length lies in [low, high]."""
    offset = points - anchors
    length = offset.norm(dim=1) if length is None else length
    return anchors + (length.clamp(low, high) / (length + 1e-10)).view(-1, 1) * offset


def spec_step(model: glass.GLASS, true_emb, fake_emb, mask_s, seed: int) -> dict:
    """One training step as the spec describes it, on fresh modules holding ``model``'s weights (no projection with
    ``--pre_proj 0``: the discriminator sees the embeddings themselves)."""
    projection = torch.nn.Linear(DIM, DIM)
    if model.pre_proj > 0:
        projection.load_state_dict({"weight": model.pre_projection.layers[0].weight,
                                    "bias": model.pre_projection.layers[0].bias})
    discriminator = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.BatchNorm1d(HIDDEN),
                                        torch.nn.LeakyReLU(0.2), torch.nn.Linear(HIDDEN, 1, bias=False),
                                        torch.nn.Sigmoid())
    names = {"0": "body.block1.0", "1": "body.block1.1", "3": "tail.0"}
    own = model.discriminator.state_dict()
    discriminator.load_state_dict({key: own[f"{names[key.split('.')[0]]}.{key.split('.', 1)[1]}"].clone()
                                   for key in discriminator.state_dict()})
    proj_opt = torch.optim.Adam(projection.parameters(), LR, weight_decay=1e-5)
    dsc_opt = torch.optim.AdamW(discriminator.parameters(), lr=LR * 2)
    projection.train()
    discriminator.train()

    if model.pre_proj > 0:
        true, fake = projection(true_emb), projection(fake_emb)
    else:
        true, fake = true_emb.clone().requires_grad_(True), fake_emb.clone().requires_grad_(True)
    labels = mask_s.reshape(-1, 1)
    centre = model.center.repeat(BATCH, 1, 1).reshape(-1, DIM)
    outside, inside = labels[:, 0] == 0, labels[:, 0] == 1
    # The radii are plain numbers to the rest of the step (the reference wraps them in a new tensor).
    r_t = torch.quantile(torch.cat([fake[outside] - centre[outside], true - centre]).norm(dim=1), RADIUS).detach()

    torch.manual_seed(seed)
    gauss = true + torch.normal(0, NOISE, true.shape)
    bce = torch.nn.BCELoss()
    r_g = torch.tensor(float("nan"))  # measured at the truncations only: none with fewer than 5 steps
    for step in range(model.ascent_steps + 1):
        scores = discriminator(torch.cat([true, gauss]))
        true_scores, gauss_scores = scores[: len(true)], scores[len(true):]
        gauss_loss = bce(gauss_scores, torch.ones_like(gauss_scores))
        bce_loss = bce(true_scores, torch.zeros_like(true_scores)) + gauss_loss
        if step == model.ascent_steps:
            break
        if model.mining == 0:
            r_g = torch.quantile((gauss - centre).norm(dim=1), RADIUS)
            break
        gradient = torch.autograd.grad(gauss_loss, [gauss])[0]
        with torch.no_grad():
            gauss.add_(0.001 * (gradient / (gradient.norm(dim=1, keepdim=True) + 1e-10)))  # normalised, then scaled
        if (step + 1) % 5 == 0:
            distance = (gauss - centre).norm(dim=1)
            r_g = torch.quantile(distance, RADIUS)
            gauss = band(gauss, centre, r_t, 2 * r_t, distance) if model.hypersphere == 1 else band(gauss, true, 0.5, 1.0)

    distance_f = (fake[inside] - centre[inside]).norm(dim=1)
    r_f = torch.quantile(distance_f, RADIUS)
    if model.hypersphere == 1:
        fake = fake.clone()
        fake[inside] = band(fake[inside], centre[inside], 2 * r_t, 4 * r_t, distance_f)
    fake_scores = discriminator(fake)
    error = (fake_scores - labels) ** 2
    hard = error >= torch.quantile(error, P)
    hard_scores, hard_labels = fake_scores[hard].unsqueeze(1), labels[hard].unsqueeze(1)
    loss = bce_loss + focal_loss(torch.cat([1 - hard_scores, hard_scores], dim=1), hard_labels)
    loss.backward()
    if model.pre_proj > 0:
        proj_opt.step()
    dsc_opt.step()

    fake_scores = fake_scores.detach()
    pix_true = torch.cat([fake_scores * (1 - labels), true_scores.detach()])
    pix_fake = torch.cat([fake_scores * labels, gauss_scores.detach()])
    return {
        "stats": {
            "loss": loss.item(),
            "p_true": (((pix_true < MARGIN).sum() - (pix_true == 0).sum()) / ((labels == 0).sum() + len(true))).item(),
            "p_fake": ((pix_fake >= MARGIN).sum() / ((labels == 1).sum() + len(true))).item(),
            "r_t": r_t.item(), "r_g": r_g.item(), "r_f": r_f.item(),
        },
        "projection": projection.state_dict(),
        "discriminator": discriminator.state_dict(),
        # Adam's first update is close to lr * sign(gradient): the gradients themselves are compared too.
        "projection_grads": {name: p.grad for name, p in projection.named_parameters()},
        "discriminator_grads": {name: p.grad for name, p in discriminator.named_parameters()},
        "names": names,
    }


@pytest.fixture(scope="module")
def backbone():
    return backbones.load("efficientnet_lite0")


@pytest.mark.parametrize("data_seed", [7, 8])  # the step's inputs: two draws, as a rounding difference may hide in one
@pytest.mark.parametrize("svd, mining, steps, pre_proj", [(0, 1, 6, 1), (1, 1, 6, 1), (0, 0, 6, 1), (1, 1, 0, 1), (0, 1, 6, 0)])
def test_training_step_equals_the_step_written_from_the_spec(backbone, monkeypatch, svd, mining, steps, pre_proj,
                                                             data_seed):
    torch.manual_seed(3)
    model = glass.GLASS(torch.device("cpu"))
    model.load(backbone=backbone, layers_to_extract_from=["blocks.2", "blocks.4"], device=torch.device("cpu"),
               input_shape=(3, 64, 64), pretrain_embed_dimension=DIM, target_embed_dimension=DIM, dsc_hidden=HIDDEN,
               step=steps, lr=LR, noise=NOISE, radius=RADIUS, p=P, mining=mining, svd=svd, dsc_margin=MARGIN,
               pre_proj=pre_proj)
    model.hypersphere = svd
    generator = torch.Generator().manual_seed(data_seed)
    true_emb = torch.randn(BATCH * GRID * GRID, DIM, generator=generator)
    fake_emb = true_emb + 0.5 * torch.randn(true_emb.shape, generator=generator)
    mask_s = (torch.rand(BATCH, GRID, GRID, generator=generator) > 0.6).float()
    model.center = torch.randn(GRID * GRID, DIM, generator=generator) * 0.1 + true_emb[: GRID * GRID]
    # The step's inputs: embeddings of the augmented and of the plain images (the backbone is not under test).
    monkeypatch.setattr(model, "_embed", lambda images, evaluation=False: (fake_emb, None))
    monkeypatch.setattr(model, "_true_features", lambda batch, images: true_emb)
    batch = {"image": torch.zeros(BATCH, 3, 64, 64), "aug": torch.zeros(BATCH, 3, 64, 64), "mask_s": mask_s}

    initial = model.discriminator.body.block1[0].weight.detach().clone()
    expected = spec_step(model, true_emb, fake_emb, mask_s, seed=11)
    if pre_proj > 0:
        model.pre_projection.train()
    model.discriminator.train()
    torch.manual_seed(11)
    stats = model._train_step(batch)

    # The same bits: the trainer's frozen true half and hand-written backward reproduce the plain passes.
    np.testing.assert_equal(stats, expected["stats"])  # exact, NaN (r_g without truncation) equal to NaN
    if pre_proj > 0:
        linear = model.pre_projection.layers[0]
        for name, parameter in (("weight", linear.weight), ("bias", linear.bias)):
            assert torch.equal(parameter, expected["projection"][name]), name
            assert torch.equal(parameter.grad, expected["projection_grads"][name]), name
    own = model.discriminator.state_dict()
    own_grads = {name: p.grad for name, p in model.discriminator.named_parameters()}
    for key, value in expected["discriminator"].items():
        ours = f"{expected['names'][key.split('.')[0]]}.{key.split('.', 1)[1]}"
        assert torch.equal(own[ours], value), key  # weights and BatchNorm's running statistics
        if key in expected["discriminator_grads"]:
            assert torch.equal(own_grads[ours], expected["discriminator_grads"][key]), key
    # The step moved the weights (so the comparison above compares trained weights, not the initial ones).
    assert not torch.allclose(model.discriminator.body.block1[0].weight, initial, rtol=1e-5, atol=1e-8)


def test_model_selection_adds_image_and_pixel_auroc():
    # The spec's best epoch: highest image AUROC + pixel AUROC; a class without masks (pixel AUROC not
    # available, NaN) is ranked by image AUROC alone. Records: [i_auroc, i_ap, p_auroc, p_ap, p_pro(, epoch)].
    assert glass.GLASS._selection_score([0.75, 0.9, 0.5, 0.1, 0.2]) == 1.25
    assert glass.GLASS._selection_score([0.75, 0.9, float("nan"), 0.0, 0.0]) == 0.75
    # A higher image AUROC loses to a higher sum (image AP, pixel AP and PRO do not count).
    assert glass.GLASS._selection_score([0.9, 1.0, 0.25, 1.0, 1.0]) < glass.GLASS._selection_score([0.5, 0.0, 0.75, 0.0, 0.0])


def test_net_options_reach_the_model():
    import main

    args = ["-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "24",
            "--target_embed_dimension", "20", "--dsc_hidden", "12", "--noise", "0.02", "--radius", "0.6", "--p", "0.4",
            "--step", "7", "--lr", "0.003", "--mining", "0", "--svd", "1", "--dsc_margin", "0.4", "--limit", "9"]
    context = main.net.make_context("net", args)
    _, get_glass = main.net.invoke(context)
    [model] = get_glass((3, 64, 64), torch.device("cpu"))
    assert (model.noise_std, model.radius, model.mining_quantile, model.ascent_steps, model.mining, model.hypersphere, model.dsc_margin, model.sample_limit) == \
        (0.02, 0.6, 0.4, 7, 0, 1, 0.4, 9)
    assert model.dsc_opt.param_groups[0]["lr"] == 0.006 and model.proj_opt.param_groups[0]["lr"] == 0.003
    assert model.pre_projection.layers[0].in_features == 20 and model.discriminator.body.block1[0].out_features == 12


def test_train_backbone_option_gives_the_backbone_adamw_at_lr():
    """--train_backbone: the backbone's weights get the reference's AdamW(backbone.parameters(), lr)."""
    import main

    context = main.net.make_context("net", ["-b", "efficientnet_lite0", "-le", "blocks.2", "--lr", "0.003",
                                            "--train_backbone"])
    _, get_glass = main.net.invoke(context)
    [model] = get_glass((3, 64, 64), torch.device("cpu"))
    [group] = model.backbone_opt.param_groups
    assert type(model.backbone_opt) is torch.optim.AdamW and group["lr"] == 0.003
    assert [id(p) for p in group["params"]] == [id(p) for p in model.backbone.parameters()]
    [reference] = torch.optim.AdamW(model.backbone.parameters(), 0.003).param_groups  # its other settings: AdamW's own
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in reference.items() if k != "params"}


def test_svd_option_is_ignored_with_a_warning(caplog):
    """--svd never chooses the hypothesis (dataset --distribution does), so it warns and a resume ignores it."""
    import main

    with caplog.at_level("WARNING", logger="glass"):
        main.net.invoke(main.net.make_context("net", ["-b", "efficientnet_lite0", "-le", "blocks.2", "--svd", "1"]))
    assert "--svd 1 is ignored" in caplog.text and "--distribution" in caplog.text
    config = {"net": {"svd": 0, "noise": 0.015}, "dataset": {}, "seed": 0}
    assert glass.other_differences(config, {**config, "net": {"svd": 1, "noise": 0.015}}) == []
    assert glass.other_differences(config, {**config, "net": {"svd": 0, "noise": 0.02}}) == ["net.noise: 0.015 -> 0.02"]


def tiny_model(backbone, **options) -> glass.GLASS:
    torch.manual_seed(3)
    model = glass.GLASS(torch.device("cpu"))
    model.load(backbone=backbone, layers_to_extract_from=["blocks.2", "blocks.4"], device=torch.device("cpu"),
               input_shape=(3, 64, 64), pretrain_embed_dimension=DIM, target_embed_dimension=DIM, dsc_hidden=HIDDEN,
               **options)
    return model


def test_centre_is_the_mean_of_the_per_batch_position_means(backbone, monkeypatch):
    """Spec: per batch the mean over its images of the projected features, position by position, then the mean
    over the batches (each batch counts once, whatever its size)."""
    model = tiny_model(backbone, pre_proj=0)  # no feature adaptor: the centre is that of the embeddings
    positions = 3
    first = torch.tensor([[[1.0, 2.0], [0.0, 4.0], [3.0, 3.0]],   # image 1 of batch 1 (3 positions x 2 dims)
                          [[3.0, 6.0], [2.0, 0.0], [3.0, 5.0]]])  # image 2 of batch 1
    second = torch.tensor([[[8.0, 0.0], [4.0, 4.0], [0.0, 2.0]]])  # batch 2: one image
    batches = [(2, first.reshape(-1, 2)), (1, second.reshape(-1, 2))]
    monkeypatch.setattr(model, "_center_features", lambda data: iter(batches))
    model._compute_center(None)
    # Batch means [[2, 4], [1, 2], [3, 4]] and [[8, 0], [4, 4], [0, 2]]; their mean:
    expected = torch.tensor([[5.0, 2.0], [2.5, 3.0], [1.5, 3.0]])
    assert model.center.shape == (positions, 2)
    assert torch.equal(model.center, expected)


class _Scalars:
    def __init__(self):
        self.logged = []

    def add_scalar(self, tag, value, step):
        self.logged.append((tag, value, step))


class _Bar:
    def set_description_str(self, text):
        self.text = text


def test_epoch_stops_after_more_than_limit_samples_and_reports_the_means(backbone, monkeypatch):
    """Spec: the discriminator pass runs over batches until more than ``limit`` samples; every step's statistics
    are logged at its global step; the progress line and the epoch's statistics are their means."""
    model = tiny_model(backbone, limit=16)
    model.tb_writer, model.global_step = _Scalars(), 10
    steps = iter([
        {"loss": 1.0, "p_true": 0.25, "p_fake": 0.5, "r_t": 1.0, "r_g": 2.0, "r_f": 3.0},
        {"loss": 3.0, "p_true": 0.75, "p_fake": 1.0, "r_t": 2.0, "r_g": 4.0, "r_f": 6.0},
        {"loss": 5.0, "p_true": 0.5, "p_fake": 0.0, "r_t": 3.0, "r_g": 6.0, "r_f": 9.0},
    ])
    modes = []  # the heads' modes at each step: training, although the last evaluation left them in eval mode
    model._heads_eval_mode()

    def step(batch):
        modes.append((model.discriminator.training, model.pre_projection.training, model.embedder.training))
        return next(steps)

    monkeypatch.setattr(model, "_train_step", step)
    monkeypatch.setattr(glass.utils, "log_las_batch", lambda *args: None)
    loader = [{"image": torch.zeros(8, 3, 64, 64)} for _ in range(5)]  # 8, 16 (not more than 16), 24: stop
    bar = _Bar()
    line = model._train_discriminator(loader, epoch=4, pbar=bar, summary="best")
    assert model.global_step == 13
    assert modes == [(True, True, False)] * 3  # the frozen backbone stays in eval mode
    assert [step for tag, _, step in model.tb_writer.logged if tag == "loss"] == [10, 11, 12]
    assert [value for tag, value, _ in model.tb_writer.logged if tag == "r_g"] == [2.0, 4.0, 6.0]
    assert model.epoch_stats == {"loss": 3.0, "p_true": 0.5, "p_fake": 0.5, "r_t": 2.0, "r_g": 4.0, "r_f": 6.0}
    assert line == "epoch:4 loss:3.00e+00 pt:50.00 pf:50.00 rt:2.00 rg:4.00 rf:6.00 svd:0 sample:24"
    assert bar.text == line + " best"
