"""Metrics: hand-computed tiny cases, and the vectorised PRO against a slow threshold-by-threshold loop."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

import metrics


# ---------------------------------------------------------------------------------------------------------
# A slow PRO that spells out the reference's loop, one threshold at a time.
# ---------------------------------------------------------------------------------------------------------
def slow_pro(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))
    lo, hi = amaps.min(), amaps.max()
    step = (hi - lo) / num_th
    inverse = 1 - masks
    rows = []
    for th in np.arange(lo, hi, step):
        binary = (amaps > th).astype(np.uint8)
        shares = []
        for image_binary, mask in zip(binary, masks):
            grown = cv2.dilate(image_binary, kernel)
            for region in measure.regionprops(measure.label(mask)):
                ys, xs = region.coords[:, 0], region.coords[:, 1]
                shares.append(grown[ys, xs].sum() / region.area)
        false_pos = np.logical_and(inverse, binary).sum()
        rows.append((np.mean(shares), false_pos / inverse.sum()))
    pro = np.array([r[0] for r in rows])
    fpr = np.array([r[1] for r in rows])
    keep = fpr < 0.3
    pro, fpr = pro[keep], fpr[keep]
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min() + 1e-10)
    return float(skm.auc(fpr, pro))


def random_case(seed: int, n: int = 4, size: int = 32, dtype=np.float64, empty_image: bool = True):
    """Random blob masks (one image may be empty) and smooth maps that are higher on the blobs."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2.5, 2.5))
    masks = (noise > np.quantile(noise, 0.85)).astype(np.uint8)
    if empty_image:
        masks[0] = 0
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    amaps = (smooth + 0.8 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))).astype(dtype)
    return masks, amaps


# ---------------------------------------------------------------------------------------------------------
# Image- and pixel-level retrieval metrics
# ---------------------------------------------------------------------------------------------------------
def test_imagewise_perfect_and_reversed_scores():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    perfect = metrics.compute_imagewise_retrieval_metrics(scores, labels, path="eval")
    assert perfect == {"auroc": 1.0, "ap": 1.0}
    reversed_ = metrics.compute_imagewise_retrieval_metrics(-scores, labels, path="eval")
    assert reversed_["auroc"] == 0.0


def test_imagewise_hand_computed_auroc_and_ap():
    # Ranking (high to low): 1, 0, 1, 0 -> AUROC = 3 of 4 pairs ordered = 0.75; AP = (1/1 + 2/3) / 2.
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1]
    result = metrics.compute_imagewise_retrieval_metrics(scores, labels, path="eval")
    assert result["auroc"] == pytest.approx(0.75)
    assert result["ap"] == pytest.approx((1 + 2 / 3) / 2)


def test_ap_is_skipped_on_the_training_path():
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1]
    assert metrics.compute_imagewise_retrieval_metrics(scores, labels)["ap"] == 0.0
    assert metrics.compute_imagewise_retrieval_metrics(scores, labels, path="training")["ap"] == 0.0
    maps = np.array(scores, dtype=float).reshape(1, 2, 2)
    masks = np.array(labels).reshape(1, 2, 2)
    assert metrics.compute_pixelwise_retrieval_metrics(maps, masks, path="training")["ap"] == 0.0
    assert metrics.compute_pixelwise_retrieval_metrics(maps, masks, path="eval")["ap"] > 0.0


def test_pixelwise_accepts_lists_and_casts_masks_to_int():
    maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.8, 0.4], [0.0, 0.35]])]
    # 0.6 truncates to 0 (normal), 1.0 stays anomalous: anomalous pixels 0.9 and 0.8 top the ranking.
    masks = [np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.6], [0.0, 0.0]])]
    result = metrics.compute_pixelwise_retrieval_metrics(maps, masks, path="eval")
    assert result == {"auroc": 1.0, "ap": 1.0}
    stacked = metrics.compute_pixelwise_retrieval_metrics(np.stack(maps), np.stack(masks), path="eval")
    assert stacked == result


# ---------------------------------------------------------------------------------------------------------
# PRO: hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def _row_case():
    """One 8x8 image; the ground truth is row 4 (8 pixels, one region); 56 normal pixels.

    Maps: 1.0 at (4, 0), 0.6 at (4, 7), 0.3 at (0, 0) (a false positive), 0 elsewhere. With num_th = 4 the
    thresholds are 0, 0.25, 0.5, 0.75. The dilated (5x5) pixel (4, 0) covers columns 0-2 of row 4, the pixel
    (4, 7) columns 5-7:
      th 0    : pro 6/8, fp 1 -> fpr 1/56
      th 0.25 : pro 6/8, fpr 1/56
      th 0.5  : pro 6/8, fpr 0
      th 0.75 : pro 3/8, fpr 0
    Normalised fpr: [a, a, 0, 0] with a = (1/56) / (1/56 + 1e-10); area = a * 6/8 (the last step is vertical).
    """
    mask = np.zeros((1, 8, 8), dtype=np.uint8)
    mask[0, 4, :] = 1
    amap = np.zeros((1, 8, 8))
    amap[0, 4, 0] = 1.0
    amap[0, 4, 7] = 0.6
    amap[0, 0, 0] = 0.3
    return mask, amap


def test_pro_curve_hand_computed():
    mask, amap = _row_case()
    thresholds, fpr, pro = metrics.compute_pro_curve(mask, amap, num_th=4)
    np.testing.assert_array_equal(thresholds, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(pro, [0.75, 0.75, 0.75, 0.375])
    np.testing.assert_array_equal(fpr, [1 / 56, 1 / 56, 0.0, 0.0])


def test_pro_hand_computed():
    mask, amap = _row_case()
    a = (1 / 56) / (1 / 56 + 1e-10)
    assert metrics.compute_pro(mask, amap, num_th=4) == pytest.approx(0.75 * a, rel=1e-14, abs=0)


def test_pro_good_image_adds_normal_pixels_but_no_region():
    mask, amap = _row_case()
    masks = np.concatenate([mask, np.zeros_like(mask)])
    amaps = np.concatenate([amap, np.zeros_like(amap)])
    _, fpr, pro = metrics.compute_pro_curve(masks, amaps, num_th=4)
    np.testing.assert_array_equal(pro, [0.75, 0.75, 0.75, 0.375])
    np.testing.assert_array_equal(fpr, [1 / 120, 1 / 120, 0.0, 0.0])


def test_pro_mean_is_over_regions_not_pixels():
    # Two regions: a single pixel that is always covered and a 1x8 row of which 3 pixels are covered.
    mask = np.zeros((1, 8, 8), dtype=np.uint8)
    mask[0, 7, :] = 1
    mask[0, 0, 7] = 1
    amap = np.zeros((1, 8, 8))
    amap[0, 7, 0] = 1.0
    amap[0, 0, 7] = 1.0
    _, _, pro = metrics.compute_pro_curve(mask, amap, num_th=2)
    np.testing.assert_array_equal(pro, [(1.0 + 3 / 8) / 2] * 2)


def test_pro_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    amaps = rng.random((2, 8, 8))
    assert math.isnan(metrics.compute_pro(np.zeros((2, 8, 8), dtype=np.uint8), amaps))
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[1, 2:4, 2:4] = 1
    assert math.isnan(metrics.compute_pro(masks, np.full((2, 8, 8), 0.5)))
    assert not math.isnan(metrics.compute_pro(masks, amaps))


def test_pro_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.compute_pro(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError):
        metrics.compute_pro(np.zeros((8, 8)), np.zeros((8, 8)))


# ---------------------------------------------------------------------------------------------------------
# PRO: vectorised == slow loop
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pro_matches_slow_loop_on_random_maps(seed, dtype):
    masks, amaps = random_case(seed, dtype=dtype)
    assert metrics.compute_pro(masks, amaps) == slow_pro(masks, amaps)


def test_pro_matches_slow_loop_with_ties_on_thresholds():
    # Integer-valued maps with num_th = 10: every threshold 0..9 equals many map values, so `>` vs `>=` matters.
    masks, amaps = random_case(3)
    rng = np.random.default_rng(3)
    amaps = np.clip(np.round(amaps * 4 + 5 + rng.integers(-1, 2, size=amaps.shape)), 0, 10)
    assert metrics.compute_pro(masks, amaps, num_th=10) == slow_pro(masks, amaps, num_th=10)
    plateau = amaps.astype(np.float32) / 10
    assert metrics.compute_pro(masks, plateau, num_th=17) == slow_pro(masks, plateau, num_th=17)


def test_pro_matches_slow_loop_with_fractional_and_bool_masks():
    masks, amaps = random_case(4, empty_image=False)
    # Bilinear-resized masks carry fractional edges; the reference truncates them in labelling.
    soft = np.clip(ndimage.uniform_filter(masks.astype(np.float32), size=(1, 3, 3)) * 1.5, 0, 1)
    assert metrics.compute_pro(soft, amaps) == slow_pro(soft, amaps)
    assert metrics.compute_pro(masks.astype(bool), amaps) == slow_pro(masks, amaps)


def test_pro_matches_slow_loop_at_a_realistic_size():
    masks, amaps = random_case(5, n=3, size=64, dtype=np.float32)
    assert metrics.compute_pro(masks, amaps) == slow_pro(masks, amaps)


def test_pro_false_positive_rate_sums_float32_masks_in_float64_as_the_reference():
    # The reference gathers the resized masks with .tolist(), so its FPR denominator (1 - masks).sum() is a
    # float64 sum; over many fractional float32 mask pixels a float32 sum gives other last bits.
    masks, amaps = random_case(6, n=4, size=256, dtype=np.float32, empty_image=False)
    soft = np.clip(ndimage.uniform_filter(masks.astype(np.float32), size=(1, 5, 5)) * 1.3, 0, 1).astype(np.float32)
    assert (1 - soft).sum() != (1 - soft.astype(np.float64)).sum()  # the case tells the two sums apart
    _, fpr, _ = metrics.compute_pro_curve(soft, amaps)
    _, fpr64, _ = metrics.compute_pro_curve(soft.astype(np.float64), amaps)
    assert np.array_equal(fpr, fpr64)
    assert metrics.compute_pro(soft, amaps) == slow_pro(soft.astype(np.float64), amaps)


# ---------------------------------------------------------------------------------------------------------
# Best threshold
# ---------------------------------------------------------------------------------------------------------
def test_best_threshold_separates_perfectly_separable_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.9])
    threshold, precision, recall = metrics.compute_best_pr_re(labels, scores)
    assert (threshold, precision, recall) == (0.6, 1.0, 1.0)
    assert metrics.compute_best_threshold(labels, scores) == 0.6


def test_best_threshold_hand_computed_f1():
    # Thresholds 0.9 (P 1, R 1/2, F1 2/3), 0.8 (P 1/2, R 1/2), 0.5 (P 2/3, R 1, F1 0.8), 0.1 (P 1/2, R 1, F1 2/3).
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.5, 0.1]
    threshold, precision, recall = metrics.compute_best_pr_re(labels, scores)
    assert threshold == 0.5
    assert precision == pytest.approx(2 / 3)
    assert recall == 1.0


# ---- ROC AUC without scikit-learn's argsort -------------------------------------------------------

def test_roc_auc_hand_computed():
    # Positive 0.35 beats one of two negatives, positive 0.8 beats both: (1 + 2) / 4.
    assert metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # A tie between a positive and a negative counts one half.
    assert metrics.roc_auc(np.array([0, 1, 0, 1]), np.array([0.2, 0.2, 0.1, 0.9])) == 0.875
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [None, 7, 200])  # continuous scores, or few / many tied values
def test_roc_auc_has_the_bits_of_scikit_learn(seed, dtype, levels):
    rng = np.random.default_rng(seed)
    scores = rng.random(30_000).astype(dtype)
    if levels is not None:
        scores = (np.round(scores * levels) / levels).astype(dtype)
    labels = (rng.random(scores.size) < 0.03 + 0.2 * scores).astype(int)
    assert metrics.roc_auc(labels, scores) == skm.roc_auc_score(labels, scores)


def test_roc_auc_has_the_bits_of_scikit_learn_on_real_masks(tire_root):
    """Real tire ground truth, maps that are a blurred, noisy copy of it (what an evaluation looks like)."""
    paths = sorted((tire_root / "tire" / "ground_truth").glob("*/*.png"))[::10]
    masks = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (128, 128)) for p in paths]) / 255.0
    rng = np.random.default_rng(0)
    maps = np.stack([ndimage.gaussian_filter(m, 4) for m in masks]).astype(np.float32)
    maps += rng.normal(0, 0.05, maps.shape).astype(np.float32)
    labels = masks.astype(int).ravel()
    assert 0 < labels.sum() < labels.size
    assert metrics.roc_auc(labels, maps.ravel()) == skm.roc_auc_score(labels, maps.ravel())
    assert metrics.compute_pixelwise_retrieval_metrics(maps, masks)["auroc"] == skm.roc_auc_score(labels, maps.ravel())


def test_roc_auc_one_class_is_nan_as_in_scikit_learn():
    with pytest.warns(Warning):
        assert math.isnan(metrics.roc_auc(np.zeros(5, dtype=int), np.arange(5.0)))


def test_pro_of_maps_that_never_cover_a_defect_is_a_plain_zero():
    # The defect lies where the map is lowest: no threshold covers it before the FPR limit. The area of the
    # decreasing FPR curve comes out as -0.0, which would print as -0.00.
    masks = np.zeros((2, 16, 16))
    masks[0, 4:8, 4:8] = 1
    amaps = np.random.RandomState(0).rand(2, 16, 16)
    amaps[0, 2:10, 2:10] = -1
    pro = metrics.compute_pro(masks, amaps)
    assert pro == 0.0 and math.copysign(1.0, pro) == 1.0


def test_pro_keeps_only_thresholds_with_false_positive_rate_strictly_below_0_3():
    """Thresholds 0, .25, .5, .75 (num_th 4) give FPR .3, .3, .2, 0 over 20 normal pixels; .3 itself is cut off."""
    masks = np.zeros((2, 1, 12), dtype=np.float32)
    masks[:, 0, :2] = 1
    amaps = np.zeros((2, 1, 12), dtype=np.float32)
    amaps[0, 0, :2] = 1.0     # region A: covered at every threshold
    amaps[0, 0, 4:8] = 0.6    # normal pixels above .5
    amaps[0, 0, 8:10] = 0.3   # normal pixels above 0 and .25 only
    amaps[1, 0, :2] = 0.4     # region B: covered at 0 and .25 only
    # Kept: (FPR .2, PRO .5) and (0, .5); normalised FPR [1, 0]: area 0.5. With FPR <= .3 it would be 0.5833.
    assert metrics.compute_pro(masks, amaps, num_th=4) == pytest.approx(0.5, abs=1e-9)


def test_best_f1_point_is_not_the_best_precision_times_recall():
    # Scores 30..1; 10 anomalies. Top 13 (threshold 18): P 8/13, R .8, F1 .696; top 5 (threshold 26): P 1, R .5,
    # F1 .667 but the larger P * R (.5 against .492).
    labels = [1] * 5 + [0] * 5 + [1] * 3 + [0] * 15 + [1] * 2
    scores = list(range(30, 0, -1))
    threshold, precision, recall = metrics.compute_best_pr_re(labels, scores)
    assert (threshold, precision, recall) == (18.0, pytest.approx(8 / 13), pytest.approx(0.8))


def test_best_f1_ties_go_to_the_lowest_threshold():
    # Threshold 4: P 1, R .5; threshold 1: P .5, R 1: the same F1 (2/3), above thresholds 3 and 2 (.5 and .4).
    assert metrics.compute_best_pr_re([1, 0, 0, 1], [4, 3, 2, 1]) == (1.0, 0.5, 1.0)
