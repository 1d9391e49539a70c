"""
What keeps a training run from ending broken: checkpoints that survive a kill, output-folder checks before the first
step, a stop (or a counted skip) at a non-finite loss, and results that stay valid JSON.

Checkpoint folders are named by the caller (the example uses `checkpoints/step_N`); here they are ordered by the
number at the end of their names, as Accelerate's own rotation does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

PARTIAL_PREFIX = "tmp-"  # a checkpoint being written; renamed when every process is done


def _number(path: Path) -> int:
    return int(re.search(r"(\d+)$", path.name).group(1))


def complete_checkpoints(parent: str | os.PathLike, prefix: str = "step_") -> list[Path]:
    """The complete `parent/<prefix>N` checkpoints, oldest first (a killed save left only a `tmp-` folder)."""
    found = Path(parent).glob(f"{prefix}*") if Path(parent).is_dir() else []
    return sorted((p for p in found if re.fullmatch(rf"{re.escape(prefix)}\d+", p.name)), key=_number)


def save_checkpoint(accelerator, folder: str | os.PathLike, total_limit: int | None = None) -> Path:
    """
    `accelerator.save_state` into `tmp-<name>`, renamed to `folder` once every process has written: a save killed
    midway (or a full disk) never leaves a `folder` that looks complete. Keeps the newest `total_limit` siblings.
    """
    folder = Path(folder)
    partial = folder.with_name(PARTIAL_PREFIX + folder.name)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)  # a resumed run saving a step again
        partial.rename(folder)
        prefix = folder.name[: len(folder.name) - len(str(_number(folder)))]
        for old in complete_checkpoints(folder.parent, prefix)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator, folder: str | os.PathLike) -> None:
    """`accelerator.load_state(folder, strict=False)` that names a damaged checkpoint and warns when RNG state is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint {str(folder)!r} does not exist.")
    rng = f"random_states_{accelerator.process_index}.pkl"
    if not (folder / rng).is_file():
        warnings.warn(
            f"{str(folder)!r} has no {rng}: the RNG state is not restored, so the resumed run will NOT be "
            "bit-identical to an uninterrupted one (dropout, stochastic depth).",
            stacklevel=2,
        )
    try:
        accelerator.load_state(str(folder), strict=False)  # strict=False: the frozen backbone is not in it
    except Exception as error:
        raise RuntimeError(
            f"Cannot resume from {str(folder)!r} ({type(error).__name__}: {error}): the checkpoint is damaged; "
            "resume from an earlier one in its folder, or start anew."
        ) from error


def check_output_dir(accelerator, output_dir: Path, resume: bool, overwrite: bool) -> None:
    """
    Before the first step: `output_dir` must be writable, and its `checkpoints/` may hold another run's only when
    resuming (or with `overwrite`, which deletes them). Leftover `tmp-` folders of killed saves are removed.
    """
    found = complete_checkpoints(output_dir / "checkpoints")
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} holds checkpoints of another run ({', '.join(p.name for p in found)}). "
            "Resume it with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
            "another --output_dir."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"--output_dir {str(output_dir)!r} is not a writable folder ({error}); choose another --output_dir."
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if found and overwrite and not resume:
            shutil.rmtree(output_dir / "checkpoints")
        for partial in Path(output_dir, "checkpoints").glob(PARTIAL_PREFIX + "*"):
            logger.warning("Removing %s, an incomplete checkpoint (its save was interrupted).", partial)
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()


class NonFiniteLossGuard:
    """
    `guard(loss, per_task, step)` is True when the step must be skipped: some process's loss is NaN / inf. Every
    process takes the same decision (one all-reduce), so none waits for a backward pass the others skipped. Past
    `max_skips` skipped steps it raises `FloatingPointError`, before anything is saved.
    """

    def __init__(self, accelerator, max_skips: int = 0):
        self.accelerator, self.max_skips, self.skipped = accelerator, max_skips, 0

    def __call__(self, loss: torch.Tensor, per_task: dict, step: int) -> bool:
        bad = torch.tensor([float(not torch.isfinite(loss))], device=loss.device)
        if not self.accelerator.reduce(bad, "sum").item():
            return False
        self.skipped += 1
        where = f"step {step}: per-task losses { ({t: round(v.item(), 4) for t, v in per_task.items()}) }"
        if self.skipped > self.max_skips:
            raise FloatingPointError(
                f"Non-finite loss at {where}; stopping, nothing saved (limit --max_nonfinite_steps {self.max_skips}). "
                "Lower --learning_rate, raise --warmup_ratio or check the labels of these tasks; the last checkpoint "
                "is intact."
            )
        logger.warning("Non-finite loss at %s: step skipped (%d of at most %d).", where, self.skipped, self.max_skips)
        return True


def check_finite(module: torch.nn.Module) -> None:
    """Raise `FloatingPointError` naming the trainable parameters of `module` that hold NaN / inf, if any."""
    broken = [n for n, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise FloatingPointError(f"{len(broken)} trained tensors hold NaN / inf (e.g. {broken[:3]}); nothing saved.")


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def strict_json(value) -> str:
    """`value` as JSON text with NaN / inf written as null: a bare `NaN` is not JSON, and strict readers reject it."""
    return json.dumps(_finite(value), indent=2, allow_nan=False) + "\n"
