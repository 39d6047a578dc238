"""Per-case segmentation and detection metrics, and cohort statistics.

Definitions follow the WMH Segmentation Challenge (Kuijf et al., IEEE TMI 2019) and
Jansen et al. 2020:

* Dice = 2|P∩G| / (|P| + |G|); NaN when both masks are empty (0/0, as the challenge's
  scipy-based computation).
* AVD % = |V(P) - V(G)| / V(G) * 100; NaN when G is empty.
* HD95 (mm): boundary voxels are each mask minus its 2D (in-plane, x-y) binary erosion
  of radius 1, as the challenge computes them with SimpleITK; distances between boundary
  voxel centres in millimetres; the result is the larger of the two directed 95th
  percentiles. NaN when either mask is empty.
* Lesions are 26-connected components; a lesion is detected when it overlaps (> 0 voxels)
  the other mask. Recall (TPR) = detected GT lesions / GT lesions (1.0 when there are no
  GT lesions, as the challenge); FP count = predicted lesions overlapping no GT lesion;
  precision (PPV) = predicted lesions overlapping GT / predicted lesions (1.0 when nothing
  is predicted); F1 = 2 PR / (P + R).
  Note: the challenge script counts *detected GT lesions* in the precision numerator,
  which exceeds 1 when one predicted object bridges two GT lesions; we count predicted
  objects, as Jansen et al. 2020 define precision. Both agree whenever no prediction touches two GT
  lesions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .postprocess import label_lesions

METRIC_NAMES = [
    "dice",
    "avd_percent",
    "hd95_mm",
    "lesion_recall",
    "lesion_precision",
    "lesion_f1",
    "fp_count",
    "gt_lesions",
    "pred_lesions",
    "volume_pred_ml",
    "volume_gt_ml",
]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    denominator = int(pred.sum()) + int(gt.sum())
    if denominator == 0:
        return math.nan
    return 2.0 * int((pred & gt).sum()) / denominator


def absolute_volume_difference(pred: np.ndarray, gt: np.ndarray) -> float:
    """AVD in percent of the GT volume (voxel size cancels)."""
    v_gt = int(gt.astype(bool).sum())
    if v_gt == 0:
        return math.nan
    return abs(int(pred.astype(bool).sum()) - v_gt) / v_gt * 100.0


def _boundary_points_mm(mask: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(image, (1, 1, 0)))
    boundary = mask.astype(bool) & ~eroded.astype(bool)
    return np.argwhere(boundary) * np.asarray(spacing_zyx, dtype=np.float64)


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm (arrays in numpy z, y, x order)."""
    if not pred.any() or not gt.any():
        return math.nan
    from scipy.spatial import cKDTree  # here, not at the top: see paired_test

    a = _boundary_points_mm(gt, spacing_zyx)
    b = _boundary_points_mm(pred, spacing_zyx)
    d_ab = cKDTree(b).query(a, k=1)[0]
    d_ba = cKDTree(a).query(b, k=1)[0]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def lesion_detection(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Lesion-wise counts and rates with 26-connectivity and overlap > 0."""
    gt_labels, n_gt = label_lesions(gt.astype(bool))
    pred_labels, n_pred = label_lesions(pred.astype(bool))
    detected_gt = np.unique(gt_labels[pred.astype(bool) & (gt_labels > 0)]).size
    true_pred = np.unique(pred_labels[gt.astype(bool) & (pred_labels > 0)]).size
    recall = 1.0 if n_gt == 0 else detected_gt / n_gt
    precision = 1.0 if n_pred == 0 else true_pred / n_pred
    f1 = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    return {
        "gt_lesions": n_gt,
        "pred_lesions": n_pred,
        "detected_gt_lesions": int(detected_gt),
        "fp_count": int(n_pred - true_pred),
        "lesion_recall": recall,
        "lesion_precision": precision,
        "lesion_f1": f1,
    }


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """All per-case metrics for binary arrays on the same grid (numpy z, y, x order)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    result = {
        "dice": dice(pred, gt),
        "avd_percent": absolute_volume_difference(pred, gt),
        "hd95_mm": hausdorff95(pred, gt, spacing_zyx),
        "volume_pred_ml": float(pred.astype(bool).sum()) * voxel_ml,
        "volume_gt_ml": float(gt.astype(bool).sum()) * voxel_ml,
    }
    result.update(lesion_detection(pred, gt))
    return result


#: More distinct positive values than this and a "label image" is an image.
MAX_LABELS = 1000


def label_mask(image: sitk.Image, what: str) -> np.ndarray:
    """The lesion mask (label > 0) of a label image, refusing what is not one: an MR
    image or a probability map (non-integer values, or more than ``MAX_LABELS`` labels)
    and negative labels, which would otherwise be scored as if they were segmentations."""
    from .images import ImageError

    values = sitk.GetArrayFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        fractional = values[np.isfinite(values) & (values != np.round(values))]
        if fractional.size:
            raise ImageError(
                f"{what} is not a label image (it has non-integer values such as {float(fractional.flat[0]):.3g}: "
                "an MR image or a probability map?); give a segmentation"
            )
    if (values < 0).any():
        raise ImageError(
            f"{what} has negative labels (such as {int(values.min())}); a label image holds 0 for background and positive labels"
        )
    if np.unique(values[values > 0]).size > MAX_LABELS:
        raise ImageError(
            f"{what} is not a label image (more than {MAX_LABELS} distinct values: an MR image?); give a segmentation"
        )
    return values > 0


def evaluate_images(pred: sitk.Image, gt: sitk.Image) -> dict:
    """Metrics of two label images; any label > 0 is lesion. They must share a grid."""
    from .images import GeometryError, grid_mismatch

    mismatch = grid_mismatch(gt, pred)
    if mismatch:
        raise GeometryError(f"prediction and ground truth are on different grids ({mismatch}); resample first")
    return evaluate_case(label_mask(pred, "the prediction"), label_mask(gt, "the ground truth"), gt.GetSpacing()[::-1])


# ---------------------------------------------------------------------------------------
# Cohort statistics


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v)]


def summarise(values: Sequence[float]) -> dict:
    """mean, SD (ddof=1), median, quartiles and n of the finite values."""
    v = _finite(values)
    if v.size == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "q1": math.nan, "q3": math.nan}
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
    }


def paired_test(a: Sequence[float], b: Sequence[float], test: str) -> dict:
    """Paired comparison of two methods on the same cases.

    ``test="wilcoxon"`` (detection metrics, paper: median [IQR]) or ``"ttest"``
    (segmentation metrics, paper: mean ± SD). Pairs with a non-finite value are dropped.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.allclose(a, b):
        return {"test": test, "n": int(a.size), "statistic": math.nan, "p": math.nan}
    # imported here: scipy.stats takes 0.4-0.6 s to import (scipy.spatial 0.08 s), and every
    # segmentation and fine-tuning run imports this module; their start-up is held to 2 s
    from scipy import stats

    if test == "wilcoxon":
        res = stats.wilcoxon(a, b)
    elif test == "ttest":
        res = stats.ttest_rel(a, b)
    else:
        raise ValueError(f"unknown test {test!r}; use 'wilcoxon' or 'ttest'")
    return {"test": test, "n": int(a.size), "statistic": float(res.statistic), "p": float(res.pvalue)}


def format_median_iqr(values: Sequence[float], digits: int = 2) -> str:
    s = summarise(values)
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}-{s['q3']:.{digits}f}]"


def format_mean_sd(values: Sequence[float], digits: int = 2) -> str:
    s = summarise(values)
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


#: Which summary and test the paper uses for each metric: detection metrics are not
#: normally distributed (median [IQR], Wilcoxon signed-rank), segmentation metrics are
#: reported as mean ± SD with a paired t-test.
SEGMENTATION_METRICS = ("dice", "avd_percent", "hd95_mm")
DETECTION_METRICS = ("lesion_recall", "fp_count", "lesion_precision", "lesion_f1")


def compare_cohorts(results: Sequence[dict], reference: Sequence[dict], key: str = "case") -> list[dict]:
    """Paired comparison of two methods' per-case metrics, matched by ``key``.

    Returns one row per metric with both summaries (in the paper's form) and the test.
    Raises ValueError when the two sets share no case.
    """
    by_case = {str(r[key]): r for r in reference}
    pairs = [(r, by_case[str(r[key])]) for r in results if str(r[key]) in by_case]
    if not pairs:
        raise ValueError("the two sets of results share no case name; nothing to compare")
    rows = []
    for metric in SEGMENTATION_METRICS + DETECTION_METRICS:
        a = [float(p[0][metric]) for p in pairs]
        b = [float(p[1][metric]) for p in pairs]
        segmentation = metric in SEGMENTATION_METRICS
        fmt = format_mean_sd if segmentation else format_median_iqr
        test = paired_test(a, b, "ttest" if segmentation else "wilcoxon")
        rows.append(
            {
                "metric": metric,
                "summary": "mean ± SD" if segmentation else "median [IQR]",
                "results": fmt(a),
                "reference": fmt(b),
                **test,
            }
        )
    return rows
