"""Overhead of task similarity: time of `compute_task_similarity` (T tasks, 8 batches) / time of one training epoch.

Both run on the same synthetic example data (`peft_tglora.tasks.make_synthetic_multitask`), the same Swin, the same
heads and batch size. The similarity uses the frozen backbone with a shared TGLoRA tree (as a user would); the epoch
trains TGLoRA with the tree the similarity produced (default counts 1,1,2,4) plus the heads, with AdamW.
Each is run once untimed first, so one-off costs (lazy imports, allocator warm-up) are not counted.

    python benchmarks/bench_similarity.py                      # CPU, well under 2 minutes
    python benchmarks/bench_similarity.py --num-images 1024    # a longer epoch

Prints a markdown table row. The similarity costs a fixed number of batches, so the ratio falls as 1 / (batches per
epoch); the last column gives the epoch length at which it reaches 2 %.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from peft import get_peft_model
from torch import nn
from transformers import SwinConfig, SwinModel

from peft_tglora import TGLoraConfig
from peft_tglora.clustering import build_task_tree
from peft_tglora.similarity import compute_task_similarity
from peft_tglora.tasks import build_dataloaders, build_heads, make_synthetic_multitask, multitask_loss


class Head(nn.Module):
    """A task head that upsamples to the label size, as the losses expect."""

    def __init__(self, head, size):
        super().__init__()
        self.head, self.size = head, size

    def forward(self, features):
        return self.head(features, output_size=self.size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="semseg,human_parts,saliency,normals")
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--head-warmup-steps", type=int, default=10)
    parser.add_argument("--groups-per-stage", default="1,1,2,4")
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside peft
    tasks = args.tasks.split(",")
    size = (args.image_size, args.image_size)

    torch.manual_seed(args.seed)
    config = SwinConfig(
        image_size=args.image_size,
        patch_size=4,
        embed_dim=args.embed_dim,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=2,
    )
    base_state = SwinModel(config).state_dict()
    widths = [args.embed_dim * 2**s for s in range(4)]
    heads = {t: Head(h, size) for t, h in build_heads(tasks, widths, dataset="synthetic").items()}
    data = make_synthetic_multitask(args.num_images, args.image_size, tasks=tasks, seed=args.seed)
    loader, _ = build_dataloaders(data, data, tasks, image_size=args.image_size, batch_size=args.batch_size)
    losses = {t: (lambda p, batch, t=t: multitask_loss({t: p}, batch)[0]) for t in tasks}

    def backbone(groups):
        model = SwinModel(config)
        model.load_state_dict(base_state)
        return get_peft_model(model, TGLoraConfig(tasks=tasks, task_groups=groups, r=8))

    frozen = backbone("shared")
    kwargs = dict(seed=args.seed, disable_progress=True)
    compute_task_similarity(frozen, heads, losses, loader, num_batches=1, head_warmup_steps=1, **kwargs)  # untimed
    start = time.perf_counter()
    sim = compute_task_similarity(
        frozen, heads, losses, loader, num_batches=args.num_batches, head_warmup_steps=args.head_warmup_steps, **kwargs
    )
    sim_seconds = time.perf_counter() - start
    counts = [int(c) for c in args.groups_per_stage.split(",")]
    tree = build_task_tree(sim, counts)

    model = backbone(tree)
    train_heads = nn.ModuleDict(heads)
    params = [p for p in model.parameters() if p.requires_grad] + list(train_heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    model.train()
    train_heads.train()

    def step(batch):
        features = model(batch["pixel_values"]).task_features
        loss, _ = multitask_loss({t: train_heads[t](features[t]) for t in tasks}, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()

    step(next(iter(loader)))  # untimed
    start = time.perf_counter()
    num_steps = 0
    for batch in loader:
        step(batch)
        num_steps += 1
    epoch_seconds = time.perf_counter() - start

    ratio = sim_seconds / epoch_seconds
    break_even = round(num_steps * ratio / 0.02)
    print(f"tree: {tree}")
    print(
        "| tasks | similarity batches (+warm-up) | similarity s | epoch batches | epoch s | ratio | epoch batches for 2 % |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {len(tasks)} | {args.num_batches} (+{args.head_warmup_steps}) | {sim_seconds:.2f} | {num_steps} | "
        f"{epoch_seconds:.2f} | {100 * ratio:.1f} % | {break_even} |"
    )


if __name__ == "__main__":
    main()
