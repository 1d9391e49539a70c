"""
The multi-task model of the examples: a TGLoRA backbone plus one head per task, built new or loaded from a folder.

An output folder of `examples/train_tglora.py` holds the adapter (`adapter_config.json`, `adapter_model.safetensors`,
written by PEFT), the heads (`heads/`: `model.safetensors` + `config.json`, written by `TaskHeads.save_pretrained`),
the model card (`README.md`) and, for a randomly initialised backbone such as the demo's `tiny-swin`, that backbone in
`base_model/` (an adapter is useless without the exact weights it was trained on). `load_multitask_model` rebuilds
everything from such a folder or from a Hub repository holding it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .._registration import upstream_deprecations_silenced
from .heads import MultiScaleHead
from .specs import get_dataset_spec, num_outputs_for


HEADS_DIR = "heads"
BASE_MODEL_DIR = "base_model"

# the demo backbone: a 4-stage Swin small enough to train in a minute on a laptop CPU (window 2 fits the 2x2 last
# stage of a 64 px image; a window larger than a stage's map fails in Swin's attention mask)
TINY_SWIN = dict(patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=2)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


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
    was_training = peft_model.training
    peft_model.eval()
    out = peft_model(pixel_values=torch.zeros(1, 3, *_hw(image_size)))
    peft_model.train(was_training)
    return [int(f.shape[1]) for f in next(iter(out.task_features.values()))]


class TaskHeads(
    nn.ModuleDict,
    PyTorchModelHubMixin,
    library_name="peft_tglora",
    tags=["tglora", "multi-task", "dense-prediction"],
    model_card_template="---\n{{ card_data }}\n---\n\nDecoder heads of a TGLoRA multi-task model; the README.md one folder up "
    "describes the model.\n",
):
    """
    One `MultiScaleHead` per task. `save_pretrained` / `from_pretrained` (from `PyTorchModelHubMixin`) write and
    read `model.safetensors` and `config.json`, the constructor's arguments: how to rebuild the heads, and what the
    model was trained on (`tasks`, `backbone`, `dataset`, `image_size`, `num_classes`), read back as `info`.
    """

    def __init__(
        self,
        in_channels: list[int],
        num_outputs: dict[str, int],
        head_kwargs: dict | None = None,
        backbone: str | None = None,
        dataset: str | None = None,
        image_size: int | list[int] | None = None,
        num_classes: dict[str, int] | None = None,
        tasks: list[str] | None = None,
    ):
        tasks = list(tasks or num_outputs)  # the order of the tasks (config.json sorts dictionary keys)
        super().__init__({t: MultiScaleHead(in_channels, num_outputs[t], **(head_kwargs or {})) for t in tasks})
        self.info = dict(
            tasks=tasks, in_channels=list(in_channels), num_outputs=dict(num_outputs),
            head_kwargs=dict(head_kwargs or {}), backbone=backbone, dataset=dataset, image_size=image_size,
            num_classes=dict(num_classes or {}),
        )  # fmt: skip


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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The adapter (PEFT's files and card) in `directory`, the heads in `directory/heads`."""
        self.backbone.save_pretrained(directory)
        self.heads.save_pretrained(Path(directory) / HEADS_DIR)


def build_multitask_model(
    peft_model: nn.Module,
    tasks: Sequence[str],
    dataset: str,
    image_size: int | Sequence[int],
    backbone: str,
    head_width: int = 18,
    **head_kwargs,
) -> MultiTaskModel:
    """`peft_model` plus fresh heads whose stage-`s` width is `head_width * 2**s` (`head_kwargs` go to the heads)."""
    channels = stage_channels(peft_model, image_size)
    head_kwargs = dict(channels=[head_width * 2**s for s in range(len(channels))], **head_kwargs)
    num_outputs = {t: num_outputs_for(t, dataset) for t in tasks}
    num_classes = {t: n for t, n in get_dataset_spec(dataset).num_classes.items() if t in num_outputs}
    size = image_size if isinstance(image_size, int) else list(image_size)
    heads = TaskHeads(channels, num_outputs, head_kwargs, str(backbone), dataset, size, num_classes, list(tasks))
    return MultiTaskModel(peft_model, heads)


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
    `AutoModel.from_pretrained` of the backbone the heads name. Returns `(model in eval mode, heads.info)`.
    """
    from peft import PeftModel
    from transformers import AutoModel

    folder = resolve_folder(name_or_path, revision)
    if not (folder / HEADS_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder / HEADS_DIR)!r} is missing: the folder holds an adapter without its task heads. Train with "
            "examples/train_tglora.py, which saves both."
        )
    heads = TaskHeads.from_pretrained(folder / HEADS_DIR)
    if base_model is None:
        source = folder / BASE_MODEL_DIR if (folder / BASE_MODEL_DIR).is_dir() else heads.info["backbone"]
        base_model = AutoModel.from_pretrained(source)
    # from the id, not the folder, so that PEFT's own Hub path (cache, offline mode) is the one exercised
    adapter = name_or_path if not Path(name_or_path).is_dir() else folder
    with upstream_deprecations_silenced():
        backbone = PeftModel.from_pretrained(base_model, str(adapter), revision=revision)
    return MultiTaskModel(backbone, heads).eval(), heads.info


def drop_frozen_weights(model: nn.Module):
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
