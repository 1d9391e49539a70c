"""Every bad input fails before any weight changes, with a message that names the value and the fix."""

import pytest
import torch
from backbones import tiny_backbone
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from peft_tglora import TGLoraConfig


TASKS = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task_groups=[[["a", "b", "x"]]]), r"Unknown task 'x' in stage 0.*known tasks are \['a', 'b', 'c'\]"),
        (dict(task_groups=[[["a", "b", "c"]], [["a"], ["b"]]]), r"Stage 1 .* missing tasks \['c'\]"),
        (
            dict(task_groups=[[["a", "b"], ["c"]], [["a"], ["b", "c"]]]),
            r"Stage 1 group \['b', 'c'\] is not a refinement of stage 0",
        ),
        (dict(task_groups=[[["a", "b", "c"]], [["a", "a"], ["b", "c"]]]), r"Task 'a' appears twice in stage 1"),
        (dict(task_groups="1,2,1"), r"counts \[1, 2, 1\] decrease at stage 2"),
        (dict(task_groups="1,4"), r"Stage 1 asks for 4 groups, but there are 3 tasks"),
        (dict(task_groups="two"), r"neither a preset .* nor comma-separated group counts"),
        (dict(r=0), r"`r` must be a positive integer, got 0"),
        (dict(r=-4), r"`r` must be a positive integer, got -4"),
        (dict(lora_dropout=1.5), r"`lora_dropout` must be in \[0, 1\), got 1.5"),
        (dict(tasks=["a", "a"]), r"`tasks` lists \['a'\] more than once"),
        (dict(tasks=[]), r"`tasks` is empty"),
    ],
)
def test_bad_config(kwargs, match):
    kwargs = {"tasks": TASKS, "task_groups": "shared", **kwargs}
    with pytest.raises(ValueError, match=match):
        TGLoraConfig(**kwargs)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys(), "modules were replaced"
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task_groups="1,1,2,3,3"), r"gives 5 stages, but SwinModel \(swin\) has 4"),
        (dict(task_groups=[1, 2]), r"gives 2 stages, but SwinModel \(swin\) has 4"),
        (dict(target_modules=["qkv"]), r"matches no module of SwinModel.*attention\.q_proj"),
        (dict(target_modules=["projection"]), r"a Conv2d; TGLoRA adapts `nn.Linear` only"),
    ],
)
def test_bad_config_for_the_backbone_changes_nothing(kwargs, match):
    base = tiny_backbone("swin")
    before = state(base)
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, TGLoraConfig(**{"tasks": TASKS, "r": 4, **kwargs}))
    assert_untouched(base, before)


def test_target_outside_the_stages():
    from transformers import SwinForImageClassification

    model = SwinForImageClassification(tiny_backbone("swin").config)
    before = state(model)
    with pytest.raises(ValueError, match=r"'classifier' matches `target_modules` but lies outside every stage"):
        get_peft_model(model, TGLoraConfig(tasks=TASKS, r=4, target_modules=["mlp.fc1", "classifier"]))
    assert_untouched(model, before)


def test_unsupported_architecture():
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
    with pytest.raises(ValueError, match=r"does not know the architecture 'bert'.*register_backbone"):
        get_peft_model(bert, TGLoraConfig(tasks=TASKS, r=4))


def test_loading_into_a_backbone_of_other_shape(tmp_path):
    model = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=TASKS, task_groups="1,1,2,3", r=4))
    model.save_pretrained(tmp_path)
    other = tiny_backbone("swin")
    wider = type(other)(type(other.config)(**{**other.config.to_dict(), "embed_dim": 16}))
    with pytest.raises(
        ValueError, match=r"has shape \(1, 4, 8\), but this backbone needs \(1, 4, 16\).*same backbone"
    ):
        PeftModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    from safetensors import SafetensorError

    model = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=TASKS, task_groups="1,1,2,3", r=4))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    base = tiny_backbone("swin")
    before = [(p, p.detach().clone()) for p in base.parameters()]
    with pytest.raises(SafetensorError, match=r"Error while deserializing header"):  # safetensors' own message
        PeftModel.from_pretrained(base, tmp_path)
    for param, value in before:  # the base weights are as they were
        torch.testing.assert_close(param.detach(), value, rtol=0, atol=0)


def test_plain_lora_is_unaffected_by_the_registration():
    model = get_peft_model(tiny_backbone("swin"), LoraConfig(r=2, target_modules=["mlp.fc1"]))
    assert model.peft_config["default"].peft_type == "LORA"
