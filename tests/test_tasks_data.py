"""Data of `peft_tglora.tasks`: synthetic generator, label decoding, paired transforms, loaders and batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from peft_tglora.tasks import (
    IGNORE_INDEX,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    build_dataloaders,
    collate,
    decode_example,
    decode_label,
    load_multitask_dataset,
    make_synthetic_multitask,
    save_multitask_folder,
)


ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "depth", "edges"]


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_multitask(6, 16, ALL_TASKS, seed=3)


def _sample(dataset, i=0):
    return decode_example(dataset[i], ALL_TASKS)


def test_synthetic_is_seeded_and_consistent(synthetic):
    again = make_synthetic_multitask(6, 16, ALL_TASKS, seed=3)
    other = make_synthetic_multitask(6, 16, ALL_TASKS, seed=4)
    a, b, c = _sample(synthetic), _sample(again), _sample(other)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(a["image"], c["image"])
    for i in range(len(synthetic)):
        s = _sample(synthetic, i)
        torch.testing.assert_close(s["saliency"], (s["semseg"] > 0).float())
        assert s["semseg"].max() < 4 and s["human_parts"].max() < 4
        assert ((s["human_parts"] > 0) <= (s["semseg"] == 1)).all()  # parts only on "person" shapes
        norm = s["normals"].norm(dim=0)
        assert torch.allclose(norm[norm > 0], torch.ones(()), atol=1e-5) and (norm == 0).any()
        assert (s["depth"] > 0).all()
        # an edge pixel is one whose right neighbour has another class, among others
        boundary = s["semseg"][:, :-1] != s["semseg"][:, 1:]
        assert (s["edges"][:, :-1][boundary] == 1).all()


@pytest.mark.parametrize(
    ("task", "stored", "expected"),
    [
        ("saliency", np.array([[0, 255]], np.uint8), torch.tensor([[0.0, 1.0]])),
        ("saliency", np.array([[0, 1]], np.uint8), torch.tensor([[0.0, 1.0]])),
        ("edges", np.array([[1.0, 255.0]], np.float32), torch.tensor([[1.0, 255.0]])),  # arrays keep ignore
        ("depth", np.array([[1500, 0]], np.uint16), torch.tensor([[1.5, 0.0]])),  # PNG millimetres -> metres
        ("depth", np.array([[1.5, 0.0]], np.float32), torch.tensor([[1.5, 0.0]])),
        ("semseg", np.array([[3, 255]], np.uint8), torch.tensor([[3, 255]])),
    ],
    ids=["sal-255", "sal-01", "edges-array", "depth-mm", "depth-m", "semseg"],
)
def test_decode_label_encodings(task, stored, expected):
    torch.testing.assert_close(decode_label(task, stored), expected)


def test_decode_normals_png_and_arrays():
    rgb = np.array([[[128, 128, 255], [0, 0, 0], [128, 128, 128]]], np.uint8)  # +z, invalid, invalid
    n = decode_label("normals", Image.fromarray(rgb))
    assert n.shape == (3, 1, 3)
    torch.testing.assert_close(n[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-2, rtol=0)
    assert (n[:, 0, 1:] == 0).all()
    hwc = np.zeros((2, 4, 3), np.float32)
    hwc[..., 0] = 1.0
    chw = decode_label("normals", hwc)
    assert chw.shape == (3, 2, 4) and (chw[0] == 1).all()


def test_flip_negates_normals_x_and_flips_all_maps():
    sample = {
        "image": torch.arange(6.0).view(1, 2, 3).expand(3, 2, 3),
        "semseg": torch.tensor([[0, 1, 2], [3, 4, 5]]),
        "normals": torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.0], [0.8, 1.0, 0.0]]).view(3, 1, 3).expand(3, 2, 3),
        "depth": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        "id": "kept",
    }
    out = RandomHorizontalFlip(p=1.0)(sample)
    assert out["semseg"].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert out["depth"].tolist() == [[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]
    assert out["image"][0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert out["normals"][:, 0, 2].tolist() == pytest.approx([-0.6, 0.0, 0.8])  # x sign flipped
    assert out["normals"][:, 0, 0].tolist() == [0.0, 0.0, 0.0]  # invalid stays zero
    assert out["id"] == "kept"
    assert RandomHorizontalFlip(p=0.0)(sample)["semseg"].tolist() == sample["semseg"].tolist()


def test_resize_keeps_label_values_and_unit_normals(synthetic):
    s = _sample(synthetic)
    out = Resize((24, 20))(s)
    assert out["image"].shape == (3, 24, 20) and out["semseg"].shape == (24, 20)
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert out["semseg"].dtype == torch.long
    assert set(out["saliency"].unique().tolist()) <= {0.0, 1.0}
    norm = out["normals"].norm(dim=0)
    assert torch.allclose(norm[norm > 0], torch.ones(()), atol=1e-5)


def test_random_crop_uses_one_window_and_pads_with_ignore():
    h, w = 5, 7
    coords = torch.arange(h * w, dtype=torch.float32).view(h, w)
    sample = {"image": coords.expand(3, h, w), "depth": coords + 1, "semseg": (coords % 3).long()}
    out = Compose([RandomCrop((4, 4))], seed=0)(sample)
    torch.testing.assert_close(out["depth"], out["image"][0] + 1)
    torch.testing.assert_close(out["semseg"], (out["image"][0] % 3).long())
    padded = RandomCrop((8, 9))(sample, torch.Generator().manual_seed(0))
    assert padded["semseg"].shape == (8, 9)
    assert (padded["semseg"][5:] == IGNORE_INDEX).all() and (padded["depth"][:, 7:] == 0).all()


def test_seeded_compose_repeats():
    sample = {"image": torch.rand(3, 8, 8), "depth": torch.rand(8, 8)}
    make = lambda: Compose([RandomCrop(4), RandomHorizontalFlip()], seed=7)  # noqa: E731
    a, b = make(), make()
    for _ in range(3):
        torch.testing.assert_close(a(sample)["depth"], b(sample)["depth"])


def test_collate_stacks_and_reports_size_mismatch():
    batch = collate([{"x": torch.zeros(2, 2)}, {"x": torch.ones(2, 2)}])
    assert batch["x"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match="Resize / RandomCrop"):
        collate([{"x": torch.zeros(2, 2)}, {"x": torch.ones(3, 2)}])


def test_local_folder_round_trip(synthetic, tmp_path):
    save_multitask_folder(synthetic, tmp_path, "val", ALL_TASKS)
    loaded = load_multitask_dataset("pascal_context", "val", root=tmp_path, tasks=ALL_TASKS)
    assert len(loaded) == len(synthetic) and loaded.column_names == ["id", "image", *ALL_TASKS]
    a, b = _sample(synthetic, 2), decode_example(loaded[2], ALL_TASKS)
    for key in ALL_TASKS:
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(a["image"], b["image"], atol=1 / 255, rtol=0)


def test_local_folder_errors(synthetic, tmp_path):
    with pytest.raises(ValueError, match="none of the known layouts.*images/<id>.jpg"):
        load_multitask_dataset("nyud", "train", root=tmp_path)
    split = save_multitask_folder(synthetic, tmp_path, "train", ["semseg", "depth"])
    (split / "depth" / "0.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 6 images have no depth label"):
        load_multitask_dataset("nyud", "train", root=tmp_path, tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match="not bundled"):
        load_multitask_dataset("nyud", "train")


def test_hub_path_with_local_parquet_copy(synthetic, tmp_path):
    # the layout `push_to_hub` writes; load_dataset(<folder>) reads it like a Hub id
    (tmp_path / "data").mkdir()
    synthetic.rename_column("depth", "depth_map").to_parquet(tmp_path / "data" / "val-00000-of-00001.parquet")
    loaded = load_multitask_dataset(
        "nyud", "val", hub_id=str(tmp_path), tasks=["semseg", "depth"], column_map={"depth_map": "depth"}
    )
    assert loaded.column_names == ["image", "semseg", "depth"]
    torch.testing.assert_close(decode_example(loaded[1], ["depth"])["depth"], _sample(synthetic, 1)["depth"])
    with pytest.raises(ValueError, match="column_map"):
        load_multitask_dataset("nyud", "val", hub_id=str(tmp_path), tasks=["depth"])


def test_build_dataloaders_batches(synthetic):
    train, val = build_dataloaders(synthetic, synthetic, ALL_TASKS, image_size=12, batch_size=4, crop=8)
    batch = next(iter(train))
    assert set(batch) == {"pixel_values", *ALL_TASKS}
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["semseg"].dtype == torch.long and batch["semseg"].shape == (4, 8, 8)
    assert batch["normals"].shape == (4, 3, 8, 8) and batch["depth"].shape == (4, 8, 8)
    assert len(train) == 1  # drop_last with 6 rows and batch 4
    sizes = [b["semseg"].shape[0] for b in val]
    assert sizes == [4, 2] and next(iter(val))["pixel_values"].shape[-2:] == (12, 12)


def _batches(loader) -> list[dict]:
    return [dict(batch) for batch in loader]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_build_dataloaders_repeat_for_a_seed_whatever_the_global_rng_workers_and_cache(synthetic):
    from peft_tglora.tasks.transforms import RandomScaleRotate

    kwargs = dict(image_size=12, batch_size=2, crop=10, augment=[RandomScaleRotate()])
    torch.manual_seed(0)
    first = _batches(build_dataloaders(synthetic, synthetic, ALL_TASKS, seed=5, **kwargs)[0])
    torch.manual_seed(1)  # augmentation draws nothing from the global RNG, nor from per-worker seeds
    again = _batches(
        build_dataloaders(synthetic, synthetic, ALL_TASKS, seed=5, num_workers=2, cache=True, **kwargs)[0]
    )
    assert len(first) == 3 and _same(first, again)
    other = _batches(build_dataloaders(synthetic, synthetic, ALL_TASKS, seed=6, **kwargs)[0])
    assert not _same(first, other)


def test_build_dataloaders_flip_follows_row_and_epoch_and_eval_is_not_augmented(synthetic):
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def reference(i, flipped):  # by hand: the stored row (already 16 px), mirrored or not, normalised
        sample = _sample(synthetic, i)
        if flipped:
            sample = {k: v.flip(-1) for k, v in sample.items()}
            sample["normals"] = sample["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
        sample["pixel_values"] = (sample.pop("image") - mean) / std
        return sample

    def matches(sample, ref):
        return sample.keys() == ref.keys() and all(torch.equal(sample[k], ref[k]) for k in ref)

    rows = range(len(synthetic))
    references = {(i, f): reference(i, f) for i in rows for f in (False, True)}
    train, val = build_dataloaders(synthetic, synthetic, ALL_TASKS, image_size=16, batch_size=3, seed=2)

    def flips(epoch):  # per row: mirrored or not in `epoch`; a sample that is neither fails
        train.dataset.set_epoch(epoch)
        found = [[f for f in (False, True) if matches(train.dataset[i], references[i, f])] for i in rows]
        assert all(len(f) == 1 for f in found), found
        return tuple(f for (f,) in found)

    per_epoch = [flips(epoch) for epoch in range(6)]
    assert len(set(per_epoch)) > 1, "a new epoch must draw new flips"
    assert {f for epoch in per_epoch for f in epoch} == {False, True}
    torch.manual_seed(123)
    assert flips(4) == per_epoch[4]  # an epoch's samples repeat
    for batch in train:  # the loader serves epoch 4's samples
        for j in range(len(batch["semseg"])):
            sample = {k: v[j] for k, v in batch.items()}
            assert any(matches(sample, references[i, per_epoch[4][i]]) for i in rows)
    expected = [references[i, False] for i in rows]
    for _ in range(2):  # in order, never mirrored, whatever the epoch
        served = [{k: v[j] for k, v in batch.items()} for batch in val for j in range(len(batch["semseg"]))]
        assert len(served) == len(expected) and all(matches(s, r) for s, r in zip(served, expected))
        val.dataset.set_epoch(3)
