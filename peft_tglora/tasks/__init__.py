"""
Multi-task dense prediction for the training examples: task registry, heads, losses, metrics and data.

Kept apart from the tuner (DESIGN.md): nothing in `peft_tglora`'s core imports this subpackage. `datasets`,
`evaluate` and `PIL` (the `train` extra) are imported only inside the functions that need them.
"""

from .data import (
    MultiTaskDataset,
    build_dataloaders,
    collate,
    decode_example,
    decode_image,
    decode_label,
    load_multitask_dataset,
    save_multitask_folder,
)
from .heads import MultiScaleHead, build_head, build_heads
from .losses import LOSSES, build_loss, multitask_loss, task_loss
from .metrics import build_meter, delta_m, load_metric, metric_path, postprocess
from .specs import (
    DATASETS,
    IGNORE_INDEX,
    TASKS,
    DatasetSpec,
    TaskSpec,
    default_loss_weights,
    get_dataset_spec,
    get_task_spec,
    num_outputs_for,
)
from .synthetic import make_synthetic_multitask
from .transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    eval_transforms,
    train_transforms,
)


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "LOSSES",
    "TASKS",
    "Compose",
    "DatasetSpec",
    "MultiScaleHead",
    "MultiTaskDataset",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "TaskSpec",
    "build_dataloaders",
    "build_head",
    "build_heads",
    "build_loss",
    "build_meter",
    "collate",
    "decode_example",
    "decode_image",
    "decode_label",
    "default_loss_weights",
    "delta_m",
    "eval_transforms",
    "get_dataset_spec",
    "get_task_spec",
    "load_metric",
    "load_multitask_dataset",
    "make_synthetic_multitask",
    "metric_path",
    "multitask_loss",
    "num_outputs_for",
    "postprocess",
    "save_multitask_folder",
    "task_loss",
    "train_transforms",
]
