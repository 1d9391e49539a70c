"""Per-task losses, following MTI-Net / MTLoRA (`losses/loss_functions.py` there), on the batch format of `data.py`.

- semseg, human parts: cross-entropy, pixels labelled `IGNORE_INDEX` (255) ignored.
- saliency, edges: class-balanced binary cross-entropy on logits. With `pos_weight=None` the positive weight is the
  fraction of negative pixels in the batch (saliency); edges use a fixed 0.95. Pixels labelled 255 are ignored. The
  loss is the weighted sum divided by the number of valid pixels, as MTI-Net's `size_average=True`.
- normals: the prediction is L2-normalised over channels, then L1 against the unit label, averaged over the valid
  pixels' channels (a label vector of zeros marks an invalid pixel).
- depth: L1 over pixels with depth > 0.
- dense regression with no invalid value (edge_texture): L1 over all pixels.

Pure functions of `(prediction, target)`; the task table in `specs.py` says which one each task uses, and
`objectives.py` applies them to a batch. All take the head's raw output at the label resolution
(`MultiScaleHead(..., output_size=label.shape[-2:])`).
A batch with no valid pixel for a task gives a loss of 0 that still carries a gradient path, so that DDP and
gradient accumulation see every parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX


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


def l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between `prediction [B, 1, H, W]` and `target [B, H, W]` over every pixel (0 is a value, not "invalid")."""
    prediction = prediction.squeeze(1) if prediction.ndim == 4 else prediction
    return (prediction - target).abs().mean()
