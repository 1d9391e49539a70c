"""
Per-task losses, following MTI-Net / MTLoRA (`losses/loss_functions.py` there), on the batch format of `data.py`.

- semseg, human parts: cross-entropy, pixels labelled `IGNORE_INDEX` (255) ignored.
- saliency, edges: class-balanced binary cross-entropy on logits. With `pos_weight=None` the positive weight is the
  fraction of negative pixels in the batch (saliency); edges use a fixed 0.95. Pixels labelled 255 are ignored. The
  loss is the weighted sum divided by the number of valid pixels, as MTI-Net's `size_average=True`.
- normals: the prediction is L2-normalised over channels, then L1 against the unit label, averaged over the valid
  pixels' channels (a label vector of zeros marks an invalid pixel).
- depth: L1 over pixels with depth > 0.

All losses take the head's raw output at the label resolution (`MultiScaleHead(..., output_size=label.shape[-2:])`).
A batch with no valid pixel for a task gives a loss of 0 that still carries a gradient path, so that DDP and
gradient accumulation see every parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .specs import IGNORE_INDEX, get_task_spec


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of `logits [B, K, H, W]` against `target [B, H, W]` (long), ignoring `ignore_index`."""
    target = target.long()
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def balanced_bce(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """
    Class-balanced BCE on `logits [B, 1, H, W]` (or `[B, H, W]`) against `target [B, H, W]` in {0, 1}.

    `w = pos_weight` (or the batch's negative fraction when `None`) weighs positives and `1 - w` negatives; the
    result is the weighted sum over valid pixels divided by their number.
    """
    logits = logits.squeeze(1) if logits.ndim == 4 else logits
    target = target.float()
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    x, y = logits[valid], target[valid]
    if pos_weight is None:
        pos_weight = 1.0 - y.mean().item()
    # log-sigmoid keeps large logits finite where log(sigmoid(x)) would give -inf
    loss = -(pos_weight * y * F.logsigmoid(x) + (1.0 - pos_weight) * (1.0 - y) * F.logsigmoid(-x))
    return loss.sum() / y.numel()


def normals_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the unit-normalised `prediction [B, 3, H, W]` and `target [B, 3, H, W]` on pixels whose label is nonzero."""
    valid = target.abs().sum(dim=1, keepdim=True) > 0  # [B, 1, H, W]
    if not valid.any():
        return prediction.sum() * 0.0
    unit = F.normalize(prediction, p=2, dim=1)
    valid = valid.expand_as(unit)
    return (unit[valid] - target[valid]).abs().mean()


def depth_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between `prediction [B, 1, H, W]` and `target [B, H, W]` on pixels with depth > 0."""
    prediction = prediction.squeeze(1) if prediction.ndim == 4 else prediction
    valid = target > 0
    if not valid.any():
        return prediction.sum() * 0.0
    return (prediction[valid] - target[valid]).abs().mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "balanced_bce": balanced_bce,
    "normals_l1": normals_l1,
    "depth_l1": depth_l1,
}


def build_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of `task` as a function `(prediction, label) -> scalar`, with the task's ignore index and options."""
    spec = get_task_spec(task)
    fn = LOSSES[spec.loss]
    kwargs = dict(spec.loss_kwargs)
    if spec.ignore_index is not None:
        kwargs["ignore_index"] = spec.ignore_index

    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn(prediction, target, **kwargs)

    loss.__name__ = f"{task}_{spec.loss}"
    return loss


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
