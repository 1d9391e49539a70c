"""Head output → prediction → picture: one postprocessing and one colouring rule per kind of dense map.

The table in `specs.py` picks the pair for each task; metrics take the postprocessed predictions and
`examples/inference.py` writes the pictures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


PALETTE = np.array(  # 21 distinct colours (PASCAL VOC's), repeated for larger class counts
    [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128], [128, 128, 128],
     [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128], [64, 128, 128],
     [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]], dtype=np.uint8,
)  # fmt: skip


# ---------------------------------------------------------------- head output [B, C, H, W] → prediction
def class_ids(output: torch.Tensor) -> torch.Tensor:
    """`[B, K, H, W]` logits → `[B, H, W]` class ids."""
    return output.argmax(dim=1)


def probabilities(output: torch.Tensor) -> torch.Tensor:
    """`[B, 1, H, W]` logits → `[B, H, W]` probabilities."""
    return torch.sigmoid(output.squeeze(1))


def unit_vectors(output: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` → unit normals `[B, 3, H, W]`."""
    return F.normalize(output, p=2, dim=1)


def scalar_map(output: torch.Tensor) -> torch.Tensor:
    """`[B, 1, H, W]` → `[B, H, W]`."""
    return output.squeeze(1)


# ---------------------------------------------------------------- one prediction [H, W] or [3, H, W] → RGB uint8
def colour_classes(prediction: np.ndarray) -> np.ndarray:
    return PALETTE[prediction.astype(np.int64) % len(PALETTE)]


def grey(prediction: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (probabilities) as grey levels."""
    return np.repeat((prediction * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def grey_near_bright(prediction: np.ndarray) -> np.ndarray:
    """Depth: near is bright, scaled per image."""
    lo, hi = prediction.min(), prediction.max()
    return grey((hi - prediction) / (hi - lo) if hi > lo else np.zeros_like(prediction))


def grey_stretched(prediction: np.ndarray) -> np.ndarray:
    """Strength maps: 0 is black, the image's maximum white."""
    hi = prediction.max()
    return grey(prediction / hi if hi > 0 else np.zeros_like(prediction))


def colour_normals(prediction: np.ndarray) -> np.ndarray:
    """RGB = (n + 1) / 2."""
    return ((prediction.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
