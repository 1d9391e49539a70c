"""
Task metrics: streaming meters for training loops, `evaluate` modules shipped in this folder, and Δm.

`evaluate` is imported only inside `load_metric`, so this module works without the `train` extra.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..specs import get_task_spec, num_outputs_for
from .core import RMSE, MaxF, MeanAngularError, MeanIoU


METRICS_DIR = Path(__file__).resolve().parent


def metric_path(task: str) -> str:
    """Folder of the `evaluate` module that scores `task`, usable as `evaluate.load(metric_path(task))`."""
    return str(METRICS_DIR / get_task_spec(task).metric_module)


def load_metric(task: str, **load_kwargs):
    """
    Load the `evaluate` module of `task` from the copy shipped in this package; no network access is needed.

    Classification tasks need `num_classes=` at `compute()`; saliency and edges take probabilities (see `postprocess`).
    Edges should be computed with `beta_squared=1.0`.
    """
    import evaluate  # optional dependency of the `train` extra

    return evaluate.load(metric_path(task), **load_kwargs)


def build_meter(task: str, *, dataset: str | None = None, num_classes: int | None = None):
    """A streaming meter (`update(prediction, target)`, `compute() -> dict`) for `task`; inputs from `postprocess`."""
    spec = get_task_spec(task)
    if spec.metric_module == "miou":
        return MeanIoU(num_outputs_for(task, dataset, num_classes), spec.ignore_index)
    if spec.metric_module == "max_f":
        return MaxF(beta_squared=1.0 if task == "edges" else 0.3, ignore_index=spec.ignore_index)
    if spec.metric_module == "mean_angular_error":
        return MeanAngularError()
    if spec.metric_module == "rmse":
        return RMSE()
    raise ValueError(f"No meter for metric module {spec.metric_module!r} of task {task!r}.")


@torch.no_grad()
def postprocess(task: str, output: torch.Tensor) -> torch.Tensor:
    """
    Turn a head's raw output `[B, C, H, W]` into what the task's metric takes.

    Class ids `[B, H, W]` (argmax) for classification, probabilities `[B, H, W]` (sigmoid) for saliency and edges,
    unit normals `[B, 3, H, W]`, depth `[B, H, W]`.
    """
    spec = get_task_spec(task)
    if spec.kind == "classification":
        return output.argmax(dim=1)
    if spec.kind == "binary":
        return torch.sigmoid(output.squeeze(1))
    if task == "normals":
        return torch.nn.functional.normalize(output, p=2, dim=1)
    return output.squeeze(1)


def _read_baselines(baselines: Mapping | str | os.PathLike) -> Mapping:
    if isinstance(baselines, Mapping):
        return baselines
    path = Path(baselines)
    if not path.is_file():
        raise FileNotFoundError(f"Baseline file {str(path)!r} does not exist; give a JSON file or a dict.")
    with path.open() as f:
        return json.load(f)


def _metric_value(values, task: str, where: str) -> float:
    """Accept `{"mIoU": 67.2, ...}` (the task's primary metric is read) or a bare number."""
    metric = get_task_spec(task).metric
    if isinstance(values, Mapping):
        if metric not in values:
            raise KeyError(
                f"{where}[{task!r}] has no {metric!r} (the primary metric of {task!r}); it has {sorted(values)}."
            )
        values = values[metric]
    if not isinstance(values, (int, float)) or isinstance(values, bool) or not math.isfinite(values):
        raise ValueError(f"{where}[{task!r}] must be a finite number (or a dict with {metric!r}), got {values!r}.")
    return float(values)


def delta_m(
    results: Mapping[str, Mapping[str, float] | float],
    baselines: Mapping[str, Mapping[str, float] | float] | str | os.PathLike,
    tasks: Sequence[str] | None = None,
) -> float:
    """
    Δm in percent: the mean over tasks of the relative gain over single-task baselines,
    `100 / T * Σ_t (-1)^{l_t} (M_t - M_single,t) / M_single,t`, with `l_t = 1` where lower is better.

    Args:
        results (`dict`):
            Per task, the metric dict returned by the task's meter / `evaluate` module, or the primary metric alone.
        baselines (`dict` or path to a JSON file):
            Same shape as `results`, e.g. `{"semseg": {"mIoU": 67.21}, "normals": {"mean_angular_error": 17.97}}`.
            Keys starting with `_` (e.g. `"_source"`) are ignored, so a file can say where its numbers come from.
        tasks (`list[str]`, *optional*):
            Tasks to average over; defaults to every task in `results`.
    """
    baselines = {k: v for k, v in _read_baselines(baselines).items() if not k.startswith("_")}
    tasks = list(results) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("No tasks to average over: results is empty and tasks was not given.")
    total = 0.0
    for task in tasks:
        if task not in results:
            raise KeyError(f"results has no entry for task {task!r}; it has {sorted(results)}.")
        if task not in baselines:
            raise KeyError(f"The baselines have no entry for task {task!r}; they have {sorted(baselines)}.")
        m, b = _metric_value(results[task], task, "results"), _metric_value(baselines[task], task, "baselines")
        if b == 0:
            raise ValueError(f"The baseline of {task!r} is 0, so a relative gain is undefined.")
        sign = 1.0 if get_task_spec(task).higher_is_better else -1.0
        total += sign * (m - b) / b
    return 100.0 * total / len(tasks)


__all__ = [
    "METRICS_DIR",
    "RMSE",
    "MaxF",
    "MeanAngularError",
    "MeanIoU",
    "build_meter",
    "delta_m",
    "load_metric",
    "metric_path",
    "postprocess",
]
