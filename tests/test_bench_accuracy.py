"""benchmarks/bench_accuracy.py: the partition enumeration and the statistics against hand computations (no data), and
its `--quick` run end to end on camvid_mt, re-scored from the saved adapters and heads."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO / ".." / "shared" / "data" / "camvid_mt"

import accuracy_report as rep  # noqa: E402  (benchmarks/ is not a package)


TASKS = ["semseg", "edges", "saliency", "edge_texture"]


@pytest.mark.parametrize(("n", "expected"), [(2, 1), (3, 3), (4, 7), (5, 15)])
def test_two_group_partitions_are_all_distinct_splits(n, expected):
    tasks = [f"t{i}" for i in range(n)]
    parts = rep.two_group_partitions(tasks)
    assert len(parts) == expected == 2 ** (n - 1) - 1  # Stirling number S(n, 2)
    as_sets = {frozenset(frozenset(g) for g in p) for p in parts}
    assert len(as_sets) == expected
    for p in parts:
        assert len(p) == 2 and all(p) and sorted(p[0] + p[1]) == sorted(tasks)


def test_tree_for_partition_is_1_1_2_4():
    tree = rep.tree_for_partition(TASKS, [["semseg", "edges"], ["saliency", "edge_texture"]])
    assert [len(stage) for stage in tree] == [1, 1, 2, 4]
    assert tree[3] == [[t] for t in TASKS]


def test_paired_difference_matches_hand_computation():
    a = {0: 1.0, 1: 2.0, 2: 4.0}
    b = {0: 0.5, 1: 1.0, 2: 1.5, 3: 9.0}  # seed 3 has no partner: left out
    mean, se, n = rep.paired_difference(a, b)
    # differences 0.5, 1.0, 2.5: mean 4/3; sample variance (0.69444 + 0.11111 + 1.36111) / 2 = 1.08333
    assert n == 3
    assert mean == pytest.approx(4 / 3)
    assert se == pytest.approx(math.sqrt(1.0833333 / 3), rel=1e-6)
    assert math.isnan(rep.mean_se([1.0])[1])


def _run(name, seed, dm, params, variant=None, arm="equal params"):
    return dict(name=name, variant=variant or name, arm=arm, seed=seed, delta_m=dm, adapter_params=params)


def test_verdicts_follow_the_rules():
    parts = [f"partition {rep.partition_label(p)}" for p in rep.two_group_partitions(TASKS)]
    sim = {"row_name": parts[2], "stable": True}
    base = [_run("shared", s, v, 300) for s, v in enumerate([-1.0, -1.2, -0.8])]
    base += [_run("per_task", s, v, 300) for s, v in enumerate([-2.0, -1.5, -2.5])]
    base += [_run(p, 0, -3.0 + i * 0.1, 301, "partition") for i, p in enumerate(parts)]
    # tglora_sim 2 pp above shared at every seed: the paired s.e. is 0.2 / sqrt(3)-ish, far below the gap
    good = [_run("tglora_sim", s, v, 301) for s, v in enumerate([1.0, 0.9, 1.2])]
    result = rep.verdicts(base + good, sim)
    assert result["A"] == "holds"
    assert result["A_comparisons"]["shared"]["diff"] == pytest.approx((2.0 + 2.1 + 2.0) / 3)
    # ranks: the partitions' Δm grow with their index, so parts[6] is first and parts[2] (the similarity's) fifth
    assert result["similarity_rank"] == 5 and result["B"] == "does not hold"
    # more parameters than allowed: (A) fails even with the same gains
    bloated = [dict(r, adapter_params=400) for r in good]
    assert rep.verdicts(base + bloated, sim)["A"] == "does not hold"
    # worse than shared at every seed by far more than 2 s.e.: reported against
    bad = [_run("tglora_sim", s, v, 301) for s, v in enumerate([-4.0, -4.1, -3.9])]
    assert rep.verdicts(base + bad, sim)["verdict"].startswith("against")
    # an unstable similarity never gives (B), however well its partition ranks
    top = dict(sim, row_name=parts[6])
    assert rep.verdicts(base + bad, top)["B"] == "holds weakly"
    assert rep.verdicts(base + bad, dict(top, stable=False))["B"] == "does not hold"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"camvid_mt is absent (looked in {DATA}); CI has it there")
def test_quick_run_and_evaluate_reproduce_the_saved_metrics(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = [sys.executable, str(REPO / "benchmarks" / "bench_accuracy.py")]
    common = ["--quick", "--backbone", "random-tiny-swin", "--out", str(tmp_path), "--data_root", str(DATA)]
    subprocess.run([*script, "run", *common], check=True, env=env, capture_output=True, timeout=300)
    runs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*-s0.json")}
    assert len(runs) == 2
    shared = runs["shared-s0"]
    tree = next(r for r in runs.values() if r["variant"] == "partition")
    assert [len(stage) for stage in tree["task_groups"]] == [1, 1, 2, 4]
    assert abs(tree["adapter_params"] / shared["adapter_params"] - 1) < 0.05  # the equal-parameter ranks
    assert tree["macs"] > shared["macs"] > 0
    assert set(shared["metrics"]) == set(TASKS) and shared["steps"] == 2
    similarity = json.loads((tmp_path / "similarity.json").read_text())
    assert len(similarity["partition"]) == 2
    # re-scoring the saved adapter + heads on the same frames gives the metrics the run reported
    subprocess.run(
        [*script, "evaluate", *common, "--eval_root", str(DATA), "--eval_split", "val"],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    for name, run in runs.items():
        again = json.loads((tmp_path / "eval_val" / f"{name}.json").read_text())["metrics"]
        for task in TASKS:
            for key, value in run["metrics"][task].items():
                assert again[task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, task, key)


def _tiny_backbone_config(name):
    """The benchmark's backbone architectures, as `pretrain_backbone.py` builds them (random weights, 64 px)."""
    from pretrain_backbone import make_recipe
    from transformers import AutoConfig

    config = dict(make_recipe(name)["config"])
    return AutoConfig.for_model(config.pop("model_type"), image_size=64, **config)


def _trainable(config, task_groups, r):
    """Adapter parameters as the worker counts them: trainable parameters after `get_peft_model` (not costs.py)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModel

    import peft_tglora  # noqa: F401
    from peft_tglora import TGLoraConfig

    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_config(config), TGLoraConfig(tasks=TASKS, task_groups=task_groups, r=r))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("backbone", ["tiny-swin", "tiny-pvtv2"])
def test_equal_parameter_ranks_are_equal_parameters_and_nearest(backbone):
    import bench_accuracy as bench

    config = _tiny_backbone_config(backbone)
    ranks, counts = bench.equal_parameter_ranks(config)
    assert ranks["per_task"] == bench.PER_TASK_RANK
    groups = {"shared": "shared", "per_task": "per_task", "tree": [1, 1, 2, 4]}
    target = _trainable(config, "per_task", ranks["per_task"])
    for name in ("shared", "tree"):
        got = _trainable(config, groups[name], ranks[name])
        assert got == counts[name]
        assert abs(got / target - 1) <= 0.02, (name, got, target)
        # the rule takes the nearest rank: one rank up or down is not nearer to per-task's count
        for other in (ranks[name] - 1, ranks[name] + 1):
            if other >= 1:
                assert abs(_trainable(config, groups[name], other) - target) >= abs(got - target), (name, other)
    if backbone == "tiny-swin":  # the ranks of the saved tiny-swin results (benchmarks/results/accuracy)
        assert ranks == {"shared": 20, "per_task": 5, "tree": 7}


def test_plan_runs_at_the_given_ranks():
    import bench_accuracy as bench

    ranks = {"shared": 12, "per_task": 3, "tree": 4}  # any ranks: the plan must only place them
    key = bench.plan(ranks)
    names = [j["name"] for j in key]
    for row in ("shared", "per_task", *(f"single_task {t}" for t in TASKS)):
        assert sorted(j["seed"] for j in key if j["name"] == row) == bench.SEEDS
    assert sum(n.startswith("partition") for n in names) == 7
    assert {j["r"] for j in key if j["name"] == "per_task"} == {3}
    assert {j["r"] for j in key if j["name"] == "shared" or j["name"].startswith("single_task")} == {12}
    assert {j["r"] for j in key if j["name"].startswith("partition")} == {4}
    extra = bench.plan(ranks, rep.two_group_partitions(TASKS)[1])
    assert sorted(j["seed"] for j in extra if j["name"] == "tglora_sim") == bench.SEEDS[1:]
    equal_rank = {j["name"]: j["r"] for j in extra if j["arm"] == "equal rank"}
    assert equal_rank == {"per_task r4": 4, "shared r4": 4}  # the equal-rank arm: every variant at the tree's rank


def test_each_backbone_has_its_own_folder_picture_heading_and_protocol(tmp_path):
    import bench_accuracy as bench
    import torch
    from transformers import AutoModel

    assert bench.default_out("tiny-swin") == REPO / "benchmarks" / "results" / "accuracy"
    assert bench.default_out("tiny-pvtv2") == REPO / "benchmarks" / "results" / "accuracy_tiny-pvtv2"
    swin, pvt = bench.section_heading("tiny-swin"), bench.section_heading("tiny-pvtv2")
    assert swin == "## Accuracy on real images (issue 11): TGLoRA vs shared and per-task LoRA"  # RESULTS.md's
    assert pvt != swin and "tiny-pvtv2" in pvt
    config = _tiny_backbone_config("tiny-pvtv2")
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    text = " ".join(bench.protocol("tiny-pvtv2", tmp_path, {"shared": 20, "per_task": 5, "tree": 7}).split())
    assert "`python benchmarks/bench_accuracy.py run --backbone tiny-pvtv2`" in text
    assert f"Frozen tiny-pvtv2 ({size / 1e6:.1f}M parameters, widths 32-64-128-256, depths 2-2-2-2" in text
    assert "Swin" not in text


def test_replace_section_keeps_every_other_section_wherever_it_is():
    import bench_accuracy as bench

    swin, pvt = bench.section_heading("tiny-swin"), bench.section_heading("tiny-pvtv2")
    text = (
        f"## Before\n\nkeep 1\n\n{swin}\n\nold swin\n\n| a |\n\n## Issue 10\n\n```bash\n## not a heading\n```\n"
        "\nkeep 2\n\n### sub\n\nkeep 3\n"
    )
    once = bench.replace_section(text, pvt, "new pvt")  # absent: appended at the end
    assert once == text + f"\n{pvt}\n\nnew pvt\n"
    twice = bench.replace_section(once, swin, "new swin\n\n| b |")  # in the middle: only its own lines change
    expected = once.replace("old swin\n\n| a |", "new swin\n\n| b |")
    assert twice == expected
    assert bench.replace_section(twice, swin, "new swin\n\n| b |") == twice  # idempotent
    assert bench.replace_section(twice, pvt, "pvt again").endswith(f"{pvt}\n\npvt again\n")
    # a section whose next heading is inside a code block runs past the block, to the next real heading
    fenced = f"{swin}\n\nold\n```\n## inside\n```\n\n## Next\n\nkeep\n"
    assert bench.replace_section(fenced, swin, "new") == f"{swin}\n\nnew\n\n## Next\n\nkeep\n"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"camvid_mt is absent (looked in {DATA}); CI has it there")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_random_backbone_run_reloads_with_its_own_weights(tmp_path):
    """The sanity row's random backbone travels with the run; re-scoring must see those weights, not fresh ones."""
    import bench_accuracy as bench
    import bench_accuracy_worker as worker
    import torch

    backbone = bench.resolve_backbone("random-tiny-swin", tmp_path)
    job = dict(kind="train", name="sanity: random backbone", variant="random_backbone", arm="sanity",
               tasks=["saliency"], task_groups="shared", r=2, seed=3, backbone=str(backbone), data_root=str(DATA),
               out=str(tmp_path), quick=True, recipe=dict(bench.RECIPE, epochs=1))  # fmt: skip
    threads = torch.get_num_threads()
    try:
        worker.work(job)
    finally:
        torch.set_num_threads(threads)
    run = json.loads((tmp_path / f"{bench.slug(job['name'], 3)}.json").read_text())
    again = worker.score_saved(tmp_path / "runs" / bench.slug(job["name"], 3), DATA, "val", quick=True)
    assert again["saliency"] == pytest.approx(run["metrics"]["saliency"], rel=1e-5)


def _tiny_batch():
    """Head outputs and labels of one 1x2 image for camvid's four tasks, and each task's loss computed by hand."""
    import torch

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    logits = [[1.0, 0.0, -1.0], [0.5, 0.2, 2.0]]  # semseg, per pixel over 3 classes; labels 0 and 2
    ce = [math.log(sum(math.exp(v) for v in row)) - row[c] for row, c in zip(logits, [0, 2])]
    outputs = {
        "semseg": torch.tensor(logits).T.reshape(1, 3, 1, 2),
        "edges": torch.tensor([0.5, -1.0]).reshape(1, 1, 1, 2),
        "saliency": torch.tensor([2.0, 0.0]).reshape(1, 1, 1, 2),
        "edge_texture": torch.tensor([0.3, -0.2]).reshape(1, 1, 1, 2),
    }
    batch = {
        "semseg": torch.tensor([[[0, 2]]]),
        "edges": torch.tensor([[[1, 0]]]),
        "saliency": torch.tensor([[[0, 1]]]),
        "edge_texture": torch.tensor([[[0.1, 0.1]]]),
    }
    hand = {
        "semseg": sum(ce) / 2,
        # edges: positives weighted 0.95, negatives 0.05, over 2 pixels
        "edges": -(0.95 * log_sigmoid(0.5) + 0.05 * log_sigmoid(1.0)) / 2,
        # saliency: the positive weight is the batch's negative fraction, 1/2
        "saliency": -(0.5 * log_sigmoid(-2.0) + 0.5 * log_sigmoid(0.0)) / 2,
        "edge_texture": (0.2 + 0.3) / 2,
    }
    return {t: o.requires_grad_() for t, o in outputs.items()}, batch, hand


def test_initial_loss_balance_starts_every_weighted_loss_at_one():
    import bench_accuracy_worker as worker

    outputs, batch, hand = _tiny_batch()
    loss, weights, init = worker.first_step_loss(outputs, batch, "initial")
    for task, value in hand.items():
        assert init[task]["loss"] == pytest.approx(value, rel=1e-5), task
        assert weights[task] == pytest.approx(1 / value, rel=1e-5), task
        assert init[task]["weighted"] == pytest.approx(1.0, rel=1e-6), task
    assert loss.item() == pytest.approx(4.0, rel=1e-6)  # the loss the first update backpropagates
    loss.backward()
    # d(w_t L_t)/d(output) = w_t dL_t/d(output): edge_texture's L1 gradient is sign / 2 pixels, scaled by 1 / 0.25
    assert outputs["edge_texture"].grad.flatten().tolist() == pytest.approx([0.5 * 4, -0.5 * 4])


def test_default_loss_balance_keeps_camvids_weights():
    import bench_accuracy_worker as worker

    outputs, batch, hand = _tiny_batch()
    camvid = {"semseg": 1.0, "edges": 20.0, "saliency": 25.0, "edge_texture": 170.0}  # specs.py's camvid entry
    loss, weights, init = worker.first_step_loss(outputs, batch, worker.DEFAULT_BALANCE)
    assert worker.DEFAULT_BALANCE == "camvid_default" and weights == camvid
    assert loss.item() == pytest.approx(sum(camvid[t] * hand[t] for t in hand), rel=1e-5)
    assert init["edge_texture"]["weighted"] == pytest.approx(170 * 0.25, rel=1e-5)
    with pytest.raises(ValueError, match="loss_balance"):
        worker.loss_weights("uniform", {"semseg": 1.0})
    with pytest.raises(ValueError, match="positive"):
        worker.loss_weights("initial", {"semseg": 0.0})


def test_balanced_protocol_has_its_own_folder_picture_heading_and_rule(tmp_path):
    import bench_accuracy as bench

    assert bench.default_out("tiny-swin", "initial") == REPO / "benchmarks" / "results" / "accuracy_balanced"
    assert bench.run_label("tiny-swin", "initial") == "accuracy_balanced"  # the picture: accuracy_balanced.png
    assert bench.run_label("tiny-swin") == "accuracy" and bench.run_label("tiny-pvtv2") == "accuracy_tiny-pvtv2"
    assert bench.section_heading("tiny-swin", "initial") == (
        "## Accuracy on real images (issue 11), losses balanced at initialisation: TGLoRA vs shared and per-task LoRA"
    )
    _tiny_backbone_config("tiny-swin").save_pretrained(tmp_path)
    ranks = {"shared": 20, "per_task": 5, "tree": 7}
    text = " ".join(bench.protocol("tiny-swin", tmp_path, ranks, "initial").split())
    assert "`python benchmarks/bench_accuracy.py run --loss_balance initial`" in text
    assert "trains with weights w_t = 1 / L_t(0)" in text and "single-task references included" in text
    default = " ".join(bench.protocol("tiny-swin", tmp_path, ranks).split())
    assert "camvid's default loss weights" in default and "L_t(0)" not in default


@pytest.mark.skipif(not DATA.is_dir(), reason=f"camvid_mt is absent (looked in {DATA}); CI has it there")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_worker_records_the_loss_balance_and_its_weights(tmp_path):
    import bench_accuracy as bench
    import bench_accuracy_worker as worker
    import torch

    backbone = bench.resolve_backbone("random-tiny-swin", tmp_path)
    job = dict(kind="train", name="shared", variant="shared", arm="equal params", tasks=["saliency", "edge_texture"],
               task_groups="shared", r=2, seed=0, backbone=str(backbone), data_root=str(DATA), out=str(tmp_path),
               quick=True, recipe=dict(bench.RECIPE, epochs=1))  # fmt: skip
    threads = torch.get_num_threads()
    try:
        worker.work(dict(job, loss_balance="initial"))
        balanced = json.loads((tmp_path / "shared-s0.json").read_text())
        worker.work(job)  # no loss_balance in the job: the first two benchmarks' jobs
        default = json.loads((tmp_path / "shared-s0.json").read_text())
    finally:
        torch.set_num_threads(threads)
    assert balanced["loss_balance"] == "initial" and default["loss_balance"] == "camvid_default"
    assert default["loss_weights"] == {"saliency": 25.0, "edge_texture": 170.0}
    for task in job["tasks"]:  # one seed: the same first batch, the same initial losses under both rules
        assert balanced["init_losses"][task]["loss"] == pytest.approx(default["init_losses"][task]["loss"], rel=1e-6)
        assert balanced["loss_weights"][task] == pytest.approx(1 / default["init_losses"][task]["loss"], rel=1e-6)
        assert balanced["init_losses"][task]["weighted"] == pytest.approx(1.0, rel=1e-6)
