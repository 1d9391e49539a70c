"""`evaluate` module: mean angular error in degrees of surface normals over valid pixels.

Load offline with `peft_tglora.tasks.load_metric("normals")` or `evaluate.load(<this folder>)`. The numbers come from
`peft_tglora.tasks.metrics.core.MeanAngularError`.
"""

import evaluate
import numpy as np

from peft_tglora.tasks.metrics.core import MeanAngularError
from peft_tglora.tasks.metrics.evaluate_info import map_metric_info


_DESCRIPTION = """Mean angle in degrees between the unit-normalised predicted normal and the unit label normal, over
all pixels of all images whose label vector is nonzero; also the percentage of pixels within 11.25, 22.5, 30 degrees."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: normal maps [3, H, W] (need not be unit length), one per image.
    references: label normal maps [3, H, W], unit vectors, zeros where invalid.
Returns:
    mean_angular_error (float, degrees), within_11.25, within_22.5, within_30.0 (float, percent).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanAngularErrorMetric(evaluate.Metric):
    def _info(self):
        return map_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, ndim=3)

    def _compute(self, predictions, references):
        meter = MeanAngularError()
        for prediction, reference in zip(predictions, references):
            meter.update(np.asarray(prediction), np.asarray(reference))
        return meter.compute()
