"""GLASS: training loop, evaluation and inference around the feature pipeline and discriminator.

One training step (paper Sec. 3, spec "Training"):
  * true features  u   = projection(embed(image))
  * LAS features   u+  = projection(embed(synthesised image)), labelled by the Perlin mask ``mask_s``
  * GAS features   g   = u + N(0, noise), pushed by ``step`` normalised gradient-ascent steps on the
                        discriminator's loss and truncated every 5 steps to a band around u (manifold,
                        ``svd 0``) or around the class centre c (hypersphere, ``svd 1``)
  * loss = BCE(D(u), 0) + BCE(D(g), 1) + focal(D(u+), mask_s) on the u+ whose squared error is at or above
    its ``p`` quantile (hard-sample mining: the hardest 1 - p share).
"""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import glob
import logging
import os
import random
import re
import shutil
import signal
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import tqdm
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import backbones
import common
import metrics
import utils
from datasets import LOADERS
from datasets import inputs as image_inputs
from datasets.base import WIDE_MODES, elongation_problem, image_header, is_broken_link, load_image, warn_wide_images
from loss import FocalLoss
from model import (
    Discriminator, FusedHead, LayerPooling, LinearWithKnownRows, OneDNNLinearMode, Projection, fuse_head,
    layer_poolings, onednn_linear, onednn_linear_available,
)
from utils import GlassError

LOGGER = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("discriminator", "pre_projection")
CONFIG_NAME = "config.json"
# config.json key of a file that a test-only run wrote for a class folder without one (the reference's).
RECORDED_BY_TEST = "recorded_by_test"
# The `net` options that shape the model (the rest only affect training).
MODEL_OPTIONS = (
    "pretrain_embed_dimension", "target_embed_dimension", "patchsize", "dsc_layers", "dsc_hidden", "pre_proj",
)
BEST_CHECKPOINT_PATTERN = re.compile(r"ckpt_best_(\d+)\.pth$")  # best_checkpoint_name(epoch) matches it
TRAINING_CHECKPOINT = "ckpt.pth"
# Version of the extra (resume) entries of ckpt.pth; see GLASS.training_checkpoint.
RESUME_FORMAT = 1
# What else, besides MODEL_OPTIONS, must match to continue training in (or test) a class folder.
SHAPING_KEYS = ("backbone", "layers_to_extract_from", "input_shape")
# `net` options that never change a number (not compared when resuming), and the defaults of the speed
# options for config.json files written before they existed.
# --svd is one of them: the trainer always sets the hypothesis from --distribution (or the resumed ckpt.pth).
NUMERICALLY_NEUTRAL_OPTIONS = ("cache", "svd")
SPEED_OPTION_DEFAULTS = {"cache_dtype": "float32", "amp": "off", "compile": False, "channels_last": False,
                         "onednn": False, "fuse_head": False}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # utils.AMP_MODES other than off
# The decoded, resized training images are kept in memory (GLASS._preload_training_images) when they take at most
# this share of the available memory, or this many bytes when it cannot be read.
PRELOAD_MEMORY_SHARE = 0.1
PRELOAD_UNKNOWN_MEMORY_BYTES = 256 * 2**20
# A best checkpoint holds the projection and the discriminator only, as the reference's: with --train_backbone the
# backbone it was trained with is not in it (ckpt.pth keeps the last epoch's, for resuming).
BACKBONE_NOT_SAVED = ("%s with the pretrained backbone: the class was trained with --train_backbone, whose backbone "
                      "the best checkpoint does not hold (as the reference's), so the scores differ from training's")
# Test-only hook: "EPOCH:STEP" makes the trainer SIGKILL itself just before that training step of that
# epoch (both 0-based), "EPOCH:saved" right after that epoch's ckpt.pth is written (before its new best
# checkpoint), so that tests can interrupt a run at a known point. Never set it in normal use.
KILL_HOOK_ENV = "GLASS_TEST_KILL_AT"
ATEN = torch.ops.aten
MEAN_REDUCTION = 1  # at::Reduction::Mean, as BCELoss() passes it to binary_cross_entropy(_backward)
# Batch key of the synthesised images' patch embeddings when the DataLoader workers compute them (EmbeddingCollate).
AUG_FEATURES = "aug_features"


# --------------------------------------------------------------------------------------------------
# The two synthesis strategies and hard-sample mining, written as the paper's equations.

def quantile_radius(distances: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of the distances as a detached one-element tensor (r_t, r_g, r_f)."""
    return torch.quantile(distances.detach(), q=q).reshape(1)


def truncate_to_band(points: torch.Tensor, anchors: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor,
                     norm: torch.Tensor | None = None) -> torch.Tensor:
    """Move each point along its direction from its anchor so that the distance lies in [low, high]."""
    offset = points - anchors
    length = torch.norm(offset, dim=1) if norm is None else norm
    scale = (torch.clamp(length, low, high) / (length + 1e-10)).view(-1, 1)
    return anchors + scale * offset


class GASResult(NamedTuple):
    """Outcome of global anomaly synthesis: the last step's loss and scores, the features and r_g."""

    bce_loss: torch.Tensor
    true_scores: torch.Tensor
    gaus_scores: torch.Tensor
    gaus_feats: torch.Tensor
    r_g: torch.Tensor


def gas_losses(scores: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAS's losses on the scores of ``cat([true, synthetic])`` whose first ``rows`` are the true half: the true
    and synthetic scores, BCE(true, 0) and BCE(synthetic, 1)."""
    bce = torch.nn.BCELoss()
    true_scores, gaus_scores = scores[:rows], scores[rows:]
    return (true_scores, gaus_scores, bce(true_scores, torch.zeros_like(true_scores)),
            bce(gaus_scores, torch.ones_like(gaus_scores)))


def global_anomaly_synthesis(
    discriminator: torch.nn.Module,
    true_feats: torch.Tensor,
    center: torch.Tensor,
    r_t: torch.Tensor,
    noise_std: float,
    steps: int,
    hypersphere: int,
    mining: int,
    radius: float,
    ascent_gradient: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    final_scores: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> GASResult:
    """GAS: Gaussian features moved by gradient ascent on the discriminator's loss, then truncated.

    Returns the BCE loss of the last step (true -> 0, synthetic -> 1), the true and synthetic scores
    of that step, the synthetic features, and r_g, the ``radius`` quantile of their distance to c at the last
    truncation (NaN when none ran: fewer than 5 ascent steps; the reference then fails as it logs r_g).
    ``ascent_gradient(g)``, when given, stands in for the plain pass in the steps that serve only the
    gradient of the synthetic half's loss with respect to g (:meth:`FrozenTrueHalf.gradient`), and
    ``final_scores(g)`` for the plain pass of the last step, whose loss is returned (:meth:`FrozenTrueHalf.final_scores`).
    """
    noise = torch.normal(0, noise_std, true_feats.shape).to(true_feats.device)
    gaus_feats = true_feats + noise
    r_g = torch.full((1,), float("nan"), device=true_feats.device)  # measured at the truncations
    for step in range(steps + 1):
        if ascent_gradient is not None and step < steps and mining != 0:
            grad = ascent_gradient(gaus_feats)  # this step's losses and scores would serve nothing else
        else:
            if final_scores is not None and step == steps:
                scores = final_scores(gaus_feats)
            else:
                scores = discriminator(torch.cat([true_feats, gaus_feats]))
            _check_finite_scores(scores)
            true_scores, gaus_scores, true_loss, gaus_loss = gas_losses(scores, len(true_feats))
            bce_loss = true_loss + gaus_loss
            if step == steps:
                break
            if mining == 0:
                dist_g = torch.norm(gaus_feats - center, dim=1)
                r_g = quantile_radius(dist_g, radius)
                break
            grad = torch.autograd.grad(gaus_loss, [gaus_feats])[0]

        grad_normalized = grad / (torch.norm(grad, dim=1).view(-1, 1) + 1e-10)
        with torch.no_grad():
            gaus_feats.add_(0.001 * grad_normalized)

        if (step + 1) % 5 == 0:
            dist_g = torch.norm(gaus_feats - center, dim=1)
            r_g = quantile_radius(dist_g, radius)
            if hypersphere == 1:  # distance to the centre within [r_t, 2 r_t]
                gaus_feats = truncate_to_band(gaus_feats, center, r_t, 2 * r_t, norm=dist_g)
            else:  # manifold: distance to the true feature within [0.5, 1]
                gaus_feats = truncate_to_band(gaus_feats, true_feats, 0.5, 1.0)
    return GASResult(bce_loss, true_scores, gaus_scores, gaus_feats, r_g)


class FrozenTrueHalf:
    """The gradient-ascent steps of GAS with the true half of the discriminator's first Linear layer computed
    once.

    Within one GAS call the weights and the true features stay fixed, and an ascent step needs only the
    gradient of the synthetic half's loss with respect to g; so the first layer's matrix products over the
    true half (forward, and backward to its input) need not be repeated at every step: half the matrix
    products of a step. BatchNorm sees both halves, so batch statistics and running averages are those of
    the plain pass, and the gradients are the same bits wherever the layer's matrix product gives a row the
    same bits whatever the other rows (:func:`ascent_pass_is_exact` checks it). For the default
    discriminator on the CPU, the backward pass is run by hand (:meth:`_gradient_by_hand`), and with ``onednn``
    its matrix products run through oneDNN (:func:`model.onednn_linear`: other last bits, ``--onednn``).
    GAS's final pass can reuse the true half's output too (:meth:`final_scores`).
    """

    def __init__(self, discriminator: Discriminator, true_feats: torch.Tensor,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 onednn: bool = False):
        self.discriminator = discriminator
        self.true_feats = true_feats
        self.context = context  # of the discriminator's forward passes (autocast with --amp)
        self.by_hand = _backward_by_hand_applies(discriminator, true_feats)
        self.onednn = onednn and self.by_hand and onednn_linear_available()
        linear = discriminator.first_linear()
        # final_scores needs the true half in the pass's own precision (not oneDNN's).
        self.reusable_in_final_pass = final_pass_reusable(discriminator) and not self.onednn
        with torch.no_grad(), context():
            if self.onednn:
                true_half = onednn_linear(true_feats, linear.weight, linear.bias)
                self.weight_t = linear.weight.t().contiguous()  # gradient @ W as a Linear layer of weight W^T
            else:
                true_half = linear(true_feats)
        if self.by_hand:  # the first layer's output for both halves, written in place at each step
            self.joined = torch.cat([true_half, torch.empty_like(true_half)])
            self.joined_grad = torch.zeros_like(self.joined)  # its gradient; the true half's stays zero
            true_half = self.joined[: len(true_half)]
        self.true_half = true_half

    def __call__(self, gaus_feats: torch.Tensor) -> torch.Tensor:
        """Scores of ``cat([true_feats, gaus_feats])``, as ``discriminator`` gives them (a graph to g)."""
        discriminator = self.discriminator
        both = torch.cat([self.true_half, discriminator.first_linear()(gaus_feats)])
        return discriminator.from_first_linear(both)

    def final_scores(self, gaus_feats: torch.Tensor) -> torch.Tensor:
        """Scores of ``cat([true_feats, gaus_feats])`` with the plain pass's graph (to both halves and the weights),
        the true half's first-layer output reused: GAS's final pass. For float32 passes without ``onednn``."""
        linear = self.discriminator.first_linear()
        both = torch.cat([self.true_feats, gaus_feats])
        pre = LinearWithKnownRows.apply(both, linear.weight, linear.bias, self.true_half)
        return self.discriminator.from_first_linear(pre)

    def gradient(self, gaus_feats: torch.Tensor) -> torch.Tensor:
        """The ascent gradient: of BCE(scores of the synthetic half, 1) with respect to ``gaus_feats``."""
        if self.by_hand:
            return self._gradient_by_hand(gaus_feats.detach())
        with self.context():
            scores = self(gaus_feats).float()
        return ascent_gradient_from_scores(scores, gaus_feats)

    @torch.no_grad()
    def _gradient_by_hand(self, gaus_feats: torch.Tensor) -> torch.Tensor:
        """:meth:`gradient` for Linear -> BatchNorm1d -> LeakyReLU -> Linear -> Sigmoid, with the ATen operations
        that autograd runs, in its order, but without its graph, and after BatchNorm on the synthetic rows
        only: the true rows' scores are not in the loss, so their gradient is zero up to BatchNorm. The
        synthetic half's first-layer output and gradient are written into ``joined`` and ``joined_grad``."""
        linear, norm, leaky = self.discriminator.body[0]
        tail = self.discriminator.tail[0]
        rows = len(self.true_half)
        pre, grad_pre = self.joined, self.joined_grad
        if self.onednn:
            pre[rows:].copy_(onednn_linear(gaus_feats.contiguous(), linear.weight, linear.bias))
        else:
            torch.addmm(linear.bias, gaus_feats, linear.weight.t(), out=pre[rows:])
        normed, mean, invstd = ATEN.native_batch_norm(
            pre, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, norm.momentum, norm.eps)
        norm.num_batches_tracked.add_(1)  # as BatchNorm1d.forward does in training mode
        normed = normed[rows:]
        scores = torch.sigmoid(torch.nn.functional.leaky_relu(normed, leaky.negative_slope).mm(tail.weight.t()))
        # Backward, from the mean BCE loss of the scores against 1.
        grad = ATEN.binary_cross_entropy_backward(
            torch.ones((), dtype=scores.dtype), scores, torch.ones_like(scores), None, MEAN_REDUCTION)
        grad = ATEN.sigmoid_backward(grad, scores).mm(tail.weight)
        ATEN.leaky_relu_backward.grad_input(grad, normed, leaky.negative_slope, False, grad_input=grad_pre[rows:])
        grad = ATEN.native_batch_norm_backward(
            grad_pre, pre, norm.weight, norm.running_mean, norm.running_var, mean, invstd, True, norm.eps,
            [True, False, False])[0]
        if self.onednn:
            return onednn_linear(grad[rows:], self.weight_t)
        return grad[rows:].mm(linear.weight)


def judges_only(training_data: DataLoader) -> bool:
    """Whether the training loader's dataset was built with ``--distribution 1`` (judge the class, train nothing)."""
    return getattr(getattr(training_data, "dataset", None), "distribution", 0) == 1


def final_pass_reusable(discriminator: Discriminator) -> bool:
    """Whether :meth:`FrozenTrueHalf.final_scores` covers this discriminator: its first Linear layer has a bias
    (:class:`model.LinearWithKnownRows`); without hidden blocks the tail's bias-free layer sees the input."""
    return discriminator.first_linear().bias is not None


def _backward_by_hand_applies(discriminator: Discriminator, features: torch.Tensor) -> bool:
    """Whether :meth:`FrozenTrueHalf._gradient_by_hand` covers this discriminator and its input ``features``: one
    hidden block in training mode with BatchNorm's usual running averages, on the CPU in float32 (where autograd
    runs these ATen operations; elsewhere BatchNorm may take cuDNN's path)."""
    if len(discriminator.body) != 1 or features.device.type != "cpu" or features.dtype != torch.float32:
        return False
    linear, norm, leaky = discriminator.body[0]
    return (
        type(norm) is torch.nn.BatchNorm1d and norm.training and norm.track_running_stats
        and norm.momentum is not None and norm.affine and type(leaky) is torch.nn.LeakyReLU
        and discriminator.tail[0].bias is None and type(discriminator.tail[1]) is torch.nn.Sigmoid
        and linear.bias is not None
    )


def ascent_gradient_from_scores(scores: torch.Tensor, gaus_feats: torch.Tensor) -> torch.Tensor:
    """Gradient of the synthetic half's BCE loss (target 1) with respect to the synthetic features; ``scores``
    are those of ``cat([true_feats, gaus_feats])``."""
    gaus_scores = scores[len(scores) - len(gaus_feats):]
    _check_finite_scores(gaus_scores)
    loss = torch.nn.BCELoss()(gaus_scores, torch.ones_like(gaus_scores))
    return torch.autograd.grad(loss, [gaus_feats])[0]


def ascent_pass_is_exact(discriminator: Discriminator, true_feats: torch.Tensor, noise_std: float,
                         context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         final_pass: bool = False) -> bool:
    """Whether one ascent step through :meth:`FrozenTrueHalf.gradient` gives the plain pass's bits on this device
    and batch size (gradient and BatchNorm running averages), and with ``final_pass`` then a final pass through
    :meth:`FrozenTrueHalf.final_scores` (scores, BatchNorm running averages, every gradient of its loss); on
    copies of the discriminator and without drawing from the global random generators."""
    noise = torch.randn(true_feats.shape, generator=torch.Generator().manual_seed(0)) * noise_std
    outcomes = []
    for frozen in (False, True):
        model = copy.deepcopy(discriminator)
        true = true_feats.detach().clone().requires_grad_(final_pass)
        gaus_feats = (true.detach() + noise.to(true.device)).requires_grad_(True)
        if frozen:
            half = FrozenTrueHalf(model, true, context)
            gradient = half.gradient(gaus_feats)
        else:
            with context():
                scores = model(torch.cat([true, gaus_feats])).float()
            gradient = ascent_gradient_from_scores(scores, gaus_feats)
        outcome = [gradient]
        if final_pass and final_pass_reusable(discriminator):
            moved = (gaus_feats.detach() + 0.001 * gradient).requires_grad_(True)
            if frozen:
                scores = half.final_scores(moved)
            else:
                with context():
                    scores = model(torch.cat([true, moved])).float()
            _, _, true_loss, gaus_loss = gas_losses(scores, len(true))
            (true_loss + gaus_loss).backward()
            outcome += [scores.detach(), true.grad, moved.grad, *(p.grad for p in model.parameters())]
        outcomes.append([*outcome, *model.buffers()])
    return all(torch.equal(plain, frozen) for plain, frozen in zip(*outcomes))


def local_anomaly_synthesis(
    fake_feats: torch.Tensor, mask: torch.Tensor, center: torch.Tensor, r_t: torch.Tensor, hypersphere: int, radius: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LAS features of the Perlin-masked patches; with ``hypersphere`` 1 they are pushed to [2 r_t, 4 r_t] from c.

    Returns the (possibly adjusted) features and r_f, the ``radius`` quantile of the masked
    features' distance to the centre.
    """
    inside = mask[:, 0] == 1
    masked_feats, masked_center = fake_feats[inside], center[inside]
    dist_f = torch.norm(masked_feats - masked_center, dim=1)
    r_f = quantile_radius(dist_f, radius)
    if hypersphere == 1:
        pushed = truncate_to_band(masked_feats, masked_center, 2 * r_t, 4 * r_t, norm=dist_f)
        fake_feats = fake_feats.index_put((inside,), pushed)
    return fake_feats, r_f


def hard_sample_mining(scores: torch.Tensor, labels: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples whose squared error is at or above its ``p`` quantile (all of them if p <= 0)."""
    if p <= 0:
        return scores, labels
    error = (scores - labels) ** 2
    keep = error >= torch.quantile(error, q=p)
    return scores[keep].unsqueeze(1), labels[keep].unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Checkpoint files, random-generator states and saved configurations (the resume machinery).

def best_checkpoint_name(epoch: int) -> str:
    """``ckpt_best_<epoch>.pth``: the reference's name of the best epoch's weights."""
    return f"ckpt_best_{epoch}.pth"


def cpu_copy(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors, as checkpoints store them."""
    return {key: value.detach().cpu().clone() for key, value in tensors.items()}


def read_checkpoint_file(path: str, device: torch.device | str = "cpu", fix: str = "delete it and train again") -> dict:
    """``torch.load(path, weights_only=True)`` as a dict; a damaged or foreign file is a GlassError."""
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the error says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise GlassError(f"cannot read checkpoint {path} ({utils.exception_summary(exc)}): it is damaged or not a checkpoint; {fix}") from None
    if not isinstance(state, dict) or "discriminator" not in state:
        raise GlassError(f"{path} is not a GLASS checkpoint (it has no 'discriminator' entry): {fix}")
    return state


def training_state_problem(state: dict) -> Optional[str]:
    """What is wrong with the resume entries of a ckpt.pth (see GLASS.training_checkpoint); None when nothing is.
    A ckpt.pth without them (the reference's) has no problem here."""
    if "epoch" not in state:
        return None
    for key in ("epoch", "global_step", "svd", "format", "meta_epochs"):
        if key in state and (type(state[key]) is not int or state[key] < 0):
            return f"{key} is {state[key]!r}, not a whole number"
    if state.get("judged_distribution") not in (None, 0, 1):
        return f"judged_distribution is {state['judged_distribution']!r}, not 0, 1 or None"
    if not isinstance(state.get("rng", {}), dict):
        return "rng is not the random generators' states"
    if not isinstance(state.get("best_checkpoint") or "", str):
        return "best_checkpoint is not a file name"
    record = state.get("best_record")
    if record is not None and not (isinstance(record, (list, tuple)) and len(record) == 6
                                   and all(isinstance(v, (int, float)) for v in record)):
        return "best_record is not six numbers"
    return None


def trained_part_sizes(state: dict) -> Dict[str, int]:
    """The sizes a checkpoint's weights imply: ``target_embed_dimension``, ``dsc_layers``, ``dsc_hidden`` and
    ``pre_proj`` (from the module names ``body.block<k>``, ``tail`` and ``layers.<i>fc``)."""
    discriminator = state["discriminator"]
    blocks = {key.split(".")[1] for key in discriminator if key.startswith("body.")}
    if blocks:
        target_dim = int(discriminator["body.block1.0.weight"].shape[1])
        hidden = int(discriminator["body.block1.0.weight"].shape[0])
    else:
        target_dim = hidden = int(discriminator["tail.0.weight"].shape[1])
    projection = state.get("pre_projection") or {}
    return {"target_embed_dimension": target_dim, "dsc_layers": len(blocks) + 1, "dsc_hidden": hidden,
            "pre_proj": len([key for key in projection if key.endswith("fc.weight")])}


def rng_state() -> Dict[str, Any]:
    """The state of every global random generator (python, NumPy, torch, CUDA) as plain values and tensors.

    Plain lists, numbers and tensors only, so that ``torch.load(weights_only=True)`` can read it back.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "numpy": [str(np_name), torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), int(np_pos), int(np_has_gauss), float(np_gauss)))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        saved = state.get("cuda")
        if saved is not None and len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in saved])
        else:
            LOGGER.warning("The CUDA random state was saved with %s device(s), this machine has %d: the resumed run "
                           "will not repeat an uninterrupted one exactly", "no" if saved is None else len(saved),
                           torch.cuda.device_count())


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching the global python, NumPy and torch (CPU) generators.

    Passes that must not change the random stream of training run inside it: the centre pass, building
    the feature cache and evaluation. Iterating a DataLoader draws its workers' base seed from torch's
    generator, and with ``num_workers 0`` the image transforms draw from it too; so these passes
    consume the same random numbers (none) whether their features come from the cache or not.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# Data options that change how the test images look to a trained model (``other_differences`` names).
TEST_VIEW_OPTIONS = ("dataset.resize", "dataset.imagesize")


def config_differences(saved: dict, current: dict) -> List[str]:
    """The model-shaping options that differ between two ``config.json`` contents, as ``name: old -> new``."""
    def shaping(config: dict) -> Dict[str, Any]:
        values = {key: config.get(key) for key in SHAPING_KEYS}
        net = config.get("net", {}) or {}
        values.update({key: net.get(key) for key in MODEL_OPTIONS + ("train_backbone",)})
        # JSON turns tuples into lists; compare like with like.
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    old, new = shaping(saved), shaping(current)
    shown = {"input_shape": "input_shape (dataset --imagesize)"}
    return [f"{shown.get(key, key)}: {old[key]} -> {new[key]}" for key in old if old[key] != new[key]]


def other_differences(saved: dict, current: dict) -> List[str]:
    """The options that do not shape the model but differ (training options, data options, seed)."""
    def flat(config: dict) -> Dict[str, Any]:
        net = {**SPEED_OPTION_DEFAULTS, **(config.get("net") or {})}
        ignored = MODEL_OPTIONS + ("train_backbone",) + NUMERICALLY_NEUTRAL_OPTIONS
        values = {f"net.{k}": v for k, v in net.items() if k not in ignored}
        values.update({f"dataset.{k}": v for k, v in (config.get("dataset") or {}).items()})
        values["seed"] = config.get("seed")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    old, new = flat(saved), flat(current)
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


class ClassStoppedError(GlassError):
    """One class cannot go on; the run goes on with the other classes and names this one at its end."""


class NonFiniteLossError(ClassStoppedError):
    """The training loss (or the scores it comes from) became NaN or infinite; training of the class stops."""


class MissingCheckpointError(ClassStoppedError):
    """A class folder without its best checkpoint (``--test test`` of an untrained class, a deleted best file)."""


def _training_stopped(name: str, what: str, epoch: int, best_path: Optional[str]) -> NonFiniteLossError:
    """The one-line error that stops a class whose training diverged in ``epoch``."""
    kept = f"{os.path.basename(best_path)} is kept" if best_path else "there is no best checkpoint yet"
    return NonFiniteLossError(f"{name}: {what} in epoch {epoch}, so training of this class stopped ({kept}): "
                              "lower --lr or check the training images")


def _check_finite_scores(scores: torch.Tensor) -> None:
    """NonFiniteLossError when a discriminator's scores hold NaN (diverged weights), before BCE refuses them."""
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteLossError("the discriminator's scores became non-finite")


def _start_method(loader: torch.utils.data.DataLoader) -> str:
    """How the loader's worker processes start (fork, spawn, forkserver)."""
    context = loader.multiprocessing_context
    return context.get_start_method() if context is not None else torch.multiprocessing.get_start_method()


def _loader_like(loader: torch.utils.data.DataLoader, dataset, shuffle: bool = False, sampler=None,
                 collate_fn: Optional[Callable] = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with ``loader``'s batch size, workers and memory pinning; ``shuffle`` or a
    ``sampler``, and a ``collate_fn`` (default: torch's), as given."""
    workers = loader.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=loader.batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn, pin_memory=loader.pin_memory,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
    )


class EmbeddingCollate:
    """A training DataLoader's ``collate_fn`` that also embeds the batch's synthesised images, in the worker.

    It adds ``batch[AUG_FEATURES]``: the patch embeddings of ``batch["aug"]``, as the training step would
    compute them, so that the main process skips that backbone pass (see :meth:`GLASS._synthesis_loader`).
    """

    def __init__(self, model: "GLASS") -> None:
        self.model = model

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = torch.utils.data.default_collate(items)
        with torch.no_grad():
            batch[AUG_FEATURES] = self.model._embed(batch["aug"].to(torch.float))[0]
        return batch


def whole_stride(size: int, grid: Sequence[int]) -> Optional[int]:
    """``size`` / the side of a square feature ``grid`` when that is a whole number (the feature stride), else None."""
    if grid[0] != grid[1] or grid[0] == 0 or size % grid[0]:
        return None
    return size // grid[0]


def _kill_hook(epoch: int, step: int | str) -> None:
    """The test-only ``GLASS_TEST_KILL_AT=EPOCH:STEP`` hook: SIGKILL this process at that point (another signal
    with ``GLASS_TEST_KILL_SIGNAL=SIGTERM``, say)."""
    wanted = os.environ.get(KILL_HOOK_ENV)
    if wanted and wanted == f"{epoch}:{step}":
        LOGGER.warning("%s=%s: killing this process (test hook)", KILL_HOOK_ENV, wanted)
        os.kill(os.getpid(), getattr(signal, os.environ.get("GLASS_TEST_KILL_SIGNAL", "SIGKILL")))


# --------------------------------------------------------------------------------------------------

class GLASS(torch.nn.Module):
    """The GLASS detector: frozen backbone features, feature adaptor and discriminator, plus its training."""

    # GAS ascent steps through a FrozenTrueHalf wherever that gives the plain pass's bits (bench/ turns it off
    # to time the reference's passes).
    reuse_true_half = True

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def load(
        self,
        backbone: torch.nn.Module,
        layers_to_extract_from: Sequence[str],
        device: torch.device,
        input_shape: Sequence[int],
        pretrain_embed_dimension: int,
        target_embed_dimension: int,
        patchsize: int = 3,
        meta_epochs: int = 640,
        eval_epochs: int = 1,
        dsc_layers: int = 2,
        dsc_hidden: int = 1024,
        dsc_margin: float = 0.5,
        train_backbone: bool = False,
        pre_proj: int = 1,
        mining: int = 1,
        noise: float = 0.015,
        radius: float = 0.75,
        p: float = 0.5,
        lr: float = 0.0001,
        svd: int = 0,
        step: int = 20,
        limit: int = 392,
        cache: str = "auto",
        cache_dtype: str = "float32",
        amp: str = "off",
        compile: bool = False,
        channels_last: bool = False,
        onednn: bool = False,
        fuse_head: bool = False,
    ) -> None:
        """Build the feature pipeline, projection, discriminator and their optimisers.

        Speed options (none changes the model): ``cache`` (auto, ram, disk, off) and ``cache_dtype`` for the
        frozen-backbone feature cache (see common.py, "Feature cache"; float16 rounds the cached features); ``amp``
        (off, bf16, fp16: autocast of backbone and discriminator forwards, CUDA only), ``compile``
        (torch.compile of the discriminator, CUDA only), ``channels_last`` (backbone memory format) and
        ``onednn`` (the projection's and discriminator's matrix products through oneDNN, CPU only) and
        ``fuse_head`` (inference through :class:`model.FusedHead`). All but ``cache`` change the numbers slightly.
        """
        self.backbone = backbone.to(device)
        self.layers_to_extract_from = list(layers_to_extract_from)
        self.input_shape = tuple(input_shape)
        self.device = device
        self.embedder = common.PatchEmbedder(
            self.backbone,
            self.layers_to_extract_from,
            device,
            input_shape,
            pretrain_embed_dimension,
            target_embed_dimension,
            patchsize=patchsize,
            train_backbone=train_backbone,
        ).to(device)
        self.patch_maker = self.embedder.patch_maker
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension

        self.meta_epochs = meta_epochs
        self.lr = lr
        self.train_backbone = train_backbone
        self.backbone_trained_here = False  # the backbone holds this process's training (--train_backbone)
        if train_backbone:
            self.backbone_opt = torch.optim.AdamW(self.backbone.parameters(), lr)

        self.pre_proj = pre_proj
        if pre_proj > 0:
            self.pre_projection = Projection(target_embed_dimension, target_embed_dimension, pre_proj).to(device)
            self.proj_opt = torch.optim.Adam(self.pre_projection.parameters(), lr, weight_decay=1e-5)

        self.eval_epochs = eval_epochs
        self.dsc_layers = dsc_layers
        self.dsc_hidden = dsc_hidden
        self.discriminator = Discriminator(target_embed_dimension, n_layers=dsc_layers, hidden=dsc_hidden).to(device)
        self.dsc_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=lr * 2)
        self.dsc_margin = dsc_margin

        self.center = torch.tensor(0)
        self.mining_quantile = p
        self.radius = radius
        self.mining = mining
        self.noise_std = noise
        self.hypersphere = svd  # 1: the hypersphere hypothesis, 0: the manifold one (the reference's svd)
        self.ascent_steps = step
        self.sample_limit = limit
        self.judged_distribution: Optional[int] = None
        self.finished_note = ""  # why trainer() skipped training (it returns None then)
        self.focal_loss = FocalLoss()
        self.anomaly_segmentor = common.RescaleSegmentor(device=device, target_size=self.input_shape[-2:])

        self.results_path: Optional[str] = None  # set by set_model_dir: the run's --results_path
        self.excel_dirs: List[str] = []
        self.ckpt_dir = ""
        self.tb_dir = ""
        self._writer: Optional[SummaryWriter] = None  # the class folder's TensorBoard writer (see tb_writer)
        self._purge_step: Optional[int] = None  # its purge_step after a resume
        self.global_step = 0
        self.epoch_stats: Dict[str, float] = {}  # the last trained epoch's mean statistics (history.csv)
        self._set_speed_options(cache, cache_dtype, amp, compile, channels_last, onednn, fuse_head)

    def _set_speed_options(self, cache: str, cache_dtype: str, amp: str, compile: bool, channels_last: bool,
                           onednn: bool, fuse_head: bool = False) -> None:
        """Feature cache settings, autocast, torch.compile, channels-last, oneDNN and the fused inference head
        (see :meth:`load`)."""
        if cache not in utils.CACHE_MODES:
            raise GlassError(f"--cache {cache} is not one of {', '.join(utils.CACHE_MODES)}")
        if cache_dtype not in utils.CACHE_DTYPES:
            raise GlassError(f"--cache_dtype {cache_dtype} is not one of {', '.join(utils.CACHE_DTYPES)}")
        if amp not in utils.AMP_MODES:
            raise GlassError(f"--amp {amp} is not one of {', '.join(utils.AMP_MODES)}")
        self.cache_mode, self.cache_dtype = cache, cache_dtype
        self.train_cache: Optional[common.FeatureCache] = None
        self.test_cache: Optional[common.FeatureCache] = None
        self.cache_folder: Optional[str] = None
        cuda = self.device.type == "cuda"
        self.amp_dtype = AMP_DTYPES.get(amp) if cuda else None
        if amp != "off" and not cuda:
            LOGGER.warning("--amp %s needs a CUDA device: ignored on %s (full float32)", amp, self.device.type)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        discriminate: Callable[[torch.Tensor], torch.Tensor] = self.discriminator
        if compile and not cuda:
            LOGGER.warning("--compile needs a CUDA device: ignored on %s", self.device.type)
        elif compile:
            discriminate = torch.compile(self.discriminator)
        self.__dict__["_discriminator_forward"] = discriminate  # not registered as a second submodule
        self.compiled = discriminate is not self.discriminator
        self.exact_true_half: Dict[Tuple[int, str], bool] = {}  # ascent_pass_is_exact by (rows, device)
        self.onednn = onednn and self.device.type == "cpu" and onednn_linear_available()
        if onednn and self.device.type != "cpu":
            LOGGER.warning("--onednn is for the CPU: ignored on %s", self.device.type)
        elif onednn and not self.onednn:
            LOGGER.warning("--onednn: this torch build has no oneDNN Linear kernel: ignored")
        elif self.onednn:
            LOGGER.info("--onednn: the projection's and discriminator's matrix products run through oneDNN (other last "
                        "bits than torch's)")
        self.fuse_head = bool(fuse_head)
        self._fused: Optional[Tuple[tuple, FusedHead]] = None  # (weights' versions, head): see _fused_head
        self._poolings: Optional[List[LayerPooling]] = None  # see _fused_poolings
        if self.fuse_head:
            LOGGER.info("--fuse_head: evaluation and inference score layer maps through the fused head and compute the "
                        "anomaly maps as matrix products (other last bits than the embedding, projection, discriminator "
                        "and scipy smoothing step by step)")

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``--amp``'s type on CUDA; nothing otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _head_context(self) -> contextlib.AbstractContextManager:
        """The discriminator's forward passes: autocast to ``--amp``'s type on CUDA, oneDNN's Linear layers with
        ``--onednn`` on the CPU, nothing otherwise (the projection takes only the oneDNN route, :meth:`_project`)."""
        return OneDNNLinearMode() if self.onednn else self._autocast()

    def _discriminate(self, features: torch.Tensor) -> torch.Tensor:
        """Discriminator scores (N, 1) in float32, under ``--amp``/``--compile``/``--onednn`` when set."""
        with self._head_context():
            scores = self._discriminator_forward(features)
        return scores.float()

    def _frozen_passes(self, true_feats: torch.Tensor) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]],
                                                                Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """GAS's ascent gradient and final pass through a :class:`FrozenTrueHalf` (``ascent_gradient`` and
        ``final_scores`` of :func:`global_anomaly_synthesis`), each None where the plain passes run instead: no
        ascent steps, ``--compile``, a device and batch size where it would change the last bits, and for the
        final pass ``--amp`` (its reuse is float32 only) and ``--onednn``."""
        if not self.reuse_true_half or self.compiled or self.mining == 0 or self.ascent_steps == 0:
            return None, None
        if self.onednn:  # other last bits by choice: no comparison with the plain pass
            return FrozenTrueHalf(self.discriminator, true_feats, self._head_context, onednn=True).gradient, None
        key = (len(true_feats), str(true_feats.device))
        final_pass = self.amp_dtype is None
        if key not in self.exact_true_half:
            self.exact_true_half[key] = ascent_pass_is_exact(self.discriminator, true_feats, self.noise_std, self._autocast,
                                                             final_pass=final_pass)
            if not self.exact_true_half[key]:
                LOGGER.info("GAS: on %s the frozen true half would change the last bits for batches of %d patches, so "
                            "GAS runs the plain passes", true_feats.device, len(true_feats))
        if not self.exact_true_half[key]:
            return None, None
        half = FrozenTrueHalf(self.discriminator, true_feats, self._autocast)
        return half.gradient, half.final_scores if final_pass and half.reusable_in_final_pass else None

    # ----------------------------------------------------------------------------------------------
    # Folders and checkpoints

    def set_model_dir(self, model_dir: str, class_key: str, results_path: str) -> None:
        """Checkpoints go to ``<model_dir>/<class_key>/`` (``class_key``: ``<dataset>_<class>``, as ``mvtec_bottle``),
        TensorBoard logs to its ``tb/``; judgement images, heatmaps, plots and a disk cache under ``results_path``."""
        self.ckpt_dir = os.path.join(model_dir, class_key)
        self.tb_dir = os.path.join(self.ckpt_dir, "tb")  # made by the writer at its first use (tb_writer)
        os.makedirs(self.ckpt_dir, exist_ok=True)
        self.results_path = results_path
        self.close()
        self._purge_step = None

    @property
    def tb_writer(self) -> Optional[SummaryWriter]:
        """The class folder's TensorBoard writer (None before :meth:`set_model_dir`), opened at its first use, so
        that a run that logs nothing (judging only, a test) adds no event file."""
        if self._writer is None and self.tb_dir:
            self._writer = SummaryWriter(log_dir=self.tb_dir, purge_step=self._purge_step)
        return self._writer

    @tb_writer.setter
    def tb_writer(self, writer) -> None:
        self._writer = writer

    def save_config(self, config: dict) -> str:
        """Write ``<class folder>/config.json``: what is needed to rebuild this model for inference."""
        path = os.path.join(self.ckpt_dir, CONFIG_NAME)
        utils.atomic_write(path, lambda tmp: utils.write_json(tmp, config))
        return path

    def record_missing_config(self, config: dict) -> None:
        """After a test of a class folder without ``config.json`` (one the reference wrote): record the options of
        this run, whose model its best checkpoint fitted, so that ``predict`` and ``pth2onnx`` can rebuild it.

        The checkpoint fits any backbone, layers, patch size or image size of its shapes, so the file is marked
        ``recorded_by_test`` and the run warns: only the user knows whether these were the training options.
        """
        path = os.path.join(self.ckpt_dir, CONFIG_NAME)
        if os.path.isfile(path):
            return
        try:
            self.save_config({**config, RECORDED_BY_TEST: True})
        except GlassError as exc:  # the test itself succeeded: its results still count
            LOGGER.warning("%s; predict and pth2onnx need it (pth2onnx can take the options on its command line)", exc)
            return
        LOGGER.warning("Wrote %s from this run's options, since the class folder had none: predict and pth2onnx "
                       "rebuild the model from it, so if the checkpoint was trained with another backbone, other "
                       "layers, patch size or image size, delete it and test again with those", path)

    def close(self) -> None:
        """Close the TensorBoard writer of the class folder (a later use opens a new one). A write it could not
        finish (a full disk) is a warning: the checkpoints and CSV files, which it does not touch, say what was kept."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:
                LOGGER.warning("The TensorBoard log in %s may lack its last entries: %s", self.tb_dir, exc)

    def best_checkpoint(self) -> Optional[str]:
        """Path of ``ckpt_best_<epoch>.pth`` in the class folder, if any (the highest epoch if several)."""
        return best_checkpoint_in(self.ckpt_dir)

    def checkpoint_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The reference's checkpoint format: ``{"discriminator": ..., "pre_projection": ...}`` on CPU."""
        state = {"discriminator": cpu_copy(self.discriminator.state_dict())}
        if self.pre_proj > 0:
            state["pre_projection"] = cpu_copy(self.pre_projection.state_dict())
        return state

    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint written by this project or by the reference; refuse mismatching ones."""
        self._load_weights(read_checkpoint_file(path, self.device), path)

    def _load_weights(self, state: dict, path: str) -> None:
        """Load the ``discriminator`` (and ``pre_projection``) entries of a checkpoint read from ``path``."""
        self._load_part(self.discriminator, state["discriminator"], "discriminator", path)
        if self.pre_proj > 0:
            if "pre_projection" not in state:
                raise GlassError(f"{path} has no 'pre_projection' entry but --pre_proj is {self.pre_proj}: use --pre_proj 0 or another checkpoint")
            self._load_part(self.pre_projection, state["pre_projection"], "pre_projection", path)
        elif "pre_projection" in state:
            raise GlassError(f"{path} has a 'pre_projection' entry (a feature adaptor) but --pre_proj is 0: use the "
                             "--pre_proj it was trained with")

    @staticmethod
    def _load_part(module: torch.nn.Module, state: dict, part: str, path: str) -> None:
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise GlassError(f"{path}: its '{part}' entry is not a state dict of tensors: use a checkpoint written by GLASS")
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise GlassError(
                f"{path}: {part} does not match this configuration (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "check --dsc_layers/--pre_proj"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise GlassError(
                    f"{path}: {part}.{key} has shape {tuple(value.shape)} but this configuration needs "
                    f"{tuple(expected[key].shape)}; check --target_embed_dimension/--dsc_hidden"
                )
        module.load_state_dict(state)

    # ----------------------------------------------------------------------------------------------
    # Training checkpoint (ckpt.pth): the reference's two entries plus what resuming needs

    def training_checkpoint(self, epoch: int, weights: dict, best_record: Optional[Sequence[float]],
                            best_path: Optional[str]) -> Dict[str, Any]:
        """Content of ``ckpt.pth`` after ``epoch``: the model ``weights`` and the whole training state.

        Top level, as the reference: ``discriminator``, ``pre_projection``. Added: ``format``, ``epoch``
        (just finished), ``meta_epochs``, ``best_record`` ([i_auroc, i_ap, p_auroc, p_ap, p_pro, epoch] or
        None), ``best_checkpoint`` (file name or None), ``svd``, ``judged_distribution``, ``global_step``
        (TensorBoard), optimiser states ``dsc_opt``, ``proj_opt`` and, with --train_backbone,
        ``backbone_opt``, ``backbone`` (weights) and ``backbone_grad`` (its gradients, never cleared), and ``rng``
        (see :func:`rng_state`). Only tensors and plain values, so that it loads with ``weights_only=True``.
        """
        state: Dict[str, Any] = dict(weights)
        state.update({
            "format": RESUME_FORMAT,
            "epoch": int(epoch),
            "meta_epochs": int(self.meta_epochs),
            "best_record": None if best_record is None else [float(v) for v in best_record[:-1]] + [int(best_record[-1])],
            "best_checkpoint": None if best_path is None else os.path.basename(best_path),
            "svd": int(self.hypersphere),
            "judged_distribution": None if self.judged_distribution is None else int(self.judged_distribution),
            "global_step": int(self.global_step),
            "dsc_opt": self.dsc_opt.state_dict(),
            "rng": rng_state(),
        })
        if self.pre_proj > 0:
            state["proj_opt"] = self.proj_opt.state_dict()
        if self.train_backbone:
            state["backbone_opt"] = self.backbone_opt.state_dict()
            state["backbone"] = cpu_copy(self.backbone.state_dict())
            state["backbone_grad"] = cpu_copy({k: v.grad for k, v in self.backbone.named_parameters() if v.grad is not None})
        return state

    def read_training_checkpoint(self) -> Optional[dict]:
        """The class folder's ``ckpt.pth`` (None when absent); a damaged file is a GlassError."""
        path = os.path.join(self.ckpt_dir, TRAINING_CHECKPOINT)
        if os.path.lexists(path) and not os.path.isfile(path):
            what = "a link to nowhere" if is_broken_link(path) else "not a file"
            raise GlassError(f"{path} is {what}: move it away (training resumes from that file, so it is not "
                             "passed over)")
        if not os.path.isfile(path):
            return None
        fix = f"delete it to train {os.path.basename(self.ckpt_dir)} from the start"
        # On the CPU: load_state_dict moves weights and optimiser states to their parameters' device.
        state = read_checkpoint_file(path, "cpu", fix=fix)
        problem = training_state_problem(state)
        if problem is not None:
            raise GlassError(f"{path} is damaged ({problem}): {fix}")
        return state

    def training_status(self, state: Optional[dict], meta_epochs: Optional[int] = None) -> str:
        """``new``, ``resume`` (ckpt.pth stopped before the last epoch) or ``finished``.

        A ckpt.pth with training state decides by its epoch against ``meta_epochs`` (default: this run's
        ``--meta_epochs``). Without one (a folder written by the reference, or none at all) a present
        ``ckpt_best_*.pth`` means finished, as in the reference.
        """
        if state is not None and "epoch" in state:
            planned = self.meta_epochs if meta_epochs is None else meta_epochs
            return "finished" if int(state["epoch"]) >= planned - 1 else "resume"
        return "finished" if self.best_checkpoint() is not None else "new"

    def check_config(self, config: dict, training: bool) -> None:
        """Refuse a class folder trained with other model-shaping options; record ``config.json`` for new runs.

        ``config`` is what ``main.run`` knows about this run (backbone, layers, input shape, options). A test-only
        run (``training`` False) needs the best checkpoint only, so it goes on past a damaged ckpt.pth with a warning,
        and judges whether the training had finished by the epochs that training was run for, not by this run's
        ``--meta_epochs``.
        """
        try:
            state = self.read_training_checkpoint()
        except GlassError as exc:
            if training:
                raise
            LOGGER.warning("%s; testing the best checkpoint all the same", exc)
            state = None
        planned = self.meta_epochs
        if not training and state is not None and "meta_epochs" in state:
            planned = int(state["meta_epochs"])
        status = self.training_status(state, planned)
        path = os.path.join(self.ckpt_dir, CONFIG_NAME)
        if status != "new" and os.path.isfile(path):
            saved = read_config_file(path)
            differences = config_differences(saved, config)
            if differences and saved.get(RECORDED_BY_TEST):
                raise GlassError(
                    f"{path} was recorded by a test of this folder with other options ({'; '.join(differences)}): "
                    f"rerun with those, or delete {path} if the checkpoint was trained with this run's"
                )
            if differences:
                raise GlassError(
                    f"{self.ckpt_dir} holds a model trained with other options ({'; '.join(differences)}): "
                    "rerun with the options it was trained with, or use another --results_path"
                )
            # Another --meta_epochs only moves the last epoch (no schedule depends on it); the trainer says so.
            changed = [d for d in other_differences(saved, config) if not d.startswith("net.meta_epochs:")]
            if training and status == "resume" and changed:
                LOGGER.warning("Resuming %s with other training options than it started with (%s): the result will "
                               "differ from an uninterrupted run", os.path.basename(self.ckpt_dir), "; ".join(changed))
            view = [d for d in changed if d.startswith(TEST_VIEW_OPTIONS)]
            if (status == "finished" or not training) and view:
                LOGGER.warning("Testing %s on images prepared otherwise than at its training (%s): its metrics, which "
                               "replace the class's row in results.csv, are not those of its training setup",
                               os.path.basename(self.ckpt_dir), "; ".join(view))
            renamed = [d for d in changed if d.startswith("dataset.classname:")]
            if renamed:
                LOGGER.warning("%s holds a model of another class (%s): a copied or renamed folder? Its metrics and "
                               "predictions are then not this class's", self.ckpt_dir, renamed[0])
            # What a test uses, or says above, is not ignored: the view of the images, the data, the speed options.
            used = TEST_VIEW_OPTIONS + ("dataset.data_path:", "dataset.classname:") + tuple(
                f"net.{key}:" for key in SPEED_OPTION_DEFAULTS)
            unused = [d for d in changed if not d.startswith(used)]
            if training and status == "finished" and unused:
                LOGGER.warning("%s is already trained, with other training options than this run's (%s), which it "
                               "ignores: to train with them, delete it or use another --results_path",
                               self.ckpt_dir, "; ".join(unused))
            moved = [d for d in changed if d.startswith("dataset.data_path:")]
            if (status == "finished" or not training) and moved:
                LOGGER.warning("Testing %s, trained on the data in %s, on the test images in %s (the same images moved, "
                               "or another dataset?)", os.path.basename(self.ckpt_dir),
                               saved.get("dataset", {}).get("data_path"), config.get("dataset", {}).get("data_path"))
        if training and (status == "new" or (status == "resume" and not os.path.isfile(path))):
            self.save_config(config)
        if status == "resume" and not training:
            finish = "--test ckpt" + (f" --meta_epochs {planned}" if planned != self.meta_epochs else "")
            LOGGER.warning("Training of %s stopped after %d of %d epochs: testing its best checkpoint so far "
                           "(rerun with %s to finish training)", os.path.basename(self.ckpt_dir),
                           int(state["epoch"]) + 1, planned, finish)
        if state is not None and "epoch" in state:
            self._settle_best_checkpoint(state, training)

    def _settle_best_checkpoint(self, state: dict, training: bool = True) -> None:
        """Make the folder's best checkpoint the one ckpt.pth records (a kill may leave it missing or doubled).

        ckpt.pth is written before a new best file and the old best is removed last, so a missing
        recorded best is always the epoch of ckpt.pth itself and is rewritten from its weights, and a best
        file that a kill left behind has a lower epoch than the recorded one: a training run removes it, a
        test-only run leaves it (the recorded one, the highest epoch, is tested). A higher epoch was put
        there by hand: a test-only run tests it (the highest epoch) and says so, a training run refuses it.
        """
        recorded = state.get("best_checkpoint")
        if recorded is not None and not os.path.isfile(os.path.join(self.ckpt_dir, recorded)):
            path = os.path.join(self.ckpt_dir, recorded)
            if state.get("best_record") is None or int(state["best_record"][-1]) != int(state["epoch"]):
                raise MissingCheckpointError(
                    f"the best checkpoint {path} recorded in ckpt.pth is missing: restore it, or delete "
                    f"{self.ckpt_dir} to train this class again"
                )
            LOGGER.warning("Writing %s from ckpt.pth (the run was killed before writing it)", path)
            weights = {key: {k: v.cpu() for k, v in state[key].items()} for key in CHECKPOINT_KEYS if key in state}
            utils.atomic_torch_save(weights, path)
        recorded_epoch = checkpoint_epoch(recorded) if recorded is not None else -1
        records = f"ckpt.pth records {recorded} as the best" if recorded else "ckpt.pth records no best checkpoint"
        for path in best_checkpoints_in(self.ckpt_dir):
            if os.path.basename(path) == recorded:
                continue
            if checkpoint_epoch(path) < recorded_epoch:
                if training:
                    LOGGER.warning("Removing %s: %s (the run was killed before removing it)", path, records)
                    os.remove(path)
            elif training:
                raise GlassError(f"{path} was not written by this class's training ({records}): move it out of "
                                 f"{self.ckpt_dir} to train, or test it with --test test")
            else:
                LOGGER.warning("Testing %s, the highest epoch in %s, although %s", path, self.ckpt_dir, records)

    def restore_training_checkpoint(self, state: dict, path: str) -> Tuple[int, Optional[list], Optional[str]]:
        """Load weights, optimisers and counters from a ckpt.pth state; returns (epoch, best_record, best_path).

        The random generators are restored separately (:func:`set_rng_state`), right before the next epoch.
        """
        needed = ["epoch", "dsc_opt", "rng", "global_step", "svd"] + (["proj_opt"] if self.pre_proj > 0 else [])
        needed += ["backbone_opt", "backbone", "backbone_grad"] if self.train_backbone else []
        missing = [key for key in needed if key not in state]
        if missing or int(state.get("format", 0)) > RESUME_FORMAT:
            raise GlassError(f"{path} cannot be resumed (missing {missing or 'nothing'}, format {state.get('format')}): "
                             "delete it to train this class from the start")
        self._load_weights(state, path)
        try:
            if self.train_backbone:
                self.backbone.load_state_dict(state["backbone"])
                self.backbone_opt.load_state_dict(state["backbone_opt"])
                parameters = dict(self.backbone.named_parameters())
                for name, grad in state["backbone_grad"].items():
                    parameters[name].grad = grad.to(parameters[name].device)
            self.dsc_opt.load_state_dict(state["dsc_opt"])
            if self.pre_proj > 0:
                self.proj_opt.load_state_dict(state["proj_opt"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise GlassError(f"{path}: the optimiser state does not fit this model ({str(exc).splitlines()[0]}): "
                             "delete it to train this class from the start") from None
        self.hypersphere = int(state["svd"])
        self.judged_distribution = state.get("judged_distribution")
        self.global_step = int(state["global_step"])
        best_record = state.get("best_record")
        best_path = os.path.join(self.ckpt_dir, state["best_checkpoint"]) if state.get("best_checkpoint") else None
        return int(state["epoch"]), (list(best_record) if best_record is not None else None), best_path

    # ----------------------------------------------------------------------------------------------
    # Features

    def _layer_features(self, images: torch.Tensor, evaluation: bool = False) -> List[torch.Tensor]:
        """The backbone's wanted layer maps of a batch (float32; under ``--amp``/``--channels_last`` when set)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            maps = self.embedder.layer_features(images, evaluation=evaluation)
        return [m.float() for m in maps]

    def _embed(self, images: torch.Tensor, evaluation: bool = False) -> Tuple[torch.Tensor, List[List[int]]]:
        """Patch embeddings (B * h * w, target_dim) of a batch and each layer's patch grid."""
        return self.embedder.embed_layer_features(self._layer_features(images, evaluation=evaluation))

    def _embed_plain(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[List[int]], List[torch.Tensor]]:
        """Embeddings, grids and layer maps of a centre-pass batch; a batch of one image runs as two copies.

        On the CPU a backbone's features of an image do not depend on the other images of its batch,
        except in a batch of one (another kernel, last-bit differences). Running a lone image as a pair
        gives it the features it has in any training batch, so cached true features equal computed ones.
        """
        single = images.shape[0] == 1
        maps = self._layer_features(torch.cat([images, images]) if single else images)
        features, grids = self.embedder.embed_layer_features(maps)
        if single:
            features, maps = features[: len(features) // 2], [m[:1] for m in maps]
        return features, grids, maps

    def _embed_maps(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings of a batch from its (cached) layer maps."""
        return self.embedder.embed_layer_features(maps)[0]

    def _embed_plain_maps(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """:meth:`_embed_plain` from cached layer maps (a lone image's maps embedded as a pair)."""
        if maps[0].shape[0] == 1:
            features = self._embed_maps([torch.cat([m, m]) for m in maps])
            return features[: len(features) // 2]
        return self._embed_maps(maps)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The feature adaptor's output (the features themselves with ``--pre_proj 0``)."""
        if self.pre_proj == 0:
            return features
        with OneDNNLinearMode() if self.onednn else contextlib.nullcontext():  # the projection runs without autocast
            return self.pre_projection(features)

    # ----------------------------------------------------------------------------------------------
    # Training

    def trainer(self, training_data: DataLoader, val_data: DataLoader, name: str) -> Union[List[float], int, None]:
        """Train on ``training_data``, evaluating on ``val_data`` every ``eval_epochs`` (see :meth:`_train`):
        the best record, the judged flag (``--distribution 1``), or None (trained before).

        The feature caches are freed (and a disk cache deleted), and the kept training images dropped, when
        training ends, however it ends.
        """
        try:
            return self._train(training_data, val_data, name)
        finally:
            self.close_feature_caches()
            release = getattr(getattr(training_data, "dataset", None), "release_images", None)
            if release is not None:
                release()

    def _train(self, training_data: DataLoader, val_data: DataLoader, name: str) -> Union[List[float], int, None]:
        """Train on ``training_data``, evaluating on ``val_data`` every ``eval_epochs``.

        Returns the best record ``[i_auroc, i_ap, p_auroc, p_ap, p_pro, epoch]``; ``None`` when the class
        was trained before (training is skipped); the judged flag (int) for ``--distribution 1``, which only
        judges, whatever the class folder holds (the reference skips a class with a best checkpoint first).

        Resuming: ``ckpt.pth`` is written after every epoch with the whole training state (see
        :meth:`training_checkpoint`). When it stops before the last epoch, training continues with the
        next epoch, the random generators restored as they were, so that the run ends as an
        uninterrupted one would (CPU, same options). The DataLoader's shuffling and its workers' seeds
        are drawn from torch's global generator in the main process, so this holds with
        ``--num_workers 0`` and with workers too, as long as the worker count is the same as before
        (it changes the random stream; config.json does not record it). On CUDA, kernels that are not
        deterministic can make any two runs differ, resumed or not. Per epoch the files are written in
        the order ckpt.pth, new ``ckpt_best_<epoch>.pth``, removal of the old best: a kill at any moment
        leaves a state that :meth:`_settle_best_checkpoint` puts right. TensorBoard events that the
        killed run wrote after its last ckpt.pth are purged (``purge_step``).

        Data flow per epoch: the centre from the training images in dataset order without synthesis
        (:meth:`_center_loader`), the discriminator steps on the shuffled synthesising loader (whose workers
        also embed the synthesised images where that keeps the bits, :meth:`_synthesis_loader`), the
        evaluation on ``val_data``. With a frozen backbone, features of the un-augmented training images
        and of the test images come from the feature cache (:meth:`setup_feature_caches`); the passes
        that do not train run with the random generators isolated (:func:`isolated_rng`), so the run is
        the same with or without the cache. Heatmaps are not written here: the test of the best
        checkpoint after training writes them once.
        """
        if judges_only(training_data):  # whatever the class folder holds: nothing is trained or tested
            self.hypersphere = self.judged_distribution = self._judge_distribution(training_data, name)
            return self.hypersphere
        state = self.read_training_checkpoint()
        status = self.training_status(state)
        if status == "finished":
            if state is not None and "epoch" in state:
                self._settle_best_checkpoint(state)
                done = int(state["epoch"]) + 1
                epochs = f"{done} epoch" + ("s" if done > 1 else "")
                self.finished_note = (epochs if done == self.meta_epochs else
                                      f"{epochs}, more than the {self.meta_epochs} asked for")
            else:
                whose = "a ckpt.pth without training state" if state is not None else "no ckpt.pth"
                self.finished_note = f"{os.path.basename(self.best_checkpoint())} and {whose}: by the reference?"
            return None

        self.check_mask_grid(training_data)
        start_epoch, best_record, best_path = 0, None, None
        if status == "resume":
            started_for = int(state.get("meta_epochs", self.meta_epochs))
            if started_for != self.meta_epochs:
                LOGGER.info("%s: training to %d epochs (its last run was for %d)", name, self.meta_epochs, started_for)
            start_epoch, best_record, best_path = self._resume(state, name)
        else:
            if state is not None:
                LOGGER.warning("%s: %s holds no training state (written by the reference?): training from the start",
                               name, TRAINING_CHECKPOINT)
            self._choose_distribution(training_data, name)
        self._settle_foreground(training_data, name)

        self._preload_training_images(training_data, epochs=self.meta_epochs - start_epoch)
        center_data = self._center_loader(training_data)
        self.setup_feature_caches(center_data, val_data, training_data)
        synthesis_data = self._synthesis_loader(training_data)
        summary = self._summary(best_record[:-1], int(best_record[-1]), best_record) if best_record is not None else ""
        # On a terminal a bar; in a log file (stderr not a terminal) one log line per epoch instead.
        live = utils.live_terminal()
        pbar = tqdm.tqdm(range(start_epoch, self.meta_epochs), initial=start_epoch, total=self.meta_epochs,
                         unit="epoch", desc=name, dynamic_ncols=True, disable=not live)
        if status == "resume":  # last, so that nothing draws from the generators before the epoch does
            set_rng_state(state["rng"])
            del state
        self.backbone_trained_here = self.train_backbone  # trained below, or restored by the resume above
        for epoch in pbar:
            self._compute_center(center_data)
            try:
                epoch_str = self._train_discriminator(synthesis_data, epoch, pbar, summary)
            except NonFiniteLossError as exc:
                raise _training_stopped(name, str(exc), epoch, best_path) from None
            weights = self.checkpoint_state()

            result, new_best = None, None
            if (epoch + 1) % self.eval_epochs == 0:
                result = self._evaluate_epoch(val_data, epoch, name, best_path)
                if best_record is None or self._selection_score(result) > self._selection_score(best_record):
                    best_record = [*result, epoch]
                    new_best = os.path.join(self.ckpt_dir, best_checkpoint_name(epoch))
                summary = self._summary(result, epoch, best_record)
                pbar.set_description_str(f"{epoch_str} {summary}", refresh=False)  # shown by the epoch's update
            best_path = self._save_epoch(epoch, weights, result, best_record, best_path, new_best)
            if not live:
                LOGGER.info("%s: %s", name, f"{epoch_str} {summary if result is not None else ''}".strip())
        if self._writer is not None:
            self._writer.flush()
        return best_record

    def _resume(self, state: dict, name: str) -> Tuple[int, Optional[list], Optional[str]]:
        """Restore an interrupted training from ``state`` (its ckpt.pth): (first epoch to run, best record, best path)."""
        ckpt_path = os.path.join(self.ckpt_dir, TRAINING_CHECKPOINT)
        self._settle_best_checkpoint(state)
        last_epoch, best_record, best_path = self.restore_training_checkpoint(state, ckpt_path)
        LOGGER.info("%s: resuming from %s (%d of %d epochs done)", name, ckpt_path, last_epoch + 1, self.meta_epochs)
        self.close()  # the next writer hides what the interrupted run logged after its last checkpoint
        self._purge_step = self.global_step
        return last_epoch + 1, best_record, best_path

    def _evaluate_epoch(self, val_data, epoch: int, name: str, best_path: Optional[str]) -> List[float]:
        """The per-epoch evaluation on ``val_data`` (AP and PRO left at 0, as the reference), logged to TensorBoard."""
        images, scores, segmentations, labels_gt, masks_gt = self.predict(val_data, keep_images=False)
        if not np.isfinite(scores).all():
            raise _training_stopped(name, "the test images' anomaly scores became non-finite", epoch, best_path)
        result = self._evaluate(scores, segmentations, labels_gt, masks_gt, path="training")
        for tag, value in zip(("i-auroc", "i-ap", "p-auroc", "p-ap", "p-pro"), result):
            self.tb_writer.add_scalar(tag, value, epoch)
        utils.log_eval_samples(self.tb_writer, epoch, self.meta_epochs, self.eval_epochs, images, segmentations, labels_gt,
                               masks_gt)
        return result

    def _save_epoch(self, epoch: int, weights: dict, result: Optional[List[float]], best_record: Optional[list],
                    best_path: Optional[str], new_best: Optional[str]) -> Optional[str]:
        """Write an epoch's history row, ckpt.pth and, when it is the new best, its checkpoint; returns the best path.

        history.csv (utils.py, "Reports") comes before ckpt.pth, so that a resumed epoch rewrites its row; then
        ckpt.pth (it names the new best), then the new best, and the old best goes last.
        """
        utils.record_epoch(self.ckpt_dir, epoch, self.global_step, self.epoch_stats, result)
        ckpt = self.training_checkpoint(epoch, weights, best_record, new_best or best_path)
        utils.atomic_torch_save(ckpt, os.path.join(self.ckpt_dir, TRAINING_CHECKPOINT))
        _kill_hook(epoch, "saved")
        if new_best is None:
            return best_path
        utils.atomic_torch_save(weights, new_best)
        if best_path is not None and best_path != new_best and os.path.exists(best_path):
            os.remove(best_path)
        return new_best

    @staticmethod
    def _summary(result: Sequence[float], epoch: int, best_record: Sequence[float]) -> str:
        """Progress-bar text: the metrics of ``epoch`` with the best ones (and their epoch) in brackets."""
        return " ".join(
            f"{label}:{utils.format_metric(now)}({utils.format_metric(best)})"
            for label, now, best in zip(("IAUC", "IAP", "PAUC", "PAP", "PRO"), result, best_record)
        ) + f" E:{epoch}({int(best_record[-1])})"

    def feature_grid(self) -> Tuple[int, int]:
        """The first feature layer's patch grid (rows, columns) for an image of ``input_shape``."""
        with torch.no_grad():
            _, grids = self._embed(torch.zeros(1, *self.input_shape, device=self.device), evaluation=True)
        return int(grids[0][0]), int(grids[0][1])

    def check_mask_grid(self, training_data: DataLoader) -> None:
        """Refuse, before training, a Perlin mask grid (imagesize // downsampling) unlike the feature grid."""
        dataset = getattr(training_data, "dataset", None)
        size, downsampling = getattr(dataset, "imgsize", None), getattr(dataset, "downsampling", None)
        if size is None or not downsampling:
            return
        grid = self.feature_grid()
        mask_side = size // downsampling
        if grid != (mask_side, mask_side):
            stride = whole_stride(size, grid)
            hint = (f"use --downsampling {stride}" if stride is not None
                    else "choose --imagesize and --downsampling so that imagesize / downsampling is that grid")
            raise GlassError(
                f"--imagesize {size} with --downsampling {downsampling} gives a {mask_side}x{mask_side} anomaly mask grid "
                f"but layer {self.layers_to_extract_from[0]} gives a {grid[0]}x{grid[1]} feature grid: {hint}"
            )

    def check_imagesize(self) -> None:
        """Refuse an input size that training never has (for a bare checkpoint's options): check_mask_grid lets
        only sizes through that are a whole number (--downsampling) of times the first feature grid."""
        size, grid = self.input_shape[-1], self.feature_grid()
        if whole_stride(size, grid) is None:
            raise GlassError(
                f"--imagesize {size} is not a multiple of the feature stride of layer {self.layers_to_extract_from[0]} "
                f"(its feature grid is {grid[0]}x{grid[1]}), so main.py trains no such model: give the --imagesize "
                "the checkpoint was trained with"
            )

    @staticmethod
    def _selection_score(record: Sequence[float]) -> float:
        """Model selection: image AUROC + pixel AUROC (pixel AUROC counts 0 where not available)."""
        pixel = record[2] if np.isfinite(record[2]) else 0.0
        return record[0] + pixel

    def _choose_distribution(self, training_data, name: str) -> None:
        """Set ``self.hypersphere`` for training from ``--distribution`` (1, judging only, is :meth:`_train`'s).

        2 = manifold; 3 = hypersphere; 0 = the xlsx entry; 4 = its opposite. A class missing from the xlsx is
        judged and recorded, then trained with the judged hypothesis (0) or its opposite (4), as a rerun that
        reads the recorded table would.
        """
        choice = getattr(training_data.dataset, "distribution", 0)
        self.judged_distribution = None
        if choice in (2, 3):
            self.hypersphere = 0 if choice == 2 else 1
            return
        dataset_name = name.split("_")[0]
        found = utils.lookup_distribution(self.excel_dirs, dataset_name, name)
        if found is None:
            LOGGER.warning(
                "%s is not in any %s_distribution.xlsx (looked in %s): judging it now, recording the result and training with it",
                name, dataset_name, ", ".join(self.excel_dirs) or "nowhere",
            )
            self.judged_distribution = self._judge_distribution(training_data, name)
            # 4 trains on the opposite of what the table will say, as a rerun reading it would.
            self.hypersphere = self.judged_distribution if choice == 0 else 1 - self.judged_distribution
        else:
            self.hypersphere = found[0] if choice == 0 else 1 - found[0]
        LOGGER.info("%s: %s hypothesis (svd %d)", name, "hypersphere" if self.hypersphere else "manifold", self.hypersphere)

    def _settle_foreground(self, training_data, name: str) -> None:
        """``--fg 2`` for a class missing from the xlsx: foreground masks as its judgement records them (this run's
        or, resumed, the interrupted run's), as a rerun reading the recorded table would; the reference's fg 1 when
        the class was not judged."""
        dataset = getattr(training_data, "dataset", None)
        if not getattr(dataset, "foreground_pending", False):
            return
        try:
            dataset.settle_foreground(1 if self.judged_distribution is None else self.judged_distribution)
        except GlassError as exc:
            raise ClassStoppedError(f"{name}: {exc}") from None

    def _judge_distribution(self, training_data, name: str) -> int:
        """Judge manifold vs hypersphere from the mean normalised training image (spec, "Training").

        The mean of the batch means of the training images as ``--distribution 1`` shows them (square resize,
        no enlargement: :meth:`_judge_loader`), whichever mode asked, so that a class judged during training
        gets the hypothesis that ``--distribution 1`` records (the authors made their tables that way). The
        pass runs with the random generators isolated: training then goes on as from a table listing the class.
        """
        loader = self._judge_loader(training_data)
        total = None
        with torch.no_grad(), isolated_rng():
            for batch in utils.iter_loader(loader):
                batch_mean = batch["image"].to(torch.float).mean(dim=0)
                total = batch_mean if total is None else total + batch_mean
        mean_image = utils.torch_format_2_numpy_img((total / len(loader)).cpu().numpy())
        judge_dir = os.path.join(self.results_path, "judge")
        flag = utils.distribution_judge(mean_image, name, output_dir=os.path.join(judge_dir, "fft"))
        avg_path = os.path.join(judge_dir, "avg", str(flag), f"{name}.png")
        os.makedirs(os.path.dirname(avg_path), exist_ok=True)
        utils.write_png(avg_path, mean_image)
        return flag

    @staticmethod
    def _judge_loader(training_data):
        """The judgement's loader: ``dataset.judge_view()`` shuffled in batches as ``training_data`` (the reference
        iterates its shuffled training loader: the same images and batches, here without anomaly synthesis);
        ``training_data`` itself when its dataset has no judge view."""
        dataset = getattr(training_data, "dataset", None)
        if not hasattr(dataset, "judge_view") or not isinstance(training_data, torch.utils.data.DataLoader):
            return training_data
        return _loader_like(training_data, dataset.judge_view(), shuffle=True)

    # ----------------------------------------------------------------------------------------------
    # Centre pass and feature cache

    def _center_loader(self, training_data):
        """The centre pass's loader: the training images in dataset order, without anomaly synthesis.

        A DataLoader over ``dataset.plain_view()`` with the training loader's batch size and workers
        (the reference iterates the shuffled, synthesising training loader instead: same distribution,
        other random draws; README, deviations). ``training_data`` itself when its dataset has no plain view.
        """
        dataset = getattr(training_data, "dataset", None)
        if not hasattr(dataset, "plain_view") or not isinstance(training_data, torch.utils.data.DataLoader):
            return training_data
        return _loader_like(training_data, dataset.plain_view(), shuffle=False)

    def _synthesis_loader(self, training_data):
        """The discriminator steps' loader: ``training_data``, or one like it whose workers also embed the
        synthesised images (:class:`EmbeddingCollate`) where that gives the main process's bits.

        That is on the CPU with a frozen backbone, the main process at one torch thread (DataLoader
        workers run one; another count changes the backbone's last bits) and workers started by fork
        (they share the model without pickling it; workers at more threads hang after a fork in
        GNU OpenMP). The step then skips one backbone pass, run meanwhile by the workers on the other
        cores. The same sampler, so the same shuffling; a loader with its own ``collate_fn`` is kept.
        """
        if not self._workers_can_embed(training_data):
            return training_data
        LOGGER.info("The DataLoader workers embed the synthesised images (CPU, one torch thread: the same bits)")
        return _loader_like(training_data, training_data.dataset, sampler=training_data.sampler,
                            collate_fn=EmbeddingCollate(self))

    def _workers_can_embed(self, training_data) -> bool:
        """Whether :meth:`_synthesis_loader` moves the synthesised images' embedding into the workers."""
        if type(training_data) is not torch.utils.data.DataLoader or training_data.num_workers == 0:
            return False
        return (
            self.device.type == "cpu"
            and not self.train_backbone
            and torch.get_num_threads() == 1
            and _start_method(training_data) == "fork"
            and training_data.collate_fn is torch.utils.data.default_collate
            and training_data.batch_size is not None
        )

    def _preload_training_images(self, training_data, epochs: int) -> None:
        """Decode and resize the training images once, here, before any DataLoader worker starts
        (``preload_images`` of the dataset): the same items, with less work for the workers at every epoch. The
        textures too (``preload_textures``) when the ``epochs`` still to train draw more textures than there are.

        Only where the workers are forked (they then share the images; spawned workers would get a pickled copy
        each) or absent, and within :data:`PRELOAD_MEMORY_SHARE` of the available memory.
        """
        dataset = getattr(training_data, "dataset", None)
        if not isinstance(training_data, torch.utils.data.DataLoader) or not hasattr(dataset, "preload_images"):
            return
        if training_data.num_workers > 0 and _start_method(training_data) != "fork":
            return
        memory = common.available_memory()
        budget = int(PRELOAD_MEMORY_SHARE * memory) if memory is not None else PRELOAD_UNKNOWN_MEMORY_BYTES
        kept = dataset.preload_images(budget)
        if kept:
            LOGGER.info("Training images decoded and resized once: %d images, %s in memory", len(dataset),
                        common.byte_size(kept))
        else:
            LOGGER.info("Training images decoded at every epoch: kept, they would need more than %s",
                        common.byte_size(budget))
        textures = len(getattr(dataset, "anomaly_source_paths", []))
        draws = epochs * min(len(dataset), self.sample_limit + (training_data.batch_size or 1))  # an epoch stops past --limit
        if not textures or draws < textures:
            return
        kept_textures = dataset.preload_textures(budget - kept)
        if kept_textures:
            LOGGER.info("Textures decoded and resized once: %d textures, %s in memory", len(dataset.resized_textures),
                        common.byte_size(kept_textures))
        else:
            LOGGER.info("Textures decoded at every draw: kept, they would need more than %s",
                        common.byte_size(budget - kept))

    def setup_feature_caches(self, center_data: DataLoader, val_data: DataLoader,
                             training_data: Optional[DataLoader] = None) -> None:
        """Cache the backbone features of the centre-pass images and of ``val_data`` (``--cache``).

        Not with ``--train_backbone`` (the features change every step). With train-time augmentation the
        training images differ every epoch, so only the test images are cached. Storage and content
        follow :func:`common.plan_cache`; building runs with the random generators isolated.
        """
        self.close_feature_caches()
        if self.cache_mode == "off":
            return
        if self.train_backbone:
            LOGGER.info("Feature cache off: --train_backbone changes the backbone features every step")
            return
        dataset = getattr(training_data if training_data is not None else center_data, "dataset", None)
        augmented = [key for key, value in (getattr(dataset, "augmentation", None) or {}).items() if value]
        cache_train = center_data is not training_data and hasattr(center_data, "dataset") and not augmented
        if augmented:
            LOGGER.info("Feature cache: training images not cached (train-time augmentation --%s changes them every "
                        "epoch); test images cached", " --".join(augmented))
        elif not cache_train:
            LOGGER.info("Feature cache: training images not cached (their loader has no plain view)")
        cache_test = isinstance(val_data, torch.utils.data.DataLoader) and hasattr(val_data.dataset, "__len__")
        sets = ([("train", center_data)] if cache_train else []) + ([("test", val_data)] if cache_test else [])
        if not sets:
            return
        with torch.no_grad():
            maps = self._layer_features(torch.zeros(1, *self.input_shape, device=self.device), evaluation=True)
            features, _ = self.embedder.embed_layer_features(maps)
        layer_shapes = [tuple(m.shape[1:]) for m in maps]
        embedding_shape = (features.shape[0], features.shape[1])
        per_image = common.FeatureCache.bytes_per_image(layer_shapes, embedding_shape, self.cache_dtype)
        counts = {kind: len(loader.dataset) for kind, loader in sets}
        sizes = {content: size * sum(counts.values()) for content, size in per_image.items()}
        plan = common.plan_cache(self.cache_mode, sizes, self.results_path)
        described = " + ".join(f"{count} {kind}" for kind, count in counts.items())
        if plan.storage == "off":
            LOGGER.info("Feature cache off (%s images): %s", described, plan.reason)
            return
        LOGGER.info("Feature cache: %s of %s images, %s, %s%s", "patch embeddings" if plan.content == "embeddings"
                    else "layer maps", described, self.cache_dtype, plan.reason,
                    " (the test images' layer maps, which --fuse_head reads)"
                    if self.fuse_head and plan.content == "embeddings" and cache_test else "")
        if plan.storage == "disk":
            self.cache_folder = common.make_cache_folder(self.results_path)
        try:
            for kind, loader in sets:
                content = "maps" if kind == "test" and self.fuse_head else plan.content  # what the fused head reads
                cache = common.FeatureCache(
                    counts[kind], content, plan.storage, self.cache_dtype, layer_shapes, embedding_shape,
                    folder=self.cache_folder, name=kind, source=loader,
                )
                if kind == "train":
                    self.train_cache = cache
                    self._fill_train_cache(cache, loader)
                else:
                    self.test_cache = cache
                    self._fill_test_cache(cache, loader)
        except BaseException:
            self.close_feature_caches()
            raise

    def _fill_train_cache(self, cache: common.FeatureCache, loader) -> None:
        """Features of the centre-pass batches, stored by index, the batches recorded for the centre."""
        self.embedder.eval()
        probe_done = False
        with torch.no_grad(), isolated_rng():
            for batch in tqdm.tqdm(utils.iter_loader(loader), desc="Caching training features", leave=False,
                                   unit="batch", disable=None):
                images = batch["image"].to(torch.float).to(self.device)
                indices = [int(i) for i in batch["index"]]
                features, grids, maps = self._embed_plain(images)
                cache.put(indices, maps, features)
                cache.batches.append(indices)
                cache.grids = grids
                if not probe_done and len(indices) > 1:
                    probe_done = True
                    self._probe_batch_invariance(images, features)

    def _probe_batch_invariance(self, images: torch.Tensor, features: torch.Tensor) -> None:
        """Log when this device's features of an image depend on its batch (cache on then differs in the last bits)."""
        swapped, _ = self._embed(images[[1, 0]])
        rows = len(features) // images.shape[0]
        expected = torch.cat([features[rows:2 * rows], features[:rows]])
        if not torch.equal(swapped, expected):
            LOGGER.info("Feature cache: on %s the backbone features of an image depend on its batch in the last bits "
                        "(max difference %.1e), so cached true features can differ that much from --cache off",
                        self.device.type, float((swapped - expected).abs().max()))

    def _fill_test_cache(self, cache: common.FeatureCache, loader) -> None:
        """Features of the test batches in the loader's order, with their labels and ground-truth masks."""
        self.embedder.eval()
        labels: List[int] = []
        masks: List[np.ndarray] = []
        order: List[int] = []
        with torch.no_grad(), isolated_rng():
            for batch in tqdm.tqdm(utils.iter_loader(loader), desc="Caching test features", leave=False, unit="batch",
                                   disable=None):
                images = batch["image"].to(torch.float).to(self.device)
                indices = [int(i) for i in batch["index"]] if "index" in batch else \
                    list(range(len(order), len(order) + images.shape[0]))
                maps = self._layer_features(images, evaluation=True)
                features, grids = self.embedder.embed_layer_features(maps)
                cache.put(indices, maps, features)
                cache.batches.append(indices)
                cache.grids = grids
                order.extend(indices)
                labels.extend(np.asarray(batch["is_anomaly"]).tolist())
                if batch.get("mask_gt", None) is not None:
                    masks.append(batch["mask_gt"].numpy())
        cache.extras.update(labels=labels, masks=masks, order=order)

    def close_feature_caches(self) -> None:
        """Free the feature caches and delete a disk cache's folder."""
        for name in ("train_cache", "test_cache"):
            cache = getattr(self, name, None)
            if cache is not None:
                cache.close()
            setattr(self, name, None)
        folder = getattr(self, "cache_folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
            self.cache_folder = None

    def _center_features(self, center_data) -> Iterator[Tuple[int, torch.Tensor]]:
        """(batch size, embeddings) of each centre-pass batch: from the training cache when it was built
        from ``center_data``, else through the backbone (lone images as pairs, see :meth:`_embed_plain`)."""
        cache = self.train_cache
        if cache is not None and cache.source is center_data:
            for indices in cache.batches:
                yield len(indices), cache.embeddings(indices, self._embed_plain_maps, self.device)
            return
        for batch in utils.iter_loader(center_data):
            images = batch["image"].to(torch.float).to(self.device)
            yield images.shape[0], self._embed_plain(images)[0]

    def _compute_center(self, training_data) -> None:
        """Centre c: per patch position, the mean projected feature over each batch, averaged over batches.

        ``training_data`` yields the centre-pass batches (the trainer passes :meth:`_center_loader`).
        """
        self.embedder.eval()
        total, count = None, 0
        with torch.no_grad(), isolated_rng():
            for batch_size, features in self._center_features(training_data):
                features = self._project(features)
                batch_mean = features.reshape(batch_size, -1, features.shape[-1]).mean(dim=0)
                total = batch_mean if total is None else total + batch_mean
                count += 1
        self.center = total / count

    def _true_features(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a training batch's un-augmented images: looked up in the training cache by the items'
        ``index`` when there is one (batches of two or more images), else through the backbone."""
        cache = self.train_cache
        if cache is not None and "index" in batch and images.shape[0] > 1:
            indices = [int(i) for i in batch["index"]]
            return cache.embeddings(indices, self._embed_maps, self.device)
        return self._embed(images)[0]

    def _train_discriminator(self, training_data, epoch: int, pbar, summary: str) -> str:
        """One epoch of discriminator (and projection) updates, stopping after more than ``limit`` samples."""
        self.embedder.eval()
        if self.pre_proj > 0:
            self.pre_projection.train()
        self.discriminator.train()

        history: Dict[str, List[float]] = {k: [] for k in ("loss", "p_true", "p_fake", "r_t", "r_g", "r_f")}
        sample_num = 0
        epoch_str = ""
        for step, batch in enumerate(utils.iter_loader(training_data)):
            _kill_hook(epoch, step)
            stats = self._train_step(batch)
            if step == 0:  # TensorBoard grid of the epoch's first LAS batch (utils.py, "Reports")
                utils.log_las_batch(self.tb_writer, epoch, self.meta_epochs, self.global_step, batch)
            for key, value in stats.items():
                self.tb_writer.add_scalar(key, value, self.global_step)
                history[key].append(value)
            self.global_step += 1
            sample_num += batch["image"].shape[0]

            means = {k: float(np.mean(v)) for k, v in history.items()}
            epoch_str = (
                f"epoch:{epoch} loss:{means['loss']:.2e} pt:{means['p_true'] * 100:.2f} pf:{means['p_fake'] * 100:.2f}"
                f" rt:{means['r_t']:.2f} rg:{means['r_g']:.2f} rf:{means['r_f']:.2f} svd:{self.hypersphere} sample:{sample_num}"
            )
            pbar.set_description_str(f"{epoch_str} {summary}".strip())  # redrawn at every step (a terminal only)
            if sample_num > self.sample_limit:
                break
        self.epoch_stats = {k: float(np.mean(v)) for k, v in history.items()}
        return epoch_str

    def _train_step(self, batch: dict) -> Dict[str, float]:
        """One optimisation step on a batch; returns the logged statistics."""
        self.dsc_opt.zero_grad()
        if self.pre_proj > 0:
            self.proj_opt.zero_grad()
        # With --train_backbone the backbone's gradients are never cleared, as in the reference: every step adds
        # to them and AdamW steps on their running sum (ckpt.pth keeps them for resuming).

        images = batch["image"].to(torch.float).to(self.device)
        if AUG_FEATURES in batch:  # embedded by the DataLoader workers (_synthesis_loader)
            embedded = batch[AUG_FEATURES].to(self.device)
        else:
            embedded = self._embed(batch["aug"].to(torch.float).to(self.device))[0]
        fake_feats = self._project(embedded)
        true_feats = self._project(self._true_features(batch, images))
        if self.pre_proj == 0 and not self.train_backbone:
            fake_feats.requires_grad_(True)
            true_feats.requires_grad_(True)

        mask_s_gt = batch["mask_s"].reshape(-1, 1).to(self.device)
        if mask_s_gt.shape[0] != true_feats.shape[0]:
            raise GlassError(
                f"the Perlin mask grid ({batch['mask_s'].shape[-2]}x{batch['mask_s'].shape[-1]}) does not match the "
                f"feature grid of layer {self.layers_to_extract_from[0]}: set --downsampling to the stride of that layer"
            )
        center = self.center.repeat(images.shape[0], 1, 1).reshape(-1, self.center.shape[-1])

        # r_t: the radius quantile of the distances of normal points (true + unmasked fake) to the centre.
        outside = mask_s_gt[:, 0] == 0
        true_points = torch.cat([fake_feats[outside], true_feats], dim=0)
        c_t_points = torch.cat([center[outside], center], dim=0)
        dist_t = torch.norm(true_points - c_t_points, dim=1)
        r_t = quantile_radius(dist_t, self.radius)

        ascent_gradient, final_scores = self._frozen_passes(true_feats)
        try:
            gas = global_anomaly_synthesis(
                self._discriminate, true_feats, center, r_t,
                noise_std=self.noise_std, steps=self.ascent_steps, hypersphere=self.hypersphere, mining=self.mining,
                radius=self.radius,
                ascent_gradient=ascent_gradient, final_scores=final_scores,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc} at step {self.global_step}") from None
        fake_feats, r_f = local_anomaly_synthesis(fake_feats, mask_s_gt, center, r_t, self.hypersphere, self.radius)

        fake_scores = self._discriminate(fake_feats)
        hard_scores, hard_labels = hard_sample_mining(fake_scores, mask_s_gt, self.mining_quantile)
        focal_loss = self.focal_loss(torch.cat([1 - hard_scores, hard_scores], dim=1), hard_labels)

        loss = gas.bce_loss + focal_loss
        if not torch.isfinite(loss):  # checked before the update, so the weights stay finite
            raise NonFiniteLossError(f"the training loss became {loss.item()} at step {self.global_step}")
        loss.backward()
        if self.pre_proj > 0:
            self.proj_opt.step()
        if self.train_backbone:
            self.backbone_opt.step()
        self.dsc_opt.step()

        # Share of scores on the right side of the margin (masked fake scores count as anomalous).
        fake_scores = fake_scores.detach()
        pix_true = torch.cat([fake_scores * (1 - mask_s_gt), gas.true_scores.detach()])
        pix_fake = torch.cat([fake_scores * mask_s_gt, gas.gaus_scores.detach()])
        p_true = ((pix_true < self.dsc_margin).sum() - (pix_true == 0).sum()) / ((mask_s_gt == 0).sum() + len(gas.true_scores))
        p_fake = (pix_fake >= self.dsc_margin).sum() / ((mask_s_gt == 1).sum() + len(gas.gaus_scores))
        return {
            "loss": loss.item(),
            "p_true": p_true.item(),
            "p_fake": p_fake.item(),
            "r_t": r_t.item(),
            "r_g": gas.r_g.item(),
            "r_f": r_f.item(),
        }

    # ----------------------------------------------------------------------------------------------
    # Testing and inference

    def tester(self, test_data: DataLoader, name: str) -> Tuple[float, float, float, float, float, int]:
        """Evaluate the best checkpoint on ``test_data``: ``(i_auroc, i_ap, p_auroc, p_ap, p_pro, epoch)``."""
        path = self.best_checkpoint()
        if path is None:
            raise MissingCheckpointError(
                f"{name}: no ckpt_best_*.pth in {self.ckpt_dir}: train first (--test ckpt) or point --results_path at "
                "the run that trained it"
            )
        self.load_checkpoint(path)
        if self.train_backbone and not self.backbone_trained_here:
            LOGGER.warning(BACKBONE_NOT_SAVED, f"{name}: testing {os.path.basename(path)}")
        images, scores, segmentations, labels_gt, masks_gt = self.predict(test_data)
        result = self._evaluate(scores, segmentations, labels_gt, masks_gt, path="eval")
        largest = float(np.nanmax(masks_gt, initial=0.0)) if not np.isfinite(result[2]) and len(masks_gt) else 0.0
        if largest > 0:  # masks, but none with a pixel that counts as defective
            LOGGER.warning("%s: no pixel of the resized masks is fully defective (largest value %.3g, below 1: defects thinner "
                           "than a pixel at this --resize/--imagesize), so there are no pixel metrics (n/a)", name,
                           largest)
        self._write_heatmaps(images, segmentations, masks_gt, utils.class_output_name(self.ckpt_dir), "eval")
        epoch = checkpoint_epoch(path)
        utils.write_class_report(self.results_path, self.ckpt_dir, name, os.path.basename(path), epoch, scores,
                                 segmentations, labels_gt, masks_gt, result)
        return (*result, epoch)

    def predict(self, dataloader: DataLoader, keep_images: bool = True
                ) -> Tuple[Sequence[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scores and maps for a whole loader: (images, scores, segmentations, labels_gt, masks_gt) as arrays.

        The features come from the test cache when it was built from ``dataloader`` (same batches, same
        values). With ``keep_images=False`` the full-resolution images are not collected: ``images`` is a
        :class:`LazyImages` that loads an image from the loader's dataset when indexed (for heatmaps).
        Runs with the random generators isolated (:func:`isolated_rng`).
        """
        with isolated_rng():
            cache = self.test_cache
            if cache is not None and cache.source is dataloader:
                return self._predict_cached(cache, dataloader, keep_images)
            images, scores, segmentations, labels_gt, masks_gt, order = [], [], [], [], [], []
            lazy = not keep_images and LazyImages.supports(dataloader)
            for batch in tqdm.tqdm(utils.iter_loader(dataloader), desc="Inferring...", leave=False, unit="batch",
                                   disable=None):
                labels_gt.extend(np.asarray(batch["is_anomaly"]).tolist())
                if batch.get("mask_gt", None) is not None:
                    masks_gt.append(batch["mask_gt"].numpy())
                if lazy and "index" in batch:
                    order.extend(int(i) for i in batch["index"])
                else:
                    lazy = False
                    images.append(batch["image"].numpy())
                batch_scores, batch_maps = self._predict(batch["image"])
                scores.extend(batch_scores)
                segmentations.extend(batch_maps)
        masks = np.concatenate(masks_gt) if masks_gt else np.zeros((0,))
        images = LazyImages(dataloader.dataset, order) if lazy else np.concatenate(images)
        return images, np.asarray(scores), np.stack(segmentations), np.asarray(labels_gt), masks

    def _predict_cached(self, cache: common.FeatureCache, dataloader, keep_images: bool):
        """:meth:`predict` from the test cache's features, labels and masks."""
        scores, segmentations = [], []
        fused = self.fuse_head and cache.content == "maps"
        for indices in tqdm.tqdm(cache.batches, desc="Inferring (cached)...", leave=False, unit="batch",
                                 disable=None):
            if fused:
                maps = [m.to(self.device) for m in cache.maps(indices)]
                batch_scores, batch_maps = self._score_patches(self._fused_scores(maps), cache.grids, len(indices))
            else:
                features = cache.embeddings(indices, self._embed_maps, self.device)
                batch_scores, batch_maps = self._score_features(features, cache.grids, len(indices))
            scores.extend(batch_scores)
            segmentations.extend(batch_maps)
        order = cache.extras["order"]
        images = LazyImages(dataloader.dataset, order)
        if keep_images:
            images = np.stack([images[i] for i in range(len(images))])
        masks = np.concatenate(cache.extras["masks"]) if cache.extras["masks"] else np.zeros((0,))
        return images, np.asarray(scores), np.stack(segmentations), np.asarray(cache.extras["labels"]), masks

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> Tuple[List[float], List[np.ndarray]]:
        """Image scores (max patch score) and smoothed anomaly maps for one batch."""
        images = images.to(torch.float).to(self.device)
        # The backbone's and the heads' evaluation modes are set where they run (layer_features, _fused_scores,
        # _score_features).
        if self.fuse_head:
            maps = self._layer_features(images, evaluation=True)
            grids = [self.patch_maker.grid(m.shape[-2:]) for m in maps]
            return self._score_patches(self._fused_scores(maps), grids, images.shape[0])
        features, grids = self._embed(images, evaluation=True)
        return self._score_features(features, grids, images.shape[0])

    @torch.no_grad()
    def _fused_scores(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """Patch scores (B * h * w, 1) of a batch's layer maps through the fused head (``--fuse_head``), in float32."""
        self._heads_eval_mode()  # BatchNorm with its running averages, as the fused weights assume
        return self._fused_head()([m.float() for m in maps]).float()

    def _fused_head(self) -> FusedHead:
        """The :class:`model.FusedHead` of the current weights, rebuilt when a weight or running average changed
        (training steps and checkpoint loads change them in place, which bumps their versions)."""
        parts = [self.discriminator] + ([self.pre_projection] if self.pre_proj > 0 else [])
        tensors = [t for part in parts for t in (*part.parameters(), *part.buffers())]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._fused is None or self._fused[0] != key:
            projection = self.pre_projection if self.pre_proj > 0 else None
            head = fuse_head(self._fused_poolings(), self.embedder.patch_maker.patchsize, projection,
                             self.discriminator, onednn=onednn_linear_available())
            self._fused = (key, head)
        return self._fused[1]

    def _fused_poolings(self) -> List[LayerPooling]:
        """The layers' poolings of the fused head (``model.layer_poolings``), computed once: they follow from the
        embedding's sizes, not from the weights (seconds at the paper's profile, at every rebuild otherwise)."""
        if self._poolings is None:
            width = self.discriminator.first_linear().out_features
            self._poolings = layer_poolings(self.embedder.embedding_matrices(), self.embedder.patch_maker.patchsize,
                                            width)
        return self._poolings

    def _eval_mode(self) -> None:
        common.ensure_eval(self.embedder)
        self._heads_eval_mode()

    def _heads_eval_mode(self) -> None:
        if self.pre_proj > 0:
            common.ensure_eval(self.pre_projection)
        common.ensure_eval(self.discriminator)

    @torch.no_grad()
    def _score_features(self, features: torch.Tensor, grids: List[List[int]], batchsize: int
                        ) -> Tuple[List[float], List[np.ndarray]]:
        """Image scores and smoothed anomaly maps of a batch from its patch embeddings (B * h * w, dim)."""
        self._heads_eval_mode()  # BatchNorm with its running averages
        return self._score_patches(self._discriminate(self._project(features)), grids, batchsize)

    def _score_patches(self, patch_scores: torch.Tensor, grids: List[List[int]], batchsize: int
                       ) -> Tuple[List[float], List[np.ndarray]]:
        """Image scores and smoothed anomaly maps of a batch from its patch scores (B * h * w, 1)."""
        patch_scores = self.patch_maker.unpatch_scores(patch_scores, batchsize=batchsize)
        grid_scores = patch_scores.reshape(batchsize, *grids[0])
        if self.fuse_head:
            maps = self.anomaly_segmentor.convert_by_products(grid_scores)
        else:
            maps = self.anomaly_segmentor.convert_to_segmentation(grid_scores)
        image_scores = self.patch_maker.score(patch_scores).cpu().numpy()
        return list(image_scores), maps

    def _evaluate(self, scores, segmentations, labels_gt, masks_gt, path: str = "training") -> List[float]:
        """[i_auroc, i_ap, p_auroc, p_ap, p_pro]; AP and PRO only when ``path == "eval"`` (reference).

        On the scores and maps as they are: the reference's current version dropped its earlier min-max
        normalisation over the test set (which changed no metric beyond rounding)."""
        scores = np.squeeze(np.asarray(scores))
        image_metrics = metrics.compute_imagewise_retrieval_metrics(scores, labels_gt, path)

        masks = np.asarray(masks_gt)
        segmentations = np.asarray(segmentations)
        if masks.size:  # pixel metrics leave out the images whose ground truth is unknown (NaN masks)
            known = ~np.isnan(masks.reshape(len(masks), -1)).any(axis=1)
            masks, segmentations = masks[known], segmentations[known]
        if masks.size == 0 or not np.any(masks >= 1):  # no pixel counts as defective: not available
            nan = float("nan")
            return [image_metrics["auroc"], image_metrics["ap"], nan, nan, nan]
        pixel_metrics = metrics.compute_pixelwise_retrieval_metrics(segmentations, masks, path)
        pixel_pro = metrics.compute_pro(np.squeeze(masks, axis=1) if masks.ndim == 4 else masks, segmentations) if path == "eval" else 0.0
        return [image_metrics["auroc"], image_metrics["ap"], pixel_metrics["auroc"], pixel_metrics["ap"], pixel_pro]

    def _write_heatmaps(self, images, segmentations, masks_gt, name: str, folder: str) -> None:
        """``<results>/<folder>/<name>/NNN.png``: image | ground truth | anomaly map, jet-coloured on the fixed 0..1
        scale of the scores (as the reference's current version; an earlier one stretched the test set's range)."""
        maps = np.asarray(segmentations)
        out_dir = os.path.join(self.results_path, folder, name)
        os.makedirs(out_dir, exist_ok=True)
        masks = np.asarray(masks_gt)
        for i in range(len(images)):
            image = utils.torch_format_2_numpy_img(images[i])
            # An unknown ground truth (NaN mask) is drawn grey.
            target = utils.torch_format_2_numpy_img(np.nan_to_num(masks[i], nan=0.5)) if masks.ndim == 4 else np.zeros_like(image)
            heat = cv2.resize(maps[i], (image.shape[1], image.shape[0]))
            heat = cv2.applyColorMap((heat * 255).astype("uint8"), cv2.COLORMAP_JET)
            panel = cv2.resize(np.hstack([image, target, heat]), (256 * 3, 256))
            utils.write_png(os.path.join(out_dir, f"{i + 1:03d}.png"), panel)


class LazyImages(collections.abc.Sequence):
    """The images of a dataset in a given order, loaded when indexed (as CHW float arrays, like ``predict``'s).

    ``predict`` returns one instead of collecting every full-resolution image when they may not be needed.
    """

    def __init__(self, dataset, order: Sequence[int]):
        self.dataset = dataset
        self.order = list(order)

    @staticmethod
    def supports(dataloader: DataLoader) -> bool:
        """Whether ``dataloader``'s dataset can give back its images by index."""
        dataset = getattr(dataloader, "dataset", None)
        return dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index = self.order[i]
        with isolated_rng():  # the image transform draws from torch's generator
            if hasattr(self.dataset, "plain_image"):
                return self.dataset.plain_image(index).numpy()
            return np.asarray(self.dataset[index]["image"])


CONFIG_FIX = "restore it, or delete it: a run with the options the class was trained with records it anew"


def config_problem(config: dict) -> Optional[str]:
    """What makes a config.json unusable for rebuilding its model (a hand edit, say); None when it is usable."""
    def whole(value, low: int) -> bool:
        return type(value) is int and value >= low

    if not isinstance(config.get("backbone"), str):
        return "no backbone name"
    layers = config.get("layers_to_extract_from")
    if not (isinstance(layers, list) and layers and all(isinstance(layer, str) for layer in layers)):
        return "no list of layer names"
    shape = config.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(whole(v, 1) for v in shape)):
        return "input_shape is not three positive whole numbers"
    if shape[0] != 3 or shape[1] != shape[2]:
        return f"input_shape {shape} is not [3, imagesize, imagesize]"
    net = config.get("net")
    if not isinstance(net, dict):
        return "no net options"
    bad = [key for key in MODEL_OPTIONS if not whole(net.get(key), 0 if key == "pre_proj" else 1)]
    if bad:
        return f"net option(s) {', '.join(bad)} missing or not positive whole numbers"
    dataset = config.get("dataset", {})
    if not isinstance(dataset, dict):
        return "dataset is not an object"
    for key in ("resize", "imagesize", "resize_used", "imagesize_used"):
        value = dataset.get(key, 1)
        if not (whole(value, 1) or (isinstance(value, list) and 1 <= len(value) <= 2 and all(whole(v, 1) for v in value))):
            return f"dataset.{key} is not a positive whole number"
    for key in ("imagesize", "imagesize_used"):  # the crop is the model's input
        value = dataset.get(key, shape[-1])
        if (value if isinstance(value, list) else [value]) not in ([shape[-1]], shape[-2:]):
            return f"dataset.{key} {value} is not the side of input_shape {shape}"
    for key in ("name", "classname", "data_path", "aug_path"):
        if not isinstance(dataset.get(key, ""), str):
            return f"dataset.{key} is not a text"
    if dataset.get("name") and dataset["name"] not in LOADERS:
        return f"dataset.name {dataset['name']!r} is not one of {', '.join(sorted(LOADERS))}"
    return None


def read_config_file(path: str) -> dict:
    """A class folder's config.json, checked; a damaged one is a GlassError saying how to recover."""
    config = utils.read_json(path, fix=CONFIG_FIX)
    problem = config_problem(config)
    if problem is not None:
        raise GlassError(f"{path} is damaged ({problem}): {CONFIG_FIX}")
    return config


def build_model(config: dict, device: torch.device | str = "cpu") -> GLASS:
    """An untrained GLASS as ``config`` (the layout of config.json) describes it: backbone, layers, sizes."""
    device = torch.device(device)
    backbone = backbones.load(config["backbone"])
    backbone.name, backbone.seed = config["backbone"], None
    model = GLASS(device)
    model.load(
        backbone=backbone,
        layers_to_extract_from=config["layers_to_extract_from"],
        device=device,
        input_shape=config["input_shape"],
        **{key: config["net"][key] for key in MODEL_OPTIONS},
    )
    return model


def best_checkpoints_in(class_dir: str) -> List[str]:
    """Paths of every ``ckpt_best_<epoch>.pth`` in ``class_dir`` (its path may hold glob characters)."""
    return [p for p in glob.glob(os.path.join(glob.escape(class_dir), "ckpt_best_*.pth"))
            if BEST_CHECKPOINT_PATTERN.search(p) and os.path.isfile(p)]


def checkpoint_epoch(path: str) -> int:
    """The epoch in a ``ckpt_best_<epoch>.pth`` name."""
    return int(BEST_CHECKPOINT_PATTERN.search(path).group(1))


def best_checkpoint_in(class_dir: str) -> Optional[str]:
    """Path of ``ckpt_best_<epoch>.pth`` in ``class_dir``, if any (the highest epoch if several)."""
    found = best_checkpoints_in(class_dir)
    if not found:
        return None
    return max(found, key=checkpoint_epoch)


def trained_there(class_dir: str) -> str:
    """`` (trained there: mvtec_tire, ..., as <dataset>_<class>)``: the trained class folders beside ``class_dir`` (those
    with a best checkpoint), for the error about a class folder that does not exist; "" when there are none."""
    models = os.path.dirname(os.path.normpath(class_dir))
    trained = sorted(entry for entry in os.listdir(models)
                     if best_checkpoint_in(os.path.join(models, entry))) if os.path.isdir(models) else []
    return f" (trained there: {', '.join(trained)}, as <dataset>_<class>)" if trained else ""


def load_trained(class_dir: str, device: torch.device | str = "cpu", checkpoint: str | None = None) -> Tuple[GLASS, dict]:
    """Rebuild a trained model from its class folder (``<results>/models/backbone_<i>/<name>/``).

    Reads ``config.json`` written at training time, builds the backbone and GLASS, and loads
    ``checkpoint`` (default: the folder's ``ckpt_best_<epoch>.pth``). Returns the model and the config.
    """
    config_path = os.path.join(class_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        has_best = best_checkpoint_in(class_dir) is not None
        if not has_best and checkpoint is None:  # a run that stopped before its first evaluation, say
            raise GlassError(f"no ckpt_best_*.pth in {class_dir}: train this class first")
        best = "a best checkpoint but " if has_best else ""
        raise GlassError(f"{class_dir} has {best}no {CONFIG_NAME}: point at a class folder written by main.py "
                         "(results/models/backbone_0/<dataset>_<class>), or record one for a folder the reference "
                         "wrote by testing it once (main.py --test test with the net and dataset options it was "
                         "trained with)")
    config = read_config_file(config_path)
    recorded = config.get("dataset") or {}
    trained_as = f"{recorded.get('name')}_{recorded.get('classname')}"
    if "classname" in recorded and trained_as != os.path.basename(class_dir.rstrip(os.sep)):
        LOGGER.warning("%s holds a model trained as %s (its %s): a copied or renamed folder? Its scores are then not "
                       "this class's", class_dir, trained_as, CONFIG_NAME)
    model = build_model(config, device)
    model.ckpt_dir = class_dir
    path = checkpoint or model.best_checkpoint()
    if path is None:
        raise GlassError(f"no ckpt_best_*.pth in {class_dir}: train this class first")
    model.load_checkpoint(path)
    model.checkpoint_path = path
    if config.get("net", {}).get("train_backbone"):
        LOGGER.warning(BACKBONE_NOT_SAVED, f"{os.path.basename(path)} of {class_dir}")
    return model, config


# --------------------------------------------------------------------------------------------------
# Prediction on new images (``python main.py predict``)

PREDICTION_COLUMNS = ["image", "score", "threshold", "anomalous", "heatmap", "overlay"]


def calibrate_threshold(model: GLASS, test_loader: DataLoader) -> Dict[str, Any]:
    """The F1-best image-score threshold on a labelled test set, with how it was chosen and how it does there."""
    _, scores, _, labels, _ = model.predict(test_loader)
    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        raise GlassError("the test set needs both good and defective images to choose a threshold: pass --threshold instead")
    threshold, precision, recall = metrics.compute_best_pr_re(labels, scores)
    return {
        "threshold": float(threshold),
        "method": "F1-best image-score threshold on the test set (metrics.compute_best_threshold); anomalous when score >= threshold",
        "checkpoint": os.path.basename(getattr(model, "checkpoint_path", "")),
        "test_set": getattr(test_loader, "name", ""),
        "test_images": int(labels.size),
        "test_anomalous": int(labels.sum()),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
    }


def choose_threshold(model: GLASS, class_dir: str, make_test_loader: Callable[[], DataLoader],
                     threshold: Optional[float] = None, calibrate: bool = False) -> Dict[str, Any]:
    """The decision threshold and how it was chosen: ``--threshold``, ``threshold.json``, or calibrated now.

    Calibration (``threshold.json`` missing, made for another checkpoint, or ``calibrate``) runs
    ``calibrate_threshold`` on ``make_test_loader()`` and stores the record in ``<class_dir>/threshold.json``.
    """
    if threshold is not None:
        if calibrate:
            raise GlassError("give either --threshold or --calibrate, not both")
        return {"threshold": float(threshold), "method": "given with --threshold"}
    path = os.path.join(class_dir, utils.THRESHOLD_NAME)
    checkpoint = os.path.basename(getattr(model, "checkpoint_path", ""))
    if not calibrate:
        record = utils.stored_threshold(class_dir, checkpoint)
        if record is not None:
            return record
        if os.path.isfile(path):
            LOGGER.info("%s was not chosen for %s: choosing the threshold again", path, checkpoint)
    record = calibrate_threshold(model, make_test_loader())
    try:
        utils.atomic_write(path, lambda tmp: utils.write_json(tmp, record))
    except GlassError as exc:  # the threshold is chosen all the same: predict goes on with it
        LOGGER.warning("%s; so the threshold %.6f chosen now is not kept (the next predict chooses it again, or give "
                       "--threshold %.6f)", exc, record["threshold"], record["threshold"])
        return record
    LOGGER.info("Threshold %.6f written to %s", record["threshold"], path)
    return record


def predict_images(model: GLASS, config: dict, paths: Sequence[str], output_dir: str, threshold: float,
                   batch_size: int = 8) -> List[Dict[str, str]]:
    """Score images with the test transform of training; write heatmap/overlay PNGs and ``predictions.csv``.

    The heatmap colours the anomaly map on a fixed 0..1 jet scale (not rescaled per image); the overlay
    blends it with the resized, cropped input. Returns the CSV rows.
    """
    from torchvision import transforms

    dataset = config.get("dataset", {})
    resize = dataset.get("resize_used", config["input_shape"][-1])
    imagesize = dataset.get("imagesize_used", config["input_shape"][-1])
    geometry = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(imagesize)])
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise GlassError(f"cannot create the output folder {output_dir} ({exc.strerror}): choose another --output") from None
    wide: List[str] = []
    unreadable: List[str] = []
    for path in paths:  # header reads, before any output
        header = image_header(path)
        if header is None:
            unreadable.append(path)
            continue
        problem = elongation_problem(path, header[0], resize)
        if problem:
            raise GlassError(problem)
        if header[1] in WIDE_MODES:
            wide.append(path)
    if len(unreadable) > 1:  # all of them at once (load_image says why for one)
        shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        raise GlassError(f"{len(unreadable)} images cannot be read ({shown}): replace them, or leave them out of the inputs")
    stems = image_inputs.output_stems(paths)
    rows: List[Dict[str, str]] = []
    LOGGER.info("Scoring %d image(s) into %s", len(paths), output_dir)
    progress = tqdm.tqdm(total=len(paths), desc="Predicting", unit="image", leave=False, dynamic_ncols=True,
                         disable=not utils.live_terminal())
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        crops = [geometry(load_image(path)) for path in chunk]
        scores, maps = model._predict(torch.stack([to_input(crop) for crop in crops]))
        for path, stem, crop, score, anomaly_map in zip(chunk, stems[start:], crops, scores, maps):
            heat = cv2.applyColorMap(np.round(np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
            image = cv2.cvtColor(np.asarray(crop, dtype=np.uint8), cv2.COLOR_RGB2BGR)
            row = {
                "image": path, "score": repr(float(score)), "threshold": repr(float(threshold)),
                "anomalous": str(int(float(score) >= threshold)),
                "heatmap": os.path.join(output_dir, stem + image_inputs.HEATMAP_SUFFIX),
                "overlay": os.path.join(output_dir, stem + image_inputs.OVERLAY_SUFFIX),
            }
            utils.write_png(row["heatmap"], heat, option="--output")
            utils.write_png(row["overlay"], cv2.addWeighted(image, 0.5, heat, 0.5, 0), option="--output")
            rows.append(row)
        progress.update(len(chunk))
    progress.close()

    def write(tmp: str) -> None:
        import csv

        with open(tmp, "w", newline="", errors="surrogateescape") as handle:  # file names as they are on disk
            writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    utils.atomic_write(os.path.join(output_dir, utils.PREDICTIONS_CSV), write, option="--output")
    warn_wide_images(wide)
    return rows
