"""`evaluate` module: root mean squared depth error over valid pixels (label depth > 0).

Load offline with `peft_tglora.tasks.load_metric("depth")` or `evaluate.load(<this folder>)`. The numbers come from
`peft_tglora.tasks.metrics.core.RMSE`.
"""

import evaluate
import numpy as np

from peft_tglora.tasks.metrics.core import RMSE
from peft_tglora.tasks.metrics.evaluate_info import map_metric_info


_DESCRIPTION = """Dataset-level RMSE: sqrt of the squared error summed over all valid pixels (label > 0) of all images,
divided by their number, in the label's unit."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: depth maps [H, W], one per image.
    references: label depth maps [H, W], 0 where invalid.
Returns:
    rmse (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RMSEMetric(evaluate.Metric):
    def _info(self):
        return map_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        meter = RMSE()
        for prediction, reference in zip(predictions, references):
            meter.update(np.asarray(prediction), np.asarray(reference))
        return meter.compute()
