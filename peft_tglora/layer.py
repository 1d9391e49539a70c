"""The TGLoRA linear: one frozen matmul over all streams, then every group's low-rank delta in one batched matmul."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn


@lru_cache(maxsize=256)
def stream_index(groups: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`groups` as an index tensor on `device`, built once per layout and device: a tensor built from a Python list on
    every forward is copied to the device each time, and on CUDA that copy waits for the device."""
    with torch.inference_mode(False):  # a cached inference tensor could not be saved for a later backward
        return torch.tensor(groups, dtype=torch.long, device=device)


def _take(tensor: torch.Tensor, groups: tuple[int, ...] | None) -> torch.Tensor:
    """`tensor[groups]` along dim 0: a view when the groups are consecutive (the usual case), else a gather."""
    if groups is None or groups == tuple(range(tensor.shape[0])):
        return tensor
    if groups == tuple(range(groups[0], groups[-1] + 1)):
        return tensor[groups[0] : groups[-1] + 1]
    return tensor.index_select(0, stream_index(groups, tensor.device))


def _refuse_non_finite(merged: torch.Tensor, names: list[str], layer: str = "") -> None:
    if not torch.isfinite(merged).all():
        raise ValueError(
            f"Merging {names} into {layer or 'a layer'} would put NaNs or infs into its weight, so nothing was merged: "
            "the adapter is broken (check the training loss and learning rate)."
        )


class TGLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("tglora_A", "tglora_B", "tglora_shared_A", "tglora_shared_B")
    other_param_names = ("r", "lora_alpha", "scaling", "shared_scaling", "tglora_dropout")
    # the groups whose streams this call runs, in stacking order (None: all); the tuner sets it for a task selection
    selected_groups: tuple[int, ...] | None = None

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.shared_scaling: dict[str, float] = {}
        self.tglora_dropout = nn.ModuleDict({})
        self.tglora_A = nn.ParameterDict({})  # [G, r, in]
        self.tglora_B = nn.ParameterDict({})  # [G, out, r]
        self.tglora_shared_A = nn.ParameterDict({})  # [shared_r, in], only where G > 1
        self.tglora_shared_B = nn.ParameterDict({})  # [out, shared_r]
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"TGLoRA adapts `torch.nn.Linear` layers only, got {type(base).__name__}; "
                "narrow `target_modules` to the attention and MLP linears."
            )
        self.in_features, self.out_features = base.in_features, base.out_features
        # `merge(grouped=True)`: one merged weight per group, [G, out, in]; the base weight is left as it was, so
        # unmerging is dropping this. Not saved (as LoRA's merged state: the adapter weights are what is saved).
        self.register_buffer("merged_group_weight", None, persistent=False)
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        num_groups: int,
        r: int,
        lora_alpha: int,
        lora_dropout: float = 0.0,
        shared_r: int = 0,
        init_lora_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.tglora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.tglora_A[adapter_name] = nn.Parameter(torch.empty(num_groups, r, self.in_features))
        self.tglora_B[adapter_name] = nn.Parameter(torch.empty(num_groups, self.out_features, r))
        if shared_r > 0 and num_groups > 1:
            self.shared_scaling[adapter_name] = lora_alpha / shared_r
            self.tglora_shared_A[adapter_name] = nn.Parameter(torch.empty(shared_r, self.in_features))
            self.tglora_shared_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, shared_r))
        self.reset_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_lora_weights: bool = True) -> None:
        # as LoRA: A ~ kaiming-uniform per group, B = 0 so that every stream starts as the base model
        pairs = [(self.tglora_A, self.tglora_B)]
        if adapter_name in self.tglora_shared_A:
            pairs.append((self.tglora_shared_A, self.tglora_shared_B))
        for a_dict, b_dict in pairs:
            a, b = a_dict[adapter_name], b_dict[adapter_name]
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix
            a.uniform_(-bound, bound)
            if init_lora_weights:
                b.zero_()
            else:
                b.uniform_(-bound, bound)

    def num_groups(self, adapter_name: str) -> int:
        return self.tglora_A[adapter_name].shape[0]

    def delta_weight(self, adapter_name: str, group: int) -> torch.Tensor:
        """The update that `group`'s rows see, as a `[out, in]` matrix (used by merge and export)."""
        a, b = self.tglora_A[adapter_name][group], self.tglora_B[adapter_name][group]
        dtype = self.get_base_layer().weight.dtype
        compute = torch.promote_types(dtype, torch.float32)  # half weights merge in float32, float64 stays exact
        delta = (b.to(compute) @ a.to(compute)) * self.scaling[adapter_name]
        if adapter_name in self.tglora_shared_A:
            sa, sb = self.tglora_shared_A[adapter_name], self.tglora_shared_B[adapter_name]
            delta = delta + (sb.to(compute) @ sa.to(compute)) * self.shared_scaling[adapter_name]
        return delta.to(dtype)

    def grouped_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with each group's update of `adapter_names` added: `[G, out, in]` (`merge(grouped=True)`)."""
        weight = self.get_base_layer().weight
        counts = {self.num_groups(name) for name in adapter_names}
        assert len(counts) == 1, f"adapters {adapter_names} have {sorted(counts)} groups here; the tuner refuses this"
        merged = weight.detach().unsqueeze(0).repeat(counts.pop(), 1, 1)
        for name in adapter_names:
            for g in range(merged.shape[0]):
                merged[g] += self.delta_weight(name, g).detach()
        return merged


class Linear(nn.Module, TGLoraLayer):
    """A TGLoRA-adapted `nn.Linear`. Inputs keep the stream layout: dim 0 is group-major, `[G * n, ..., in]`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, num_groups: int, **kwargs) -> None:
        super().__init__()
        TGLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, num_groups, **kwargs)

    def _mergeable(self, adapter_names: list[str] | None, grouped: bool = False) -> list[str]:
        # without `grouped`, grouped stages cannot merge into one weight; they keep running unmerged
        names = self.active_adapters if adapter_names is None else adapter_names
        return [
            n
            for n in names
            if n in self.tglora_A and n not in self.merged_adapters and (grouped or self.num_groups(n) == 1)
        ]

    def check_merge_is_finite(self, adapter_names: list[str] | None = None, name: str = "") -> None:
        """Raise before any weight changes if merging would put NaNs or infs into the base weight."""
        names = self._mergeable(adapter_names)
        merged = self.get_base_layer().weight.data.float()
        for adapter in names:
            merged = merged + self.delta_weight(adapter, 0).float()
        _refuse_non_finite(merged, names, name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, grouped: bool = False) -> None:
        """Merge adapters whose stage has a single group into the base weight; grouped stages keep running unmerged.

        With `grouped=True` every stage merges, into a separate `[G, out, in]` weight (`merged_group_weight`) that the
        forward runs with one batched matmul over the stacked streams; the base weight is not touched, so `unmerge()`
        gives it back bit for bit. It costs G weight copies per layer.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if grouped:
            names = self._mergeable(adapter_names, grouped=True)
            if not names:
                return
            merged = self.grouped_weight(names)
            if safe_merge:
                _refuse_non_finite(merged, names)
            self.merged_group_weight = merged
            self.merged_adapters.extend(names)
            return
        if safe_merge:
            self.check_merge_is_finite(adapter_names)  # all adapters checked before the first is merged
        base = self.get_base_layer()
        for name in self._mergeable(adapter_names):
            base.weight.data += self.delta_weight(name, 0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            # layers of grouped stages never merge: `unmerge_adapter()` reaching them is no cause for a warning
            if any(self.num_groups(name) == 1 for name in self.tglora_A):
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self.merged_group_weight is not None:  # the base weight was never touched
            self.merged_group_weight = None
            self.merged_adapters.clear()
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data -= self.delta_weight(name, 0)

    def _stream_rows(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """`x` as `[G, n, in]`, rows of group g contiguous, after checking that dim 0 holds G streams."""
        if x.shape[0] % groups:
            raise RuntimeError(
                f"A TGLoRA layer with {groups} groups got {x.shape[0]} rows on dim 0, not a multiple of "
                f"{groups}: the stream split did not run. Was the stage hook removed, or the layer called "
                "outside its backbone?"
            )
        return x.reshape(groups, -1, x.shape[-1])

    def _grouped_base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the merged weights of the groups this call runs, [G', out, in]; one group is a plain linear
        weight = _take(self.merged_group_weight, self.selected_groups)
        bias = self.get_base_layer().bias
        if weight.shape[0] == 1:
            return F.linear(x, weight[0], bias)
        xg = self._stream_rows(x, weight.shape[0])  # [G', n, in]
        out = (
            torch.bmm(xg, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias, xg, weight.transpose(1, 2))
        )
        return out.reshape(*x.shape[:-1], self.out_features)  # [G' * n, ..., out]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:  # as LoRA: a disabled adapter is the base model, so merged stages come out first
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_group_weight is not None:
            result = self._grouped_base_forward(x)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.tglora_A or name in self.merged_adapters:
                continue
            # a task selection runs only some groups' streams: their slices of A and B, in stacking order
            a, b = _take(self.tglora_A[name], self.selected_groups), _take(self.tglora_B[name], self.selected_groups)
            groups = a.shape[0]
            x_in = self._cast_input_dtype(self.tglora_dropout[name](x), a.dtype)
            xg = self._stream_rows(x_in, groups)  # [G, n, in], rows of group g are contiguous
            h = torch.bmm(xg, a.transpose(1, 2))  # [G, n, r]
            if h.dtype == result.dtype:
                # scaling and the residual add fused into the second matmul: two fewer passes over [G, n, out]
                result = torch.baddbmm(
                    result.reshape(groups, -1, self.out_features), h, b.transpose(1, 2), alpha=self.scaling[name]
                ).reshape(result.shape)
            else:
                delta = torch.bmm(h, b.transpose(1, 2)) * self.scaling[name]  # [G, n, out]
                result = result + delta.reshape(result.shape).to(result.dtype)
            if name in self.tglora_shared_A:
                shared = x_in @ self.tglora_shared_A[name].t() @ self.tglora_shared_B[name].t()
                result = result + (shared * self.shared_scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "tglora." + super().__repr__()
