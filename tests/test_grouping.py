"""`peft_tglora.tasks.grouping`: seed-averaged similarity, the tree, and the stability report, on known answers."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_tglora.clustering import TaskSimilarity
from peft_tglora.tasks.grouping import (
    average_similarity,
    default_groups_per_stage,
    group_tasks,
    parse_auto_task_groups,
    stability_report,
)


class TwoBlocks(nn.Module):
    """Tasks a* read only block A, tasks b* only block B: their gradients have disjoint support, so they are orthogonal."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks
        self.block_a = nn.Conv2d(3, 4, 3, padding=1)
        self.block_b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, pixel_values):
        a, b = torch.tanh(self.block_a(pixel_values)), torch.tanh(self.block_b(pixel_values))
        return SimpleNamespace(task_features={t: (a if t.startswith("a") else b,) for t in self.tasks})


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 1, 1)

    def forward(self, features):
        return self.proj(features[-1])[:, 0]


def batches(num, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        x = torch.randn(4, 3, 8, 8, generator=generator)
        # offsets make each loss pull its output the same way in every batch: consistent gradients
        out.append({"pixel_values": x, "t1": x[:, 0] * x[:, 1] + 2, "t2": x.mean(1) - 2, "t3": -x[:, 2]})
    return out


def two_families():
    tasks = ["a1", "a2", "b1", "b2"]
    torch.manual_seed(0)
    backbone = TwoBlocks(tasks).requires_grad_(False)
    head_a, head_b = Head(), Head()  # one head per family: a backbone gradient depends on the head it goes through
    heads = {"a1": head_a, "a2": head_a, "b1": head_b, "b2": head_b}
    losses = {
        "a1": lambda p, b: F.mse_loss(p, b["t1"]),
        "a2": lambda p, b: F.mse_loss(p, b["t1"]) + 0.1 * F.mse_loss(p, b["t3"]),  # mostly a1's direction
        "b1": lambda p, b: F.mse_loss(p, b["t2"]),
        "b2": lambda p, b: F.mse_loss(p, b["t2"]) + 0.1 * F.mse_loss(p, b["t3"]),
    }
    return backbone, heads, losses


def test_orthogonal_families_give_zero_between_and_a_stable_split(tmp_path):
    backbone, heads, losses = two_families()
    result = group_tasks(
        backbone, heads, losses, batches(8), [1, 2, 4], num_batches=8, seeds=(0, 1), head_warmup_steps=2,
        output_dir=tmp_path, disable_progress=True,
    )  # fmt: skip
    sim, report = result.similarity, result.stability
    a, b = [0, 1], [2, 3]
    # disjoint support: the cross-family similarities are exactly zero, in every seed and in each half
    assert np.abs(sim.matrix[np.ix_(a, b)]).max() < 1e-12
    assert np.abs(sim.half_cosine[np.ix_(a, b)]).max() < 1e-12
    assert all(np.abs(np.asarray(m)[np.ix_(a, b)]).max() < 1e-12 for m in report["matrix_per_seed"])
    assert sim.matrix[0, 1] > 0.5 and sim.matrix[2, 3] > 0.5
    assert result.tree[1] == [["a1", "a2"], ["b1", "b2"]]
    stage = report["stages"][1]
    assert stage["partition"] == [["a1", "a2"], ["b1", "b2"]] and stage["stable"]
    assert stage["agreement"] == stage["seed_agreement"] == stage["half_agreement"] == 1.0
    assert report["partitions_per_half"][0][0][1] == stage["partition"]  # seed 0, even batches, stage 1
    assert len(report["partitions_per_seed"]) == 2 and len(report["partitions_per_half"]) == 2
    assert report["between_task_max"]["a1"] == pytest.approx(sim.half_cosine[0, 1])
    assert min(report["within_task"].values()) > 0.5  # every task's two halves agree
    # the files: similarity.json carries the report, the tree loads into a config, the picture exists
    saved = TaskSimilarity.from_json(tmp_path / "similarity.json")
    assert saved.stability == json.loads(json.dumps(report))
    np.testing.assert_array_equal(saved.half_matrices, sim.half_matrices)
    assert json.loads((tmp_path / "task_tree.json").read_text())["task_groups"] == result.tree
    assert (tmp_path / "similarity.png").read_bytes()[:4] == b"\x89PNG"


def test_the_same_loss_twice_is_as_similar_as_a_task_to_itself():
    backbone, heads, losses = two_families()
    heads = {"a1": heads["a1"], "a1_again": heads["a1"], "b1": heads["b1"]}  # the same head object and loss
    losses = {"a1": losses["a1"], "a1_again": losses["a1"], "b1": losses["b1"]}
    backbone.tasks = list(heads)
    result = group_tasks(
        backbone, heads, losses, batches(6, seed=3), [1, 2], num_batches=6, seeds=(0, 1, 2), disable_progress=True
    )
    sim, i, j = result.similarity, result.similarity.tasks.index("a1"), result.similarity.tasks.index("a1_again")
    # identical gradients: between-task (across halves) equals within-task, and only batch pairs differ in `matrix`
    assert sim.half_cosine[i, j] == pytest.approx(sim.half_cosine[i, i], abs=1e-6)
    assert sim.matrix[i, j] == pytest.approx(sim.within_task[i] * 5 / 6 + 1 / 6, abs=1e-6)
    assert ["a1", "a1_again"] in result.tree[1] and result.stability["stages"][1]["stable"]


def test_seeds_change_heads_and_batch_order_and_leave_the_loader_as_it_was():
    backbone, heads, losses = two_families()
    samples = [{k: v[i] for k, v in b.items()} for b in batches(6) for i in range(4)]
    generator = torch.Generator().manual_seed(123)
    loader = torch.utils.data.DataLoader(samples, batch_size=4, shuffle=True, generator=generator)
    state = generator.get_state()
    kwargs = dict(num_batches=4, head_warmup_steps=1, disable_progress=True)
    one = group_tasks(backbone, heads, losses, loader, [1, 2], seeds=(5,), **kwargs)
    again = group_tasks(backbone, heads, losses, loader, [1, 2], seeds=(5,), **kwargs)
    other = group_tasks(backbone, heads, losses, loader, [1, 2], seeds=(6,), **kwargs)
    np.testing.assert_array_equal(one.similarity.matrix, again.similarity.matrix)  # a seed fixes everything
    assert not np.allclose(one.similarity.matrix, other.similarity.matrix)
    assert torch.equal(generator.get_state(), state)


def hand_run(seed, matrix, halves):
    return TaskSimilarity(
        tasks=["a", "b", "c"], matrix=np.array(matrix), seed=seed, num_batches=[4, 4, 4], within_task=[0.2, 0.2, 0.2],
        half_matrices=np.array(halves), half_cosine=np.eye(3) * 0.5 + 0.1,
    )  # fmt: skip


AB = [[1, 0.6, 0.1], [0.6, 1, 0.2], [0.1, 0.2, 1]]  # {a, b} {c}
BC = [[1, 0.1, 0.2], [0.1, 1, 0.6], [0.2, 0.6, 1]]  # {a} {b, c}


def test_stability_report_by_hand():
    # seed 0: both halves say {a, b}; seed 1: its matrix says {a, b}, one half says {b, c}
    runs = [hand_run(0, AB, [AB, AB]), hand_run(1, AB, [AB, BC])]
    report = stability_report(runs, [1, 2, 3])
    one_group = {"groups": 1, "partition": [["a", "b", "c"]], "agreement": 1.0, "seed_agreement": 1.0}
    assert report["stages"][0] == {**one_group, "half_agreement": 1.0, "stable": True}
    # 6 alternatives (2 seeds + 4 halves), 5 agree with the average's {a, b} {c}; both seeds do; 3 of 4 halves give
    # their own seed's partition
    two_groups = {"groups": 2, "partition": [["a", "b"], ["c"]], "agreement": 5 / 6, "seed_agreement": 1.0}
    assert report["stages"][1] == {**two_groups, "half_agreement": 3 / 4, "stable": False}
    assert report["stages"][2]["stable"] and not report["stable"]
    assert report["partitions_per_half"][1][1][1] == [["a"], ["b", "c"]]
    assert report["within_task"] == pytest.approx({"a": 0.6, "b": 0.6, "c": 0.6})
    assert report["between_task_max"] == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.1})
    average = average_similarity(runs)
    np.testing.assert_allclose(average.half_matrices[1], (np.array(AB) + np.array(BC)) / 2)


def test_average_needs_the_same_tasks():
    run = hand_run(0, AB, [AB, AB])
    other = TaskSimilarity(tasks=["a", "c", "b"], matrix=np.eye(3))
    with pytest.raises(ValueError, match="same tasks in the same order"):
        average_similarity([run, other])


@pytest.mark.parametrize(
    "spec, expected", [("auto", None), ("auto:1,1,2,4", [1, 1, 2, 4]), (" auto:1,2 ", [1, 2])], ids=str
)
def test_parse_auto(spec, expected):
    assert parse_auto_task_groups(spec) == expected


@pytest.mark.parametrize("spec", ["1,1,2,4", "auto:1,x", "automatic"])
def test_parse_auto_rejects(spec):
    with pytest.raises(ValueError, match="auto"):
        parse_auto_task_groups(spec)


def test_default_groups_per_stage():
    assert default_groups_per_stage(4, 4) == [1, 1, 2, 4]
    assert default_groups_per_stage(3, 2) == [2, 3]
    assert default_groups_per_stage(1, 4) == [1, 1, 1, 1]


def test_train_tglora_auto_groups_from_the_similarity(tmp_path):
    """`--task_groups auto:1,1,2,4`: similarity with the run's heads and loader, files next to the run, then 2 steps."""
    import importlib.util
    from pathlib import Path

    from accelerate.state import AcceleratorState, GradientState

    from peft_tglora.clustering import build_task_tree

    path = Path(__file__).resolve().parents[1] / "examples" / "train_tglora.py"
    spec = importlib.util.spec_from_file_location("train_tglora", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tasks = "semseg,human_parts,saliency,normals"
    argv = [
        "--tasks", tasks, "--task_groups", "auto:1,1,2,4", "--image_size", "64", "--synthetic_size", "16", "--r", "4",
        "--head_width", "4", "--head_hidden", "16", "--batch_size", "4", "--max_train_steps", "2",
        "--backbone_config", '{"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}',
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        example.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    sim = TaskSimilarity.from_json(tmp_path / "similarity.json")
    assert sim.tasks == tasks.split(",") and sim.stability["seeds"] == [0, 1, 2]
    assert (tmp_path / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    trained = json.loads((tmp_path / "adapter_config.json").read_text())["task_groups"]
    # the adapter was trained with the tree cut from the similarity it wrote, and that tree is the one logged
    assert (
        trained
        == build_task_tree(sim, [1, 1, 2, 4])
        == json.loads((tmp_path / "task_tree.json").read_text())["task_groups"]
    )
    assert json.loads((tmp_path / "all_results.json").read_text())["steps"] == 2
