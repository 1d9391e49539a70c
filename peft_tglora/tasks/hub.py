"""
Sharing a trained output folder on the Hub: its model card (PEFT's card, extended) and the upload.

`push_folder` never raises: a failed upload (no network, no token, a typo in the repository id) leaves the local folder
as it was and returns `None` after logging which folder holds the results and how to retry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..tree import TaskTree
from .specs import TASKS, get_task_spec


logger = logging.getLogger(__name__)

# what never goes to the Hub: resumable training state and tracker logs
PUSH_IGNORE = ["checkpoints/*", "checkpoints/**", "logs/*", "logs/**"]
TAGS = ["peft_tglora", "tglora", "multi-task", "dense-prediction"]
PEFT_SECTION = "### Framework versions"  # what PEFT's card adds (its versions); kept below ours


def tree_table(task_groups: Sequence[Sequence[Sequence[str]]]) -> str:
    """The task tree as a Markdown table: one row per stage (numbered from 0, as in `TaskTree`), groups as `{a, b}`."""
    lines = ["| stage | groups | task groups |", "|---|---|---|"]
    for s, stage in enumerate(task_groups):
        groups = " ".join("{" + ", ".join(group) + "}" for group in stage)
        lines.append(f"| {s} | {len(stage)} | {groups} |")
    return "\n".join(lines)


def metrics_table(metrics: Mapping[str, Mapping[str, float]], primary: Mapping[str, str] | None = None) -> str:
    """`{task: {metric: value}}` as a Markdown table; the primary metric (default: the task's) first and bold."""
    primary = {t: get_task_spec(t).metric for t in metrics if t in TASKS} | dict(primary or {})
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, values in metrics.items():
        main = primary.get(task)
        for name in sorted(values, key=lambda k: (k != main, k)):
            value = f"{values[name]:.4g}"
            lines.append(f"| {task} | {name} | {'**' + value + '**' if name == main else value} |")
    return "\n".join(lines)


def _size(image_size) -> str:
    return f"{image_size} px" if isinstance(image_size, int) else "x".join(map(str, image_size)) + " px (H x W)"


def card_text(
    *,
    repo_id: str | None,
    tasks: Sequence[str],
    task_groups: Sequence[Sequence[Sequence[str]]],
    r: int,
    backbone: str,
    dataset: str,
    image_size: int | Sequence[int],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    primary: Mapping[str, str] | None = None,
    delta_m: float | None = None,
    training: Mapping | None = None,
    base_model_included: bool = False,
) -> str:
    """The Markdown body of the card: what the folder is, the tree, the metrics and how to load it."""
    where = repo_id or "path/to/output_dir"
    counts = ",".join(str(len(stage)) for stage in task_groups)
    base = (
        f'AutoModel.from_pretrained("{where}", subfolder="base_model")'
        if base_model_included
        else f'AutoModel.from_pretrained("{backbone}")'
    )
    lines = [
        f"# TGLoRA adapter: {', '.join(tasks)} ({dataset})",
        "",
        (
            "Task-grouped LoRA ([arXiv 2509.19602](https://arxiv.org/abs/2509.19602)) for multi-task dense "
            f"prediction, trained with `examples/train_tglora.py` of `peft_tglora`: backbone `{backbone}`, rank "
            f"r={r}, task tree `{counts}` (groups per stage), images of {_size(image_size)}."
        ),
        "",
        "## Task tree",
        "",
        "Adapters are shared by the tasks of a group; a stage with G groups runs G streams.",
        "",
        tree_table(task_groups),
        "",
        "```mermaid",
        TaskTree.from_groups(tasks, task_groups).to_mermaid(),
        "```",
        "",
    ]
    if metrics:
        lines += ["## Evaluation", "", f"On the {dataset} evaluation split, at {_size(image_size)}.", ""]
        lines += [metrics_table(metrics, primary), ""]
        if delta_m is not None:
            lines += [f"Δm over the single-task baselines given at training time: **{delta_m:+.2f}%**.", ""]
    lines += [
        "## Files",
        "",
        "- `adapter_config.json`, `adapter_model.safetensors`: the TGLoRA adapter (PEFT format).",
        "- `heads/`: one decoder head per task (`TaskHeads`); the adapter alone gives features only.",
    ]
    if base_model_included:
        lines.append(
            "- `base_model/`: the randomly initialised backbone the adapter was trained on (a demo backbone, not on the "
            "Hub), so the repository is self-contained."
        )
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import peft_tglora  # registers TGLoRA with PEFT",
        "from peft_tglora.tasks.model import load_multitask_model",
        "",
        f'model, info = load_multitask_model("{where}")  # backbone + adapter + heads, eval mode',
        "predictions = model(pixel_values)  # {task: [B, C, H, W]}",
        "```",
        "",
        "Or the adapter alone, through PEFT:",
        "",
        "```python",
        "import peft_tglora",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f"base = {base}",
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "features = model(pixel_values=pixel_values).task_features  # {task: (stage 1 map, ..., stage 4 map)}",
        "```",
        "",
        f"Predictions as images: `python examples/inference.py --model {where} --images img.jpg --output_dir preds`.",
        "",
    ]
    if training:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in training.items()]
        lines.append("")
    return "\n".join(lines)


def model_card(directory: str | os.PathLike | None = None, **card_kwargs) -> ModelCard:
    """
    PEFT's card of `directory` (written by `save_pretrained`; a new one without it) extended with ours: TGLoRA tags,
    `base_model` only when it names a Hub model, our text (`card_text(**card_kwargs)`), then PEFT's versions section.
    """
    path = Path(directory, "README.md") if directory is not None else None
    card = ModelCard.load(path) if path is not None and path.is_file() else ModelCard("---\nlibrary_name: peft\n---\n")
    data: ModelCardData = card.data
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | set(TAGS) | {card_kwargs["dataset"]})
    backbone = card_kwargs["backbone"]
    # `base_model` must name a Hub model, so a local path or a backbone shipped in the folder is left out
    on_hub = not card_kwargs.get("base_model_included") and not Path(backbone).exists()
    data.base_model = backbone if on_hub else None
    if not on_hub:  # PEFT tags the adapter `base_model:adapter:<id>`, empty or a local path here
        data.tags = [t for t in data.tags if not t.startswith("base_model:")]
    peft_section = card.text[card.text.find(PEFT_SECTION) :] if PEFT_SECTION in card.text else ""
    card.text = "\n" + card_text(**card_kwargs) + ("\n" + peft_section if peft_section else "")
    return card


def write_model_card(directory: str | os.PathLike, **card_kwargs) -> Path:
    """Extend the card PEFT wrote to `directory/README.md` (see `model_card`) and save it there."""
    path = Path(directory) / "README.md"
    model_card(directory, **card_kwargs).save(path)
    return path


def push_folder(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload TGLoRA adapter and heads",
) -> str | None:
    """
    Upload an output folder (adapter, heads, card; not checkpoints or logs) to the Hub repository `repo_id`.

    Returns the commit URL, or `None` when anything fails; the local folder is only read, so it stays intact.
    """
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(directory), commit_message=commit_message, ignore_patterns=PUSH_IGNORE
        )
    except Exception as error:  # noqa: BLE001  any failure (network, auth, offline mode) must leave the local results usable
        logger.error(
            "Push to the Hub repository %r failed (%s: %s). The adapter, heads and model card are intact in %s; "
            "retry with: hf upload %s %s . --exclude 'checkpoints/*' --exclude 'logs/*'",
            repo_id,
            type(error).__name__,
            error,
            Path(directory).resolve(),
            repo_id,
            Path(directory).resolve(),
        )
        return None
    url = getattr(commit, "commit_url", str(commit))
    logger.info("Pushed %s to %s", directory, url)
    return url
