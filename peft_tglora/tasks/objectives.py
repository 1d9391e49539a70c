"""Apply the task table to a batch: per-task and multi-task losses, meters, postprocessing, and Δm.

What each task uses comes from `specs.TASKS`; this module only looks entries up and combines them, so training loops,
the similarity tool and the benchmarks share one definition.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .metrics.core import HIGHER_IS_BETTER
from .specs import get_task_spec, num_outputs_for


def build_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of `task` as a function `(prediction, label) -> scalar`, with the task's ignore index and options."""
    return get_task_spec(task).loss


def task_loss(task: str, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Loss of `task` for the head output `prediction` against `batch[task]`; both must share their spatial size."""
    if task not in batch:
        raise KeyError(f"The batch has no label for task {task!r}; its keys are {sorted(batch)}.")
    target = batch[task]
    if tuple(prediction.shape[-2:]) != tuple(target.shape[-2:]):
        raise ValueError(
            f"Prediction for {task!r} is {tuple(prediction.shape[-2:])} but its label is {tuple(target.shape[-2:])}; "
            "call the head with output_size=label.shape[-2:] so the logits are upsampled before the loss."
        )
    return build_loss(task)(prediction, target)


def multitask_loss(
    predictions: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    Weighted sum of the task losses over the tasks in `predictions`.

    Returns `(total, per_task)` where `per_task` holds the unweighted, detached loss of each task for logging.
    `weights` defaults to 1 per task; get a dataset's recipe from `specs.default_loss_weights`.
    """
    if weights is not None:
        missing = [t for t in predictions if t not in weights]
        if missing:
            raise ValueError(f"No loss weight for tasks {missing}; weights has {sorted(weights)}.")
    total = None
    per_task = {}
    for task, prediction in predictions.items():
        value = task_loss(task, prediction, batch)
        per_task[task] = value.detach()
        weighted = value * (1.0 if weights is None else weights[task])
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("predictions is empty: give at least one task's head output.")
    return total, per_task


def build_meter(task: str, *, dataset: str | None = None, num_classes: int | None = None):
    """A streaming meter (`update(prediction, target)`, `compute() -> dict`) for `task`; inputs from `postprocess`."""
    return get_task_spec(task).meter(num_outputs_for(task, dataset, num_classes))


@torch.no_grad()
def postprocess(task: str, output: torch.Tensor) -> torch.Tensor:
    """
    Turn a head's raw output `[B, C, H, W]` into what the task's meter takes: class ids `[B, H, W]`, probabilities
    `[B, H, W]`, unit normals `[B, 3, H, W]` or a scalar map `[B, H, W]`.
    """
    return get_task_spec(task).postprocess(output)


BASELINES = Path(__file__).parent / "baselines"  # shipped single-task numbers, by dataset name


def _read_baselines(baselines: Mapping | str | os.PathLike) -> Mapping:
    if isinstance(baselines, Mapping):
        return baselines
    shipped = BASELINES / f"{baselines}.json"
    path = shipped if isinstance(baselines, str) and shipped.is_file() else Path(baselines)
    if not path.is_file():
        raise FileNotFoundError(f"Baseline file {str(path)!r} does not exist; give a JSON file or a dict.")
    with path.open() as f:
        return json.load(f)


def _baseline_metric(baseline, task: str) -> str:
    """The metric a baseline names (`{"saliency": {"mIoU": 62.35}}`: the field's saliency mIoU), else the primary."""
    if isinstance(baseline, Mapping) and len(baseline) == 1 and next(iter(baseline)) in HIGHER_IS_BETTER:
        return next(iter(baseline))
    return get_task_spec(task).metric


def _metric_value(values, task: str, where: str, metric: str | None = None) -> float:
    """Accept `{"mIoU": 67.2, ...}` (`metric`, by default the task's primary metric, is read) or a bare number."""
    metric = metric or get_task_spec(task).metric
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
        baselines (`dict`, path to a JSON file, or the name of a shipped file such as `"pascal_context"`):
            Same shape as `results`, e.g. `{"semseg": {"mIoU": 67.21}, "normals": {"mean_angular_error": 17.97}}`.
            A task whose baseline holds one other metric key (e.g. saliency `{"mIoU": 62.35}`, the field's number)
            is compared on that key, with its direction from `metrics.core.HIGHER_IS_BETTER`.
            `peft_tglora/tasks/baselines/pascal_context.json` holds the paper's PASCAL single-task numbers.
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
        metric = _baseline_metric(baselines[task], task)
        m, b = (
            _metric_value(results[task], task, "results", metric),
            _metric_value(baselines[task], task, "baselines", metric),
        )
        if b == 0:
            raise ValueError(f"The baseline of {task!r} is 0, so a relative gain is undefined.")
        sign = 1.0 if HIGHER_IS_BETTER.get(metric, get_task_spec(task).higher_is_better) else -1.0
        total += sign * (m - b) / b
    return 100.0 * total / len(tasks)
