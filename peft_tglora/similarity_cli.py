"""Command line for task similarity and task trees: ``python -m peft_tglora.similarity`` or ``tglora-similarity``.

Writes ``similarity.json`` (what ``TGLoraConfig(similarity_file=...)`` reads), ``task_tree.json``
(``TGLoraConfig(tasks=d["tasks"], task_groups=d["task_groups"])``) and ``similarity.png`` into ``--out``.

    # cut a tree from a similarity computed before
    python -m peft_tglora.similarity --from-json runs/similarity.json --groups-per-stage 1,1,2,4 --out runs
    # compute on the synthetic example data (needs the `train` extra), with a tiny random Swin or --model PATH
    python -m peft_tglora.similarity --tasks semseg,human_parts,saliency,normals --num-batches 8 --out runs
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .clustering import build_task_tree


logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tglora-similarity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tglora_similarity", help="Folder for the JSON files and the picture.")
    parser.add_argument("--from-json", help="Read a saved similarity instead of computing one.")
    tree = parser.add_mutually_exclusive_group()
    tree.add_argument("--groups-per-stage", type=_ints, help="Groups per stage, e.g. 1,1,2,4 (default 1,1,2,T).")
    tree.add_argument(
        "--threshold",
        type=_floats,
        help="Per-stage similarity thresholds, e.g. 0,0.2,0.5,0.9; one value: the last of 4 stages only.",
    )
    parser.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    compute = parser.add_argument_group("computing a similarity (ignored with --from-json)")
    compute.add_argument("--tasks", default="semseg,human_parts,saliency,normals", help="Comma-separated task names.")
    compute.add_argument("--model", help="SwinModel path or hub id; default: a tiny random Swin (a smoke test).")
    compute.add_argument("--image-size", type=int, default=64)
    compute.add_argument("--num-images", type=int, default=64, help="Synthetic images to draw batches from.")
    compute.add_argument("--batch-size", type=int, default=8)
    compute.add_argument("--num-batches", type=int, default=8)
    compute.add_argument("--head-warmup-steps", type=int, default=10)
    compute.add_argument("--wrt", default="backbone", choices=["backbone", "adapters"])
    compute.add_argument("--projection-dim", type=int, help="Project gradients to this size (large backbones).")
    compute.add_argument("--seed", type=int, default=0)
    compute.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def compute_on_synthetic(args: argparse.Namespace):
    """Similarity of the synthetic example tasks on a Swin wrapped with a shared TGLoRA tree."""
    import torch
    from peft import get_peft_model
    from torch import nn
    from transformers import SwinConfig, SwinModel

    from . import TGLoraConfig
    from .similarity import compute_task_similarity
    from .tasks import build_dataloaders, build_heads, make_synthetic_multitask, task_loss

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    torch.manual_seed(args.seed)
    if args.model:
        base = SwinModel.from_pretrained(args.model)
    else:  # window 2 keeps all four stages valid at 64 px
        config = SwinConfig(
            image_size=args.image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]
        )
        config.window_size = 2
        base = SwinModel(config)
    backbone = get_peft_model(base, TGLoraConfig(tasks=tasks, task_groups="shared", r=4))
    data = make_synthetic_multitask(args.num_images, args.image_size, tasks=tasks, seed=args.seed)
    loader, _ = build_dataloaders(
        data, data, tasks, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed
    )
    widths = [base.config.embed_dim * 2**s for s in range(len(base.config.depths))]
    size = (args.image_size, args.image_size)

    class Head(nn.Module):  # the task head, upsampled to the label size the loss expects
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, features):
            return self.head(features, output_size=size)

    heads = {t: Head(h) for t, h in build_heads(tasks, widths, dataset="synthetic", norm="group").items()}
    losses = {t: (lambda prediction, batch, t=t: task_loss(t, prediction, batch)) for t in tasks}
    return compute_task_similarity(
        backbone,
        heads,
        losses,
        loader,
        num_batches=args.num_batches,
        wrt=args.wrt,
        projection_dim=args.projection_dim,
        seed=args.seed,
        head_warmup_steps=args.head_warmup_steps,
        disable_progress=args.no_progress,
    )


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, write the three files, return what ``task_tree.json`` holds."""
    args = parse_args(argv)
    from .similarity import TaskSimilarity  # torch only once the arguments are known to be valid

    sim = TaskSimilarity.from_json(args.from_json) if args.from_json else compute_on_synthetic(args)
    num_tasks = len(sim.tasks)
    counts = args.groups_per_stage
    if counts is None and args.threshold is None:
        counts = [1, 1, min(2, num_tasks), num_tasks]
    threshold = args.threshold[0] if args.threshold is not None and len(args.threshold) == 1 else args.threshold
    tree = build_task_tree(sim, counts, threshold=threshold, linkage=args.linkage)
    out = Path(args.out)
    sim_path = sim.to_json(out / "similarity.json")
    tree_path = out / "task_tree.json"
    record = {
        "tasks": list(sim.tasks),
        "task_groups": tree,
        "groups_per_stage": [len(stage) for stage in tree],
        "linkage": args.linkage,
        "similarity_file": sim_path.name,
    }
    tree_path.write_text(json.dumps(record, indent=2) + "\n")
    png = sim.plot(out / "similarity.png", linkage=args.linkage)
    for stage, groups in enumerate(tree):
        logger.info("stage %d: %s", stage, " | ".join(",".join(group) for group in groups))
    logger.info("wrote %s, %s and %s", sim_path, tree_path, png)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(argv)


if __name__ == "__main__":
    main()
