"""What a task tree costs: trainable parameters and forward MACs per stage, and the trees a budget allows.

MACs are measured, not modelled: one forward of the TGLoRA model under `torch.utils.flop_counter.FlopCounterMode`
(MACs = FLOPs / 2), by default on the meta device, so no weights and no real compute are needed (Swin-T at 448 px
takes well under a second). The counter counts matrix products and convolutions (linears, attention, patch
embeddings and merging, convolutional heads); norms, activations, softmax and interpolation count zero, as in the
usual MAC counters. Costs do not depend on which tasks share a group, only on each stage's group count. The command
line (`python -m peft_tglora.costs`) is in `costs_cli.py`; docs/COSTS.md has the tables it prints.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ._registration import upstream_deprecations_silenced
from .backbones import backbone_core, get_backbone_spec
from .clustering import build_task_tree, similarity_inputs
from .config import TGLoraConfig
from .tree import TaskTree


__all__ = ["BACKBONE_PRESETS", "BudgetSearch", "StageCost", "TreeCost", "tree_costs", "trees_within_budget"]

# Swin configurations of the paper family (Liu et al. 2021, Table 1), built randomly initialised: MACs and parameter
# counts do not depend on the weights, so no download is needed to cost a tree.
BACKBONE_PRESETS = {
    "swin-t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, patch_size=4),
    "swin-s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, patch_size=4),
    "swin-b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, patch_size=4),
}


@dataclass(frozen=True)
class StageCost:
    """One stage of a tree: `groups` streams, each through the frozen stage plus its group's adapters."""

    groups: int
    params: int  # trainable parameters (the adapters of all groups)
    macs: int  # forward MACs of the stage for all its streams, adapters unmerged
    base_macs: int  # forward MACs of the frozen stage for one stream (no adapters)

    @property
    def adapter_macs(self) -> int:
        """What the low-rank updates add to the G frozen passes (zero once a one-group stage is merged)."""
        return self.macs - self.groups * self.base_macs


@dataclass(frozen=True)
class TreeCost:
    """Parameters and MACs of one task tree on one backbone at one image size, for a batch of one image."""

    task_groups: list[list[list[str]]]
    image_size: tuple[int, int]
    stages: tuple[StageCost, ...]
    other_params: int  # trainable parameters outside the stages (e.g. `modules_to_save`)
    other_macs: int  # MACs outside the stages: patch embedding (one stream), anything after the last stage (G streams)
    base_macs: int  # the frozen backbone, one stream, no adapters
    head_params: dict[str, int] = field(default_factory=dict)  # per task; empty when no heads were given
    head_macs: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)  # backbone MACs by aten op (e.g. "aten.addmm"), this tree

    @property
    def groups_per_stage(self) -> tuple[int, ...]:
        return tuple(stage.groups for stage in self.stages)

    @property
    def backbone_params(self) -> int:
        return sum(stage.params for stage in self.stages) + self.other_params

    @property
    def backbone_macs(self) -> int:
        return sum(stage.macs for stage in self.stages) + self.other_macs

    @property
    def merged_macs(self) -> int:
        """Backbone MACs after `merge_adapter()`: one-group stages cost what the frozen stage costs."""
        return self.backbone_macs - sum(s.adapter_macs for s in self.stages if s.groups == 1)

    @property
    def params(self) -> int:
        """Trainable parameters: adapters (and `modules_to_save`) plus the heads when given."""
        return self.backbone_params + sum(self.head_params.values())

    @property
    def macs(self) -> int:
        """Forward MACs of the backbone with its adapters unmerged, plus the heads when given."""
        return self.backbone_macs + sum(self.head_macs.values())

    @property
    def specificity(self) -> int:
        """Groups summed over stages: the larger, the more task-specific the tree."""
        return sum(self.groups_per_stage)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            groups_per_stage=list(self.groups_per_stage),
            backbone_params=self.backbone_params,
            backbone_macs=self.backbone_macs,
            merged_macs=self.merged_macs,
            params=self.params,
            macs=self.macs,
        )
        return out


@dataclass(frozen=True)
class BudgetSearch:
    """Every nested tree a similarity's dendrogram allows, with its cost; `best` is the pick within the budget."""

    candidates: tuple[TreeCost, ...]  # most task-specific first, then fewer MACs
    budget_params: float | None
    budget_macs: float | None
    merged: bool  # whether `budget_macs` was compared with `merged_macs` (+ heads) rather than unmerged MACs

    def fits(self, cost: TreeCost) -> bool:
        macs = cost.merged_macs + sum(cost.head_macs.values()) if self.merged else cost.macs
        return (self.budget_params is None or cost.params <= self.budget_params) and (
            self.budget_macs is None or macs <= self.budget_macs
        )

    @property
    def best(self) -> TreeCost | None:
        """The most task-specific tree within budget (ties: fewer MACs, then fewer parameters); None if none fits."""
        fitting = [c for c in self.candidates if self.fits(c)]
        return min(fitting, key=_preference) if fitting else None


def _preference(cost: TreeCost) -> tuple:
    return (-cost.specificity, cost.macs, cost.params, cost.groups_per_stage)


# ---------------------------------------------------------------------------------------------- building the model


def _image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in size):
        raise ValueError(f"image_size={image_size!r} must be a positive int or a (height, width) pair of ints.")
    return size


def _build_backbone(model_or_config, image_size: tuple[int, int], device: str) -> nn.Module:
    """A private copy of the backbone on `device`: the caller's model is never wrapped or moved."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig, SwinConfig

    if isinstance(model_or_config, PeftModel):
        raise TypeError(
            "tree_costs needs the plain backbone, not a PeftModel: pass `peft_model.get_base_model()` before "
            "adapters were injected, or the backbone's config, and give the tree as `tree`."
        )
    if isinstance(model_or_config, nn.Module):
        return copy.deepcopy(model_or_config).to(device).eval()
    if isinstance(model_or_config, (str, Path)):
        name = str(model_or_config)
        if name in BACKBONE_PRESETS:
            model_or_config = SwinConfig(image_size=max(image_size), **BACKBONE_PRESETS[name])
        else:
            model_or_config = AutoConfig.from_pretrained(name)  # a config.json only: no weights are read
    if not isinstance(model_or_config, PretrainedConfig):
        raise TypeError(
            f"model_or_config must be a backbone module, a transformers config, a Hub id or local folder, or one of "
            f"{sorted(BACKBONE_PRESETS)}; got {type(model_or_config).__name__}."
        )
    with torch.device(device):
        return AutoModel.from_config(model_or_config).eval()


def _tglora_config(tree, tasks, num_stages: int, **adapter_kwargs) -> TGLoraConfig:
    if isinstance(tree, TGLoraConfig):
        config = copy.deepcopy(tree)
    elif isinstance(tree, TaskTree):
        config = TGLoraConfig(tasks=list(tree.tasks), task_groups=tree.to_groups(), **adapter_kwargs)
    else:
        if tasks is None:
            raise ValueError(f"tree={tree!r} gives group counts or a preset: pass tasks=[...] too.")
        config = TGLoraConfig(tasks=list(tasks), task_groups=tree, **adapter_kwargs)
    config.resolve_for_backbone(num_stages)
    return config


def _stage_index(model: nn.Module) -> tuple[list[nn.Module], dict[int, int]]:
    """The stages' modules (every descendant) and the stage of each, for hooks and parameter counts."""
    _, spec = get_backbone_spec(model)
    modules, stage_of = [], {}
    for s, containers in enumerate(spec.stage_containers(backbone_core(model))):
        for container in containers:
            for module in container.modules():
                if id(module) not in stage_of:
                    modules.append(module)
                    stage_of[id(module)] = s
    return modules, stage_of


class _StageMacs:
    """Forward hooks that give each stage the FLOPs counted while its outermost running module was active."""

    def __init__(self, counter: FlopCounterMode, modules: list[nn.Module], stage_of: dict[int, int], num: int):
        self.counter, self.stage_of, self.flops = counter, stage_of, [0] * num
        self.owner: tuple[nn.Module, int] | None = None
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args):
        if self.owner is None:  # a stage's ModuleList is never called itself: its children start the count
            self.owner = (module, self.counter.get_total_flops())

    def _leave(self, module, args, output):
        if self.owner is not None and self.owner[0] is module:
            self.flops[self.stage_of[id(module)]] += self.counter.get_total_flops() - self.owner[1]
            self.owner = None

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _count(model: nn.Module, pixel_values: torch.Tensor, modules, stage_of, num_stages: int):
    """Total and per-stage forward FLOPs of one call, the output, and MACs per aten op."""
    # the math attention kernel, everywhere: FlopCounterMode has no formula for CPU's fused attention, which would
    # count zero; the math kernel's matmuls count the same on every device (and on meta)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hooks = _StageMacs(counter, modules, stage_of, num_stages)
        try:
            output = model(pixel_values)
        finally:
            hooks.remove()
    ops = {str(op): flops // 2 for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), hooks.flops, output, ops


# ---------------------------------------------------------------------------------------------- costs of one tree


def tree_costs(
    model_or_config,
    tree,
    image_size: int | tuple[int, int],
    heads: Mapping[str, nn.Module] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    device: str = "meta",
    **adapter_kwargs,
) -> TreeCost:
    """Trainable parameters and forward MACs, per stage and in total, of a task tree on a backbone.

    Args:
        model_or_config: the backbone (copied, never modified), its transformers config, a Hub id or local folder
            (its `config.json` only), or a preset name from `BACKBONE_PRESETS` such as `"swin-t"`.
        tree: a `TGLoraConfig` (used with its own rank and targets), a `TaskTree`, explicit groups per stage, group
            counts (`"1,1,2,4"`, in `tasks` order) or a preset (`"shared"`, `"per_task"`).
        image_size: the input's side, or `(height, width)`.
        heads: `{task: head}`; each head is called on `task_features[task]` and its parameters and MACs are added.
        tasks: the task names when `tree` gives counts or a preset.
        device: `"meta"` (default: shapes only, no memory, no compute) or a real device; counts are the same.
        adapter_kwargs: `TGLoraConfig` options (`r`, `target_modules`, `shared_r`, `modules_to_save`, ...).
    """
    size = _image_size(image_size)
    backbone = _build_backbone(model_or_config, size, device)
    _, spec = get_backbone_spec(backbone)
    num_stages = len(spec.split_modules(backbone_core(backbone)))
    config = _tglora_config(tree, tasks, num_stages, **adapter_kwargs)
    with upstream_deprecations_silenced():
        model = get_peft_model(backbone, config).eval()
    modules, stage_of = _stage_index(model.get_base_model())
    pixel_values = torch.zeros(1, backbone.config.num_channels, *size, device=device)

    flops, stage_flops, output, ops = _count(model, pixel_values, modules, stage_of, num_stages)
    with model.disable_adapter():
        base_flops, base_stage_flops, _, _ = _count(model, pixel_values, modules, stage_of, num_stages)
    params = [0] * num_stages
    other_params = 0
    owner = {id(p): stage_of[id(m)] for m in modules for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in owner:
                params[owner[id(p)]] += p.numel()
            else:
                other_params += p.numel()

    head_params, head_macs = {}, {}
    if heads is not None:
        missing = [t for t in heads if t not in output.task_features]
        if missing:
            raise ValueError(f"heads has tasks {missing} that the tree does not serve; its tasks are {config.tasks}.")
        for task, head in heads.items():
            head = copy.deepcopy(head).to(device).eval()
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                head(output.task_features[task])
            head_params[task] = sum(p.numel() for p in head.parameters())
            head_macs[task] = counter.get_total_flops() // 2

    groups = config.task_tree.groups_per_stage
    stages = tuple(
        StageCost(groups=g, params=p, macs=f // 2, base_macs=b // 2)
        for g, p, f, b in zip(groups, params, stage_flops, base_stage_flops)
    )
    return TreeCost(
        task_groups=config.task_tree.to_groups(),
        image_size=size,
        stages=stages,
        other_params=other_params,
        other_macs=(flops - sum(stage_flops)) // 2,
        base_macs=base_flops // 2,
        head_params=head_params,
        head_macs=head_macs,
        ops=ops,
    )


# ---------------------------------------------------------------------------------------------- trees for a budget


def nested_counts(num_tasks: int, num_stages: int) -> list[tuple[int, ...]]:
    """Every non-decreasing sequence of per-stage group counts in [1, num_tasks]: the cuts one dendrogram allows."""
    return list(itertools.combinations_with_replacement(range(1, num_tasks + 1), num_stages))


def trees_within_budget(
    similarity,
    budget_params: float | None = None,
    budget_macs: float | None = None,
    *,
    model_or_config,
    image_size: int | tuple[int, int],
    heads: Mapping[str, nn.Module] | None = None,
    tasks: Sequence[str] | None = None,
    linkage: str = "average",
    merged: bool = False,
    device: str = "meta",
    **adapter_kwargs,
) -> BudgetSearch:
    """List every nested tree the similarity's dendrogram allows, with its cost, and pick one within the budget.

    The trees are the cuts of one average-linkage dendrogram at non-decreasing group counts per stage (stage 0 may
    have several groups): `C(T + S - 1, S)` trees for T tasks and S stages. The pick is the most task-specific tree
    (most groups summed over stages) whose parameters (`TreeCost.params`, heads included when given) and MACs
    (`TreeCost.macs`, or with `merged=True` the MACs after `merge_adapter()`) are within the budgets; ties go to
    fewer MACs. A stage's cost depends only on its group count, so the costs are measured once per count (T forwards,
    not one per tree) and added up; `tree_costs` of any listed tree gives the same numbers.

    Args:
        similarity: a `TaskSimilarity`, its JSON dict (`{"tasks": [...], "matrix": [[...]]}`), or a matrix with `tasks`.
        budget_params, budget_macs: upper bounds (either, both, or neither to list the trees only).
        model_or_config, image_size, heads, device, adapter_kwargs: as for `tree_costs`.
    """
    names, matrix = similarity_inputs(similarity, tasks)
    for name, value in (("budget_params", budget_params), ("budget_macs", budget_macs)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value!r} must be a positive number (e.g. 7e6 parameters or 40e9 MACs).")
    size = _image_size(image_size)
    probe = _build_backbone(model_or_config, size, "meta")
    _, spec = get_backbone_spec(probe)
    num_stages = len(spec.split_modules(backbone_core(probe)))

    # one uniform tree per group count gives every stage's cost at that count (and what follows the last stage)
    uniform = {
        g: tree_costs(model_or_config, [g] * num_stages, size, heads, tasks=names, device=device, **adapter_kwargs)
        for g in range(1, len(names) + 1)
    }
    candidates = []
    for counts in nested_counts(len(names), num_stages):
        last = uniform[counts[-1]]
        candidates.append(
            TreeCost(
                task_groups=build_task_tree({"tasks": names, "matrix": matrix}, list(counts), linkage=linkage),
                image_size=size,
                stages=tuple(uniform[g].stages[s] for s, g in enumerate(counts)),
                other_params=last.other_params,
                other_macs=last.other_macs,
                base_macs=last.base_macs,
                head_params=last.head_params,
                head_macs=last.head_macs,  # `ops` stays empty: it is measured per forward, not per stage
            )
        )
    candidates.sort(key=_preference)
    return BudgetSearch(tuple(candidates), budget_params, budget_macs, merged)


if __name__ == "__main__":  # the command line depends on this module, never the reverse
    raise SystemExit("The command line is `python -m peft_tglora.costs_cli` (or `tglora-costs`).")
