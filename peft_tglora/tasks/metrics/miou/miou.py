"""`evaluate` module: mean intersection over union of class-id maps, with an ignore index (semseg, human parts).

Load offline with `peft_tglora.tasks.load_metric("semseg")` or `evaluate.load(<this folder>)`. The numbers come from
`peft_tglora.tasks.metrics.core.MeanIoU`; see that module for the convention on classes absent from both maps.
"""

import evaluate
import numpy as np

from peft_tglora.tasks.metrics.core import MeanIoU
from peft_tglora.tasks.metrics.evaluate_info import map_metric_info


_DESCRIPTION = """Dataset-level mIoU in percent: per-class IoU = TP / (TP + FP + FN) over pixels whose label is not
ignore_index, summed over all images; classes absent from both prediction and label are left out of the mean."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class-id maps [H, W] (int), one per image.
    references: label maps [H, W] (int), same shapes, `ignore_index` where unlabelled.
    num_classes (int): number of classes, background included.
    ignore_index (int, defaults to 255): label value to ignore.
Returns:
    mIoU (float, percent), per_class_iou (list of float in [0, 1], NaN for absent classes).
Example:
    >>> metric = peft_tglora.tasks.load_metric("semseg")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 1]]], num_classes=2)["mIoU"]
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoUMetric(evaluate.Metric):
    def _info(self):
        return map_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "int32")

    def _compute(self, predictions, references, num_classes: int, ignore_index: int = 255):
        meter = MeanIoU(num_classes, ignore_index)
        for prediction, reference in zip(predictions, references):
            meter.update(np.asarray(prediction), np.asarray(reference))
        return meter.compute()
