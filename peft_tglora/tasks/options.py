"""
Task options of the training command line, checked: image size, task list, loss weights.

A typo in a task name (`normal` for `normals`) is an error that lists the known names, never silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from .specs import TASKS, default_loss_weights, get_dataset_spec


def parse_image_size(value: str) -> int | list[int]:
    """`"224"` -> 224; `"120,160"` -> [120, 160] (H, W)."""
    try:
        sides = [int(v) for v in value.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 8:
        raise ValueError(f"Image size {value!r}: give one side or H,W, each at least 8 (e.g. 224 or 120,160).")
    return sides[0] if len(sides) == 1 else sides


def parse_tasks(value: str | None, dataset: str) -> list[str]:
    """Comma-separated task names (default: `dataset`'s default tasks), each one a task `dataset` provides."""
    spec = get_dataset_spec(dataset)
    known = [*spec.tasks, *spec.extra_tasks]
    tasks = [t.strip() for t in value.split(",")] if value else list(spec.tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        table = f" (tasks in the table: {sorted(TASKS)})" if set(unknown) - set(TASKS) else ""
        raise ValueError(f"--tasks {unknown} are not tasks of --dataset {dataset} {known}{table}.")
    return tasks


def parse_loss_weights(value: str | None, dataset: str, tasks: Sequence[str]) -> dict[str, float]:
    """`"semseg=1,normals=10"` over `dataset`'s default weights; every name must be one of `tasks`."""
    weights = default_loss_weights(dataset, list(tasks))
    for item in filter(None, (value or "").split(",")):
        task, _, number = (part.strip() for part in item.partition("="))
        if task not in tasks:
            raise ValueError(f"--loss_weights names {task!r}, which is not one of the tasks {list(tasks)}.")
        try:
            weights[task] = float(number)
        except ValueError:
            raise ValueError(f"--loss_weights {item!r}: write task=number, e.g. normals=10.") from None
        if not math.isfinite(weights[task]) or weights[task] < 0:
            raise ValueError(f"--loss_weights {item!r}: the weight must be a finite number >= 0.")
    return weights


AUGMENTATIONS = ("reference", "scale_rotate", "flip")  # the choices of `augmentation` (the CLI's --augmentation)


def augmentation(choice: str, dataset: str) -> list:
    """
    Transforms before the flip: `"reference"` the data set's own scale / rotation recipe (PASCAL, NYUD; none for the
    others), `"scale_rotate"` that or PASCAL's where the data set has none, `"flip"` nothing more.
    """
    from .transforms import reference_augmentation

    if choice not in AUGMENTATIONS:
        raise ValueError(f"--augmentation {choice!r}: choose reference, scale_rotate or flip.")
    recipe = reference_augmentation(dataset) if choice != "flip" else []
    if choice == "scale_rotate" and not recipe:
        recipe = reference_augmentation("pascal_context")
    return recipe


def parse_task_groups(value: str, tasks: Sequence[str]):
    """`1,1,2,4`, `shared`, `per_task`, `auto:1,1,2,4`, or a JSON tree whose task names must all be in `tasks`."""
    if not value.lstrip().startswith("["):
        return value
    tree = json.loads(value)
    unknown = sorted({t for stage in tree for group in stage for t in group} - set(tasks))
    if unknown:
        raise ValueError(f"--task_groups names tasks {unknown} that are not in --tasks {tasks}.")
    return tree
