"""
Numeric core of the task metrics: pure numpy functions and streaming accumulators.

Every metric is *dataset-level*: counts are summed over all pixels of all images, then combined once (as MTI-Net's and
MTLoRA's meters do for mIoU, normals and depth). The accumulators (`MeanIoU`, `MaxF`, `SaliencyMeter`,
`MeanAngularError`, `RMSE`) are what a training loop uses on a full validation set (`evaluation.evaluate`); the
functions give the same numbers for predictions held in memory at once.

Conventions (each one a choice; the tests pin them):

- mIoU (semseg, human parts): per class IoU = TP / (TP + FP + FN) over pixels whose label is not `ignore_index`;
  classes with TP + FP + FN = 0 (absent from both prediction and label) are left out of the mean instead of counting
  as 0 or 1. On a full PASCAL / NYUD validation set every class occurs, so this equals MTI-Net's convention. Reported
  in percent.
- maxF (saliency): predictions are probabilities in [0, 1]; for each threshold t in 0.05, 0.10, ..., 0.95 a pixel is
  positive when p >= t; precision and recall are computed from dataset-level counts over pixels whose label is not
  255, F_beta = (1 + b2) P R / (b2 P + R) with b2 = beta^2 = 0.3, and maxF is the maximum over thresholds, in percent
  (MTI-Net / ATRC `SaliencyMeter`, and the "Beta maxF" of MTLoRA's code). MTLoRA's code also logs a "maxF" without
  beta (F1 of per-image-averaged precision and recall over thresholds linspace(0.2, 0.9, 15)); numbers copied from
  a paper are only comparable under the same definition. Edges use the same function with b2 = 1 as a pixel-exact
  proxy of ODS-F (the published edge metric, with matching tolerance, needs the SEISM toolbox).
- saliency mIoU (the saliency number of the field's Δm tables: ASTMT / MTI-Net / MTLoRA `eval_sal`, "mIoU"): for each
  threshold t in linspace(0.2, 0.9, 15) a pixel is positive when p > t; each image's IoU with the label (1 when both
  are empty; 255 pixels left out) is averaged over images, and the maximum over thresholds is reported, in percent.
  `SaliencyMeter` reports it as `"mIoU"` next to `"maxF"`.
- mean angular error (normals): angle in degrees between the unit-normalised prediction and the unit label, averaged
  over pixels whose label vector is nonzero; the fraction of pixels under 11.25, 22.5 and 30 degrees, the median
  (from a 0.001-degree histogram, so exact to 0.001 degrees) and the RMSE of the angle are also reported.
- RMSE (depth): sqrt of the mean squared error over pixels with label depth > 0, in the label's unit (metres).
"""

from __future__ import annotations

import numpy as np


SALIENCY_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
SALIENCY_IOU_THRESHOLDS = np.linspace(0.2, 0.9, 15)  # ASTMT's eval_sal mask thresholds
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
ANGLE_BIN = 0.001  # degrees per bin of the angular-error histogram behind the streaming median

HIGHER_IS_BETTER = {
    # the direction of every metric key the meters report, for Δm over any of them (the reference's table: mIoU,
    # maxF, odsF and the within-x% up; angular errors and depth RMSE down)
    "mIoU": True, "maxF": True, "within_11.25": True, "within_22.5": True, "within_30.0": True,
    "mean_angular_error": False, "median_angular_error": False, "rmse_angular_error": False, "rmse": False,
}  # fmt: skip


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_same_shape(prediction: np.ndarray, target: np.ndarray, what: str) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"{what}: prediction has shape {prediction.shape} but the label has {target.shape}.")


# ---------------------------------------------------------------- mIoU
def confusion_matrix(prediction, target, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """`[num_classes, num_classes]` int64 counts, rows = label class, columns = predicted class, ignored pixels left out."""
    prediction, target = _as_numpy(prediction).astype(np.int64), _as_numpy(target).astype(np.int64)
    _check_same_shape(prediction, target, "confusion_matrix")
    valid = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    p, t = prediction[valid], target[valid]
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(
            f"Class ids must lie in [0, {num_classes}) (or equal ignore_index={ignore_index} in the label); found "
            f"labels {np.unique(t[bad]).tolist()[:5]} and predictions {np.unique(p[bad]).tolist()[:5]}. "
            "Check num_classes for this dataset."
        )
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """`(mIoU in percent, per-class IoU in [0, 1] with NaN for classes absent from label and prediction)`."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return (float(iou[present].mean() * 100) if present.any() else float("nan")), iou


def mean_iou(prediction, target, num_classes: int, ignore_index: int | None = 255) -> float:
    """mIoU in percent of integer maps `prediction` and `target` (same shape)."""
    return iou_from_confusion(confusion_matrix(prediction, target, num_classes, ignore_index))[0]


# ---------------------------------------------------------------- maxF
def saliency_counts(
    probabilities, target, thresholds=SALIENCY_THRESHOLDS, ignore_index: int | None = 255
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-threshold true and predicted positives, and the number of positive labels, over valid pixels."""
    probabilities, target = _as_numpy(probabilities).astype(np.float64), _as_numpy(target)
    _check_same_shape(probabilities, target, "saliency_counts")
    valid = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    p, y = probabilities[valid], target[valid] > 0.5
    positive = p[None, :] >= np.asarray(thresholds, dtype=np.float64)[:, None]  # [T, N]
    return (positive & y[None]).sum(1), positive.sum(1), float(y.sum())


def max_f_from_counts(true_pos, pred_pos, actual_pos, beta_squared: float = 0.3) -> float:
    """maxF in percent from the counts of `saliency_counts`; thresholds with no predicted positive score 0."""
    tp, pp = np.asarray(true_pos, dtype=np.float64), np.asarray(pred_pos, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / pp
        recall = tp / actual_pos
        f = (1 + beta_squared) * precision * recall / (beta_squared * precision + recall)
    return float(np.nan_to_num(f, nan=0.0).max() * 100)


def max_f(
    probabilities, target, beta_squared: float = 0.3, thresholds=SALIENCY_THRESHOLDS, ignore_index: int | None = 255
) -> float:
    """Dataset-level maxF in percent of probabilities in [0, 1] against binary labels (255 ignored)."""
    return max_f_from_counts(*saliency_counts(probabilities, target, thresholds, ignore_index), beta_squared)


def saliency_image_ious(probabilities, target, thresholds=SALIENCY_IOU_THRESHOLDS, ignore_index: int | None = 255):
    """`[B, T]` IoU of each image's mask `p > t` with its label per threshold; 1 where both are empty (ASTMT)."""
    p, y = _as_numpy(probabilities).astype(np.float64), _as_numpy(target)
    _check_same_shape(p, y, "saliency_image_ious")
    p, y = p.reshape(-1, *p.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    valid = np.ones(y.shape, dtype=bool) if ignore_index is None else y != ignore_index
    positive = (y > 0.5) & valid  # [B, H, W]
    out = np.empty((len(p), len(thresholds)))
    for j, t in enumerate(thresholds):
        mask = (p > t) & valid
        inter = (mask & positive).sum((1, 2))
        union = (mask | positive).sum((1, 2))
        out[:, j] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return out


def saliency_miou(probabilities, target, thresholds=SALIENCY_IOU_THRESHOLDS, ignore_index: int | None = 255) -> float:
    """Saliency mIoU in percent: max over thresholds of the image-averaged IoU (the field's Δm tables)."""
    return float(saliency_image_ious(probabilities, target, thresholds, ignore_index).mean(0).max() * 100)


# ---------------------------------------------------------------- normals
def angular_errors(prediction, target) -> np.ndarray:
    """Angles in degrees between `[..., 3, H, W]` prediction and label normals at the valid (nonzero-label) pixels."""
    prediction, target = _as_numpy(prediction).astype(np.float64), _as_numpy(target).astype(np.float64)
    _check_same_shape(prediction, target, "angular_errors")
    if prediction.ndim < 3 or prediction.shape[-3] != 3:
        raise ValueError(
            f"Normals must have 3 channels in dim -3 ([B, 3, H, W] or [3, H, W]), got {prediction.shape}."
        )
    p, t = np.moveaxis(prediction, -3, -1).reshape(-1, 3), np.moveaxis(target, -3, -1).reshape(-1, 3)
    valid = np.abs(t).sum(1) > 0
    p, t = p[valid], t[valid]
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip((p * t).sum(1), -1.0, 1.0)))


def mean_angular_error(prediction, target) -> float:
    """Mean angular error in degrees over valid pixels (NaN when there are none)."""
    errors = angular_errors(prediction, target)
    return float(errors.mean()) if errors.size else float("nan")


# ---------------------------------------------------------------- depth
def squared_error_sum(prediction, target, zero_is_invalid: bool = True) -> tuple[float, int]:
    """
    Sum of squared errors and count over pixels with label > 0 (depth), or over all pixels when `zero_is_invalid` is
    False (maps where 0 is a real value, e.g. edge_texture); prediction `[B, 1, H, W]` is squeezed.
    """
    prediction, target = _as_numpy(prediction).astype(np.float64), _as_numpy(target).astype(np.float64)
    if prediction.ndim == target.ndim + 1 and prediction.shape[-3] == 1:
        prediction = prediction.squeeze(-3)
    _check_same_shape(prediction, target, "rmse")
    valid = target > 0 if zero_is_invalid else np.ones(target.shape, dtype=bool)
    return float(((prediction[valid] - target[valid]) ** 2).sum()), int(valid.sum())


def rmse(prediction, target) -> float:
    """Root mean squared error over pixels with label depth > 0 (NaN when there are none)."""
    total, count = squared_error_sum(prediction, target)
    return float(np.sqrt(total / count)) if count else float("nan")


# ---------------------------------------------------------------- streaming accumulators
class MeanIoU:
    """Streaming mIoU: `update(prediction, target)` per batch of class-id maps, then `compute()`."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction, target) -> None:
        self.matrix += confusion_matrix(prediction, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float | list[float]]:
        miou, iou = iou_from_confusion(self.matrix)
        return {"mIoU": miou, "per_class_iou": [float(v) for v in iou]}


class MaxF:
    """Streaming maxF over probabilities in [0, 1]; `beta_squared=0.3` for saliency, 1 for the edge proxy."""

    def __init__(self, beta_squared: float = 0.3, thresholds=SALIENCY_THRESHOLDS, ignore_index: int | None = 255):
        self.beta_squared, self.ignore_index = beta_squared, ignore_index
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.true_pos = np.zeros(len(self.thresholds))
        self.pred_pos = np.zeros(len(self.thresholds))
        self.actual_pos = 0.0

    def update(self, probabilities, target) -> None:
        tp, pp, ap = saliency_counts(probabilities, target, self.thresholds, self.ignore_index)
        self.true_pos += tp
        self.pred_pos += pp
        self.actual_pos += ap

    def compute(self) -> dict[str, float]:
        return {"maxF": max_f_from_counts(self.true_pos, self.pred_pos, self.actual_pos, self.beta_squared)}


class SaliencyMeter(MaxF):
    """Streaming saliency metrics: `maxF` (beta^2 = 0.3, dataset-level counts) and the field's `mIoU` (per image)."""

    def __init__(self, beta_squared: float = 0.3, ignore_index: int | None = 255):
        super().__init__(beta_squared=beta_squared, ignore_index=ignore_index)
        self.iou_sum, self.images = np.zeros(len(SALIENCY_IOU_THRESHOLDS)), 0

    def update(self, probabilities, target) -> None:
        super().update(probabilities, target)
        ious = saliency_image_ious(probabilities, target, ignore_index=self.ignore_index)
        self.iou_sum += ious.sum(0)
        self.images += len(ious)

    def compute(self) -> dict[str, float]:
        miou = float((self.iou_sum / self.images).max() * 100) if self.images else float("nan")
        return super().compute() | {"mIoU": miou}


class MeanAngularError:
    """
    Streaming angular error of normals (degrees): mean, median, RMSE, and the percentage of valid pixels within
    11.25 / 22.5 / 30 degrees. The median comes from a histogram of `ANGLE_BIN`-wide bins (exact to that width).
    """

    def __init__(self):
        self.total, self.squares, self.count = 0.0, 0.0, 0
        self.within = np.zeros(len(ANGLE_THRESHOLDS))
        self.histogram = np.zeros(round(180 / ANGLE_BIN) + 1, dtype=np.int64)

    def update(self, prediction, target) -> None:
        errors = angular_errors(prediction, target)
        self.total += float(errors.sum())
        self.squares += float((errors**2).sum())
        self.count += errors.size
        self.within += [(errors < a).sum() for a in ANGLE_THRESHOLDS]
        bins = np.minimum((errors / ANGLE_BIN).astype(np.int64), len(self.histogram) - 1)
        self.histogram += np.bincount(bins, minlength=len(self.histogram))

    def _median(self) -> float:
        """Interpolated within the bin holding the middle error, as if errors were spread evenly across it."""
        cumulative = np.cumsum(self.histogram)
        half = self.count / 2
        k = int(np.searchsorted(cumulative, half))
        before = cumulative[k - 1] if k else 0
        return (k + (half - before) / self.histogram[k]) * ANGLE_BIN

    def compute(self) -> dict[str, float]:
        keys = ["mean_angular_error", "median_angular_error", "rmse_angular_error"]
        if not self.count:
            return dict.fromkeys(keys, float("nan")) | {f"within_{a}": float("nan") for a in ANGLE_THRESHOLDS}
        values = [self.total / self.count, self._median(), float(np.sqrt(self.squares / self.count))]
        out = dict(zip(keys, values))
        out.update({f"within_{a}": float(w / self.count * 100) for a, w in zip(ANGLE_THRESHOLDS, self.within)})
        return out


class RMSE:
    """Streaming RMSE over valid pixels (label > 0, as for depth), or over all pixels with `zero_is_invalid=False`."""

    def __init__(self, zero_is_invalid: bool = True):
        self.total, self.count = 0.0, 0
        self.zero_is_invalid = zero_is_invalid

    def update(self, prediction, target) -> None:
        total, count = squared_error_sum(prediction, target, self.zero_is_invalid)
        self.total += total
        self.count += count

    def compute(self) -> dict[str, float]:
        return {"rmse": float(np.sqrt(self.total / self.count)) if self.count else float("nan")}
