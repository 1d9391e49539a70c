"""Task metrics: dataset-level streaming meters and the pure numpy functions behind them (see `core.py`)."""

from .core import RMSE, MaxF, MeanAngularError, MeanIoU


__all__ = ["RMSE", "MaxF", "MeanAngularError", "MeanIoU"]
