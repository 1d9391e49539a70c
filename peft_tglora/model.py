"""`TGLoraModel`: puts TGLoRA layers into each stage, splits the streams at stage boundaries, and hands every task
its per-stage features."""

from __future__ import annotations

import copy
import warnings
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, _get_submodules, check_target_module_exists
from torch import nn

from ._snapshot import ModelSnapshot
from ._streams import StreamHooks
from .backbones import BACKBONES, backbone_core, get_backbone_spec
from .config import TGLoraConfig
from .layer import Linear, TGLoraLayer
from .tree import TaskTree


class TGLoraModel(StreamHooks, BaseTuner):
    """
    Task-grouped LoRA on a hierarchical vision backbone (Swin, Swinv2, PVT, PVTv2, SegFormer).

    Streams are stacked along the batch, group-major: inside a stage with G groups, rows `[g*B, (g+1)*B)` of every
    tensor are group g's stream. The model's own outputs (`last_hidden_state`, `pooler_output`, ...) keep that layout
    (`G_last * B` rows). Each output also carries `task_features`: `{task: (map_stage_0, ..., map_stage_S-1)}`, each
    map `[B, C_s, H_s, W_s]`, the stream of the task's group at that stage (views, no copies).

    `model(pixel_values, tasks=["depth"])` runs only the streams on the paths from the input to those tasks' leaves
    (stage s then carries the selected tasks' groups, in tree order) and `task_features` holds only those tasks.
    A forward keyword, as PEFT's LoRA takes `adapter_names=`: the selection belongs to one call, and a pre-hook on
    the backbone takes it out of the call, so stock backbones need no change. The selection stays in force until
    the next call, so that gradient checkpointing, which reruns the layers during `backward()`, runs the same
    streams: call `backward()` before the next forward with another selection (the same rule as `set_adapter`).

    Example:

        ```py
        >>> import peft_tglora
        >>> from peft import get_peft_model
        >>> config = peft_tglora.TGLoraConfig(tasks=["semseg", "depth"], task_groups="1,1,1,2", r=8)
        >>> model = get_peft_model(swin, config)
        >>> model(pixel_values).task_features["depth"][3].shape
        ```
    """

    prefix: str = "tglora_"
    tuner_layer_cls = TGLoraLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {
        name: list(spec.target_modules) for name, spec in BACKBONES.items()
    }

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        # each adapter's task tree, resolved once at injection; the stream hooks read it on every forward
        self._trees: dict[str, TaskTree] = {}
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def get_task_tree(self, adapter_name: str | None = None) -> TaskTree:
        """The task tree of `adapter_name` (default: the active adapter)."""
        return self._trees[adapter_name or self.active_adapters[0]]

    # ------------------------------------------------------------------ injection

    def _resolve_tree(self, peft_config: TGLoraConfig, model: nn.Module) -> TaskTree:
        model_type, spec = get_backbone_spec(model)
        num_stages = len(spec.split_modules(backbone_core(model)))
        # the config keeps the explicit tree, so that a saved adapter_config.json holds the tree itself
        tree = peft_config.resolve_for_backbone(num_stages, f"{type(model).__name__} ({model_type})")
        heads = [name for name in spec.multi_stage_heads if getattr(model, name, None) is not None]
        if heads and len(set(tree.groups_per_stage)) > 1:
            raise ValueError(
                f"`{type(model).__name__}.{heads[0]}` reads every stage's output together, so it needs the same "
                f"number of task groups at every stage, but `task_groups` has {list(tree.groups_per_stage)} groups "
                "per stage. Use task_groups='shared' (or 'per_task') with this model, or wrap the backbone alone "
                f"(`{type(backbone_core(model)).__name__}`) and give each task its own decoder on `task_features`."
            )
        return tree

    def _prepare_adapter_config(self, peft_config: TGLoraConfig, model_config: dict) -> TGLoraConfig:
        _, spec = get_backbone_spec(self.model)
        if peft_config.target_modules is None:
            peft_config.target_modules = list(spec.target_modules)
        self._check_targets(peft_config, self.model)
        return peft_config

    def _check_targets(self, peft_config: TGLoraConfig, model: nn.Module) -> None:
        # every check runs before the first module is replaced, so a bad config leaves the model untouched
        self._index_stages(model)
        matched = [
            (key, m)
            for key, m in model.named_modules()
            if key
            and "tglora_" not in key
            and ".base_layer" not in key
            and check_target_module_exists(peft_config, key)
        ]
        if not matched:
            linears = sorted(
                {".".join(k.split(".")[-2:]) for k, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ValueError(
                f"`target_modules={peft_config.target_modules}` matches no module of {type(model).__name__}. Its "
                f"linear layers end in {linears}; leave `target_modules=None` for the attention and MLP linears."
            )
        for key, module in matched:
            base = module.get_base_layer() if isinstance(module, TGLoraLayer) else module
            if not isinstance(base, nn.Linear):
                # a config value that picks the wrong module, reported with the other config errors
                raise ValueError(  # noqa: TRY004
                    f"`target_modules` matches {key!r}, a {type(base).__name__}; TGLoRA adapts `nn.Linear` only. "
                    "Use a more specific suffix (e.g. 'attention.proj' rather than 'proj') or `exclude_modules`."
                )
            self._stage_of_key(key)

    def _index_stages(self, model: nn.Module) -> None:
        _, spec = get_backbone_spec(model)
        stage_of = {id(m): s for s, mods in enumerate(spec.stage_containers(backbone_core(model))) for m in mods}
        self._stage_prefixes = [
            (name + ".", stage_of[id(m)]) for name, m in model.named_modules() if id(m) in stage_of
        ]

    def _stage_of_key(self, key: str) -> int:
        for prefix, stage in self._stage_prefixes:
            if key.startswith(prefix):
                return stage
        raise ValueError(
            f"Module {key!r} matches `target_modules` but lies outside every stage of the backbone, so it has no "
            "task groups; narrow `target_modules` (or add it to `exclude_modules`)."
        )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        stage = self._stage_of_key(current_key)
        tree = self._trees[adapter_name]
        layer_kwargs = dict(
            num_groups=tree.groups_per_stage[stage],
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            shared_r=config.shared_r,
            init_lora_weights=config.init_lora_weights,
        )
        if isinstance(target, TGLoraLayer):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, **layer_kwargs)
            return
        new_module = Linear(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # PEFT runs _post_injection_hook for the first adapter only; add_adapter/load_adapter come through here too
        snapshot = ModelSnapshot(self)
        try:
            self._trees[adapter_name] = self._resolve_tree(self.peft_config[adapter_name], model)
            super().inject_adapter(model, adapter_name, **kwargs)
            if not getattr(self, "_hook_handles", None):
                self._install_stream_hooks(model)
            self._groups_key = None  # new layers: tell every layer its groups on the next call
        except BaseException:
            snapshot.restore()  # a failed injection leaves the model (and this tuner) as it was
            raise

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        expected = model.state_dict()
        for key, value in state_dict.items():
            if key in expected and expected[key].shape != value.shape:
                raise ValueError(
                    f"The adapter's {key!r} has shape {tuple(value.shape)}, but this backbone needs "
                    f"{tuple(expected[key].shape)}: the adapter was trained on another architecture or size "
                    f"({config.base_model_name_or_path or 'see adapter_config.json'}). Load it into the same backbone."
                )
        return state_dict

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._trees.pop(adapter_name, None)
        self._groups_key = None

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._streams_disabled = not enabled
        super()._enable_adapter_layers(enabled)

    # ------------------------------------------------------------------ merge and export

    def _grouped_adapters(self, adapter_names: list[str] | None) -> list[str]:
        names = adapter_names or self.active_adapters
        return [n for n in names if max(self._trees[n].groups_per_stage) > 1]

    def _check_merge_is_finite(self, adapter_names: list[str] | None) -> None:
        # every layer is checked before the first weight changes, so a refused safe merge leaves the model as it was
        for key, module in self.model.named_modules():
            if isinstance(module, TGLoraLayer):
                module.check_merge_is_finite(adapter_names, name=repr(key))

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, grouped: bool = False
    ) -> None:
        """Merge every stage that has one group into the base weights; grouped stages keep running as adapters.

        With `grouped=True` every stage merges: each adapted layer holds one merged weight per group
        (`merged_group_weight`, `[G, out, in]`) and runs one batched matmul over the stacked streams, and the base
        weights are left as they were, so `unmerge_adapter()` gives them back bit for bit. This costs G weight copies
        per adapted layer (1 in one-group stages). A refused `safe_merge` or any failure leaves the model as it was.
        """
        self._refuse_mixed_merge(grouped)
        if grouped:
            self._merge_grouped(adapter_names, safe_merge)
            return
        if safe_merge:
            self._check_merge_is_finite(adapter_names)
        for name in self._grouped_adapters(adapter_names):
            counts = self._trees[name].groups_per_stage
            grouped_stages = [s for s, c in enumerate(counts) if c > 1]
            warnings.warn(
                f"Adapter {name!r}: stages {grouped_stages} have several task groups and cannot merge into one "
                "weight; they keep running unmerged (`merge_adapter(grouped=True)` merges them into one weight per "
                "group; `export_task(task)` gives one task's fully merged backbone).",
                stacklevel=2,
            )
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _refuse_mixed_merge(self, grouped: bool) -> None:
        layers = [m for m in self.model.modules() if isinstance(m, TGLoraLayer)]
        per_group = any(layer.merged_group_weight is not None for layer in layers)
        if grouped or per_group:
            merged = sorted({name for layer in layers for name in layer.merged_adapters})
            if merged:
                raise ValueError(
                    f"Adapter(s) {merged} are merged already; merges with and without `grouped=True` do not stack, "
                    "so call `unmerge_adapter()` first."
                )

    def _merge_grouped(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        self._check_merge_allowed()
        names = list(adapter_names or self.active_adapters)
        unknown = [n for n in names if n not in self._trees]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self._trees)}.")
        if len({self._trees[n] for n in names}) > 1:
            raise ValueError(
                f"Adapters {names} have different task trees, so their groups do not line up; merge one of them."
            )
        snapshot = ModelSnapshot(self.model)
        try:
            for key, module in self.model.named_modules():
                if isinstance(module, TGLoraLayer):
                    try:
                        module.merge(safe_merge=safe_merge, adapter_names=names, grouped=True)
                    except ValueError as error:
                        raise ValueError(f"{key!r}: {error}") from None
        except BaseException:
            snapshot.restore()  # every layer merges or none does
            raise

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        grouped = self._grouped_adapters(adapter_names)
        if grouped:
            raise ValueError(
                f"Adapter(s) {grouped} have stages with several task groups, which one weight matrix cannot hold. "
                "Use `merge_adapter()` to merge the one-group stages in place, or `export_task(task)` for a plain "
                "backbone that computes one task's features."
            )
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            snapshot = ModelSnapshot(self.model)
            try:
                for module in self.model.modules():
                    if isinstance(module, TGLoraLayer) and module.merged_group_weight is not None:
                        module.unmerge()  # the base weight was left as it was: merge into it below
                if safe_merge:
                    self._check_merge_is_finite(adapter_names)  # before the hooks go: a refusal changes nothing
            except BaseException:
                snapshot.restore()
                raise
        self._remove_stream_hooks()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @torch.no_grad()
    def export_task(self, task: str, adapter_name: str | None = None) -> nn.Module:
        """A plain copy of the backbone, with `task`'s path merged in: its outputs equal `task_features[task]`."""
        adapter_name = adapter_name or self.active_adapters[0]
        tree = self._trees[adapter_name]
        if task not in tree.tasks:
            raise ValueError(f"Unknown task {task!r}; adapter {adapter_name!r} serves {list(tree.tasks)}.")
        with self._without_stream_hooks():
            exported = copy.deepcopy(self.model)
        exported.__dict__.pop("peft_config", None)
        for key, module in list(exported.named_modules()):
            if not isinstance(module, TGLoraLayer):
                continue
            base = module.get_base_layer()
            if module.merged:  # merged stages are in (or beside) the base weight: take them out first
                module.unmerge()
            if adapter_name in module.tglora_A:
                stage = self._stage_of_key(key)
                base.weight += module.delta_weight(adapter_name, tree.group_of(task, stage))
            parent, _, name = _get_submodules(exported, key)
            setattr(parent, name, base)
        return exported
