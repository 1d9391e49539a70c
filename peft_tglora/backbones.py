"""What differs per architecture: where stages are, which linears to adapt, how streams split, what a stage emits.

`BACKBONES` maps a transformers `model_type` to a [`BackboneSpec`]; [`register_backbone`] adds one. Everything
the tuner needs from an architecture goes through this table, so a new backbone is one entry here.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput


# a feature function turns what a hook saw into the stage's map [B, C, H, W]
FeatureFn = Callable[[nn.Module, tuple, dict, object], torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """How TGLoRA meets one architecture.

    Args:
        target_modules: default adapted linears (attention and MLP), as PEFT `target_modules` suffixes.
        stage_containers: `core -> [[module, ...] per stage]`: every module inside these belongs to that stage.
        split_modules: `core -> [module per stage]`: a forward pre-hook on it replicates the streams; its first
            positional argument must be the stage's input with the batch on dim 0.
        feature_modules: `core -> [module per stage]` whose forward hook sees the stage's output features.
        feature_fn: turns `(module, args, kwargs, output)` of that hook into `[B, C, H, W]`.
        multi_stage_heads: attributes of a task model (e.g. `decode_head`) whose head reads every stage's output
            together; such a head needs the same number of streams at every stage.
        patch: optional `core -> undo` that makes the architecture accept a batch that grows between stages. Make
            `undo` an object that holds the patched module (not a closure), so that a deep copy undoes its own patch.
    """

    target_modules: tuple[str, ...]
    stage_containers: Callable[[nn.Module], list[list[nn.Module]]]
    split_modules: Callable[[nn.Module], list[nn.Module]]
    feature_modules: Callable[[nn.Module], list[nn.Module]]
    feature_fn: FeatureFn
    multi_stage_heads: tuple[str, ...] = ()
    patch: Callable[[nn.Module], Callable[[], None]] | None = None


def _tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # [B, H*W (+ cls), C] -> [B, C, H, W]; a leading class token (PVT's last stage) is not part of the map
    tokens = tokens[:, tokens.shape[1] - height * width :]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def _block_features(module, args, kwargs, output):
    # Swin/Swinv2 blocks: forward(hidden_states [B, H*W, C], input_dimensions (H, W), ...)
    height, width = args[1] if len(args) > 1 else kwargs["input_dimensions"]
    return _tokens_to_map(output[0], height, width)


def _pvt_block_features(module, args, kwargs, output):
    # PVT blocks: forward(hidden_states [B, N, C], height, width, output_attentions)
    return _tokens_to_map(output[0], args[1], args[2])


def _pvt_v2_layer_features(module, args, kwargs, output):
    # PvtV2EncoderLayer returns ((hidden_states [B, H*W, C], ...), height, width)
    (hidden_states, *_), height, width = output
    return _tokens_to_map(hidden_states, height, width)


def _segformer_stage_features(module, args, kwargs, output):
    if output.ndim == 4:
        return output
    # last stage with reshape_last_stage=False: recover the grid from the patch embedding's convolution
    conv = module.patch_embeddings.proj
    height, width = (
        (size + 2 * conv.padding[i] - conv.kernel_size[i]) // conv.stride[i] + 1
        for i, size in enumerate(args[0].shape[-2:])
    )
    return _tokens_to_map(output, height, width)


def _pvt_v2_encoder_forward(self, pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True):
    # PvtV2Encoder.forward reads the batch size once from the pixels; streams grow the batch between stages, so
    # this version reshapes with each stage's own batch size and is otherwise the same.
    all_hidden_states = () if output_hidden_states else None
    all_self_attentions = () if output_attentions else None
    hidden_states = pixel_values
    for layer in self.layers:
        outputs, height, width = layer(hidden_states, output_attentions)
        hidden_states = outputs[0]
        if output_attentions:
            all_self_attentions = all_self_attentions + (outputs[1],)
        hidden_states = _tokens_to_map(hidden_states, height, width).contiguous()
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
    return _encoder_output(hidden_states, all_hidden_states, all_self_attentions, return_dict)


def _pvt_encoder_forward(self, pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True):
    # PvtEncoder.forward, with each stage's own batch size (see `_pvt_v2_encoder_forward`)
    all_hidden_states = () if output_hidden_states else None
    all_self_attentions = () if output_attentions else None
    hidden_states = pixel_values
    last = len(self.block) - 1
    for idx, (embedding_layer, block_layer) in enumerate(zip(self.patch_embeddings, self.block)):
        hidden_states, height, width = embedding_layer(hidden_states)
        for block in block_layer:
            layer_outputs = block(hidden_states, height, width, output_attentions)
            hidden_states = layer_outputs[0]
            if output_attentions:
                all_self_attentions = all_self_attentions + (layer_outputs[1],)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        if idx != last:
            hidden_states = _tokens_to_map(hidden_states, height, width).contiguous()
    hidden_states = self.layer_norm(hidden_states)
    if output_hidden_states:
        all_hidden_states = all_hidden_states + (hidden_states,)
    return _encoder_output(hidden_states, all_hidden_states, all_self_attentions, return_dict)


def _encoder_output(hidden_states, all_hidden_states, all_self_attentions, return_dict):
    if not return_dict:
        return tuple(v for v in [hidden_states, all_hidden_states, all_self_attentions] if v is not None)
    return BaseModelOutput(
        last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_self_attentions
    )


class _RestoreForward:
    """Undo of an instance-level `forward` replacement. An object, not a closure, so that `copy.deepcopy` of a model
    gives the copy an undo that acts on the copy's module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> None:
        self.module.__dict__.pop("forward", None)


def _patch_encoder_forward(forward) -> Callable[[nn.Module], Callable[[], None]]:
    def patch(core: nn.Module) -> Callable[[], None]:
        core.encoder.forward = types.MethodType(forward, core.encoder)
        return _RestoreForward(core.encoder)

    return patch


def _swin_like(target_modules: tuple[str, ...]) -> BackboneSpec:
    return BackboneSpec(
        target_modules=target_modules,
        stage_containers=lambda core: [[stage] for stage in core.encoder.layers],
        split_modules=lambda core: list(core.encoder.layers),
        feature_modules=lambda core: [stage.blocks[-1] for stage in core.encoder.layers],
        feature_fn=_block_features,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "swin": _swin_like(
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    ),
    # "output.dense" is both the attention projection and the second MLP linear
    "swinv2": _swin_like(("self.query", "self.key", "self.value", "output.dense", "intermediate.dense")),
    "pvt": BackboneSpec(
        target_modules=("self.query", "self.key", "self.value", "output.dense", "mlp.dense1", "mlp.dense2"),
        stage_containers=lambda core: [
            [embedding, blocks] for embedding, blocks in zip(core.encoder.patch_embeddings, core.encoder.block)
        ],
        split_modules=lambda core: list(core.encoder.patch_embeddings),
        feature_modules=lambda core: [blocks[-1] for blocks in core.encoder.block],
        feature_fn=_pvt_block_features,
        patch=_patch_encoder_forward(_pvt_encoder_forward),
    ),
    "pvt_v2": BackboneSpec(
        # "attention.proj", not "proj": patch_embedding.proj is a Conv2d
        target_modules=(
            "attention.query",
            "attention.key",
            "attention.value",
            "attention.proj",
            "mlp.dense1",
            "mlp.dense2",
        ),
        stage_containers=lambda core: [[layer] for layer in core.encoder.layers],
        split_modules=lambda core: list(core.encoder.layers),
        feature_modules=lambda core: list(core.encoder.layers),
        feature_fn=_pvt_v2_layer_features,
        patch=_patch_encoder_forward(_pvt_v2_encoder_forward),
    ),
    "segformer": BackboneSpec(
        target_modules=(
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.o_proj",
            "mlp.fc1",
            "mlp.fc2",
        ),
        stage_containers=lambda core: [[stage] for stage in core.stages],
        split_modules=lambda core: list(core.stages),
        feature_modules=lambda core: list(core.stages),
        feature_fn=_segformer_stage_features,
        multi_stage_heads=("decode_head",),  # SegformerForSemanticSegmentation concatenates all four stages
    ),
}


def register_backbone(model_type: str, spec: BackboneSpec, overwrite: bool = False) -> None:
    """Teach TGLoRA a new architecture, keyed by its transformers `config.model_type`."""
    if model_type in BACKBONES and not overwrite:
        raise ValueError(f"A backbone {model_type!r} is already registered; pass overwrite=True to replace it.")
    if model_type in BACKBONES:
        warnings.warn(f"Replacing the registered TGLoRA backbone {model_type!r}.", stacklevel=2)
    BACKBONES[model_type] = spec


def backbone_core(model: nn.Module) -> nn.Module:
    """The module that holds the stages: `model.swin` for `SwinForImageClassification`, the model itself for
    `SwinModel` and `SwinBackbone`."""
    base = getattr(model, "base_model", model)
    return model if base is None else base


def get_backbone_spec(model: nn.Module) -> tuple[str, BackboneSpec]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(
            f"TGLoRA does not know the architecture {model_type!r} ({type(model).__name__}); supported are "
            f"{sorted(BACKBONES)}. Describe it with `peft_tglora.register_backbone(model_type, BackboneSpec(...))`."
        )
    return model_type, BACKBONES[model_type]
