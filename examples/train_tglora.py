# Train TGLoRA (task-grouped LoRA) adapters and one decoder head per task on a multi-task dense-prediction set.
#
# One story, top to bottom: data (`get_dataloaders`) -> backbone + TGLoRA + heads -> a training loop with per-task
# losses, gradient accumulation, clipping, warm-up + cosine schedule, checkpoints every N steps, evaluation every N
# epochs -> adapter + heads + model card in --output_dir -> optionally pushed to the Hub.
#
# It runs unchanged on one CPU, one GPU, several GPUs and several machines:
#   python examples/train_tglora.py --demo                             # the README's demo, ~35 s on a 2-core CPU
#   accelerate launch --multi_gpu --num_processes 2 examples/train_tglora.py --cpu --demo   # 2 gloo CPU processes
#   accelerate launch --multi_gpu --num_processes 8 examples/train_tglora.py --backbone microsoft/swin-tiny-patch4-window7-224 \
#       --dataset pascal_context --data_root /data/PASCAL_MT --image_size 448 --mixed_precision bf16
# Resume mid-epoch, nothing lost: --resume_from_checkpoint OUTPUT_DIR/checkpoints/step_N (or "latest").
# examples/README.md has multi-node, push and inference commands.
import argparse
import json
import logging
import math
import os
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import peft_tglora  # noqa: F401  (registers TGLoRA with PEFT)
from peft_tglora import TGLoraConfig
from peft_tglora.hub import metrics_table, push_folder, write_model_card
from peft_tglora.tasks import (
    DATASETS,
    TASKS,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    build_heads,
    collate,
    default_loss_weights,
    delta_m,
    get_dataset_spec,
    get_task_spec,
    load_multitask_dataset,
    make_synthetic_multitask,
    multitask_loss,
)
from peft_tglora.tasks.training_data import SeededMultiTaskDataset, check_split
from peft_tglora.training import (
    BASE_MODEL_DIR,
    MultiTaskModel,
    build_backbone,
    drop_frozen_weights,
    evaluate,
    save_heads,
    stage_channels,
    weights_digest,
)


# The README's main job: tiny random Swin, 4 PASCAL-style tasks on synthetic scenes, tree 1,1,2,4, about a minute.
DEMO = dict(
    backbone="tiny-swin", dataset="synthetic", tasks="semseg,human_parts,saliency,normals", task_groups="1,1,2,4",
    image_size=64, synthetic_size=256, batch_size=8, num_epochs=6, learning_rate=2e-3, r=8,
    head_width=8, head_hidden=128, eval_every=3, cache_decoded=True, output_dir="tglora-demo", seed=0,
)  # fmt: skip
logger = logging.getLogger("train_tglora")
HYPERPARAMETERS = [  # what a run's results depend on: logged to trackers and written to the model card
    "backbone", "dataset", "tasks", "task_groups", "similarity_file", "r", "lora_alpha", "lora_dropout",
    "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm", "num_epochs", "batch_size",
    "gradient_accumulation_steps", "image_size", "loss_weights", "head_width", "head_hidden", "head_kernel",
    "head_norm", "seed",
]  # fmt: skip


def get_dataloaders(config, args, accelerator):
    """Train / eval loaders; training augmentation is seeded per (epoch, sample) so resumed runs see the same data."""
    tasks, size = config["tasks"], config["image_size"]
    if args.dataset == "synthetic" and args.data_root is None and args.hub_id is None:
        # generated square at the longer side, then resized like any data set; every process alike (deterministic)
        side = size if isinstance(size, int) else max(size)
        train = make_synthetic_multitask(args.synthetic_size, side, tasks, seed=config["seed"])
        val = make_synthetic_multitask(max(args.synthetic_size // 4, 8), side, tasks, seed=config["seed"] + 1)
    else:
        with accelerator.main_process_first():  # the first process downloads / caches, the others read
            kwargs = dict(root=args.data_root, hub_id=args.hub_id, tasks=tasks)
            train = load_multitask_dataset(args.dataset, "train", **kwargs)
            val = load_multitask_dataset(args.dataset, args.eval_split, **kwargs)
    if not args.skip_data_check:
        check_data({"train": train, args.eval_split: val}, tasks, accelerator)
    # decode + resize once (cached with --cache_decoded), then flip and normalise with a per-sample seed
    augment = Compose([RandomHorizontalFlip(0.5), Normalize()])
    train_set = SeededMultiTaskDataset(
        train, tasks, augment, seed=config["seed"], prepare=Resize(size), cache=args.cache_decoded
    )
    common = dict(collate_fn=collate, num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    # own generators: starting an epoch or an evaluation then draws no number from the global RNG, which dropout and
    # stochastic depth use, so a resumed run's model sees the same random numbers as an uninterrupted one
    generator = torch.Generator().manual_seed(config["seed"])
    train_dataloader = DataLoader(
        train_set, batch_size=config["batch_size"], shuffle=True, drop_last=True, generator=generator, **common
    )
    eval_set = SeededMultiTaskDataset(val, tasks, Normalize(), prepare=Resize(size))  # no randomness
    eval_batch_size = args.eval_batch_size or config["batch_size"]
    eval_dataloader = DataLoader(eval_set, batch_size=eval_batch_size, generator=torch.Generator(), **common)
    return train_dataloader, eval_dataloader


def check_data(splits, tasks, accelerator):
    """Decode every row before the first step (each process a share), so a bad file fails now, named."""
    errors = []
    for split, data in splits.items():
        share = range(accelerator.process_index, len(data), accelerator.num_processes)
        errors += check_split(data, tasks, split, share)
    errors = [e for found in gather_object([errors]) for e in found]
    if errors:
        raise ValueError(
            f"{len(errors)} rows cannot be used (fix or remove their files; --skip_data_check skips this scan):\n"
            + "\n".join(errors)
        )


def build_model(config, args, save_base_to=None):
    """Backbone wrapped by TGLoRA, plus one head per task; returns the model and what rebuilds the heads."""
    backbone = build_backbone(config["backbone"], config["image_size"], args.backbone_config, seed=config["seed"])
    if save_base_to is not None:  # a random backbone must travel with its adapter
        backbone.save_pretrained(save_base_to)
    peft_config = TGLoraConfig(
        tasks=config["tasks"], task_groups=config["task_groups"], similarity_file=config["similarity_file"],
        r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
    )  # fmt: skip
    backbone = get_peft_model(backbone, peft_config)
    if args.gradient_checkpointing:  # after wrapping, non-reentrant: see PEFT_NOTES 1.9
        backbone.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    channels = stage_channels(backbone, config["image_size"])
    head_kwargs = dict(
        channels=[config["head_width"] * 2**s for s in range(len(channels))], hidden_channels=config["head_hidden"],
        kernel_size=config["head_kernel"], norm=config["head_norm"],
    )  # fmt: skip
    heads = build_heads(config["tasks"], channels, dataset=config["dataset"], **head_kwargs)
    head_config = {
        "tasks": config["tasks"], "backbone": config["backbone"], "dataset": config["dataset"],
        "image_size": config["image_size"], "in_channels": channels, "head_kwargs": head_kwargs,
        "num_outputs": {t: h.classifier.out_channels for t, h in heads.items()},
        "num_classes": {t: n for t, n in get_dataset_spec(config["dataset"]).num_classes.items() if t in heads},
    }  # fmt: skip
    return MultiTaskModel(backbone, heads), head_config


def log_task_losses(per_task, loss, lr):
    return {"train/loss": loss, "train/lr": lr} | {f"train/loss_{t}": v.item() for t, v in per_task.items()}


def summary(metrics):
    return ", ".join(f"{t} {get_task_spec(t).metric} {m[get_task_spec(t).metric]:.3f}" for t, m in metrics.items())


# ---- checkpoints: OUTPUT_DIR/checkpoints/step_N, written under a temporary name and renamed when complete
def checkpoint_step(path):
    name = Path(path).name
    if not (name.startswith("step_") and name[5:].isdigit()):
        raise ValueError(f"{str(path)!r} is not a checkpoint folder of this script (OUTPUT_DIR/checkpoints/step_N).")
    return int(name[5:])


def complete_checkpoints(output_dir):
    """The complete checkpoints, oldest first (a save killed midway left only a `tmp-step_N` folder)."""
    found = Path(output_dir, "checkpoints").glob("step_*")
    return sorted((p for p in found if p.name[5:].isdigit()), key=checkpoint_step)


def resolve_checkpoint(resume, output_dir):
    if resume != "latest":
        return Path(resume)
    found = complete_checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"No complete checkpoint to resume from in {str(Path(output_dir, 'checkpoints'))!r}.")
    return found[-1]


def save_checkpoint(accelerator, output_dir, step, total_limit):
    """Save to `tmp-step_N`, rename to `step_N` once every process has written, keep the newest `total_limit`."""
    folder = Path(output_dir, "checkpoints", f"step_{step}")
    partial = folder.with_name(f"tmp-{folder.name}")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)  # a resumed run saving a step again
        partial.rename(folder)  # atomic: "latest" only ever sees complete checkpoints
        for old in complete_checkpoints(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint):
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"Checkpoint {str(checkpoint)!r} does not exist.")
    if not (checkpoint / f"random_states_{accelerator.process_index}.pkl").is_file():
        warnings.warn(
            f"{str(checkpoint)!r} has no random_states_{accelerator.process_index}.pkl: the RNG state is not restored, "
            "so the resumed run will NOT be bit-identical to an uninterrupted one (dropout, stochastic depth).",
            stacklevel=2,
        )
    try:
        accelerator.load_state(str(checkpoint), strict=False)  # strict=False: the frozen backbone is not in it
    except Exception as error:
        raise RuntimeError(
            f"Cannot resume from {str(checkpoint)!r} ({type(error).__name__}: {error}): the checkpoint is damaged; "
            "resume from an earlier one in its folder, or start anew."
        ) from error


def prepare_output_dir(accelerator, output_dir, args):
    """Before the first step: `output_dir` must be writable and hold no other run's checkpoints (unless told)."""
    found = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    if found and not args.resume_from_checkpoint and not args.overwrite_output_dir:
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
        if found and args.overwrite_output_dir and not args.resume_from_checkpoint:
            shutil.rmtree(output_dir / "checkpoints")
        for partial in Path(output_dir, "checkpoints").glob("tmp-step_*"):
            logger.warning("Removing %s, an incomplete checkpoint (its save was interrupted).", partial)
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()


def nonfinite(tensors):
    return [name for name, t in tensors if not torch.isfinite(t).all()]


def finite_json(value):
    """Metrics for JSON: NaN / inf become null (a bare NaN is not valid JSON)."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def training_function(config, args):
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        log_with="tensorboard" if args.with_tracking else None, project_dir=str(output_dir / "logs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config["seed"]),
        # a process that stops (rather than dies) makes the others fail after this long instead of waiting forever
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )  # fmt: skip
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(config["seed"])
    tasks = config["tasks"]
    weights = config["loss_weights"]
    prepare_output_dir(accelerator, output_dir, args)  # before any work: a bad folder fails now, not after training

    train_dataloader, eval_dataloader = get_dataloaders(config, args, accelerator)
    random_backbone = config["backbone"] == "tiny-swin" and accelerator.is_main_process
    model, head_config = build_model(config, args, output_dir / BASE_MODEL_DIR if random_backbone else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    # per process, after sharding; the scheduler is stepped once per process per update (Accelerate's convention)
    steps_per_epoch = math.ceil(len(train_dataloader) / config["gradient_accumulation_steps"])
    max_train_steps = args.max_train_steps or config["num_epochs"] * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = accelerator.prepare(
        get_cosine_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(config["warmup_ratio"] * max_train_steps) * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
    )

    # checkpoints hold what training changes (adapters, heads with their norm statistics), not the frozen backbone
    accelerator.register_save_state_pre_hook(drop_frozen_weights(accelerator.unwrap_model(model)))
    if args.with_tracking:
        # TensorBoard takes scalars and strings as hyperparameters
        accelerator.init_trackers(
            "tglora", {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in config.items()}
        )

    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.print(f"Resuming from {checkpoint}")
        load_checkpoint(accelerator, checkpoint)
        completed_steps = checkpoint_step(checkpoint)
        starting_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * config["gradient_accumulation_steps"]

    def checkpoint():
        save_checkpoint(accelerator, output_dir, completed_steps, args.checkpoints_total_limit)

    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    num_classes = head_config["num_classes"]
    metrics, start, skipped = {}, time.perf_counter(), 0
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)  # the shuffle order of this epoch (seeded sampler)
        train_dataloader.dataset.set_epoch(epoch)  # its augmentation
        epoch_loader = train_dataloader
        if epoch == starting_epoch and skip_batches:
            # the skipped batches are never loaded: the sampler skips their indices
            epoch_loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                outputs = model(batch["pixel_values"])
                loss, per_task = multitask_loss({t: o.float() for t, o in outputs.items()}, batch, weights)
                # every process takes the same decision: one NaN anywhere skips (or stops) the step everywhere
                bad = accelerator.reduce(torch.tensor([float(not torch.isfinite(loss))], device=loss.device), "sum")
                if bad.item():
                    skipped += 1
                    losses = {t: round(v.item(), 4) for t, v in per_task.items()}
                    where = f"step {completed_steps + 1} (epoch {epoch}): per-task losses {losses}"
                    if skipped > args.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"Non-finite loss at {where}; stopping, nothing saved (limit --max_nonfinite_steps "
                            f"{args.max_nonfinite_steps}). Lower --learning_rate, raise --warmup_ratio or check the "
                            "labels of these tasks; the last checkpoint is intact."
                        )
                    logger.warning("Non-finite loss at %s: step skipped (%d of at most %d).", where, skipped,
                                   args.max_nonfinite_steps)  # fmt: skip
                    optimizer.zero_grad()  # drop the window's gradients; the step below then changes nothing
                else:
                    accelerator.backward(loss)
                if accelerator.sync_gradients and config["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, config["max_grad_norm"])
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            if args.with_tracking and completed_steps % args.logging_steps == 0:
                accelerator.log(log_task_losses(per_task, loss.item(), lr_scheduler.get_last_lr()[0]), completed_steps)
            if isinstance(args.checkpointing_steps, int) and completed_steps % args.checkpointing_steps == 0:
                checkpoint()
            if args.stop_after_steps and completed_steps >= args.stop_after_steps:
                # emulates a kill: nothing after the last checkpoint is written
                accelerator.print(f"Stopping after step {completed_steps} (--stop_after_steps), as if killed.")
                accelerator.end_training()
                return None
            if completed_steps >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            checkpoint()
        if epoch == num_epochs - 1 or (epoch + 1) % args.eval_every == 0:
            metrics = evaluate(model, eval_dataloader, tasks, num_classes, accelerator.gather_for_metrics)
            accelerator.print(f"epoch {epoch}: {summary(metrics)}")
            if args.with_tracking:
                accelerator.log(
                    {f"eval/{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}, completed_steps
                )
    progress.close()
    train_time = time.perf_counter() - start

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # every process reports a digest of its trainable weights: they must all agree after DDP training
    digests = gather_object([weights_digest(unwrapped)])
    broken = nonfinite((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad)
    if broken:  # never save (or push) weights that cannot predict anything
        raise FloatingPointError(f"{len(broken)} trained tensors hold NaN / inf (e.g. {broken[:3]}); nothing saved.")
    pushed = True
    if accelerator.is_main_process:
        pushed = save_outputs(unwrapped, config, args, head_config, metrics, digests, train_time, completed_steps)
    accelerator.end_training()
    if not pushed:  # the local results are complete, but a job script must see the failure
        raise SystemExit(f"Push to {args.hub_model_id!r} failed; the results are saved in {output_dir.resolve()}.")
    return metrics


def save_outputs(unwrapped, config, args, head_config, metrics, digests, train_time, completed_steps):
    output_dir = Path(args.output_dir)
    unwrapped.backbone.save_pretrained(output_dir)  # adapter_config.json + adapter_model.safetensors
    save_heads(unwrapped.heads, head_config, output_dir)
    dm = delta_m(metrics, args.baselines, config["tasks"]) if args.baselines else None
    primary = {t: get_task_spec(t).metric for t in config["tasks"]}
    results = {
        "metrics": metrics, "delta_m": dm, "steps": completed_steps, "train_time_s": round(train_time, 2),
        "weight_digests": digests, "weights_in_sync": len(set(digests)) == 1,
    }  # fmt: skip
    (output_dir / "all_results.json").write_text(json.dumps(finite_json(results), indent=2, allow_nan=False) + "\n")
    peft_config = unwrapped.backbone.peft_config["default"]
    write_model_card(
        output_dir, repo_id=args.hub_model_id, tasks=config["tasks"], task_groups=peft_config.task_groups,
        r=config["r"], backbone=config["backbone"], dataset=config["dataset"], image_size=config["image_size"],
        metrics=metrics, primary=primary, delta_m=dm, base_model_included=(output_dir / BASE_MODEL_DIR).is_dir(),
        training={k: config[k] for k in HYPERPARAMETERS if config.get(k) is not None},
    )  # fmt: skip
    print(metrics_table(metrics, primary) + (f"\n\nΔm: {dm:+.2f}%" if dm is not None else ""))
    print(
        f"Saved adapter, heads and model card to {output_dir.resolve()} ({completed_steps} steps, {train_time:.0f} s)"
    )
    if args.push_to_hub and push_folder(output_dir, args.hub_model_id, token=args.hub_token) is None:
        print(f"Push to {args.hub_model_id!r} failed; the local results in {output_dir.resolve()} are intact.")
        return False
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train TGLoRA adapters and task heads (see examples/README.md).")
    p.add_argument("--demo", action="store_true", help="The README's demo preset (explicit flags still win).")
    # hyperparameters (logged, and written to the model card)
    p.add_argument("--backbone", default="tiny-swin", help="'tiny-swin' (random init) or a Hub id / path.")
    p.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS))
    p.add_argument("--tasks", default=None, help="Comma-separated; default: the dataset's tasks.")
    p.add_argument("--task_groups", default="1,1,2,4", help="Groups per stage, 'shared', 'per_task' or a JSON tree.")
    p.add_argument("--similarity_file", default=None, help="Similarity JSON to group tasks by.")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=None, help="Default: r.")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup_ratio", type=float, default=0.05)
    p.add_argument("--max_grad_norm", type=float, default=5.0)
    p.add_argument("--num_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8, help="Per process.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--image_size", type=image_size, default=224, help="Side, or H,W (e.g. 120,160).")
    p.add_argument("--loss_weights", default=None, help="e.g. 'semseg=1,normals=10'; default: the dataset's recipe.")
    p.add_argument("--head_width", type=int, default=18, help="Stage-1 width of each head (18: MTLoRA's HRNet-18).")
    p.add_argument("--head_hidden", type=int, default=None, help="Fusion width; default 4x the summed widths.")
    p.add_argument("--head_kernel", type=int, default=1, choices=[1, 3])
    p.add_argument("--head_norm", default="batch", choices=["batch", "group"])
    p.add_argument("--seed", type=int, default=0)
    # environment
    p.add_argument("--backbone_config", type=json.loads, default=None, help="JSON overrides of the tiny-swin config.")
    p.add_argument("--data_root", default=None, help="Local folder in the layout of docs/TASKS.md.")
    p.add_argument("--hub_id", default=None, help="A data set for datasets.load_dataset.")
    p.add_argument("--eval_split", default="val")
    p.add_argument("--synthetic_size", type=int, default=64, help="Training images of the synthetic set.")
    p.add_argument("--eval_batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--cache_decoded", action="store_true", help="Keep decoded training images in memory.")
    p.add_argument("--output_dir", default="tglora-output")
    p.add_argument("--overwrite_output_dir", action="store_true", help="Delete another run's checkpoints there.")
    p.add_argument("--skip_data_check", action="store_true", help="Skip decoding every row before training.")
    p.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs.")
    p.add_argument("--eval_every", type=int, default=1, help="Evaluate every N epochs (and always at the end).")
    p.add_argument("--checkpointing_steps", default=None, help="Save state every N steps, or 'epoch'.")
    p.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep the newest N checkpoints (0: all).")
    p.add_argument("--max_nonfinite_steps", type=int, default=0, help="Skip up to N NaN/inf-loss steps, then stop.")
    p.add_argument("--ddp_timeout", type=int, default=1800, help="Seconds a process waits for the others.")
    p.add_argument("--resume_from_checkpoint", default=None, help="A checkpoints/step_N folder, or 'latest'.")
    p.add_argument("--stop_after_steps", type=int, default=None, help="Exit after N steps as if killed (tests).")
    p.add_argument("--with_tracking", action="store_true", help="Log to TensorBoard in OUTPUT_DIR/logs.")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--baselines", default=None, help="Single-task metrics JSON: adds Δm to results and card.")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    if args.demo:
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id (e.g. your-name/tglora-pascal).")
    try:
        args.tasks, args.task_groups, args.loss_weights = parse_task_options(args)
    except ValueError as error:
        p.error(str(error))
    return args


def image_size(value):
    """`224` -> 224; `120,160` -> [120, 160] (H, W)."""
    sides = [int(v) for v in value.split(",")]
    if len(sides) not in (1, 2) or min(sides) < 8:
        raise argparse.ArgumentTypeError(f"{value!r}: give one side or H,W, each at least 8 (e.g. 224 or 120,160).")
    return sides[0] if len(sides) == 1 else sides


def parse_task_groups(value, tasks):
    """`1,1,2,4`, `shared`, `per_task`, or a JSON tree of task names (whose names must be in `tasks`)."""
    if not value.lstrip().startswith("["):
        return value
    tree = json.loads(value)
    unknown = sorted({t for stage in tree for group in stage for t in group} - set(tasks))
    if unknown:
        raise ValueError(f"--task_groups names tasks {unknown} that are not in --tasks {tasks}.")
    return tree


def parse_task_options(args):
    """--tasks, --task_groups, --loss_weights -> (tasks, groups, weights); any unknown task name is an error."""
    known = list(get_dataset_spec(args.dataset).tasks)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else known
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" (tasks in the table: {sorted(TASKS)})" if set(unknown) - set(TASKS) else ""
        raise ValueError(f"--tasks {unknown} are not tasks of --dataset {args.dataset} {known}{where}.")
    weights = default_loss_weights(args.dataset, tasks)
    for item in filter(None, (args.loss_weights or "").split(",")):
        task, _, value = item.partition("=")
        if task.strip() not in tasks:
            raise ValueError(f"--loss_weights names {task.strip()!r}, which is not one of the tasks {tasks}.")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--loss_weights {item!r}: write task=number, e.g. normals=10.") from None
        if not math.isfinite(weights[task.strip()]) or weights[task.strip()] < 0:
            raise ValueError(f"--loss_weights {item!r}: the weight must be a finite number >= 0.")
    return tasks, parse_task_groups(args.task_groups, tasks), weights


def main(argv=None):
    args = parse_args(argv)
    config = {k: getattr(args, k) for k in HYPERPARAMETERS}
    config.update(lora_alpha=args.lora_alpha or args.r)
    return training_function(config, args)


if __name__ == "__main__":
    main()
