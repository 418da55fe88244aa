"""Reusable feature pieces: layer hooks, patch embedding and the segmentor.

The data flow (spec, "Features"): backbone -> chosen layer maps -> 3x3 neighbourhoods of every
location -> deeper layers aligned to the first layer's grid -> each layer pooled to
``pretrain_embed_dimension`` -> all layers pooled to ``target_embed_dimension``.
The result is one row per patch position: ``(B * H1 * W1, target_dim)``.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

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

    def __call__(self, module, inputs, output):
        self.outputs[self.layer_name] = output
        if len(self.outputs) == self.n_wanted:
            raise LastLayerToExtractReachedException()


def resolve_layer(backbone: torch.nn.Module, layer_name: str) -> torch.nn.Module:
    """Find a (dotted) layer name in the backbone; on a Sequential the hook goes on its last child."""
    try:
        module = backbone.get_submodule(layer_name)
    except AttributeError:
        children = ", ".join(name for name, _ in backbone.named_children())
        raise GlassError(
            f"layer '{layer_name}' not found in backbone {getattr(backbone, 'name', type(backbone).__name__)}; "
            f"its top-level layers are: {children} (use dotted names such as blocks.2 for nested ones)"
        ) from None
    if isinstance(module, torch.nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


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
        self.outputs: Dict[str, torch.Tensor] = {}
        for handle in getattr(backbone, "hook_handles", []):
            handle.remove()
        backbone.hook_handles = []
        n_wanted = len(set(self.layers_to_extract_from))
        for name in dict.fromkeys(self.layers_to_extract_from):
            hook = ForwardHook(self.outputs, name, n_wanted)
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
        """Channel count of every wanted layer for an input of shape (C, H, W)."""
        dummy = torch.ones([1, *input_shape], device=self.device)
        outputs = self(dummy)
        return [to_feature_map(outputs[name]).shape[1] for name in self.layers_to_extract_from]


def to_feature_map(feature: torch.Tensor) -> torch.Tensor:
    """Turn a token sequence (B, L, C) from a ViT-like layer into a map (B, C, sqrt(L), sqrt(L))."""
    if feature.dim() == 3:
        batch, length, channels = feature.shape
        side = int(math.sqrt(length))
        return feature.reshape(batch, side, side, channels).permute(0, 3, 1, 2)
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
        patchstride: int = 1,
        train_backbone: bool = False,
    ):
        super().__init__()
        self.layers_to_extract_from = list(layers_to_extract_from)
        self.feature_aggregator = NetworkFeatureAggregator(backbone, layers_to_extract_from, device, train_backbone)
        self.feature_dimensions = self.feature_aggregator.feature_dimensions(input_shape)
        self.patch_maker = PatchMaker(patchsize, stride=patchstride)
        self.preprocessing = Preprocessing(self.feature_dimensions, pretrain_embed_dimension)
        self.preadapt_aggregator = Aggregator(target_embed_dimension)
        self.train_backbone = train_backbone

    def layer_features(self, images: torch.Tensor, evaluation: bool = True) -> List[torch.Tensor]:
        """The wanted layer maps of the backbone, in the order of ``layers_to_extract_from``."""
        if not evaluation and self.train_backbone:
            self.feature_aggregator.train()
            outputs = self.feature_aggregator(images, evaluation=False)
        else:
            self.feature_aggregator.eval()
            with torch.no_grad():
                outputs = self.feature_aggregator(images)
        return [to_feature_map(outputs[name]) for name in self.layers_to_extract_from]

    def embed_layer_features(self, layer_features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[List[int]]]:
        """Patch embeddings (B * H1 * W1, target_dim) and each layer's patch grid from layer maps."""
        patched = [self.patch_maker.patchify(x, return_spatial_info=True) for x in layer_features]
        grids = [grid for _, grid in patched]
        patches = [p for p, _ in patched]
        for i in range(1, len(patches)):
            patches[i] = align_patches(patches[i], grids[i], grids[0])
        patches = [x.reshape(-1, *x.shape[-3:]) for x in patches]
        embeddings = self.preprocessing(patches)
        embeddings = self.preadapt_aggregator(embeddings)
        return embeddings, grids

    def forward(self, images: torch.Tensor, evaluation: bool = True) -> Tuple[torch.Tensor, List[List[int]]]:
        return self.embed_layer_features(self.layer_features(images, evaluation=evaluation))


class RescaleSegmentor:
    """Patch-score grid -> anomaly map: bilinear upsampling to the image size, Gaussian blur (sigma 4)."""

    def __init__(self, device: torch.device, target_size: Sequence[int] | int = 288, smoothing: float = 4):
        self.device = device
        self.target_size = target_size
        self.smoothing = smoothing

    def upsample(self, patch_scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, h, w) scores -> (B, H, W) bilinear (align_corners False), as NumPy."""
        with torch.no_grad():
            if isinstance(patch_scores, np.ndarray):
                patch_scores = torch.from_numpy(patch_scores)
            scores = patch_scores.to(self.device).unsqueeze(1)
            scores = F.interpolate(scores, size=self.target_size, mode="bilinear", align_corners=False)
            return scores.squeeze(1).cpu().numpy()

    def convert_to_segmentation(self, patch_scores: torch.Tensor | np.ndarray) -> List[np.ndarray]:
        return [ndimage.gaussian_filter(score, sigma=self.smoothing) for score in self.upsample(patch_scores)]
