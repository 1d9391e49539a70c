"""Parameters and MACs of task trees (`peft_tglora.costs`) against hand counts on tiny backbones."""

import dataclasses
import json

import pytest
import torch
from backbones import MODEL_TYPES, tiny_backbone
from peft import get_peft_model
from torch import nn
from transformers import SwinConfig, SwinModel

from peft_tglora import TGLoraConfig
from peft_tglora.costs import BudgetSearch, StageCost, TreeCost, tree_costs, trees_within_budget
from peft_tglora.costs_cli import main


# Swin at 32 px, patch 4: stage 0 has 8x8 tokens of width 8 (two blocks, the second shifted), stage 1 4x4 of width 16
SWIN = dict(image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=4)
TOKENS, WIDTHS, WINDOW_TOKENS = (64, 16), (8, 16), (16, 16)


def tiny_swin(**overrides) -> SwinModel:
    torch.manual_seed(0)
    return SwinModel(SwinConfig(**{**SWIN, **overrides})).eval()


def swin_stage_hand(s: int, r: int) -> tuple[int, int, int]:
    """(frozen MACs of one stream, adapter MACs of one group, adapter parameters of one group) of stage s."""
    n, c, w2, depth = TOKENS[s], WIDTHS[s], WINDOW_TOKENS[s], SWIN["depths"][s]
    # per block: q, k, v, o (c -> c), fc1 (c -> 4c), fc2 (4c -> c); attention q k^T and attn v over w2-token windows
    linears = [(c, c)] * 4 + [(c, 4 * c), (4 * c, c)]
    frozen = depth * (sum(n * i * o for i, o in linears) + 2 * n * w2 * c)
    if s < len(TOKENS) - 1:
        frozen += (n // 4) * (4 * c) * (2 * c)  # patch merging: a 4c -> 2c linear on the merged tokens
    lora = depth * sum(r * (i + o) for i, o in linears)  # A_g: r x in, B_g: out x r, per adapted linear
    return frozen, n * lora, lora


PATCH_EMBED = TOKENS[0] * (3 * 4 * 4) * WIDTHS[0]  # the 4x4 stride-4 convolution, once per image


@pytest.mark.parametrize(
    ("tree", "r", "shared_r"), [("shared", 4, 0), ("1,2", 4, 0), ("per_task", 2, 0), ("1,3", 4, 2)]
)
def test_swin_parameters_and_macs_equal_a_hand_count(tree, r, shared_r):
    cost = tree_costs(tiny_swin(), tree, 32, tasks=["a", "b", "c"], r=r, shared_r=shared_r)
    groups = {"shared": (1, 1), "per_task": (3, 3)}.get(tree) or tuple(int(g) for g in tree.split(","))
    assert cost.groups_per_stage == groups
    assert cost.base_macs == PATCH_EMBED + sum(swin_stage_hand(s, r)[0] for s in range(2))
    for s, (g, stage) in enumerate(zip(groups, cost.stages)):
        frozen, lora_macs, lora_params = swin_stage_hand(s, r)
        shared = 0 if g == 1 else lora_params // r * shared_r  # the shared part's rank-shared_r update, one per layer
        assert stage.base_macs == frozen
        assert stage.params == g * lora_params + shared
        assert stage.macs == g * frozen + g * lora_macs + g * TOKENS[s] * shared  # the shared part runs on every row
    assert cost.other_params == 0
    assert cost.other_macs == PATCH_EMBED
    assert cost.backbone_params == sum(p.numel() for p in _peft(tree, r, shared_r).parameters() if p.requires_grad)


def _peft(tree, r, shared_r):
    return get_peft_model(tiny_swin(), TGLoraConfig(tasks=["a", "b", "c"], task_groups=tree, r=r, shared_r=shared_r))


def test_one_linear_by_hand():
    # one stage, one block, 8x8 tokens in one 8x8 window: every matmul of the model is written out here
    model = tiny_swin(depths=[1], num_heads=[1], window_size=8)
    cost = tree_costs(model, "2", 32, tasks=["a", "b"], r=3)
    n, c = 64, 8
    q_proj = n * c * c  # one [n, c] x [c, c] product
    frozen = 4 * q_proj + 2 * n * c * 4 * c + 2 * n * n * c
    assert cost.base_macs == n * 48 * c + frozen
    assert cost.stages[0].macs == 2 * frozen + 2 * n * 3 * (4 * 2 * c + 2 * 5 * c)
    assert cost.merged_macs == cost.backbone_macs  # a grouped stage cannot merge


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tree_macs_are_base_plus_group_copies_plus_small_lora_extra(model_type):
    # independent of the code's composition: G streams through a stage cost G frozen passes, plus the adapters,
    # whose MACs are at most (tokens of the stage) x (adapter parameters), each weight used once per token
    tokens = [(64 // 4 // 2**s) ** 2 + (model_type == "pvt" and s == 3) for s in range(4)]  # PVT: + class token
    base = tree_costs(tiny_backbone(model_type), "shared", 64, tasks=["a", "b", "c"], r=2)
    for tree in ("1,2,2,3", "per_task"):
        cost = tree_costs(tiny_backbone(model_type), tree, 64, tasks=["a", "b", "c"], r=2)
        assert cost.base_macs == base.base_macs
        frozen = base.base_macs + sum((g - 1) * st.base_macs for g, st in zip(cost.groups_per_stage, cost.stages))
        extra = cost.backbone_macs - frozen
        bound = sum(n * st.params for n, st in zip(tokens, cost.stages))
        assert 0 < extra <= bound
        assert extra <= 0.6 * frozen  # "small": r=2 on widths 8..32


@pytest.mark.parametrize("model_type", ["swin", "segformer"])
def test_meta_and_cpu_count_the_same(model_type):
    # CPU's fused attention has no FlopCounterMode formula; costs.py counts the math kernel on every device
    meta = tree_costs(tiny_backbone(model_type), "1,1,2,2", 64, tasks=["a", "b"], r=2)
    cpu = tree_costs(tiny_backbone(model_type), "1,1,2,2", 64, tasks=["a", "b"], r=2, device="cpu")
    # equal per stage and in total; the split by aten op may differ (a 3-d linear is addmm on one, bmm on the other)
    assert dataclasses.replace(meta, ops={}) == dataclasses.replace(cpu, ops={})
    assert sum(meta.ops.values()) == sum(cpu.ops.values()) == meta.backbone_macs


class _LastStageHead(nn.Module):
    def __init__(self, channels, outputs):
        super().__init__()
        self.conv = nn.Conv2d(channels, outputs, 1)

    def forward(self, features):
        return self.conv(features[-1])


def test_heads_are_added_with_their_parameters_and_macs():
    heads = nn.ModuleDict({"a": _LastStageHead(16, 5), "b": _LastStageHead(16, 1)})
    cost = tree_costs(tiny_swin(), "1,2", 32, heads, tasks=["a", "b"], r=4)
    assert cost.head_params == {"a": 16 * 5 + 5, "b": 16 + 1}
    assert cost.head_macs == {"a": 16 * 16 * 5, "b": 16 * 16 * 1}  # 4x4 map, 1x1 conv
    assert cost.params == cost.backbone_params + 102
    assert cost.macs == cost.backbone_macs + 16 * 16 * 6
    assert heads["a"].conv.weight.device.type == "cpu"  # the caller's heads were copied, not moved


# similarity with a known dendrogram: {a, b} merge first (0.9), then {c, d} (0.8), then all (mean 0.1)
SIM = {
    "tasks": ["a", "b", "c", "d"],
    "matrix": [[1, 0.9, 0.1, 0.1], [0.9, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.8], [0.1, 0.1, 0.8, 1]],
}
CUTS = {
    1: [["a", "b", "c", "d"]],
    2: [["a", "b"], ["c", "d"]],
    3: [["a", "b"], ["c"], ["d"]],
    4: [["a"], ["b"], ["c"], ["d"]],
}
# two stages, non-decreasing counts: the ten nested trees this dendrogram allows, written out
NESTED = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 3), (3, 4), (4, 4)]


def test_enumeration_lists_exactly_the_nested_trees_with_their_own_costs():
    search = trees_within_budget(SIM, model_or_config=tiny_swin(), image_size=32, r=2)
    listed = sorted((c.groups_per_stage, c.task_groups) for c in search.candidates)
    assert listed == [(counts, [CUTS[g] for g in counts]) for counts in NESTED]
    assert search.best.groups_per_stage == (4, 4)  # no budget: the most task-specific tree
    for cand in search.candidates[::4]:  # composed from per-count stage costs, equal to measuring the tree itself
        direct = tree_costs(tiny_swin(), cand.task_groups, 32, tasks=SIM["tasks"], r=2)
        assert (direct.stages, direct.backbone_macs, direct.params) == (cand.stages, cand.backbone_macs, cand.params)


def _cost(counts, macs, params=0):
    stages = tuple(StageCost(groups=g, params=0, macs=0, base_macs=0) for g in counts)
    return TreeCost([], (32, 32), stages, other_params=params, other_macs=macs, base_macs=0)


def test_budget_pick_on_a_hand_made_case():
    costs = [_cost((1, 1), 10, 1), _cost((1, 2), 15, 2), _cost((1, 3), 18, 3), _cost((2, 2), 17, 4), _cost((1, 4), 25)]
    pick = BudgetSearch(tuple(costs), budget_params=None, budget_macs=19, merged=False).best
    assert pick.groups_per_stage == (2, 2)  # (1, 3) and (2, 2) both have 4 groups: fewer MACs wins
    pick = BudgetSearch(tuple(costs), budget_params=3, budget_macs=19, merged=False).best
    assert pick.groups_per_stage == (1, 3)  # (2, 2) has 4 parameters
    pick = BudgetSearch(tuple(costs), budget_params=None, budget_macs=14, merged=False).best
    assert pick.groups_per_stage == (1, 1)
    assert BudgetSearch(tuple(costs), budget_params=None, budget_macs=9, merged=False).best is None


def test_budget_pick_on_a_tiny_swin_against_a_naive_loop():
    search = trees_within_budget(SIM, model_or_config=tiny_swin(), image_size=32, r=2)
    budget = sorted(c.macs for c in search.candidates)[4]  # five trees fit
    picked = BudgetSearch(search.candidates, budget_params=None, budget_macs=budget, merged=False).best
    best = None
    for cand in search.candidates:
        if (
            cand.macs <= budget
            and (best is None or sum(cand.groups_per_stage) > sum(best.groups_per_stage))
            or (
                cand.macs <= budget
                and sum(cand.groups_per_stage) == sum(best.groups_per_stage)
                and cand.macs < best.macs
            )
        ):
            best = cand
    assert picked.groups_per_stage == best.groups_per_stage
    assert picked.macs <= budget


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="budget_macs=-1"):
        trees_within_budget(SIM, budget_macs=-1, model_or_config=tiny_swin(), image_size=32)
    with pytest.raises(ValueError, match="pass tasks"):
        tree_costs(tiny_swin(), "1,2", 32)
    with pytest.raises(TypeError, match="not a PeftModel"):
        tree_costs(_peft("1,2", 2, 0), "1,2", 32, tasks=["a", "b", "c"])
    with pytest.raises(ValueError, match="image_size"):
        tree_costs(tiny_swin(), "1,2", 0, tasks=["a", "b"])


def test_cli_table_and_budget_pick(tmp_path, capsys):
    SwinConfig(**SWIN).save_pretrained(tmp_path / "swin")  # a local folder: its config.json is all that is read
    (tmp_path / "sim.json").write_text(json.dumps(SIM))
    main(["--backbone", str(tmp_path / "swin"), "--image-size", "32", "--tasks", "a,b,c,d", "--r", "2",
          "--trees", "shared:1,2:per_task"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| shared |" in out and "| 1,2 |" in out and "| per_task |" in out
    search = trees_within_budget(SIM, model_or_config=SwinConfig(**SWIN), image_size=32, r=2, lora_alpha=2)
    budget = sorted(c.macs for c in search.candidates)[4]
    main(["--backbone", str(tmp_path / "swin"), "--image-size", "32", "--similarity", str(tmp_path / "sim.json"),
          "--r", "2", "--budget-macs", str(budget), "--json", str(tmp_path / "costs.json")])  # fmt: skip
    out = capsys.readouterr().out
    counts = BudgetSearch(search.candidates, None, budget, False).best.groups_per_stage
    label = {(1, 1): "shared", (4, 4): "per_task"}.get(counts, ",".join(map(str, counts)))
    assert f"| {label} **(pick)** |" in out
    assert len(json.loads((tmp_path / "costs.json").read_text())) == len(NESTED)
