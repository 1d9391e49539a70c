"""The task tree: one partition of the tasks per stage, each refining the one before.

A stage with G groups carries G streams stacked along the batch dimension, group-major:
rows ``[g * B, (g + 1) * B)`` of every tensor inside that stage belong to group ``g``. When a stage
splits, child ``g`` starts as a copy of its parent's stream (``parent_indices``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from pathlib import Path


PRESETS = ("shared", "per_task")


@dataclass(frozen=True)
class StreamLayout:
    """Which groups run at each stage, stacked in this order, and the position of each one's parent stream among
    the groups of the stage before (stage 0: the single input stream)."""

    groups: tuple[tuple[int, ...], ...]
    parents: tuple[tuple[int, ...], ...]

    def splits_at(self, stage: int) -> bool:
        """Whether entering `stage` changes the stream layout (anything but one child per parent, in order)."""
        # every stream kept keeps at least one child, so "parents == 0..G-1" means one child each, in order
        return self.parents[stage] != tuple(range(len(self.groups[stage])))

    def position(self, group: int, stage: int) -> int:
        """Where `group`'s rows sit among the streams stacked at `stage`."""
        return self.groups[stage].index(group)


@dataclass(frozen=True)
class TaskTree:
    """A validated task tree. Build it with [`TaskTree.from_groups`]."""

    tasks: tuple[str, ...]
    stages: tuple[tuple[tuple[str, ...], ...], ...]

    @classmethod
    def from_groups(cls, tasks: Sequence[str], task_groups: Sequence[Sequence[Sequence[str]]]) -> TaskTree:
        tasks = tuple(tasks)
        validate_task_groups(tasks, task_groups)
        return cls(tasks, tuple(tuple(tuple(group) for group in stage) for stage in task_groups))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @cached_property
    def groups_per_stage(self) -> tuple[int, ...]:
        return tuple(len(stage) for stage in self.stages)

    @cached_property
    def _group_index(self) -> tuple[dict[str, int], ...]:
        return tuple({task: g for g, group in enumerate(stage) for task in group} for stage in self.stages)

    def group_of(self, task: str, stage: int) -> int:
        """Index of the group (stream) that serves `task` at `stage`."""
        if task not in self._group_index[stage]:
            raise KeyError(f"Unknown task {task!r}; this tree has tasks {list(self.tasks)}.")
        return self._group_index[stage][task]

    @cached_property
    def parent_indices(self) -> tuple[tuple[int, ...], ...]:
        """For each stage, the parent stream of every group (stage 0's parent is the single input stream)."""
        parents = [tuple(0 for _ in self.stages[0])]
        for s in range(1, self.num_stages):
            parents.append(tuple(self.group_of(group[0], s - 1) for group in self.stages[s]))
        return tuple(parents)

    def splits_at(self, stage: int) -> bool:
        """Whether entering `stage` changes the stream layout when every task runs (see `StreamLayout.splits_at`)."""
        return self.layout().splits_at(stage)

    def layout(self, tasks: Sequence[str] | None = None) -> StreamLayout:
        """The streams that serve `tasks` (default: all): the groups on the paths from the input to their leaves."""
        if tasks is None:
            return StreamLayout(tuple(tuple(range(g)) for g in self.groups_per_stage), self.parent_indices)
        unknown = [t for t in tasks if t not in self._group_index[0]]
        if unknown or not tasks:
            raise ValueError(
                f"`tasks={list(tasks)}` must name one or more of this tree's tasks {list(self.tasks)}"
                + (f"; unknown: {unknown}." if unknown else ".")
            )
        groups = tuple(tuple(sorted({self.group_of(t, s) for t in tasks})) for s in range(self.num_stages))
        parents, previous = [], (0,)
        for s, stage_groups in enumerate(groups):
            # a child's parent sits at its position among the previous stage's selected groups
            parents.append(tuple(previous.index(self.parent_indices[s][g]) for g in stage_groups))
            previous = stage_groups
        return StreamLayout(groups, tuple(parents))

    def to_groups(self) -> list[list[list[str]]]:
        return [[list(group) for group in stage] for stage in self.stages]

    def to_text(self) -> str:
        """One line per stage, groups in brackets: the tree at a glance in logs and model cards."""
        return "\n".join(
            f"stage {s}: " + " ".join("[" + ", ".join(group) + "]" for group in stage)
            for s, stage in enumerate(self.stages)
        )

    def to_mermaid(self) -> str:
        """The tree as a Mermaid flowchart (the Hub and GitHub draw it): pixels -> streams per stage -> tasks."""
        lines = ["flowchart LR", '  x(["pixels"])']
        for s, stage in enumerate(self.stages):
            for g, group in enumerate(stage):
                lines.append(f'  s{s}g{g}["stage {s}: {", ".join(group)}"]')
                parent = "x" if s == 0 else f"s{s - 1}g{self.parent_indices[s][g]}"
                lines.append(f"  {parent} --> s{s}g{g}")
        last = self.num_stages - 1
        for t, task in enumerate(self.tasks):
            lines.append(f'  t{t}(("{task}"))')
            lines.append(f"  s{last}g{self.group_of(task, last)} --> t{t}")
        return "\n".join(lines)


def validate_task_groups(tasks: Sequence[str], task_groups: Sequence[Sequence[Sequence[str]]]) -> None:
    """Raise a `ValueError` that names the bad value and the fix unless `task_groups` is a valid tree over `tasks`."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("`tasks` is empty; give the names of the tasks, e.g. tasks=['semseg', 'depth'].")
    if any(not isinstance(t, str) or not t for t in tasks):
        raise ValueError(f"`tasks` must be non-empty strings, got {tasks}.")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"`tasks` lists {duplicates} more than once; each task must appear once.")
    if isinstance(task_groups, str) or not task_groups:
        raise ValueError(
            f"`task_groups` must be a non-empty list with one partition of the tasks per stage, got {task_groups!r}."
        )
    known = set(tasks)
    previous: dict[str, int] | None = None
    for s, stage in enumerate(task_groups):
        if isinstance(stage, str) or not isinstance(stage, Sequence) or not stage:
            raise ValueError(f"Stage {s} of `task_groups` must be a non-empty list of groups, got {stage!r}.")
        seen: dict[str, int] = {}
        for g, group in enumerate(stage):
            if isinstance(group, str) or not isinstance(group, Sequence) or not group:
                raise ValueError(
                    f"Group {g} of stage {s} must be a non-empty list of task names, got {group!r}; "
                    f"write a single task as [{group!r}]."
                )
            for task in group:
                if task not in known:
                    raise ValueError(
                        f"Unknown task {task!r} in stage {s}, group {g}; known tasks are {tasks}. "
                        "Add it to `tasks` or fix the spelling."
                    )
                if task in seen:
                    raise ValueError(f"Task {task!r} appears twice in stage {s}; each task belongs to one group.")
                seen[task] = g
        missing = [t for t in tasks if t not in seen]
        if missing:
            raise ValueError(
                f"Stage {s} of `task_groups` is missing tasks {missing}; every stage must cover all tasks."
            )
        if previous is not None:
            for g, group in enumerate(stage):
                parents = sorted({previous[t] for t in group})
                if len(parents) > 1:
                    raise ValueError(
                        f"Stage {s} group {list(group)} is not a refinement of stage {s - 1}: its tasks sit in "
                        f"groups {parents} there. A group may only split, never merge tasks of different groups."
                    )
        previous = seen


def resolve_task_groups(
    tasks: Sequence[str],
    task_groups: str | Sequence,
    num_stages: int | None = None,
    similarity_file: str | None = None,
) -> list[list[list[str]]] | None:
    """Turn a preset, group counts or an explicit tree into an explicit tree.

    Returns None for the presets "shared" and "per_task" when `num_stages` is not known yet (the tuner resolves
    them once it sees the backbone).
    """
    tasks = list(tasks)
    if isinstance(task_groups, str):
        spec = task_groups.strip()
        if spec in PRESETS:
            if num_stages is None:
                return None
            if spec == "shared":
                return [[list(tasks)] for _ in range(num_stages)]
            return [[[t] for t in tasks] for _ in range(num_stages)]
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"`task_groups={task_groups!r}` is neither a preset {list(PRESETS)} nor comma-separated group "
                "counts such as '1,1,2,4'."
            ) from None
        return groups_from_counts(tasks, counts, similarity_file)
    if task_groups and all(isinstance(c, int) and not isinstance(c, bool) for c in task_groups):
        return groups_from_counts(tasks, list(task_groups), similarity_file)
    # with an explicit tree a similarity file is a record of where the tree came from, not an input
    return [[list(group) for group in stage] for stage in task_groups]


def resolve_tree(
    tasks: Sequence[str],
    task_groups: str | Sequence,
    num_stages: int | None = None,
    similarity_file: str | None = None,
    model_name: str = "the backbone",
) -> TaskTree:
    """The validated tree that a preset, group counts or an explicit tree describe, for a backbone of `num_stages`.

    Without `num_stages` a preset cannot be expanded (it is refused) and the stage count is not checked.
    """
    groups = resolve_task_groups(tasks, task_groups, num_stages=num_stages, similarity_file=similarity_file)
    if groups is None:
        raise ValueError(
            f"The preset task_groups={task_groups!r} needs the backbone's number of stages; it is expanded when the "
            "adapter is injected (`get_peft_model`), or give `num_stages`."
        )
    tree = TaskTree.from_groups(tasks, groups)
    if num_stages is not None and tree.num_stages != num_stages:
        raise ValueError(
            f"`task_groups` gives {tree.num_stages} stages, but {model_name} has {num_stages}; give one partition of "
            "the tasks per stage (an unsplit stage is one group of all tasks)."
        )
    return tree


def groups_from_counts(tasks: Sequence[str], counts: Sequence[int], similarity_file: str | None) -> list:
    """Cut the tasks into `counts[s]` groups per stage: by similarity when a file is given, else in listed order."""
    tasks = list(tasks)
    for s, c in enumerate(counts):
        if c < 1 or c > len(tasks):
            raise ValueError(f"Stage {s} asks for {c} groups, but there are {len(tasks)} tasks; use 1..{len(tasks)}.")
        if s and c < counts[s - 1]:
            raise ValueError(
                f"Group counts {list(counts)} decrease at stage {s}; groups may only split, so counts must not "
                "decrease from one stage to the next."
            )
    if similarity_file is not None:
        from .clustering import build_task_tree  # numpy only; the gradient tool is not needed to read its output

        similarity = json.loads(Path(similarity_file).read_text())
        if sorted(similarity.get("tasks", [])) != sorted(tasks):
            raise ValueError(
                f"The similarity file {similarity_file!r} covers tasks {similarity.get('tasks')}, but the config has "
                f"{tasks}; compute the similarity for the same tasks."
            )
        return build_task_tree(similarity, groups_per_stage=list(counts), tasks=tasks)
    cuts, tree = [0, len(tasks)], []
    for c in counts:
        while len(cuts) - 1 < c:
            # split the largest chunk (the first one on ties) in half: later stages only add cuts, so they nest
            widths = [b - a for a, b in pairwise(cuts)]
            i = widths.index(max(widths))
            cuts.insert(i + 1, cuts[i] + widths[i] // 2 + widths[i] % 2)
        tree.append([tasks[a:b] for a, b in pairwise(cuts)])
    return tree
