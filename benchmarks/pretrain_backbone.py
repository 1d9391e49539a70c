"""Pretrain a tiny backbone (tiny-swin or tiny-pvtv2) from scratch on real CIFAR-10 images and cache it.

The accuracy benchmark needs small backbones that have seen real images, and none can be downloaded here. This
script trains one on `cifar10_jpeg` (30,000 train / 5,000 test JPEGs, 32x32, upsampled to 64 px), single-threaded
and deterministic, then saves the backbone alone with `save_pretrained` (so `AutoModel.from_pretrained(folder)` gives
it back) and `pretrain.json` (recipe, recipe hash, CIFAR-10 test accuracy, CPU-seconds, versions).

    python benchmarks/pretrain_backbone.py --backbone tiny-swin     # about 15 CPU-minutes
    python benchmarks/pretrain_backbone.py --backbone tiny-pvtv2

The folder is `$PEFT_TGLORA_CACHE/backbones/<backbone>-<hash12>` (default cache `~/.cache/peft_tglora`), where the
hash covers the whole recipe; a second call with the same recipe returns that folder at once. From Python:

    from pretrain_backbone import pretrained_backbone      # with benchmarks/ on sys.path
    folder = pretrained_backbone("tiny-swin")              # trains it first if absent
    backbone = AutoModel.from_pretrained(folder)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / ".." / "shared" / "data" / "cifar10_jpeg"

# Backbone configs. tiny-swin is the demo's `TINY_SWIN` (peft_tglora/training.py); window 2 because transformers'
# Swin fails when the window exceeds a stage's grid, and 64 px gives grids 16, 8, 4, 2. tiny-pvtv2 has the same
# widths, depths, heads and stage grids; its spatial-reduction ratios shrink every stage's keys to a 2x2 grid.
BACKBONES = {
    "tiny-swin": dict(
        model_type="swin",
        patch_size=4,
        embed_dim=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=2,
        drop_path_rate=0.0,  # a short run underfits; stochastic depth only slows it down
    ),
    "tiny-pvtv2": dict(
        model_type="pvt_v2",
        hidden_sizes=[32, 64, 128, 256],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 4, 8],
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4],
        drop_path_rate=0.0,
    ),
}

# Everything that decides the weights. Its hash names the cache folder; change any value and a new folder is trained.
TRAINING = dict(
    data="cifar10_jpeg",
    image_size=64,  # 32 px images upsampled (bilinear) after augmentation
    crop_padding=4,  # random crop of a zero-padded image, then a random horizontal flip
    num_classes=10,
    epochs=8,  # about 12-14 CPU-minutes each on a 2-core x86 machine, single-threaded
    batch_size=64,
    lr=1e-3,
    min_lr=1e-5,
    warmup_epochs=1,
    weight_decay=0.05,
    label_smoothing=0.1,
    max_grad_norm=1.0,
    seed=0,
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def make_recipe(name: str, **overrides) -> dict:
    """The full recipe for `name`; a `config` override updates the backbone config, other keys the training values."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    config_overrides = overrides.pop("config", None) or {}
    unknown = sorted(set(overrides) - set(TRAINING))
    if unknown:
        raise ValueError(f"Unknown recipe keys {unknown}; the recipe has {sorted(TRAINING)} and `config`.")
    return dict(backbone=name, config={**BACKBONES[name], **config_overrides}, **{**TRAINING, **overrides})


def recipe_hash(recipe: dict) -> str:
    """12 hex digits of the SHA-256 of the recipe as canonical JSON."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_TGLORA_CACHE", Path.home() / ".cache" / "peft_tglora"))


def build_backbone(recipe: dict) -> nn.Module:
    """A randomly initialised `SwinModel` / `PvtV2Model` from the recipe, seeded."""
    from transformers import AutoConfig, AutoModel

    config = dict(recipe["config"])
    config = AutoConfig.for_model(config.pop("model_type"), image_size=recipe["image_size"], **config)
    torch.manual_seed(recipe["seed"])
    return AutoModel.from_config(config)


def pooled_features(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean of the last stage's (normalised) features: `[B, C]`. Swin gives `[B, L, C]`, PVTv2 `[B, C, H, W]`."""
    hidden = backbone(pixel_values=pixel_values).last_hidden_state
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


class Classifier(nn.Module):
    """The backbone and a linear layer on its pooled last stage; only the backbone is kept."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_sizes[-1] if hasattr(backbone.config, "hidden_sizes") else backbone.num_features
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, pixel_values))


def load_cifar10(data_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode every JPEG once: `{split: (uint8 images [N, 32, 32, 3], int64 labels [N])}` for train and test."""
    import datasets

    data_dir = Path(data_dir)
    if not (data_dir / "data").is_dir():
        raise FileNotFoundError(f"No CIFAR-10 parquet files under {data_dir}/data; pass --data_dir to the folder.")
    splits = datasets.load_dataset(str(data_dir))
    out = {}
    for split in ("train", "test"):
        ds = splits[split]
        images = np.stack([np.asarray(img.convert("RGB")) for img in ds["image"]])
        out[split] = (torch.from_numpy(images), torch.tensor(ds["label"], dtype=torch.int64))
    return out


def preprocess(images: torch.Tensor, size: int, padding: int = 0, generator: torch.Generator | None = None):
    """uint8 `[B, 32, 32, 3]` -> normalised float `[B, 3, size, size]`; random crop + flip when a generator is given."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    if generator is not None:
        batch, _, height, width = x.shape
        padded = F.pad(x, (padding,) * 4)
        offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator).tolist()
        x = torch.stack([p[:, i : i + height, j : j + width] for p, (i, j) in zip(padded, offsets)])
        flip = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, batch_size: int = 250) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(preprocess(images[start : start + batch_size], size))
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def train(recipe: dict, data: dict, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the recipe's backbone + linear head on `data` (see `load_cifar10`); return the backbone and its record."""
    from tqdm.auto import tqdm

    torch.use_deterministic_algorithms(True)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    # build_backbone seeds the global RNG, so the head's init is fixed too
    model = Classifier(build_backbone(recipe), recipe["num_classes"])
    generator = torch.Generator().manual_seed(recipe["seed"])  # shuffling and augmentation

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    steps_per_epoch = len(train_images) // recipe["batch_size"]  # drop the last partial batch: one shape per step
    total = steps_per_epoch * recipe["epochs"]
    warmup = steps_per_epoch * recipe["warmup_epochs"]

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    history, step = [], 0
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        loss_sum = correct = seen = 0
        bar = tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe['epochs']}", disable=not progress, mininterval=2
        )
        for i in bar:
            index = order[i * recipe["batch_size"] : (i + 1) * recipe["batch_size"]]
            x = preprocess(train_images[index], recipe["image_size"], recipe["crop_padding"], generator)
            y = train_labels[index]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, recipe["lr"], recipe["min_lr"])
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        history.append(dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_accuracy=correct / seen))
    test_accuracy = evaluate(model, test_images, test_labels, recipe["image_size"])
    record = dict(
        test_accuracy=test_accuracy,
        epochs=recipe["epochs"],
        cpu_seconds=round(time.process_time() - cpu_start, 1),
        wall_seconds=round(time.perf_counter() - wall_start, 1),
        threads=torch.get_num_threads(),
        train_images=len(train_images),
        test_images=len(test_images),
        backbone_parameters=sum(p.numel() for p in model.backbone.parameters()),
        history=history,
    )
    return model.backbone, record


def pretrained_backbone(
    name: str,
    *,
    out: str | Path | None = None,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    data: dict | None = None,
    threads: int = 1,
    progress: bool = True,
    **recipe_overrides,
) -> Path:
    """
    The folder of the pretrained backbone `name` for this recipe, training it first if it is not there.

    `recipe_overrides` change training values (`epochs=4`) or the backbone config (`config={"embed_dim": 16}`); they
    change the hash and so the folder. `data` (as `load_cifar10` returns) replaces reading `data_dir`, for tests.
    """
    recipe = make_recipe(name, **recipe_overrides)
    digest = recipe_hash(recipe)
    folder = Path(out) if out is not None else cache_root() / "backbones" / f"{name}-{digest}"
    record_file = folder / "pretrain.json"
    if record_file.exists():
        cached = json.loads(record_file.read_text())
        if cached.get("recipe_hash") != digest:
            raise ValueError(
                f"{folder} holds a backbone of another recipe (hash {cached.get('recipe_hash')}, wanted {digest}); "
                "pass another --out or delete that folder."
            )
        return folder

    import transformers

    torch.set_num_threads(threads)
    if data is None:
        data = load_cifar10(data_dir)
    backbone, record = train(recipe, data, progress=progress)
    record = dict(
        recipe=recipe,
        recipe_hash=digest,
        **record,
        versions=dict(
            torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()
        ),
        machine=dict(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count()),
    )
    # write next to the target, then rename: an interrupted run never looks like a cache hit
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is for every user of the machine
    backbone.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, choices=sorted(BACKBONES))
    parser.add_argument("--epochs", type=int, default=TRAINING["epochs"])
    parser.add_argument("--out", default=None, help="folder to save to (default: the cache folder of the recipe)")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="the cifar10_jpeg folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs reproducible and cheap)")
    args = parser.parse_args()

    recipe = make_recipe(args.backbone, epochs=args.epochs)
    folder = Path(args.out) if args.out else cache_root() / "backbones" / f"{args.backbone}-{recipe_hash(recipe)}"
    cached = (folder / "pretrain.json").exists()
    folder = pretrained_backbone(
        args.backbone, out=args.out, data_dir=args.data_dir, threads=args.threads, epochs=args.epochs
    )
    record = json.loads((folder / "pretrain.json").read_text())
    print(f"{'cached' if cached else 'saved'}: {folder}")
    print(
        f"{args.backbone}: CIFAR-10 test accuracy {100 * record['test_accuracy']:.1f}% after {record['epochs']} "
        f"epochs, {record['cpu_seconds'] / 60:.1f} CPU-minutes ({record['threads']} thread(s))"
    )


if __name__ == "__main__":
    main()
