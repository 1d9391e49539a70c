"""Stored label → tensor: one decoder per kind of dense map, chosen per task by the table in `specs.py`.

Every decoder takes what `to_array` returns (a numpy array, in whatever layout the source stored) and returns the
batch format of its task. The encodings are documented in docs/TASKS.md; each rule that comes from the field's
reference code says so.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch


IGNORE_INDEX = 255
"""Label value of pixels that carry no label in class and binary maps."""


def to_array(value) -> np.ndarray:
    """PIL image, array, tensor, nested list, `{"bytes"/"path"}` dict (an undecoded `datasets.Image`) or path → array."""
    from PIL import Image

    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"Label file {str(path)!r} does not exist.")
        return np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path))
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def channels_last(x: np.ndarray, channels: tuple[int, ...] = (3,)) -> np.ndarray:
    """
    `[C, H, W]` (how some Hub copies store images and normals) → `[H, W, C]` for C in `channels`; `[H, W, C]` and
    `[H, W]` unchanged. A last axis of a known channel count wins, so a 3-pixel-high RGB image is not transposed.
    """
    if x.ndim == 3 and x.shape[0] in channels and x.shape[-1] not in channels:
        return np.moveaxis(x, 0, -1)
    return x


def single_channel(x: np.ndarray, task: str) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]` or `[1, H, W]` → `[H, W]`; anything else is refused with its shape."""
    if x.ndim == 3 and 1 in (x.shape[0], x.shape[-1]):
        x = x.reshape(x.shape[1:] if x.shape[0] == 1 else x.shape[:-1])
    if x.ndim != 2:
        raise ValueError(f"{task} labels must be single-channel [H, W] maps, got shape {x.shape}.")
    return x


def decode_image(value) -> torch.Tensor:
    """RGB image (`[H, W, C]` or `[C, H, W]`) → float `[3, H, W]` in [0, 1]; grey is repeated, alpha dropped."""
    x = channels_last(to_array(value), (3, 4))
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] < 3:
        raise ValueError(f"An image must be [H, W], [H, W, 3|4] or [3, H, W], got shape {x.shape}.")
    x = x[..., :3]
    scale = 255.0 if x.dtype == np.uint8 else (65535.0 if x.dtype == np.uint16 else 1.0)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale).permute(2, 0, 1).contiguous()


def decode_class_map(x: np.ndarray, task: str = "class map") -> torch.Tensor:
    """Class ids → long `[H, W]`; 255 stays the ignore value."""
    return torch.from_numpy(single_channel(x, task).astype(np.int64))


def decode_binary_map(x: np.ndarray, task: str = "binary map") -> torch.Tensor:
    """
    A binary map → float `[H, W]` with 0 / 1 and 255 = ignore.

    - 8-bit maps holding the value 1 and nothing but 0, 1 and 255: the project's encoding, 0 / 1 with 255 ignored.
    - Any other 8-bit map (soft 0..255 saliency, or 0 / 255 masks): `v / 255 > 0.5`, the field's rule
      (MTI-Net / MTLoRA `sal_distill`), with no ignore value.
    - 16-bit maps and arrays: values as stored, 0 / 1 with 255 ignored (a 16-bit PNG can hold 255 without ambiguity).
    """
    x = single_channel(x, task)
    if x.dtype == np.uint8:
        values = np.unique(x)
        if not (np.isin(values, (0, 1, IGNORE_INDEX)).all() and (values == 1).any()):
            x = x > 127
    return torch.from_numpy(x.astype(np.float32))


def decode_normals(x: np.ndarray, task: str = "normals") -> torch.Tensor:
    """
    Float `[H, W, 3]` / `[3, H, W]` in [-1, 1], or an 8-bit RGB image with n = 2 v / 255 - 1 → float `[3, H, W]` unit
    vectors. Vectors with a length outside [0.5, 1.5] (zeros, RGB 0,0,0 or 128,128,128) are invalid and become 0.
    """
    x = channels_last(x)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"{task} must be [H, W, 3] or [3, H, W], got shape {x.shape}.")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) * (2.0 / 255.0) - 1.0
    n = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32))
    length = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt()[None]  # n.norm(dim=0) is a slow strided reduction
    valid = (length >= 0.5) & (length <= 1.5)
    return torch.where(valid, n / length.clamp_min(1e-12), torch.zeros_like(n))


def decode_depth(x: np.ndarray, task: str = "depth") -> torch.Tensor:
    """Float metres, or integers (a 16-bit PNG) in millimetres → float `[H, W]` metres, 0 = invalid."""
    x = single_channel(x, task)
    scale = 1000.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    return torch.from_numpy(x.astype(np.float32) / scale)


def decode_edge_texture(x: np.ndarray, task: str = "edge_texture") -> torch.Tensor:
    """
    Texture-edge strength → float `[H, W]`, every pixel valid. 8-bit maps store `round(clip(m / 0.10, 0, 1) * 255)`
    (camvid_mt's `build.py`), so they decode to `v / 255 * 0.10`; float arrays are taken as stored.
    """
    x = single_channel(x, task)
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) * (0.10 / 255.0))
    return torch.from_numpy(x.astype(np.float32))
