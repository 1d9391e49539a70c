"""
Training-side data: samples augmented from a per-sample seed, the loaders built on them (`build_dataloaders`), and the
up-front check that every row decodes.

Both name the files of a row that cannot be decoded, so that a bad image fails with its path (before the first step
with `check_split`, or at its batch otherwise) rather than with a bare decoding error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .data import MultiTaskDataset, collate, decode_example


def _undecoded(dataset):
    """`dataset` with its image columns left as `{"bytes", "path"}` dicts, so a broken file can be named."""
    features = getattr(dataset, "features", None)
    if features is None:
        return dataset
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def describe_row(dataset, index: int) -> str:
    """`row 3 (id '2008_000123': images/2008_000123.jpg, semseg/2008_000123.png)`: the row with its files."""
    try:
        row = _undecoded(dataset)[int(index)]
    except Exception as error:  # noqa: BLE001  describing must not hide the original error
        return f"row {index} (unreadable: {type(error).__name__}: {error})"
    files = []
    for column, value in row.items():
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, (str, os.PathLike)) and column != "id":
            files.append(f"{column}={os.fspath(path)}")
    name = f"row {index}" + (f" (id {row['id']!r})" if "id" in row else "")
    return f"{name}: {', '.join(files)}" if files else f"{name} (stored in memory, no file)"


def check_split(
    dataset, tasks: Sequence[str], split: str, indices: Sequence[int] | None = None, max_errors: int = 10
) -> list[str]:
    """
    Decode the rows `indices` (default: all) of `dataset` and return one message per row that fails, naming its files.

    A row fails when a file is missing or cannot be decoded, or when a label's size differs from its image's
    (`decode_example`'s checks). Stops after `max_errors` failures. Run before training, so that a bad file is found
    in seconds rather than at its batch hours later.
    """
    indices = range(len(dataset)) if indices is None else indices
    raw = _undecoded(dataset)
    errors = []
    for index in indices:
        try:
            decode_example(raw[int(index)], tasks)
        except Exception as error:  # noqa: BLE001  every failure is reported with its row
            errors.append(f"{split} {describe_row(dataset, index)}: {type(error).__name__}: {error}")
            if len(errors) >= max_errors:
                break
    return errors


class SeededMultiTaskDataset(MultiTaskDataset):
    """
    `MultiTaskDataset` whose augmentation for row `i` in epoch `e` draws from a generator seeded by `(seed, e, i)`.

    A sample's augmentation then depends on nothing else: not on which process or worker loads it, not on how many
    batches came before, and not on whether the run was interrupted and resumed, so a resumed run sees the same data
    as an uninterrupted one. Call `set_epoch(e)` before each epoch.

    `prepare` is a deterministic transform run right after decoding (e.g. `Resize`); with `cache=True` its output is
    kept in memory, so later epochs skip decoding and resizing (for sets that fit in memory, such as the demo's; each
    data loader worker holds its own cache). A row that cannot be decoded raises with its files named.
    """

    def __init__(
        self, dataset, tasks: Sequence[str], transform: Callable, seed: int = 0, *, prepare=None, cache=False
    ):
        super().__init__(dataset, tasks, transform)
        self.seed, self.epoch, self.prepare = seed, 0, prepare
        self._cache: dict[int, dict] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _prepared(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        try:
            sample = decode_example(self.dataset[index], self.tasks)
        except Exception as error:
            raise RuntimeError(
                f"Cannot decode {describe_row(self.dataset, index)} ({type(error).__name__}: {error}). Fix or remove "
                "the file; the check before training (on unless --skip_data_check) lists every such row."
            ) from error
        sample = self.prepare(sample) if self.prepare is not None else sample
        if self._cache is not None:
            self._cache[index] = sample  # transforms build new tensors, so the cached ones are never changed
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) >> 1)
        return self.transform(dict(self._prepared(int(index))), generator)


def check_splits(splits: dict, tasks: Sequence[str], accelerator) -> None:
    """`check_split` on every split before the first step, each process a share; raises listing every bad row."""
    from accelerate.utils import gather_object

    errors = []
    for split, data in splits.items():
        errors += check_split(
            data, tasks, split, range(accelerator.process_index, len(data), accelerator.num_processes)
        )
    errors = [e for found in gather_object([errors]) for e in found]  # every process raises alike
    if errors:
        raise ValueError(
            f"{len(errors)} rows cannot be used (fix or remove their files; --skip_data_check skips this scan):\n"
            + "\n".join(errors)
        )


def load_splits(
    dataset: str,
    tasks: Sequence[str],
    eval_split: str,
    *,
    root=None,
    hub_id=None,
    synthetic_size: int = 64,
    image_size: int | Sequence[int] = 64,
    seed: int = 0,
):
    """
    `(train, eval)` of `dataset` from `root` or `hub_id`; `"synthetic"` without either is generated: `synthetic_size`
    training rows (seed `seed`) and a quarter as many evaluation rows (`seed + 1`), square at the longer side of
    `image_size` (resized later like any data set), the same in every process, so nothing is shared or downloaded.
    """
    from .data import load_multitask_dataset
    from .synthetic import make_synthetic_multitask

    if dataset == "synthetic" and root is None and hub_id is None:
        side = image_size if isinstance(image_size, int) else max(image_size)
        train = make_synthetic_multitask(synthetic_size, side, tasks, seed=seed)
        return train, make_synthetic_multitask(max(synthetic_size // 4, 8), side, tasks, seed=seed + 1)
    kwargs = dict(root=root, hub_id=hub_id, tasks=tasks)
    return load_multitask_dataset(dataset, "train", **kwargs), load_multitask_dataset(dataset, eval_split, **kwargs)


def build_dataloaders(
    train_dataset,
    eval_dataset,
    tasks: Sequence[str],
    *,
    image_size: int | Sequence[int],
    batch_size: int,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    crop: int | Sequence[int] | None = None,
    augment: Sequence = (),
    cache: bool = False,
    pin_memory: bool = False,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """
    Train and eval loaders over `datasets.Dataset`s from `load_multitask_dataset` (or `load_splits`).

    Both decode each row and resize it to `image_size` (training rows kept in memory with `cache`). Training then
    applies `augment` (e.g. `transforms.reference_augmentation("pascal_context")`, the field's random scale and
    rotation), random-crops to `crop` if given, flips at random and normalises, with a generator seeded by
    `(seed, epoch, row)` (`SeededMultiTaskDataset`): the same samples in every process, worker and resumed run, new
    ones after `train.dataset.set_epoch(epoch)`. `seed` also seeds the shuffling. Evaluation only normalises, so its
    metrics are computed at `image_size`, not at each image's original size.
    """
    from .transforms import Resize, eval_transforms, train_transforms

    # the pipelines' own Resize finds every map at `image_size` already (resized, and cached, by `prepare`): a no-op
    train_set = SeededMultiTaskDataset(
        train_dataset, tasks, train_transforms(image_size, crop=crop, augment=augment), seed=seed,
        prepare=Resize(image_size), cache=cache,
    )  # fmt: skip
    eval_set = SeededMultiTaskDataset(eval_dataset, tasks, eval_transforms(image_size), prepare=Resize(image_size))
    common = dict(collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory)
    # own generators: starting an epoch or an evaluation then draws no number from the global RNG, which dropout and
    # stochastic depth use, so a resumed run's model sees the same random numbers as an uninterrupted one
    train = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
        generator=torch.Generator().manual_seed(seed), **common,
    )  # fmt: skip
    evaluation = torch.utils.data.DataLoader(
        eval_set, batch_size=eval_batch_size or batch_size, generator=torch.Generator(), **common
    )
    return train, evaluation
