"""Perlin-noise masks for local anomaly synthesis (LAS).

The masks say where a texture is blended into a normal training image. Randomness follows the
reference: NumPy's global generator draws the noise scales, the gradient angles and the rotation
angles; torch's global generator draws the choice between union, intersection and a single map.

Differences from the reference, both documented where they happen:
  * the noise is rotated with ``cv2.warpAffine`` instead of imgaug (which needs NumPy 1), so the
    rotation angle comes from NumPy's generator rather than imgaug's own;
  * shapes that are not a multiple of the noise resolution work (the reference crashes there).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import cv2
import numpy as np
import torch


# A thresholded noise map keeps the points where the noise exceeds this value.
NOISE_THRESHOLD = 0.5
# Rotation of each noise map, drawn uniformly from this range (degrees).
ROTATION_RANGE = (-90.0, 90.0)


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolation curve 6t^5 - 15t^4 + 10t^3."""
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Linear interpolation from ``a`` (w = 0) to ``b`` (w = 1)."""
    return (b - a) * w + a


def rand_perlin_2d_np(
    shape: Sequence[int],
    res: Sequence[int],
    fade: Callable[[np.ndarray], np.ndarray] = _fade,
) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis.

    One random gradient direction per lattice corner (angles ``2 pi U[0, 1)`` from
    ``np.random.rand(res[0] + 1, res[1] + 1)``); each pixel blends the four corner dot products
    with the ``fade`` curve; the result is scaled by sqrt(2), so it lies in about [-1, 1].

    When a side is not a multiple of its resolution, the noise is generated on the next larger
    multiple and the top-left ``shape`` is returned (the reference fails there). For sides that
    are multiples the result equals the reference's.

    Args:
        shape: (rows, columns) of the output.
        res: lattice cells along (rows, columns); each at least 1.
        fade: interpolation curve applied to the in-cell coordinates.

    Returns:
        float64 array of ``shape``.
    """
    rows, cols = int(shape[0]), int(shape[1])
    res_r, res_c = int(res[0]), int(res[1])
    if rows < 1 or cols < 1 or res_r < 1 or res_c < 1:
        raise ValueError(f"shape {tuple(shape)} and res {tuple(res)} must be positive")
    cell_r, cell_c = math.ceil(rows / res_r), math.ceil(cols / res_c)  # pixels per lattice cell
    padded_r, padded_c = cell_r * res_r, cell_c * res_c

    # In-cell coordinates in [0, 1): pixel i sits at i * res / size lattice units.
    frac_r = (np.arange(padded_r) * (res_r / padded_r) % 1)[:rows]
    frac_c = (np.arange(padded_c) * (res_c / padded_c) % 1)[:cols]
    idx_r = (np.arange(padded_r) // cell_r)[:rows]
    idx_c = (np.arange(padded_c) // cell_c)[:cols]

    angles = 2 * math.pi * np.random.rand(res_r + 1, res_c + 1)
    cos_g, sin_g = np.cos(angles), np.sin(angles)  # each corner's gradient (x, y)

    fr = frac_r[:, None]
    fc = frac_c[None, :]

    def corner(dr: int, dc: int) -> np.ndarray:
        """Dot product of each pixel's offset from corner (+dr, +dc) with that corner's gradient."""
        rows_at, cols_at = idx_r + dr, idx_c + dc
        return (fr - dr) * cos_g[rows_at][:, cols_at] + (fc - dc) * sin_g[rows_at][:, cols_at]

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    # The fade weights depend on the row (column) alone: computed once per row (column), broadcast by the blend.
    t_r, t_c = fade(fr), fade(fc)
    return math.sqrt(2) * _lerp(_lerp(n00, n10, t_r), _lerp(n01, n11, t_r), t_c)


def _rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the image centre by ``angle`` degrees: bilinear, zero outside."""
    rows, cols = image.shape
    matrix = cv2.getRotationMatrix2D(((cols - 1) / 2.0, (rows - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(
        image, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def generate_thr(img_shape: Sequence[int], min_scale: int = 0, max_scale: int = 6) -> np.ndarray:
    """One thresholded, rotated Perlin map for an image of ``img_shape`` (C, H, W).

    Scales ``2 ** randint(min_scale, max_scale)`` are drawn independently for rows and columns;
    the noise is rotated by ``U(-90, 90)`` degrees about the centre and thresholded at 0.5.

    Returns:
        float64 array (H, W) of 0s and 1s.
    """
    scale_r = 2 ** np.random.randint(min_scale, max_scale)
    scale_c = 2 ** np.random.randint(min_scale, max_scale)
    noise = rand_perlin_2d_np((img_shape[1], img_shape[2]), (scale_r, scale_c))
    noise = _rotate(noise, float(np.random.uniform(*ROTATION_RANGE)))
    return np.where(noise > NOISE_THRESHOLD, 1.0, 0.0)


def perlin_mask(
    img_shape: Sequence[int],
    feat_size: int,
    min_scale: int,
    max_scale: int,
    mask_fg: Union[torch.Tensor, np.ndarray],
    flag: int = 0,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """The LAS mask of an image: full resolution and pooled onto the feature grid.

    Repeats until the pooled mask has a point: draw two thresholded maps; with ``u = torch.rand(1)``
    take their union (u > 2/3), their intersection (1/3 < u <= 2/3) or the first alone; keep it
    inside the foreground ``mask_fg``; max-pool by ``(H // feat_size, W // feat_size)``.

    Args:
        img_shape: (C, H, W) of the image.
        feat_size: side of the feature grid (image size / downsampling).
        min_scale, max_scale: noise scales are ``2 ** randint(min_scale, max_scale)``.
        mask_fg: foreground mask (H, W) of 0/1, or ``torch.tensor([1])`` for no foreground mask.
        flag: 0 returns ``mask_s``; anything else returns ``(mask_s, mask_l)``.

    Returns:
        ``mask_s``: float32 array (H // ratio_y, W // ratio_x), i.e. (feat_size, feat_size) when the
        image side is a multiple of it; ``mask_l``: float64 array (H, W), the full-resolution mask.

    Raises:
        ValueError: the foreground mask leaves no pooled cell (the loop would never end).
    """
    height, width = int(img_shape[1]), int(img_shape[2])
    ratio = (height // feat_size, width // feat_size)
    if ratio[0] < 1 or ratio[1] < 1:
        raise ValueError(f"feature grid {feat_size} is larger than the image ({height}x{width})")
    fg = torch.as_tensor(mask_fg)
    if fg.numel() > 1 or float(fg.max()) <= 0:
        pooled_fg = torch.nn.functional.max_pool2d(
            torch.broadcast_to(fg.double(), (height, width))[None, None], ratio
        )
        if float(pooled_fg.max()) <= 0:
            raise ValueError("the foreground mask is empty: no place to synthesise an anomaly")

    while True:
        thr_1 = generate_thr(img_shape, min_scale, max_scale)
        thr_2 = generate_thr(img_shape, min_scale, max_scale)
        choice = torch.rand(1).numpy()[0]
        if choice > 2 / 3:
            thr = np.where(thr_1 + thr_2 > 0, 1.0, 0.0)  # union
        elif choice > 1 / 3:
            thr = thr_1 * thr_2  # intersection
        else:
            thr = thr_1
        mask_l = torch.from_numpy(thr) * fg
        mask_s = torch.nn.functional.max_pool2d(mask_l[None, None], ratio).float()[0, 0]
        if float(mask_s.max()) != 0:
            break
    if flag == 0:
        return mask_s.numpy()
    return mask_s.numpy(), mask_l.numpy()
