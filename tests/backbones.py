"""Tiny backbones built from configs (no downloads), one per supported architecture."""

import torch
from transformers import (
    PvtConfig,
    PvtModel,
    PvtV2Config,
    PvtV2Model,
    SegformerConfig,
    SegformerModel,
    SwinConfig,
    SwinModel,
    Swinv2Config,
    Swinv2Model,
)


IMAGE_SIZE = 64
_PYRAMID = dict(
    image_size=IMAGE_SIZE,
    depths=[1, 1, 2, 1],
    hidden_sizes=[8, 16, 16, 32],
    num_attention_heads=[1, 1, 2, 2],
    mlp_ratios=[2, 2, 2, 2],
)


def tiny_backbone(model_type: str, seed: int = 0, width: int = 1) -> torch.nn.Module:
    """`width` multiplies every channel count: `width=2` is the same architecture at another size."""
    torch.manual_seed(seed)
    swin = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=8 * width,
        depths=[1, 1, 2, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
    )
    pyramid = {**_PYRAMID, "hidden_sizes": [c * width for c in _PYRAMID["hidden_sizes"]]}
    if model_type == "swin":
        model = SwinModel(SwinConfig(**swin))
    elif model_type == "swinv2":
        model = Swinv2Model(Swinv2Config(**swin))
    elif model_type == "pvt":
        model = PvtModel(
            PvtConfig(
                **pyramid,
                num_encoder_blocks=4,
                sequence_reduction_ratios=[4, 2, 1, 1],
                patch_sizes=[4, 2, 2, 2],
                strides=[4, 2, 2, 2],
            )
        )
    elif model_type == "pvt_v2":
        model = PvtV2Model(PvtV2Config(**pyramid, sr_ratios=[4, 2, 1, 1]))
    elif model_type == "segformer":
        model = SegformerModel(SegformerConfig(**pyramid, sr_ratios=[4, 2, 1, 1]))
    else:
        raise ValueError(model_type)
    return model.eval()


MODEL_TYPES = ["swin", "swinv2", "pvt", "pvt_v2", "segformer"]


# where stage s lives in module names, written independently of peft_tglora.backbones
STAGE_PATTERNS = {
    "swin": r"encoder\.layers\.(\d+)\.",
    "swinv2": r"encoder\.layers\.(\d+)\.",
    "pvt": r"encoder\.block\.(\d+)\.",
    "pvt_v2": r"encoder\.layers\.(\d+)\.",
    "segformer": r"stages\.(\d+)\.",
}


def reference_stage_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per-stage maps [B, C, H, W] from the model's own `output_hidden_states` (no hooks)."""
    model_type = model.config.model_type
    if model_type == "swin":
        out = model(pixel_values, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        return list(out.reshaped_hidden_states[1:])
    if model_type == "swinv2":  # Swinv2Model does not pass the before-downsampling flag on: ask its encoder
        embeddings, dims = model.embeddings(pixel_values)
        out = model.encoder(embeddings, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        return list(out.reshaped_hidden_states[1:])
    out = model(pixel_values, output_hidden_states=True)
    if model_type in ("pvt_v2", "segformer"):
        return list(out.hidden_states)
    # PVT: one entry per block (plus the final norm); take each stage's last block, drop the class token
    ends = torch.tensor(model.config.depths).cumsum(0) - 1
    maps = []
    for s, end in enumerate(ends.tolist()):
        tokens = out.hidden_states[end]
        side = IMAGE_SIZE // 4 // 2**s
        tokens = tokens[:, -side * side :]
        maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side))
    return maps
