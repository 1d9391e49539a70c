"""The task table drives decoding, transforms, losses and metrics; checked on hand-made maps and on camvid_mt."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_tglora.tasks import (
    DATASETS,
    TASKS,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    build_dataloaders,
    decode_image,
    decode_label,
    load_multitask_dataset,
    save_multitask_folder,
    task_loss,
)


CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid_mt"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"camvid_mt is not at {CAMVID} (see its README)")


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        # the project's encoding: 0 / 1 with 255 ignored (the old `max > 1` guard turned this into 0, 0, 1)
        (np.array([[0, 1, 255]], np.uint8), [[0.0, 1.0, 255.0]]),
        # soft 8-bit saliency: the field's v / 255 > 0.5, so 128 is positive and 127 is not
        (np.array([[127, 128, 1, 200]], np.uint8), [[0.0, 1.0, 0.0, 1.0]]),
        # 0 / 255 masks: 255 is the positive class
        (np.array([[0, 255]], np.uint8), [[0.0, 1.0]]),
        # 16-bit PNG maps are taken as stored (camvid_mt)
        (np.array([[0, 1, 255]], np.uint16), [[0.0, 1.0, 255.0]]),
    ],
    ids=["01-255", "soft", "0-255", "16bit"],
)
def test_binary_maps_decode_by_their_encoding(stored, expected):
    for task in ("saliency", "edges"):
        torch.testing.assert_close(decode_label(task, stored), torch.tensor(expected))


def test_channels_first_images_and_labels():
    hwc = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    torch.testing.assert_close(decode_image(chw), decode_image(hwc))
    assert decode_image(chw).shape == (3, 2, 5)
    torch.testing.assert_close(decode_label("depth", np.ones((1, 2, 5), np.float32)), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"single-channel.*\(2, 2, 5\)"):
        decode_label("semseg", np.zeros((2, 2, 5), np.uint8))


def test_edge_texture_decodes_camvid_units_and_its_loss_counts_every_pixel():
    label = decode_label("edge_texture", np.array([[0, 255, 51]], np.uint8))
    torch.testing.assert_close(label, torch.tensor([[0.0, 0.10, 0.02]]))
    prediction = torch.tensor([[[[0.05, 0.10, 0.0]]]])
    loss = task_loss("edge_texture", prediction, {"edge_texture": label[None]})
    assert loss.item() == pytest.approx((0.05 + 0.0 + 0.02) / 3)  # the 0 target counts, unlike depth's


def _sample(h=4, w=6):
    torch.manual_seed(0)
    return {
        "image": torch.rand(3, h, w),
        "semseg": torch.randint(0, 3, (h, w)),
        "edge_texture": torch.rand(h, w),
        "normals": torch.nn.functional.normalize(torch.randn(3, h, w), dim=0),
        "id": "frame_0",
    }


def test_flip_and_crop_move_every_task_map():
    sample = _sample()
    flipped = RandomHorizontalFlip(1.0)(sample)
    torch.testing.assert_close(flipped["edge_texture"], sample["edge_texture"].flip(-1))
    torch.testing.assert_close(flipped["semseg"], sample["semseg"].flip(-1))
    torch.testing.assert_close(flipped["normals"][0], -sample["normals"][0].flip(-1))
    assert flipped["id"] == "frame_0"
    generator = torch.Generator().manual_seed(1)
    cropped = RandomCrop((3, 4))(sample, generator)
    # find the window in the image, then check every map was cut at the same place
    image = sample["image"]
    windows = [(t, x) for t in range(2) for x in range(3)]
    top, left = next((t, x) for t, x in windows if torch.equal(image[:, t : t + 3, x : x + 4], cropped["image"]))
    torch.testing.assert_close(cropped["edge_texture"], sample["edge_texture"][top : top + 3, left : left + 4])
    torch.testing.assert_close(cropped["semseg"], sample["semseg"][top : top + 3, left : left + 4])


def test_resize_non_square_and_unknown_maps_are_refused():
    out = Resize((6, 9))(_sample())
    assert {k: tuple(v.shape[-2:]) for k, v in out.items() if k != "id"} == {
        "image": (6, 9),
        "semseg": (6, 9),
        "edge_texture": (6, 9),
        "normals": (6, 9),
    }
    assert set(out["semseg"].unique().tolist()) <= set(range(3))  # nearest: no blended class ids
    with pytest.raises(ValueError, match="'mask'.*no task of that name"):
        RandomHorizontalFlip(1.0)({**_sample(), "mask": torch.zeros(4, 6)})


def test_every_task_round_trips_through_the_local_folder(tmp_path):
    import datasets

    rows = {
        "image": [np.zeros((4, 6, 3), np.uint8)],
        "semseg": [np.array([[1, 2, 255, 0, 0, 0]] * 4, np.uint8)],
        "saliency": [np.array([[0, 1, 255, 0, 0, 0]] * 4, np.uint8)],
        "edges": [np.array([[255, 0, 0, 0, 0, 0]] * 4, np.float32)],  # no positive pixel, one ignored
        "edge_texture": [np.full((4, 6), 0.03, np.float32)],
    }
    tasks = [t for t in rows if t != "image"]
    save_multitask_folder(datasets.Dataset.from_dict(rows), tmp_path, "train", tasks)
    loaded = load_multitask_dataset("camvid", "train", root=tmp_path, tasks=tasks)
    for task in tasks:
        expected = decode_label(task, rows[task][0])
        torch.testing.assert_close(decode_label(task, loaded[0][task]), expected)
    assert decode_label("edges", loaded[0]["edges"])[0, 0] == 255  # still ignored, not read as a positive


def test_every_task_has_a_complete_entry():
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.kind in ("classification", "binary", "regression")
        assert spec.map_rule.interpolation in ("nearest", "bilinear", "normals")
        assert spec.suffixes and all(s.startswith(".") for s in spec.suffixes)


def test_metric_direction_follows_the_metric():
    # the directions the table stated by hand before they were read from metrics.core.HIGHER_IS_BETTER
    stated = {"semseg": True, "human_parts": True, "saliency": True, "normals": False, "depth": False,
              "edges": True, "edge_texture": False}  # fmt: skip
    assert {name: spec.higher_is_better for name, spec in TASKS.items()} == stated
    with pytest.raises(ValueError, match="metric 'accuracy' has no direction.*HIGHER_IS_BETTER"):
        dataclasses.replace(TASKS["semseg"], metric="accuracy")


@needs_camvid
def test_camvid_loads_all_tasks_at_its_own_size():
    spec = DATASETS["camvid"]
    train = load_multitask_dataset("camvid", "train", root=CAMVID)
    assert len(train) == len((CAMVID / "train.txt").read_text().split()) == 367
    loader, _ = build_dataloaders(
        train.select(range(4)), train.select(range(2)), spec.tasks, image_size=(120, 160), batch_size=2
    )
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 120, 160)
    assert set(batch["semseg"].unique().tolist()) <= set(range(11)) | {255}
    for task in ("edges", "saliency"):
        assert set(batch[task].unique().tolist()) <= {0.0, 1.0, 255.0}
    texture = batch["edge_texture"]
    assert texture.min() >= 0 and texture.max() <= 0.10 + 1e-6
    # the stored mean (stats_train.json: 0.0139 over the split) is of the order the README gives
    assert 0.0 < texture.mean().item() < 0.05
    assert not math.isnan(texture.sum().item())


def test_training_options_pascal_edges_and_augmentation_choice():
    from peft_tglora.tasks import options
    from peft_tglora.tasks.transforms import RandomScaleRotate

    assert options.parse_tasks(None, "pascal_context") == ["semseg", "human_parts", "saliency", "normals"]
    assert options.parse_tasks("semseg,edges", "pascal_context") == ["semseg", "edges"]  # PASCAL_MT ships edges
    with pytest.raises(ValueError, match="edge_texture"):
        options.parse_tasks("edge_texture", "pascal_context")
    (pascal,) = options.augmentation("reference", "pascal_context")
    assert isinstance(pascal, RandomScaleRotate) and (pascal.scales, pascal.rotations) == ((0.75, 1.25), (-20.0, 20.0))
    assert options.augmentation("reference", "camvid") == []  # no reference recipe: flip only
    (borrowed,) = options.augmentation("scale_rotate", "camvid")
    assert (borrowed.scales, borrowed.rotations) == ((0.75, 1.25), (-20.0, 20.0))
    assert options.augmentation("flip", "nyud") == []
