"""The library pieces of the training workflow: multi-task model and heads I/O, seeded data, model card, Hub push."""

import logging

import huggingface_hub
import pytest
import torch
from backbones import tiny_backbone
from peft import get_peft_model

from peft_tglora import TGLoraConfig
from peft_tglora.tasks import make_synthetic_multitask, train_transforms
from peft_tglora.tasks.hub import PUSH_IGNORE, model_card, push_folder, tree_table, write_model_card
from peft_tglora.tasks.model import (
    TaskHeads,
    build_backbone,
    build_multitask_model,
    drop_frozen_weights,
    load_multitask_model,
    stage_channels,
)
from peft_tglora.tasks.options import parse_image_size, parse_loss_weights, parse_tasks
from peft_tglora.tasks.training_data import SeededMultiTaskDataset


TASKS = ["semseg", "saliency", "normals"]
TREE = [[TASKS], [TASKS], [["semseg"], ["saliency", "normals"]], [["semseg"], ["saliency"], ["normals"]]]


@pytest.fixture
def model():
    backbone = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=TASKS, task_groups=TREE, r=2))
    model = build_multitask_model(backbone, TASKS, "synthetic", 64, "tiny", head_width=4, hidden_channels=8)
    return model, stage_channels(backbone, 64)


def test_multitask_model_predicts_every_task_at_input_size(model):
    model, channels = model
    assert channels == [8, 16, 32, 64]  # the tiny Swin's stage widths, read from a forward pass
    outputs = model(torch.randn(2, 3, 64, 64))
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {
        "semseg": (2, 4, 64, 64),
        "saliency": (2, 1, 64, 64),
        "normals": (2, 3, 64, 64),
    }


def test_heads_round_trip_through_the_hub_mixin(model, tmp_path):
    model, channels = model
    for p in model.heads.parameters():
        torch.nn.init.normal_(p)
    model.heads.save_pretrained(tmp_path)
    heads = TaskHeads.from_pretrained(tmp_path)
    assert heads.info == model.heads.info and heads.info["num_classes"] == {"semseg": 4}
    assert heads.info["image_size"] == 64 and heads.info["tasks"] == TASKS
    x = [torch.randn(1, c, 16 // 2**s, 16 // 2**s) for s, c in enumerate(channels)]  # stage maps of a 64 px image
    for task in TASKS:
        torch.testing.assert_close(heads[task].eval()(x), model.heads[task].eval()(x), rtol=0, atol=0)


def test_load_names_the_missing_heads(model, tmp_path):
    model[0].backbone.save_pretrained(tmp_path)  # an adapter without heads
    with pytest.raises(FileNotFoundError, match="heads.*without its task heads"):
        load_multitask_model(tmp_path)


def test_seeded_dataset_depends_only_on_seed_epoch_and_index():
    rows = make_synthetic_multitask(4, 32, ["semseg"], seed=0)
    data = SeededMultiTaskDataset(rows, ["semseg"], train_transforms(32, crop=24), seed=7)
    first = data[2]["pixel_values"]
    torch.rand(5)  # the global RNG does not matter
    data[1]
    torch.testing.assert_close(data[2]["pixel_values"], first, rtol=0, atol=0)
    crops = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        crops.add(tuple(data[2]["pixel_values"].flatten()[:8].tolist()))
    assert len(crops) > 1, "augmentation must change from epoch to epoch"


def test_backbone_overrides_apply_to_the_tiny_swin_only():
    assert build_backbone("tiny-swin", 64, {"embed_dim": 8}).config.embed_dim == 8
    with pytest.raises(ValueError, match="only apply to 'tiny-swin'"):
        build_backbone("microsoft/swin-tiny-patch4-window7-224", 224, {"embed_dim": 8})


CARD = dict(
    repo_id="me/tglora", tasks=TASKS, task_groups=TREE, r=8, backbone="microsoft/swin-tiny-patch4-window7-224",
    dataset="pascal_context", image_size=448, metrics={"semseg": {"mIoU": 67.5}, "normals": {"mean_angular_error": 16.9}},
    delta_m=3.2, training={"r": 8},
)  # fmt: skip


def test_model_card_names_tasks_tree_metrics_and_loading():
    card = model_card(**CARD)
    assert card.data.base_model == "microsoft/swin-tiny-patch4-window7-224" and card.data.library_name == "peft"
    assert {"tglora", "pascal_context"} <= set(card.data.tags)
    text = str(card)
    assert "| 2 | 2 | {semseg} {saliency, normals} |" in text
    assert "```mermaid\nflowchart LR" in text  # the tree as a picture the Hub draws
    assert "| semseg | mIoU | **67.5** |" in text and "| normals | mean_angular_error | **16.9** |" in text
    assert "+3.20%" in text and "import peft_tglora" in text
    assert 'PeftModel.from_pretrained(base, "me/tglora")' in text
    local = model_card(**{**CARD, "repo_id": None, "backbone": "tiny-swin", "image_size": [48, 64]},
                       base_model_included=True)  # fmt: skip
    assert local.data.base_model is None and 'subfolder="base_model"' in str(local) and "48x64 px" in str(local)


def test_model_card_extends_the_card_peft_wrote(model, tmp_path):
    model[0].backbone.save_pretrained(tmp_path)
    peft_card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    peft_lines = [line for line in peft_card.text.splitlines() if line.startswith("- PEFT ")]
    assert peft_lines  # PEFT's own record of its version
    write_model_card(tmp_path, **CARD)
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert set(peft_card.data.tags or []) <= set(card.data.tags) and "tglora" in card.data.tags
    write_model_card(tmp_path, **{**CARD, "backbone": "tiny-swin"}, base_model_included=True)
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and not [t for t in card.data.tags if t.startswith("base_model:")]
    assert all(line in card.text.splitlines() for line in peft_lines) and "# TGLoRA adapter" in card.text


def test_tree_table():
    assert tree_table([[["a", "b"]], [["a"], ["b"]]]).splitlines()[2:] == ["| 0 | 1 | {a, b} |", "| 1 | 2 | {a} {b} |"]


def test_push_uploads_the_folder_without_checkpoints(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.update(repo=repo_id))
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: (
            calls.update(upload=kw) or type("Commit", (), {"commit_url": "https://hf.co/me/x/commit/1"})
        ),
    )
    assert push_folder(tmp_path, "me/x") == "https://hf.co/me/x/commit/1"
    assert calls["repo"] == "me/x" and calls["upload"]["ignore_patterns"] == PUSH_IGNORE
    assert calls["upload"]["folder_path"] == str(tmp_path)


def test_failed_push_returns_none_keeps_files_and_says_how_to_retry(tmp_path, monkeypatch, caplog):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")

    def refuse(self, *args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with caplog.at_level(logging.ERROR, logger="peft_tglora.tasks.hub"):
        assert push_folder(tmp_path, "me/x") is None
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"weights"
    message = caplog.records[-1].getMessage()
    assert "OfflineModeIsEnabled" in message and str(tmp_path.resolve()) in message and "hf upload me/x" in message


def test_checkpoint_hook_drops_frozen_weights_also_under_ddp_names(model):
    model, _ = model
    hook = drop_frozen_weights(model)
    state = model.state_dict()
    ddp_state = {f"module.{k}": v for k, v in state.items()}
    hook([model], [state, ddp_state], "unused")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()} & set(model.state_dict())  # persistent ones
    assert set(state) == trainable | buffers and {k.removeprefix("module.") for k in ddp_state} == set(state)
    assert any("running_mean" in k for k in state)  # the heads' norm statistics are kept


def test_task_options_name_the_known_tasks():
    assert parse_image_size("224") == 224 and parse_image_size("120,160") == [120, 160]
    with pytest.raises(ValueError, match="one side or H,W"):
        parse_image_size("120x160")
    assert parse_tasks(None, "synthetic")[:2] == ["semseg", "human_parts"]
    assert parse_loss_weights("normals=10", "pascal_context", ["semseg", "normals"]) == {
        "semseg": 1.0,
        "normals": 10.0,
    }
    with pytest.raises(ValueError, match=r"'normal', which is not one of the tasks \['semseg', 'normals'\]"):
        parse_loss_weights("normal=10", "pascal_context", ["semseg", "normals"])
    with pytest.raises(ValueError, match="finite number"):
        parse_loss_weights("normals=nan", "pascal_context", ["normals"])
