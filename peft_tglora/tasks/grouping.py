"""Task grouping for a training run: gradient similarity averaged over seeds, the tree it cuts, and how stable it is.

One similarity run is noisy: a task's gradients from two batches may agree at a cosine of only 0.1, and then the
differences between tasks are the size of that noise. `group_tasks` therefore repeats `compute_task_similarity` over
several seeds (fresh head initialisation, head warm-up and batch order each), averages the matrices, cuts the tree from
the average, and reports whether the tree would have been the same for each seed and for each half of the batches
(even / odd), with each task's within-task consistency next to its between-task similarity. docs/SIMILARITY.md says
how to read the report and how many batches to use.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clustering import build_task_tree, validate_groups_per_stage
from ..similarity import TaskSimilarity, compute_task_similarity
from . import task_loss  # the package's name: stable while the task modules move


__all__ = [
    "DEFAULT_HEAD_WARMUP_STEPS",
    "DEFAULT_NUM_BATCHES",
    "DEFAULT_SEEDS",
    "TaskGrouping",
    "auto_task_groups",
    "average_similarity",
    "default_groups_per_stage",
    "group_tasks",
    "parse_auto_task_groups",
    "run_losses",
    "stability_report",
]

logger = logging.getLogger(__name__)

# defaults measured on CamVid (benchmarks/bench_similarity_stability.py, benchmarks/RESULTS.md)
DEFAULT_NUM_BATCHES = 16
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_HEAD_WARMUP_STEPS = 30  # 10 left the 2-group partition moving with the seed at 8 batches


@dataclass
class TaskGrouping:
    """What `group_tasks` returns: the seed-averaged similarity (its ``stability`` set), the tree, the files written."""

    similarity: TaskSimilarity
    tree: list[list[list[str]]]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def stability(self) -> dict:
        return self.similarity.stability


def default_groups_per_stage(num_tasks: int, num_stages: int) -> list[int]:
    """The paper's 1, 1, 2, 4 pattern for any size: one group until the last two stages, then 2, then one per task."""
    if num_stages < 2:
        return [num_tasks] * num_stages
    return [1] * (num_stages - 2) + [min(2, num_tasks), num_tasks]


def parse_auto_task_groups(task_groups) -> list[int] | None:
    """``"auto"`` -> ``None`` (default counts), ``"auto:1,1,2,4"`` -> ``[1, 1, 2, 4]``; raise for anything else."""
    spec = str(task_groups).strip()
    head, _, counts = spec.partition(":")
    if head != "auto":
        raise ValueError(
            f"task_groups={task_groups!r} is not 'auto' or 'auto:<groups per stage>' (e.g. auto:1,1,2,4)."
        )
    if not counts:
        return None
    try:
        return [int(c) for c in counts.split(",")]
    except ValueError:
        raise ValueError(
            f"task_groups={task_groups!r}: after 'auto:' give comma-separated group counts, e.g. 'auto:1,1,2,4'."
        ) from None


def average_similarity(runs: Sequence[TaskSimilarity]) -> TaskSimilarity:
    """Element-wise mean of several runs over the same tasks (matrices, within-task values, half statistics)."""
    if not runs:
        raise ValueError("average_similarity needs at least one TaskSimilarity.")
    tasks = list(runs[0].tasks)
    if any(list(r.tasks) != tasks for r in runs):
        raise ValueError(f"All runs must cover the same tasks in the same order; got {[r.tasks for r in runs]}.")

    def mean(values):
        return None if any(v is None for v in values) else np.mean(np.asarray(values, dtype=np.float64), axis=0)

    within = mean([r.within_task for r in runs])
    return TaskSimilarity(
        tasks=tasks,
        matrix=mean([r.matrix for r in runs]),
        num_batches=runs[0].num_batches,
        wrt=runs[0].wrt,
        num_parameters=runs[0].num_parameters,
        projection_dim=runs[0].projection_dim,
        seed=runs[0].seed,
        head_warmup_steps=runs[0].head_warmup_steps,
        within_task=[None] * len(tasks) if within is None else within.tolist(),
        half_matrices=mean([r.half_matrices for r in runs]),
        half_cosine=mean([r.half_cosine for r in runs]),
    )


def stability_report(
    runs: Sequence[TaskSimilarity], groups_per_stage: Sequence[int], *, linkage: str = "average"
) -> dict:
    """Is the tree cut from the seed average also the tree of every seed and of every half of the batches?

    Returns a JSON dict: per stage the partition of the average, the fraction of the alternatives (each seed, each
    half of each seed) that give the same partition and whether all do (``stable``), split into ``seed_agreement``
    (seeds that give the average's partition: heads and batch order) and ``half_agreement`` (halves that give their
    own seed's partition: too few batches); the partitions themselves; per
    task the within-task consistency (cosine of its mean unit gradients over the even and the odd batches, mean over
    seeds) and its largest between-task value on the same footing (``half_cosine`` off the diagonal).
    """
    average = average_similarity(runs)
    counts = validate_groups_per_stage(list(groups_per_stage), len(average.tasks))
    tasks = average.tasks
    tree = build_task_tree(average, counts, linkage=linkage)
    per_seed = [build_task_tree(r, counts, linkage=linkage) for r in runs]
    per_half = [
        [build_task_tree(half, counts, tasks=tasks, linkage=linkage) for half in r.half_matrices]
        for r in runs
        if r.half_matrices is not None
    ]
    stages = []
    for s, count in enumerate(counts):
        seeds_same = [tree[s] == t[s] for t in per_seed]  # each seed against the average
        halves_same = [h[s] == t[s] for t, pair in zip(per_seed, per_half) for h in pair]  # each half against its seed
        alternatives = [t[s] for t in per_seed] + [h[s] for pair in per_half for h in pair]
        agree = sum(a == tree[s] for a in alternatives)
        stages.append(
            {
                "groups": count,
                "partition": tree[s],
                "agreement": agree / len(alternatives),
                "seed_agreement": sum(seeds_same) / len(seeds_same),
                "half_agreement": sum(halves_same) / len(halves_same) if halves_same else None,
                "stable": agree == len(alternatives),
            }
        )
    report = {
        "seeds": [r.seed for r in runs],
        "num_batches": list(average.num_batches),
        "linkage": linkage,
        "stable": all(stage["stable"] for stage in stages),
        "stages": stages,
        "partitions_per_seed": per_seed,
        "partitions_per_half": per_half,
        "matrix_per_seed": [np.asarray(r.matrix).tolist() for r in runs],
    }
    if average.half_cosine is not None:
        cosine = average.half_cosine
        off = cosine + np.diag(np.full(len(tasks), -np.inf))
        report["within_task"] = dict(zip(tasks, np.diag(cosine).tolist()))
        report["between_task_max"] = dict(zip(tasks, off.max(axis=1).tolist()) if len(tasks) > 1 else {})
    return report


def _reinitialise(heads: Mapping[str, nn.Module], seed: int) -> dict[str, nn.Module]:
    """Fresh copies of the heads, re-initialised from ``seed`` (the paper's randomly initialised heads).

    One deep copy of the whole mapping, so tasks that share a head object still share (identical) weights.
    """
    heads = copy.deepcopy(dict(heads))
    unique = {id(m): m for head in heads.values() for m in head.modules() if hasattr(m, "reset_parameters")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in unique.values():
            module.reset_parameters()
    return heads


def group_tasks(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    losses: Mapping[str, Callable],
    dataloader: Iterable[dict] | Mapping[str, Iterable[dict]],
    groups_per_stage: Sequence[int],
    *,
    num_batches: int = DEFAULT_NUM_BATCHES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    head_warmup_steps: int = DEFAULT_HEAD_WARMUP_STEPS,
    linkage: str = "average",
    reinit_heads: bool = True,
    output_dir: str | Path | None = None,
    write_files: bool = True,
    **similarity_kwargs,
) -> TaskGrouping:
    """Similarity averaged over ``seeds``, the tree cut from it at ``groups_per_stage``, and a stability report.

    Args:
        backbone, heads, losses, dataloader: as for `compute_task_similarity` (the frozen backbone wrapped with
            ``task_groups="shared"``, one head and one loss per task, batches of dicts).
        groups_per_stage: task groups per stage, non-decreasing, e.g. ``[1, 1, 2, 4]``.
        num_batches: batches per seed; half of them (the even ones) and the other half are also compared alone.
        seeds: one similarity run per seed. Each re-initialises the heads (``reinit_heads``), seeds the warm-up and,
            for a ``DataLoader`` with its own ``generator``, its shuffling (the generator is restored afterwards).
        output_dir: when given (and ``write_files``), write ``similarity.json`` (with the stability report),
            ``task_tree.json`` and ``similarity.png`` (heatmap with each stage's cut) there.
        similarity_kwargs: passed to `compute_task_similarity` (``wrt``, ``projection_dim``, ``accelerator``, ...).
    """
    if not seeds:
        raise ValueError("seeds is empty; give at least one, e.g. seeds=(0, 1, 2).")
    counts = validate_groups_per_stage(list(groups_per_stage), len(heads))
    generator = getattr(dataloader, "generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    runs = []
    try:
        for seed in seeds:
            if saved is not None:
                generator.manual_seed(seed)
            run_heads = _reinitialise(heads, seed) if reinit_heads else heads
            runs.append(
                compute_task_similarity(
                    backbone,
                    run_heads,
                    losses,
                    dataloader,
                    num_batches=num_batches,
                    seed=seed,
                    head_warmup_steps=head_warmup_steps,
                    **similarity_kwargs,
                )
            )
    finally:
        if saved is not None:
            generator.set_state(saved)
    similarity = average_similarity(runs)
    similarity.stability = stability_report(runs, counts, linkage=linkage)
    tree = build_task_tree(similarity, counts, linkage=linkage)
    result = TaskGrouping(similarity, tree)
    _log(result)
    if output_dir is not None and write_files:
        out = Path(output_dir)
        result.files["similarity"] = similarity.to_json(out / "similarity.json")
        record = {"tasks": similarity.tasks, "task_groups": tree, "groups_per_stage": counts, "linkage": linkage,
                  "similarity_file": "similarity.json"}  # fmt: skip
        result.files["tree"] = out / "task_tree.json"
        result.files["tree"].write_text(json.dumps(record, indent=2) + "\n")
        result.files["plot"] = similarity.plot(
            out / "similarity.png", linkage=linkage, groups_per_stage=counts,
            title=f"Task similarity, mean of {len(seeds)} seeds x {num_batches} batches",
        )  # fmt: skip
    return result


def _log(result: TaskGrouping) -> None:
    report = result.stability
    for s, stage in enumerate(report["stages"]):
        groups = " ".join("[" + ", ".join(g) + "]" for g in stage["partition"])
        halves = "-" if stage["half_agreement"] is None else f"{100 * stage['half_agreement']:.0f}%"
        logger.info(
            "stage %d: %s  (seeds agree: %.0f%%, halves: %s)", s, groups, 100 * stage["seed_agreement"], halves
        )
    for task, value in report.get("within_task", {}).items():
        logger.info("%s: within-task consistency %.2f, largest between-task %.2f", task, value,
                    report["between_task_max"].get(task, float("nan")))  # fmt: skip
    unstable = [s for s, stage in enumerate(report["stages"]) if not stage["stable"]]
    if unstable:
        logger.warning(
            "The partition at stage(s) %s changes with the seed or the half of the batches: the task similarities "
            "there are the size of their noise. Use more batches (num_batches) or seeds, or choose the groups "
            "yourself (docs/SIMILARITY.md).",
            unstable,
        )


def run_losses(tasks: Sequence[str]) -> dict[str, Callable]:
    """The training run's per-task losses, on a head output resized to the labels (the image size)."""

    def make(task):
        def loss(prediction, batch):
            size = batch["pixel_values"].shape[-2:]
            if prediction.shape[-2:] != size:
                prediction = F.interpolate(prediction, size=size, mode="bilinear", align_corners=False)
            return task_loss(task, prediction, batch)

        return loss

    return {task: make(task) for task in tasks}


def auto_task_groups(model, dataloader, task_groups, output_dir=None, *, accelerator=None, **kwargs) -> TaskGrouping:
    """``task_groups="auto[:counts]"`` in a training run: group the tasks with the run's own heads, losses and data.

    ``model`` is the run's backbone-plus-heads (``.backbone`` wrapped with ``task_groups="shared"``, ``.heads`` a dict
    of heads); ``dataloader`` the training loader, before ``accelerator.prepare``. With an accelerator, every process
    runs the same batches and the sums are reduced, so all processes get the same tree; only the main one writes.
    """
    backbone, heads = model.backbone, dict(model.heads)
    counts = parse_auto_task_groups(task_groups)
    if counts is None:
        num_stages = len(backbone.peft_config["default"].task_groups)
        counts = default_groups_per_stage(len(heads), num_stages)
    if accelerator is not None:
        backbone.to(accelerator.device)
    is_main = accelerator is None or accelerator.is_main_process
    return group_tasks(
        backbone, heads, run_losses(list(heads)), dataloader, counts, output_dir=output_dir, write_files=is_main,
        accelerator=accelerator, disable_progress=not is_main, **kwargs,
    )  # fmt: skip
