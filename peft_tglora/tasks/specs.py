"""The task registry: what each dense-prediction task predicts, how it is trained and how it is scored.

Every other module of `peft_tglora.tasks` (heads, losses, metrics, data) reads its per-task facts from here, so adding
a task means adding one `TaskSpec` and, if its loss or metric is new, one function in `losses.py` / `metrics/core.py`.
Per-dataset facts (number of classes, default loss weights, default task list) live in `DATASETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


IGNORE_INDEX = 255
"""Label value of pixels that carry no label in integer maps (semseg, human parts, saliency, edges)."""


@dataclass(frozen=True)
class TaskSpec:
    """
    Static description of one dense-prediction task.

    Args:
        name (`str`):
            Task name, also the key of the task's label in a batch and of its head in a model.
        kind (`str`):
            `"classification"` (per-pixel class index, `long [B, H, W]` labels), `"binary"` (per-pixel probability,
            `float [B, H, W]` labels in {0, 1} or `IGNORE_INDEX`), or `"regression"` (`float` labels, 0 = invalid).
        num_outputs (`int`):
            Channels the head predicts. For classification tasks this is a dataset property, so it is `0` here and
            comes from `DatasetSpec.num_classes` (see `num_outputs_for`).
        loss (`str`):
            Name of the loss in `peft_tglora.tasks.losses.LOSSES`.
        metric (`str`):
            Primary metric key reported by the task's metric (the one Δm uses), e.g. `"mIoU"`.
        higher_is_better (`bool`):
            Whether a larger primary metric is better; Δm flips the sign of tasks where it is not.
        metric_module (`str`):
            Folder of the `evaluate` module under `peft_tglora/tasks/metrics/`.
        ignore_index (`int` or `None`):
            Label value ignored by loss and metric for integer / binary labels; `None` for regression tasks, which use
            0 as "invalid" instead (a zero normal vector, or a zero depth).
        loss_kwargs (`dict`):
            Extra keyword arguments for the loss (e.g. the positive-class weight of the edge loss).
    """

    name: str
    kind: str
    num_outputs: int
    loss: str
    metric: str
    higher_is_better: bool
    metric_module: str
    ignore_index: int | None = IGNORE_INDEX
    loss_kwargs: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semseg", "classification", 0, "cross_entropy", "mIoU", True, "miou"),
    "human_parts": TaskSpec("human_parts", "classification", 0, "cross_entropy", "mIoU", True, "miou"),
    # MTI-Net / MTLoRA train saliency with a class-balanced BCE whose weight is the batch's background fraction
    "saliency": TaskSpec("saliency", "binary", 1, "balanced_bce", "maxF", True, "max_f"),
    "normals": TaskSpec(
        "normals", "regression", 3, "normals_l1", "mean_angular_error", False, "mean_angular_error", None
    ),
    "depth": TaskSpec("depth", "regression", 1, "depth_l1", "rmse", False, "rmse", None),
    # edges are rare (~5% of pixels): MTI-Net weights positives by 0.95 and negatives by 0.05
    "edges": TaskSpec("edges", "binary", 1, "balanced_bce", "maxF", True, "max_f", loss_kwargs={"pos_weight": 0.95}),
}


@dataclass(frozen=True)
class DatasetSpec:
    """
    Per-dataset defaults.

    Args:
        name (`str`): Name accepted by `load_multitask_dataset`.
        tasks (`tuple[str, ...]`): The tasks the dataset provides, in the usual reporting order.
        num_classes (`dict[str, int]`): Classes of each classification task, background included.
        loss_weights (`dict[str, float]`): Default weight of each task in the summed multi-task loss.
        splits (`tuple[str, ...]`): Split names of the standard multi-task partition.
    """

    name: str
    tasks: tuple[str, ...]
    num_classes: dict[str, int]
    loss_weights: dict[str, float]
    splits: tuple[str, ...] = ("train", "val")


DATASETS: dict[str, DatasetSpec] = {
    # PASCAL-Context as split for multi-task learning by ASTMT / MTI-Net: 4998 train, 5105 val; semseg uses the 21
    # PASCAL VOC classes (background included), human parts 6 parts + background. Weights: MTLoRA's PASCAL recipe.
    "pascal_context": DatasetSpec(
        "pascal_context",
        ("semseg", "human_parts", "saliency", "normals"),
        {"semseg": 21, "human_parts": 7},
        {"semseg": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0},
    ),
    # NYUD-v2 as in MTI-Net: 795 train, 654 val; 40 semantic classes (NYU-40; unlabelled pixels are IGNORE_INDEX).
    # Weights: semseg 1 and depth 1 as in MTI-Net's NYUD configs; normals 10 and edges 50 carried over from PASCAL.
    "nyud": DatasetSpec(
        "nyud",
        ("semseg", "depth", "normals", "edges"),
        {"semseg": 40},
        {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0},
    ),
    # Made by `make_synthetic_multitask`; small class counts keep tiny test models fast.
    "synthetic": DatasetSpec(
        "synthetic",
        ("semseg", "human_parts", "saliency", "normals", "depth", "edges"),
        {"semseg": 4, "human_parts": 4},
        {"semseg": 1.0, "human_parts": 1.0, "saliency": 1.0, "normals": 1.0, "depth": 1.0, "edges": 1.0},
    ),
}


def get_task_spec(task: str) -> TaskSpec:
    """Return the `TaskSpec` of `task`, or raise a `ValueError` that lists the known tasks."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks are {sorted(TASKS)}. Add a TaskSpec to TASKS for it.")
    return TASKS[task]


def get_dataset_spec(dataset: str) -> DatasetSpec:
    """Return the `DatasetSpec` of `dataset`, or raise a `ValueError` that lists the known data sets."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; known datasets are {sorted(DATASETS)}.")
    return DATASETS[dataset]


def num_outputs_for(task: str, dataset: str | None = None, num_classes: int | None = None) -> int:
    """
    Channels the head of `task` must predict.

    Classification tasks need either `num_classes` or a `dataset` whose `DatasetSpec` knows the class count; the other
    tasks have a fixed channel count (1 for saliency, depth and edges, 3 for normals).
    """
    spec = get_task_spec(task)
    if spec.kind != "classification":
        return spec.num_outputs
    if num_classes is not None:
        return num_classes
    if dataset is not None:
        counts = get_dataset_spec(dataset).num_classes
        if task in counts:
            return counts[task]
        raise ValueError(f"Dataset {dataset!r} has no class count for task {task!r}; pass num_classes= explicitly.")
    raise ValueError(
        f"Task {task!r} is a classification task: pass dataset= (one of {sorted(DATASETS)}) or num_classes=."
    )


def default_loss_weights(dataset: str, tasks: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """Default loss weight of each of `tasks` (all of the dataset's tasks when `None`) for `dataset`."""
    spec = get_dataset_spec(dataset)
    tasks = spec.tasks if tasks is None else tasks
    missing = [t for t in tasks if t not in spec.loss_weights]
    if missing:
        raise ValueError(
            f"Dataset {dataset!r} has no default loss weight for tasks {missing}; pass weights explicitly."
        )
    return {t: spec.loss_weights[t] for t in tasks}
