"""Heads and losses of `peft_tglora.tasks`: shapes, parameter counts, hand-computed loss values, and learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from peft_tglora.tasks import (
    MultiScaleHead,
    build_head,
    build_loss,
    default_loss_weights,
    multitask_loss,
    num_outputs_for,
    task_loss,
)


IN_CHANNELS = [8, 16, 32, 64]


def _features(batch=2, size=16, channels=IN_CHANNELS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, c, size // 2**s, size // 2**s, generator=g) for s, c in enumerate(channels))


@pytest.mark.parametrize(
    ("task", "dataset", "channels"),
    [("semseg", "pascal_context", 21), ("semseg", "nyud", 40), ("human_parts", "pascal_context", 7),
     ("saliency", None, 1), ("normals", None, 3), ("depth", None, 1), ("edges", None, 1)],
)  # fmt: skip
def test_head_output_shapes(task, dataset, channels):
    head = build_head(task, IN_CHANNELS, dataset=dataset).eval()
    out = head(_features())
    assert out.shape == (2, channels, 16, 16)  # resolution of the first stage
    assert head(_features(), output_size=(64, 48)).shape == (2, channels, 64, 48)


def test_default_head_has_mtlora_parameter_count():
    # MTLoRA: 1x1 downsampler (no bias) to 18/36/72/144, 1x1 conv 270 -> 1080 (+bias), BN(1080), 1x1 conv 1080 -> K
    widths, k = [96, 192, 384, 768], 21
    expected = sum(c * r for c, r in zip(widths, [18, 36, 72, 144])) + 270 * 1080 + 1080 + 2 * 1080 + 1080 * k + k
    head = MultiScaleHead(widths, k)
    assert sum(p.numel() for p in head.parameters()) == expected


def test_head_kernel3_group_norm_runs_on_batch_of_one():
    head = MultiScaleHead([4, 8], 2, channels=[4, 4], hidden_channels=16, kernel_size=3, norm="group").train()
    assert head(_features(batch=1, channels=[4, 8])).shape == (1, 2, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": [8, 16], "num_outputs": 2, "channels": [4]}, "one width per stage"),
        ({"in_channels": [8], "num_outputs": 2, "kernel_size": 5}, "kernel_size must be 1"),
        ({"in_channels": [8], "num_outputs": 2, "norm": "layer"}, "norm must be"),
        ({"in_channels": [], "num_outputs": 2}, "non-empty"),
    ],
    ids=["channels-length", "kernel", "norm", "empty"],
)
def test_head_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleHead(**kwargs)


def test_head_rejects_token_sequences_with_a_hint():
    head = MultiScaleHead([8], 2)
    with pytest.raises(ValueError, match=r"reshape token sequences"):
        head((torch.randn(2, 16, 8),))


def test_classification_head_needs_class_count():
    with pytest.raises(ValueError, match="pass dataset="):
        build_head("semseg", IN_CHANNELS)
    assert num_outputs_for("semseg", num_classes=5) == 5
    with pytest.raises(ValueError, match="Unknown task 'depht'"):
        num_outputs_for("depht")


def test_cross_entropy_ignores_255():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # [1, 2, 1, 2]
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))  # only the first pixel counts
    assert build_loss("semseg")(logits, target).item() == pytest.approx(expected)


def test_balanced_bce_hand_computed():
    logits = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[1.0, 0.0, 0.0, 255.0]]])  # 1 positive, 2 negatives, 1 ignored
    # saliency: w = negative fraction = 2/3; loss = (w*log2 + 2*(1-w)*log2) / 3
    w = 2 / 3
    assert build_loss("saliency")(logits, target).item() == pytest.approx((w + 2 * (1 - w)) * math.log(2) / 3)
    # edges: fixed w = 0.95
    assert build_loss("edges")(logits, target).item() == pytest.approx((0.95 + 2 * 0.05) * math.log(2) / 3)


def test_normals_loss_normalises_prediction_and_masks_invalid():
    target = torch.zeros(1, 3, 1, 2)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # pixel 1 invalid (zero)
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 7.0])  # right direction, wrong length
    pred[0, :, 0, 1] = torch.tensor([1.0, 1.0, 1.0])  # invalid pixel: ignored
    assert build_loss("normals")(pred, target).item() == pytest.approx(0.0)
    pred[0, :, 0, 0] = torch.tensor([3.0, 0.0, 0.0])  # unit x vs unit z: |1| + |0| + |-1| over 3 channels
    assert build_loss("normals")(pred, target).item() == pytest.approx(2 / 3)


def test_depth_loss_on_valid_pixels():
    pred = torch.tensor([[[[1.0, 1.0, 5.0]]]])
    target = torch.tensor([[[2.0, 4.0, 0.0]]])
    assert build_loss("depth")(pred, target).item() == pytest.approx((1 + 3) / 2)


def test_loss_without_valid_pixels_is_zero_with_gradient():
    pred = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = build_loss("depth")(pred, torch.zeros(1, 2, 2))
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


def test_task_loss_requires_label_resolution():
    with pytest.raises(ValueError, match="output_size=label.shape"):
        task_loss("depth", torch.zeros(1, 1, 4, 4), {"depth": torch.ones(1, 8, 8)})
    with pytest.raises(KeyError, match="no label for task 'depth'"):
        task_loss("depth", torch.zeros(1, 1, 4, 4), {"semseg": torch.ones(1, 4, 4)})


def test_multitask_loss_is_weighted_sum():
    batch = {"depth": torch.full((1, 2, 2), 2.0), "semseg": torch.zeros(1, 2, 2, dtype=torch.long)}
    preds = {"depth": torch.ones(1, 1, 2, 2), "semseg": torch.zeros(1, 3, 2, 2)}
    weights = {"depth": 1.0, "semseg": 2.0}
    total, per_task = multitask_loss(preds, batch, weights)
    assert per_task["depth"].item() == pytest.approx(1.0)
    assert per_task["semseg"].item() == pytest.approx(math.log(3))
    assert total.item() == pytest.approx(1.0 + 2 * math.log(3))
    with pytest.raises(ValueError, match="No loss weight for tasks"):
        multitask_loss(preds, batch, {"depth": 1.0})


def test_default_loss_weights_follow_mtlora_pascal_recipe():
    assert default_loss_weights("pascal_context") == {"semseg": 1, "human_parts": 2, "saliency": 5, "normals": 10}


def test_heads_learn_synthetic_tasks():
    """A tiny conv encoder + heads trained for 40 steps on synthetic data lowers every task's loss."""
    from peft_tglora.tasks import collate, decode_example, make_synthetic_multitask, transforms

    tasks = ["semseg", "saliency", "normals", "depth"]
    data = make_synthetic_multitask(16, 32, tasks, seed=0)
    norm = transforms.Normalize()
    batch = collate([norm(decode_example(data[i], tasks)) for i in range(len(data))])
    torch.manual_seed(0)
    encoder = torch.nn.ModuleList(
        [torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    )
    heads = torch.nn.ModuleDict(
        {
            t: build_head(t, [8, 16], dataset="synthetic", channels=[8, 8], hidden_channels=32, norm="group")
            for t in tasks
        }
    )
    opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=3e-3)

    def losses():
        x, feats = batch["pixel_values"], []
        for conv in encoder:
            x = F.relu(conv(x))
            feats.append(x)
        preds = {t: heads[t](feats, output_size=(32, 32)) for t in tasks}
        return multitask_loss(preds, batch)

    _, before = losses()
    for _ in range(40):
        opt.zero_grad()
        losses()[0].backward()
        opt.step()
    _, after = losses()
    for t in tasks:
        assert after[t] < 0.8 * before[t], (t, before[t].item(), after[t].item())
