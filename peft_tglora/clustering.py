"""Task similarities as data (`TaskSimilarity`, its JSON) and the task trees cut from them by agglomerative clustering.

Numpy only, so that ``TGLoraConfig`` can build a tree from a similarity file without importing the torch-heavy
gradient tool (`peft_tglora.similarity`, which computes a `TaskSimilarity`); matplotlib is imported inside
`plot_similarity` only.
A tree is one partition of the tasks per stage; every stage's groups split the previous stage's groups. Cutting one
dendrogram at a non-decreasing number of clusters gives that refinement by construction, so nothing needs repairing.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


__all__ = [
    "TaskSimilarity",
    "build_task_tree",
    "cut_tree",
    "dendrogram_layout",
    "linkage_matrix",
    "plot_similarity",
    "similarity_inputs",
    "validate_groups_per_stage",
]

LINKAGES = ("average", "complete", "single")


@dataclass
class TaskSimilarity:
    """Result of `compute_task_similarity`; ``matrix[i, j]`` compares ``tasks[i]`` and ``tasks[j]``.

    Args:
        tasks: task names, the row and column order of ``matrix``.
        matrix: ``[T, T]`` similarities in [-1, 1], symmetric, diagonal 1.
        num_batches: batches each task contributed (summed over processes).
        wrt: which parameters the gradients were taken for (``"backbone"``, ``"adapters"`` or ``"explicit"``).
        num_parameters: length of the flattened gradient before any projection.
        projection_dim: length after the seeded random projection, or ``None`` when gradients were not projected.
        seed: seed of the run (projection, head warm-up, dataloader shuffling through the global generator).
        head_warmup_steps: optimiser steps the heads got on frozen features before gradients were taken.
        within_task: per task, the mean cosine between gradients of two different batches (``None`` with one batch).
        half_matrices: ``[2, T, T]``, the similarity from the even and from the odd batches alone (``None`` when a task
            had fewer than 2 batches). Trees cut from the two should agree when the similarity is above its noise.
        half_cosine: ``[T, T]``, cosine between task i's mean unit gradient over the even batches and task j's over the
            odd ones, symmetrised. Its diagonal is within-task consistency; off the diagonal, the between-task value
            on the same footing. Off-diagonal values close to the diagonal mean the tasks cannot be told apart.
        stability: a JSON dict written by `peft_tglora.tasks.grouping.group_tasks` (partitions per seed and per half).
    """

    tasks: list[str]
    matrix: np.ndarray
    num_batches: list[int] = field(default_factory=list)
    wrt: str = "backbone"
    num_parameters: int | None = None
    projection_dim: int | None = None
    seed: int = 0
    head_warmup_steps: int = 0
    within_task: list[float | None] = field(default_factory=list)
    half_matrices: np.ndarray | None = None
    half_cosine: np.ndarray | None = None
    stability: dict | None = None

    _ARRAYS = ("matrix", "half_matrices", "half_cosine")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in self._ARRAYS:
            if out[key] is not None:
                out[key] = np.asarray(out[key], dtype=np.float64).tolist()
        return out

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"tasks": [...], "matrix": [[...]], ...}``, the file ``TGLoraConfig(similarity_file=...)`` reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> TaskSimilarity:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "tasks" not in data or "matrix" not in data:
            raise ValueError(f"{path} is not a task-similarity file: it needs the keys 'tasks' and 'matrix'.")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}  # newer files may carry more keys
        for key in cls._ARRAYS:
            if known.get(key) is not None:
                known[key] = np.asarray(known[key], dtype=np.float64)
        return cls(**known)

    def plot(
        self,
        path: str | Path,
        *,
        linkage: str = "average",
        title: str | None = None,
        groups_per_stage: list[int] | None = None,
    ) -> Path:
        """Save a heatmap (tasks in dendrogram order, names on both axes) under the dendrogram that trees are cut from.

        With ``groups_per_stage``, each stage's cut is drawn on the dendrogram and its groups are boxed on the heatmap.
        """
        return plot_similarity(
            self.tasks,
            self.matrix,
            path,
            linkage=linkage,
            title=title or f"Task similarity (gradients w.r.t. {self.wrt})",
            groups_per_stage=groups_per_stage,
        )


def validate_groups_per_stage(counts: Sequence[int], num_tasks: int) -> list[int]:
    """Check per-stage group counts and return them as a list of ints; raise a ValueError that names the fix."""
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) == 0:
        raise ValueError(
            f"groups_per_stage={counts!r} must be a non-empty list of per-stage group counts, e.g. [1, 1, 2, 4]."
        )
    out = []
    for stage, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            # ValueError, not TypeError: the config reports every bad tree value the same way, as peft configs do
            raise ValueError(f"groups_per_stage[{stage}]={count!r} must be an int (a number of task groups).")  # noqa: TRY004
        if not 1 <= count <= num_tasks:
            raise ValueError(
                f"groups_per_stage[{stage}]={count} must be between 1 and the number of tasks ({num_tasks}); "
                f"lower it to at most {num_tasks}."
            )
        if out and count < out[-1]:
            raise ValueError(
                f"groups_per_stage={list(counts)} must be non-decreasing over stages (a later stage can only split "
                f"groups, never merge them): stage {stage} has {count} < {out[-1]} groups."
            )
        out.append(int(count))
    return out


def similarity_inputs(sim_or_matrix, tasks: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Return ``(tasks, matrix)`` from a ``TaskSimilarity``, its JSON dict, or a plain matrix plus ``tasks``.

    When both a similarity object and ``tasks`` are given, the matrix is re-ordered (and restricted) to ``tasks``, so a
    config can use a similarity file computed for a superset of its tasks or in another order.
    """
    if isinstance(sim_or_matrix, dict):
        own_tasks, matrix = sim_or_matrix.get("tasks"), sim_or_matrix.get("matrix")
        if own_tasks is None or matrix is None:
            raise ValueError(
                f"A similarity dict needs the keys 'tasks' and 'matrix'; got keys {sorted(sim_or_matrix)}."
            )
    elif hasattr(sim_or_matrix, "matrix") and hasattr(sim_or_matrix, "tasks"):
        own_tasks, matrix = sim_or_matrix.tasks, sim_or_matrix.matrix
    else:
        own_tasks, matrix = None, sim_or_matrix
    if hasattr(matrix, "detach"):  # a torch tensor, possibly on an accelerator
        matrix = matrix.detach().cpu().numpy()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"The similarity matrix must be square T x T with T >= 1; got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError("The similarity matrix contains NaN or inf; recompute it or fix the file.")
    if not np.allclose(matrix, matrix.T, atol=1e-6):
        raise ValueError("The similarity matrix must be symmetric; symmetrise it with (S + S.T) / 2.")
    if own_tasks is None:
        if tasks is None:
            raise ValueError("Pass tasks=[...] (one name per row) together with a plain similarity matrix.")
        own_tasks = list(tasks)
    own_tasks = [str(t) for t in own_tasks]
    if len(set(own_tasks)) != len(own_tasks):
        raise ValueError(f"Task names must be unique; got {own_tasks}.")
    if len(own_tasks) != matrix.shape[0]:
        raise ValueError(f"{len(own_tasks)} task names {own_tasks} do not match a {matrix.shape[0]}-row matrix.")
    if tasks is None:
        return own_tasks, matrix
    tasks = [str(t) for t in tasks]
    missing = [t for t in tasks if t not in own_tasks]
    if missing or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"tasks={tasks} must be unique names present in the similarity's tasks {own_tasks}; missing: {missing}."
        )
    index = [own_tasks.index(t) for t in tasks]
    return tasks, matrix[np.ix_(index, index)]


def linkage_matrix(matrix, linkage: str = "average") -> np.ndarray:
    """Agglomerative clustering on distance ``1 - similarity``; returns a scipy-style ``[T-1, 4]`` linkage.

    Row i merges clusters ``Z[i, 0] < Z[i, 1]`` (leaves are 0..T-1, the cluster made by row i is T+i) at distance
    ``Z[i, 2]`` into a cluster of ``Z[i, 3]`` tasks. Ties are broken by the smallest task index in each cluster, so the
    result depends only on the matrix. T is small (tasks, not samples), so a plain O(T^3) loop is enough.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r} is not supported; use one of {LINKAGES}.")
    dist = 1.0 - np.asarray(matrix, dtype=np.float64)
    num = dist.shape[0]
    reduce = {"average": np.mean, "complete": np.max, "single": np.min}[linkage]
    clusters = {i: [i] for i in range(num)}  # cluster id -> sorted task indices
    rows = []
    for step in range(num - 1):
        best = None
        for a in clusters:
            for b in clusters:
                if clusters[a][0] >= clusters[b][0]:
                    continue
                d = float(reduce(dist[np.ix_(clusters[a], clusters[b])]))
                key = (d, clusters[a][0], clusters[b][0])
                if best is None or key < best[0]:
                    best = (key, a, b)
        (d, _, _), a, b = best
        merged = sorted(clusters.pop(a) + clusters.pop(b))
        clusters[num + step] = merged
        rows.append([min(a, b), max(a, b), d, len(merged)])
    return np.asarray(rows, dtype=np.float64).reshape(max(num - 1, 0), 4)


def cut_tree(linkage: np.ndarray, num_clusters: int) -> list[list[int]]:
    """Partition of the leaves after the first ``T - num_clusters`` merges, groups ordered by first task index."""
    num = linkage.shape[0] + 1
    clusters = {i: [i] for i in range(num)}
    for step in range(num - num_clusters):
        a, b = int(linkage[step, 0]), int(linkage[step, 1])
        clusters[num + step] = sorted(clusters.pop(a) + clusters.pop(b))
    return sorted(clusters.values())


def _counts_from_threshold(linkage: np.ndarray, threshold, num_stages: int) -> list[int]:
    """Per-stage group counts: at similarity threshold t, tasks stay together when they merge at similarity >= t."""
    if isinstance(threshold, (int, float, np.floating)) and not isinstance(threshold, bool):
        thresholds = [-math.inf] * (num_stages - 1) + [float(threshold)]
    else:
        thresholds = [float(t) for t in threshold]
        if not thresholds or any(b < a for a, b in itertools.pairwise(thresholds)):
            raise ValueError(
                f"threshold={list(threshold)} must be a non-empty, non-decreasing list of per-stage similarity "
                "thresholds (a later stage can only split groups)."
            )
    if any(math.isnan(t) for t in thresholds):
        raise ValueError(f"threshold={threshold!r} contains NaN; give similarity values such as 0.5.")
    num = linkage.shape[0] + 1
    merge_similarity = 1.0 - linkage[:, 2]
    # Average, complete and single linkage are monotone: merge distances never decrease, so the merges kept at a
    # threshold are a prefix of the linkage and the counts are a valid cut for every stage.
    return [num - int(np.sum(merge_similarity >= t - 1e-12)) for t in thresholds]


def build_task_tree(
    sim_or_matrix,
    groups_per_stage: Sequence[int] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    threshold: float | Sequence[float] | None = None,
    num_stages: int = 4,
    linkage: str = "average",
) -> list[list[list[str]]]:
    """Build a task tree (one partition of the task names per stage) from a task similarity.

    Args:
        sim_or_matrix: a `TaskSimilarity`, a dict with ``"tasks"`` and ``"matrix"`` (its JSON), or a T x T matrix
            together with ``tasks``.
        groups_per_stage: number of task groups at each stage, non-decreasing, each between 1 and T, e.g.
            ``[1, 1, 2, 4]``. Exactly one of ``groups_per_stage`` and ``threshold`` must be given.
        tasks: task names in the order used for the output; re-orders or restricts a similarity that has names.
        threshold: choose the counts from similarity instead. A list gives one threshold per stage (non-decreasing):
            at a stage, two clusters share a group when their linkage similarity (``1 - distance``; for average
            linkage the mean pairwise similarity) is at least the threshold. A single float sets only the last stage;
            the ``num_stages - 1`` stages before it get one group.
        num_stages: number of stages when ``threshold`` is a single float.
        linkage: ``"average"`` (default), ``"complete"`` or ``"single"``.

    Returns:
        ``tree[stage][group]`` is a list of task names. Groups are ordered by their first task in ``tasks`` order and
        names within a group follow ``tasks`` order, so equal inputs give equal trees.
    """
    names, matrix = similarity_inputs(sim_or_matrix, tasks)
    link = linkage_matrix(matrix, linkage)
    if (groups_per_stage is None) == (threshold is None):
        raise ValueError(
            "Give exactly one of groups_per_stage (e.g. [1, 1, 2, 4]) and threshold (per-stage similarity values)."
        )
    if threshold is not None:
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages={num_stages!r} must be a positive int.")
        groups_per_stage = _counts_from_threshold(link, threshold, num_stages)
    counts = validate_groups_per_stage(groups_per_stage, len(names))
    return [[[names[i] for i in group] for group in cut_tree(link, count)] for count in counts]


def dendrogram_layout(link: np.ndarray) -> tuple[list[int], list[tuple[list[float], list[float]]]]:
    """Leaf order and line segments of a dendrogram drawn from a scipy-style linkage (no scipy needed)."""
    num = link.shape[0] + 1
    children = {num + i: (int(a), int(b)) for i, (a, b, _, _) in enumerate(link)}

    def leaves(node):
        return [node] if node < num else leaves(children[node][0]) + leaves(children[node][1])

    order = leaves(2 * num - 2) if num > 1 else [0]
    x = {leaf: float(i) for i, leaf in enumerate(order)}
    y = dict.fromkeys(range(num), 0.0)
    segments = []
    for i, (a, b, height, _) in enumerate(link):
        a, b = int(a), int(b)
        segments.append(([x[a], x[a], x[b], x[b]], [y[a], height, height, y[b]]))
        x[num + i], y[num + i] = (x[a] + x[b]) / 2, height
    return order, segments


def plot_similarity(
    tasks: Sequence[str],
    matrix,
    path,
    *,
    linkage: str = "average",
    title: str = "Task similarity",
    groups_per_stage: Sequence[int] | None = None,
):
    """Save a heatmap (tasks in dendrogram order) under the dendrogram; with ``groups_per_stage``, draw each cut.

    A stage with k groups cuts the dendrogram between its (T-k)-th and (T-k+1)-th merge: a dashed line there, and
    boxes around that stage's groups on the heatmap (the dendrogram order keeps every group contiguous).
    """
    from matplotlib.figure import Figure  # lazy: plotting is optional, and Figure needs no global backend
    from matplotlib.patches import Rectangle

    names, matrix = list(tasks), np.asarray(matrix, dtype=np.float64)
    num = len(names)
    link = linkage_matrix(matrix, linkage)
    order, segments = dendrogram_layout(link)
    size = 2.5 + 0.6 * num
    fig = Figure(figsize=(size, size * 1.35), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 3])
    for seg_x, seg_y in segments:
        top.plot(seg_x, seg_y, color="black", linewidth=1)
    top.set_xlim(-0.5, num - 0.5)
    top.set_xticks([])
    top.set_ylabel(f"1 - similarity ({linkage})")
    top.set_title(title)
    ordered = matrix[np.ix_(order, order)]
    image = bottom.imshow(ordered, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")  # auto: columns under leaves
    bottom.set_xticks(range(num), [names[i] for i in order], rotation=45, ha="right")
    bottom.set_yticks(range(num), [names[i] for i in order])
    for (r, c), value in np.ndenumerate(ordered):
        color = "white" if abs(value) > 0.6 else "black"
        bottom.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    if groups_per_stage is not None:
        counts = validate_groups_per_stage(groups_per_stage, num)
        heights = [0.0, *link[:, 2].tolist()]  # merge heights; the cut for k groups lies above the first T-k merges
        top_height = heights[-1] if num > 1 else 1.0
        stages_of = {k: [s for s, c in enumerate(counts) if c == k] for k in dict.fromkeys(counts)}
        for rank, (k, stages) in enumerate(stages_of.items()):
            low = heights[num - k]
            high = heights[num - k + 1] if k > 1 else top_height * 1.1 + 0.05
            y = (low + high) / 2
            color = f"C{rank}"
            label = f"stage{'s' * (len(stages) > 1)} {','.join(map(str, stages))}: {k} group{'s' * (k > 1)}"
            top.axhline(y, color=color, linestyle="--", linewidth=1)
            top.text(num - 0.5, y, label, color=color, fontsize=7, ha="right", va="bottom")
            position = {task: i for i, task in enumerate(order)}
            for group in cut_tree(link, k):
                first = min(position[i] for i in group)  # the group's columns are contiguous in dendrogram order
                inset = 0.04 * rank
                box = Rectangle(
                    (first - 0.5 + inset, first - 0.5 + inset),
                    len(group) - 2 * inset,
                    len(group) - 2 * inset,
                    fill=False,
                    edgecolor=color,
                    linewidth=1.5,
                )
                bottom.add_patch(box)
        top.set_ylim(0, top_height * 1.2 + 0.05)
    fig.colorbar(image, ax=[top, bottom], shrink=0.6)  # on both axes, so they keep equal widths
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
