"""The tree semantics against independent references: the base model, plain PEFT LoRA, hand-merged weights."""

import re

import pytest
import torch
from backbones import MODEL_TYPES, STAGE_PATTERNS, reference_stage_features, tiny_backbone
from peft import LoraConfig, get_peft_model

from peft_tglora import TGLoraConfig


TASKS = ["semseg", "parts", "sal", "normals"]
TREE = [[TASKS], [TASKS], [["semseg", "parts"], ["sal", "normals"]], [[t] for t in TASKS]]


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def tglora(model_type, task_groups=TREE, init_lora_weights=False, **kwargs):
    base = tiny_backbone(model_type)
    config = TGLoraConfig(
        tasks=TASKS, task_groups=task_groups, r=4, lora_alpha=8, init_lora_weights=init_lora_weights, **kwargs
    )
    return get_peft_model(base, config)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_identity_at_init(model_type):
    # float64: in float32 the base model alone differs by ~1e-6 between batch sizes (BLAS blocking), and split
    # stages run G x B rows; float64 leaves only the semantics to compare
    x = pixels().double()
    expected = reference_stage_features(tiny_backbone(model_type).double(), x)
    out = tglora(model_type, init_lora_weights=True).double()(x)
    for task in TASKS:
        assert len(out.task_features[task]) == 4
        for got, want in zip(out.task_features[task], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def hand_merged(model_type, peft_model, task):
    """The base model with `task`'s path merged, computed from the raw adapter tensors and the tree above."""
    merged = tiny_backbone(model_type)
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "tglora_A"):
                continue
            stage = int(re.search(STAGE_PATTERNS[model_type], name).group(1))
            group = next(g for g, members in enumerate(TREE[stage]) if task in members)
            a = module.tglora_A["default"][group]
            b = module.tglora_B["default"][group]
            merged.get_submodule(name).weight += (8 / 4) * b @ a
    return merged


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_task_features_equal_base_with_task_path_merged(model_type):
    x = pixels()
    model = tglora(model_type)
    out = model(x)
    differs = False
    for task in TASKS:
        expected = reference_stage_features(hand_merged(model_type, model, task), x)
        for got, want in zip(out.task_features[task], expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        differs |= not torch.allclose(out.task_features[task][3], out.task_features[TASKS[0]][3])
    assert differs, "random B must make the per-task streams differ"


@pytest.mark.parametrize("model_type", ["swin", "pvt_v2"])
def test_export_task_equals_task_features(model_type):
    x = pixels()
    model = tglora(model_type)
    out = model(x)
    for task in ["parts", "normals"]:
        exported = model.export_task(task)
        assert not any("tglora" in n for n, _ in exported.named_parameters())
        for got, want in zip(reference_stage_features(exported, x), out.task_features[task]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the live model keeps working after an export
    torch.testing.assert_close(model(x).task_features["sal"][3], out.task_features["sal"][3])


def lora_twin(model_type, tglora_model):
    """Plain PEFT LoRA on the same backbone with the TGLoRA weights copied in."""
    cfg = tglora_model.peft_config["default"]
    lora = get_peft_model(
        tiny_backbone(model_type), LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    )
    with torch.no_grad():
        for name, module in tglora_model.base_model.model.named_modules():
            if hasattr(module, "tglora_A"):
                twin = lora.base_model.model.get_submodule(name)
                twin.lora_A["default"].weight.copy_(module.tglora_A["default"][0])
                twin.lora_B["default"].weight.copy_(module.tglora_B["default"][0])
    return lora


@pytest.mark.parametrize("model_type", ["swin", "pvt_v2", "segformer"])
def test_one_group_everywhere_equals_peft_lora(model_type):
    x = pixels()
    model = tglora(model_type, task_groups="shared")
    lora = lora_twin(model_type, model)
    assert sorted(model.targeted_module_names) == sorted(lora.targeted_module_names)
    out, ref = model(x), lora(x)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    (out.last_hidden_state.square().mean()).backward()
    (ref.last_hidden_state.square().mean()).backward()
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "tglora_A"):
            twin = lora.base_model.model.get_submodule(name)
            torch.testing.assert_close(
                module.tglora_A["default"].grad[0], twin.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-4
            )
            torch.testing.assert_close(
                module.tglora_B["default"].grad[0], twin.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4
            )


def test_raw_outputs_keep_the_stream_layout():
    x = pixels(batch=3)
    model = tglora("swin")
    out = model(x)
    assert out.last_hidden_state.shape[0] == 4 * 3  # four groups in the last stage
    # group g's rows of the raw output are task g's stream (before the final norm)
    assert out.task_features["sal"][3].shape == (3, 64, 2, 2)


def test_gradients_reach_only_the_groups_that_serve_a_task():
    model = tglora("swin")
    out = model(pixels())
    out.task_features["sal"][3].sum().backward()
    layer = model.base_model.model.encoder.layers[3].blocks[0].mlp.fc1
    grads = layer.tglora_B["default"].grad.flatten(1).abs().sum(1)
    assert grads[2] > 0 and grads[[0, 1, 3]].sum() == 0
    shared = model.base_model.model.encoder.layers[0].blocks[0].mlp.fc1
    assert shared.tglora_B["default"].grad.abs().sum() > 0


def test_disable_adapter_gives_the_base_model():
    x = pixels()
    model = tglora("swin")
    expected = tiny_backbone("swin")(x).last_hidden_state
    with model.disable_adapter():
        out = model(x)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=0, atol=1e-6)
    assert out.task_features["sal"][0].shape[0] == 2
    assert model(x).last_hidden_state.shape[0] == 8  # streams are back


def test_merge_adapter_merges_one_group_stages_only():
    x = pixels()
    model = tglora("swin")
    before = model(x).task_features
    with pytest.warns(UserWarning, match="cannot merge"):
        model.merge_adapter()
    merged = [n for n, m in model.base_model.model.named_modules() if getattr(m, "merged", False)]
    assert merged and all(re.match(r"encoder\.layers\.[01]\.", n) for n in merged)
    after = model(x).task_features
    for task in TASKS:
        for a, b in zip(before[task], after[task]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x).task_features["parts"][3], before["parts"][3], rtol=1e-4, atol=1e-4)


def test_merge_and_unload():
    x = pixels()
    grouped = tglora("swin")
    with pytest.raises(ValueError, match="export_task"):
        grouped.merge_and_unload()
    shared = tglora("swin", task_groups="shared")
    expected = shared(x).last_hidden_state
    plain = shared.merge_and_unload()
    assert not hasattr(plain, "peft_config")
    out = plain(x)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    assert "task_features" not in out


def test_shared_part_inside_grouped_stages():
    model = tglora("swin", shared_r=2)
    grouped = model.base_model.model.encoder.layers[2].blocks[0].mlp.fc1
    single = model.base_model.model.encoder.layers[0].blocks[0].mlp.fc1
    assert grouped.tglora_shared_A["default"].shape == (2, 32)
    assert "default" not in single.tglora_shared_A
    # the shared part adds the same update to every group: check against a hand computation on one layer
    x = torch.randn(2 * 5, 32)
    a, b = grouped.tglora_A["default"], grouped.tglora_B["default"]
    sa, sb = grouped.tglora_shared_A["default"], grouped.tglora_shared_B["default"]
    expected = grouped.base_layer(x)
    for g in range(2):
        rows = x[g * 5 : (g + 1) * 5]
        expected[g * 5 : (g + 1) * 5] += 2.0 * rows @ a[g].T @ b[g].T + 4.0 * rows @ sa.T @ sb.T
    torch.testing.assert_close(grouped(x), expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_keeps_gradients():
    x = pixels()
    grads = []
    for checkpointing in (False, True):
        model = tglora("swin")
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            assert model.base_model.model.encoder.layers[0].gradient_checkpointing
        model.train()  # checkpointing only acts in training; the same seed gives the same drop-path masks
        torch.manual_seed(0)
        out = model(x)
        sum(f.square().mean() for fs in out.task_features.values() for f in fs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_several_named_adapters():
    x = pixels()
    model = tglora("swin")
    model.add_adapter("flat", TGLoraConfig(tasks=TASKS, task_groups="shared", r=2, init_lora_weights=True))
    grouped = model(x)
    model.set_adapter("flat")
    flat = model(x)
    assert flat.last_hidden_state.shape[0] == 2 and grouped.last_hidden_state.shape[0] == 8
    expected = tiny_backbone("swin")(x).last_hidden_state  # "flat" has B = 0
    torch.testing.assert_close(flat.last_hidden_state, expected, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".flat" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(model(x).task_features["sal"][3], grouped.task_features["sal"][3])


def test_only_adapters_are_trainable_and_every_target_is_adapted():
    model = tglora("swin")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("tglora_" in n for n in trainable)
    linears = [n for n, m in tiny_backbone("swin").named_modules() if re.search(r"(q|k|v|o)_proj$|fc[12]$", n)]
    assert sorted(model.targeted_module_names) == sorted(linears)


WRAPPERS = [
    ("swin", "SwinForImageClassification"),
    ("swin", "SwinBackbone"),
    ("swinv2", "Swinv2Backbone"),
    ("swinv2", "Swinv2ForImageClassification"),
    ("pvt", "PvtForImageClassification"),
    ("pvt_v2", "PvtV2Backbone"),
    ("pvt_v2", "PvtV2ForImageClassification"),
    ("segformer", "SegformerForImageClassification"),
]


@pytest.mark.parametrize(("model_type", "cls_name"), WRAPPERS)
def test_wrappers_around_a_supported_backbone(model_type, cls_name):
    import transformers

    core = tiny_backbone(model_type)
    wrapper = getattr(transformers, cls_name)(core.config).eval()
    inner = wrapper.base_model if wrapper.base_model is not wrapper else wrapper
    inner.load_state_dict(core.state_dict(), strict=False)  # the same weights as the reference backbone
    x = pixels()
    expected = reference_stage_features(core, x)
    out = get_peft_model(wrapper, TGLoraConfig(tasks=TASKS, task_groups=TREE, r=4))(x)
    for task in TASKS:
        for got, want in zip(out.task_features[task], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_segformer_decode_head_needs_one_stream():
    # its decode head concatenates all stages, so it runs with the "shared" tree; grouped trees feed task_features
    # to per-task decoders instead (README, "Supported backbones")
    import transformers

    model = transformers.SegformerForSemanticSegmentation(tiny_backbone("segformer").config).eval()
    out = get_peft_model(model, TGLoraConfig(tasks=TASKS, task_groups="shared", r=4))(pixels())
    assert out.logits.shape[0] == 2 and out.task_features["sal"][0].shape[0] == 2


@pytest.mark.parametrize("model_type", ["pvt", "pvt_v2"])
def test_unload_restores_the_encoder_forward(model_type):
    x = pixels()
    model = tglora(model_type)
    plain = model.unload()
    assert "forward" not in vars(plain.encoder)  # the per-stage batch-size forward is gone again
    expected = tiny_backbone(model_type)(x).last_hidden_state
    torch.testing.assert_close(plain(x).last_hidden_state, expected, rtol=0, atol=0)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_layer_against_a_hand_computation(base_dtype):
    from peft_tglora.layer import Linear

    torch.manual_seed(0)
    layer = Linear(
        torch.nn.Linear(8, 6).to(base_dtype), "default", num_groups=3, r=2, lora_alpha=4, init_lora_weights=False
    )
    layer.tglora_A["default"].data = layer.tglora_A["default"].data.float()  # adapters in fp32, as PEFT's autocast
    layer.tglora_B["default"].data = layer.tglora_B["default"].data.float()
    x = torch.randn(3 * 5, 4, 8).to(base_dtype)  # 3 groups of 5 rows, 4 tokens each
    a, b = layer.tglora_A["default"], layer.tglora_B["default"]
    expected = layer.base_layer(x).float()
    for g in range(3):
        expected[g * 5 : (g + 1) * 5] += 2.0 * x[g * 5 : (g + 1) * 5].float() @ a[g].T @ b[g].T
    got = layer(x)
    assert got.dtype == base_dtype
    tol = 1e-5 if base_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
