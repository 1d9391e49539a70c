"""Accuracy benchmark (issue 11, items 4-5): does TGLoRA beat shared and per-task LoRA on real images?

Every variant trains LoRA-style adapters and the same light heads on one frozen backbone pretrained on CIFAR-10
(`pretrain_backbone.py`: tiny-swin by default, or `--backbone tiny-pvtv2`), with one recipe, on camvid_mt (367 train / 101 val CamVid frames at 120x160, four tasks:
semseg, edges, saliency, edge_texture). Val shares a sequence (0016E5) with 204 train frames, so val scores are
optimistic; `evaluate` re-scores the saved runs on any split in the same layout (the held-out test split).

    python benchmarks/bench_accuracy.py run             # the whole benchmark, <= 45 min on an idle 2-core CPU
    python benchmarks/bench_accuracy.py run --backbone tiny-pvtv2   # the same on the second backbone
    python benchmarks/bench_accuracy.py run --loss_balance initial   # the second protocol: losses balanced at init
    python benchmarks/bench_accuracy.py run --quick     # one variant pair, a few steps on 16 frames (CI)
    python benchmarks/bench_accuracy.py report          # rebuild table, verdicts and plot from the saved JSON
    python benchmarks/bench_accuracy.py report --backbone tiny-pvtv2
    python benchmarks/bench_accuracy.py evaluate --eval_root DIR --eval_split test

Each run is a worker process (`worker JSON`, one torch thread), two at a time. The protocol below is fixed before the
real run; the decision rules are in `accuracy_report.py`. Each backbone has its own results folder, picture and
RESULTS.md section (tiny-swin's keep their first names: `results/accuracy/`, `accuracy.png`), and so has each loss
balance (`--loss_balance initial`, the rule in `bench_accuracy_worker.LOSS_BALANCE`: `results/accuracy_balanced/`).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from bench_accuracy_worker import DEFAULT_BALANCE, LOSS_BALANCE


REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / ".." / "shared" / "data" / "camvid_mt"
FIRST_BACKBONE = "tiny-swin"  # the first benchmark's: its folder, picture and RESULTS.md heading keep their names
TASKS = ["semseg", "edges", "saliency", "edge_texture"]

# The recipe, the same for every variant. Taken from the demo preset of examples/train_tglora.py (the tiny backbone's
# settings), not tuned on these data; loss weights follow --loss_balance (`bench_accuracy_worker.LOSS_BALANCE`): camvid's
# DatasetSpec defaults, which balance trivial predictions, or 1 / each task's loss on the run's first batch (each
# worker records its measured initial losses and its weights in its JSON: `init_losses`, `loss_weights`).
RECIPE = dict(
    image_size=[120, 160], batch_size=8, epochs=6, learning_rate=2e-3, weight_decay=0.05, warmup_ratio=0.05,
    max_grad_norm=5.0, head_width=8, head_hidden=128, head_kernel=1, head_norm="batch", eval_batch_size=16,
)  # fmt: skip
# The equal-parameter arm is anchored at per-task LoRA r=5; `equal_parameter_ranks` picks shared's and the trees'
# ranks for the backbone in use. On tiny-swin and tiny-pvtv2 (both widths 32-64-128-256, depths 2-2-2-2, 18 C r
# adapter parameters per block) it gives shared r=20 and per-task r=5, both 345,600, tree 1,1,2,4 r=7, 346,752 (+0.3 %).
PER_TASK_RANK = 5
PARAMETER_TOLERANCE = 0.02  # every equal-parameter variant within 2 % of per-task LoRA's adapter parameters
SEEDS = [0, 1, 2]  # key variants; the 6 other partitions, equal-rank runs and sanity rows get seed 0 only
# group_tasks' defaults (measured on CamVid by benchmarks/bench_similarity_stability.py)
SIMILARITY = dict(seeds=[0, 1, 2], num_batches=16, head_warmup_steps=10, head_warmup_lr=1e-3)
QUICK = dict(train_frames=16, eval_frames=8, max_steps=2, similarity_batches=2, similarity_warmup=1)


def slug(name: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9+_-]+", "_", name).strip("_") + f"-s{seed}"


def equal_parameter_ranks(backbone, image_size=(64, 64)) -> tuple[dict[str, int], dict[str, int]]:
    """
    The equal-parameter arm's ranks on `backbone` (a `save_pretrained` folder or a transformers config) and their
    adapter-parameter counts, both `{"shared", "per_task", "tree"}`. The rule: per-task LoRA at r=PER_TASK_RANK;
    shared LoRA and the 1,1,2,4 trees each at the rank whose count is nearest per-task's (the lower one on a tie).
    Counts are the tuner's (`peft_tglora.costs.tree_costs`: trainable parameters after `get_peft_model`, on the meta
    device); raises if one is not within PARAMETER_TOLERANCE of per-task's.
    """
    from peft_tglora.costs import tree_costs

    def count(tree, r):
        return tree_costs(backbone, tree, image_size, tasks=TASKS, r=r).backbone_params

    target = count("per_task", PER_TASK_RANK)
    ranks, counts = {"per_task": PER_TASK_RANK}, {"per_task": target}
    for name, tree in (("shared", "shared"), ("tree", "1,1,2,4")):
        # LoRA's count is r (in + out) per adapted linear and group: the nearest rank is next to target / count(r=1)
        guess = target / count(tree, 1)
        candidates = {r: count(tree, r) for r in {max(1, math.floor(guess)), math.ceil(guess)}}
        ranks[name] = min(candidates, key=lambda r: (abs(candidates[r] - target), r))
        counts[name] = candidates[ranks[name]]
        if abs(counts[name] / target - 1) > PARAMETER_TOLERANCE:
            raise ValueError(
                f"No rank gives {name} within {PARAMETER_TOLERANCE:.0%} of per-task LoRA's {target:,} adapter "
                f"parameters on this backbone: the nearest, r={ranks[name]}, gives {counts[name]:,}."
            )
    return ranks, counts


def run_label(backbone: str, loss_balance: str = DEFAULT_BALANCE) -> str:
    """`accuracy` for tiny-swin with camvid's weights (the first benchmark), `accuracy_<backbone>` for another backbone,
    `_balanced` after either for `--loss_balance initial`: the results folder's and the picture's name."""
    name = "" if backbone == FIRST_BACKBONE else "_" + re.sub(r"[^A-Za-z0-9+_-]+", "_", Path(backbone).name)
    return f"accuracy{name}" + ("" if loss_balance == DEFAULT_BALANCE else "_balanced")


def default_out(backbone: str, loss_balance: str = DEFAULT_BALANCE) -> Path:
    return REPO / "benchmarks" / "results" / run_label(backbone, loss_balance)


def plan(ranks: dict[str, int], similarity_partition=None, quick: bool = False) -> list[dict]:
    """
    The runs in the order they start, at `ranks` (`equal_parameter_ranks`; the equal-rank arm runs every variant at
    the tree's rank, so the tree's runs serve both arms). Without `similarity_partition`: the key runs (per-task,
    shared, the Δm reference, the 7 partitions with seed 0), which need no similarity; with it: tglora_sim's seeds 1-2,
    then the equal-rank and sanity rows, so that the rows the verdicts need finish first.
    """
    from accuracy_report import partition_label, tree_for_partition, two_group_partitions

    def job(name, variant, arm, groups, r, seed, tasks=TASKS):
        return dict(kind="train", name=name, variant=variant, arm=arm, tasks=list(tasks), task_groups=groups,
                    r=r, seed=seed)  # fmt: skip

    def partition_job(partition):
        tree = tree_for_partition(TASKS, partition)
        return job(f"partition {partition_label(partition)}", "partition", "equal params", tree, ranks["tree"], 0)

    equal_rank = ranks["tree"]
    if quick:  # two variants: shared LoRA and one tree
        return [] if similarity_partition else [
            job("shared", "shared", "equal params", "shared", ranks["shared"], 0),
            partition_job(two_group_partitions(TASKS)[0]),
        ]  # fmt: skip
    if similarity_partition is not None:  # the similarity's tree: its seed 0 is its partition run
        tree = tree_for_partition(TASKS, similarity_partition)
        jobs = [job("tglora_sim", "tglora_sim", "equal params", tree, ranks["tree"], s) for s in SEEDS[1:]]
        jobs += [job(f"per_task r{equal_rank}", "per_task", "equal rank", "per_task", equal_rank, 0)]
        jobs += [job(f"shared r{equal_rank}", "shared", "equal rank", "shared", equal_rank, 0)]
        jobs += [job("sanity: random backbone", "random_backbone", "sanity", "shared", ranks["shared"], 0)]
        return jobs + [job("sanity: heads only", "heads_only", "sanity", "shared", 1, 0)]
    jobs = [job("per_task", "per_task", "equal params", "per_task", ranks["per_task"], s) for s in SEEDS]
    jobs += [job("shared", "shared", "equal params", "shared", ranks["shared"], s) for s in SEEDS]
    for task in TASKS:  # the Δm reference: one task, shared LoRA at the shared rank
        jobs += [job(f"single_task {task}", "single_task", "reference", "shared", ranks["shared"], s, tasks=[task])
                 for s in SEEDS]  # fmt: skip
    return jobs + [partition_job(p) for p in two_group_partitions(TASKS)]


# ----------------------------------------------------------------------------------------------------- scheduling
def launch(job: dict, out: Path) -> dict:
    """Run one job in a single-threaded worker process; returns its summary (or the error and the log's tail)."""
    name = "similarity" if job["kind"] == "similarity" else slug(job["name"], job["seed"])
    summary = out / f"{name}.json"
    if job.get("resume") and summary.exists():  # finished by an earlier, interrupted call
        return json.loads(summary.read_text())
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, __file__, "worker", json.dumps(job)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        ).returncode
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc}, {time.perf_counter() - start:.0f} s", flush=True)
    if rc != 0 or not summary.exists():
        return {"name": name, "error": rc, "log_tail": log.read_text()[-2000:]}
    return json.loads(summary.read_text())


def run_all(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = resolve_backbone(args.backbone, out)
    common = dict(backbone=str(backbone), data_root=str(args.data_root), out=str(out), quick=args.quick,
                  resume=args.resume, recipe=dict(RECIPE, epochs=args.epochs or RECIPE["epochs"]),
                  loss_balance=args.loss_balance)  # fmt: skip
    ranks, counts = equal_parameter_ranks(backbone)
    print(f"equal-parameter ranks on {args.backbone}: {ranks}; adapter parameters {counts}", flush=True)
    start = time.perf_counter()
    if args.quick:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(launch, dict(job, **common), out) for job in plan(ranks, quick=True)]
            # in this process beside the two workers: one round of process start-ups instead of two
            similarity_inline(dict(kind="similarity", **common), out)
            results = [f.result() for f in futures]
    else:
        results = schedule(common, out, ranks)
    failed = [r for r in results if "error" in r]
    wall = time.perf_counter() - start
    (out / "wall.json").write_text(json.dumps({"wall_s": round(wall, 1), "quick": args.quick}) + "\n")
    print(f"wall time {wall / 60:.1f} min; {len(failed)} failed runs")
    for r in failed:
        print(f"FAILED {r['name']}:\n{r['log_tail']}")
    results_md = None if args.quick else REPO / "benchmarks" / "RESULTS.md"
    report(out, quick=args.quick, results_md=results_md, backbone=args.backbone)


def schedule(common: dict, out: Path, ranks: dict[str, int]) -> list[dict]:
    """
    Two worker slots over one queue. The similarity runs first; when it is done, its partition's seed-0 run and
    tglora_sim's seeds 1-2 move to the front (rule A needs them), and the equal-rank and sanity rows go to the back.
    """
    queue = collections.deque([dict(kind="similarity"), *plan(ranks)])
    results, cond, busy = [], threading.Condition(), [0]

    def slot():
        while True:
            with cond:
                cond.wait_for(lambda: queue or not busy[0])
                if not queue:
                    cond.notify_all()
                    return
                job = queue.popleft()
                busy[0] += 1
            result = launch(dict(job, **common), out)
            with cond:
                results.append(result)
                if job["kind"] == "similarity" and "error" not in result:
                    extra = plan(ranks, result["partition"])
                    own = [j for j in queue if j["name"] == result["row_name"]]  # the partition's seed-0 run
                    for j in own:
                        queue.remove(j)
                    queue.extendleft(reversed(own + [j for j in extra if j["name"] == "tglora_sim"]))
                    queue.extend(j for j in extra if j["name"] != "tglora_sim")
                busy[0] -= 1
                cond.notify_all()

    threads = [threading.Thread(target=slot) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def similarity_inline(job: dict, out: Path) -> dict:
    import torch
    from bench_accuracy_worker import similarity_run

    torch.set_num_threads(1)
    summary = similarity_run(job)
    (out / "similarity.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def resolve_backbone(name: str, out: Path) -> Path:
    """A `save_pretrained` folder: given as a path, the cached `pretrain_backbone.py` backbone, or a random stand-in."""
    if Path(name).is_dir():
        return Path(name).resolve()
    if name == "random-tiny-swin":  # a stand-in for --quick and tests: no dependency on the pretraining
        import torch
        from transformers import SwinConfig, SwinModel

        folder = out / "random-tiny-swin"
        if not (folder / "config.json").exists():  # the demo's tiny Swin (embed 32, depths 2-2-2-2, window 2)
            torch.manual_seed(0)
            config = SwinConfig(
                image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=2
            )
            SwinModel(config).save_pretrained(folder)
        return folder.resolve()
    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_backbone import cache_root, make_recipe, recipe_hash

    folder = cache_root() / "backbones" / f"{name}-{recipe_hash(make_recipe(name))}"
    if not (folder / "pretrain.json").exists():
        raise FileNotFoundError(
            f"No pretrained {name!r} in {folder}; run `python benchmarks/pretrain_backbone.py --backbone {name}` first "
            "(about 15 CPU-minutes), or pass --backbone PATH to a save_pretrained folder."
        )
    return folder


# ----------------------------------------------------------------------------------------------------- reporting
def load_runs(out: Path) -> tuple[list[dict], dict | None]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    similarity = next((r for r in runs if r.get("kind") == "similarity"), None)
    return [r for r in runs if r.get("kind") == "train"], similarity


def assemble(runs: list[dict], similarity: dict | None) -> list[dict]:
    """The similarity's partition ran with seed 0 as a partition row: it is also tglora_sim's seed-0 run."""
    if similarity is not None:
        for run in list(runs):
            if run["name"] == similarity["row_name"] and run["seed"] == 0:
                runs.append(dict(run, name="tglora_sim", variant="tglora_sim"))
    order = ["reference", "equal params", "equal rank", "sanity"]
    return sorted(runs, key=lambda r: (order.index(r["arm"]), r["variant"] == "partition", r["name"], r["seed"]))


def report(
    out: Path,
    quick: bool = False,
    results_md: Path | None = None,
    title: str = "val",
    backbone: str = FIRST_BACKBONE,
    dry: bool = False,
) -> dict:
    """
    Table, verdicts and plot of the runs in `out`. With `results_md`, `backbone`'s section of it (protocol and table)
    is replaced and its picture goes to `benchmarks/`; with `dry` too, the section is printed and nothing is written.
    """
    import accuracy_report as rep

    runs, similarity = load_runs(out)
    runs = assemble(runs, similarity)
    balances = {r.get("loss_balance", DEFAULT_BALANCE) for r in runs}  # runs before the option used camvid's weights
    if len(balances) != 1:
        raise ValueError(
            f"The runs in {out} mix loss balance rules {sorted(balances)}; one folder holds one protocol."
        )
    (loss_balance,) = balances
    if quick:  # no single-task runs in --quick: Δm against the shared run, only to exercise the code path
        reference = {t: {rep.get_task_spec(t).metric: next(r for r in runs if r["name"] == "shared")["metrics"][t][
            rep.get_task_spec(t).metric]} for t in TASKS}  # fmt: skip
        for run in runs:
            run["delta_m"] = rep.delta_m(run["metrics"], reference, TASKS)
        reference = {t: dict(m, n_seeds=1) for t, m in reference.items()}
    else:
        reference = rep.add_delta_m(runs, TASKS)
    result = rep.verdicts(runs, similarity)
    table = rep.markdown(runs, TASKS, reference, result)
    wall = json.loads((out / "wall.json").read_text()) if (out / "wall.json").exists() else {}
    if similarity is not None:
        table += (
            f"\n\nSimilarity's partition: {similarity['row_name']} (per seed: "
            f"{'; '.join(similarity['seed_partitions'])}; per half of each seed's batches: "
            f"{'; '.join(' & '.join(pair) for pair in similarity['half_partitions'])}; stable: {similarity['stable']}; "
            f"{len(similarity['seeds'])} seeds x {similarity['num_batches']} batches)."
        )
    if wall:
        table += f" Benchmark wall time: {wall['wall_s'] / 60:.1f} min."
    first = next((r for r in runs if r["name"] == "shared" and r["seed"] == 0), None)
    if loss_balance != DEFAULT_BALANCE and first is not None:
        weights = ", ".join(f"{t} {w:.3g}" for t, w in first["loss_weights"].items())
        table += f"\n\nLoss weights 1 / L_t(0) of shared, seed 0: {weights}."
    if results_md is None:
        print(table)
    per_run = {f"{r['name']} seed {r['seed']}": r["delta_m"] for r in runs if "delta_m" in r}
    (out / f"summary_{title}.json").write_text(
        json.dumps(dict(result, reference=reference, delta_m_per_run=per_run), indent=2) + "\n"
    )
    write = results_md is not None and not dry
    picture = f"{run_label(backbone, loss_balance)}.png"
    rep.plot(runs, result, REPO / "benchmarks" / picture if write else out / f"accuracy_{title}.png")
    if results_md is not None:
        ranks = {row: next(r["r"] for r in runs if r["name"] == row) for row in ("shared", "per_task", "tglora_sim")}
        text = protocol(backbone, runs[0]["backbone"], dict(ranks, tree=ranks.pop("tglora_sim")), loss_balance)
        body = f"{textwrap.fill(' '.join(text.split()), 119, break_on_hyphens=False)}\n\n{table}"
        if dry:
            print(f"{section_heading(backbone, loss_balance)}\n\n{body}")
        else:  # re-read just before writing: other sections of the file may have changed during the run
            heading = section_heading(backbone, loss_balance)
            results_md.write_text(replace_section(results_md.read_text(), heading, body))
    return result


def section_heading(backbone: str, loss_balance: str = DEFAULT_BALANCE) -> str:
    where = "" if backbone == FIRST_BACKBONE else f" on {Path(backbone).name}"
    balance = "" if loss_balance == DEFAULT_BALANCE else ", losses balanced at initialisation"
    return f"## Accuracy on real images (issue 11){where}{balance}: TGLoRA vs shared and per-task LoRA"


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section under `heading` (up to the next `#`/`##` heading outside code) set to `body`, or with
    the section appended at the end if there is none; every other section stays as it was, wherever this one is."""
    lines, fenced, start, end = text.rstrip("\n").split("\n"), False, None, None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line == heading and start is None:
            start = i
        elif not fenced and start is not None and re.match(r"#{1,2} ", line):
            end = i
            break
    new = [heading, "", *body.rstrip("\n").split("\n")]
    if start is None:
        return "\n".join([*lines, "", *new]) + "\n"
    after = [] if end is None else ["", *lines[end:]]
    return "\n".join([*lines[:start], *new, *after]) + "\n"


def protocol(name: str, folder, ranks: dict[str, int], loss_balance: str = DEFAULT_BALANCE) -> str:
    """The protocol paragraph of `name`'s RESULTS.md section: the backbone's size and shape read from its folder."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: the parameter count needs no weights
        size = sum(p.numel() for p in AutoModel.from_config(config).parameters()) / 1e6

    def dashed(values):
        return "-".join(str(v) for v in values)

    if config.model_type == "swin":
        shape, full = f"embed {config.embed_dim}, depths {dashed(config.depths)}", "Swin-T"
    else:
        shape = f"widths {dashed(config.hidden_sizes)}, depths {dashed(config.depths)}"
        shape += f", key/value reduction {dashed(config.sr_ratios)}" if hasattr(config, "sr_ratios") else ""
        full = {"pvt_v2": "an ImageNet-pretrained PVTv2"}.get(config.model_type, "a full-size backbone")
    first = name == FIRST_BACKBONE
    command = "run" if first else f"run --backbone {name}"
    budget = "" if first else f" with {FIRST_BACKBONE}, and were kept unchanged for {name}"
    weights = "camvid's default loss weights"
    if loss_balance != DEFAULT_BALANCE:
        command += f" --loss_balance {loss_balance}"
        weights = "its own loss weights, see below"
    return f"""\
`python benchmarks/bench_accuracy.py {command}` (camvid_mt train 367 frames → val 101 frames, 120x160; val shares sequence
0016E5 with 204 train frames, so these are optimistic val scores; the hidden test split is scored with `evaluate`).
Frozen {name} ({size:.1f}M parameters, {shape}) pretrained on CIFAR-10 at 64 px
(`pretrain_backbone.py`). The recipe (`RECIPE` in the script: AdamW lr {RECIPE["learning_rate"]}, cosine with
{RECIPE["warmup_ratio"]:.0%} warm-up, batch {RECIPE["batch_size"]}, {RECIPE["epochs"]} epochs, heads of width
{RECIPE["head_width"]} / fusion {RECIPE["head_hidden"]}, {weights}) comes from the demo preset, was
not tuned on these data, and is the same for every row; the epochs were set from a measured epoch of the costliest
variant so that the whole benchmark fits 45 minutes on an idle 2-core CPU{budget}. Equal-parameter arm: shared
r={ranks["shared"]}, per-task r={ranks["per_task"]}, trees 1,1,2,4 r={ranks["tree"]} (adapter parameters counted by
the tuner). Equal-rank arm: every variant at r={ranks["tree"]} (tglora_sim serves both arms). Seeds {SEEDS} for shared,
per-task, tglora_sim and the single-task reference; seed 0 only for the other 6 partitions, the equal-rank arm and
the sanity rows (budget). Δm is against single-task LoRA (one task, shared r={ranks["shared"]}, same recipe), the mean
over its seeds. Single-threaded workers, two at a time. Scale caveats: a {size:.1f}M-parameter backbone pretrained on
CIFAR-10, 160x120 frames, three of the four tasks derived from one label map; nothing here speaks for {full} on
PASCAL-Context.{"" if loss_balance == DEFAULT_BALANCE else BALANCED_PROTOCOL}"""


BALANCED_PROTOCOL = """ Loss weights, the one change from the first protocol (fixed before this run; everything else,
decision rules included, unchanged): losses balanced at initialisation: each run computes, on its first training
batch, before any update (heads at their seed's init, adapters at identity), each task's unweighted loss L_t(0), and
trains with weights w_t = 1 / L_t(0) (so every weighted loss starts at 1; the normalisation by initial loss that
GradNorm and DWA start from). The same rule for every row, single-task references included. Why: camvid's default
weights balance trivial predictions, so with random heads the first weighted losses are far apart (the first
protocol's "Weighted task losses on the first batch"), and a shared adapter's gradient is then dominated by edge_texture early on, a bias
against sharing that per-task adapters under Adam do not feel. The similarity uses unweighted per-task gradients and
is unchanged by the rule."""


def evaluate_saved(args) -> None:
    """Re-score every saved run on `--eval_split` of `--eval_root` and rebuild the report for that split."""
    from bench_accuracy_worker import score_saved

    runs_out = Path(args.out)
    target = runs_out / f"eval_{args.eval_split}"
    target.mkdir(parents=True, exist_ok=True)
    runs, similarity = load_runs(runs_out)
    for run in runs:
        folder = runs_out / "runs" / slug(run["name"], run["seed"])
        metrics = score_saved(folder, args.eval_root, args.eval_split, quick=args.quick)
        (target / f"{slug(run['name'], run['seed'])}.json").write_text(json.dumps(dict(run, metrics=metrics)) + "\n")
    if similarity is not None:
        (target / "similarity.json").write_text(json.dumps(similarity) + "\n")
    report(target, quick=args.quick, title=args.eval_split)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["run", "report", "evaluate", "worker"])
    p.add_argument("job", nargs="?", help="worker only: the job as JSON")
    p.add_argument("--quick", action="store_true", help="CI smoke run: two variants, 2 steps, 16 frames, one seed")
    p.add_argument(
        "--out",
        default=None,
        help=f"results folder (default {default_out(FIRST_BACKBONE).relative_to(REPO)}, or "
        f"{default_out('NAME').relative_to(REPO)} for --backbone NAME, or a runs/ folder with --quick)",
    )
    p.add_argument("--backbone", default="tiny-swin", help="pretrain_backbone.py name, a folder, or random-tiny-swin")
    p.add_argument("--data_root", default=DATA_ROOT)
    p.add_argument("--dry", action="store_true", help="report: print the RESULTS.md section; nothing is written")
    p.add_argument("--resume", action="store_true", help="run: skip runs whose summary JSON is already in --out")
    p.add_argument(
        "--loss_balance",
        choices=LOSS_BALANCE,
        default=DEFAULT_BALANCE,
        help="run: camvid's default loss weights, or 1 / each task's loss on the run's first batch ('initial'); "
        "also picks the default --out",
    )
    p.add_argument("--epochs", type=int, default=None, help="override RECIPE's epochs (budget measurements only)")
    p.add_argument("--eval_root", default=DATA_ROOT, help="evaluate: a folder in the camvid_mt layout")
    p.add_argument("--eval_split", default="val")
    args = p.parse_args(argv)
    args.out = args.out or (
        REPO / "runs" / "bench_accuracy_quick" if args.quick else default_out(args.backbone, args.loss_balance)
    )
    sys.path.insert(0, str(Path(__file__).parent))
    if args.command == "worker":
        from bench_accuracy_worker import work

        work(json.loads(args.job))
    elif args.command == "run":
        run_all(args)
    elif args.command == "report":
        results_md = None if args.quick else REPO / "benchmarks" / "RESULTS.md"
        report(Path(args.out), quick=args.quick, results_md=results_md, backbone=args.backbone, dry=args.dry)
    else:
        evaluate_saved(args)


if __name__ == "__main__":
    main()
