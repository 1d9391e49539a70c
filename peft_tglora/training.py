"""
Pieces the training and inference examples share: a backbone-plus-heads module, seeded data, evaluation, and saving /
loading the heads next to the adapter.

An output folder of `examples/train_tglora.py` holds the adapter (`adapter_config.json`, `adapter_model.safetensors`,
written by PEFT), the heads (`heads.safetensors` + `heads_config.json`, written here), the model card (`README.md`,
`peft_tglora.hub`) and, for a randomly initialised backbone such as the demo's `tiny-swin`, that backbone in
`base_model/` (an adapter is useless without the exact weights it was trained on). `load_multitask_model` rebuilds
everything from such a folder or from a Hub repository holding it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .tasks import MultiScaleHead, build_meter, postprocess


logger = logging.getLogger(__name__)

HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"
BASE_MODEL_DIR = "base_model"

# the demo backbone: a 4-stage Swin small enough to train in a minute on a laptop CPU (window 2 fits the 2x2 last
# stage of a 64 px image; a window larger than a stage's map fails in Swin's attention mask)
TINY_SWIN = dict(patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=2)


def build_backbone(
    name: str, image_size: int | Sequence[int], overrides: Mapping | None = None, seed: int = 0
) -> nn.Module:
    """`"tiny-swin"` (random init from `TINY_SWIN` updated by `overrides`), else `AutoModel.from_pretrained(name)`."""
    from transformers import AutoModel, SwinConfig, SwinModel

    if name == "tiny-swin":
        torch.manual_seed(seed)
        size = image_size if isinstance(image_size, int) else list(image_size)  # [H, W]: a non-square input
        return SwinModel(SwinConfig(image_size=size, **{**TINY_SWIN, **dict(overrides or {})}))
    if overrides:
        raise ValueError(f"Backbone config overrides {dict(overrides)} only apply to 'tiny-swin', not to {name!r}.")
    return AutoModel.from_pretrained(name)


@torch.no_grad()
def stage_channels(peft_model: nn.Module, image_size: int | Sequence[int]) -> list[int]:
    """Channels of each stage's task features, read from one forward pass on a blank image (`image_size`: int or H, W)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    was_training = peft_model.training
    peft_model.eval()
    out = peft_model(pixel_values=torch.zeros(1, 3, height, width))
    peft_model.train(was_training)
    return [int(f.shape[1]) for f in next(iter(out.task_features.values()))]


class MultiTaskModel(nn.Module):
    """
    A TGLoRA backbone (a `PeftModel`) and one head per task: `forward(pixel_values)` returns `{task: raw output}`,
    each `[B, C_task, H, W]` at the input's resolution (what `peft_tglora.tasks.multitask_loss` takes).
    """

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(pixel_values=pixel_values).task_features
        size = pixel_values.shape[-2:]
        return {task: head(features[task], output_size=size) for task, head in self.heads.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader,
    tasks: Sequence[str],
    num_classes: Mapping[str, int],
    gather: Callable = lambda x: x,
) -> dict[str, dict[str, float]]:
    """
    Score `model` (a `MultiTaskModel`) on `dataloader`: `{task: {metric: value}}` from each task's streaming meter.

    `gather` collects a batch from every process (pass `accelerator.gather_for_metrics`), so each process ends with
    the metrics of the whole evaluation set.
    """
    meters = {t: build_meter(t, num_classes=num_classes.get(t)) for t in tasks}
    was_training = model.training
    model.eval()
    for batch in dataloader:
        outputs = model(batch["pixel_values"])
        processed = {t: postprocess(t, outputs[t].float()) for t in tasks}
        processed, labels = gather((processed, {t: batch[t] for t in tasks}))
        for t in tasks:
            meters[t].update(processed[t].cpu(), labels[t].cpu())
    model.train(was_training)
    results = {}
    for t, meter in meters.items():
        values = meter.compute()
        results[t] = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}  # drop per-class lists
    return results


def weights_digest(module: nn.Module, trainable_only: bool = True) -> str:
    """SHA-256 of the parameters' bytes (names and values), to check that processes hold identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        if trainable_only and not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def drop_frozen_weights(model: nn.Module) -> Callable:
    """
    A hook for `accelerator.register_save_state_pre_hook` that leaves `model`'s frozen parameters out of checkpoints.

    Buffers (e.g. the heads' norm statistics) and trainable parameters stay; load such a checkpoint with
    `accelerator.load_state(path, strict=False)`, the frozen weights coming from the model as built.
    """
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}

    def hook(models, state_dicts, output_dir):
        for state in state_dicts:
            # under DDP the state dict is the wrapper's: its names carry a "module." prefix
            for key in [k for k in state if k.removeprefix("module.") in frozen]:
                del state[key]

    return hook


def save_heads(heads: nn.ModuleDict, head_config: Mapping, directory: str | os.PathLike) -> None:
    """Write `heads.safetensors` (state dict keyed `task.param`) and `heads_config.json` (how to rebuild them)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, directory / HEADS_WEIGHTS)
    (directory / HEADS_CONFIG).write_text(json.dumps(dict(head_config), indent=2) + "\n")


def build_heads_from_config(head_config: Mapping) -> nn.ModuleDict:
    """Heads with fresh weights from a `heads_config.json` dict (`in_channels`, `num_outputs`, `head_kwargs`)."""
    return nn.ModuleDict(
        {
            task: MultiScaleHead(head_config["in_channels"], n, **head_config.get("head_kwargs", {}))
            for task, n in head_config["num_outputs"].items()
        }
    )


def load_heads(directory: str | os.PathLike) -> tuple[nn.ModuleDict, dict]:
    """Rebuild the heads saved by `save_heads`; returns `(heads, head_config)`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (HEADS_CONFIG, HEADS_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{str(directory / name)!r} is missing: the folder holds an adapter without its task heads. Train with "
                "examples/train_tglora.py, which saves both."
            )
    head_config = json.loads((directory / HEADS_CONFIG).read_text())
    heads = build_heads_from_config(head_config)
    heads.load_state_dict(load_file(directory / HEADS_WEIGHTS))
    return heads, head_config


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step of a `checkpoints/step_N` folder written by the training example."""
    name = Path(path).name
    if not (name.startswith("step_") and name[5:].isdigit()):
        raise ValueError(
            f"{str(path)!r} is not a checkpoint folder of the training example (OUTPUT_DIR/checkpoints/step_N)."
        )
    return int(name[5:])


def resolve_checkpoint(resume: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """`resume` as a path, or for `"latest"` the checkpoint of `output_dir` with the highest step."""
    if str(resume) != "latest":
        return Path(resume)
    found = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=checkpoint_step)
    if not found:
        raise FileNotFoundError(f"No checkpoint to resume from in {str(Path(output_dir, 'checkpoints'))!r}.")
    return found[-1]


def resolve_folder(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; a Hub repository id through `snapshot_download` (served from the cache when offline)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), revision=revision))


def load_multitask_model(
    name_or_path: str | os.PathLike, revision: str | None = None, base_model: nn.Module | None = None
) -> tuple[MultiTaskModel, dict]:
    """
    Rebuild a trained `MultiTaskModel` (backbone + adapter + heads) from an output folder or a Hub repository id.

    The backbone is `base_model` when given, else the folder's `base_model/` when present, else
    `AutoModel.from_pretrained` of the backbone named in `heads_config.json`. Returns `(model in eval mode, config)`.
    """
    from peft import PeftModel
    from transformers import AutoModel

    folder = resolve_folder(name_or_path, revision)
    heads, head_config = load_heads(folder)
    if base_model is None:
        source = folder / BASE_MODEL_DIR if (folder / BASE_MODEL_DIR).is_dir() else head_config["backbone"]
        base_model = AutoModel.from_pretrained(source)
    # from the id, not the folder, so that PEFT's own Hub path (cache, offline mode) is the one exercised
    adapter = name_or_path if not Path(name_or_path).is_dir() else folder
    backbone = PeftModel.from_pretrained(base_model, str(adapter), revision=revision)
    return MultiTaskModel(backbone, heads).eval(), head_config
