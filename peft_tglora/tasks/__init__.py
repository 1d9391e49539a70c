"""Multi-task dense prediction for the training examples: the task table, heads, losses, metrics and data.

Kept apart from the tuner (DESIGN.md): nothing in `peft_tglora`'s core imports this subpackage. `datasets` and `PIL`
(the `train` extra) are imported only inside the functions that need them. `specs.TASKS` is the one per-task table.
"""

from .data import (
    MultiTaskDataset,
    collate,
    decode_example,
    decode_label,
    load_multitask_dataset,
    save_multitask_folder,
)
from .heads import MultiScaleHead, build_head, build_heads
from .labels import IGNORE_INDEX, decode_image
from .objectives import build_loss, build_meter, delta_m, multitask_loss, postprocess, task_loss
from .specs import (
    DATASETS,
    TASKS,
    DatasetSpec,
    MapRule,
    TaskSpec,
    default_loss_weights,
    get_dataset_spec,
    get_task_spec,
    num_outputs_for,
)
from .synthetic import make_synthetic_multitask
from .training_data import build_dataloaders
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
    "TASKS",
    "Compose",
    "DatasetSpec",
    "MapRule",
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
    "load_multitask_dataset",
    "make_synthetic_multitask",
    "multitask_loss",
    "num_outputs_for",
    "postprocess",
    "save_multitask_folder",
    "task_loss",
    "train_transforms",
]
