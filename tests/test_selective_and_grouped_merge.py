"""`model(x, tasks=[...])` and `merge_adapter(grouped=True)` against independent references: the full forward, the
base model, the weights before the merge, and the rows the frozen linears actually see."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from backbones import MODEL_TYPES, reference_stage_features, tiny_backbone
from peft import PeftModel, get_peft_model
from test_operations import assert_unchanged, features, fingerprint

from peft_tglora import TGLoraConfig, TGLoraLayer


TASKS = ["semseg", "parts", "sal", "normals"]
TREE = [[TASKS], [TASKS], [["semseg", "parts"], ["sal", "normals"]], [[t] for t in TASKS]]
# one task; two tasks of one stage-2 group; two tasks of different groups, listed out of tree order
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tglora.py"
SELECTIONS = [["parts"], ["sal", "normals"], ["normals", "semseg"]]
STREAMS = {("parts",): (1, 1, 1, 1), ("sal", "normals"): (1, 1, 1, 2), ("normals", "semseg"): (1, 1, 2, 2)}


def pixels(batch=2, seed=1, dtype=torch.float32):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tglora(model_type, task_groups=TREE, dtype=torch.float32):
    config = TGLoraConfig(tasks=TASKS, task_groups=task_groups, r=4, lora_alpha=8, init_lora_weights=False)
    return get_peft_model(tiny_backbone(model_type), config).to(dtype)


def assert_features(out, expected, tasks, tol=0.0):
    assert list(out.task_features) == [t for t in TASKS if t in tasks]
    for task in tasks:
        for got, want in zip(out.task_features[task], expected[task], strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def adapter_layers(model):
    return [(name, m) for name, m in model.base_model.model.named_modules() if isinstance(m, TGLoraLayer)]


def last_linear_per_stage(model):
    """The base linear of the last adapted layer of each stage (layers come in stage order)."""
    per_stage = {}
    for name, layer in adapter_layers(model):
        per_stage[model.base_model._stage_of_key(name)] = layer.base_layer
    return [per_stage[s] for s in sorted(per_stage)]


# ---------------------------------------------------------------------------------------------------- selection


def test_layout_of_a_selection_by_hand():
    tree = TGLoraConfig(tasks=TASKS, task_groups=TREE).task_tree
    full = tree.layout()
    assert full.groups == ((0,), (0,), (0, 1), (0, 1, 2, 3)) and full.parents == tree.parent_indices
    # semseg sits in group 0 at stage 2 and 0 at stage 3, normals in 1 and 3: both stage-3 streams copy a different
    # stage-2 stream, found at its position among the two selected stage-2 groups
    layout = tree.layout(["normals", "semseg"])
    assert layout.groups == ((0,), (0,), (0, 1), (0, 3))
    assert layout.parents == ((0,), (0,), (0, 0), (0, 1))
    assert [layout.splits_at(s) for s in range(4)] == [False, False, True, False]
    layout = tree.layout(["sal", "normals"])
    assert layout.groups == ((0,), (0,), (1,), (2, 3)) and layout.parents == ((0,), (0,), (0,), (0, 0))
    assert [layout.splits_at(s) for s in range(4)] == [False, False, False, True]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_selected_tasks_equal_the_full_forward_and_run_fewer_rows(model_type):
    x = pixels(dtype=torch.float64)
    model = tglora(model_type, dtype=torch.float64)
    rows = []
    for linear in last_linear_per_stage(model):
        linear.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    full = features(model(x))
    assert rows == [2 * g for g in (1, 1, 2, 4)]
    for tasks in SELECTIONS:
        rows.clear()
        out = model(x, tasks=tasks)
        assert_features(out, full, tasks, tol=1e-12)  # float64: the same sums over the same rows
        assert rows == [2 * g for g in STREAMS[tuple(tasks)]], "the split hooks replicated streams nobody asked for"
    rows.clear()
    assert_features(model(x), full, TASKS, tol=0)  # the next call without `tasks` runs every stream again
    assert rows == [2, 2, 4, 8]


@pytest.mark.parametrize("model_type", ["swin", "pvt_v2"])
def test_selection_under_disable_merge_and_export(model_type):
    x = pixels()
    model = tglora(model_type)
    full = features(model(x))
    base = reference_stage_features(tiny_backbone(model_type), x)
    with model.disable_adapter():
        out = model(x, tasks=["sal"])
    assert_features(out, {"sal": base}, ["sal"], tol=1e-5)
    for task in ["parts", "normals"]:
        exported = reference_stage_features(model.export_task(task), x)
        assert_features(model(x, tasks=[task]), {task: exported}, [task], tol=1e-4)
    with pytest.warns(UserWarning, match="cannot merge"):
        model.merge_adapter()  # stages 0-1 merged, 2-3 run the selected groups' adapters
    assert_features(model(x, tasks=["normals", "semseg"]), full, ["normals", "semseg"], tol=1e-4)
    model.unmerge_adapter()
    model.merge_adapter(grouped=True)
    assert_features(model(x, tasks=["sal", "normals"]), full, ["sal", "normals"], tol=1e-4)
    assert_features(model(x, tasks=["parts"]), full, ["parts"], tol=1e-4)


def test_selection_follows_the_active_adapter():
    x = pixels()
    model = tglora("swin")
    full = features(model(x))
    other = [[TASKS], [["semseg"], ["parts", "sal", "normals"]], [["semseg"], ["parts"], ["sal", "normals"]]]
    other.append([[t] for t in TASKS])
    model.add_adapter("other", TGLoraConfig(tasks=TASKS, task_groups=other, r=2, init_lora_weights=False))
    model.set_adapter("other")
    other_full = features(model(x))
    assert_features(model(x, tasks=["parts"]), other_full, ["parts"], tol=1e-5)
    assert model(x, tasks=["sal", "normals"]).last_hidden_state.shape[0] == 2 * 2
    model.set_adapter("default")
    assert_features(model(x, tasks=["sal", "normals"]), full, ["sal", "normals"], tol=1e-5)


def test_selection_with_gradient_checkpointing_gives_the_full_forwards_gradients():
    x = pixels(dtype=torch.float64)
    model = tglora("swin", dtype=torch.float64).train()
    for module in model.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0  # stochastic depth draws per row: selected and full runs would drop differently

    def grads(**kwargs):
        model.zero_grad(set_to_none=True)
        out = model(x, **kwargs).task_features
        sum(f.square().mean() for f in out["sal"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()  # the full forward, only "sal"'s features in the loss
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    last_linear_per_stage(model)[-1].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    got = grads(tasks=["sal"])
    assert calls == [2, 2], "the layer ran once more in backward, on the selected stream only"
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_bad_selection_is_refused():
    model = tglora("swin")
    with pytest.raises(ValueError, match=r"must name one or more of this tree's tasks.*unknown: \['depth'\]"):
        model(pixels(), tasks=["depth"])
    with pytest.raises(ValueError, match=r"list of task names, got 'sal'; e.g. tasks=\['sal'\]"):
        model(pixels(), tasks="sal")


# ---------------------------------------------------------------------------------------------------- grouped merge


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_grouped_merge_equals_unmerged_and_unmerge_restores_the_base_bit_for_bit(model_type, dtype, tol):
    x = pixels(dtype=dtype)
    model = tglora(model_type, dtype=dtype)
    adapted = features(model(x))
    base_weights = {name: layer.base_layer.weight.detach().clone() for name, layer in adapter_layers(model)}
    model.merge_adapter(grouped=True)
    for name, layer in adapter_layers(model):
        weight = layer.base_layer.weight
        assert layer.merged_group_weight.shape == (layer.num_groups("default"), *weight.shape)
        torch.testing.assert_close(weight, base_weights[name], rtol=0, atol=0)
        layer.tglora_B["default"].data.zero_()  # from here on only the merged weights can carry the adapter
    assert_features(model(x), adapted, TASKS, tol=tol)
    model.unmerge_adapter()
    for name, layer in adapter_layers(model):
        assert layer.merged_group_weight is None and not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], rtol=0, atol=0)
    # unmerged with B = 0: the base model again
    assert_features(model(x), {t: reference_stage_features(tiny_backbone(model_type).to(dtype), x) for t in TASKS},
                    TASKS, tol=max(tol, 1e-5))  # fmt: skip


@pytest.mark.parametrize("model_type", ["swin", "pvt"])
def test_refused_grouped_safe_merge_changes_nothing(model_type):
    x = pixels()
    model = tglora(model_type)
    adapted = features(model(x))
    # the last layer of the last (grouped) stage: every layer before it would merge first
    b = adapter_layers(model)[-1][1].tglora_B["default"]
    assert b.shape[0] == 4
    b.data[3, 0, 0] = float("inf")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"NaNs or infs .* nothing was merged"):
        model.merge_adapter(grouped=True, safe_merge=True)
    assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    b.data[3, 0, 0] = 0.5
    model(x)  # runs unmerged
    model.merge_adapter(grouped=True, safe_merge=True)
    assert all(layer.merged for _, layer in adapter_layers(model))
    assert_features(model(x, tasks=["semseg"]), adapted, ["semseg"], tol=1e-4)  # that layer is not on its path


def test_grouped_merge_with_disable_save_load_and_unload(tmp_path):
    x = pixels()
    model = tglora("swin")
    adapted = features(model(x))
    saved_before = {k: v.clone() for k, v in model.state_dict().items() if "tglora_" in k}
    model.merge_adapter(grouped=True)
    with pytest.raises(ValueError, match="merged already.*unmerge_adapter"):
        model.merge_adapter()  # the two kinds of merge do not stack
    with model.disable_adapter():  # as LoRA: a disabled adapter is the base model, merged layers come out
        base = model(x)
    assert_features(base, {t: reference_stage_features(tiny_backbone("swin"), x) for t in TASKS}, TASKS, tol=1e-5)
    model.merge_adapter(grouped=True)
    model.save_pretrained(tmp_path)  # the adapter weights, as LoRA saves them when merged
    loaded = PeftModel.from_pretrained(tiny_backbone("swin"), tmp_path)
    assert_features(loaded(x), adapted, TASKS, tol=1e-5)
    for key, value in saved_before.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="several task groups"):
        model.merge_and_unload()
    plain = model.unload()  # the base weights were never touched
    fresh = tiny_backbone("swin").state_dict()
    assert plain.state_dict().keys() == fresh.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, fresh[key], rtol=0, atol=0, msg=key)


def test_grouped_merge_of_a_shared_tree_then_merge_and_unload():
    x = pixels()
    model = tglora("pvt_v2", task_groups="shared")
    expected = model(x).last_hidden_state.detach().clone()
    model.merge_adapter(grouped=True)
    torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()  # merges into the base weights, which the grouped merge left alone
    assert not any(isinstance(m, TGLoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- the benchmark


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_benchmark_two_stream_baseline_runs_the_rows_of_the_two_task_selection():
    spec = importlib.util.spec_from_file_location("bench_tglora", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    tiny = dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=2)
    cfg = bench.BenchConfig(backbone=tiny, r=4, lora_alpha=4)
    x = bench.pixel_values(cfg)
    model = bench.tglora_model(cfg, bench.build_backbone(cfg), cfg.task_groups).eval()  # B = 0: streams = base
    reference = bench.build_backbone(cfg).eval()
    bench.replicate_streams(reference, bench.two_task_tree(cfg))
    with torch.no_grad():
        got = model(pixel_values=x, tasks=list(bench.TWO_TASKS)).last_hidden_state
        want = reference(pixel_values=x).last_hidden_state
    assert want.shape[0] == 2 * cfg.batch_size
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
