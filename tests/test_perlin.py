"""Perlin masks for LAS: the noise itself, thresholding, the union/intersection/first choice, pooling."""
import math

import cv2
import numpy as np
import pytest
import torch

import perlin
from perlin import generate_thr, perlin_mask, rand_perlin_2d_np


def naive_perlin(shape, res, angles):
    """Textbook Perlin noise, one pixel at a time, for given corner gradient angles."""
    rows, cols = shape
    cell_r, cell_c = rows // res[0], cols // res[1]
    out = np.zeros(shape)
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3
    for i in range(rows):
        for j in range(cols):
            r0, c0 = i // cell_r, j // cell_c
            u, v = (i % cell_r) / cell_r, (j % cell_c) / cell_c

            def dot(dr, dc):
                a = angles[r0 + dr, c0 + dc]
                return (u - dr) * math.cos(a) + (v - dc) * math.sin(a)

            fu, fv = fade(u), fade(v)
            top = dot(0, 0) + fu * (dot(1, 0) - dot(0, 0))
            bottom = dot(0, 1) + fu * (dot(1, 1) - dot(0, 1))
            out[i, j] = math.sqrt(2) * (top + fv * (bottom - top))
    return out


def test_noise_matches_the_textbook_formula():
    np.random.seed(3)
    noise = rand_perlin_2d_np((12, 18), (3, 2))
    np.random.seed(3)
    angles = 2 * math.pi * np.random.rand(4, 3)
    assert noise.shape == (12, 18)
    np.testing.assert_allclose(noise, naive_perlin((12, 18), (3, 2), angles), atol=1e-12)
    # Zero on the lattice points, bounded by 1.
    assert np.all(noise[::4, ::9] == 0)
    assert np.abs(noise).max() <= 1.0


def gathered_perlin(shape, res):
    """The noise as this module computed it before its speed-up: the corner gradients gathered as (x, y) pairs
    for every pixel and the fade curve evaluated at every pixel. The faster version must give its bits."""
    rows, cols = shape
    cell_r, cell_c = math.ceil(rows / res[0]), math.ceil(cols / res[1])
    padded_r, padded_c = cell_r * res[0], cell_c * res[1]
    frac_r = (np.arange(padded_r) * (res[0] / padded_r) % 1)[:rows]
    frac_c = (np.arange(padded_c) * (res[1] / padded_c) % 1)[:cols]
    idx_r = (np.arange(padded_r) // cell_r)[:rows]
    idx_c = (np.arange(padded_c) // cell_c)[:cols]
    angles = 2 * math.pi * np.random.rand(res[0] + 1, res[1] + 1)
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    fr, fc = frac_r[:, None], frac_c[None, :]

    def corner(dr, dc):
        grad = gradients[(idx_r + dr)[:, None], (idx_c + dc)[None, :]]
        return (fr - dr) * grad[..., 0] + (fc - dc) * grad[..., 1]

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    t_r = perlin._fade(np.broadcast_to(fr, (rows, cols)))
    t_c = perlin._fade(np.broadcast_to(fc, (rows, cols)))
    lerp = lambda a, b, w: (b - a) * w + a
    return math.sqrt(2) * lerp(lerp(n00, n10, t_r), lerp(n01, n11, t_r), t_c)


@pytest.mark.parametrize("shape,res", [((128, 128), (1, 1)), ((128, 128), (32, 4)), ((128, 128), (2, 16)),
                                       ((288, 288), (32, 32)), ((30, 45), (4, 8)), ((127, 200), (16, 2))])
def test_noise_keeps_the_bits_of_the_per_pixel_gather(shape, res):
    np.random.seed(11)
    fast = rand_perlin_2d_np(shape, res)
    after_fast = np.random.rand()
    np.random.seed(11)
    slow = gathered_perlin(shape, res)
    np.testing.assert_array_equal(fast, slow)
    assert np.random.rand() == after_fast  # the same draws from the generator


def test_non_divisible_shape_is_the_crop_of_the_next_multiple():
    np.random.seed(0)
    small = rand_perlin_2d_np((30, 45), (4, 8))
    np.random.seed(0)
    padded = rand_perlin_2d_np((32, 48), (4, 8))
    assert small.shape == (30, 45)
    np.testing.assert_array_equal(small, padded[:30, :45])


def test_thresholded_map_is_binary_with_the_image_size():
    np.random.seed(1)
    thr = generate_thr((3, 40, 56), 0, 6)
    assert thr.shape == (40, 56)
    assert set(np.unique(thr)) <= {0.0, 1.0}


def test_thresholded_map_is_the_noise_rotated_by_a_uniform_angle_above_one_half():
    # Replays the spec's draws (two scale exponents in [0, 6), the noise, an angle U(-90, 90)) by hand.
    for seed in range(5):
        np.random.seed(seed)
        scales = (2 ** np.random.randint(0, 6), 2 ** np.random.randint(0, 6))
        noise = perlin.rand_perlin_2d_np((40, 56), scales)
        angle = np.random.uniform(-90.0, 90.0)
        turn = cv2.getRotationMatrix2D((55 / 2.0, 39 / 2.0), angle, 1.0)  # about the centre, zeros outside
        expected = cv2.warpAffine(noise, turn, (56, 40), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) > 0.5
        np.random.seed(seed)
        assert np.array_equal(generate_thr((3, 40, 56), 0, 6), expected.astype(np.float64)), seed


def test_noise_scales_are_the_powers_of_two_below_64_per_axis(monkeypatch):
    """Spec: scales 2^[0, 6) drawn independently for each axis: 1 to 32, never 64."""
    drawn = []

    def noise(shape, res):
        drawn.append(tuple(res))
        return np.zeros(shape)
    monkeypatch.setattr(perlin, "rand_perlin_2d_np", noise)
    np.random.seed(0)
    for _ in range(300):
        generate_thr((3, 8, 8), 0, 6)
    assert {r for r, _ in drawn} == {c for _, c in drawn} == {1, 2, 4, 8, 16, 32}
    assert len(set(drawn)) > 20  # not the same scale for both axes


def test_threshold_keeps_only_noise_above_one_half(monkeypatch):
    monkeypatch.setattr(perlin, "_rotate", lambda image, angle: image)
    for value, expected in ((0.5, 0.0), (np.nextafter(0.5, 1), 1.0), (0.3, 0.0)):
        monkeypatch.setattr(perlin, "rand_perlin_2d_np", lambda shape, res: np.full(shape, value))
        assert np.array_equal(generate_thr((3, 6, 4), 0, 6), np.full((6, 4), expected)), value


def test_rotation_fills_with_zeros():
    rotated = perlin._rotate(np.ones((21, 21)), 45.0)
    assert rotated[10, 10] == pytest.approx(1.0)
    assert rotated[0, 0] == 0 and rotated[-1, -1] == 0


@pytest.mark.parametrize("shape,feat", [((3, 64, 64), 8), ((3, 96, 96), 12), ((3, 100, 100), 12), ((3, 48, 80), 6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_shapes_binary_pooled_and_non_empty(shape, feat, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    mask_s, mask_l = perlin_mask(shape, feat, 0, 6, torch.tensor([1]), flag=1)
    ratio = (shape[1] // feat, shape[2] // feat)
    assert mask_l.shape == shape[1:]
    assert mask_s.shape == (shape[1] // ratio[0], shape[2] // ratio[1])
    assert mask_s.dtype == np.float32
    assert set(np.unique(mask_l)) <= {0.0, 1.0}
    assert mask_s.max() == 1.0
    pooled = torch.nn.functional.max_pool2d(torch.from_numpy(mask_l)[None, None], ratio)[0, 0].float().numpy()
    np.testing.assert_array_equal(mask_s, pooled)


def test_flag_zero_returns_only_the_pooled_mask():
    np.random.seed(0)
    torch.manual_seed(0)
    mask_s = perlin_mask((3, 32, 32), 4, 0, 6, torch.tensor([1]))
    assert isinstance(mask_s, np.ndarray) and mask_s.shape == (4, 4)


def test_same_seeds_same_masks():
    out = []
    for _ in range(2):
        np.random.seed(7)
        torch.manual_seed(7)
        out.append(perlin_mask((3, 64, 64), 8, 0, 6, torch.tensor([1]), flag=1))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def _scripted(monkeypatch, maps, draws):
    """Make generate_thr return ``maps`` in turn and torch.rand return ``draws`` in turn."""
    maps, draws = list(maps), list(draws)
    monkeypatch.setattr(perlin, "generate_thr", lambda *a, **k: maps.pop(0))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([draws.pop(0)]))
    return maps, draws


LEFT = np.zeros((16, 16))
LEFT[:, :8] = 1
TOP = np.zeros((16, 16))
TOP[:8, :] = 1


@pytest.mark.parametrize("draw,expected", [
    (0.9, np.maximum(LEFT, TOP)),  # u > 2/3: union
    (0.5, LEFT * TOP),             # 1/3 < u <= 2/3: intersection
    (0.2, LEFT),                   # u <= 1/3: the first map alone
    (0.65, LEFT * TOP),
    (2 / 3, LEFT * TOP),           # the boundaries (as float32 draws) belong to the lower choice
    (1 / 3, LEFT),
])
def test_union_intersection_or_first(monkeypatch, draw, expected):
    _scripted(monkeypatch, [LEFT, TOP], [draw])
    mask_s, mask_l = perlin_mask((3, 16, 16), 4, 0, 6, torch.tensor([1]), flag=1)
    np.testing.assert_array_equal(mask_l, expected)
    np.testing.assert_array_equal(mask_s, expected[::4, ::4])


def test_redraws_until_the_mask_is_non_empty(monkeypatch):
    bottom_right = np.zeros((16, 16))
    bottom_right[8:, 8:] = 1
    # First round: disjoint maps intersected -> empty; second round: the first map alone.
    maps, draws = _scripted(monkeypatch, [TOP, bottom_right, bottom_right, TOP], [0.5, 0.1])
    _, mask_l = perlin_mask((3, 16, 16), 4, 0, 6, torch.tensor([1]), flag=1)
    assert maps == [] and draws == []
    np.testing.assert_array_equal(mask_l, bottom_right)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_foreground_mask_zeroes_the_outside(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    fg = torch.zeros(64, 64)
    fg[:, :24] = 1
    mask_s, mask_l = perlin_mask((3, 64, 64), 8, 0, 6, fg, flag=1)
    assert mask_l[:, 24:].max() == 0
    assert mask_s[:, 3:].max() == 0 and mask_s.max() == 1


def test_empty_foreground_raises_instead_of_looping():
    with pytest.raises(ValueError, match="foreground"):
        perlin_mask((3, 32, 32), 4, 0, 6, torch.zeros(32, 32), flag=1)


def test_foreground_outside_the_pooled_cells_counts_as_empty(monkeypatch):
    # 100 px on a 12-cell grid: pooling by 8 covers the first 96 rows and columns only; a foreground in the rest
    # could never give a non-empty pooled mask (the draws are limited so that a loop fails instead of hanging).
    draws = []
    monkeypatch.setattr(perlin, "generate_thr", lambda *args: draws.append(1) if len(draws) < 100 else pytest.fail("endless redraws"))
    fg = torch.zeros(100, 100)
    fg[96:, :] = 1
    with pytest.raises(ValueError, match="foreground"):
        perlin_mask((3, 100, 100), 12, 0, 6, fg, flag=1)
