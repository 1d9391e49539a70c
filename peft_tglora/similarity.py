"""Gradient-based task similarity (METHOD.md, "Task similarity"): which tasks should share adapters.

similarity(t, t') is the mean over pairs of batches (b from t's data, b' from t''s data) of
S(g_t(b), g_t'(b')) = cos(g / (|g| + |g'|), g' / (|g| + |g'|)), where g is the gradient of a task's loss on one batch
with respect to the shared parameters. A cosine is scale-free, so the 1 / (|g| + |g'|) factors cancel for every pair,
and the mean of cosines over all pairs equals the dot product of the two tasks' means of unit gradients. So we keep one
running sum of unit vectors per task (memory: T flat vectors), and one matrix product compares all tasks at the end.
The diagonal is set to 1, the paper's S(g, g) = 1; the mean cosine between different batches of the same task (how
consistent a task's gradients are) is kept separately as ``within_task``.

To tell a similarity from noise, the sums are kept for the even and the odd batches apart (two disjoint halves): each
half gives its own matrix (``half_matrices``), and the cosine between a task's mean unit gradient on one half and a
task's on the other (``half_cosine``) puts within-task consistency (its diagonal) next to between-task similarity.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from .clustering import TaskSimilarity


__all__ = ["TaskSimilarity", "compute_task_similarity", "shared_parameters"]

logger = logging.getLogger(__name__)

FeaturesFn = Callable[[nn.Module, torch.Tensor], Mapping[str, object]]


def shared_parameters(backbone: nn.Module, wrt: str | Iterable[torch.Tensor] = "backbone") -> list[torch.Tensor]:
    """The parameters θ_s that task gradients are taken for.

    ``"backbone"`` (the paper's choice): the frozen weights of the adapted layers (PEFT ``BaseTunerLayer``s); on a
    model without adapted layers, every parameter of the backbone. ``"adapters"``: the trainable parameters inside the
    adapted layers. Any iterable of tensors is used as given.
    """
    if not isinstance(wrt, str):
        params = list(wrt)
        if not params or not all(isinstance(p, torch.Tensor) and p.is_leaf for p in params):
            raise ValueError("wrt must be 'backbone', 'adapters' or a non-empty list of leaf tensors (parameters).")
    else:
        layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
        if wrt == "backbone" and layers:
            params = [getattr(layer.get_base_layer(), "weight", None) for layer in layers]
            params = [p for p in params if p is not None]
        elif wrt == "backbone":
            logger.info("The backbone has no adapted (BaseTunerLayer) layers; using all its parameters as shared.")
            params = list(backbone.parameters())
        elif wrt == "adapters":
            params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    "wrt='adapters' found no trainable parameter inside adapted layers of the backbone; wrap it with "
                    "get_peft_model(...) first, or use wrt='backbone'."
                )
        else:
            raise ValueError(f"wrt={wrt!r} is not supported; use 'backbone', 'adapters' or a list of parameters.")
    unique = {id(p): p for p in params}  # tied weights count once
    return list(unique.values())


class _SignedBucketProjection:
    """Seeded random projection R^D -> R^k that preserves inner products in expectation (a count sketch).

    Each coordinate gets a random sign and lands in one of k buckets through a random permutation (balanced buckets);
    the cost is O(D) time and memory, unlike a dense Gaussian matrix, and indexing is deterministic on every device.
    """

    def __init__(self, dim_in: int, dim_out: int, seed: int, device: torch.device):
        generator = torch.Generator().manual_seed(seed)  # CPU generator: the same projection on every device
        self.dim_in, self.padded = dim_in, math.ceil(dim_in / dim_out) * dim_out
        self.dim_out = dim_out
        self.perm = torch.randperm(self.padded, generator=generator).to(device)
        self.signs = (torch.randint(0, 2, (dim_in,), generator=generator) * 2 - 1).to(device, torch.float32)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        padded = vector.new_zeros(self.padded)
        padded[: self.dim_in] = vector * self.signs
        return padded[self.perm].view(self.dim_out, -1).sum(dim=1)


def _default_features(backbone: nn.Module, pixel_values: torch.Tensor):
    out = backbone(pixel_values)
    features = out.get("task_features") if isinstance(out, Mapping) else getattr(out, "task_features", None)
    if features is None:
        raise ValueError(
            f"backbone(pixel_values) returned {type(out).__name__} without `task_features`; wrap the backbone with "
            "get_peft_model(model, TGLoraConfig(tasks=..., task_groups='shared')) or pass features_fn=..."
        )
    return features


def _check_tasks(heads, losses, dataloaders) -> tuple[list[str], list[tuple[Iterable, list[str]]]]:
    """Task names and the data sources, tasks that share one loader object grouped (one forward serves them all)."""
    tasks = list(heads)
    if not tasks:
        raise ValueError("heads is empty; pass one head per task, e.g. {'semseg': head, 'depth': head}.")
    named = {"heads": heads, "losses": losses}
    if isinstance(dataloaders, Mapping):
        named["dataloaders"] = dataloaders
    for name, mapping in named.items():
        missing, extra = [t for t in tasks if t not in mapping], [t for t in mapping if t not in heads]
        if missing or extra:
            raise ValueError(
                f"Task names differ between heads and {name}: {name} lacks {missing} and has extra {extra}; "
                f"give heads, losses and dataloaders the same keys (heads has {tasks})."
            )
    if not isinstance(dataloaders, Mapping):
        return tasks, [(dataloaders, tasks)]
    sources: dict[int, tuple[Iterable, list[str]]] = {}
    for task in tasks:
        sources.setdefault(id(dataloaders[task]), (dataloaders[task], []))[1].append(task)
    return tasks, list(sources.values())


def _to_device(batch, device: torch.device):
    if not isinstance(batch, Mapping) or "pixel_values" not in batch:
        raise ValueError(f"Each batch must be a dict with 'pixel_values'; got {type(batch).__name__}.")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _task_loss(task, heads, losses, features, batch) -> torch.Tensor:
    if task not in features:
        raise ValueError(f"The backbone's features have no entry for task {task!r}; they have {list(features)}.")
    loss = losses[task](heads[task](features[task]), batch)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(f"losses[{task!r}] must return a scalar tensor; got {getattr(loss, 'shape', type(loss))}.")
    return loss


def _reduce_sum(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """Sum over processes (Accelerate, or plain torch.distributed), so every process gets the global result."""
    if accelerator is not None and accelerator.num_processes > 1:
        return accelerator.reduce(tensor, reduction="sum")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def _repeat(loader: Iterable, count: int):
    """``count`` batches, starting the loader over when an epoch ends (a one-shot iterator just runs out)."""
    done = 0
    while done < count:
        before = done
        for batch in itertools.islice(loader, count - done):
            done += 1
            yield batch
        if done == before:
            return


def _warm_up_heads(backbone, heads, losses, sources, steps, lr, features_fn, device, show) -> None:
    params = [p for head in heads.values() for p in head.parameters() if p.requires_grad]
    if steps == 0 or not params:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    for head in heads.values():
        head.train()
    with tqdm(total=steps * len(sources), desc="head warm-up", disable=not show) as bar:
        for loader, names in sources:
            for batch in _repeat(loader, steps):  # a warm-up may be longer than an epoch
                batch = _to_device(batch, device)
                with torch.no_grad():  # the backbone stays frozen: only the heads learn
                    features = features_fn(backbone, batch["pixel_values"])
                loss = sum(_task_loss(t, heads, losses, features, batch) for t in names)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()


def compute_task_similarity(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    losses: Mapping[str, Callable[[object, dict], torch.Tensor]],
    dataloaders: Mapping[str, Iterable[dict]] | Iterable[dict],
    *,
    num_batches: int = 8,
    wrt: str | Iterable[torch.Tensor] = "backbone",
    projection_dim: int | None = None,
    seed: int = 0,
    head_warmup_steps: int = 10,
    head_warmup_lr: float = 1e-3,
    features_fn: FeaturesFn | None = None,
    accelerator=None,
    disable_progress: bool = False,
) -> TaskSimilarity:
    """Gradient-based similarity between tasks, to decide which tasks share adapters (see the module docstring).

    Args:
        backbone: the frozen backbone, usually wrapped with ``TGLoraConfig(task_groups="shared")`` so that
            ``backbone(pixel_values).task_features[task]`` gives each task's per-stage maps.
        heads: ``task -> module`` mapping a task's features to a prediction. They are copied; yours are not changed.
        losses: ``task -> loss(prediction, batch)`` returning a scalar tensor.
        dataloaders: ``task -> iterable of batch dicts`` with at least ``"pixel_values"``, or one iterable for every
            task (one forward pass then serves all tasks). Pass seeded loaders, or rely on ``seed`` below.
        num_batches: batches per task; each costs one backward pass per task.
        wrt: parameters to differentiate: ``"backbone"`` (default, the paper's θ_s), ``"adapters"``, or a list.
            Their ``requires_grad`` is switched on for the run and restored afterwards, also on error.
        projection_dim: project each flat gradient to this size with a seeded sign-and-bucket sketch; use it when
            T gradient vectors of the full size do not fit in memory.
        seed: seeds the projection, the head warm-up and anything drawing from torch's global generator during the
            run (e.g. a shuffling DataLoader); the caller's generator state is restored afterwards.
        head_warmup_steps: Adam steps on the (copied, randomly initialised) heads over frozen features before taking
            gradients; the paper trains the heads first. The warm-up takes its own batches from each loader,
            going over it again when it is shorter than the warm-up.
        head_warmup_lr: learning rate of that warm-up.
        features_fn: ``(backbone, pixel_values) -> {task: features}`` for backbones without ``task_features``.
        accelerator: an ``accelerate.Accelerator``; unit-gradient sums are added across processes. Plain
            ``torch.distributed`` is used when it is initialised and no accelerator is given.
        disable_progress: hide the progress bars (they are always hidden on non-main processes).
    """
    for name, value, low in (("num_batches", num_batches, 1), ("head_warmup_steps", head_warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}.")
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
        raise ValueError(f"projection_dim={projection_dim!r} must be a positive int or None.")
    tasks, sources = _check_tasks(heads, losses, dataloaders)
    if accelerator is not None:
        backbone = accelerator.unwrap_model(backbone)  # DDP wrappers expect .backward(), not autograd.grad
        heads = {t: accelerator.unwrap_model(h) for t, h in heads.items()}
    params = shared_parameters(backbone, wrt)
    device = accelerator.device if accelerator is not None else params[0].device
    heads = {t: copy.deepcopy(h).to(device) for t, h in heads.items()}
    features_fn = features_fn or _default_features
    num_processes, is_main = _process_info(accelerator)
    show = is_main and not disable_progress
    num_params = sum(p.numel() for p in params)
    project = None
    if projection_dim is not None and projection_dim < num_params:
        project = _SignedBucketProjection(num_params, projection_dim, seed, device)
    dim = project.dim_out if project is not None else num_params

    # running sums of unit gradient vectors per task, for the even and the odd batches apart (two disjoint halves)
    sums = torch.zeros(2, len(tasks), dim, device=device)
    counts = torch.zeros(2, len(tasks), device=device)
    norms = torch.zeros(len(tasks), num_batches, device=device)  # checked once at the end: no sync per batch
    loss_values = torch.zeros(len(tasks), num_batches, device=device)
    was_training, saved_flags = backbone.training, [p.requires_grad for p in params]
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            backbone.eval()  # no dropout / drop-path: the same batches give the same gradients
            _warm_up_heads(
                backbone, heads, losses, sources, head_warmup_steps, head_warmup_lr, features_fn, device, show
            )
            for head in heads.values():
                head.eval()  # under DDP each process warmed its own copy on its own shard; fine for a similarity
            for p in params:
                p.requires_grad_(True)
            with tqdm(total=num_batches * len(sources), desc="task similarity", disable=not show) as bar:
                for loader, names in sources:
                    for b, batch in enumerate(itertools.islice(loader, num_batches)):
                        batch = _to_device(batch, device)
                        features = features_fn(backbone, batch["pixel_values"])
                        for j, task in enumerate(names):
                            i = tasks.index(task)
                            loss = _task_loss(task, heads, losses, features, batch)
                            if loss.requires_grad:  # one backward per task; the graph is kept for the next task
                                kept = j < len(names) - 1
                                grads = torch.autograd.grad(
                                    loss, params, retain_graph=kept, allow_unused=True, materialize_grads=True
                                )
                                flat = torch.cat([g.reshape(-1) for g in grads]).float()  # flattened once
                            else:  # the loss ignores the shared parameters: reported as a zero gradient below
                                flat = torch.zeros(num_params, device=device)
                            flat = project(flat) if project is not None else flat
                            norms[i, b], loss_values[i, b] = flat.norm(), loss.detach()
                            sums[b % 2, i] += flat / norms[i, b].clamp_min(torch.finfo(flat.dtype).tiny)
                            counts[b % 2, i] += 1
                        bar.update()
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        backbone.train(was_training)

    local_counts = counts.sum(0)
    local_bad = (~torch.isfinite(norms) | (norms == 0)) & (
        torch.arange(num_batches, device=device) < local_counts[:, None]
    )
    packed = torch.cat([sums[0], sums[1], counts.T, local_bad.sum(1, keepdim=True).float()], dim=1)
    packed = _reduce_sum(packed, accelerator)  # every process gets the global sums
    sums, counts, bad = (
        torch.stack([packed[:, :dim], packed[:, dim : 2 * dim]]),
        packed[:, 2 * dim : 2 * dim + 2].T,
        packed[:, -1],
    )
    total, n = sums.sum(0), counts.sum(0)
    for i, task in enumerate(tasks):
        if n[i] == 0:
            raise ValueError(
                f"Task {task!r} has no data: its dataloader yielded no batch. Give it a non-empty loader."
            )
        if bad[i] > 0:
            b = local_bad[i].nonzero().flatten().tolist()[:1]
            at = (
                f"batch {b[0]} (loss {loss_values[i, b[0]]:.4g}, gradient norm {norms[i, b[0]]:.4g})"
                if b
                else "a batch"
            )
            raise ValueError(
                f"Task {task!r} gave a NaN/inf or all-zero gradient w.r.t. the shared parameters at {at}. Check its "
                "loss and labels for NaN, and that its head uses features that depend on the `wrt` parameters."
            )
        if n[i] < num_batches * num_processes:
            logger.warning("Task %r had only %d batches (asked for %d per process).", task, n[i], num_batches)
    matrix = _similarity(total.double() / n[:, None].double())
    # mean cosine over ordered pairs of different batches: (|sum of units|^2 - n) / (n (n - 1))
    within = ((total.double() ** 2).sum(1) - n) / (n * (n - 1))
    half_matrices = half_cosine = None
    if bool((counts > 0).all()):
        half_means = sums.double() / counts[..., None].double()
        half_matrices = torch.stack([_similarity(m) for m in half_means]).cpu().numpy()
        units = half_means / half_means.norm(dim=2, keepdim=True)  # no zero norms: every gradient was checked above
        cross = units[0] @ units[1].T
        half_cosine = ((cross + cross.T) / 2).cpu().numpy()
    return TaskSimilarity(
        tasks=tasks,
        matrix=matrix.cpu().numpy(),
        num_batches=[int(c) for c in n.tolist()],
        wrt=wrt if isinstance(wrt, str) else "explicit",
        num_parameters=num_params,
        projection_dim=dim if project is not None else None,
        seed=seed,
        head_warmup_steps=head_warmup_steps,
        within_task=[w if c > 1 else None for w, c in zip(within.tolist(), n.tolist())],
        half_matrices=half_matrices,
        half_cosine=half_cosine,
    )


def _similarity(means: torch.Tensor) -> torch.Tensor:
    """The paper's matrix from each task's mean unit gradient (rows of ``means``): symmetric, in [-1, 1], diagonal 1."""
    matrix = (means @ means.T).clamp(-1.0, 1.0)
    matrix = (matrix + matrix.T) / 2  # exact symmetry despite float rounding
    return matrix.fill_diagonal_(1.0)  # S(g, g) = 1 by definition


def _process_info(accelerator) -> tuple[int, bool]:
    """(number of processes, whether this is the main one), under Accelerate or plain torch.distributed."""
    if accelerator is not None:
        return accelerator.num_processes, accelerator.is_local_main_process
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank() == 0
    return 1, True


if __name__ == "__main__":  # the command line depends on this module, never the reverse
    raise SystemExit("The command line is `python -m peft_tglora.similarity_cli` (or `tglora-similarity`).")
