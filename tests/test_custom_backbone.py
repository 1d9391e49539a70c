"""A user teaches TGLoRA a new architecture with `register_backbone`, and the tree semantics hold for it."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput

from peft_tglora import BACKBONES, BackboneSpec, TGLoraConfig, register_backbone


class ToyConfig(PretrainedConfig):
    model_type = "toy_pyramid"


class ToyStage(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.embed = nn.Linear(dim_in, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens):  # [B, N, C] -> [B, N/4, C'] (2x2 pooling first)
        b, n, c = tokens.shape
        side = int(n**0.5)
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        tokens = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        tokens = self.embed(tokens)
        return tokens + self.mlp(tokens)


class ToyPyramid(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = ToyConfig()
        self.stages = nn.ModuleList([ToyStage(3, 8), ToyStage(8, 16), ToyStage(16, 16)])

    def forward(self, pixel_values, **kwargs):
        tokens = pixel_values.flatten(2).transpose(1, 2)
        for stage in self.stages:
            tokens = stage(tokens)
        return BaseModelOutput(last_hidden_state=tokens)


def tokens_to_map(module, args, kwargs, output):
    side = int(output.shape[1] ** 0.5)
    return output.transpose(1, 2).reshape(output.shape[0], -1, side, side)


SPEC = BackboneSpec(
    target_modules=("mlp.0", "mlp.2"),
    stage_containers=lambda core: [[stage] for stage in core.stages],
    split_modules=lambda core: list(core.stages),
    feature_modules=lambda core: list(core.stages),
    feature_fn=tokens_to_map,
)


@pytest.fixture
def registered():
    register_backbone("toy_pyramid", SPEC)
    yield
    del BACKBONES["toy_pyramid"]


def test_registered_backbone_follows_the_tree(registered):
    torch.manual_seed(0)
    base = ToyPyramid()
    tree = [[["a", "b", "c"]], [["a"], ["b", "c"]], [["a"], ["b"], ["c"]]]
    model = get_peft_model(base, TGLoraConfig(tasks=["a", "b", "c"], task_groups=tree, r=2, init_lora_weights=False))
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert len(model.targeted_module_names) == 6
    for task in ("a", "b", "c"):
        # reference: run the stages by hand, each linear with its group's update added
        tokens = x.flatten(2).transpose(1, 2)
        for s, stage in enumerate(model.base_model.model.stages):
            group = next(g for g, members in enumerate(tree[s]) if task in members)
            b_, n, c = tokens.shape
            side = int(n**0.5)
            tokens = nn.functional.avg_pool2d(tokens.transpose(1, 2).reshape(b_, c, side, side), 2)
            tokens = stage.embed(tokens.flatten(2).transpose(1, 2))
            h = tokens
            for i in (0, 2):
                lin = stage.mlp[i]
                w = lin.base_layer.weight + (8 / 2) * lin.tglora_B["default"][group] @ lin.tglora_A["default"][group]
                h = nn.functional.linear(h, w, lin.base_layer.bias)
                if i == 0:
                    h = nn.functional.gelu(h)
            tokens = tokens + h
            torch.testing.assert_close(
                out.task_features[task][s], tokens_to_map(None, (), {}, tokens), atol=1e-5, rtol=1e-4
            )


def test_registering_twice_needs_overwrite(registered):
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        register_backbone("toy_pyramid", SPEC)
    with pytest.warns(UserWarning, match="Replacing"):
        register_backbone("toy_pyramid", SPEC, overwrite=True)


def test_trainable_parameter_count_by_hand():
    from backbones import tiny_backbone

    model = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=["a", "b", "c", "d"], task_groups="1,1,2,4", r=4))
    trainable, _ = model.get_nb_trainable_parameters()
    expected = 0
    dims = [8, 16, 32, 64]
    depths = [1, 1, 2, 1]
    for dim, depth, groups in zip(dims, depths, [1, 1, 2, 4]):
        per_block = 4 * (dim + dim) + (dim + 4 * dim) * 2  # q, k, v, o: dim -> dim; fc1: dim -> 4 dim; fc2 back
        expected += depth * groups * 4 * per_block
    assert trainable == expected
