"""The stream hooks: the batch split into task-group streams at stage boundaries, the task selection of a call, and
every task's per-stage features on the output."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn

from .backbones import backbone_core, get_backbone_spec
from .layer import TGLoraLayer, stream_index
from .tree import StreamLayout, TaskTree


@lru_cache(maxsize=64)
def _layout(tree: TaskTree, tasks: tuple[str, ...] | None) -> StreamLayout:
    return tree.layout(tasks)  # read by every stage hook of every call: computed once per tree and selection


class _TunerHook:
    """A forward (pre-)hook that calls `tuner.<method>(*extra, *hook_args)`.

    An object rather than a closure: `copy.deepcopy` of the model copies its attributes, so the copy's hooks act on
    the copy's tuner (its disable flag, active tree and recorded features); a closure would keep the original's.
    """

    def __init__(self, tuner: StreamHooks, method: str, *extra):
        self.tuner, self.method, self.extra = tuner, method, extra

    def __call__(self, *args):
        return getattr(self.tuner, self.method)(*self.extra, *args)


class StreamHooks:
    """The hook side of [`TGLoraModel`]: what runs on every forward, on top of PEFT's injection.

    Needs `self.model`, `self.active_adapters`, `self._trees` (adapter -> tree) and `self._stage_of_key(key)`.
    """

    # set by `disable_adapter()`: the model is then the base model, one stream that every task reads
    _streams_disabled: bool = False
    # the tasks of the last call's `tasks=` (None: all), and the (tree, selection) the layers were last told
    _selection: tuple[str, ...] | None = None
    _groups_key: tuple | None = None

    def _active_tree(self) -> TaskTree | None:
        trees = {self._trees[name] for name in self.active_adapters if name in self._trees}
        if len(trees) > 1:
            raise ValueError(
                f"The active adapters {self.active_adapters} have different task trees; streams follow one tree, so "
                "activate one of them with `set_adapter(name)`."
            )
        return trees.pop() if trees else None

    def _install_stream_hooks(self, model: nn.Module) -> None:
        _, spec = get_backbone_spec(model)
        core = backbone_core(model)
        self._undo_patch = spec.patch(core) if spec.patch is not None else None
        self._stage_features: dict[int, torch.Tensor] = {}
        self._call_tree: TaskTree | None = None
        handles = []
        for stage, module in enumerate(spec.split_modules(core)):
            hook = _TunerHook(self, "_split_streams", stage)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for stage, module in enumerate(spec.feature_modules(core)):
            hook = _TunerHook(self, "_record_features", stage, spec.feature_fn)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        handles.append(model.register_forward_pre_hook(_TunerHook(self, "_begin_call"), with_kwargs=True))
        handles.append(model.register_forward_hook(_TunerHook(self, "_attach_task_features")))
        self._hook_handles = handles

    def _remove_stream_hooks(self) -> None:
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        self._hook_handles = []
        if getattr(self, "_undo_patch", None) is not None:
            self._undo_patch()
            self._undo_patch = None

    def _begin_call(self, module, args, kwargs):
        tasks = kwargs.pop("tasks", None)
        self._stage_features = {}
        self._call_tree = tree = self._active_tree()
        if tasks is not None:
            if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
                raise ValueError(f"`tasks` must be a list of task names, got {tasks!r}; e.g. tasks=['{tasks}'].")
            tasks = tuple(tasks)
            if tree is not None:
                _layout(tree, tasks)  # raises for unknown tasks before anything runs
        self._selection = tasks
        self._select_groups(tree)
        return args, kwargs

    def _select_groups(self, tree: TaskTree | None) -> None:
        """Tell every layer which groups' streams the selection runs at its stage (a walk only when it changes)."""
        if (tree, self._selection) == self._groups_key:
            return
        self._groups_key = (tree, self._selection)
        layout = None if tree is None or self._selection is None else _layout(tree, self._selection)
        for key, module in self.model.named_modules():
            if isinstance(module, TGLoraLayer):
                module.selected_groups = None if layout is None else layout.groups[self._stage_of_key(key)]

    def _split_streams(self, stage: int, module, args, kwargs):
        # reads the model's state, not the call's, so that a checkpoint that recomputes the stage with its hooks
        # (after the call has ended) splits the same way
        tree = None if self._streams_disabled else self._active_tree()
        if tree is None:
            return None
        layout = _layout(tree, self._selection)
        if not layout.splits_at(stage):
            return None
        hidden = args[0]
        parents = layout.parents[stage]
        previous = 1 if stage == 0 else len(layout.groups[stage - 1])
        streams = hidden.reshape(previous, -1, *hidden.shape[1:])  # [G_prev, B, ...]
        index = stream_index(parents, hidden.device)
        hidden = streams.index_select(0, index).reshape(-1, *hidden.shape[1:])  # [G * B, ...], child = parent
        return (hidden, *args[1:]), kwargs

    def _record_features(self, stage: int, feature_fn, module, args, kwargs, output):
        if self._call_tree is not None:
            self._stage_features[stage] = feature_fn(module, args, kwargs, output)

    def _attach_task_features(self, module, args, output):
        tree, features = self._call_tree, self._stage_features
        self._call_tree, self._stage_features = None, {}
        if tree is None or not hasattr(output, "keys") or len(features) != tree.num_stages:
            return output
        stages = range(tree.num_stages)
        tasks = [t for t in tree.tasks if self._selection is None or t in self._selection]
        if self._streams_disabled:
            output["task_features"] = {task: tuple(features[s] for s in stages) for task in tasks}
            return output
        layout = _layout(tree, self._selection)
        batch = features[0].shape[0] // len(layout.groups[0])
        streams = [features[s].view(len(layout.groups[s]), batch, *features[s].shape[1:]) for s in stages]
        output["task_features"] = {
            task: tuple(streams[s][layout.position(tree.group_of(task, s), s)] for s in stages) for task in tasks
        }
        return output

    @contextmanager
    def _without_stream_hooks(self):
        self._remove_stream_hooks()
        try:
            yield
        finally:
            self._install_stream_hooks(self.model)
