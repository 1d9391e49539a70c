"""
Model card and Hub upload for a trained TGLoRA output folder (adapter + heads, see `peft_tglora.training`).

`push_folder` never raises: a failed upload (no network, no token, a typo in the repository id) leaves the local folder
as it was and returns `None` after logging which folder holds the results and how to retry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .tree import TaskTree


logger = logging.getLogger(__name__)

# what never goes to the Hub: resumable training state and tracker logs
PUSH_IGNORE = ["checkpoints/*", "checkpoints/**", "logs/*", "logs/**"]


def tree_table(task_groups: Sequence[Sequence[Sequence[str]]]) -> str:
    """The task tree as a Markdown table: one row per stage (numbered from 0, as in `TaskTree`), groups as `{a, b}`."""
    lines = ["| stage | groups | task groups |", "|---|---|---|"]
    for s, stage in enumerate(task_groups):
        groups = " ".join("{" + ", ".join(group) + "}" for group in stage)
        lines.append(f"| {s} | {len(stage)} | {groups} |")
    return "\n".join(lines)


def metrics_table(metrics: Mapping[str, Mapping[str, float]], primary: Mapping[str, str] | None = None) -> str:
    """`{task: {metric: value}}` as a Markdown table; `primary` names the metric shown first (and bold) per task."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, values in metrics.items():
        main = (primary or {}).get(task)
        for name in sorted(values, key=lambda k: (k != main, k)):
            value = f"{values[name]:.4g}"
            lines.append(f"| {task} | {name} | {'**' + value + '**' if name == main else value} |")
    return "\n".join(lines)


def model_card(
    *,
    repo_id: str | None,
    tasks: Sequence[str],
    task_groups: Sequence[Sequence[Sequence[str]]],
    r: int,
    backbone: str,
    dataset: str,
    image_size: int,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    primary: Mapping[str, str] | None = None,
    delta_m: float | None = None,
    training: Mapping | None = None,
    base_model_included: bool = False,
) -> str:
    """The README.md of an output folder: what it is, the tree, the metrics and how to load it."""
    where = repo_id or "path/to/output_dir"
    counts = ",".join(str(len(stage)) for stage in task_groups)
    # `base_model` must name a Hub model, so a local path or a backbone shipped in the folder is left out
    on_hub = not base_model_included and not Path(backbone).exists()
    base = f"base_model: {backbone}\n" if on_hub else ""
    lines = [
        "---",
        f"{base}library_name: peft",
        "tags:",
        "- peft",
        "- tglora",
        "- multi-task",
        "- dense-prediction",
        f"- {dataset}",
        "---",
        "",
        f"# TGLoRA adapter: {', '.join(tasks)} ({dataset})",
        "",
        (
            "Task-grouped LoRA ([arXiv 2509.19602](https://arxiv.org/abs/2509.19602)) for multi-task dense "
            f"prediction, trained with `examples/train_tglora.py` of `peft_tglora`: backbone `{backbone}`, rank "
            f"r={r}, task tree `{counts}` (groups per stage), images of {image_size} px."
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
        lines += ["## Evaluation", "", f"On the {dataset} evaluation split, at {image_size} px.", ""]
        lines += [metrics_table(metrics, primary), ""]
        if delta_m is not None:
            lines += [f"Δm over the single-task baselines given at training time: **{delta_m:+.2f}%**.", ""]
    lines += [
        "## Files",
        "",
        "- `adapter_config.json`, `adapter_model.safetensors`: the TGLoRA adapter (PEFT format).",
        "- `heads_config.json`, `heads.safetensors`: one decoder head per task; the adapter alone gives features only.",
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
        "from peft_tglora.training import load_multitask_model",
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
        (
            f'base = AutoModel.from_pretrained("{where}", subfolder="{"base_model"}")'
            if base_model_included
            else f'base = AutoModel.from_pretrained("{backbone}")'
        ),
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


def write_model_card(directory: str | os.PathLike, **card_kwargs) -> Path:
    """Write `model_card(**card_kwargs)` to `directory/README.md` (replacing PEFT's generic card)."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(**card_kwargs))
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
