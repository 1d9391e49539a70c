"""The task table: everything that differs between dense-prediction tasks, in one `TaskSpec` per task.

How a task's label is decoded, how geometric transforms move its map, its loss, its metric, how a head's output becomes
a prediction and a picture: all of it is read from `TASKS` by the rest of `peft_tglora.tasks`, so adding a task means
adding one entry here (and a function in `labels.py`, `losses.py`, `metrics/core.py` or `outputs.py` only if none of
the existing ones fits). Per-dataset facts (class counts, default loss weights, default task list) live in `DATASETS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import labels, losses, outputs
from .labels import IGNORE_INDEX
from .metrics.core import HIGHER_IS_BETTER, RMSE, MaxF, MeanAngularError, MeanIoU, SaliencyMeter


@dataclass(frozen=True)
class MapRule:
    """
    How paired geometric transforms move one task's map, so that no map is left behind or blended wrongly.

    Args:
        interpolation (`str`): `"nearest"` (class ids, depth: never blend a label with its neighbour or an invalid 0),
            `"bilinear"` (smooth maps), or `"normals"` (bilinear, re-normalised, invalid pixels kept invalid).
        fill (`float`): Value of pixels a crop, pad or rotation brings in from outside the image.
        mirror_x (`bool`): Negate channel 0 on a horizontal flip (the x component of surface normals).
        divide_by_scale (`bool`): Divide values by a zoom's scale (depth: a zoomed-in object looks nearer).
    """

    interpolation: str
    fill: float
    mirror_x: bool = False
    divide_by_scale: bool = False


CLASS_MAP = MapRule("nearest", IGNORE_INDEX)
DEPTH_MAP = MapRule("nearest", 0.0, divide_by_scale=True)  # 0 = invalid depth
SMOOTH_MAP = MapRule("bilinear", 0.0)
NORMALS_MAP = MapRule("normals", 0.0, mirror_x=True)  # a zero vector = invalid normal
IMAGE_MAP = MapRule("bilinear", 0.0)


@dataclass(frozen=True)
class TaskSpec:
    """
    Everything task-specific about one dense-prediction task.

    Args:
        name (`str`): Task name, also the key of its label in a batch and of its head in a model.
        kind (`str`): `"classification"` (long `[B, H, W]` class ids), `"binary"` (float `[B, H, W]` in {0, 1} with
            `IGNORE_INDEX`) or `"regression"` (float maps).
        num_outputs (`int`): Channels the head predicts; 0 for classification, whose class count is a dataset
            property (`DatasetSpec.num_classes`, see `num_outputs_for`).
        decode (`Callable[[np.ndarray, str], Tensor]`): Stored array → label tensor (`labels.py`).
        suffixes (`tuple[str, ...]`): File suffixes of its labels in a local folder, searched in order; the first is
            the one `save_multitask_folder` writes.
        map_rule (`MapRule`): How resize, crop, flip and rotation move its map.
        loss (`Callable[[Tensor, Tensor], Tensor]`): `(head output at label size, label) -> scalar` (`losses.py`).
        metric (`str`): The primary metric key its meter reports (the one Δm uses); a key of
            `metrics.core.HIGHER_IS_BETTER`, which gives its direction (the property `higher_is_better`).
        meter (`Callable[[int], meter]`): `num_outputs -> ` a streaming meter with `update(prediction, target)` and
            `compute() -> dict` (`metrics/core.py`).
        postprocess (`Callable[[Tensor], Tensor]`): Head output `[B, C, H, W]` → what the meter takes (`outputs.py`).
        visualise (`Callable[[np.ndarray], np.ndarray]`): One prediction → an RGB uint8 picture (`outputs.py`).
    """

    name: str
    kind: str
    num_outputs: int
    decode: Callable
    suffixes: tuple[str, ...]
    map_rule: MapRule
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: str
    meter: Callable[[int], object]
    postprocess: Callable[[torch.Tensor], torch.Tensor]
    visualise: Callable

    def __post_init__(self):
        if self.metric not in HIGHER_IS_BETTER:
            raise ValueError(
                f"Task {self.name!r}: metric {self.metric!r} has no direction in metrics.core.HIGHER_IS_BETTER "
                f"(known: {sorted(HIGHER_IS_BETTER)}); add it there."
            )

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger primary metric is better; Δm flips the sign where it is not."""
        return HIGHER_IS_BETTER[self.metric]


TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec(
        "semseg", "classification", 0, labels.decode_class_map, (".png",), CLASS_MAP,
        losses.cross_entropy, "mIoU", MeanIoU, outputs.class_ids, outputs.colour_classes,
    ),
    "human_parts": TaskSpec(
        "human_parts", "classification", 0, labels.decode_class_map, (".png",), CLASS_MAP,
        losses.cross_entropy, "mIoU", MeanIoU, outputs.class_ids, outputs.colour_classes,
    ),
    # MTI-Net / MTLoRA train saliency with a class-balanced BCE whose weight is the batch's background fraction, and
    # score it with maxF at beta^2 = 0.3
    "saliency": TaskSpec(
        "saliency", "binary", 1, labels.decode_binary_map, (".png",), CLASS_MAP,
        losses.balanced_bce, "maxF", lambda _: SaliencyMeter(), outputs.probabilities, outputs.grey,
    ),
    "normals": TaskSpec(
        "normals", "regression", 3, labels.decode_normals, (".npy", ".png"), NORMALS_MAP,
        losses.normals_l1, "mean_angular_error", lambda _: MeanAngularError(), outputs.unit_vectors,
        outputs.colour_normals,
    ),
    "depth": TaskSpec(
        "depth", "regression", 1, labels.decode_depth, (".npy", ".png"), DEPTH_MAP,
        losses.depth_l1, "rmse", lambda _: RMSE(), outputs.scalar_map, outputs.grey_near_bright,
    ),
    # edges are rare (~5% of PASCAL's pixels): MTI-Net weights positives by 0.95 and negatives by 0.05; maxF at
    # beta^2 = 1 is a pixel-exact proxy of the published ODS-F
    "edges": TaskSpec(
        "edges", "binary", 1, labels.decode_binary_map, (".png", ".npy"), CLASS_MAP,
        partial(losses.balanced_bce, pos_weight=0.95), "maxF", lambda _: MaxF(beta_squared=1.0),
        outputs.probabilities, outputs.grey,
    ),
    # Taskonomy's edge_texture (Sobel magnitude of the blurred grey image): every pixel is valid and 5 % of
    # camvid_mt's targets are exactly 0, so loss and RMSE run over all pixels, unlike depth's
    "edge_texture": TaskSpec(
        "edge_texture", "regression", 1, labels.decode_edge_texture, (".npy", ".png"), SMOOTH_MAP,
        losses.l1, "rmse", lambda _: RMSE(zero_is_invalid=False), outputs.scalar_map, outputs.grey_stretched,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """
    Per-dataset defaults.

    Args:
        name (`str`): Name accepted by `load_multitask_dataset`.
        tasks (`tuple[str, ...]`): The tasks trained by default, in the usual reporting order.
        extra_tasks (`tuple[str, ...]`): Further tasks the data provides, trained when asked for (PASCAL's edges,
            which the paper's four-task benchmark leaves out).
        num_classes (`dict[str, int]`): Classes of each classification task, background included.
        loss_weights (`dict[str, float]`): Default weight of each task in the summed multi-task loss.
        splits (`tuple[str, ...]`): Split names of the standard multi-task partition.
        augmentation (`dict`, *optional*): `transforms.RandomScaleRotate` arguments of the field's training recipe for
            this data set (`transforms.reference_augmentation`); `None` for none.
    """

    name: str
    tasks: tuple[str, ...]
    num_classes: dict[str, int]
    loss_weights: dict[str, float]
    splits: tuple[str, ...] = ("train", "val")
    augmentation: dict | None = None
    extra_tasks: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    # PASCAL-Context as split for multi-task learning by ASTMT / MTI-Net: 4998 train, 5105 val; semseg uses the 21
    # PASCAL VOC classes (background included), human parts 6 parts + background. Weights: MTLoRA's PASCAL recipe.
    "pascal_context": DatasetSpec(
        "pascal_context",
        ("semseg", "human_parts", "saliency", "normals"),
        {"semseg": 21, "human_parts": 7},
        {"semseg": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0},
        # MTI-Net / MTLoRA's PASCAL training: scale uniform in [0.75, 1.25], rotation uniform in [-20, 20] degrees
        augmentation={"scales": (0.75, 1.25), "rotations": (-20.0, 20.0)},
        extra_tasks=("edges",),
    ),
    # NYUD-v2 as in MTI-Net: 795 train, 654 val; 40 semantic classes (NYU-40; unlabelled pixels are IGNORE_INDEX).
    # Weights: semseg 1 and depth 1 as in MTI-Net's NYUD configs; normals 10 and edges 50 carried over from PASCAL.
    "nyud": DatasetSpec(
        "nyud",
        ("semseg", "depth", "normals", "edges"),
        {"semseg": 40},
        {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0},
        # MTI-Net's NYUD training: scale one of 1, 1.2, 1.5, no rotation (depth divided by the scale)
        augmentation={"scales": [1.0, 1.2, 1.5], "rotations": [0.0]},
    ),
    # camvid_mt (shared/data/camvid_mt/README.md): CamVid street frames at 160x120, 11 classes, 367 train / 101 val.
    # Weights put the losses of trivial predictions on one scale (by hand from the folder's stats_train.json): CE of a
    # uniform guess over 11 classes = ln 11 = 2.4; edges' BCE at logit 0 ≈ 0.69 (0.95 · 0.13 + 0.05 · 0.87) = 0.12 → x20;
    # saliency's balanced BCE at logit 0 ≈ 0.69 · 2 · 0.068 · 0.932 = 0.088 → x25; edge_texture's L1 of a constant 0 =
    # its mean 0.0139 → x170. A randomly initialised regression head starts further off (L1 ≈ 0.6 measured by
    # benchmarks/bench_accuracy.py), so edge_texture dominates the first steps until its head learns the scale.
    "camvid": DatasetSpec(
        "camvid",
        ("semseg", "edges", "saliency", "edge_texture"),
        {"semseg": 11},
        {"semseg": 1.0, "edges": 20.0, "saliency": 25.0, "edge_texture": 170.0},
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
