"""The traceable GLASS inference graph that ``onnx/pth2onnx.py`` exports.

``GlassOnnx`` is ``GLASS._predict`` as one module the ONNX exporter can trace: the backbone up to the
deepest feature layer (``LayerTap``), patch neighbourhoods, alignment of the deeper layers, the two
average-pooling reductions with fixed windows (``AdaptiveAvgPool1d``), feature adaptor, discriminator,
image score (max patch score), bilinear upsampling and scipy's Gaussian smoothing written as two fixed
matrix products (``UpsampleAndSmooth``). With ``fuse_head`` the layer maps go through ``model.FusedHead``
instead (``--fuse_head``: the patch embedding, feature adaptor and the discriminator's first Linear layer and
BatchNorm folded into a grouped convolution and a matrix product per layer). Kept apart from the command line so that
``--help`` and option mistakes answer without importing torch.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import common  # noqa: E402
import glass  # noqa: E402
from model import fuse_head as fuse_head_from  # noqa: E402


class UpsampleAndSmooth(torch.nn.Module):
    """(B, h, w) patch-score grids -> (B, H, W) anomaly maps: bilinear upsampling (align_corners False), then
    scipy's Gaussian smoothing ('reflect' borders), as two matrix products with fixed matrices
    (``common.RescaleSegmentor.operators``, what ``--fuse_head`` computes in PyTorch)."""

    def __init__(self, grid: Sequence[int], size: Sequence[int], sigma: float):
        super().__init__()
        rows, columns = (torch.from_numpy(common.map_matrix(n, out, sigma)).float() for n, out in zip(grid, size))
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("columns_t", columns.T.contiguous(), persistent=False)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, grids), self.columns_t)


class AdaptiveAvgPool1d(torch.nn.Module):
    """``F.adaptive_avg_pool1d`` of (N, L) rows to ``out_len`` values with fixed windows (static shapes).

    PyTorch's own operator is not exported with a dynamic batch; here every output gathers its window
    ``[floor(i L / out), ceil((i + 1) L / out))`` (padded to the longest window with zero weights) and
    averages it.
    """

    def __init__(self, in_len: int, out_len: int):
        super().__init__()
        starts, sizes = (bound.numpy() for bound in common.pooling_window_bounds(in_len, out_len))
        index = starts[:, None] + np.arange(int(sizes.max()))[None, :]
        valid = index < (starts + sizes)[:, None]
        self.in_len, self.out_len = in_len, out_len
        self.register_buffer("index", torch.from_numpy(np.where(valid, index, starts[:, None])), persistent=False)
        self.register_buffer("valid", torch.from_numpy(valid.astype(np.float32)), persistent=False)
        self.register_buffer("counts", torch.from_numpy(sizes.astype(np.float32)), persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        windows = rows[:, self.index]  # (N, out, width)
        return (windows * self.valid).sum(dim=-1) / self.counts


def _store_output(captured: Dict[str, torch.Tensor], name: str, module, inputs, output) -> None:
    captured[name] = output


class LayerTap(torch.nn.Module):
    """A copy of the backbone that returns the wanted layer maps (same hook places as ``common``).

    The training-time hooks stop the forward with an exception, which the exporter cannot trace;
    here the forward runs through and the exporter drops the layers after the deepest wanted one.
    """

    def __init__(self, backbone: torch.nn.Module, layers: Sequence[str]):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval()
        for module in self.backbone.modules():
            module._forward_hooks.clear()
        self.backbone.hook_handles = []
        self.layers = list(layers)
        self.targets = [common.resolve_layer(self.backbone, name) for name in dict.fromkeys(self.layers)]
        self.prefix_tokens, self.channels_last = common.map_layout(self.backbone)

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        captured: Dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(functools.partial(_store_output, captured, name))
            for name, module in zip(dict.fromkeys(self.layers), self.targets)
        ]
        try:
            self.backbone(images)
        finally:
            for handle in handles:
                handle.remove()
        return [common.to_feature_map(captured[name], self.prefix_tokens, self.channels_last) for name in self.layers]


class GlassOnnx(torch.nn.Module):
    """``GLASS._predict`` as one traceable module: (B, 3, H, W) -> image scores (B,), maps (B, H, W)."""

    def __init__(self, model: glass.GLASS, fuse_head: bool = False):
        super().__init__()
        embedder = model.embedder
        self.input_shape = tuple(int(v) for v in model.input_shape)
        self.tap = LayerTap(model.backbone, model.layers_to_extract_from)
        self.patch_maker = model.patch_maker
        with torch.no_grad():
            maps = self.tap(torch.zeros(1, *self.input_shape))
        self.channels = [int(m.shape[1]) for m in maps]
        self.grids = [self.patch_maker.patchify(m, return_spatial_info=True)[1] for m in maps]
        self.maps = UpsampleAndSmooth(self.grids[0], self.input_shape[-2:], model.anomaly_segmentor.smoothing)
        self.projection = copy.deepcopy(model.pre_projection).eval() if model.pre_proj > 0 else torch.nn.Identity()
        self.discriminator = copy.deepcopy(model.discriminator).eval()
        self.head = None
        if fuse_head:  # the fused head replaces the patch embedding's poolings
            self.head = fuse_head_from(model._fused_poolings(), self.patch_maker.patchsize,
                                       self.projection if model.pre_proj > 0 else None, self.discriminator)
        else:
            patch_len = self.patch_maker.patchsize ** 2
            pretrain_dim = embedder.preprocessing.output_dim
            self.layer_pools = torch.nn.ModuleList(AdaptiveAvgPool1d(c * patch_len, pretrain_dim) for c in self.channels)
            self.aggregate = AdaptiveAvgPool1d(len(self.channels) * pretrain_dim, embedder.preadapt_aggregator.target_dim)
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        layer_maps = self.tap(image)
        if self.head is not None:
            return self.scores_and_maps(self.head(layer_maps))
        pooled = []
        for i, (feature_map, pool) in enumerate(zip(layer_maps, self.layer_pools)):
            patches = self.patch_maker.patchify(feature_map)
            if i > 0:
                patches = common.align_patches(patches, self.grids[i], self.grids[0])
            pooled.append(pool(patches.reshape(-1, pool.in_len)))
        embeddings = self.aggregate(torch.stack(pooled, dim=1).reshape(-1, self.aggregate.in_len))
        return self.scores_and_maps(self.discriminator(self.projection(embeddings)))

    def scores_and_maps(self, patch_scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image scores (max patch score) and smoothed anomaly maps from patch scores (B * h * w, 1)."""
        grid = patch_scores.reshape(-1, *self.grids[0])
        return grid.amax(dim=(1, 2)), self.maps(grid)
