"""Trainable parts of GLASS: the feature adaptor (projection), the discriminator, patch bookkeeping, the
oneDNN route of their Linear layers (``--onednn``) and the fused inference head (``--fuse_head``).

Module names match the reference so that its checkpoints
(``{"discriminator": ..., "pre_projection": ...}``) load unchanged:
``layers.{i}fc`` in the projection, ``body.block{k}`` and ``tail`` in the discriminator.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def init_weight(module: torch.nn.Module) -> None:
    """Xavier-normal Linear weights; biases and BatchNorm keep PyTorch's defaults (as the reference)."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_normal_(module.weight)


class Discriminator(torch.nn.Module):
    """Patch discriminator: ``n_layers - 1`` blocks Linear -> BatchNorm1d -> LeakyReLU(0.2), then
    Linear(hidden, 1, no bias) -> Sigmoid. Output: (N, 1) anomaly probability per patch."""

    def __init__(self, in_planes: int, n_layers: int, hidden: int):
        super().__init__()
        # Without hidden blocks the tail sees the input directly (the reference crashes on
        # --dsc_layers 1 with a --dsc_hidden that differs from the embedding size).
        width = in_planes if n_layers < 2 else hidden
        self.body = torch.nn.Sequential()
        for i in range(n_layers - 1):
            block_in = in_planes if i == 0 else width
            self.body.add_module(
                f"block{i + 1}",
                torch.nn.Sequential(
                    torch.nn.Linear(block_in, width),
                    torch.nn.BatchNorm1d(width),
                    torch.nn.LeakyReLU(0.2),
                ),
            )
        self.tail = torch.nn.Sequential(torch.nn.Linear(width, 1, bias=False), torch.nn.Sigmoid())
        self.apply(init_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))

    def first_linear(self) -> torch.nn.Linear:
        """The Linear layer that sees the input: the first block's, or the tail's when there are no blocks."""
        return self.body[0][0] if len(self.body) else self.tail[0]

    def from_first_linear(self, pre: torch.Tensor) -> torch.Tensor:
        """The rest of :meth:`forward` after :meth:`first_linear`: ``forward(x) == from_first_linear(first_linear()(x))``."""
        if len(self.body) == 0:
            return self.tail[1](pre)
        x = self.body[0][1:](pre)
        for block in self.body[1:]:
            x = block(x)
        return self.tail(x)


class Projection(torch.nn.Module):
    """Feature adaptor: ``n_layers`` Linear layers in a row (``--pre_proj``), without activations between them."""

    def __init__(self, in_planes: int, out_planes: int, n_layers: int = 1):
        super().__init__()
        self.layers = torch.nn.Sequential()
        for i in range(n_layers):
            self.layers.add_module(f"{i}fc", torch.nn.Linear(in_planes if i == 0 else out_planes, out_planes))
        self.apply(init_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def affine_front(projection: Optional[Projection], discriminator: Discriminator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The projection's Linear layers and the discriminator's first one as one affine map, in float64 on the CPU
    (MPS has no float64): ``(weight (out, in), bias (out,))`` with ``first_linear(projection(x)) == x @ weight.T +
    bias`` up to rounding. ``projection`` None: the discriminator sees the embeddings themselves (``--pre_proj 0``)."""
    linears = list(projection.layers) if projection is not None else []
    linears.append(discriminator.first_linear())
    weight, bias = None, None
    for linear in linears:
        w = linear.weight.detach().to("cpu", torch.float64)
        b = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else \
            torch.zeros(len(w), dtype=torch.float64)
        weight, bias = (w, b) if weight is None else (w @ weight, w @ bias + b)
    return weight, bias


class FusedHead(torch.nn.Module):
    """Inference from layer maps to patch scores with the linear stages folded into one convolution per layer
    (``--fuse_head``): the patch embedding (3 x 3 unfolding, alignment, both poolings), the projection and the
    discriminator's first Linear layer are linear, so together they are ``sum_l align(conv(map_l, W_l)) + b``,
    which costs a fraction of building the embeddings and multiplying them. The rest of the discriminator
    (BatchNorm, LeakyReLU, ..., sigmoid) runs as usual on the result. Other last bits than the step-by-step
    path (the sums run in another order; scores differ by about 1e-6).

    Args:
        weights: per layer, float32 (out, C, p, p) kernels; the first layer's grid is the output grid.
        bias: (out,) float32, added once.
        padding: the patch unfolding's zero padding, (p - 1) // 2.
        rest: the discriminator after its first Linear layer (``Discriminator.from_first_linear``), kept as a
            plain attribute (the discriminator belongs to its owner, not to this module).

    Kernels and bias are buffers that are not saved with a state dict (they follow from the weights), so
    that ``.to()`` and the ONNX exporter see them.
    """

    def __init__(self, weights: Sequence[torch.Tensor], bias: torch.Tensor, padding: int,
                 rest: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layers = len(weights)
        for i, weight in enumerate(weights):
            self.register_buffer(f"weight{i}", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.padding = padding
        self.rest = rest

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch scores (B * h * w, 1) of layer maps (B, C_l, h_l, w_l), rows in the embeddings' order."""
        weights = [getattr(self, f"weight{i}") for i in range(self.layers)]
        total = F.conv2d(maps[0], weights[0], self.bias, padding=self.padding)
        for layer_map, weight in zip(maps[1:], weights[1:]):
            part = F.conv2d(layer_map, weight, padding=self.padding)
            total = total + F.interpolate(part, size=total.shape[-2:], mode="bilinear", align_corners=False)
        rows = total.permute(0, 2, 3, 1).reshape(-1, total.shape[1])
        return self.rest(rows)


def fuse_head(embedding_matrices: List[torch.Tensor], patchsize: int, projection: Optional[Projection],
              discriminator: Discriminator) -> FusedHead:
    """A :class:`FusedHead` on the discriminator's device from each layer's embedding matrix (target_dim,
    C_l * p * p: unfolded patch -> embedding, float64 on the CPU; ``PatchEmbedder.embedding_matrices``), the
    projection (None for none) and the discriminator, as they are now: build a new one after the weights change."""
    device = discriminator.first_linear().weight.device
    weight, bias = affine_front(projection, discriminator)
    kernels = [(weight @ matrix).float().reshape(len(weight), -1, patchsize, patchsize).contiguous().to(device)
               for matrix in embedding_matrices]
    return FusedHead(kernels, bias.float().to(device), (patchsize - 1) // 2, discriminator.from_first_linear)


class PatchMaker:
    """Cuts feature maps into ``patchsize x patchsize`` neighbourhoods and reshapes patch scores."""

    def __init__(self, patchsize: int, stride: int = 1):
        self.patchsize = patchsize
        self.stride = stride

    def patchify(self, features: torch.Tensor, return_spatial_info: bool = False):
        """(B, C, H, W) -> (B, H' * W', C, p, p) with zero padding (p - 1) / 2, plus (H', W')."""
        padding = int((self.patchsize - 1) / 2)
        unfolded = F.unfold(features, kernel_size=self.patchsize, stride=self.stride, padding=padding)
        grid = self.grid(features.shape[-2:])
        unfolded = unfolded.reshape(*features.shape[:2], self.patchsize, self.patchsize, -1)
        unfolded = unfolded.permute(0, 4, 1, 2, 3)
        if return_spatial_info:
            return unfolded, grid
        return unfolded

    def grid(self, map_size: Sequence[int]) -> List[int]:
        """The patch grid (rows, columns) of a (h, w) map."""
        padding = int((self.patchsize - 1) / 2)
        return [int((size + 2 * padding - (self.patchsize - 1) - 1) / self.stride + 1) for size in map_size]

    def unpatch_scores(self, x: torch.Tensor, batchsize: int) -> torch.Tensor:
        """(B * H' * W', ...) patch scores -> (B, H' * W', ...)."""
        return x.reshape(batchsize, -1, *x.shape[1:])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Image score: the maximum patch score of each image."""
        x = x[:, :, 0]
        return torch.max(x, dim=1).values


class LinearWithKnownRows(torch.autograd.Function):
    """``F.linear(features, weight, bias)`` whose first ``len(known)`` output rows are already known (computed
    from the same rows and weights): only the other rows go through the matrix product. The backward pass is
    the one autograd runs for ``F.linear`` on the CPU (``addmm``), over all rows, so gradients keep their bits."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, weight)
        rows = len(known)
        out = features.new_empty(len(features), weight.shape[0])
        out[:rows].copy_(known)
        torch.addmm(bias, features[rows:], weight.t(), out=out[rows:])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        grad_features = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(features) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_features, grad_weight, grad_bias, None


# --------------------------------------------------------------------------------------------------
# Linear layers through oneDNN (``--onednn``): on CPUs where MKL's sgemm, which torch.addmm calls, runs
# without AVX-512 (AMD CPUs), oneDNN's AVX-512 kernels are about twice as fast. Other last bits than torch's.

def onednn_linear_available() -> bool:
    """Whether this torch build can run a float32 Linear layer through oneDNN on the CPU (x86 builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``features @ weight.T + bias`` through oneDNN (CPU, float32, 2-D, no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(features, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` through oneDNN, forward and backward (input and weight gradients as matrix products)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        features = features.contiguous()
        ctx.save_for_backward(features, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(features, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_features = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_features = onednn_linear(grad, weight.t().contiguous())
        if ctx.needs_input_grad[1]:  # grad.T @ features as a Linear layer of input grad.T and weight features.T
            grad_weight = onednn_linear(grad.t().contiguous(), features.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_features, grad_weight, grad_bias


class OneDNNLinearMode(torch.overrides.TorchFunctionMode):
    """Within it, every 2-D float32 ``F.linear`` on the CPU (``torch.nn.Linear`` included) runs
    :class:`OneDNNLinear`; everything else runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            features, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (features.dim() == 2 and features.device.type == "cpu" and features.dtype == torch.float32
                    and weight.dtype == torch.float32):
                return OneDNNLinear.apply(features, weight, bias)
        return func(*args, **kwargs)
