"""Where the grouped merge's cost at small batches goes: one matmul per layer, timed kernel by kernel (issue 10).

`bench_tglora.py` measures `merge_adapter(grouped=True)` end to end. This script records the matmuls that a merged
1,1,2,4 Swin-T runs in its grouped stages (shapes taken from a forward through the real model) and times, per layer
shape and side by side in one round-robin:

    one_weight     F.linear over all G streams' rows with one weight: what the base model with the same streams runs
    grouped        the merged layer's own forward (`_grouped_base_forward`): G weights, one batched matmul
    same_weight    the same batched matmul with one weight repeated G times (a view): no extra weight memory
    per_group      G plain F.linear calls, one per group
    mkl_prepacked  G F.linear calls on weights packed once ahead with MKL's packed GEMM (a private PyTorch op:
                   a diagnosis of where the time goes, not something the library uses); CPU and float32 only

    python benchmarks/bench_grouped_matmul.py                 # Swin-T, 224x224, batch 2, CPU, 2 threads
    python benchmarks/bench_grouped_matmul.py --quick         # 64x64 smoke run
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_tglora import (
    QUICK,
    SWIN_T,
    BenchConfig,
    build_backbone,
    pixel_values,
    summarize,
    tglora_model,
    time_round_robin,
)

from peft_tglora.layer import TGLoraLayer


VARIANTS = ("one_weight", "grouped", "same_weight", "per_group", "mkl_prepacked")


def _mkl_packed_linear():
    """MKL's packed-weight linear if this torch has it (x86 CPU builds), else None."""
    ops = getattr(torch.ops, "mkl", None)
    try:
        return ops._mkl_reorder_linear_weight, ops._mkl_linear
    except (AttributeError, RuntimeError):
        return None


def grouped_layers(cfg: BenchConfig) -> list[tuple[str, int, TGLoraLayer, torch.Size]]:
    """(name, stage, layer, input shape) of every merged layer that runs more than one group in one forward."""
    model = tglora_model(cfg, build_backbone(cfg), cfg.task_groups, init_lora_weights=False)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter(grouped=True)
    seen, handles = [], []
    tuner = model.base_model
    for name, module in tuner.model.named_modules():
        weights = getattr(module, "merged_group_weight", None) if isinstance(module, TGLoraLayer) else None
        if weights is not None and weights.shape[0] > 1:
            stage = tuner._stage_of_key(name)  # the tuner's own stage of a module, as its layers are told
            record = lambda m, args, name=name, stage=stage: seen.append((name, stage, m, args[0].shape))  # noqa: E731
            handles.append(module.register_forward_pre_hook(record))
    with torch.inference_mode():
        model(pixel_values(cfg))
    for handle in handles:
        handle.remove()
    return seen


def kernels(layer: TGLoraLayer, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Every variant's matmul of `layer` on `x` (`[G * n, in]`, group-major), as a call that returns its output."""
    weights = layer.merged_group_weight  # [G, out, in]
    groups = weights.shape[0]
    rows = x.shape[0] // groups
    bias, one = layer.get_base_layer().bias, layer.get_base_layer().weight
    steps = {
        "one_weight": lambda: F.linear(x, one, bias),
        "grouped": lambda: layer._grouped_base_forward(x),
        "same_weight": lambda: torch.baddbmm(
            bias, x.view(groups, rows, -1), one.expand(groups, -1, -1).transpose(1, 2)
        ).reshape(x.shape[0], -1),
        "per_group": lambda: torch.cat(
            [F.linear(x[g * rows : (g + 1) * rows], weights[g], bias) for g in range(groups)]
        ),
    }
    packed_ops = _mkl_packed_linear() if x.device.type == "cpu" and weights.dtype == torch.float32 else None
    if packed_ops is not None:
        reorder, linear = packed_ops
        packed = [reorder(weights[g].contiguous(), rows) for g in range(groups)]
        steps["mkl_prepacked"] = lambda: torch.cat(
            [linear(x[g * rows : (g + 1) * rows], packed[g], weights[g], bias, rows) for g in range(groups)]
        )
    return steps


def _repeated(step: Callable[[], torch.Tensor], repeats: int) -> Callable[[], None]:
    def call():
        for _ in range(repeats):
            step()

    return call


def run(cfg: BenchConfig, repeats: int) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    by_shape = collections.defaultdict(list)
    for _, stage, layer, shape in grouped_layers(cfg):
        weights = layer.merged_group_weight
        by_shape[(stage, weights.shape[0], tuple(shape), weights.shape[1])].append(layer)
    rows = []
    for (stage, groups, shape, out_features), members in by_shape.items():
        x = torch.randn(shape, device=cfg.device).reshape(-1, shape[-1])  # [G * n, in]
        steps = kernels(members[0], x)
        with torch.inference_mode():
            times = time_round_robin({k: _repeated(v, repeats) for k, v in steps.items()}, cfg)
        ratios = {
            k: summarize([t / b for t, b in zip(times[k], times["one_weight"])]) for k in steps if k != "one_weight"
        }
        rows.append(
            dict(
                stage=stage,
                layers=len(members),
                groups=groups,
                rows_per_group=x.shape[0] // groups,
                in_features=x.shape[1],
                out_features=out_features,
                one_weight_ms=1e3 * summarize(times["one_weight"])["median"] / repeats,
                ratios=ratios,
            )
        )
    return rows


def to_markdown(rows: list[dict], cfg: BenchConfig) -> str:
    names = [v for v in VARIANTS[1:] if any(v in r["ratios"] for r in rows)]
    lines = [
        "| stage | layers | groups x rows | in -> out | " + " | ".join(f"`{n}` / `one_weight`" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"**{r['ratios'][n]['median']:.3f}**" if n in r["ratios"] else "-" for n in names]
        lines.append(
            f"| {r['stage']} | {r['layers']} | {r['groups']} x {r['rows_per_group']} | "
            f"{r['in_features']} -> {r['out_features']} | " + " | ".join(cells) + " |"
        )
    # the grouped stages as a whole: every layer's median time, weighted by how many layers share its shape
    total = {
        n: sum(r["layers"] * r["one_weight_ms"] * r["ratios"][n]["median"] for r in rows if n in r["ratios"])
        / sum(r["layers"] * r["one_weight_ms"] for r in rows if n in r["ratios"])
        for n in names
    }
    lines.append("| all grouped layers | | | | " + " | ".join(f"**{total[n]:.3f}**" for n in names) + " |")
    lines += [
        "",
        (
            f"Backbone `SwinConfig(**{cfg.backbone})`, batch {cfg.batch_size}, tree {cfg.task_groups}; medians of "
            f"per-round ratios over {cfg.rounds} rounds after {cfg.warmup} warm-up; device {cfg.device}, "
            f"{cfg.threads} threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x64 (window 2), 3 rounds")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 25, quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per timed sample (default 10, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    cfg = BenchConfig(
        backbone=dict(QUICK if args.quick else SWIN_T),
        batch_size=args.batch_size,
        rounds=args.rounds or (3 if args.quick else 25),
        warmup=1 if args.quick else 3,
        device=args.device,
        threads=args.threads,
    )
    start = time.perf_counter()
    rows = run(cfg, repeats=args.repeats or (1 if args.quick else 10))
    table = to_markdown(rows, cfg)
    print(table)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
