"""Speed and memory of TGLoRA against plain PEFT LoRA, a naive per-task loop and the base model (issue 2).

Every variant runs on the same backbone weights and the same input batch. Timings are taken side by side in one
run: each round times every variant once, in an order that rotates from round to round, after warm-up rounds.
Ratios are computed per round (both sides of a ratio come from the same round) and summarised by their median,
quartiles and range. Peak memory of one step is measured for each variant in a fresh process (CPU) or with the
CUDA allocator's peak counter (GPU).

    python benchmarks/bench_tglora.py                       # Swin-T, 224x224, batch 2, CPU, 2 threads
    python benchmarks/bench_tglora.py --quick               # smoke run: 64x64, fewer rounds
    python benchmarks/bench_tglora.py --device cuda --json out.json --markdown out.md

The variants (see benchmarks/RESULTS.md for what each comparison means):

    train   tglora        TGLoRA, tree 1,1,2,4: forward + backward
            lora_streams  PEFT LoRA + hooks that replicate the batch where TGLoRA's streams split
            naive_loop    PEFT LoRA with one adapter per task: one forward + backward per task, full batch
            lora          PEFT LoRA, one stream (context: one single-task step)
    infer   base                   the frozen backbone, `inference_mode` forward
            tglora_shared_merged   TGLoRA, tree "shared", after `merge_adapter()`
            base_streams           the frozen backbone + the same batch-replicating hooks
            tglora_merged          TGLoRA, tree 1,1,2,4, after `merge_adapter()` (stages 0, 1 merged)
            tglora_grouped_merged  TGLoRA, tree 1,1,2,4, after `merge_adapter(grouped=True)` (every stage merged)
            tglora_one_task        the same, `tasks=["sal"]`: one stream (against `base`)
            base_two_streams       the frozen backbone + hooks that replicate only the streams of sal and normals
            tglora_two_tasks       the grouped-merged model, `tasks=["sal", "normals"]` (one stage-2 group)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from transformers import SwinConfig, SwinModel

from peft_tglora import BACKBONES, TaskTree, TGLoraConfig


TASKS = ("semseg", "parts", "sal", "normals")
SWIN_T = {}  # SwinConfig() defaults are Swin-T: embed 96, depths 2,2,6,2, heads 3,6,12,24, window 7, 224x224
QUICK = {"image_size": 64, "window_size": 2}  # Swin-T widths and depths; every stage side (16, 8, 4, 2) fits windows

TRAIN = ("tglora", "lora_streams", "naive_loop", "lora")
INFER = (
    "base",
    "tglora_shared_merged",
    "base_streams",
    "tglora_merged",
    "tglora_grouped_merged",
    "tglora_one_task",
    "base_two_streams",
    "tglora_two_tasks",
)
ONE_TASK, TWO_TASKS = ("sal",), ("sal", "normals")  # two tasks of one stage-2 group of the 1,1,2,4 tree
# (numerator, denominator, goal or None): the comparisons the issue asks for, plus context rows
COMPARISONS = (
    ("tglora", "lora_streams", 1.10),
    ("tglora", "naive_loop", 0.5),
    ("tglora_shared_merged", "base", 1.02),
    ("tglora_merged", "base_streams", None),
    ("tglora_grouped_merged", "base_streams", 1.01),
    ("tglora_one_task", "base", 1.02),
    ("tglora_two_tasks", "base_two_streams", 1.02),
    ("tglora", "lora", None),
)


@dataclass
class BenchConfig:
    backbone: dict = field(default_factory=lambda: dict(SWIN_T))  # SwinConfig keyword arguments
    tasks: tuple[str, ...] = TASKS
    task_groups: str = "1,1,2,4"
    r: int = 16
    lora_alpha: int = 16
    batch_size: int = 2
    rounds: int = 15
    warmup: int = 2
    infer_repeats: int = 3  # forwards per timed inference sample: one forward is short and noisy on a CPU
    device: str = "cpu"
    threads: int = 2
    seed: int = 0


# ---------------------------------------------------------------------------------------------------- the variants


def build_backbone(cfg: BenchConfig) -> SwinModel:
    torch.manual_seed(cfg.seed)
    return SwinModel(SwinConfig(**cfg.backbone))


def pixel_values(cfg: BenchConfig) -> torch.Tensor:
    size = SwinConfig(**cfg.backbone).image_size
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randn(cfg.batch_size, 3, size, size, generator=generator).to(cfg.device)


def task_tree(cfg: BenchConfig, task_groups: str | None = None) -> TaskTree:
    config = TGLoraConfig(tasks=list(cfg.tasks), task_groups=task_groups or cfg.task_groups)
    return config.task_tree


def two_task_tree(cfg: BenchConfig) -> TaskTree:
    """The part of the tree that serves `TWO_TASKS`: one stream until their stage-2 group splits at stage 3."""
    tree = task_tree(cfg)
    stages = [[[t for t in group if t in TWO_TASKS] for group in stage] for stage in tree.to_groups()]
    return TaskTree.from_groups(TWO_TASKS, [[group for group in stage if group] for stage in stages])


def replicate_streams(swin: SwinModel, tree: TaskTree) -> list:
    """Pre-hooks on `encoder.layers[s]` that copy the batch where `tree` splits, as TGLoRA does: group-major, child g
    a copy of its parent's rows. Written here, independently of `peft_tglora.model`, for the baselines."""

    def make_hook(stage: int):
        parents = torch.tensor(tree.parent_indices[stage])
        previous = 1 if stage == 0 else tree.groups_per_stage[stage - 1]

        def hook(module, args, kwargs):
            hidden = args[0]
            streams = hidden.reshape(previous, -1, *hidden.shape[1:])  # [G_prev, B, L, C]
            hidden = streams.index_select(0, parents.to(hidden.device)).reshape(-1, *hidden.shape[1:])  # [G*B, L, C]
            return (hidden, *args[1:]), kwargs

        return hook

    return [
        stage.register_forward_pre_hook(make_hook(s), with_kwargs=True)
        for s, stage in enumerate(swin.encoder.layers)
        if tree.splits_at(s)
    ]


def tglora_model(cfg: BenchConfig, base: SwinModel, task_groups: str, init_lora_weights: bool = True):
    config = TGLoraConfig(
        tasks=list(cfg.tasks),
        task_groups=task_groups,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(base, config)


def lora_config(cfg: BenchConfig) -> LoraConfig:
    # the same linears TGLoRA adapts by default on Swin (q/k/v/o_proj, fc1, fc2), same rank and scaling
    targets = list(BACKBONES["swin"].target_modules)  # what TGLoRAConfig(target_modules=None) resolves to on Swin
    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)


def loss_of(output) -> torch.Tensor:
    return output.last_hidden_state.square().mean()


def train_step(model, x: torch.Tensor) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        loss_of(model(pixel_values=x)).backward()

    return step


def build_variant(name: str, cfg: BenchConfig, base: SwinModel, x: torch.Tensor) -> tuple[Callable[[], None], dict]:
    """A callable running one step of variant `name` on a private copy of `base`, and facts about it."""
    backbone = copy.deepcopy(base).to(cfg.device)
    info = {}
    if name == "tglora":
        model = tglora_model(cfg, backbone, cfg.task_groups).train()
        step = train_step(model, x)
    elif name in ("lora_streams", "lora"):
        model = get_peft_model(backbone, lora_config(cfg)).train()
        if name == "lora_streams":
            replicate_streams(model.base_model.model, task_tree(cfg))
        step = train_step(model, x)
    elif name == "naive_loop":
        model = get_peft_model(backbone, lora_config(cfg), adapter_name=cfg.tasks[0])
        for task in cfg.tasks[1:]:
            model.add_adapter(task, lora_config(cfg))
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            for task in cfg.tasks:
                model.set_adapter(task)  # makes this task's adapter the active, trainable one
                loss_of(model(pixel_values=x)).backward()

        info["trainable_params"] = sum(
            p.numel() for n, p in model.named_parameters() if any(f".{t}." in n for t in cfg.tasks)
        )
    elif name in INFER:
        model, kwargs = backbone, {}
        if name in ("tglora_grouped_merged", "tglora_one_task", "tglora_two_tasks"):
            model = tglora_model(cfg, backbone, cfg.task_groups, False)
            model.merge_adapter(grouped=True)
            held = [
                m.merged_group_weight for m in model.modules() if getattr(m, "merged_group_weight", None) is not None
            ]
            info["merged_weights_mib"] = sum(w.numel() * w.element_size() for w in held) / 2**20
            info["base_weights_mib"] = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2**20
            if name != "tglora_grouped_merged":
                kwargs["tasks"] = list(ONE_TASK if name == "tglora_one_task" else TWO_TASKS)
        elif name in ("tglora_shared_merged", "tglora_merged"):
            # random B so that merging changes the weights; speed does not depend on the values
            model = tglora_model(cfg, backbone, "shared" if name == "tglora_shared_merged" else cfg.task_groups, False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "stages [2, 3] ... cannot merge": expected for the grouped tree
                model.merge_adapter()
            info["merged_layers"] = sum(bool(getattr(m, "merged", False)) for m in model.modules())
        elif name == "base_streams":
            replicate_streams(model, task_tree(cfg))
        elif name == "base_two_streams":
            replicate_streams(model, two_task_tree(cfg))
        if name in ("base", "base_streams", "base_two_streams"):
            model.requires_grad_(False)  # the frozen backbone; inference only
        model.eval()

        def step():
            with torch.inference_mode():
                for _ in range(cfg.infer_repeats):
                    model(pixel_values=x, **kwargs)

    else:
        raise ValueError(f"Unknown variant {name!r}; known are {TRAIN + INFER}.")
    info.setdefault("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad))
    return step, info


# ---------------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(
    steps: dict[str, Callable[[], None]], cfg: BenchConfig, progress: bool = False
) -> dict[str, list[float]]:
    """Seconds per step for every variant and round; the order of variants rotates by one each round."""
    names = list(steps)
    times = {name: [] for name in names}
    for round_ in range(cfg.warmup + cfg.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(cfg.device)
            start = time.perf_counter()
            steps[name]()
            _sync(cfg.device)
            if round_ >= cfg.warmup:
                times[name].append(time.perf_counter() - start)
        if progress:
            label = "warm-up" if round_ < cfg.warmup else "round"
            print(f"{label} {round_ + 1}/{cfg.warmup + cfg.rounds}, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "q1": _quantile(values, 0.25),
        "q3": _quantile(values, 0.75),
        "min": min(values),
        "max": max(values),
    }


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _return_freed_memory() -> None:
    """Make glibc give freed memory back to the OS, so that RSS follows what is alive."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS is rougher there
        return
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD, fixed: buffers over 64 KiB are mmap'ed and unmapped when freed
    libc.malloc_trim(0)


def measure_peak_memory(name: str, cfg: BenchConfig) -> dict[str, float]:
    """Peak memory of one step of `name`, above what the process holds right before the step, in MiB.

    CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` before the step. CPU: the kernel's
    resident-set high-water mark (`VmHWM`, reset by writing 5 to /proc/self/clear_refs) minus `VmRSS` before the
    step. This only tracks the step if freed memory goes back to the OS, so run it in a fresh process with
    `MALLOC_MMAP_THRESHOLD_` fixed (`peak_memory_in_subprocess` does); after one warm-up step, gc and malloc_trim.
    """
    torch.set_num_threads(cfg.threads)
    _return_freed_memory()  # before the model is built, so that its weights do not sit in a grown heap
    x = pixel_values(cfg)
    step, _ = build_variant(name, cfg, build_backbone(cfg), x)
    step()  # warm-up: lazily created buffers and thread pools are not part of a step
    gc.collect()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"step_peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    _return_freed_memory()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    return {"step_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024}


def peak_memory_in_subprocess(name: str, cfg: BenchConfig) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # a fixed threshold: big buffers are mmap'ed and returned
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", name, "--config", json.dumps(asdict(cfg))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory worker for {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the run


MEMORY_METHODS = {
    "subprocess": "peak RSS (VmHWM) minus RSS before one step, each variant in a fresh process",
    "inprocess": "peak RSS (VmHWM) minus RSS before one step, all variants in this process (rougher)",
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before one step",
    "none": "not measured",
}


def run(
    cfg: BenchConfig, variants: tuple[str, ...] = TRAIN + INFER, memory: str = "subprocess", progress: bool = False
) -> dict:
    """Time `variants` side by side and measure their peak memory (`memory`: a key of `MEMORY_METHODS`)."""
    threads = torch.get_num_threads()
    try:
        return _run(cfg, variants, memory, progress)
    finally:
        torch.set_num_threads(threads)  # callers (tests) keep their own setting


def _run(cfg: BenchConfig, variants: tuple[str, ...], memory: str, progress: bool) -> dict:
    torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()[0]
    x = pixel_values(cfg)
    base = build_backbone(cfg)
    steps, infos = {}, {}
    for name in variants:
        steps[name], infos[name] = build_variant(name, cfg, base, x)
    times = time_round_robin(steps, cfg, progress)
    results = {
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(),
            # other processes on the machine slow every variant; ratios stay comparable, absolute times do not
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
        },
        "memory_method": MEMORY_METHODS[memory],
        "variants": {
            name: {**infos[name], "seconds": times[name], "seconds_summary": summarize(times[name])}
            for name in variants
        },
        "ratios": [],
    }
    for num, den, goal in COMPARISONS:
        if num in times and den in times:
            per_round = [a / b for a, b in zip(times[num], times[den])]
            summary = summarize(per_round)
            results["ratios"].append(
                {
                    "numerator": num,
                    "denominator": den,
                    "goal": goal,
                    "per_round": per_round,
                    **summary,
                    "meets_goal": None if goal is None else summary["median"] <= goal,
                }
            )
    if memory not in MEMORY_METHODS:
        raise ValueError(f"`memory` must be one of {sorted(MEMORY_METHODS)}, got {memory!r}.")
    if memory != "none":
        for name in variants:
            if progress:
                print(f"peak memory of {name}", file=sys.stderr)
            measure = peak_memory_in_subprocess if memory == "subprocess" else measure_peak_memory
            results["variants"][name].update(measure(name, cfg))
    return results


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    on_gpu = cfg["device"].startswith("cuda")
    lines = [
        "| ratio (per-round, median) | goal | median | quartiles | range | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["ratios"]:
        goal = "-" if r["goal"] is None else f"<= {r['goal']:.2f}"
        met = "-" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "**no**")
        lines.append(
            f"| `{r['numerator']}` / `{r['denominator']}` | {goal} | **{r['median']:.3f}** | "
            f"{r['q1']:.3f}-{r['q3']:.3f} | {r['min']:.3f}-{r['max']:.3f} | {met} |"
        )
    variants = results["variants"]
    has_memory = any("step_peak_mib" in v for v in variants.values())
    time_note = "ms" if on_gpu else "ms, this machine, for orientation only"
    header = f"| variant | trainable params | median step ({time_note}) |"
    rule = "|---|---|---|"
    if has_memory:
        header += " peak memory of one step above rest (MiB) |"
        rule += "---|"
    lines += ["", header, rule]
    for name, v in variants.items():
        row = f"| `{name}` | {v['trainable_params']:,} | {1000 * v['seconds_summary']['median']:.0f} |"
        if has_memory:
            row += f" {v.get('step_peak_mib', float('nan')):.0f} |"
        lines.append(row)
    merged = next((v for v in variants.values() if "merged_weights_mib" in v), None)
    if merged is not None:
        note = (
            f"`merge_adapter(grouped=True)` holds {merged['merged_weights_mib']:.0f} MiB of merged weights (one per "
            f"group and layer) beside the {merged['base_weights_mib']:.0f} MiB backbone, whose weights it leaves as "
            "they were."
        )
        lines += ["", note]
    env = results["environment"]
    setup = (
        f"Backbone `SwinConfig(**{cfg['backbone']})`, batch {cfg['batch_size']}, tasks {len(cfg['tasks'])}, tree "
        f"{cfg['task_groups']}, r={cfg['r']}, alpha={cfg['lora_alpha']}; {cfg['rounds']} rounds after "
        f"{cfg['warmup']} warm-up, {cfg['infer_repeats']} forwards per inference sample; device {env['device']}, {env['threads']} threads, torch {env['torch']}; "
        f"load average before/after {env['loadavg_before']:.1f}/{env['loadavg_after']:.1f}; "
        f"peak memory: {results['memory_method']}."
    )
    lines += ["", setup]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x64 (window 2), 1 warm-up, 3 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--infer-repeats", type=int, default=3, help="forwards per timed inference sample")
    parser.add_argument(
        "--memory",
        choices=sorted(MEMORY_METHODS),
        help="how to measure peak memory (default: cuda on a GPU, else subprocess; inprocess with --quick)",
    )
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(TRAIN + INFER)} (default: all)")
    parser.add_argument("--json", help="write the raw numbers (every round) here")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # peft 0.21 reads a deprecated transformers property on every wrap; it says nothing about this benchmark
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    if args.memory_worker:  # one variant's peak memory, in a fresh process (see peak_memory_in_subprocess)
        raw = json.loads(args.config)
        cfg = BenchConfig(**{**raw, "tasks": tuple(raw["tasks"])})
        print(json.dumps(measure_peak_memory(args.memory_worker, cfg)))
        return

    cfg = BenchConfig(
        backbone=dict(QUICK if args.quick else SWIN_T),
        batch_size=args.batch_size,
        rounds=args.rounds or (3 if args.quick else 15),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        device=args.device,
        threads=args.threads,
        infer_repeats=args.infer_repeats,
    )
    if not args.device.startswith("cuda") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        # two-thread ops wait for scheduler slices on a busy machine: short ops (and so some variants) suffer most
        print(f"warning: load average {os.getloadavg()[0]:.1f}; other processes skew CPU timings", file=sys.stderr)
    memory = args.memory or ("cuda" if args.device.startswith("cuda") else "inprocess" if args.quick else "subprocess")
    start = time.perf_counter()
    variants = tuple(args.variants.split(",")) if args.variants else TRAIN + INFER
    unknown = sorted(set(variants) - set(TRAIN + INFER))
    if unknown:
        parser.error(f"unknown variants {unknown}; known are {','.join(TRAIN + INFER)}")
    results = run(cfg, variants=variants, memory=memory, progress=True)
    results["wall_seconds"] = time.perf_counter() - start
    table = to_markdown(results)
    print(table)
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
