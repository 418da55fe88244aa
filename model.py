"""Trainable parts of GLASS: the feature adaptor (projection), the discriminator, patch bookkeeping, the
oneDNN route of their Linear layers (``--onednn``) and the fused inference head (``--fuse_head``).

Module names match the reference so that its checkpoints
(``{"discriminator": ..., "pre_projection": ...}``) load unchanged:
``layers.{i}fc`` in the projection, ``body.block{k}`` and ``tail`` in the discriminator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

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

    def first_norm(self) -> Optional[torch.nn.BatchNorm1d]:
        """The BatchNorm right after :meth:`first_linear` (None without blocks)."""
        return self.body[0][1] if len(self.body) else None

    def from_first_norm(self, normed: torch.Tensor) -> torch.Tensor:
        """The rest of :meth:`forward` after :meth:`first_norm` (blocks only), for inference: the first
        activation overwrites ``normed``."""
        activation = self.body[0][2]
        return self._from_second_block(F.leaky_relu(normed, activation.negative_slope, inplace=True))

    def from_first_linear(self, pre: torch.Tensor) -> torch.Tensor:
        """The rest of :meth:`forward` after :meth:`first_linear`: ``forward(x) == from_first_linear(first_linear()(x))``."""
        if len(self.body) == 0:
            return self.tail[1](pre)
        return self._from_second_block(self.body[0][1:](pre))

    def _from_second_block(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks after the first one, then the tail."""
        return self.tail(self.body[1:](x))


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
    """Inference from layer maps to patch scores with the linear stages folded together (``--fuse_head``).

    The patch embedding (3 x 3 unfolding, alignment, both poolings), the projection, the discriminator's first
    Linear layer and, in evaluation, its BatchNorm are all linear, so together they are
    ``sum_l align(front_l(map_l)) + b``. Each layer's ``front_l`` is either one convolution to the
    discriminator's width, or (where cheaper) the pooling alone as a grouped convolution to that layer's share
    of the embedding followed by a per-position matrix product (``mix``). The rest of the discriminator
    (LeakyReLU, further blocks, sigmoid) runs as usual on the result. Other last bits than the step-by-step
    path (the sums run in another order; scores differ by about 1e-6).

    Args:
        kernels: per layer, float32 (out, C / groups, p, p) convolution kernels; the first layer's grid is the
            output grid.
        groups: per layer, the convolution's groups.
        mixes: per layer, None (the kernel gives the discriminator's width) or (width, out) float32.
        bias: (width,) float32, added once.
        padding: the patch unfolding's zero padding, (p - 1) // 2.
        rest: the discriminator after the folded stages (``Discriminator.from_first_norm`` or
            ``from_first_linear``), kept as a plain attribute (the discriminator belongs to its owner).
        onednn: the ``mix`` products through oneDNN on the CPU (about twice as fast as torch's matrix product on
            AMD CPUs; off for the ONNX exporter, which cannot write that operator).

    Kernels, mixes and bias are buffers that are not saved with a state dict (they follow from the weights), so
    that ``.to()`` and the ONNX exporter see them. The layer maps run channels-last: the bilinear alignment and
    the final rows then cost a fraction of what they cost in the default layout.
    """

    def __init__(self, kernels: Sequence[torch.Tensor], groups: Sequence[int], mixes: Sequence[Optional[torch.Tensor]],
                 bias: torch.Tensor, padding: int, rest: Callable[[torch.Tensor], torch.Tensor], onednn: bool = False) -> None:
        super().__init__()
        self.groups = list(groups)
        for i, (kernel, mix) in enumerate(zip(kernels, mixes)):
            self.register_buffer(f"kernel{i}", kernel.contiguous(memory_format=torch.channels_last), persistent=False)
            self.register_buffer(f"mix{i}", mix, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.padding = padding
        self.rest = rest
        self.onednn = onednn

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch scores (B * h * w, 1) of layer maps (B, C_l, h_l, w_l), rows in the embeddings' order."""
        total = None
        for i, layer_map in enumerate(maps):
            kernel, mix = getattr(self, f"kernel{i}"), getattr(self, f"mix{i}")
            bias = self.bias if i == 0 else None
            part = F.conv2d(layer_map.contiguous(memory_format=torch.channels_last), kernel,
                            bias if mix is None else None, padding=self.padding, groups=self.groups[i])
            if mix is not None:
                part = self._per_position(part, mix, bias)
            if total is None:
                total = part
            else:
                total = total.add_(F.interpolate(part, size=total.shape[-2:], mode="bilinear", align_corners=False))
        rows = total.permute(0, 2, 3, 1).reshape(-1, total.shape[1])
        return self.rest(rows)

    def _per_position(self, part: torch.Tensor, mix: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``mix`` applied to every position of a (B, C, h, w) map: (B, width, h, w), channels-last."""
        batch, channels, height, width = part.shape
        rows = part.permute(0, 2, 3, 1).reshape(-1, channels)
        if self.onednn and rows.device.type == "cpu" and rows.dtype == torch.float32:
            rows = onednn_linear(rows, mix, bias)
        else:
            rows = F.linear(rows, mix, bias)
        return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def channel_groups(pooling: torch.Tensor) -> int:
    """The most groups that a (rows, C, k) pooling splits into: rows and channels cut into as many equal
    consecutive blocks, every row reading only its own block's channels (1 where no such cut exists)."""
    rows, channels = pooling.shape[:2]
    used = pooling.ne(0).any(-1).to(torch.int8)  # (rows, C): the channels each row reads
    first = used.argmax(1)
    last = channels - 1 - used.flip(1).argmax(1)
    best = 1
    for groups in range(2, math.gcd(rows, channels) + 1):
        if rows % groups or channels % groups:
            continue
        block_channels = channels // groups
        block_start = torch.arange(rows) // (rows // groups) * block_channels
        if bool(((first >= block_start) & (last < block_start + block_channels)).all()):
            best = groups
    return best


def fold_norm(weight: torch.Tensor, bias: torch.Tensor, norm: torch.nn.BatchNorm1d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An affine map (float64 ``weight``, ``bias``) followed by ``norm`` in evaluation (its running averages) as
    one affine map, in float64 on the CPU."""
    def vector(t: Optional[torch.Tensor], default: float) -> torch.Tensor:
        if t is None:
            return torch.full((len(weight),), default, dtype=torch.float64)
        return t.detach().to("cpu", torch.float64)

    scale = vector(norm.weight, 1.0) / torch.sqrt(vector(norm.running_var, 1.0) + norm.eps)
    shift = vector(norm.bias, 0.0) - vector(norm.running_mean, 0.0) * scale
    return weight * scale[:, None], bias * scale + shift


@dataclass
class LayerPooling:
    """One layer's share of the patch embedding in the form :func:`fuse_head` uses; it follows from the
    embedding's sizes alone, not from any weight (:func:`layer_poolings`)."""
    rows: torch.Tensor                # bool (target_dim,): the embedding components this layer feeds
    groups: int                       # the grouped convolution's groups (1 for one convolution)
    kernel: Optional[torch.Tensor]    # factored: (count, C / groups, p, p) float64, the pooling alone
    matrix: Optional[torch.Tensor]    # one convolution instead: (count, C * p * p) float64, those rows' pooling


def layer_poolings(embedding_matrices: List[torch.Tensor], patchsize: int, width: int) -> List[LayerPooling]:
    """Each layer's :class:`LayerPooling` from its embedding matrix (target_dim, C_l * p * p: unfolded patch ->
    embedding, float64 on the CPU; ``PatchEmbedder.embedding_matrices``) for a discriminator ``width`` wide.

    A layer gets the factored form (grouped pooling convolution, then a matrix product to the width) where it
    takes fewer multiply-adds than one convolution to the width: at the paper's profile 7 times fewer."""
    taps = patchsize * patchsize
    poolings = []
    for matrix in embedding_matrices:
        channels = matrix.shape[1] // taps
        rows = matrix.ne(0).any(1)
        pooling = matrix[rows]
        count = len(pooling)
        groups = channel_groups(pooling.reshape(count, channels, taps))
        if count * (channels // groups) * taps + width * count < width * channels * taps:
            blocks = pooling.reshape(count, groups, channels // groups, patchsize, patchsize)
            kernel = blocks[torch.arange(count), torch.arange(count) // (count // groups)].contiguous()
            poolings.append(LayerPooling(rows, groups, kernel, None))
        else:
            poolings.append(LayerPooling(rows, 1, None, pooling))
    return poolings


def fuse_head(poolings: List[LayerPooling], patchsize: int, projection: Optional[Projection],
              discriminator: Discriminator, onednn: bool = False) -> FusedHead:
    """A :class:`FusedHead` on the discriminator's device from the layers' poolings (:func:`layer_poolings`),
    the projection (None for none) and the discriminator in evaluation, as they are now: build a new one after
    the weights change. ``onednn``: see :class:`FusedHead`."""
    device = discriminator.first_linear().weight.device
    weight, bias = affine_front(projection, discriminator)
    rest = discriminator.from_first_linear
    norm = discriminator.first_norm()
    if norm is not None:
        weight, bias = fold_norm(weight, bias, norm)
        rest = discriminator.from_first_norm
    kernels, mixes = [], []
    for pooling in poolings:
        mix = weight[:, pooling.rows]
        if pooling.kernel is not None:
            kernels.append(pooling.kernel)
            mixes.append(mix.float().contiguous().to(device))
        else:
            kernels.append((mix @ pooling.matrix).reshape(len(weight), -1, patchsize, patchsize))
            mixes.append(None)
    return FusedHead([kernel.float().to(device) for kernel in kernels], [p.groups for p in poolings], mixes,
                     bias.float().to(device), (patchsize - 1) // 2, rest, onednn)


class PatchMaker:
    """Cuts feature maps into ``patchsize x patchsize`` neighbourhoods and reshapes patch scores."""

    def __init__(self, patchsize: int, stride: int = 1):
        self.patchsize = patchsize
        self.stride = stride

    def patchify(self, features: torch.Tensor, return_spatial_info: bool = False
                 ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[int]]]:
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
