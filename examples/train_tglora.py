# Train TGLoRA (task-grouped LoRA) adapters and one decoder head per task on a multi-task dense-prediction set.
#
# One story, top to bottom: data (`get_dataloaders`) -> backbone + TGLoRA + heads -> a training loop with per-task
# losses, gradient accumulation, clipping, warm-up + cosine schedule, checkpoints every N steps, evaluation every N
# epochs -> adapter + heads + model card in --output_dir -> optionally pushed to the Hub.
#
# It runs unchanged on one CPU, one GPU, several GPUs and several machines:
#   python examples/train_tglora.py --demo                             # the README's demo, ~35 s on a 2-core CPU
#   accelerate launch --multi_gpu --num_processes 2 examples/train_tglora.py --cpu --demo   # 2 gloo CPU processes
# Resume mid-epoch, nothing lost: --resume_from_checkpoint OUTPUT_DIR/checkpoints/step_N (or "latest"). A fault (NaN
# loss, bad file, unwritable folder, failed push, stalled process) stops the run with an error that names it.
# examples/README.md has GPU, multi-node, push and inference commands.
import argparse
import json
import logging
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import peft_tglora  # noqa: F401  (registers TGLoRA with PEFT)
import peft_tglora.tasks.model as multitask
from peft_tglora import TGLoraConfig
from peft_tglora._registration import upstream_deprecations_silenced
from peft_tglora.tasks import (
    DATASETS,
    build_dataloaders,
    delta_m,
    evaluation,
    grouping,
    hub,
    multitask_loss,
    options,
    safeguards,
    training_data,
)


# The README's main job: tiny random Swin, 4 PASCAL-style tasks on synthetic scenes, tree 1,1,2,4, about a minute.
DEMO = dict(
    backbone="tiny-swin", dataset="synthetic", tasks="semseg,human_parts,saliency,normals", task_groups="1,1,2,4",
    image_size=64, synthetic_size=256, batch_size=8, num_epochs=6, learning_rate=2e-3, r=8,
    head_width=8, head_hidden=128, eval_every=3, cache_decoded=True, output_dir="tglora-demo", seed=0,
)  # fmt: skip
HYPERPARAMETERS = [  # what a run's results depend on: logged to trackers and written to the model card
    "backbone", "dataset", "tasks", "task_groups", "similarity_file", "r", "lora_alpha", "lora_dropout",
    "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm", "num_epochs", "batch_size",
    "gradient_accumulation_steps", "image_size", "loss_weights", "head_width", "head_hidden", "head_kernel",
    "head_norm", "seed",
]  # fmt: skip


def get_dataloaders(config, args, accelerator):
    """Train / eval loaders; training augmentation is seeded per (epoch, sample) so resumed runs see the same data."""
    tasks, size = config["tasks"], config["image_size"]
    with accelerator.main_process_first():  # the first process downloads / caches, the others read
        train, val = training_data.load_splits(
            args.dataset, tasks, args.eval_split, root=args.data_root, hub_id=args.hub_id,
            synthetic_size=args.synthetic_size, image_size=size, seed=config["seed"],
        )  # fmt: skip
    if not args.skip_data_check:
        training_data.check_splits({"train": train, args.eval_split: val}, tasks, accelerator)
    # decode + resize once (cached with --cache_decoded), then scale / rotate, flip, normalise with a per-sample seed
    augment = options.augmentation(args.augmentation, args.dataset)
    return build_dataloaders(
        train, val, tasks, image_size=size, batch_size=config["batch_size"], eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers, seed=config["seed"], augment=augment, cache=args.cache_decoded,
        pin_memory=torch.cuda.is_available(),
    )  # fmt: skip


def build_model(config, args, save_base_to=None):
    """Backbone wrapped by TGLoRA, plus one head per task."""
    backbone = multitask.build_backbone(
        config["backbone"], config["image_size"], args.backbone_config, seed=config["seed"]
    )
    if save_base_to is not None:  # a random backbone must travel with its adapter
        backbone.save_pretrained(save_base_to)
    peft_config = TGLoraConfig(
        tasks=config["tasks"], task_groups=config["task_groups"], similarity_file=config["similarity_file"],
        r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
    )  # fmt: skip
    with upstream_deprecations_silenced():  # PEFT 0.21 reads a deprecated transformers property
        backbone = get_peft_model(backbone, peft_config)
    if args.gradient_checkpointing:  # after wrapping, non-reentrant: see PEFT_NOTES 1.9
        backbone.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return multitask.build_multitask_model(
        backbone, config["tasks"], config["dataset"], config["image_size"], config["backbone"],
        head_width=config["head_width"], hidden_channels=config["head_hidden"], kernel_size=config["head_kernel"],
        norm=config["head_norm"],
    )  # fmt: skip


# checkpoints: OUTPUT_DIR/checkpoints/step_N (complete ones only: safeguards.save_checkpoint renames when written)
def checkpoint_step(path):
    name = Path(path).name
    if not (name.startswith("step_") and name[5:].isdigit()):
        raise ValueError(f"{str(path)!r} is not a checkpoint folder of this script (OUTPUT_DIR/checkpoints/step_N).")
    return int(name[5:])


def resolve_checkpoint(resume, output_dir):
    if resume != "latest":
        return Path(resume)
    found = safeguards.complete_checkpoints(Path(output_dir, "checkpoints"))
    if not found:
        raise FileNotFoundError(f"No complete checkpoint to resume from in {str(Path(output_dir, 'checkpoints'))!r}.")
    return found[-1]


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
    tasks, weights = config["tasks"], config["loss_weights"]
    # before any work: a bad folder fails now, not after training
    safeguards.check_output_dir(accelerator, output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)

    train_dataloader, eval_dataloader = get_dataloaders(config, args, accelerator)
    if str(config["task_groups"]).startswith("auto"):  # the tree from a gradient similarity on the frozen backbone
        shared = build_model({**config, "task_groups": "shared"}, args)  # writes similarity.json/.png, logs the tree
        config["task_groups"] = grouping.auto_task_groups(shared, train_dataloader, config["task_groups"], output_dir,
                                                          accelerator=accelerator).tree  # fmt: skip
    random_backbone = config["backbone"] == "tiny-swin" and accelerator.is_main_process
    model = build_model(config, args, output_dir / multitask.BASE_MODEL_DIR if random_backbone else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    # per process, after sharding; the scheduler is stepped once per process per update (Accelerate's convention)
    steps_per_epoch = math.ceil(len(train_dataloader) / config["gradient_accumulation_steps"])
    max_train_steps = args.max_train_steps or config["num_epochs"] * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = int(config["warmup_ratio"] * max_train_steps)
    lr_scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(
        optimizer, warmup_steps * accelerator.num_processes, max_train_steps * accelerator.num_processes
    ))  # fmt: skip

    # checkpoints hold what training changes (adapters, heads with their norm statistics), not the frozen backbone
    accelerator.register_save_state_pre_hook(multitask.drop_frozen_weights(accelerator.unwrap_model(model)))
    if args.with_tracking:
        # TensorBoard takes scalars and strings as hyperparameters
        accelerator.init_trackers(
            "tglora", {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in config.items()}
        )

    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.print(f"Resuming from {checkpoint}")
        safeguards.load_checkpoint(accelerator, checkpoint)
        completed_steps = checkpoint_step(checkpoint)
        starting_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * config["gradient_accumulation_steps"]

    def checkpoint():
        folder = output_dir / "checkpoints" / f"step_{completed_steps}"
        safeguards.save_checkpoint(accelerator, folder, args.checkpoints_total_limit)

    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    num_classes = accelerator.unwrap_model(model).heads.info["num_classes"]
    skip_nonfinite = safeguards.NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    metrics, start = {}, time.perf_counter()
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
                if skip_nonfinite(loss, per_task, completed_steps + 1):  # the same decision on every process
                    optimizer.zero_grad()  # drop the window's gradients: the step below then changes nothing
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
                logs = {"train/loss": loss.item(), "train/lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs | {f"train/loss_{t}": v.item() for t, v in per_task.items()}, completed_steps)
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
            metrics = evaluation.evaluate(model, eval_dataloader, tasks, num_classes, accelerator.gather_for_metrics)
            accelerator.print(f"epoch {epoch}: {evaluation.summary(metrics)}")
            if args.with_tracking:
                accelerator.log(
                    {f"eval/{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}, completed_steps
                )
    progress.close()
    train_time = time.perf_counter() - start

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    safeguards.check_finite(unwrapped)  # never save (or push) weights that cannot predict anything
    pushed = True
    if accelerator.is_main_process:
        pushed = save_outputs(unwrapped, config, args, metrics, train_time, completed_steps)
    accelerator.end_training()
    if not pushed:  # the local results are complete, but a job script must see the failure
        raise SystemExit(f"Push to {args.hub_model_id!r} failed; the results are saved in {output_dir.resolve()}.")
    return metrics


def save_outputs(unwrapped, config, args, metrics, train_time, completed_steps):
    output_dir = Path(args.output_dir)
    unwrapped.save_pretrained(output_dir)  # the adapter (with PEFT's card) and heads/
    dm = delta_m(metrics, args.baselines, config["tasks"]) if args.baselines else None
    results = {"metrics": metrics, "delta_m": dm, "steps": completed_steps, "train_time_s": round(train_time, 2)}
    (output_dir / "all_results.json").write_text(safeguards.strict_json(results))
    hub.write_model_card(
        output_dir, repo_id=args.hub_model_id, tasks=config["tasks"], r=config["r"], backbone=config["backbone"],
        task_groups=unwrapped.backbone.peft_config["default"].task_groups, dataset=config["dataset"],
        image_size=config["image_size"], metrics=metrics, delta_m=dm,
        base_model_included=(output_dir / multitask.BASE_MODEL_DIR).is_dir(),
        training={k: config[k] for k in HYPERPARAMETERS if config.get(k) is not None},
    )  # fmt: skip
    print(hub.metrics_table(metrics) + (f"\n\nΔm: {dm:+.2f}%" if dm is not None else ""))
    print(f"Saved adapter, heads and card to {output_dir.resolve()} ({completed_steps} steps, {train_time:.0f} s)")
    if args.push_to_hub and hub.push_folder(output_dir, args.hub_model_id, token=args.hub_token) is None:
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
    p.add_argument("--task_groups", default="1,1,2,4", help="1,1,2,4, shared, per_task, JSON tree, auto:1,1,2,4.")
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
    p.add_argument("--image_size", type=str, default="224", help="Side, or H,W (e.g. 120,160).")
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
    p.add_argument("--augmentation", default="reference", choices=options.AUGMENTATIONS)
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
        args.image_size = options.parse_image_size(str(args.image_size))
        args.tasks = options.parse_tasks(args.tasks, args.dataset)
        args.task_groups = options.parse_task_groups(args.task_groups, args.tasks)
        args.loss_weights = options.parse_loss_weights(args.loss_weights, args.dataset, args.tasks)
    except ValueError as error:  # a typo in a task name is an error that lists the known ones
        p.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    config = {k: getattr(args, k) for k in HYPERPARAMETERS}
    config.update(lora_alpha=args.lora_alpha or args.r)
    return training_function(config, args)


if __name__ == "__main__":
    main()
