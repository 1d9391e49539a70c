"""
Light multi-scale decoder heads, one per task.

What the paper's baseline uses. TGLoRA reuses MTLoRA's recipe (Agiza et al., CVPR 2024, `scale-lab/MTLoRA`): per task,
a *downsampler* (one bias-free 1x1 conv per stage, mapping the Swin-T stage widths to HRNet-18 widths 18, 36, 72, 144)
feeds an HRNet "HighResolutionHead": upsample stages 2-4 bilinearly to stage 1, concatenate (270 channels), 1x1 conv to
4x270 channels, BatchNorm, ReLU, 1x1 conv to the task's outputs; the logits are then upsampled to the image size.
(MTLoRA takes each stage's features *after* its patch merging, so its four inputs have strides 8, 16, 32, 32 and
widths 192, 384, 768, 768; we take them before, strides 4, 8, 16, 32 and widths 96, 192, 384, 768, as the backbone
interface of this package gives them.)

How ours compares. `MultiScaleHead` is the same pipeline in one module: `reduce` (1x1, no bias) → upsample → concatenate
→ `fuse` (k x k conv, norm, ReLU) → `classifier` (1x1). With the defaults (`channels = 18 * 2**s`, `hidden_channels = 4 *
sum(channels)`, `kernel_size=1`, BatchNorm) it *is* MTLoRA's downsampler + HRNet head, parameter for parameter, when fed
the same widths; `kernel_size=3, hidden_channels=270` adds spatial context for ~1.8x the parameters, and `norm="group"` suits batches of one.
Parameter counts for both inputs are in docs/TASKS.md, checked by `tests/test_docs_head_table.py`.

Output resolution. A head returns logits at the resolution of its first input stage; pass `output_size` to get them
bilinearly upsampled (MTLoRA upsamples to the image size before the loss). `peft_tglora.tasks.task_loss` requires
predictions at the label resolution and says so when they are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .specs import num_outputs_for


class MultiScaleHead(nn.Module):
    """
    HRNet-style multi-scale head: per-stage 1x1 reduction, upsampling to the finest stage, concatenation, fusion, and a
    1x1 classifier.

    Args:
        in_channels (`Sequence[int]`):
            Channels of each input stage, finest first (e.g. `[96, 192, 384, 768]` for Swin-T).
        num_outputs (`int`):
            Output channels (classes for segmentation, 3 for normals, 1 for depth / saliency / edges).
        channels (`Sequence[int]`, *optional*):
            Width each stage is reduced to before concatenation. Defaults to MTLoRA's HRNet-18 widths `18 * 2**s`.
        hidden_channels (`int`, *optional*):
            Width of the fusion layer. Defaults to `4 * sum(channels)`, as MTLoRA's head.
        kernel_size (`int`, defaults to 1):
            Kernel of the fusion conv: 1 reproduces MTLoRA's head, 3 adds spatial context.
        norm (`str`, defaults to `"batch"`):
            `"batch"` (MTLoRA) or `"group"` (independent of batch size; 1 group per 8 channels, at least 1).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_outputs: int,
        *,
        channels: Sequence[int] | None = None,
        hidden_channels: int | None = None,
        kernel_size: int = 1,
        norm: str = "batch",
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or any(c <= 0 for c in in_channels):
            raise ValueError(f"in_channels must be a non-empty list of positive ints, got {in_channels}.")
        if num_outputs <= 0:
            raise ValueError(f"num_outputs must be positive, got {num_outputs}.")
        channels = [18 * 2**s for s in range(len(in_channels))] if channels is None else [int(c) for c in channels]
        if len(channels) != len(in_channels):
            raise ValueError(
                f"channels has {len(channels)} entries but in_channels has {len(in_channels)}; give one width per stage."
            )
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 (MTLoRA's head) or 3, got {kernel_size}.")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}.")
        total = sum(channels)
        hidden = 4 * total if hidden_channels is None else int(hidden_channels)
        self.in_channels = in_channels
        self.reduce = nn.ModuleList(nn.Conv2d(c_in, c, 1, bias=False) for c_in, c in zip(in_channels, channels))
        norm_layer = nn.BatchNorm2d(hidden) if norm == "batch" else nn.GroupNorm(max(1, hidden // 8), hidden)
        self.fuse = nn.Sequential(
            nn.Conv2d(total, hidden, kernel_size, padding=kernel_size // 2), norm_layer, nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(hidden, num_outputs, 1)

    def forward(
        self, features: Sequence[torch.Tensor], output_size: tuple[int, int] | torch.Size | None = None
    ) -> torch.Tensor:
        """Map per-stage features `[B, C_s, H_s, W_s]` to logits `[B, num_outputs, H_0, W_0]` (or `output_size`)."""
        if len(features) != len(self.reduce):
            raise ValueError(
                f"This head was built for {len(self.reduce)} stages but got {len(features)} feature maps."
            )
        for s, (x, c) in enumerate(zip(features, self.in_channels)):
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(
                    f"Stage {s} features must be [B, {c}, H, W] (channels first), got {tuple(x.shape)}; "
                    "reshape token sequences [B, H*W, C] to [B, C, H, W] first."
                )
        size = features[0].shape[-2:]
        reduced = []
        for x, conv in zip(features, self.reduce):
            y = conv(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            reduced.append(y)
        out = self.classifier(self.fuse(torch.cat(reduced, dim=1)))
        if output_size is not None and tuple(out.shape[-2:]) != tuple(output_size):
            out = F.interpolate(out, size=tuple(output_size), mode="bilinear", align_corners=False)
        return out


def build_head(
    task: str,
    in_channels: Sequence[int],
    *,
    dataset: str | None = None,
    num_classes: int | None = None,
    **head_kwargs,
) -> MultiScaleHead:
    """
    Build the head of `task` for a backbone with per-stage widths `in_channels`.

    Classification tasks take their class count from `num_classes` or from `dataset` (see `specs.DATASETS`);
    `head_kwargs` go to `MultiScaleHead` (`channels`, `hidden_channels`, `kernel_size`, `norm`).
    """
    return MultiScaleHead(in_channels, num_outputs_for(task, dataset, num_classes), **head_kwargs)


def build_heads(
    tasks: Sequence[str], in_channels: Sequence[int], *, dataset: str | None = None, **head_kwargs
) -> nn.ModuleDict:
    """One head per task in an `nn.ModuleDict` keyed by task name."""
    return nn.ModuleDict({t: build_head(t, in_channels, dataset=dataset, **head_kwargs) for t in tasks})
