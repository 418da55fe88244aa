"""Evaluation metrics: image/pixel AUROC and AP, and the per-region overlap (PRO) score.

All functions are pure functions of arrays. The semantics follow the GLASS reference:

* AP is skipped (reported as 0.0) while evaluating during training (``path == "training"``).
* PRO uses ``num_th`` thresholds ``np.arange(min, max, (max - min) / num_th)`` over the anomaly maps.
  At each threshold ``th`` the maps are binarised with ``amap > th``; every binary map is dilated with a
  5x5 rectangle (OpenCV border handling: outside pixels never add ones); the per-region overlap of a
  ground-truth connected component is the share of its pixels covered by the dilated map, and ``pro(th)``
  is the mean over all components of all images. The false-positive rate uses the *undilated* maps.
  Rows with ``fpr < 0.3`` are kept, ``fpr`` is min-max normalised (``+ 1e-10`` in the denominator) and the
  area under ``pro(fpr)`` is the trapezoid area.

The PRO here is vectorised: dilating ``amap > th`` with a 5x5 rectangle equals ``maxfilter5x5(amap) > th``,
so each pixel only needs to know how many thresholds lie strictly below its (max-filtered) value; per-region
coverage and false-positive counts for all thresholds then follow from one ``searchsorted`` and
histogram/cumulative sums. The result is identical to the threshold loop, including ties.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

LOGGER = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Sequence[np.ndarray]]

PRO_FPR_LIMIT = 0.3
PRO_DILATION_SIZE = 5
PRO_NORM_EPS = 1e-10


def _flatten(values: ArrayLike) -> np.ndarray:
    """One flat array from an array or a list of arrays (C order, items one after the other)."""
    if isinstance(values, (list, tuple)):
        if len(values) == 0:
            return np.zeros((0,))
        return np.concatenate([np.ravel(np.asarray(v)) for v in values])
    return np.ravel(np.asarray(values))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of binary ``labels`` (0/1) against ``scores``, bit-identical to ``sklearn.metrics.roc_auc_score``.

    scikit-learn sorts every score with its label (a stable argsort: most of the time of an evaluation's
    pixel AUROC over ~10^6 pixels). Its ROC points are fixed by two counts per distinct score ``v``: the
    scores >= v and the positive scores >= v. Those follow from a plain sort of all scores and one of the
    positives, which is several times faster. The points are then thinned, normalised and integrated exactly
    as scikit-learn does (same operations, same order), so the area has the same bits; a test holds the two
    equal. Anything else (labels not 0/1, one class only, non-finite scores) goes to scikit-learn itself.
    """
    labels, scores = np.ravel(labels), np.ravel(scores)
    positive = labels == 1
    n_pos = int(positive.sum())
    if (labels.shape != scores.shape or n_pos in (0, labels.size) or n_pos + int((labels == 0).sum()) != labels.size
            or not np.isfinite(scores).all()):
        return float(skm.roc_auc_score(labels, scores))
    ascending = np.sort(scores)
    starts = np.flatnonzero(np.concatenate(([True], ascending[1:] != ascending[:-1])))  # first of each value
    # Thresholds from the highest score down, as scikit-learn walks them.
    at_or_above = (ascending.size - starts)[::-1].astype(np.float64)
    tps = (n_pos - np.searchsorted(np.sort(scores[positive]), ascending[starts][::-1], side="left")).astype(np.float64)
    fps = at_or_above - tps
    if fps.shape[0] > 2:  # drop the collinear points (roc_curve's drop_intermediate)
        corners = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.concatenate(([True], corners, [True])))
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.concatenate(([0.0], fps)), np.concatenate(([0.0], tps))
    return float(skm.auc(fps / fps[-1], tps / tps[-1]))


def compute_imagewise_retrieval_metrics(
    anomaly_prediction_weights: ArrayLike, anomaly_ground_truth_labels: ArrayLike, path: str = "training"
) -> Dict[str, float]:
    """Image-level AUROC and average precision.

    Args:
        anomaly_prediction_weights: one anomaly score per image (higher = more anomalous).
        anomaly_ground_truth_labels: one label per image (1 anomalous, 0 good); both classes must occur.
        path: ``"training"`` (per-epoch evaluation) skips AP and reports it as 0.0, as the reference does;
            any other value (e.g. ``"eval"``) computes it.

    Returns:
        ``{"auroc": float, "ap": float}``.
    """
    scores = _flatten(anomaly_prediction_weights)
    labels = _flatten(anomaly_ground_truth_labels)
    auroc = roc_auc(labels, scores)
    ap = 0.0 if path == "training" else float(skm.average_precision_score(labels, scores))
    return {"auroc": auroc, "ap": ap}


def compute_pixelwise_retrieval_metrics(
    anomaly_segmentations: ArrayLike, ground_truth_masks: ArrayLike, path: str = "training"
) -> Dict[str, float]:
    """Pixel-level AUROC and average precision over all pixels of all images.

    Args:
        anomaly_segmentations: anomaly maps, an array or a list of arrays (any shapes; flattened in order).
        ground_truth_masks: masks of the same total size, flattened the same way and cast to int as the
            reference does (so a fractional value below 1 counts as normal); both classes must occur.
        path: ``"training"`` reports AP as 0.0 (skipped); any other value computes it.

    Returns:
        ``{"auroc": float, "ap": float}``.
    """
    flat_maps = _flatten(anomaly_segmentations)
    flat_masks = _flatten(ground_truth_masks).astype(int)
    if flat_maps.shape != flat_masks.shape:
        raise ValueError(f"{flat_maps.size} map pixels but {flat_masks.size} mask pixels")
    auroc = roc_auc(flat_masks, flat_maps)
    ap = 0.0 if path == "training" else float(skm.average_precision_score(flat_masks, flat_maps))
    return {"auroc": auroc, "ap": ap}


def pro_thresholds(amaps: np.ndarray, num_th: int = 200) -> np.ndarray:
    """The reference's PRO thresholds: ``np.arange(min, max, (max - min) / num_th)``.

    Args:
        amaps: anomaly maps; min, max and step keep their dtype, exactly as in the reference.
        num_th: number of steps between the minimum and the maximum.

    Returns:
        Increasing thresholds (about ``num_th`` of them; empty when the maps are constant or hold NaN).
    """
    min_th = amaps.min()
    max_th = amaps.max()
    if not max_th > min_th:
        return np.zeros((0,), dtype=np.result_type(amaps.dtype, np.float64))
    delta = (max_th - min_th) / num_th
    return np.arange(min_th, max_th, delta)


def _counts_above(values: np.ndarray, thresholds: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """For every group g and threshold t: how many of the group's values are ``> thresholds[t]``.

    Args:
        values: (P,) values; compared to ``thresholds`` in their common dtype, like ``array > scalar``.
        thresholds: (T,) non-decreasing thresholds.
        groups: (P,) group index of every value, in ``[0, num_groups)``.
        num_groups: number of groups.

    Returns:
        (num_groups, T) int64 counts.
    """
    common = np.result_type(values.dtype, thresholds.dtype)
    num_t = len(thresholds)
    # Number of thresholds strictly below each value: the value exceeds exactly thresholds[:below].
    below = np.searchsorted(thresholds.astype(common, copy=False), values.astype(common, copy=False), side="left")
    hist = np.bincount(groups * (num_t + 1) + below, minlength=num_groups * (num_t + 1))
    hist = hist.reshape(num_groups, num_t + 1)
    # counts[:, t] = sum_{j > t} hist[:, j]
    tail = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    return tail[:, 1:]


def _check_pro_inputs(masks: np.ndarray, amaps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Arrays of shape (N, H, W) with matching shapes; bool masks become uint8."""
    masks = np.asarray(masks)
    amaps = np.asarray(amaps)
    if masks.dtype == bool:
        masks = masks.astype(np.uint8)
    if amaps.ndim != 3 or masks.shape != amaps.shape:
        raise ValueError(f"PRO needs masks and maps of one shape (N, H, W), got {masks.shape} and {amaps.shape}")
    return masks, amaps


def compute_pro_curve(masks: ArrayLike, amaps: ArrayLike, num_th: int = 200) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO and false-positive rate at every reference threshold (before the FPR < 0.3 cut).

    Ground-truth regions are the connected components of ``skimage.measure.label(mask)`` per image (default
    8-connectivity for 2-D; float masks are truncated to int as skimage does, so only pixels equal to 1 belong
    to a region). Normal pixels are those where ``1 - mask`` is non-zero, and the FPR denominator is
    ``(1 - masks).sum()``, as in the reference; for binary masks this is ``count(mask == 0)``.

    Args:
        masks: (N, H, W) ground-truth masks with values in [0, 1] (bool, int or float).
        amaps: (N, H, W) anomaly maps (float; their dtype sets the thresholds' precision).
        num_th: number of threshold steps.

    Returns:
        ``(thresholds, fpr, pro)``, each of shape (T,). ``pro`` is NaN when there is no ground-truth region,
        ``fpr`` is NaN when there is no normal pixel.
    """
    masks, amaps = _check_pro_inputs(masks, amaps)
    thresholds = pro_thresholds(amaps, num_th)
    num_t = len(thresholds)

    # Per-region coverage of the dilated maps: dilate(a > th) == (maxfilter(a) > th).
    dilated = ndimage.maximum_filter(amaps, size=(1, PRO_DILATION_SIZE, PRO_DILATION_SIZE), mode="nearest")
    region_values: List[np.ndarray] = []
    region_ids: List[np.ndarray] = []
    areas: List[np.ndarray] = []
    num_regions = 0
    for image_dilated, mask in zip(dilated, masks):
        labels = measure.label(mask)
        count = int(labels.max())
        if count == 0:
            continue
        inside = labels > 0
        region_values.append(image_dilated[inside])
        region_ids.append(labels[inside].astype(np.int64) - 1 + num_regions)
        areas.append(np.bincount(labels[inside], minlength=count + 1)[1:].astype(np.float64))
        num_regions += count

    if num_regions > 0:
        covered = _counts_above(
            np.concatenate(region_values), thresholds, np.concatenate(region_ids), num_regions
        )
        shares = covered / np.concatenate(areas)[:, None]
        # Mean over regions along a contiguous axis: the same pairwise summation as np.mean of a list.
        pro = np.mean(np.ascontiguousarray(shares.T), axis=1)
    else:
        pro = np.full(num_t, np.nan)

    # False-positive rate on the undilated maps.
    # In float64, as the reference's masks are (it gathers them with .tolist()); a float32 sum of bilinearly
    # resized masks differs in its last bits, and uint8 masks would wrap below zero.
    inverse_masks = 1 - masks.astype(np.float64)
    normal = inverse_masks != 0
    normal_values = amaps[normal]
    false_pos = _counts_above(normal_values, thresholds, np.zeros(normal_values.shape, dtype=np.int64), 1)[0]
    denominator = inverse_masks.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = false_pos / denominator
    return thresholds, np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)


def compute_pro(masks: ArrayLike, amaps: ArrayLike, num_th: int = 200) -> float:
    """Area under the PRO curve up to FPR 0.3, with the FPR axis min-max normalised (reference PRO).

    Args:
        masks: (N, H, W) ground-truth masks with values in [0, 1].
        amaps: (N, H, W) anomaly maps.
        num_th: number of threshold steps.

    Returns:
        The PRO score. NaN (the caller reports "n/a") when it is undefined: no ground-truth region in any
        mask, no normal pixel, constant (or NaN-holding) maps, or fewer than two thresholds with FPR < 0.3
        (where the reference's ``auc`` would raise).
    """
    thresholds, fpr, pro = compute_pro_curve(masks, amaps, num_th)
    if len(thresholds) == 0:
        LOGGER.warning("PRO undefined: the anomaly maps are constant or hold NaN")
        return float("nan")
    if np.isnan(pro).all():
        LOGGER.warning("PRO undefined: no ground-truth anomalous region")
        return float("nan")
    keep = fpr < PRO_FPR_LIMIT
    if keep.sum() < 2:
        LOGGER.warning("PRO undefined: fewer than two thresholds with FPR < %s", PRO_FPR_LIMIT)
        return float("nan")
    fpr, pro = fpr[keep], pro[keep]
    fpr_norm = (fpr - fpr.min()) / (fpr.max() - fpr.min() + PRO_NORM_EPS)
    return float(skm.auc(fpr_norm, pro)) + 0.0  # + 0.0: no -0.0 in the reports


def compute_best_pr_re(labels: ArrayLike, scores: ArrayLike) -> Tuple[float, float, float]:
    """Operating point with the best F1 on the precision-recall curve.

    F1 is taken only over the curve points that have a threshold (sklearn's final point precision 1,
    recall 0 has none); points with precision + recall = 0 count as F1 = 0; ties go to the lowest threshold.

    Args:
        labels: binary ground truth (1 anomalous).
        scores: anomaly scores (higher = more anomalous).

    Returns:
        ``(threshold, precision, recall)``; a score ``>= threshold`` is predicted anomalous.
    """
    precision, recall, thresholds = skm.precision_recall_curve(_flatten(labels), _flatten(scores))
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(precision[best]), float(recall[best])


def compute_best_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The F1-best decision threshold (see :func:`compute_best_pr_re`).

    Args:
        labels: binary ground truth (1 anomalous).
        scores: anomaly scores.

    Returns:
        Threshold; a score ``>= threshold`` is predicted anomalous.
    """
    return compute_best_pr_re(labels, scores)[0]
