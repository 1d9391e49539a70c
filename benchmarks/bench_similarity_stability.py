"""Stability of the gradient task similarity on CamVid: how many batches, seeds and warm-up steps give a stable tree.

For every (head warm-up, seed), one pass takes the unit gradient of each task on each of ``--max_batches`` batches,
exactly as `compute_task_similarity` does inside `group_tasks` (same re-initialised heads, warm-up, seeded loader,
parameters and order; checked against `group_tasks` itself for one setting before anything is printed). The
similarity for n batches is then the one computed from the first n, so one pass serves every n. For each n the
library's `stability_report` says whether every seed and every half of the batches (even / odd) gives the 2-group
partition of the seed average, and puts within-task consistency next to between-task similarity.

    python benchmarks/bench_similarity_stability.py             # pretrained tiny-swin if cached, else random
    python benchmarks/bench_similarity_stability.py --backbone random --max_batches 8 --batches 4,8 --warmups 0

Single-threaded: about 1.2 CPU-s per batch and seed at 120x160 (x86), 3 CPU-minutes with the defaults. Prints a
markdown table; the columns are explained in docs/SIMILARITY.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model


REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / ".." / "shared" / "data" / "camvid_mt"
TASKS = ["semseg", "edges", "saliency", "edge_texture"]
# bench_accuracy.py's recipe: the run whose tree this similarity would choose
HEADS = dict(head_width=8, head_hidden=128, head_kernel=1, head_norm="batch")


def backbone_folder(name: str) -> tuple[str, str]:
    """(what to load, its label): the cached pretrained tiny-swin when it exists (never trains it), else random."""
    if name == "tiny-swin":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from pretrain_backbone import cache_root, make_recipe, recipe_hash

        folder = cache_root() / "backbones" / f"tiny-swin-{recipe_hash(make_recipe('tiny-swin'))}"
        if (folder / "pretrain.json").exists():
            return str(folder), "tiny-swin pretrained on CIFAR-10"
        print(f"# no pretrained tiny-swin in {folder} yet: using a random one", file=sys.stderr)
    return "tiny-swin", "tiny-swin, random init"


def setup(args, backbone_name):
    from peft_tglora import TGLoraConfig
    from peft_tglora.tasks import build_dataloaders, build_heads, load_multitask_dataset
    from peft_tglora.tasks.grouping import run_losses
    from peft_tglora.tasks.model import build_backbone, stage_channels

    data = load_multitask_dataset("camvid", "train", root=DATA_ROOT, tasks=TASKS)
    loader, _ = build_dataloaders(data, data, TASKS, image_size=args.image_size, batch_size=args.batch_size)
    base = build_backbone(backbone_name, args.image_size)
    shared = get_peft_model(base, TGLoraConfig(tasks=TASKS, task_groups="shared", r=4)).eval()
    channels = stage_channels(shared, args.image_size)
    width = HEADS["head_width"]
    heads = build_heads(TASKS, channels, dataset="camvid", channels=[width * 2**s for s in range(len(channels))],
                        hidden_channels=HEADS["head_hidden"], kernel_size=HEADS["head_kernel"], norm=HEADS["head_norm"])  # fmt: skip
    return shared, dict(heads), run_losses(TASKS), loader


def unit_gradients(backbone, heads, losses, loader, seed, warmup, num_batches):
    """[T, N, D] unit gradients, step for step what group_tasks -> compute_task_similarity computes for this seed."""
    from peft_tglora.similarity import _task_loss, _to_device, _warm_up_heads, shared_parameters
    from peft_tglora.tasks.grouping import _reinitialise

    loader.generator.manual_seed(seed)
    heads = {t: copy.deepcopy(h) for t, h in _reinitialise(heads, seed).items()}
    params = shared_parameters(backbone, "backbone")
    features_fn = lambda model, x: model(x).task_features  # noqa: E731
    units = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _warm_up_heads(
            backbone, heads, losses, [(loader, TASKS)], warmup, 1e-3, features_fn, torch.device("cpu"), False
        )
        for head in heads.values():
            head.eval()
        for p in params:
            p.requires_grad_(True)
        for batch in itertools.islice(loader, num_batches):
            batch = _to_device(batch, torch.device("cpu"))
            features = features_fn(backbone, batch["pixel_values"])
            row = []
            for j, task in enumerate(TASKS):
                loss = _task_loss(task, heads, losses, features, batch)
                grads = torch.autograd.grad(loss, params, retain_graph=j < len(TASKS) - 1, materialize_grads=True)
                flat = torch.cat([g.reshape(-1) for g in grads]).float()
                row.append(flat / flat.norm())
            units.append(torch.stack(row))
        for p in params:
            p.requires_grad_(False)
    return torch.stack(units, dim=1)  # [T, N, D]


def similarity_from_units(units, seed):
    """The `TaskSimilarity` that compute_task_similarity returns for these unit gradients (even / odd halves)."""
    from peft_tglora.similarity import TaskSimilarity

    def matrix(means):
        m = (means @ means.T).clamp(-1, 1).double()
        return ((m + m.T) / 2).fill_diagonal_(1.0)

    n = units.shape[1]
    total, halves = units.sum(1), torch.stack([units[:, 0::2].sum(1), units[:, 1::2].sum(1)])
    half_means = halves / torch.tensor([len(range(0, n, 2)), len(range(1, n, 2))])[:, None, None]
    unit_halves = half_means / half_means.norm(dim=2, keepdim=True)
    cross = (unit_halves[0] @ unit_halves[1].T).double()
    return TaskSimilarity(
        tasks=list(TASKS), matrix=matrix(total / n).numpy(), num_batches=[n] * len(TASKS), seed=seed,
        within_task=(((total.double() ** 2).sum(1) - n) / (n * (n - 1))).tolist(),
        half_matrices=torch.stack([matrix(m) for m in half_means]).numpy(), half_cosine=((cross + cross.T) / 2).numpy(),
    )  # fmt: skip


def check_against_library(shared, heads, losses, loader, seed, warmup, num_batches):
    """The mirror above must give what `group_tasks` gives: otherwise the table would measure something else."""
    from peft_tglora.tasks.grouping import group_tasks

    mine = similarity_from_units(unit_gradients(shared, heads, losses, loader, seed, warmup, num_batches), seed)
    theirs = group_tasks(shared, heads, losses, loader, [1, 1, 2, 4], num_batches=num_batches, seeds=(seed,),
                         head_warmup_steps=warmup, disable_progress=True).similarity  # fmt: skip
    np.testing.assert_allclose(mine.matrix, theirs.matrix, atol=1e-3)  # float32 sums in another order
    np.testing.assert_allclose(mine.half_cosine, theirs.half_cosine, atol=1e-3)  # float32 sums in another order


def fmt(partition):
    return " ".join("{" + ",".join(group) + "}" for group in partition)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny-swin", choices=["tiny-swin", "random"])
    p.add_argument("--image_size", default="120,160", type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batches", type=int, default=16)
    p.add_argument("--batches", default="4,8,16", help="Similarity batch counts to report (<= --max_batches).")
    p.add_argument("--warmups", default="0,10,30", help="Head warm-up steps to compare.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--groups_per_stage", default="1,1,2,4")
    p.add_argument("--json", default=None, help="Also write every report to this file.")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside peft
    logging.getLogger("peft_tglora").setLevel(logging.ERROR)  # group_tasks logs its tree; the table says it all
    from peft_tglora.tasks.grouping import stability_report

    name, label = backbone_folder(args.backbone)
    shared, heads, losses, loader = setup(args, name)
    seeds, counts = [int(s) for s in args.seeds.split(",")], [int(c) for c in args.groups_per_stage.split(",")]
    batch_counts = [int(n) for n in args.batches.split(",") if int(n) <= args.max_batches]
    warmups = [int(w) for w in args.warmups.split(",")]
    start = time.perf_counter()
    check_against_library(shared, heads, losses, loader, seeds[0], warmups[0], 4)
    split = counts.index(2) if 2 in counts else len(counts) - 1  # the first stage that splits the tasks in two
    print(f"{label}; CamVid train, {args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size}; "
          f"partition at stage {split} ({counts[split]} groups) of {counts}")  # fmt: skip
    print("| warm-up | batches | seeds | partition of the mean | per seed | seeds agree | halves agree | stable "
          "| batch-pair cosine (min) | within-task (min) | between-task (max) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for warmup in warmups:
        units = {s: unit_gradients(shared, heads, losses, loader, s, warmup, args.max_batches) for s in seeds}
        for n in batch_counts:
            runs = [similarity_from_units(units[s][:, :n], s) for s in seeds]
            report = stability_report(runs, counts)
            pairs = min(min(r.within_task) for r in runs)  # mean cosine of one task's gradients on two batches
            stage = report["stages"][split]
            per_seed = " / ".join(fmt(tree[split]) for tree in report["partitions_per_seed"])
            print(f"| {warmup} | {n} | {len(seeds)} | {fmt(stage['partition'])} | {per_seed} | "
                  f"{stage['seed_agreement']:.2f} | {stage['half_agreement']:.2f} | {'yes' if stage['stable'] else 'no'} | "
                  f"{pairs:.2f} | {min(report['within_task'].values()):.2f} | {max(report['between_task_max'].values()):.2f} |",
                  flush=True)  # fmt: skip
            records.append({"warmup": warmup, "num_batches": n, "report": report})
    print(f"\n{time.perf_counter() - start:.0f} s (check against group_tasks included)")
    if args.json:
        Path(args.json).write_text(json.dumps({"backbone": label, "runs": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
