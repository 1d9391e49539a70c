"""`evaluate` module: maxF of per-pixel probabilities against binary labels (saliency; edges with beta_squared=1).

Load offline with `peft_tglora.tasks.load_metric("saliency")` or `evaluate.load(<this folder>)`. The numbers come from
`peft_tglora.tasks.metrics.core.MaxF`; see that module for the thresholds and the beta^2 = 0.3 convention.
"""

import evaluate
import numpy as np

from peft_tglora.tasks.metrics.core import SALIENCY_THRESHOLDS, MaxF
from peft_tglora.tasks.metrics.evaluate_info import map_metric_info


_DESCRIPTION = """Dataset-level maxF in percent: for thresholds 0.05, 0.10, ..., 0.95 on probabilities, precision and
recall from counts summed over all images (label 255 ignored), F_beta with beta^2 = 0.3, maximum over thresholds."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: probability maps [H, W] in [0, 1] (apply a sigmoid to logits first), one per image.
    references: label maps [H, W] with 0 / 1, or 255 where unlabelled.
    beta_squared (float, defaults to 0.3): beta^2 of the F-measure (0.3 for saliency, 1 for the edge proxy).
    thresholds (list of float, optional): defaults to 0.05, 0.10, ..., 0.95.
    ignore_index (int, defaults to 255): label value to ignore.
Returns:
    maxF (float, percent).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaxFMetric(evaluate.Metric):
    def _info(self):
        return map_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, beta_squared: float = 0.3, thresholds=None, ignore_index: int = 255):
        meter = MaxF(beta_squared, SALIENCY_THRESHOLDS if thresholds is None else thresholds, ignore_index)
        for prediction, reference in zip(predictions, references):
            meter.update(np.asarray(prediction), np.asarray(reference))
        return meter.compute()
