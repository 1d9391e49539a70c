"""Command line for tree costs: ``python -m peft_tglora.costs_cli`` (or ``tglora-costs``).

Prints a Markdown table of trainable parameters and forward MACs per stage and in total for the trees you name, or,
with a task similarity and a budget, for every nested tree the similarity's dendrogram allows, marking the pick:

    python -m peft_tglora.costs_cli --backbone swin-t --image-size 448 --tasks semseg,human_parts,saliency,normals \
        --trees shared:1,1,2,4:per_task --heads pascal_context
    python -m peft_tglora.costs_cli --backbone swin-t --image-size 448 --similarity similarity.json --budget-macs 40e9
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import get_peft_model

from ._registration import upstream_deprecations_silenced
from .clustering import build_task_tree
from .config import TGLoraConfig
from .costs import BACKBONE_PRESETS, TreeCost, _build_backbone, _image_size, tree_costs, trees_within_budget
from .tree import TaskTree


def _tree_label(cost: TreeCost) -> str:
    counts, num_tasks = cost.groups_per_stage, sum(len(group) for group in cost.task_groups[0])
    if set(counts) == {1}:
        return "shared"
    if set(counts) == {num_tasks}:
        return "per_task"
    return ",".join(map(str, counts))


def markdown_table(costs: Sequence[TreeCost], marks: Mapping[int, str] | None = None) -> str:
    """One row per tree: adapter parameters and GMACs per stage and in total, and with the heads when given."""
    with_heads = any(c.head_params for c in costs)
    header = ["tree", "trainable params per stage", "backbone trainable params", "GMACs per stage", "backbone GMACs",
              "backbone GMACs, one-group stages merged"]  # fmt: skip
    if with_heads:
        header += ["params with heads", "GMACs with heads"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, c in enumerate(costs):
        row = [
            _tree_label(c) + (marks or {}).get(i, ""),
            " / ".join(f"{s.params / 1e6:.3f}M" for s in c.stages),
            f"{c.backbone_params / 1e6:.3f}M",
            " / ".join(f"{s.macs / 1e9:.2f}" for s in c.stages),
            f"{c.backbone_macs / 1e9:.2f}",
            f"{c.merged_macs / 1e9:.2f}",
        ]
        if with_heads:
            row += [f"{c.params / 1e6:.3f}M", f"{c.macs / 1e9:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def stage_channels(model_or_config, image_size: int | tuple[int, int]) -> list[int]:
    """Channels of each stage's feature map (what per-task heads take), read from one meta forward."""
    size = _image_size(image_size)
    with upstream_deprecations_silenced():
        model = get_peft_model(_build_backbone(model_or_config, size, "meta"), TGLoraConfig(tasks=["probe"]))
    with torch.no_grad():
        output = model(torch.zeros(1, model.config.num_channels, *size, device="meta"))
    return [f.shape[1] for f in output.task_features["probe"]]


def _image_size_arg(text: str) -> tuple[int, int]:
    sizes = [int(v) for v in text.split(",")]
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: give one size (448) or height,width (480,640).")
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peft_tglora.costs", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="swin-t", help=f"Hub id, local folder, or one of {sorted(BACKBONE_PRESETS)}.")
    p.add_argument("--image-size", "--image_size", type=_image_size_arg, default=(448, 448), help="448 or H,W.")
    p.add_argument("--tasks", help="Comma-separated task names (default: the similarity file's tasks).")
    p.add_argument("--trees", help="Trees separated by ':', each a preset or group counts: shared:1,1,2,4:per_task.")
    p.add_argument("--heads", metavar="DATASET", help="Add the default heads of this dataset (e.g. pascal_context).")
    p.add_argument("--r", type=int, default=16, help="Rank of every group's update.")
    p.add_argument("--shared-r", "--shared_r", type=int, default=0, help="Rank of the part shared inside a stage.")
    p.add_argument("--similarity", help="similarity.json: cut counts by it; with a budget, list every nested tree.")
    p.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    p.add_argument("--budget-params", "--budget_params", type=float, help="Most trainable parameters, e.g. 7e6.")
    p.add_argument("--budget-macs", "--budget_macs", type=float, help="Most forward MACs, e.g. 40e9.")
    p.add_argument("--merged", action="store_true", help="Budget MACs after merge_adapter() (inference).")
    p.add_argument("--json", help="Also write every cost as JSON to this file.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Print a Markdown table of tree costs; with `--similarity` and a budget, list every nested tree and pick."""
    args = parse_args(argv)
    similarity = json.loads(Path(args.similarity).read_text()) if args.similarity else None
    tasks = args.tasks.split(",") if args.tasks else (similarity or {}).get("tasks")
    if not tasks:
        raise SystemExit("Give --tasks a,b,c (or --similarity similarity.json, whose tasks are used).")
    heads = None
    if args.heads:
        from .tasks.heads import build_heads  # lazy: the training helpers are not needed for the backbone alone

        heads = build_heads(tasks, stage_channels(args.backbone, args.image_size), dataset=args.heads)
    adapter = dict(r=args.r, lora_alpha=args.r, shared_r=args.shared_r)
    search = None
    if similarity is not None and (args.budget_params or args.budget_macs or not args.trees):
        search = trees_within_budget(
            similarity, args.budget_params, args.budget_macs, model_or_config=args.backbone,
            image_size=args.image_size, heads=heads, tasks=tasks, linkage=args.linkage, merged=args.merged, **adapter,
        )  # fmt: skip
        costs = list(search.candidates)
    else:
        costs = []
        for spec in (args.trees or "shared:per_task").split(":"):
            tree = spec
            if similarity is not None and spec not in ("shared", "per_task"):
                tree = build_task_tree(
                    similarity, [int(c) for c in spec.split(",")], tasks=tasks, linkage=args.linkage
                )
            costs.append(tree_costs(args.backbone, tree, args.image_size, heads, tasks=tasks, **adapter))
    marks = {}
    if search is not None and (args.budget_params or args.budget_macs):
        marks = {i: " (fits)" for i, c in enumerate(costs) if search.fits(c)}
        if search.best is not None:
            marks[costs.index(search.best)] = " **(pick)**"
    size = "x".join(map(str, args.image_size))
    print(f"{args.backbone} at {size} px, r={args.r}, tasks {','.join(tasks)}; batch of one image; MACs = FLOPs / 2\n")
    print(markdown_table(costs, marks))
    print(f"\nFrozen backbone, one stream: {costs[0].base_macs / 1e9:.2f} GMACs.")
    if similarity is not None:  # every tree above is made of these cuts, one per stage
        print("Cuts of the similarity's dendrogram (a stage with k groups):")
        for k in range(1, len(tasks) + 1):
            groups = build_task_tree(similarity, [k], tasks=tasks, linkage=args.linkage)[0]
            print(f"  {k}: " + " ".join("[" + ", ".join(g) + "]" for g in groups))
    if search is not None and (args.budget_params or args.budget_macs):
        if search.best is None:
            cheapest = min(costs, key=lambda c: (c.macs, c.params))
            print(f"No tree fits the budget; the cheapest is {_tree_label(cheapest)} ({cheapest.macs / 1e9:.2f} GMACs, "
                  f"{cheapest.params / 1e6:.3f}M parameters): raise the budget.")  # fmt: skip
        else:
            print(
                f"Pick: {_tree_label(search.best)}\n{TaskTree.from_groups(tasks, search.best.task_groups).to_text()}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps([c.to_dict() for c in costs], indent=1))


if __name__ == "__main__":
    main()
