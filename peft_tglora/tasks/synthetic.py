"""
A small synthetic multi-task data set with learnable structure, for tests and the demo.

Each image shows a smooth background and 1-3 filled shapes (discs or rectangles). A shape's class (1 to
`num_semseg_classes - 1`) sets its colour, so semantic segmentation is learnable from pixels; every label derives from
the same scene, so the tasks are related as real ones are:

- semseg: the shape's class, 0 for background.
- human_parts: shapes of class 1 ("person") are cut into horizontal bands, part 1 at the top; the image darkens band
  by band so the parts are visible. Everything else is 0 (background).
- saliency: 1 inside any shape.
- depth: a ramp from far (top) to near (bottom) plus a gentle bump, with each shape a nearer dome on top of it.
- normals: from the depth gradient, n = normalise(-dz/dx, -dz/dy, 1), in the camera frame of `data.py` (x right,
  y down, z towards the camera); a few pixels are marked invalid (zeros) to exercise masking.
- edges: 1 where the semseg label differs from a 4-neighbour.

Rows use the same column types as real data (`datasets.Image` for 8-bit maps, float arrays for depth and normals),
so `load_multitask_dataset`'s decoding is exercised by the synthetic data too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _scene(rng: np.random.Generator, size: int, num_classes: int, num_parts: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    palette = np.linspace(0.15, 0.95, num_classes - 1)
    depth = 6.0 - 3.0 * yy + 0.5 * np.sin(2 * np.pi * xx) * np.sin(np.pi * yy)
    image = np.stack([0.3 + 0.2 * xx, 0.35 + 0.1 * yy, 0.4 * np.ones_like(xx)], -1)
    semseg = np.zeros((size, size), np.int64)
    parts = np.zeros((size, size), np.int64)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.12, 0.25, 2)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        if not mask.any():
            continue
        semseg[mask] = cls
        bump = np.clip(1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, None)
        depth[mask] = (2.0 + rng.uniform(0, 1.5) - 0.8 * np.sqrt(bump))[mask]
        colour = np.array([palette[cls - 1], 1 - palette[cls - 1], 0.5 + 0.4 * (cls % 2)], np.float32)
        image[mask] = colour
        if cls == 1:
            band = np.clip(((yy - (cy - ry)) / (2 * ry) * (num_parts - 1)).astype(np.int64), 0, num_parts - 2)
            parts[mask] = 1 + band[mask]
            image[mask] *= (1.0 - 0.5 * band[mask] / max(num_parts - 2, 1))[:, None]
        parts[mask & (semseg != 1)] = 0
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    dzdy, dzdx = np.gradient(depth * size / 8.0)
    normals = np.stack([-dzdx, -dzdy, np.ones_like(depth)], 0)
    normals /= np.linalg.norm(normals, axis=0, keepdims=True)
    normals[:, rng.random((size, size)) < 0.02] = 0.0
    edges = np.zeros((size, size), np.uint8)
    edges[:-1] |= semseg[:-1] != semseg[1:]
    edges[1:] |= semseg[1:] != semseg[:-1]
    edges[:, :-1] |= semseg[:, :-1] != semseg[:, 1:]
    edges[:, 1:] |= semseg[:, 1:] != semseg[:, :-1]
    return {
        "image": (image * 255).round().astype(np.uint8),
        "semseg": semseg.astype(np.uint8),
        "human_parts": parts.astype(np.uint8),
        "saliency": (semseg > 0).astype(np.uint8),
        "normals": normals.astype(np.float32),
        "depth": depth.astype(np.float32),
        "edges": edges,
    }


def make_synthetic_multitask(
    num_images: int = 64,
    image_size: int = 64,
    tasks: Sequence[str] = ("semseg", "human_parts", "saliency", "normals", "depth", "edges"),
    seed: int = 0,
    *,
    num_semseg_classes: int = 4,
    num_parts: int = 4,
):
    """
    A `datasets.Dataset` of `num_images` synthetic scenes with an `"image"` column and one column per task in `tasks`.

    Defaults match `specs.DATASETS["synthetic"]` (4 semseg classes, 4 human-part labels including background). The
    same `seed` gives the same rows. Saliency and edges are stored as 0 / 1 PNGs, the project's binary encoding (docs/TASKS.md).
    """
    import datasets  # optional dependency of the `train` extra
    from PIL import Image

    from .specs import get_task_spec

    tasks = list(tasks)
    for task in tasks:
        get_task_spec(task)
    if num_semseg_classes < 2 or num_parts < 2:
        raise ValueError(
            f"Need at least 2 semseg classes and 2 part labels, got {num_semseg_classes} and {num_parts}."
        )
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"image": []} | {t: [] for t in tasks}
    for _ in range(num_images):
        scene = _scene(rng, image_size, num_semseg_classes, num_parts)
        rows["image"].append(Image.fromarray(scene["image"]))
        for task in tasks:
            value = scene[task]
            rows[task].append(Image.fromarray(value) if value.dtype == np.uint8 else value)
    features = {"image": datasets.Image()}
    for task in tasks:
        if task == "normals":
            features[task] = datasets.Array3D((3, image_size, image_size), "float32")
        elif task == "depth":
            features[task] = datasets.Array2D((image_size, image_size), "float32")
        else:
            features[task] = datasets.Image()
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))
