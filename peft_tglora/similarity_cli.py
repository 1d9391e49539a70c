"""Command line for task similarity and task trees: ``python -m peft_tglora.similarity_cli`` or ``tglora-similarity``.

Computes the gradient task similarity on your data, with the data and model options of ``examples/train_tglora.py``,
averaged over seeds, and writes into ``--out``: ``similarity.json`` (with a stability report; what
``TGLoraConfig(similarity_file=...)`` reads), ``task_tree.json`` (``TGLoraConfig(tasks=d["tasks"],
task_groups=d["task_groups"])``) and ``similarity.png`` (heatmap and dendrogram with each stage's cut).

    tglora-similarity --dataset camvid --data_root data/camvid_mt --backbone PATH --groups_per_stage 1,1,2,4 --out sim
    tglora-similarity --from_json sim/similarity.json --groups_per_stage 1,1,1,2 --out sim2   # another cut
    tglora-similarity --demo --out sim   # synthetic scenes and a tiny random Swin: a smoke test, not a result
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ._registration import upstream_deprecations_silenced
from .clustering import build_task_tree
from .similarity import TaskSimilarity


logger = logging.getLogger(__name__)

DEMO = dict(dataset="synthetic", tasks="semseg,human_parts,saliency,normals", image_size="64", synthetic_size=64,
            backbone_config={"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}, head_width=8,
            head_hidden=64, num_batches=8, seeds="0")  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _image_size(text: str) -> int | tuple[int, int]:
    sizes = _ints(text)
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--image_size {text!r}: give one size (224) or height,width (120,160).")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .tasks.grouping import DEFAULT_HEAD_WARMUP_STEPS, DEFAULT_NUM_BATCHES, DEFAULT_SEEDS

    p = argparse.ArgumentParser(prog="tglora-similarity", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tglora_similarity", help="Folder for the JSON files and the picture.")
    p.add_argument("--from_json", "--from-json", help="Cut a tree from a saved similarity instead of computing one.")
    p.add_argument("--demo", action="store_true", help="Synthetic scenes and a tiny random Swin (a smoke test).")
    tree = p.add_mutually_exclusive_group()
    tree.add_argument(
        "--groups_per_stage", "--groups-per-stage", type=_ints, help="e.g. 1,1,2,4 (default 1,..,1,2,T)."
    )
    tree.add_argument("--threshold", type=_floats, help="Per-stage similarity thresholds; one value: last stage only.")
    p.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    data = p.add_argument_group("data and model, as in examples/train_tglora.py")
    data.add_argument("--dataset", default=None, help="A data set of peft_tglora.tasks.DATASETS, e.g. camvid.")
    data.add_argument("--data_root", default=None, help="Local folder in the layout of docs/TASKS.md.")
    data.add_argument("--hub_id", default=None, help="A data set for datasets.load_dataset.")
    data.add_argument("--split", default="train", help="The split to draw batches from (the training split).")
    data.add_argument("--tasks", default=None, help="Comma-separated; default: the dataset's tasks.")
    data.add_argument("--image_size", type=_image_size, default=224, help="224, or height,width such as 120,160.")
    data.add_argument("--backbone", default="tiny-swin", help="'tiny-swin' (random init) or a Hub id / path.")
    data.add_argument("--backbone_config", type=json.loads, default=None, help="JSON overrides of the tiny-swin.")
    data.add_argument("--batch_size", "--batch-size", type=int, default=8)
    data.add_argument("--head_width", type=int, default=18)
    data.add_argument("--head_hidden", type=int, default=None)
    data.add_argument("--head_kernel", type=int, default=1, choices=[1, 3])
    data.add_argument("--head_norm", default="batch", choices=["batch", "group"])
    data.add_argument("--synthetic_size", type=int, default=64, help="Synthetic images (with --demo).")
    sim = p.add_argument_group("the similarity")
    sim.add_argument("--num_batches", "--num-batches", type=int, default=DEFAULT_NUM_BATCHES, help="Per seed.")
    sim.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="Runs averaged, e.g. 0,1,2.")
    sim.add_argument("--head_warmup_steps", "--head-warmup-steps", type=int, default=DEFAULT_HEAD_WARMUP_STEPS)
    sim.add_argument("--wrt", default="backbone", choices=["backbone", "adapters"])
    sim.add_argument("--projection_dim", "--projection-dim", type=int, help="Project gradients (large backbones).")
    sim.add_argument("--no_progress", "--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.demo:
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    if args.from_json is None and not args.demo and args.dataset in (None, "synthetic"):
        p.error("give --dataset (with --data_root or --hub_id) for your data; synthetic data only with --demo.")
    return args


def compute(args: argparse.Namespace):
    """Similarity of ``args.tasks`` on ``args.dataset`` with the run's heads and losses (`group_tasks`)."""
    from peft import get_peft_model

    from . import TGLoraConfig
    from .tasks import build_dataloaders, build_heads, get_dataset_spec, load_multitask_dataset
    from .tasks.grouping import default_groups_per_stage, group_tasks, run_losses
    from .tasks.model import build_backbone, stage_channels

    tasks = args.tasks.split(",") if args.tasks else list(get_dataset_spec(args.dataset).tasks)
    if args.demo:
        from .tasks import make_synthetic_multitask

        data = make_synthetic_multitask(args.synthetic_size, args.image_size, tasks=tasks, seed=0)
    else:
        data = load_multitask_dataset(args.dataset, args.split, root=args.data_root, hub_id=args.hub_id, tasks=tasks)
    loader, _ = build_dataloaders(data, data, tasks, image_size=args.image_size, batch_size=args.batch_size)
    base = build_backbone(args.backbone, args.image_size, args.backbone_config)
    with upstream_deprecations_silenced():
        shared = get_peft_model(base, TGLoraConfig(tasks=tasks, task_groups="shared", r=4))
    shared.eval()
    channels = stage_channels(shared, args.image_size)
    head_kwargs = dict(channels=[args.head_width * 2**s for s in range(len(channels))], hidden_channels=args.head_hidden,
                       kernel_size=args.head_kernel, norm=args.head_norm)  # fmt: skip
    heads = build_heads(tasks, channels, dataset=args.dataset, **head_kwargs)
    counts = args.groups_per_stage or default_groups_per_stage(len(tasks), len(channels))
    result = group_tasks(
        shared, dict(heads), run_losses(tasks), loader, counts, num_batches=args.num_batches, seeds=_ints(args.seeds),
        head_warmup_steps=args.head_warmup_steps, linkage=args.linkage, wrt=args.wrt,
        projection_dim=args.projection_dim, disable_progress=args.no_progress,
    )  # fmt: skip
    return result.similarity, len(channels)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, write the three files, return what ``task_tree.json`` holds."""
    args = parse_args(argv)
    if args.from_json:
        sim = TaskSimilarity.from_json(args.from_json)
        num_stages = len(sim.stability["stages"]) if sim.stability else 4  # the cut it was computed for
    else:
        sim, num_stages = compute(args)
    num_tasks = len(sim.tasks)
    counts = args.groups_per_stage
    if counts is None and args.threshold is None:
        counts = [1] * (num_stages - 2) + [min(2, num_tasks), num_tasks]
    threshold = args.threshold[0] if args.threshold is not None and len(args.threshold) == 1 else args.threshold
    tree = build_task_tree(sim, counts, threshold=threshold, num_stages=num_stages, linkage=args.linkage)
    counts = [len(stage) for stage in tree]
    out = Path(args.out)
    sim_path = sim.to_json(out / "similarity.json")
    tree_path = out / "task_tree.json"
    record = {
        "tasks": list(sim.tasks),
        "task_groups": tree,
        "groups_per_stage": counts,
        "linkage": args.linkage,
        "similarity_file": sim_path.name,
    }
    tree_path.write_text(json.dumps(record, indent=2) + "\n")
    runs = f", mean of {len(sim.stability['seeds'])} seeds" if sim.stability else ""
    title = f"Task similarity ({sim.num_batches[0] if sim.num_batches else '?'} batches{runs})"
    png = sim.plot(out / "similarity.png", linkage=args.linkage, title=title, groups_per_stage=counts)
    for stage, groups in enumerate(tree):
        logger.info("stage %d: %s", stage, " | ".join(",".join(group) for group in groups))
    if sim.stability is not None and not sim.stability["stable"]:
        logger.warning("The partition is not stable over seeds and halves: see 'stability' in %s.", sim_path)
    logger.info("wrote %s, %s and %s", sim_path, tree_path, png)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(argv)


if __name__ == "__main__":
    main()
