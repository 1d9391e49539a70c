"""benchmarks/pretrain_backbone.py on a fake CIFAR set in memory: cache by recipe hash, reload, determinism.

Shrunk backbones (width 8, one block a stage) and 64 random 32x32 images, one epoch: seconds on one CPU thread.
Nothing here reads /work/shared.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_backbone.py"
SHRUNK = {
    "tiny-swin": dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]),
    "tiny-pvtv2": dict(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]),
}
FAST = dict(epochs=1, batch_size=16, warmup_epochs=0)


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    split = lambda n: (  # noqa: E731
        torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )
    return {"train": split(64), "test": split(16)}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TGLORA_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # train() turns it on for the whole process


def spy_on_train(pb, monkeypatch):
    """Record every backbone `train` returns (the in-memory model, before saving)."""
    trained, train = [], pb.train

    def recording(*args, **kwargs):
        backbone, record = train(*args, **kwargs)
        trained.append(backbone)
        return backbone, record

    monkeypatch.setattr(pb, "train", recording)
    return trained


@pytest.mark.parametrize("name", ["tiny-swin", "tiny-pvtv2"])
def test_cache_hit_and_reload(pb, data, monkeypatch, tmp_path, name):
    trained = spy_on_train(pb, monkeypatch)
    folder = pb.pretrained_backbone(name, data=data, progress=False, config=SHRUNK[name], **FAST)
    assert len(trained) == 1
    digest = pb.recipe_hash(pb.make_recipe(name, config=SHRUNK[name], **FAST))
    assert folder == tmp_path / "cache" / "backbones" / f"{name}-{digest}"
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["recipe_hash"] == digest and record["recipe"]["config"]["depths"] == [1, 1, 1, 1]
    assert 0 <= record["test_accuracy"] <= 1 and record["epochs"] == 1 and record["cpu_seconds"] > 0

    # (a) same recipe: the same folder, no second training (data=None would need /work/shared if it trained)
    again = pb.pretrained_backbone(name, data=None, data_dir=tmp_path / "absent", config=SHRUNK[name], **FAST)
    assert again == folder and len(trained) == 1

    # (c) the saved backbone alone comes back through AutoModel with the trained model's outputs
    reloaded = AutoModel.from_pretrained(folder).eval()
    backbone = trained[0].eval()
    assert type(reloaded) is type(backbone)
    x = pb.preprocess(data["test"][0][:4], size=64)
    with torch.no_grad():
        torch.testing.assert_close(pb.pooled_features(reloaded, x), pb.pooled_features(backbone, x), rtol=0, atol=0)


def test_recipe_changes_change_the_hash(pb):
    base = pb.recipe_hash(pb.make_recipe("tiny-swin"))
    assert len(base) == 12 and base == pb.recipe_hash(pb.make_recipe("tiny-swin"))
    changed = [
        pb.make_recipe("tiny-swin", epochs=9),
        pb.make_recipe("tiny-swin", seed=1),
        pb.make_recipe("tiny-swin", config={"embed_dim": 48}),
        pb.make_recipe("tiny-pvtv2"),
    ]
    hashes = {pb.recipe_hash(r) for r in changed}
    assert len(hashes) == len(changed) and base not in hashes


def test_same_seed_same_weights_other_seed_differs(pb, data, tmp_path):
    def weights(out, seed):
        folder = pb.pretrained_backbone(
            "tiny-swin", out=out, data=data, progress=False, config=SHRUNK["tiny-swin"], seed=seed, **FAST
        )
        return load_file(folder / "model.safetensors")

    first, second = weights(tmp_path / "a", 0), weights(tmp_path / "b", 0)
    other = weights(tmp_path / "c", 1)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_errors_name_the_value(pb, data, tmp_path):
    with pytest.raises(ValueError, match="Unknown backbone 'tiny-vit'"):
        pb.make_recipe("tiny-vit")
    with pytest.raises(ValueError, match=r"Unknown recipe keys \['epoch'\]"):
        pb.make_recipe("tiny-swin", epoch=3)
    out = tmp_path / "out"
    pb.pretrained_backbone("tiny-swin", out=out, data=data, progress=False, config=SHRUNK["tiny-swin"], **FAST)
    with pytest.raises(ValueError, match="holds a backbone of another recipe"):
        pb.pretrained_backbone("tiny-swin", out=out, data=data, config=SHRUNK["tiny-swin"], **{**FAST, "seed": 1})
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        pb.load_cifar10(tmp_path / "absent")


def test_augmentation_is_a_shifted_or_flipped_crop(pb):
    """Each augmented image is the plain path applied to one crop of the zero-padded image, maybe mirrored."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g)
    out = pb.preprocess(images, size=32, padding=2, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (2, 2, 2, 2))  # black border, as the script pads
    for k in range(len(images)):
        crops = [padded[k, :, i : i + 32, j : j + 32].permute(1, 2, 0)[None] for i in range(5) for j in range(5)]
        candidates = [pb.preprocess(c, size=32)[0] for c in crops]
        assert any(
            torch.allclose(out[k], c, atol=1e-6) or torch.allclose(out[k], c.flip(2), atol=1e-6) for c in candidates
        )
    assert not torch.allclose(out, pb.preprocess(images, size=32))  # something moved
