"""Paired transforms for an image and all of its dense labels, in torch only.

A sample is a dict: `"image"` float `[3, H, W]` in [0, 1], and one label per task in the formats of `labels.py`.
Every geometric transform applies the same window / flip to every map, each moved by its task's `MapRule` from the
task table, so labels stay aligned with pixels. Any other tensor of the image's size is refused rather than left
behind misaligned; keys of other sizes (ids, scalars) pass through. `Normalize` turns `"image"` into `"pixel_values"`.

Randomness: each random transform draws from the `generator` passed to `Compose.__call__` (or the one `Compose` was
built with from `seed`), so a seeded pipeline repeats exactly; without one it uses torch's global RNG, which
`DataLoader` seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .specs import IMAGE_MAP, TASKS, MapRule, get_dataset_spec


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(sample: dict) -> tuple[int, int]:
    return tuple(sample["image"].shape[-2:])


def _maps(sample: dict) -> list[tuple[str, torch.Tensor, MapRule]]:
    """`(key, map, rule)` for the image and every task map; a same-size tensor with no rule is an error."""
    size, found = _size(sample), []
    for key, x in sample.items():
        if key == "image":
            found.append((key, x, IMAGE_MAP))
        elif key in TASKS:
            found.append((key, x, TASKS[key].map_rule))
        elif torch.is_tensor(x) and x.ndim >= 2 and tuple(x.shape[-2:]) == size:
            raise ValueError(
                f"The sample's {key!r} is a {tuple(x.shape)} map but no task of that name is in the task table "
                f"(known: {sorted(TASKS)}), so transforms would leave it misaligned; add a TaskSpec for it."
            )
    return found


def _unit(n: torch.Tensor) -> torch.Tensor:
    """`[3, H, W]` vectors scaled to unit length (0 stays 0): `F.normalize(n, dim=0)`, ~10x faster on CPU, where a
    norm over the leading dimension is a strided reduction (66 ms at 448 px, one thread)."""
    return n / (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt().clamp_min(1e-12)


def _resize_map(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a `[H, W]` or `[C, H, W]` map, keeping its dtype."""
    squeeze = x.ndim == 2
    y = x[None, None] if squeeze else x[None]
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    y = F.interpolate(y.float(), size=size, mode=mode, **kwargs)
    y = y[0, 0] if squeeze else y[0]
    return y.round().to(x.dtype) if not x.is_floating_point() else y


class Resize:
    """
    Resize every map to `size = (H, W)` by its rule: bilinear for the image and smooth maps, nearest for class maps
    and depth (so no label is blended with its neighbour or with an invalid 0), and bilinear for normals, re-normalised
    to unit length, with the nearest-resized validity mask so that invalid pixels stay zero.
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        out = dict(sample)
        for key, x, rule in _maps(sample):
            if tuple(x.shape[-2:]) == self.size:
                continue  # already the size: interpolating would only cost time (and blur normals' norms)
            if rule.interpolation == "normals":
                valid = _resize_map((x.abs().sum(0) > 0).float(), self.size, "nearest") > 0
                out[key] = _unit(_resize_map(x, self.size, "bilinear")) * valid
            else:
                out[key] = _resize_map(x, self.size, rule.interpolation)
                if key == "image":
                    out[key] = out[key].clamp(0.0, 1.0)
        return out


class RandomCrop:
    """
    Crop the same random `size = (H, W)` window out of every map. Maps smaller than the window are first padded at the
    bottom / right with their rule's fill: the image with 0, class maps with 255 (ignored), normals and depth with 0
    (invalid).
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        h, w = _size(sample)
        th, tw = self.size
        ph, pw = max(th - h, 0), max(tw - w, 0)
        top = int(torch.randint(0, max(h + ph - th, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(w + pw - tw, 0) + 1, (1,), generator=generator))
        out = dict(sample)
        for key, x, rule in _maps(sample):
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), value=rule.fill)
            out[key] = x[..., top : top + th, left : left + tw]
        return out


class RandomHorizontalFlip:
    """Flip every map left-right with probability `p`; maps whose rule says `mirror_x` (normals) negate channel 0."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}.")
        self.p = p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if float(torch.rand((), generator=generator)) >= self.p:
            return dict(sample)
        out = dict(sample)
        for key, x, rule in _maps(sample):
            x = x.flip(-1)
            if rule.mirror_x:
                x = x.clone()
                x[0] = -x[0]
            out[key] = x
        return out


class RandomScaleRotate:
    """
    Zoom and rotate every map about its centre on a canvas of the same size (the field's `ScaleNRotate`, as in
    ASTMT / MTI-Net / MTLoRA `custom_transforms.py`): a scale above 1 crops, below 1 pads, each map sampled by its
    rule (nearest for class maps and depth, bilinear for the image and normals) and filled by its rule outside the
    source (255 = ignore for class maps, where the reference's warpAffine writes 0 = background). Normals' in-plane
    (x, y) component turns with the image and maps whose rule says `divide_by_scale` (depth) are divided by the scale,
    as in the reference.

    Args:
        scales (`tuple[float, float]` or `list[float]`): A range to draw uniformly from, or values to choose from.
        rotations (`tuple[float, float]` or `list[float]`): Degrees, counter-clockwise, likewise.
    """

    def __init__(self, scales=(0.75, 1.25), rotations=(-20.0, 20.0)):
        for name, v in (("scales", scales), ("rotations", rotations)):
            if not isinstance(v, (tuple, list)) or not v or (isinstance(v, tuple) and len(v) != 2):
                raise ValueError(f"{name} must be a (low, high) tuple or a non-empty list of values, got {v!r}.")
        if min(scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales!r}.")
        self.scales, self.rotations = scales, rotations

    @staticmethod
    def _draw(values, generator) -> float:
        if isinstance(values, tuple):
            return values[0] + (values[1] - values[0]) * float(torch.rand((), generator=generator))
        return float(values[int(torch.randint(len(values), (), generator=generator))])

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        scale, degrees = self._draw(self.scales, generator), self._draw(self.rotations, generator)
        if scale == 1.0 and degrees == 0.0:
            return dict(sample)
        h, w = _size(sample)
        a = math.radians(degrees)
        cos, sin = math.cos(a) / scale, math.sin(a) / scale
        # output -> source in normalised coordinates: the inverse of "rotate by a, zoom by scale" in pixel units
        theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
        inside = F.grid_sample(torch.ones(1, 1, h, w), grid, mode="nearest", align_corners=False)[0, 0] > 0
        maps = _maps(sample)
        # one grid_sample per interpolation mode: stack the maps' channels
        groups: dict[str, list] = {}
        for key, x, rule in maps:
            y = x[None].float() if x.ndim == 2 else x.float()
            if rule.interpolation == "normals":
                # the reference's in-plane turn, sin / cos of (atan2(x, y) + a), written as a rotation of (x, y)
                ca, sa = math.cos(a), math.sin(a)
                y = torch.stack([y[0] * ca + y[1] * sa, y[1] * ca - y[0] * sa, y[2], (y.abs().sum(0) > 0).float()])
                mode = "bilinear"
            else:
                mode = "nearest" if rule.interpolation == "nearest" else "bilinear"
            groups.setdefault(mode, []).append((key, x, rule, y))
        out = dict(sample)
        for mode, items in groups.items():
            moved = F.grid_sample(torch.cat([y for *_, y in items])[None], grid, mode, align_corners=False)[0]
            offset = 0
            for key, x, rule, y in items:
                z, offset = moved[offset : offset + len(y)], offset + len(y)
                if rule.interpolation == "normals":  # re-normalised; pixels whose source was invalid stay invalid
                    z = _unit(z[:3]) * (z[3:] > 0.999)
                z = torch.where(inside, z, torch.full_like(z, rule.fill))
                z = z[0] if x.ndim == 2 else z
                if rule.divide_by_scale:
                    z = z / scale
                out[key] = z.to(x.dtype) if not x.is_floating_point() else z
        return out


def reference_augmentation(dataset: str) -> list:
    """The random scale / rotation the field trains `dataset` with (its `DatasetSpec.augmentation`), or `[]`."""
    augmentation = get_dataset_spec(dataset).augmentation
    return [RandomScaleRotate(**augmentation)] if augmentation else []


class Normalize:
    """Standardise `"image"` per channel and store it as `"pixel_values"` (the key backbones take)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        out = dict(sample)
        out["pixel_values"] = (out.pop("image") - self.mean) / self.std
        return out


class Compose:
    """Apply transforms in order with one shared generator (seeded from `seed` when given)."""

    def __init__(self, transforms: Sequence, seed: int | None = None):
        self.transforms = list(transforms)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        generator = self.generator if generator is None else generator
        for t in self.transforms:
            sample = t(sample, generator)
        return sample


def train_transforms(
    image_size: int | Sequence[int],
    *,
    crop: int | Sequence[int] | None = None,
    seed: int | None = None,
    augment: Sequence = (),
    **norm,
) -> Compose:
    """
    Resize to `image_size`, then `augment` (e.g. `reference_augmentation(dataset)`), optionally random-crop to
    `crop`, random flip, normalise.
    """
    steps = [Resize(image_size), *augment] + ([RandomCrop(crop)] if crop is not None else [])
    return Compose([*steps, RandomHorizontalFlip(0.5), Normalize(**norm)], seed=seed)


def eval_transforms(image_size: int | Sequence[int], **norm) -> Compose:
    """Resize to `image_size` and normalise; no randomness."""
    return Compose([Resize(image_size), Normalize(**norm)])
