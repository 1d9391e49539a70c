"""Statistics, verdicts, the Markdown table and the plot of the accuracy benchmark (`bench_accuracy.py`).

Pure functions of the per-run JSON summaries, so the statistics can be tested against hand computations without data
and the report can be rebuilt from saved runs (`python benchmarks/bench_accuracy.py report`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from peft_tglora.tasks import delta_m, get_task_spec


# decision rules, fixed before the real run (issue 11, item 5)
RULE_A = (
    "(A) holds if TGLoRA-sim's Δm beats both shared and per-task LoRA in the equal-parameter arm by more than 2 "
    "standard errors of the seed-paired difference, with at most 5 % more adapter parameters than either."
)
RULE_B = (
    "(B) holds weakly if the similarity's stage-2 partition is stable (`group_tasks`' report: every seed and each half "
    "of every seed's batches gives the seed average's partition) and its "
    "seed-0 Δm ranks strictly above the median of the 7 two-group partitions (rank 1-3 of 7; every partition run with "
    "seed 0, so the 7 runs differ only in the partition)."
)
PARAMETER_SLACK = 1.05


def two_group_partitions(tasks: Sequence[str]) -> list[list[list[str]]]:
    """Every split of `tasks` into two non-empty groups (7 for 4 tasks), groups and names in `tasks` order."""
    tasks = list(tasks)
    first, rest = tasks[0], tasks[1:]
    out = []
    for k in range(len(rest)):  # the group holding tasks[0] takes k of the others; the other group must be non-empty
        for chosen in itertools.combinations(rest, k):
            group = [t for t in tasks if t == first or t in chosen]
            out.append([group, [t for t in tasks if t not in group]])
    return out


def tree_for_partition(tasks: Sequence[str], partition: Sequence[Sequence[str]]) -> list[list[list[str]]]:
    """The tree 1,1,2,4 whose stage 2 is `partition`: all tasks shared in stages 0-1, one task per group in stage 3."""
    tasks = list(tasks)
    return [[tasks], [tasks], [list(g) for g in partition], [[t] for t in tasks]]


def partition_label(partition: Sequence[Sequence[str]]) -> str:
    return " / ".join("+".join(g) for g in partition)  # no "|": the label goes into Markdown tables


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error (sample s.d. / sqrt(n), NaN for n < 2) and n."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int]:
    """Mean ± s.e. of `a[seed] - b[seed]` over the seeds both have (runs with one seed share data order and init)."""
    seeds = sorted(set(a) & set(b))
    return mean_se([a[s] - b[s] for s in seeds])


def single_task_reference(runs: Sequence[Mapping]) -> dict[str, dict]:
    """Per task, the mean over seeds of the single-task runs' primary metric: the Δm reference."""
    reference: dict[str, list[float]] = {}
    for run in runs:
        if run["variant"] == "single_task":
            (task,) = run["tasks"]
            reference.setdefault(task, []).append(run["metrics"][task][get_task_spec(task).metric])
    return {t: {get_task_spec(t).metric: sum(v) / len(v), "n_seeds": len(v)} for t, v in reference.items()}


def add_delta_m(runs: Sequence[dict], tasks: Sequence[str]) -> dict[str, dict]:
    """Set `run["delta_m"]` of every multi-task run against the single-task reference; returns the reference."""
    reference = single_task_reference(runs)
    for run in runs:
        if run["variant"] != "single_task" and all(t in reference for t in tasks):
            baselines = {t: {k: v for k, v in m.items() if k != "n_seeds"} for t, m in reference.items()}
            run["delta_m"] = delta_m(run["metrics"], baselines, tasks)
    return reference


def by_name(runs: Sequence[Mapping]) -> dict[str, dict[int, Mapping]]:
    """`{row name: {seed: run}}`."""
    out: dict[str, dict[int, Mapping]] = {}
    for run in runs:
        out.setdefault(run["name"], {})[run["seed"]] = run
    return out


def verdicts(runs: Sequence[Mapping], similarity: Mapping | None) -> dict:
    """Evaluate rules (A) and (B) from the numbers; every input of the decision is returned next to it."""
    rows = by_name(runs)
    dm = {name: {s: r["delta_m"] for s, r in seeds.items() if "delta_m" in r} for name, seeds in rows.items()}
    params = {name: next(iter(seeds.values()))["adapter_params"] for name, seeds in rows.items()}
    out: dict = {"rule_A": RULE_A, "rule_B": RULE_B}
    sim = "tglora_sim"
    comparisons = {}
    for other in ("shared", "per_task"):
        if sim in dm and other in dm:
            mean, se, n = paired_difference(dm[sim], dm[other])
            comparisons[other] = {
                "diff": mean, "se": se, "n": n,
                "beats_by_2se": bool(n >= 2 and not math.isnan(se) and mean > 2 * se),
                "params_ok": params[sim] <= PARAMETER_SLACK * params[other],
            }  # fmt: skip
    out["A_comparisons"] = comparisons
    a_holds = len(comparisons) == 2 and all(c["beats_by_2se"] and c["params_ok"] for c in comparisons.values())
    out["A"] = "holds" if a_holds else "does not hold"

    sim_name = similarity.get("row_name") if similarity else None
    found = {
        name: seeds[0]["delta_m"] for name, seeds in rows.items()
        if name.startswith("partition") and 0 in seeds and "delta_m" in seeds[0]
    }  # fmt: skip
    if sim_name and 0 in dm.get(sim, {}):  # the similarity's partition ran once, as tglora_sim
        found.setdefault(sim_name, dm[sim][0])
    partitions = sorted(found.items(), key=lambda item: -item[1])
    out["partition_ranking"] = [{"name": n, "delta_m_seed0": v} for n, v in partitions]
    rank = next((i + 1 for i, (n, _) in enumerate(partitions) if n == sim_name), None)
    stable = bool(similarity and similarity.get("stable"))
    out.update(similarity_row=sim_name, similarity_rank=rank, similarity_stable=stable, n_partitions=len(partitions))
    above_median = rank is not None and len(partitions) == 7 and rank <= 3
    out["B"] = "holds weakly" if stable and above_median else "does not hold"
    if out["A"] == "holds":
        out["verdict"] = "for (A): TGLoRA-sim beats shared and per-task LoRA at equal parameters"
    elif out["B"] == "holds weakly":
        out["verdict"] = "weakly for (B): the similarity's partition is stable and above the median; (A) not shown"
    else:
        worse = [o for o, c in comparisons.items() if c["n"] >= 2 and c["diff"] < -2 * c["se"]]
        out["verdict"] = (
            f"against: TGLoRA-sim is worse than {' and '.join(worse)} by more than 2 s.e" if worse
            else "inconclusive: neither (A) nor (B) holds and TGLoRA-sim is not worse by more than 2 s.e"
        )  # fmt: skip
    return out


def _fmt(mean: float, se: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.{digits}f}" + (f" ± {se:.{digits}f}" if not math.isnan(se) else "")


def markdown(runs: Sequence[Mapping], tasks: Sequence[str], reference: Mapping, result: Mapping) -> str:
    """The results table (mean ± s.e. over seeds), the paired differences, the partition ranking and the verdicts."""
    rows = by_name(runs)
    metric = {t: get_task_spec(t).metric for t in tasks}
    head = "| row | arm | r | n seeds | " + " | ".join(f"{t} {metric[t]}" for t in tasks)
    lines = [head + " | Δm % | adapter params | head params | MMACs / image | CPU-s / run |"]
    lines.append("|" + "---|" * (len(tasks) + 9))
    for name, seeds in rows.items():
        first = next(iter(seeds.values()))
        cells = []
        for t in tasks:
            vals = [r["metrics"][t][metric[t]] for r in seeds.values() if t in r["metrics"]]
            cells.append(_fmt(*mean_se(vals)[:2], digits=4 if metric[t] == "rmse" else 3).lstrip("+") if vals else "")
        dm_vals = [r["delta_m"] for r in seeds.values() if "delta_m" in r]
        cpu = mean_se([r["cpu_s"] for r in seeds.values()])[0]
        lines.append(
            f"| {name} | {first['arm']} | {first['r']} | {len(seeds)} | " + " | ".join(cells)
            + f" | {_fmt(*mean_se(dm_vals)[:2]) if dm_vals else ('ref' if first['variant'] == 'single_task' else '–')} "
            f"| {first['adapter_params']:,} "
            f"| {first['head_params']:,} | {first['macs'] / 1e6:.0f} | {cpu:.0f} |"
        )  # fmt: skip
    lines += ["", "Seed-paired Δm differences (equal-parameter arm):", ""]
    lines += [
        "| difference | mean ± s.e. (pp) | n pairs | TGLoRA-sim ahead by > 2 s.e. | adapter params within 5 % |",
        "|---|---|---|---|---|",
    ]
    for other, c in result["A_comparisons"].items():
        lines.append(
            f"| tglora_sim − {other} | {_fmt(c['diff'], c['se'])} | {c['n']} | {c['beats_by_2se']} | {c['params_ok']} |"
        )
    lines += [
        "",
        "Two-group stage-2 partitions ranked by seed-0 Δm:",
        "",
        "| rank | row | Δm % (seed 0) |",
        "|---|---|---|",
    ]
    for i, p in enumerate(result["partition_ranking"]):
        mark = " (similarity's)" if p["name"] == result["similarity_row"] else ""
        lines.append(f"| {i + 1} | {p['name']}{mark} | {p['delta_m_seed0']:+.2f} |")
    ranked = [p["delta_m_seed0"] for p in result["partition_ranking"]]
    sim_dm = [r["delta_m"] for r in rows.get("tglora_sim", {}).values() if "delta_m" in r]
    if len(ranked) > 1 and len(sim_dm) > 1:
        sd = mean_se(sim_dm)[1] * math.sqrt(len(sim_dm))
        spread = max(ranked) - min(ranked)
        lines.append("")
        lines.append(
            f"Spread of the partitions' seed-0 Δm: {spread:.2f} pp; standard deviation of tglora_sim's Δm over its "
            f"{len(sim_dm)} seeds: {sd:.2f} pp."
        )
    first = next((r for r in runs if r["name"] == "shared" and r["seed"] == 0 and r.get("init_losses")), None)
    if first is not None:
        init = ", ".join(f"{t} {v['weighted']:.2f}" for t, v in first["init_losses"].items())
        lines += ["", f"Weighted task losses on the first batch (shared, seed 0; heads at initialisation): {init}."]
    ref = ", ".join(f"{t} {m[metric[t]]:.4g} (n={m['n_seeds']})" for t, m in reference.items())
    lines += ["", f"Δm reference (single-task LoRA, mean over seeds): {ref}.", "", f"- {RULE_A}", f"- {RULE_B}", ""]
    lines.append(
        f"**(A) {result['A']}. (B) {result['B']}** (similarity partition stable: {result['similarity_stable']}, "
        f"rank {result['similarity_rank']} of {result['n_partitions']}). **Verdict: {result['verdict']}.**"
    )
    return "\n".join(lines)


def plot(runs: Sequence[Mapping], result: Mapping, path) -> None:
    """Left: Δm ± s.e. per row; right: the 7 partitions ranked by seed-0 Δm, the similarity's highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, s) for n, s in by_name(runs).items() if any("delta_m" in r for r in s.values())]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.35 * len(rows) + 2), gridspec_kw={"width_ratios": [3, 2]})
    stats = [mean_se([r["delta_m"] for r in s.values() if "delta_m" in r]) for _, s in rows]
    y = range(len(rows))
    left.errorbar(
        [m for m, _, _ in stats], y, xerr=[0 if math.isnan(e) else e for _, e, _ in stats], fmt="o", capsize=3
    )
    left.set_yticks(list(y), [f"{n} (n={k})" for (n, _), (_, _, k) in zip(rows, stats)], fontsize=8)
    left.axvline(0, color="grey", lw=0.8)
    left.invert_yaxis()
    left.set_xlabel("Δm vs single-task LoRA (%), mean ± s.e. over seeds")
    ranking = result["partition_ranking"]
    colours = ["tab:red" if p["name"] == result["similarity_row"] else "tab:blue" for p in ranking]
    right.barh(range(len(ranking)), [p["delta_m_seed0"] for p in ranking], color=colours)
    right.set_yticks(range(len(ranking)), [p["name"].removeprefix("partition ") for p in ranking], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("Δm (%), seed 0; red: the similarity's partition")
    right.set_title("Stage-2 partitions, ranked", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
