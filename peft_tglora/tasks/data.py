"""
Data sets for multi-task dense prediction: loading (local folder or Hub), decoding to tensors, batching.

`load_multitask_dataset` returns a `datasets.Dataset` with an `"image"` column and one column per task, in any of the
stored forms `decode_example` understands (PIL images, numpy arrays / nested lists, or paths to .png / .jpg / .npy
files). `MultiTaskDataset` decodes and transforms rows into tensors; `collate` stacks them into the batch dict the
heads and losses take; `training_data.build_dataloaders` builds the loaders. docs/TASKS.md documents the folder layout
and the label encodings.

`datasets` is imported inside the functions that need it, so `import peft_tglora` works without the `train` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .labels import decode_image, to_array
from .specs import get_dataset_spec, get_task_spec


IMAGE_DIR = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def decode_label(task: str, value) -> torch.Tensor:
    """One stored label (file path, PIL image, array, ...) → the tensor format of the batch, by the task's decoder."""
    return get_task_spec(task).decode(to_array(value), task)


def decode_example(example: Mapping, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """A row of a multi-task data set → `{"image": [3, H, W], task: label, ...}`, checking that sizes agree."""
    sample = {"image": decode_image(example["image"])}
    size = tuple(sample["image"].shape[-2:])
    for task in tasks:
        if task not in example:
            raise KeyError(f"The example has no column {task!r}; it has {sorted(example)}.")
        label = decode_label(task, example[task])
        if tuple(label.shape[-2:]) != size:
            raise ValueError(f"The {task} label is {tuple(label.shape[-2:])} but its image is {size}.")
        sample[task] = label
    return sample


class MultiTaskDataset(torch.utils.data.Dataset):
    """A map-style torch view of a multi-task `datasets.Dataset`: decode a row, then apply the paired `transform`."""

    def __init__(self, dataset, tasks: Sequence[str], transform: Callable[[dict], dict] | None = None):
        self.dataset, self.tasks, self.transform = dataset, list(tasks), transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = decode_example(self.dataset[int(index)], self.tasks)
        return self.transform(sample) if self.transform is not None else sample


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples with the same keys and sizes into a batch dict."""
    if not samples:
        raise ValueError("Cannot collate an empty list of samples.")
    keys = list(samples[0])
    for i, s in enumerate(samples):
        if list(s) != keys:
            raise ValueError(f"Sample {i} has keys {list(s)} but sample 0 has {keys}.")
    try:
        return {k: torch.stack([s[k] for s in samples]) for k in keys}
    except RuntimeError as e:
        raise ValueError(
            f"Samples have different sizes ({e}); resize or crop them to one size (transforms.Resize / RandomCrop)."
        ) from e


# ---------------------------------------------------------------- loading
def _find(directory: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return None


def _load_folder(root: Path, split: str, tasks: Sequence[str]):
    import datasets

    split_dir = root / split
    image_dir = split_dir / IMAGE_DIR
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"No image folder {str(image_dir)!r}; the layout is root/<split>/images/<id>.jpg plus root/<split>/<task>/"
            "<id>.png|.npy (docs/TASKS.md)."
        )
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{str(image_dir)!r} holds no {'/'.join(IMAGE_SUFFIXES)} image.")
    columns: dict[str, list] = {"id": [p.stem for p in images], "image": [str(p) for p in images]}
    for task in tasks:
        suffixes = get_task_spec(task).suffixes
        found = [_find(split_dir / task, p.stem, suffixes) for p in images]
        missing = [p.stem for p, f in zip(images, found) if f is None]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} images have no {task} label in {str(split_dir / task)!r} "
                f"(looked for {'/'.join(suffixes)}), e.g. {missing[:3]}."
            )
        columns[task] = [str(f) for f in found]
    dataset = datasets.Dataset.from_dict(columns)
    # PNG / JPEG columns become lazily decoded images; .npy columns stay paths that decode_label reads
    for column in ["image", *tasks]:
        if all(not v.endswith(".npy") for v in columns[column]):
            dataset = dataset.cast_column(column, datasets.Image())
    return dataset


def load_multitask_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    hub_id: str | None = None,
    tasks: Sequence[str] | None = None,
    column_map: Mapping[str, str] | None = None,
    **load_kwargs,
):
    """
    Load one split of a multi-task data set as a `datasets.Dataset` with columns `"image"` and one per task.

    Args:
        name (`str`): `"pascal_context"`, `"nyud"` or `"synthetic"` (see `specs.DATASETS`).
        split (`str`): Split name, e.g. `"train"` or `"val"`.
        root (`str` or `PathLike`, *optional*): A local folder in the layout of docs/TASKS.md, or an extracted
            `PASCAL_MT`, MTI-Net `NYUD_MT` or ATRC `NYUDv2` archive (prepared once into a cache, see `prepare.py`).
        hub_id (`str`, *optional*): Anything `datasets.load_dataset` accepts (a Hub repository id, or a local folder of
            parquet / arrow files); `load_kwargs` go to it.
        tasks (`list[str]`, *optional*): Task columns to keep; defaults to the dataset's tasks.
        column_map (`dict`, *optional*): Renames stored columns to ours, e.g. `{"depth_map": "depth"}`.

    `"synthetic"` with neither `root` nor `hub_id` generates data (`make_synthetic_multitask`: 64 train rows with
    seed 0, 32 rows for any other split with seed 1).
    """
    spec = get_dataset_spec(name)
    tasks = list(spec.tasks if tasks is None else tasks)
    for task in tasks:
        get_task_spec(task)
    if root is not None and hub_id is not None:
        raise ValueError("Give either root= (a local folder) or hub_id= (datasets.load_dataset), not both.")
    if root is None and hub_id is None:
        if name == "synthetic":
            from .synthetic import make_synthetic_multitask

            train = split == "train"
            return make_synthetic_multitask(64 if train else 32, tasks=tasks, seed=0 if train else 1)
        raise ValueError(
            f"Dataset {name!r} is not bundled: pass root= (a local folder in the layout of docs/TASKS.md) or hub_id=."
        )
    if root is not None:
        from .prepare import prepared_root

        # an extracted PASCAL_MT / NYUD_MT / NYUDv2 archive is decoded once into a cache in the project's layout
        dataset = _load_folder(prepared_root(name, root, split, tasks), split, tasks)
    else:
        import datasets

        dataset = datasets.load_dataset(hub_id, split=split, **load_kwargs)
    if column_map:
        dataset = dataset.rename_columns(dict(column_map))
    missing = [c for c in ["image", *tasks] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {name!r} {split!r} data has no columns {missing} (it has {dataset.column_names}); "
            "rename stored columns with column_map={'stored_name': 'task'}."
        )
    keep = [c for c in ["id", "image", *tasks] if c in dataset.column_names]
    return dataset.select_columns(keep)


def save_multitask_folder(dataset, root: str | os.PathLike, split: str, tasks: Sequence[str]) -> Path:
    """
    Write a multi-task data set in the local folder layout, e.g. to convert data from another source or to give tests
    a folder to read: PNG images and class maps, 16-bit PNG binary maps (0 / 1, 255 ignored, without the ambiguity
    of an 8-bit 0 / 255 map), and `.npy` for the tasks whose first suffix is `.npy`. Returns the split folder.
    """
    from PIL import Image

    split_dir = Path(root) / split
    for sub in [IMAGE_DIR, *tasks]:
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(dataset) - 1, 0)))
    for i in range(len(dataset)):
        sample = decode_example(dataset[i], tasks)
        stem = f"{i:0{width}d}"
        image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(image).save(split_dir / IMAGE_DIR / f"{stem}.png")
        for task in tasks:
            spec, label = get_task_spec(task), sample[task].numpy()
            if spec.suffixes[0] == ".npy":
                np.save(split_dir / task / f"{stem}.npy", np.moveaxis(label, 0, -1) if label.ndim == 3 else label)
            else:
                dtype = np.uint16 if spec.kind == "binary" else np.uint8
                Image.fromarray(label.astype(dtype)).save(split_dir / task / f"{stem}.png")
    return split_dir
