"""Reusable feature pieces: layer hooks, patch embedding and the segmentor.

The data flow (spec, "Features"): backbone -> chosen layer maps -> 3x3 neighbourhoods of every
location -> deeper layers aligned to the first layer's grid -> each layer pooled to
``pretrain_embed_dimension`` -> all layers pooled to ``target_embed_dimension``.
The result is one row per patch position: ``(B * H1 * W1, target_dim)``.

The last section is the frozen-backbone feature cache (``--cache``), described there.
"""
from __future__ import annotations

import functools
import glob
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

import utils
from model import PatchMaker
from utils import GlassError

LOGGER = logging.getLogger(__name__)


class LastLayerToExtractReachedException(Exception):
    """Raised by the hook of the deepest wanted layer to stop the backbone's forward early."""


class ForwardHook:
    """Stores a layer's output under its name; once every wanted layer is stored, aborts the forward."""

    def __init__(self, outputs: Dict[str, torch.Tensor], layer_name: str, n_wanted: int):
        self.outputs = outputs
        self.layer_name = layer_name
        self.n_wanted = n_wanted
        self.stop = True  # False: let the forward run through the whole backbone

    def __call__(self, module, inputs, output):
        self.outputs[self.layer_name] = output
        if self.stop and len(self.outputs) == self.n_wanted:
            raise LastLayerToExtractReachedException()


def _find_layer(backbone: torch.nn.Module, layer_name: str) -> Optional[torch.nn.Module]:
    """The module at a dotted path (``blocks.2``), or at the reference's ``<index>.<block>`` (``2.blocks``)."""
    try:
        return backbone.get_submodule(layer_name)
    except AttributeError:
        pass
    parts = layer_name.split(".")
    if len(parts) == 2 and parts[0].isdigit():  # the reference splits "2.blocks" into index 2 of "blocks"
        try:
            return backbone.get_submodule(f"{parts[1]}.{parts[0]}")
        except AttributeError:
            pass
    return None


def resolve_layer(backbone: torch.nn.Module, layer_name: str) -> torch.nn.Module:
    """Find a (dotted) layer name in the backbone; on a Sequential the hook goes on its last child.

    ``blocks.2`` is the module path; the reference's own order ``2.blocks`` (index, then block) names the same
    layer, so that its command lines work.
    """
    module = _find_layer(backbone, layer_name)
    if module is None:
        children = ", ".join(name for name, _ in backbone.named_children())
        raise GlassError(
            f"layer '{layer_name}' not found in backbone {getattr(backbone, 'name', type(backbone).__name__)}; "
            f"its top-level layers are: {children} (use dotted names such as blocks.2 for nested ones)"
        )
    if isinstance(module, torch.nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


def ensure_eval(module: torch.nn.Module) -> None:
    """``module.eval()``, skipped when every submodule already is in evaluation mode: the check costs about a
    third of the call, which recurses through every submodule (0.45 ms for EfficientNet-Lite0, per batch)."""
    if any(sub.training for sub in module.modules()):
        module.eval()


class NetworkFeatureAggregator(torch.nn.Module):
    """Runs a backbone only as far as the deepest wanted layer and returns the wanted layer outputs."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        layers_to_extract_from: Sequence[str],
        device: torch.device,
        train_backbone: bool = False,
    ):
        super().__init__()
        if not layers_to_extract_from:
            raise GlassError("no layers given: pass at least one with -le/--layers_to_extract_from (e.g. -le layer2 -le layer3)")
        self.layers_to_extract_from = list(layers_to_extract_from)
        self.backbone = backbone
        self.device = device
        self.train_backbone = train_backbone
        self.prefix_tokens, self.channels_last_maps = map_layout(backbone)
        self.outputs: Dict[str, torch.Tensor] = {}
        for handle in getattr(backbone, "hook_handles", []):
            handle.remove()
        backbone.hook_handles = []
        n_wanted = len(set(self.layers_to_extract_from))
        self.hooks: List[ForwardHook] = []
        for name in dict.fromkeys(self.layers_to_extract_from):
            hook = ForwardHook(self.outputs, name, n_wanted)
            self.hooks.append(hook)
            backbone.hook_handles.append(resolve_layer(backbone, name).register_forward_hook(hook))
        self.to(device)

    def forward(self, images: torch.Tensor, evaluation: bool = True) -> Dict[str, torch.Tensor]:
        self.outputs.clear()
        with torch.set_grad_enabled(self.train_backbone and not evaluation and torch.is_grad_enabled()):
            try:
                self.backbone(images)
            except LastLayerToExtractReachedException:
                pass
        return dict(self.outputs)

    def feature_dimensions(self, input_shape: Sequence[int]) -> List[int]:
        """Channel count of every wanted layer for an input of shape (C, H, W).

        As in the reference, the probe is one forward of an image of ones through the whole backbone in
        training mode, without gradients (the reference's backbones come in training mode, and its hooks never
        stop the forward): every BatchNorm layer folds that image's statistics into its running averages once
        (with its momentum), and Dropout layers draw from torch's generator. Every feature, in training and
        testing, is computed with those running averages, as the reference's are. The backbone is left in the
        mode it had.
        """
        dummy = torch.ones([1, *input_shape], device=self.device)
        training = self.backbone.training
        self.backbone.train()
        for hook in self.hooks:
            hook.stop = False
        try:
            self.outputs.clear()
            with torch.no_grad():
                self.backbone(dummy)
            outputs = dict(self.outputs)
        except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. a ViT built for another image size
            raise GlassError(f"the backbone cannot take {input_shape[-2]}x{input_shape[-1]} images "
                             f"({utils.exception_summary(exc)}): choose "
                             "another --imagesize (ViT, DeiT and Swin take 224)") from None
        finally:
            for hook in self.hooks:
                hook.stop = True
            self.backbone.train(training)
        for name in self.layers_to_extract_from:  # checked once here: a layer's kind of output does not change
            output = outputs[name]
            if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise GlassError(f"layer '{name}' gives {shape}, not a feature map: choose a convolutional stage or "
                                 "transformer block (e.g. -le layer2 -le layer3, -le blocks.2 -le blocks.4)")
        return [map_.shape[1] for map_ in self.feature_maps(outputs)]

    def feature_maps(self, outputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The wanted layer outputs as (B, C, H, W) maps, in the order of ``layers_to_extract_from``."""
        return [to_feature_map(outputs[name], self.prefix_tokens, self.channels_last_maps)
                for name in self.layers_to_extract_from]


def map_layout(backbone: torch.nn.Module) -> Tuple[int, bool]:
    """How the backbone's layer outputs become maps: the number of class/distillation tokens before the patch
    tokens (timm's ViT and DeiT), and whether its maps are (B, H, W, C) (timm's Swin)."""
    return int(getattr(backbone, "num_prefix_tokens", 0) or 0), getattr(backbone, "output_fmt", None) == "NHWC"


def _is_square(number: int) -> bool:
    return number > 0 and math.isqrt(number) ** 2 == number


def to_feature_map(feature: torch.Tensor, prefix_tokens: int = 0, channels_last: bool = False) -> torch.Tensor:
    """A layer output as a (B, C, H, W) map.

    A token sequence (B, L, C) of a ViT-like layer loses its ``prefix_tokens`` (class, distillation) and
    the rest is folded row by row into a square grid; ``channels_last`` maps (B, H, W, C) are permuted.
    """
    if feature.dim() == 3:
        batch, length, channels = feature.shape
        if not _is_square(length - prefix_tokens) and _is_square(length):
            prefix_tokens = 0  # a layer before the class token is prepended (ViT's patch_embed)
        tokens = length - prefix_tokens
        side = math.isqrt(max(tokens, 0))
        if side * side != tokens or side == 0:
            raise GlassError(f"a backbone layer gives {length} tokens ({prefix_tokens} class/distillation tokens "
                             f"first), which do not form a square grid: pick another layer or image size")
        return feature[:, prefix_tokens:].reshape(batch, side, side, channels).permute(0, 3, 1, 2)
    if channels_last and feature.dim() == 4:
        return feature.permute(0, 3, 1, 2)
    return feature


def align_patches(patches: torch.Tensor, grid: Sequence[int], ref_grid: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize every patch component of a deeper layer from ``grid`` to ``ref_grid``.

    Args:
        patches: (B, grid_h * grid_w, C, p, p).
    Returns:
        (B, ref_h * ref_w, C, p, p).
    """
    batch = patches.shape[0]
    patches = patches.reshape(batch, grid[0], grid[1], *patches.shape[2:])
    patches = patches.permute(0, 3, 4, 5, 1, 2)  # B, C, p, p, h, w
    base_shape = patches.shape
    patches = patches.reshape(-1, 1, grid[0], grid[1])
    patches = F.interpolate(patches, size=(ref_grid[0], ref_grid[1]), mode="bilinear", align_corners=False)
    patches = patches.reshape(*base_shape[:-2], ref_grid[0], ref_grid[1])
    patches = patches.permute(0, 4, 5, 1, 2, 3)  # B, h, w, C, p, p
    return patches.reshape(batch, -1, *patches.shape[-3:])


class MeanMapper(torch.nn.Module):
    """Flattens each patch and reduces it to ``preprocessing_dim`` values by adaptive average pooling."""

    def __init__(self, preprocessing_dim: int):
        super().__init__()
        self.preprocessing_dim = preprocessing_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.reshape(len(features), 1, -1)
        return F.adaptive_avg_pool1d(features, self.preprocessing_dim).squeeze(1)


class Preprocessing(torch.nn.Module):
    """One MeanMapper per layer; output (N, n_layers, pretrain_embed_dimension)."""

    def __init__(self, input_dims: Sequence[int], output_dim: int):
        super().__init__()
        self.input_dims = list(input_dims)
        self.output_dim = output_dim
        self.preprocessing_modules = torch.nn.ModuleList(MeanMapper(output_dim) for _ in input_dims)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [module(feature) for module, feature in zip(self.preprocessing_modules, features)]
        return torch.stack(pooled, dim=1)


class Aggregator(torch.nn.Module):
    """Pools the stacked layer embeddings of each patch to ``target_dim`` values."""

    def __init__(self, target_dim: int):
        super().__init__()
        self.target_dim = target_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.reshape(len(features), 1, -1)
        features = F.adaptive_avg_pool1d(features, self.target_dim)
        return features.reshape(len(features), -1)


def pooling_window_bounds(length: int, output_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start and size of each window of ``F.adaptive_avg_pool1d(x, output_size)`` over ``length`` values: window
    ``j`` is ``[floor(j * length / output_size), ceil((j + 1) * length / output_size))``, as in PyTorch's kernel."""
    j = torch.arange(output_size)
    start = (j * length) // output_size
    return start, ((j + 1) * length + output_size - 1) // output_size - start


def pooling_matrix(length: int, output_size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` from ``length`` to ``output_size`` values as a float64 matrix (output_size, length):
    ``1 / size`` over each window (the values :func:`pool_rows` gives for an identity matrix, without building one)."""
    start, size = pooling_window_bounds(length, output_size)
    columns = torch.arange(length)
    inside = (columns >= start[:, None]) & (columns < (start + size)[:, None])
    return inside.to(torch.float64) / size.to(torch.float64)[:, None]


@functools.lru_cache(maxsize=64)
def _pooling_windows(length: int, output_size: int) -> Tuple[list, Optional[torch.Tensor]]:
    """The windows of ``F.adaptive_avg_pool1d(x, output_size)`` over ``length`` values, grouped by size.

    The windows are :func:`pooling_window_bounds`. Returns ``[(size, outputs, [where the first values are, the
    second, ...]), ...]`` (a slice when the group's windows start at evenly spaced places, else an index tensor)
    and the permutation that puts the groups' outputs back in order (None when they already are).
    """
    start, size = pooling_window_bounds(length, output_size)
    j = torch.arange(output_size)
    groups = []
    for k in sorted(set(size.tolist())):
        outputs = (size == k).nonzero().squeeze(1)
        starts = start[outputs]
        steps = starts.diff()
        if len(starts) == 1 or bool((steps == steps[0]).all()):
            first, step = int(starts[0]), int(steps[0]) if len(starts) > 1 else 1
            places = [slice(first + t, first + t + step * (len(starts) - 1) + 1, step) for t in range(k)]
        else:
            places = [starts + t for t in range(k)]
        groups.append((k, outputs, places))
    order = torch.cat([outputs for _, outputs, _ in groups])
    if torch.equal(order, j):
        return groups, None
    inverse = torch.empty_like(order)
    inverse[order] = j
    return groups, inverse


def pool_rows(values: torch.Tensor, output_size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` along dim -2 of ``values`` (..., L, N), bit for bit (float32/float64, CPU).

    Every column is one pooled vector. PyTorch's CPU kernel computes each output as
    ``(0 + x[s] + x[s + 1] + ... + x[e - 1]) / (e - s)`` in the input's precision, one value at a time;
    this does the same additions and division in the same order on whole rows (strided views where the
    windows are evenly spaced, row gathers elsewhere). ``x + 0.0`` is the kernel's ``0 + x`` (it turns
    -0.0 into +0.0).
    """
    groups, inverse = _pooling_windows(values.shape[-2], output_size)
    parts = []
    for size, _, places in groups:
        total = None
        for place in places:
            part = values[..., place, :] if isinstance(place, slice) else values.index_select(-2, place)
            total = part + 0.0 if total is None else total.add_(part)
        parts.append(total.div_(torch.tensor(float(size), dtype=values.dtype)))
    pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return pooled if inverse is None else pooled.index_select(-2, inverse)


class PatchEmbedder(torch.nn.Module):
    """Backbone layer maps -> one ``target_dim`` embedding per location of the first layer's grid."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        layers_to_extract_from: Sequence[str],
        device: torch.device,
        input_shape: Sequence[int],
        pretrain_embed_dimension: int,
        target_embed_dimension: int,
        patchsize: int = 3,
        train_backbone: bool = False,
    ):
        super().__init__()
        self.layers_to_extract_from = list(layers_to_extract_from)
        self.feature_aggregator = NetworkFeatureAggregator(backbone, layers_to_extract_from, device, train_backbone)
        self.feature_dimensions = self.feature_aggregator.feature_dimensions(input_shape)
        self.patch_maker = PatchMaker(patchsize)
        self.preprocessing = Preprocessing(self.feature_dimensions, pretrain_embed_dimension)
        self.preadapt_aggregator = Aggregator(target_embed_dimension)
        self.train_backbone = train_backbone

    def layer_features(self, images: torch.Tensor, evaluation: bool = True) -> List[torch.Tensor]:
        """The wanted layer maps of the backbone, in the order of ``layers_to_extract_from``."""
        if not evaluation and self.train_backbone:
            self.feature_aggregator.train()
            outputs = self.feature_aggregator(images, evaluation=False)
        else:
            ensure_eval(self.feature_aggregator)
            with torch.no_grad():
                outputs = self.feature_aggregator(images)
        return self.feature_aggregator.feature_maps(outputs)

    def embed_layer_features(self, layer_features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[List[int]]]:
        """Patch embeddings (B * H1 * W1, target_dim) and each layer's patch grid from layer maps.

        On the CPU (float32/float64, no gradient wanted) this runs :meth:`_embed_rows`, which gives the
        same bits as the step-by-step pipeline (:meth:`embed_layer_features_stepwise`) in less time;
        elsewhere the step-by-step pipeline runs.
        """
        if self._rows_path_applies(layer_features):
            return self._embed_rows(layer_features)
        return self.embed_layer_features_stepwise(layer_features)

    @staticmethod
    def _rows_path_applies(layer_features: Sequence[torch.Tensor]) -> bool:
        dtype = layer_features[0].dtype
        return (
            dtype in (torch.float32, torch.float64)
            and all(x.device.type == "cpu" and x.dtype == dtype for x in layer_features)
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in layer_features))
        )

    def embed_layer_features_stepwise(self, layer_features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[List[int]]]:
        """The pipeline step by step: patches (B, positions, C, p, p), alignment, MeanMapper, Aggregator."""
        patched = [self.patch_maker.patchify(x, return_spatial_info=True) for x in layer_features]
        grids = [grid for _, grid in patched]
        patches = [p for p, _ in patched]
        for i in range(1, len(patches)):
            patches[i] = align_patches(patches[i], grids[i], grids[0])
        patches = [x.reshape(-1, *x.shape[-3:]) for x in patches]
        embeddings = self.preprocessing(patches)
        embeddings = self.preadapt_aggregator(embeddings)
        return embeddings, grids

    def _embed_rows(self, layer_features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[List[int]]]:
        """:meth:`embed_layer_features_stepwise` on the unfolded maps as they come, one row per patch component.

        Same operations on the same values in the same order, so the same bits, in a layout that needs no
        strided copy and no per-value loop: the unfolded map (B, C p p, positions) is what the bilinear
        alignment reads anyway (the step-by-step path permutes it away and back), and pooling each
        position's C p p values to ``pretrain_embed_dimension`` is, with one row per component and the
        positions along the rows, a sum of whole rows (:func:`pool_rows`) where ``adaptive_avg_pool1d``
        loops value by value. The stacked layers are pooled the same way; one transpose at the end.
        """
        patched = [self.patch_maker.patchify(x, return_spatial_info=True) for x in layer_features]
        grids = [grid for _, grid in patched]
        pooled = []
        for i, (patches, grid) in enumerate(patched):
            batch, positions, channels, p_h, p_w = patches.shape
            components = channels * p_h * p_w
            unfolded = patches.permute(0, 2, 3, 4, 1).reshape(batch, components, positions)  # F.unfold's output, a view
            if i > 0:  # as align_patches: every component bilinearly resized, one (1, h, w) plane each
                planes = unfolded.reshape(-1, 1, grid[0], grid[1])
                planes = F.interpolate(planes, size=(grids[0][0], grids[0][1]), mode="bilinear", align_corners=False)
                unfolded = planes.reshape(batch, components, -1)
            pooled.append(pool_rows(unfolded, self.preprocessing.output_dim))  # (B, pretrain_dim, positions)
        embeddings = pool_rows(torch.cat(pooled, dim=1), self.preadapt_aggregator.target_dim)
        return embeddings.transpose(1, 2).contiguous().view(-1, embeddings.shape[1]), grids

    def embedding_matrices(self) -> List[torch.Tensor]:
        """Per layer, the embedding as a matrix (target_dim, C * p * p) in float64: a patch's embedding is
        ``sum_l matrix_l @ unfolded_l`` (each deeper layer's unfolded map aligned to the first grid, as
        :meth:`_embed_rows` does), since both poolings are linear. For :func:`model.fuse_head`."""
        pretrain_dim = self.preprocessing.output_dim
        layer_sizes = [channels * self.patch_maker.patchsize ** 2 for channels in self.feature_dimensions]
        aggregate = pooling_matrix(pretrain_dim * len(layer_sizes), self.preadapt_aggregator.target_dim)
        # Both are averaging matrices with a few non-zeros per row: a sparse product (a dense one takes seconds
        # at the paper's 1536 x 9216 per layer).
        return [torch.sparse.mm(aggregate[:, i * pretrain_dim:(i + 1) * pretrain_dim].to_sparse(),
                                pooling_matrix(size, pretrain_dim))
                for i, size in enumerate(layer_sizes)]

    def forward(self, images: torch.Tensor, evaluation: bool = True) -> Tuple[torch.Tensor, List[List[int]]]:
        return self.embed_layer_features(self.layer_features(images, evaluation=evaluation))


class RescaleSegmentor:
    """Patch-score grid -> anomaly map: bilinear upsampling to the image size, Gaussian blur (sigma 4)."""

    def __init__(self, device: torch.device, target_size: Sequence[int] | int = 288, smoothing: float = 4):
        self.device = device
        self.target_size = target_size
        self.smoothing = smoothing
        self._operators: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}  # see operators

    def upsample(self, patch_scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, h, w) scores -> (B, H, W) bilinear (align_corners False), as NumPy."""
        with torch.no_grad():
            if isinstance(patch_scores, np.ndarray):
                patch_scores = torch.from_numpy(patch_scores)
            scores = patch_scores.to(self.device).unsqueeze(1)
            scores = F.interpolate(scores, size=self.target_size, mode="bilinear", align_corners=False)
            return scores.squeeze(1).cpu().numpy()

    def convert_to_segmentation(self, patch_scores: torch.Tensor | np.ndarray) -> List[np.ndarray]:
        """(B, h, w) patch scores -> B anomaly maps at the target size: bilinear upsampling, then Gaussian smoothing."""
        return [ndimage.gaussian_filter(score, sigma=self.smoothing) for score in self.upsample(patch_scores)]

    def convert_by_products(self, patch_scores: torch.Tensor) -> List[np.ndarray]:
        """:meth:`convert_to_segmentation` as two matrix products per map (``--fuse_head``): upsampling and
        smoothing are linear and act on rows and columns separately, so a map is ``rows @ scores @ columns.T``
        (:meth:`operators`). Within float32 rounding of the scipy maps (about 3e-7), at a fraction of the time."""
        with torch.no_grad():
            rows, columns = self.operators(tuple(patch_scores.shape[-2:]))
            maps = torch.matmul(torch.matmul(rows, patch_scores.to(self.device, torch.float32)), columns.T)
            return list(maps.cpu().numpy())

    def operators(self, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """For a (h, w) patch grid, the (H, h) and (W, w) float32 matrices on the device of bilinear upsampling
        (align_corners False) followed by scipy's Gaussian smoothing ('reflect' borders) along each axis."""
        if grid not in self._operators:
            size = (self.target_size,) * 2 if isinstance(self.target_size, int) else tuple(self.target_size)
            self._operators[grid] = tuple(torch.from_numpy(map_matrix(n, out, self.smoothing)).float().to(self.device)
                                          for n, out in zip(grid, size))
        return self._operators[grid]


def map_matrix(size: int, output_size: int, sigma: float) -> np.ndarray:
    """(output_size, size) float64: bilinear upsampling then Gaussian smoothing along one axis of a map."""
    return smoothing_matrix(output_size, sigma) @ upsampling_matrix(size, output_size)


def upsampling_matrix(size: int, output_size: int) -> np.ndarray:
    """(output_size, size) float64: ``F.interpolate(..., mode="linear", align_corners=False)`` along one axis."""
    identity = torch.eye(size, dtype=torch.float64).unsqueeze(0)  # channel j: the signal e_j
    return F.interpolate(identity, size=output_size, mode="linear", align_corners=False)[0].T.numpy()


def smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float64: ``scipy.ndimage.gaussian_filter1d(x, sigma)`` (mode 'reflect') of a signal x of
    ``size`` values is ``matrix @ x``."""
    return ndimage.gaussian_filter1d(np.eye(size), sigma, axis=0)


# --------------------------------------------------------------------------------------------------
# Feature cache
#
# For a frozen backbone: the features of fixed images, computed once, looked up by index.
#
# With a frozen backbone (no ``--train_backbone``) and no train-time augmentation, the backbone sees the
# same un-augmented training images every epoch (centre pass, true-feature branch) and the same test
# images at every evaluation. :class:`FeatureCache` keeps their features so that each image goes through
# the backbone once per run; the synthesised (``aug``) images still go through it every step.
#
# What is cached (measured on the CPU, see ``bench/README.md``): the final patch embeddings
# (``PatchEmbedder.embed_layer_features``) when they fit, because the embedding step costs about half
# as much as the backbone itself (``bench/predict_speed.py``, batch 8: WideResNet-50, 288 px, 1536-d:
# 148 ms backbone + 68 ms embedding per image; EfficientNet-Lite0, 128 px, 512-d, one thread: 5.3 + 2.3
# ms); they take more room than the layer maps they are made from (8.0 vs 4.0 MB per image; 0.52 vs
# 0.07 MB). When the embeddings do not fit but the layer maps do, the maps are cached and embedded at
# every lookup (the same operations on the same values).
#
# Where (``--cache``): ``ram`` keeps CPU tensors, ``disk`` ``np.memmap`` files of ``--cache_dtype`` values in a temporary
# folder under the results path (removed when training ends; a folder left by a killed run is removed by
# the next run), ``auto`` takes RAM when the cache needs at most half of the available memory, else disk
# when it fits there, else runs without a cache, and ``off`` never caches. ``--cache_dtype float16``
# halves the room but rounds the cached features (an opt-in that changes the numbers).

# Cached content, in order of preference: final patch embeddings, else the backbone's layer maps.
CACHE_CONTENTS = ("embeddings", "maps")
# --cache auto uses RAM for at most this share of the available memory; --cache ram for at most this one.
AUTO_MEMORY_SHARE = 0.5
FORCED_MEMORY_SHARE = 0.9
# Disk caches leave this much room free besides 10 % of their size.
DISK_MARGIN_BYTES = 512 * 2**20
# Memory estimate when the available memory cannot be read: RAM up to this size, disk above.
UNKNOWN_MEMORY_RAM_LIMIT = 2**30
CACHE_FOLDER_PREFIX = ".glass-feature-cache-"
_FOLDER_PATTERN = re.compile(re.escape(CACHE_FOLDER_PREFIX) + r"(\d+)-")


def byte_size(nbytes: float) -> str:
    """A byte count for messages: ``"1.23 GB"`` (GiB), or ``"45.6 MB"`` (MiB) below a tenth of a GiB."""
    if abs(nbytes) < 2**30 / 10:
        return f"{nbytes / 2**20:.1f} MB"
    return f"{nbytes / 2**30:.2f} GB"


def available_memory() -> Optional[int]:
    """Bytes that new allocations of this process can take, or None when unknown: the system's
    ``MemAvailable``, or the room left under a cgroup memory limit (a container's) where that is less, plus
    the heap memory this process freed and keeps for reuse (:func:`utils.free_heap_bytes`)."""
    limits = [memory for memory in (system_available_memory(), utils.cgroup_memory_room()) if memory is not None]
    if not limits:
        return None
    return min(limits) + (utils.free_heap_bytes() or 0)


def system_available_memory() -> Optional[int]:
    """The system's available memory in bytes (``MemAvailable`` of /proc/meminfo), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(folder: str) -> Optional[int]:
    """Free bytes on the file system of ``folder`` (created if needed), or None when unknown."""
    try:
        os.makedirs(folder, exist_ok=True)
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@dataclass
class CachePlan:
    """Where the cache lives (``ram``, ``disk`` or ``off``), what it holds, its size and why."""

    storage: str
    content: str = ""
    nbytes: int = 0
    reason: str = ""


def plan_cache(mode: str, sizes: Dict[str, int], folder: str) -> CachePlan:
    """Choose storage and content for a cache of ``sizes`` bytes per content (``{"embeddings": .., "maps": ..}``).

    ``auto``: RAM when the embeddings (else the maps) need at most half of the available memory, else
    disk when they fit on the disk of ``folder``, else off. ``ram``/``disk`` insist on their storage
    and raise a GlassError when neither content fits.
    """
    if mode not in utils.CACHE_MODES:
        raise GlassError(f"--cache {mode} is not one of {', '.join(utils.CACHE_MODES)}")
    if mode == "off":
        return CachePlan("off", reason="--cache off")
    memory = available_memory()
    need = {content: int(sizes[content]) for content in CACHE_CONTENTS}
    if mode in ("auto", "ram"):
        share = AUTO_MEMORY_SHARE if mode == "auto" else FORCED_MEMORY_SHARE
        for content in CACHE_CONTENTS:
            fits = need[content] <= share * memory if memory is not None else (
                mode == "ram" or need[content] <= UNKNOWN_MEMORY_RAM_LIMIT)
            if fits:
                known = f"{byte_size(memory)} available" if memory is not None else "available memory unknown"
                return CachePlan("ram", content, need[content], f"{byte_size(need[content])} in memory ({known})")
        if mode == "ram":
            raise GlassError(
                f"--cache ram needs {byte_size(min(need.values()))} but {byte_size(memory or 0)} of memory is available: "
                "use --cache auto, disk or off"
            )
    disk = free_disk(folder)
    for content in CACHE_CONTENTS:
        if disk is None or need[content] * 1.1 + DISK_MARGIN_BYTES <= disk:
            return CachePlan("disk", content, need[content], f"{byte_size(need[content])} on disk under {folder}")
    if mode == "disk":
        smallest = min(need.values())
        raise GlassError(
            f"--cache disk needs {byte_size(smallest * 1.1 + DISK_MARGIN_BYTES)} of free disk space ({byte_size(smallest)} "
            f"of features, 10 % more and {byte_size(DISK_MARGIN_BYTES)} to spare) but {byte_size(disk or 0)} is free "
            f"under {folder}: use --cache off or free some space"
        )
    return CachePlan("off", reason=(
        f"the cache would need {byte_size(min(need.values()))}: more than half of the available memory "
        f"({byte_size(memory or 0)}) and more than the free disk space ({byte_size(disk or 0)})"
    ))


def make_cache_folder(results_path: str) -> str:
    """A new temporary folder ``<results>/.glass-feature-cache-<pid>-XXXX`` (stale ones of dead runs removed)."""
    os.makedirs(results_path, exist_ok=True)
    for path in glob.glob(os.path.join(glob.escape(results_path), CACHE_FOLDER_PREFIX + "*")):
        match = _FOLDER_PATTERN.match(os.path.basename(path))
        if match and not _process_alive(int(match.group(1))):
            LOGGER.info("Removing the feature cache %s left by a stopped run", path)
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{CACHE_FOLDER_PREFIX}{os.getpid()}-", dir=results_path)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class FeatureStore:
    """``count`` rows of ``row_length`` values: a CPU tensor (``ram``) or an ``np.memmap`` file (``disk``)."""

    def __init__(self, count: int, row_length: int, dtype: str, storage: str, path: Optional[str] = None):
        self.count, self.row_length, self.storage, self.path = count, row_length, storage, path
        if storage == "ram":
            self.rows = torch.empty((count, row_length), dtype=getattr(torch, dtype))
        elif storage == "disk":
            self.rows = np.memmap(path, dtype=np.dtype(dtype), mode="w+", shape=(count, row_length))
        else:
            raise ValueError(f"unknown storage {storage}")

    def write(self, indices: Sequence[int], rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(len(indices), self.row_length).cpu()
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.storage == "ram":
            self.rows[index] = rows.to(self.rows.dtype)
        else:
            self.rows[index.numpy()] = rows.numpy().astype(self.rows.dtype, copy=False)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows of ``indices`` as a new float32 tensor of shape (len(indices), row_length)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.storage == "ram":
            return self.rows[index].to(torch.float32)
        return torch.from_numpy(np.asarray(self.rows[index.numpy()])).to(torch.float32)

    def close(self) -> None:
        """Drop the rows; a disk store also releases its memory map."""
        if self.storage == "disk" and isinstance(self.rows, np.memmap):
            self.rows._mmap.close()  # release the file before its folder is removed
        self.rows = None


@dataclass
class FeatureCache:
    """Cached features of one image set, looked up by dataset index.

    ``content`` is ``embeddings`` (rows of ``positions x dim``) or ``maps`` (the layer maps, flattened
    and joined; ``layer_shapes`` restores them). ``batches`` records the index lists in the order and
    grouping they were stored (a loader's batches); ``grids`` the layer grids; ``extras`` anything else
    a pass needs (test labels and masks).
    """

    count: int
    content: str
    storage: str
    dtype: str
    layer_shapes: List[Tuple[int, ...]]
    embedding_shape: Tuple[int, int]
    folder: Optional[str] = None
    name: str = "features"
    batches: List[List[int]] = field(default_factory=list)
    grids: Optional[List[List[int]]] = None
    extras: Dict[str, object] = field(default_factory=dict)
    source: object = None

    def __post_init__(self) -> None:
        if self.content == "embeddings":
            row_length = int(np.prod(self.embedding_shape))
        else:
            row_length = int(sum(int(np.prod(shape)) for shape in self.layer_shapes))
        path = os.path.join(self.folder, f"{self.name}.f32" if self.dtype == "float32" else f"{self.name}.f16") \
            if self.storage == "disk" else None
        self.store = FeatureStore(self.count, row_length, self.dtype, self.storage, path)

    @staticmethod
    def bytes_per_image(layer_shapes: Sequence[Sequence[int]], embedding_shape: Sequence[int], dtype: str) -> Dict[str, int]:
        """Bytes one image takes in the cache: its embeddings and its layer maps, in ``dtype``."""
        itemsize = np.dtype(dtype).itemsize
        return {
            "embeddings": int(np.prod(embedding_shape)) * itemsize,
            "maps": int(sum(int(np.prod(shape)) for shape in layer_shapes)) * itemsize,
        }

    def put(self, indices: Sequence[int], maps: Sequence[torch.Tensor], embeddings: Optional[torch.Tensor]) -> None:
        """Store the features of the images ``indices`` (their layer maps, and embeddings when cached)."""
        indices = [int(i) for i in indices]
        if self.content == "embeddings":
            self.store.write(indices, embeddings)
        else:
            self.store.write(indices, torch.cat([m.detach().reshape(len(indices), -1) for m in maps], dim=1))

    def maps(self, indices: Sequence[int]) -> List[torch.Tensor]:
        """The cached layer maps of ``indices``, each (B, C, h, w), float32 on the CPU (``maps`` content)."""
        flat = self.store.read(indices)
        out, start = [], 0
        for shape in self.layer_shapes:
            size = int(np.prod(shape))
            out.append(flat[:, start:start + size].reshape(len(indices), *shape))
            start += size
        return out

    def embeddings(self, indices: Sequence[int], embed_maps: Callable[[List[torch.Tensor]], torch.Tensor],
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Patch embeddings (B * positions, dim) of ``indices`` on ``device``; ``maps`` content is embedded
        with ``embed_maps`` (a list of (B, C, h, w) maps -> embeddings)."""
        if self.content == "embeddings":
            return self.store.read(indices).reshape(-1, self.embedding_shape[-1]).to(device)
        return embed_maps([m.to(device) for m in self.maps(indices)])

    def close(self) -> None:
        """Free the memory, or close and delete the file (its folder is the owner's to remove)."""
        if getattr(self, "store", None) is not None:
            path = self.store.path
            self.store.close()
            self.store = None
            if path and os.path.exists(path):
                os.remove(path)
        self.extras.clear()
        self.source = None
