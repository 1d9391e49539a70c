"""What the shipped `evaluate` modules share: the `MetricInfo` of per-image maps (imported by them, not eagerly)."""

import datasets
import evaluate


def map_metric_info(description: str, inputs_description: str, dtype: str = "float32", ndim: int = 2):
    """Predictions and references as nested lists of `ndim` dimensions per image ([H, W], or [3, H, W] for normals)."""
    feature = datasets.Value(dtype)
    for _ in range(ndim):
        feature = datasets.Sequence(feature)
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": feature, "references": feature}),
    )
