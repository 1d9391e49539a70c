"""
Data-loading share of a training step and steps per second, with the demo settings of examples/train_tglora.py.

It builds the data loaders and the model with the example's own functions (`get_dataloaders`, `build_model`) and the
`--demo` preset, then times each step in two parts: waiting for the next batch (decoding, augmentation, collation)
and compute (forward, per-task losses, backward, clipping, AdamW). Each setting runs in a fresh process, settings
interleaved over rounds, and the table reports medians over rounds.

    python benchmarks/bench_training.py                      # prints a Markdown table
    python benchmarks/bench_training.py --markdown /tmp/training.md   # a table for benchmarks/RESULTS.md
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (torch threads, data loader workers, decoded-sample cache); the first is the demo's data path
    (1, 0, True),
    (2, 0, True),
    (1, 0, False),
    (2, 0, False),
    (1, 1, False),
]


def load_example():
    spec = importlib.util.spec_from_file_location("train_tglora", ROOT / "examples" / "train_tglora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(threads: int, num_workers: int, cache: bool, steps: int, warmup: int | None) -> dict:
    """One setting in this process: per-step data wait and compute times."""
    import torch
    from accelerate import Accelerator

    from peft_tglora.tasks import multitask_loss

    torch.set_num_threads(threads)
    example = load_example()
    args = example.parse_args(["--demo", "--num_workers", str(num_workers), "--cpu"])
    args.cache_decoded = cache
    config = {k: getattr(args, k) for k in example.HYPERPARAMETERS}
    tasks = args.tasks.split(",")
    config.update(tasks=tasks, lora_alpha=args.r, loss_weights=None)
    accelerator = Accelerator(cpu=True)
    train_dataloader, _ = example.get_dataloaders(config, args, accelerator)
    model, _ = example.build_model(config, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"])
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    model.train()
    warmup = len(train_dataloader) if warmup is None else warmup  # one epoch: the cache is filled, as in epochs 2+
    data_times, compute_times = [], []
    epoch, iterator = 0, iter(train_dataloader)
    while len(compute_times) < warmup + steps:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            train_dataloader.set_epoch(epoch)
            train_dataloader.dataset.set_epoch(epoch)
            iterator = iter(train_dataloader)
            batch = next(iterator)
        t1 = time.perf_counter()
        outputs = model(batch["pixel_values"])
        loss, _ = multitask_loss({t: o.float() for t, o in outputs.items()}, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, config["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
        t2 = time.perf_counter()
        data_times.append(t1 - t0)
        compute_times.append(t2 - t1)
    data, compute = sum(data_times[warmup:]), sum(compute_times[warmup:])
    return {
        "threads": threads,
        "num_workers": num_workers,
        "cache": cache,
        "steps": steps,
        "batch_size": config["batch_size"],
        "data_share": data / (data + compute),
        "steps_per_s": steps / (data + compute),
        "data_ms": 1000 * statistics.median(data_times[warmup:]),
        "compute_ms": 1000 * statistics.median(compute_times[warmup:]),
    }


def run_setting(threads, num_workers, cache, steps, warmup):
    command = [sys.executable, __file__, "--worker", f"{threads},{num_workers},{int(cache)}", "--steps", str(steps)]
    command += [] if warmup is None else ["--warmup", str(warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], rounds: int) -> str:
    lines = [
        (
            "| threads | loader workers | decoded cache | data share of a step | steps / s | data wait / step "
            "| compute / step |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for (threads, workers, cache), results in rows:
        med = {
            k: statistics.median(r[k] for r in results) for k in ("data_share", "steps_per_s", "data_ms", "compute_ms")
        }
        spread = [r["steps_per_s"] for r in results]
        lines.append(
            f"| {threads} | {workers} | {'yes' if cache else 'no'} | {100 * med['data_share']:.1f}% | {med['steps_per_s']:.2f} "
            f"({min(spread):.2f}–{max(spread):.2f}) | {med['data_ms']:.1f} ms | {med['compute_ms']:.1f} ms |"
        )
    return "\n".join(lines) + f"\n\nMedians over {rounds} rounds (range of steps/s in brackets)."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps; default one epoch.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="Also write the table into this file.")
    parser.add_argument("--settings", default=None, help="e.g. '1,0,1 2,0,0': threads,workers,cache per setting.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        threads, workers, cache = map(int, args.worker.split(","))
        print(json.dumps(worker(threads, workers, bool(cache), args.steps, args.warmup)))
        return
    settings = SETTINGS
    if args.settings:
        settings = [tuple(int(v) for v in item.split(",")) for item in args.settings.split()]
        settings = [(t, w, bool(c)) for t, w, c in settings]
    results = {setting: [] for setting in settings}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every setting alike
        for setting in settings:
            results[setting].append(run_setting(*setting, args.steps, args.warmup))
    batch = results[settings[0]][0]["batch_size"]
    text = (
        f"Demo settings (`examples/train_tglora.py --demo`: tiny Swin, 4 tasks, tree 1,1,2,4, 64 px, batch {batch}), "
        f"{args.steps} timed steps after {args.warmup or 'one epoch of'} warm-up steps, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}.\n\n" + table(list(results.items()), args.rounds)
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
