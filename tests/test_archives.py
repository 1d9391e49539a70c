"""The field's archives (PASCAL_MT, MTI-Net NYUD_MT, ATRC NYUDv2) in their own layouts and formats, read as the
reference code reads them: tiny fixtures written here, labels computed by hand in each test."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from test_examples import run_training

from peft_tglora.tasks import load_multitask_dataset
from peft_tglora.tasks.archives import detect_archive, laplacian_edges, thin
from peft_tglora.tasks.data import decode_example
from peft_tglora.tasks.prepare import main as prepare_main


H, W = 16, 20
PASCAL_TASKS = ["semseg", "human_parts", "saliency", "normals", "edges"]
NYUD_TASKS = ["semseg", "depth", "normals", "edges"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_TGLORA_CACHE", str(tmp_path / "cache"))


def _png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)


def _parts_mat(path: Path, objects) -> None:
    """A PASCAL-Part annotation: struct `anno` with `objects` (1xN: class, class_ind, mask, parts(1xP) or [])."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (cls, ind, mask, parts) in enumerate(objects):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, pmask) in enumerate(parts):
                arr[0, j] = (name, pmask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        objs[0, i] = (cls, np.array([[float(ind)]]), mask.astype(np.uint8), arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"anno": {"imname": path.stem, "objects": objs}})


def _rect(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# PASCAL-Context ids: 3 and 4 are among the 170 "NYU-like" classes whose normals are supervised, 1, 2 and 5 are not
LABEL_MAP = np.where(np.arange(W)[None, :] < 10, 3, 5).repeat(H, 0).astype(np.uint16)
LABEL_MAP[12:, :4] = 1


def make_pascal(root: Path, train=("2008_000001", "2008_000002"), val=("2008_000003",)) -> Path:
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets/Context/val.txt").write_text("\n".join(val) + "\n")
    (root / "pascal-context/trainval").mkdir(parents=True)
    for k, i in enumerate([*train, *val]):
        _image(root / "JPEGImages" / f"{i}.jpg", k)
        _png(root / "semseg/pascal-context" / f"{i}.png", np.full((H, W), 7))
        sal = np.zeros((H, W))
        sal[:, :5], sal[:, 5:10], sal[:, 10:15] = 127, 128, 255  # 127 / 255 < 0.5 < 128 / 255
        _png(root / "sal_distill" / f"{i}.png", sal)
        normals = np.full((H, W, 3), 128)
        normals[..., 2] = 255  # n = 2 v / 255 - 1 = (1/255, 1/255, 1)
        _png(root / "normals_distill" / f"{i}.png", normals)
        savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": LABEL_MAP})
    # the first id also has a VOC12 map, which wins over pascal-context's
    _png(root / "semseg/VOC12" / f"{train[0]}.png", np.where(_rect(0, 8, 0, W), 15, 255))
    person = _rect(0, 16, 2, 8)
    _parts_mat(root / "human_parts" / f"{train[0]}.mat", [
        ("person", 15, person, [("head", _rect(0, 4, 2, 8)), ("torso", _rect(4, 9, 2, 8)),
                                ("llarm", _rect(5, 9, 2, 3)), ("rfoot", _rect(14, 16, 2, 4))]),
        ("dog", 12, _rect(10, 16, 12, 20), [("head", _rect(10, 12, 12, 20))]),  # not a person: ignored
    ])  # fmt: skip
    _parts_mat(root / "human_parts" / f"{train[1]}.mat", [("cat", 8, _rect(0, 5, 0, 5), [])])
    _parts_mat(root / "human_parts" / f"{val[0]}.mat", [("person", 15, _rect(0, 5, 0, 5), [])])  # no parts
    return root


def make_nyud(root: Path, atrc=False, train=("0001", "0002"), val=("0003",)) -> Path:
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets/train.txt").write_text("\n".join(train) + "\n")
    (root / "gt_sets/val.txt").write_text("\n".join(val) + "\n")
    for k, i in enumerate([*train, *val]):
        _image(root / "images" / f"{i}.{'png' if atrc else 'jpg'}", k)
        seg = np.zeros((H, W))
        seg[:, 5:10], seg[:, 10:] = 1, 40
        _png(root / "segmentation" / f"{i}.png", seg)
        depth = np.full((H, W), 2.5, dtype=np.float32)
        depth[0] = 0  # invalid
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{i}.npy", depth)
        edge = np.zeros((H, W), dtype=np.float32)
        edge[:, 9] = 1
        if atrc:
            normals = np.zeros((H, W, 3))
            normals[..., 0] = 255  # with 128 below: 2 v / 255 - 1 = (1, 1/255, 1/255)
            normals[..., 1:] = 127.5
            _png(root / "normals" / f"{i}.png", np.round(normals))
            _png(root / "edge" / f"{i}.png", edge * 255)
        else:
            normals = np.zeros((H, W, 3), dtype=np.float32)
            normals[..., 0] = 1.0
            (root / "normals").mkdir(exist_ok=True)
            (root / "edge").mkdir(exist_ok=True)
            np.save(root / "normals" / f"{i}.npy", normals)
            np.save(root / "edge" / f"{i}.npy", edge)
    return root


def rows(name, root, split, tasks):
    data = load_multitask_dataset(name, split, root=root, tasks=tasks)
    return {r["id"]: decode_example(r, tasks) for r in data}


# ---------------------------------------------------------------- label rules
def test_laplacian_is_not_a_neighbour_test():
    """A class-15 column between classes 10 and 20 has Laplacian 10 + 20 - 2 * 15 = 0: no edge (the reference)."""
    edges = laplacian_edges(np.array([[10, 15, 20]] * 3))
    # borders reflect-101: column 0 sees 15 on both sides (15 + 15 - 2 * 10 = 10), column 2 sees 15 twice (-10)
    assert edges.tolist() == [[True, False, True]] * 3


def test_thin_hand_cases():
    """
    Derived by hand from Guo & Hall's conditions (x1 = east, counter-clockwise): in a 2-wide vertical band, the right
    column has x1 = 0, C(P) = 1 and N(P) = 3 (2 at the image border), so the first subiteration deletes it; so does
    the top-left pixel (C(P) = 1, N(P) = 2, and x2 = x3 = 0, x8 = 1 satisfy G3), while the bottom-left one has x2 = 1
    and stays. The left column is then a 1-wide line whose inner pixels have C(P) = 2 and whose ends have N(P) = 1,
    so the second subiteration deletes nothing.
    An isolated pixel (C(P) = 0) and a diagonal line (C(P) = 2 inside, N(P) = 1 at the ends) stay.
    Compared once against scikit-image 0.26.0's `thin` on 200 random masks and Laplacian edge maps: identical.
    """
    band = np.zeros((6, 6), bool)
    band[:, 2:4] = True
    expected = np.zeros((6, 6), bool)
    expected[1:, 2] = True
    assert np.array_equal(thin(band), expected)
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    assert np.array_equal(thin(dot), dot)
    diagonal = np.eye(5, dtype=bool)
    assert np.array_equal(thin(diagonal), diagonal)


# ---------------------------------------------------------------- PASCAL_MT
def test_pascal_mt_decodes_with_the_reference_rules(tmp_path, caplog):
    root = make_pascal(tmp_path / "PASCAL_MT")
    (root / "JPEGImages" / "2009_999999.jpg").write_bytes((root / "JPEGImages/2008_000001.jpg").read_bytes())
    with caplog.at_level("INFO"):
        train = rows("pascal_context", root, "train", PASCAL_TASKS)
    assert "PASCAL_MT" in caplog.text  # the layout is named in the log
    assert sorted(train) == ["2008_000001", "2008_000002"]  # from the split list, not from JPEGImages/
    a, b = train["2008_000001"], train["2008_000002"]
    # semseg: VOC12 before pascal-context
    assert torch.equal(a["semseg"], torch.from_numpy(np.where(_rect(0, 8, 0, W), 15, 255)))
    assert torch.equal(b["semseg"], torch.full((H, W), 7))
    # human parts: head 1, torso 2, lower arm 4 (painted after torso), foot 6; the dog's "head" is not painted
    parts = np.zeros((H, W), np.int64)
    parts[0:4, 2:8], parts[4:9, 2:8], parts[5:9, 2:3], parts[14:16, 2:4] = 1, 2, 4, 6
    assert torch.equal(a["human_parts"], torch.from_numpy(parts))
    assert torch.equal(b["human_parts"], torch.full((H, W), 255))  # no person: ignored
    # saliency: v / 255 > 0.5, no ignore value
    sal = np.zeros((H, W), np.float32)
    sal[:, 5:15] = 1
    assert torch.equal(a["saliency"], torch.from_numpy(sal))
    # normals: (1/255, 1/255, 1) normalised on the NYU-like class 3, ignored (zero) on ids 5 and 1
    v = np.array([1 / 255, 1 / 255, 1.0])
    expected = torch.from_numpy(LABEL_MAP == 3)[None] * torch.tensor(v / np.linalg.norm(v)).view(3, 1, 1)
    assert torch.allclose(a["normals"], expected.float(), atol=1e-6)
    # edges: the class 3 | 5 boundary gives a 2-wide Laplacian band (columns 9, 10), thinned to column 9 below its
    # top row (as the band in test_thin_hand_cases); the 1 | 3 corner at rows 12.., columns 0..4 has its own curve
    band = laplacian_edges(LABEL_MAP)
    assert band[:, 9:11].all() and not band[:12, 5:9].any() and not band[:, 11:].any()
    edges = thin(band)
    assert edges[1:, 9].all() and not edges[:, 10].any() and not edges[0, 9]
    assert torch.equal(a["edges"], torch.from_numpy(edges.astype(np.float32)))
    val = rows("pascal_context", root, "val", ["human_parts"])
    assert torch.equal(val["2008_000003"]["human_parts"], torch.full((H, W), 255))  # a person without parts


def test_prepare_cli_writes_the_project_layout(tmp_path):
    root = make_pascal(tmp_path / "PASCAL_MT")
    out = prepare_main(["pascal_context", str(root), str(tmp_path / "out"), "--tasks", "human_parts", "edges"])
    assert sorted(p.name for p in (out / "train" / "images").glob("*.jpg")) == ["2008_000001.jpg", "2008_000002.jpg"]
    assert (out / "val" / "edges" / ".complete").is_file()
    data = load_multitask_dataset("pascal_context", "train", root=out, tasks=["human_parts", "edges"])
    assert len(data) == 2


# ---------------------------------------------------------------- NYUD
@pytest.mark.parametrize("atrc", [False, True], ids=["mtinet_NYUD_MT", "atrc_NYUDv2"])
def test_nyud_decodes_with_the_reference_rules(tmp_path, atrc, caplog):
    root = make_nyud(tmp_path / "NYUD", atrc=atrc)
    with caplog.at_level("INFO"):
        sample = rows("nyud", root, "train", NYUD_TASKS)["0001"]
    assert ("ATRC" if atrc else "MTI-Net") in caplog.text
    seg = np.full((H, W), 255)
    seg[:, 5:10], seg[:, 10:] = 0, 39  # 0 = void -> ignored, k -> k - 1
    assert torch.equal(sample["semseg"], torch.from_numpy(seg))
    depth = np.full((H, W), 2.5, np.float32)
    depth[0] = 0
    assert torch.equal(sample["depth"], torch.from_numpy(depth))  # metres, 0 = invalid
    edge = np.zeros((H, W), np.float32)
    edge[:, 9] = 1
    assert torch.equal(sample["edges"], torch.from_numpy(edge))
    if atrc:  # 2 * (255, 128, 128) / 255 - 1 = (1, 0.0039, 0.0039), normalised
        v = np.array([1.0, 1 / 255, 1 / 255])
        expected = torch.tensor(v / np.linalg.norm(v), dtype=torch.float32)
    else:
        expected = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(sample["normals"], expected.view(3, 1, 1).expand(3, H, W), atol=1e-6)


def test_eth_nyud_is_refused_naming_the_archive_to_use(tmp_path):
    root = make_nyud(tmp_path / "NYUD_MT")
    for p in (root / "segmentation").glob("*.png"):
        savemat(p.with_suffix(".mat"), {"segmentation": np.zeros((H, W))})
        p.unlink()
    with pytest.raises(ValueError, match="ASTMT's NYUD_MT.*MTI-Net's NYUD_MT.tgz"):
        load_multitask_dataset("nyud", "train", root=root)


# ---------------------------------------------------------------- bad input fails first, naming the fix
def test_bad_archives_fail_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="none of the known layouts.*PASCAL_MT.*NYUD_MT.*NYUDv2"):
        load_multitask_dataset("pascal_context", "train", root=tmp_path)
    root = make_pascal(tmp_path / "PASCAL_MT")
    with pytest.raises(ValueError, match="'nyud' archive|a 'pascal_context' archive"):
        load_multitask_dataset("nyud", "train", root=root)
    (root / "sal_distill" / "2008_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="'2008_000002' is in the split list.*sal_distill/2008_000002.png"):
        load_multitask_dataset("pascal_context", "train", root=root, tasks=["saliency"])
    for p in (root / "normals_distill").iterdir():
        p.unlink()
    (root / "normals_distill").rmdir()
    with pytest.raises(FileNotFoundError, match="normals folder.*normals_distill.*--tasks"):
        load_multitask_dataset("pascal_context", "train", root=root, tasks=["normals"])
    _png(root / "semseg/pascal-context/2008_000002.png", np.zeros((H + 1, W)))
    with pytest.raises(ValueError, match=r"semseg label of '2008_000002'.*\(17, 20\) but its image is \(16, 20\)"):
        load_multitask_dataset("pascal_context", "train", root=root, tasks=["semseg"])


def test_detect_keeps_the_project_layout(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    assert detect_archive(tmp_path) is None


# ---------------------------------------------------------------- two training steps on each archive
def _train(tmp_path, dataset, root, tasks):
    """The README's command on the extracted archive: every task the archive holds, tiny settings."""
    run_training(
        "--dataset", dataset, "--data_root", root, "--tasks", ",".join(tasks), "--task_groups", "shared",
        "--image_size", "64", "--batch_size", "1", "--max_train_steps", "2", "--r", "2", "--head_width", "4",
        "--head_hidden", "8", "--output_dir", tmp_path / "out",
        "--backbone_config", '{"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}', base=[],
    )  # fmt: skip
    return json.loads((tmp_path / "out" / "all_results.json").read_text())


@pytest.mark.parametrize("archive", ["PASCAL_MT", "NYUD_MT", "NYUDv2"])
def test_two_training_steps_on_each_archive(tmp_path, archive):
    if archive == "PASCAL_MT":
        expected = PASCAL_TASKS  # the paper's four, and edges
        results = _train(tmp_path, "pascal_context", make_pascal(tmp_path / archive), expected)
    else:
        expected = NYUD_TASKS
        results = _train(tmp_path, "nyud", make_nyud(tmp_path / archive, atrc=archive == "NYUDv2"), expected)
    assert results["steps"] == 2
    assert sorted(results["metrics"]) == sorted(expected)


# ---------------------------------------------------------------- the reference augmentation
def test_scale_rotate_pads_with_each_rule_and_scales_depth():
    """Scale 1/2 on a 4x4 canvas: the centre 2x2 samples source pixels 0 and 2 of each axis, the ring is filled."""
    from peft_tglora.tasks.transforms import RandomScaleRotate

    sample = {"image": torch.rand(3, 4, 4), "semseg": torch.arange(16).view(4, 4), "depth": torch.full((4, 4), 2.0)}
    out = RandomScaleRotate(scales=[0.5], rotations=[0.0])(sample)
    semseg = torch.full((4, 4), 255)
    semseg[1:3, 1:3] = torch.tensor([[0, 2], [8, 10]])
    assert torch.equal(out["semseg"], semseg)  # 255 = ignored outside the source, not the reference's 0
    depth = torch.zeros(4, 4)
    depth[1:3, 1:3] = 4.0  # 2 m / scale 0.5, as the reference divides depth by the scale; 0 = invalid outside
    assert torch.equal(out["depth"], depth)


def test_scale_rotate_turns_maps_and_normals_by_the_same_angle():
    """90 degrees counter-clockwise: the class map as np.rot90; normal (1, 0, 0) -> (sin(pi), cos(pi), 0) = (0, -1, 0)
    by the reference's in-plane rule (angle atan2(x, y) plus the rotation)."""
    from peft_tglora.tasks.transforms import RandomScaleRotate

    normals = torch.zeros(3, 4, 4)
    normals[0] = 1.0
    sample = {"image": torch.rand(3, 4, 4), "semseg": torch.arange(16).view(4, 4), "normals": normals}
    out = RandomScaleRotate(scales=[1.0], rotations=[90.0])(sample)
    assert torch.equal(out["semseg"], torch.from_numpy(np.rot90(np.arange(16).reshape(4, 4)).copy()))
    expected = torch.tensor([0.0, -1.0, 0.0]).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(out["normals"], expected, atol=1e-6)


def test_reference_augmentation_is_the_default_of_pascal_and_nyud_only():
    from peft_tglora.tasks.transforms import reference_augmentation

    (pascal,), (nyud,) = reference_augmentation("pascal_context"), reference_augmentation("nyud")
    assert (pascal.scales, pascal.rotations) == ((0.75, 1.25), (-20.0, 20.0))
    assert (nyud.scales, nyud.rotations) == ([1.0, 1.2, 1.5], [0.0])
    assert reference_augmentation("synthetic") == []
