"""The library pieces of the training workflow: heads I/O, seeded data, digests, checkpoints, model card, Hub push."""

import logging

import huggingface_hub
import pytest
import torch
from backbones import tiny_backbone
from peft import get_peft_model

from peft_tglora import TGLoraConfig
from peft_tglora.hub import PUSH_IGNORE, model_card, push_folder, tree_table
from peft_tglora.tasks import build_heads, make_synthetic_multitask, train_transforms
from peft_tglora.tasks.training_data import SeededMultiTaskDataset
from peft_tglora.training import (
    MultiTaskModel,
    build_backbone,
    drop_frozen_weights,
    load_heads,
    save_heads,
    stage_channels,
    weights_digest,
)


TASKS = ["semseg", "saliency", "normals"]
TREE = [[TASKS], [TASKS], [["semseg"], ["saliency", "normals"]], [["semseg"], ["saliency"], ["normals"]]]


@pytest.fixture
def model():
    backbone = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=TASKS, task_groups=TREE, r=2))
    channels = stage_channels(backbone, 64)
    heads = build_heads(TASKS, channels, dataset="synthetic", channels=[4, 4, 4, 4], hidden_channels=8)
    return MultiTaskModel(backbone, heads), channels


def test_multitask_model_predicts_every_task_at_input_size(model):
    model, channels = model
    assert channels == [8, 16, 32, 64]  # the tiny Swin's stage widths, read from a forward pass
    outputs = model(torch.randn(2, 3, 64, 64))
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {
        "semseg": (2, 4, 64, 64),
        "saliency": (2, 1, 64, 64),
        "normals": (2, 3, 64, 64),
    }


def test_heads_round_trip(model, tmp_path):
    model, channels = model
    for p in model.heads.parameters():
        torch.nn.init.normal_(p)
    config = {"in_channels": channels, "num_outputs": {"semseg": 4, "saliency": 1, "normals": 3},
              "head_kwargs": {"channels": [4, 4, 4, 4], "hidden_channels": 8}}  # fmt: skip
    save_heads(model.heads, config, tmp_path)
    heads, loaded_config = load_heads(tmp_path)
    assert loaded_config == config
    x = [torch.randn(1, c, 16 // 2**s, 16 // 2**s) for s, c in enumerate(channels)]  # stage maps of a 64 px image
    for task in TASKS:
        torch.testing.assert_close(heads[task].eval()(x), model.heads[task].eval()(x), rtol=0, atol=0)


def test_load_heads_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="heads_config.json.*without its task heads"):
        load_heads(tmp_path)


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


def test_weights_digest_sees_one_changed_value(model):
    model, _ = model
    before = weights_digest(model)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] += 1e-7
    assert weights_digest(model) != before
    assert weights_digest(model, trainable_only=False) != weights_digest(model)


def test_backbone_overrides_apply_to_the_tiny_swin_only():
    assert build_backbone("tiny-swin", 64, {"embed_dim": 8}).config.embed_dim == 8
    with pytest.raises(ValueError, match="only apply to 'tiny-swin'"):
        build_backbone("microsoft/swin-tiny-patch4-window7-224", 224, {"embed_dim": 8})


def test_model_card_names_tasks_tree_metrics_and_loading():
    card = model_card(
        repo_id="me/tglora", tasks=TASKS, task_groups=TREE, r=8, backbone="microsoft/swin-tiny-patch4-window7-224",
        dataset="pascal_context", image_size=448, metrics={"semseg": {"mIoU": 67.5}, "normals": {"mean_angular_error": 16.9}},
        primary={"semseg": "mIoU"}, delta_m=3.2, training={"r": 8},
    )  # fmt: skip
    assert card.startswith("---\nbase_model: microsoft/swin-tiny-patch4-window7-224\n")
    assert "| 2 | 2 | {semseg} {saliency, normals} |" in card
    assert "```mermaid\nflowchart LR" in card  # the tree as a picture the Hub draws
    assert "| semseg | mIoU | **67.5** |" in card and "| normals | mean_angular_error | 16.9 |" in card
    assert "+3.20%" in card and "import peft_tglora" in card
    assert 'PeftModel.from_pretrained(base, "me/tglora")' in card
    local = model_card(repo_id=None, tasks=TASKS, task_groups=TREE, r=8, backbone="tiny-swin", dataset="synthetic",
                       image_size=64, base_model_included=True)  # fmt: skip
    assert "base_model:" not in local.split("---")[1] and 'subfolder="base_model"' in local


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
    with caplog.at_level(logging.ERROR, logger="peft_tglora.hub"):
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
