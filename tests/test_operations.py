"""Sequences of PEFT operations give the right outputs, and a failed operation leaves the model exactly as it was.

References are independent of the tuner: a freshly built base model, and outputs or state recorded before the
operation.
"""

import copy
import dataclasses
import json
import sys

import pytest
import torch
from backbones import MODEL_TYPES, reference_stage_features, tiny_backbone
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import SegformerForSemanticSegmentation

from peft_tglora import TGLoraConfig, TGLoraLayer


TASKS = ["semseg", "parts", "sal", "normals"]
TREE = [[TASKS], [TASKS], [["semseg", "parts"], ["sal", "normals"]], [[t] for t in TASKS]]


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def config(task_groups=TREE, **kwargs):
    return TGLoraConfig(tasks=TASKS, task_groups=task_groups, r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def tglora(model_type, task_groups=TREE, width=1):
    return get_peft_model(tiny_backbone(model_type, width=width), config(task_groups))


def features(out):
    return {task: [f.detach().clone() for f in maps] for task, maps in out.task_features.items()}


def assert_features(out, expected, tol=1e-5):
    assert "task_features" in out, "the stream hooks are gone"
    assert out.task_features.keys() == expected.keys()
    for task, maps in expected.items():
        for got, want in zip(out.task_features[task], maps, strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def fingerprint(model):
    """What an operation may change: modules, tensors, hooks, instance-level forwards, trainability, mode."""
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": [
            (name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules()
        ],
        "patched": [name for name, m in model.named_modules() if "forward" in vars(m)],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
        "peft_config": list(getattr(model, "peft_config", {})),
    }


def assert_unchanged(model, before):
    after = fingerprint(model)
    for key in ("modules", "hooks", "patched", "requires_grad", "training", "peft_config"):
        assert after[key] == before[key], f"{key} changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True)


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, TGLoraLayer)]


# ---------------------------------------------------------------------------------------------------- merge, disable


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_disable_adapter_after_merge_adapter_gives_the_base_model(model_type):
    x = pixels()
    base = tiny_backbone(model_type)
    expected, expected_maps = base(x).last_hidden_state, reference_stage_features(base, x)
    model = tglora(model_type)
    adapted = features(model(x))
    with pytest.warns(UserWarning, match="cannot merge"):
        model.merge_adapter()
    assert any(layer.merged for layer in adapter_layers(model))
    with model.disable_adapter():
        out = model(x)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    for task in TASKS:
        for got, want in zip(out.task_features[task], expected_maps, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_features(model(x), adapted, tol=1e-4)  # the adapter is back (unmerged, as LoRA leaves it)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merge_unmerge_merge(model_type):
    x = pixels()
    model = tglora(model_type)
    adapted = features(model(x))
    base_weights = {k: v for k, v in tiny_backbone(model_type).state_dict().items() if k.endswith("weight")}
    for _ in range(2):
        with pytest.warns(UserWarning, match="cannot merge"):
            model.merge_adapter()
        assert_features(model(x), adapted, tol=1e-4)
        model.unmerge_adapter()
        assert not any(layer.merged for layer in adapter_layers(model))
        assert_features(model(x), adapted, tol=1e-4)
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, TGLoraLayer):  # unmerge gives the base weight back
                torch.testing.assert_close(module.base_layer.weight, base_weights[name + ".weight"], atol=1e-6, rtol=0)


def poison_last_layer(model):
    """Put a NaN into the last layer that can merge (every one before it would merge first); return the undo."""
    b = [layer for layer in adapter_layers(model) if layer.num_groups("default") == 1][-1].tglora_B["default"]
    good = b.data[0, 0, 0].item()
    b.data[0, 0, 0] = float("nan")

    def undo():
        b.data[0, 0, 0] = good

    return undo


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_refused_safe_merge_and_unload_changes_nothing(model_type):
    x = pixels()
    model = tglora(model_type, task_groups="shared")
    out = model(x)
    adapted, adapted_last = features(out), out.last_hidden_state.detach().clone()
    undo = poison_last_layer(model)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"NaNs or infs .* nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)
    undo()
    assert_features(model(x), adapted, tol=0)
    plain = model.merge_and_unload(safe_merge=True)  # the same call succeeds once the adapter is sound
    torch.testing.assert_close(plain(x).last_hidden_state, adapted_last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["swin", "pvt"])
def test_refused_safe_merge_adapter_merges_nothing(model_type):
    x = pixels()
    model = tglora(model_type)
    adapted = features(model(x))
    undo = poison_last_layer(model)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="NaNs or infs .* nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in adapter_layers(model))
    assert_unchanged(model, before)
    undo()
    assert_features(model(x), adapted, tol=0)


# ---------------------------------------------------------------------------------------------------- deepcopy


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_deepcopy_is_an_independent_model(model_type):
    x = pixels()
    model = tglora(model_type)
    expected = features(model(x))
    twin = copy.deepcopy(model)
    assert_features(twin(x), expected)  # the copy's hooks build the copy's task features
    base = tiny_backbone(model_type)(x).last_hidden_state
    with twin.disable_adapter():
        torch.testing.assert_close(twin(x).last_hidden_state, base, rtol=1e-5, atol=1e-5)
        assert_features(model(x), expected)  # the copy's disable flag is its own
    # train the copy: the original does not move
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=1.0)
    sum(f.square().mean() for maps in twin(x).task_features.values() for f in maps).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=0, atol=0)
    assert_features(model(x), expected)
    moved = twin(x).task_features
    assert any(not torch.allclose(moved[t][3], expected[t][3]) for t in TASKS), "training the copy changed nothing"
    twin.unload()  # removes the copy's hooks and patched forward, not the original's
    assert_features(model(x), expected)


# ---------------------------------------------------------------------------------------------------- failed loads


def save_adapter(path, model_type, damage):
    """An adapter that cannot load into `tiny_backbone(model_type)`: made for another width, or truncated."""
    model = tglora(model_type, width=2 if damage == "other_size" else 1)
    model.save_pretrained(path)
    if damage == "truncated":
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    return path


# the truncated file's message is safetensors' own: only its type is checked
LOAD_ERRORS = {"other_size": (ValueError, "this backbone needs"), "truncated": (SafetensorError, None)}


@pytest.mark.parametrize("damage", list(LOAD_ERRORS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_failed_from_pretrained_leaves_the_base_model_as_it_was(tmp_path, model_type, damage):
    path = save_adapter(tmp_path, model_type, damage)
    x = pixels()
    base = tiny_backbone(model_type)
    before = fingerprint(base)
    error, match = LOAD_ERRORS[damage]
    with pytest.raises(error, match=match) as raised:
        PeftModel.from_pretrained(base, path)
    # the note names the adapter and the fix, under PEFT's or safetensors' own message (which names neither)
    assert str(path) in "".join(raised.value.__notes__) and "left as it was" in "".join(raised.value.__notes__)
    assert sum("left as it was" in note for note in raised.value.__notes__) == 1, "the note is said once"
    assert_unchanged(base, before)
    out = base(x)
    assert "task_features" not in out
    torch.testing.assert_close(out.last_hidden_state, tiny_backbone(model_type)(x).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("damage", list(LOAD_ERRORS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_failed_load_adapter_leaves_the_peft_model_as_it_was(tmp_path, model_type, damage):
    path = save_adapter(tmp_path, model_type, damage)
    x = pixels()
    model = tglora(model_type)
    expected = features(model(x))
    before = fingerprint(model)
    error, match = LOAD_ERRORS[damage]
    with pytest.raises(error, match=match) as raised:
        model.load_adapter(path, adapter_name="other")
    assert str(path) in "".join(raised.value.__notes__)
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert_features(model(x), expected, tol=0)


# ---------------------------------------------------------------------------------------------------- task models


def test_segformer_decode_head_refuses_a_grouped_tree():
    x = pixels()
    model = SegformerForSemanticSegmentation(tiny_backbone("segformer").config).eval()
    expected = model(x).logits.detach().clone()
    before = fingerprint(model)
    with pytest.raises(
        ValueError, match=r"decode_head` reads every stage.*\[1, 1, 2, 4\].*task_groups='shared'.*`SegformerModel`"
    ):
        get_peft_model(model, config(TREE))
    assert_unchanged(model, before)
    # the same number of groups at every stage is what the head can read: one logits block per task
    peft_model = get_peft_model(model, TGLoraConfig(tasks=TASKS, task_groups="per_task", r=4))
    logits = peft_model(x).logits
    assert logits.shape[0] == len(TASKS) * 2
    for block in logits.view(len(TASKS), 2, *logits.shape[1:]):
        torch.testing.assert_close(block, expected, rtol=1e-5, atol=1e-5)  # B = 0: every task sees the base head


# ---------------------------------------------------------------------------------------------------- named adapters


@pytest.mark.parametrize("model_type", ["swin", "pvt_v2"])
def test_add_set_delete_adapter(tmp_path, model_type):
    x = pixels()
    model = tglora(model_type)
    grouped = features(model(x))
    model.add_adapter("flat", config("shared"))
    assert_features(model(x), grouped, tol=0)  # adding an adapter does not activate it
    model.set_adapter("flat")
    flat = features(model(x))
    model.save_pretrained(tmp_path, selected_adapters=["flat"])
    reference = PeftModel.from_pretrained(tiny_backbone(model_type), tmp_path / "flat")
    assert_features(reference(x), flat)  # "flat" alone on a fresh base model
    model.delete_adapter("default")
    assert list(model.peft_config) == ["flat"]
    assert not any("default" in layer.tglora_A for layer in adapter_layers(model))
    assert_features(model(x), flat, tol=0)
    assert model(x).last_hidden_state.shape[0] == 2  # one stream: "flat" is the tree now


# ---------------------------------------------------------------------------------------------------- the tuner's tree


def test_the_config_stays_a_plain_record_and_the_tuner_owns_the_tree():
    x = pixels()
    cfg = config("1,1,2,4")
    model = get_peft_model(tiny_backbone("swin"), cfg)
    expected = features(model(x))
    assert set(vars(cfg)) == {f.name for f in dataclasses.fields(cfg)}  # no runtime state (caches) on the config
    assert cfg.task_groups == TREE  # the explicit tree, as adapter_config.json stores it
    assert model.get_task_tree().to_groups() == TREE
    cfg.task_groups = [[TASKS]] * 4  # the layers were built for TREE: editing the record afterwards reroutes nothing
    assert_features(model(x), expected, tol=0)


def test_a_similarity_file_is_read_without_the_gradient_tool(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft_tglora.similarity", None)  # importing it now raises ImportError
    # a, b alike and c, d alike, listed as a, c, b, d: the similarity cut differs from the listed-order cut
    matrix = [[1, 0.9, 0, 0], [0.9, 1, 0, 0], [0, 0, 1, 0.8], [0, 0, 0.8, 1]]
    path = tmp_path / "similarity.json"
    path.write_text(json.dumps({"tasks": ["a", "b", "c", "d"], "matrix": matrix}))
    cfg = TGLoraConfig(tasks=["a", "c", "b", "d"], task_groups="1,2", similarity_file=str(path))
    assert cfg.task_groups == [[["a", "c", "b", "d"]], [["a", "b"], ["c", "d"]]]


def test_refused_add_adapter_leaves_the_model_as_it_was():
    x = pixels()
    model = tglora("swin")
    expected = features(model(x))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="a Conv2d; TGLoRA adapts `nn.Linear` only"):
        model.add_adapter("bad", config(target_modules=["mlp.fc1", "projection"]))
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    assert_features(model(x), expected, tol=0)
