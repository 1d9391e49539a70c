"""Scoring a multi-task model on an evaluation loader: every task's streaming meter, gathered across processes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .objectives import build_meter, postprocess
from .specs import get_task_spec


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader,
    tasks: Sequence[str],
    num_classes: Mapping[str, int],
    gather: Callable = lambda x: x,
) -> dict[str, dict[str, float]]:
    """
    Score `model` (a `MultiTaskModel`) on `dataloader`: `{task: {metric: value}}` from each task's streaming meter.

    `gather` collects a batch from every process (pass `accelerator.gather_for_metrics`), so each process ends with
    the metrics of the whole evaluation set.
    """
    meters = {t: build_meter(t, num_classes=num_classes.get(t)) for t in tasks}
    was_training = model.training
    model.eval()
    for batch in dataloader:
        outputs = model(batch["pixel_values"])
        processed = {t: postprocess(t, outputs[t].float()) for t in tasks}
        processed, labels = gather((processed, {t: batch[t] for t in tasks}))
        for t in tasks:
            meters[t].update(processed[t].cpu(), labels[t].cpu())
    model.train(was_training)
    results = {}
    for t, meter in meters.items():
        values = meter.compute()
        results[t] = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}  # drop per-class lists
    return results


def summary(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """`semseg mIoU 41.203, normals mean_angular_error 30.114`: each task's primary metric on one line."""
    return ", ".join(f"{t} {get_task_spec(t).metric} {m[get_task_spec(t).metric]:.3f}" for t, m in metrics.items())
