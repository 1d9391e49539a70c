"""One run of the accuracy benchmark in its own process: train a variant and score it, or compute the task similarity.

`bench_accuracy.py` starts `worker JSON` processes that call `work`; the recipe and the paths come in the job. Each
process is single-threaded and seeded, saves its adapter and heads under `runs/<run>/` (so `score_saved` can re-score
them on any split) and writes its summary to `<run>.json`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch


NUM_CLASSES = {"semseg": 11}
# How a run weighs its task losses. "camvid_default": camvid's DatasetSpec weights, which balance trivial predictions
# (the first two benchmarks). "initial", losses balanced at initialisation: each run computes, on its first training
# batch, before any update (heads at their seed's init, adapters at identity), each task's unweighted loss L_t(0), and
# trains with weights w_t = 1 / L_t(0), so every weighted loss starts at 1 (the normalisation by initial loss that
# GradNorm and DWA start from). The same rule for every row, single-task references included.
LOSS_BALANCE = ("camvid_default", "initial")
DEFAULT_BALANCE = "camvid_default"


def loss_weights(rule: str, first_losses: dict[str, float]) -> dict[str, float]:
    """The weight of each task in `first_losses` (its unweighted loss on the run's first batch) under `rule`."""
    from peft_tglora.tasks import default_loss_weights

    if rule == "camvid_default":
        return default_loss_weights("camvid", list(first_losses))
    if rule != "initial":
        raise ValueError(f"loss_balance={rule!r} is not one of {LOSS_BALANCE}.")
    bad = {t: v for t, v in first_losses.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"loss_balance='initial' needs positive, finite first-batch losses; got {bad}.")
    return {t: 1.0 / v for t, v in first_losses.items()}


def first_step_loss(outputs: dict, batch: dict, rule: str) -> tuple[torch.Tensor, dict[str, float], dict]:
    """
    The first batch's weighted loss (with its graph), the run's loss weights under `rule` and the first batch's
    losses, `{task: {"loss", "weighted"}}`: the weights are set from these losses before the first update.
    """
    from peft_tglora.tasks import multitask_loss

    _, per_task = multitask_loss(outputs, batch)
    weights = loss_weights(rule, {t: v.item() for t, v in per_task.items()})
    loss, per_task = multitask_loss(outputs, batch, weights)
    init_losses = {t: {"loss": v.item(), "weighted": v.item() * weights[t]} for t, v in per_task.items()}
    return loss, weights, init_losses


def _datasets(job: dict, tasks, split: str = "val", root=None, with_train: bool = True):
    from peft_tglora.tasks import load_multitask_dataset

    root = root or job["data_root"]
    train = load_multitask_dataset("camvid", "train", root=root, tasks=tasks) if with_train else None
    evaluation = load_multitask_dataset("camvid", split, root=root, tasks=tasks)
    if job.get("quick"):
        from bench_accuracy import QUICK

        train = train.select(range(QUICK["train_frames"])) if train is not None else None
        evaluation = evaluation.select(range(QUICK["eval_frames"]))
    return train, evaluation


class _SeededFrames(torch.utils.data.Dataset):
    """Decoded frames kept in memory; row i of epoch e is flipped from a generator seeded by (seed, e, i)."""

    def __init__(self, dataset, tasks, recipe: dict, seed: int):
        from peft_tglora.tasks import Compose, Normalize, RandomHorizontalFlip, Resize, decode_example

        resize = Resize(recipe["image_size"])
        self.samples = [resize(decode_example(dataset[i], tasks)) for i in range(len(dataset))]
        self.augment = Compose([RandomHorizontalFlip(0.5), Normalize()])
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        state = np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        return self.augment(dict(self.samples[i]), generator)


def _train_loader(train, tasks, recipe: dict, seed: int):
    from peft_tglora.tasks import collate

    return torch.utils.data.DataLoader(
        _SeededFrames(train, tasks, recipe, seed), batch_size=recipe["batch_size"], shuffle=True, drop_last=True,
        collate_fn=collate, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def save_run(folder: Path, backbone, heads, head_config: dict) -> None:
    from safetensors.torch import save_file

    backbone.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
    save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, folder / "heads.safetensors")
    (folder / "heads_config.json").write_text(json.dumps(head_config, indent=1) + "\n")


def load_run(folder: Path):
    """The model saved by `save_run`, in eval mode, and its head config."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    import peft_tglora  # noqa: F401  (registers TGLoRA with PEFT)
    from peft_tglora.tasks import build_heads
    from peft_tglora.tasks.model import MultiTaskModel

    head_config = json.loads((folder / "heads_config.json").read_text())
    base = folder / "base_model" if (folder / "base_model").is_dir() else head_config["backbone"]
    backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)
    heads = build_heads(
        head_config["tasks"], head_config["in_channels"], dataset="camvid", **head_config["head_kwargs"]
    )
    heads.load_state_dict(load_file(folder / "heads.safetensors"))
    return MultiTaskModel(backbone, heads).eval(), head_config


def _eval_loader(evaluation, tasks, recipe: dict):
    from peft_tglora.tasks import MultiTaskDataset, collate, eval_transforms

    dataset = MultiTaskDataset(evaluation, tasks, eval_transforms(recipe["image_size"]))
    return torch.utils.data.DataLoader(dataset, batch_size=recipe["eval_batch_size"], collate_fn=collate)


def _backbone(job: dict):
    """The frozen backbone: the pretrained folder, or (sanity row) a random model of the same config."""
    from transformers import AutoConfig, AutoModel

    if job.get("variant") == "random_backbone":
        torch.manual_seed(job["seed"])
        return AutoModel.from_config(AutoConfig.from_pretrained(job["backbone"]))
    return AutoModel.from_pretrained(job["backbone"])


def _peft(job: dict, backbone):
    from peft import get_peft_model

    import peft_tglora  # noqa: F401  (registers TGLoRA with PEFT)
    from peft_tglora import TGLoraConfig

    config = TGLoraConfig(tasks=job["tasks"], task_groups=job["task_groups"], r=job["r"], lora_alpha=job["r"])
    model = get_peft_model(backbone, config)
    if job.get("variant") == "heads_only":  # B = 0 and frozen: the adapter is the identity, only heads train
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _heads(job: dict, backbone, recipe: dict):
    from peft_tglora.tasks import build_heads
    from peft_tglora.tasks.model import stage_channels

    channels = stage_channels(backbone, recipe["image_size"])
    head_kwargs = dict(
        channels=[recipe["head_width"] * 2**s for s in range(len(channels))], hidden_channels=recipe["head_hidden"],
        kernel_size=recipe["head_kernel"], norm=recipe["head_norm"],
    )  # fmt: skip
    torch.manual_seed(job["seed"])
    heads = build_heads(job["tasks"], channels, dataset="camvid", **head_kwargs)
    head_config = {
        "tasks": job["tasks"], "backbone": job["backbone"], "dataset": "camvid", "image_size": recipe["image_size"],
        "in_channels": channels, "head_kwargs": head_kwargs,
        "num_outputs": {t: h.classifier.out_channels for t, h in heads.items()},
        "num_classes": {t: n for t, n in NUM_CLASSES.items() if t in heads},
    }  # fmt: skip
    return heads, head_config


def _macs(model, recipe: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *recipe["image_size"]))
    return counter.get_total_flops() // 2


def train_run(job: dict) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from peft_tglora.tasks import multitask_loss
    from peft_tglora.tasks.evaluation import evaluate
    from peft_tglora.tasks.model import MultiTaskModel

    recipe, tasks, seed = job["recipe"], job["tasks"], job["seed"]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    train, val = _datasets(job, tasks)
    loader = _train_loader(train, tasks, recipe, seed)
    base = _backbone(job)
    run_dir = Path(job["out"]) / "runs" / job["slug"]
    if job["variant"] == "random_backbone":  # its weights exist nowhere else; saved before adapters are injected
        base.save_pretrained(run_dir / "base_model")
    torch.manual_seed(seed)  # LoRA's A matrices; runs with one seed share adapter init, head init and data order
    backbone = _peft(job, base)
    adapter_params = sum(p.numel() for p in backbone.parameters() if p.requires_grad)  # the tuner's trainable count
    heads, head_config = _heads(job, backbone, recipe)
    model = MultiTaskModel(backbone, heads)
    weights = None  # set on the first batch by `first_step_loss`, from the job's loss_balance rule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    steps = QUICK_STEPS if job.get("quick") else recipe["epochs"] * len(loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(recipe["warmup_ratio"] * steps), steps)
    torch.manual_seed(seed)
    model.train()
    step, init_losses, epoch = 0, None, 0
    while step < steps:
        loader.dataset.epoch = epoch
        for batch in loader:
            outputs = model(batch["pixel_values"])
            if weights is None:
                loss, weights, init_losses = first_step_loss(outputs, batch, job.get("loss_balance", DEFAULT_BALANCE))
                per_task = {t: v["loss"] for t, v in init_losses.items()}
            else:
                loss, per_task = multitask_loss(outputs, batch, weights)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"Loss is {loss.item()} at step {step}; per task {per_task}.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    train_cpu = time.process_time() - cpu0
    metrics = evaluate(model, _eval_loader(val, tasks, recipe), tasks, NUM_CLASSES)
    save_run(run_dir, backbone, heads, head_config)
    peft_config = backbone.peft_config["default"]
    return dict(
        kind="train", **{k: job[k] for k in ("name", "variant", "arm", "tasks", "r", "seed")},
        task_groups=peft_config.task_groups, adapter_params=adapter_params,
        head_params=sum(p.numel() for p in heads.parameters()), macs=_macs(model, recipe), steps=step,
        epochs=recipe["epochs"], metrics=metrics, init_losses=init_losses, loss_weights=weights,
        loss_balance=job.get("loss_balance", DEFAULT_BALANCE),
        cpu_s=round(time.process_time() - cpu0, 1), train_cpu_s=round(train_cpu, 1),
        wall_s=round(time.perf_counter() - wall0, 1), torch_threads=torch.get_num_threads(), recipe=recipe,
        backbone=job["backbone"],
    )  # fmt: skip


QUICK_STEPS = 2


def similarity_run(job: dict) -> dict:
    """
    The paper's gradient similarity on the frozen pretrained backbone with the run's heads and losses, averaged over
    seeds by `peft_tglora.tasks.grouping.group_tasks`, which also reports whether each seed and each half of the
    batches gives the average's partition (its stage-2 `stable` flag is rule (B)'s stability).
    """
    from accuracy_report import partition_label, tree_for_partition
    from bench_accuracy import QUICK, SIMILARITY, TASKS

    from peft_tglora.tasks.grouping import group_tasks, run_losses

    recipe, tasks = job["recipe"], job.get("tasks") or TASKS
    cpu0 = time.process_time()
    train, _ = _datasets(job, tasks)
    seeds = SIMILARITY["seeds"][:1] if job.get("quick") else SIMILARITY["seeds"]
    num_batches = QUICK["similarity_batches"] if job.get("quick") else SIMILARITY["num_batches"]
    warmup = QUICK["similarity_warmup"] if job.get("quick") else SIMILARITY["head_warmup_steps"]
    backbone = _peft(dict(job, tasks=tasks, task_groups="shared", r=1, seed=0), _backbone(job))
    heads, _ = _heads(dict(job, tasks=tasks, seed=0), backbone, recipe)  # re-initialised from each seed
    grouping = group_tasks(
        backbone, dict(heads), run_losses(tasks), _train_loader(train, tasks, recipe, 0), [1, 1, 2, 4],
        num_batches=num_batches, seeds=seeds, head_warmup_steps=warmup, head_warmup_lr=SIMILARITY["head_warmup_lr"],
        disable_progress=True,
    )  # fmt: skip
    report = grouping.stability
    stage = report["stages"][2]
    partition = stage["partition"]
    return dict(
        kind="similarity", tasks=tasks, seeds=list(seeds), num_batches=num_batches, head_warmup_steps=warmup,
        mean_matrix=np.asarray(grouping.similarity.matrix).tolist(), partition=partition,
        tree=tree_for_partition(tasks, partition), row_name=f"partition {partition_label(partition)}",
        seed_partitions=[partition_label(t[2]) for t in report["partitions_per_seed"]],
        half_partitions=[[partition_label(h[2]) for h in pair] for pair in report["partitions_per_half"]],
        stable=bool(stage["stable"]), seed_agreement=stage["seed_agreement"], half_agreement=stage["half_agreement"],
        stability=report, cpu_s=round(time.process_time() - cpu0, 1),
    )  # fmt: skip


def work(job: dict) -> None:
    from bench_accuracy import slug

    torch.set_num_threads(1)
    if job["kind"] == "similarity":
        summary, name = similarity_run(job), "similarity"
    else:
        job = dict(job, slug=slug(job["name"], job["seed"]))
        summary, name = train_run(job), job["slug"]
    (Path(job["out"]) / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")


def score_saved(folder: Path, root, split: str, quick: bool = False) -> dict:
    """Metrics of a saved run (adapter + heads, backbone from `heads_config.json` or `base_model/`) on `split`."""
    from peft_tglora.tasks.evaluation import evaluate

    torch.set_num_threads(1)
    model, head_config = load_run(folder)
    recipe = dict(image_size=head_config["image_size"], eval_batch_size=16)
    _, evaluation = _datasets({"quick": quick}, head_config["tasks"], split=split, root=root, with_train=False)
    loader = _eval_loader(evaluation, head_config["tasks"], recipe)
    return evaluate(model, loader, head_config["tasks"], NUM_CLASSES)
