"""Smoke test of benchmarks/bench_tglora.py on a tiny Swin: it runs and its comparisons are set up fairly.

No timing goal is asserted here; the numbers live in benchmarks/RESULTS.md.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import SwinModel


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tglora.py"
TINY = dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=2)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tglora", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cfg(bench):
    # one thread: on a busy machine, two-thread barriers on tiny ops wait for scheduler slices
    return bench.BenchConfig(backbone=dict(TINY), r=4, lora_alpha=4, rounds=2, warmup=1, threads=1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_run_gives_positive_finite_ratios_and_memory(bench, cfg):
    results = bench.run(cfg, memory="inprocess")
    assert {(r["numerator"], r["denominator"]) for r in results["ratios"]} == {
        (num, den) for num, den, _ in bench.COMPARISONS
    }
    for ratio in results["ratios"]:
        assert len(ratio["per_round"]) == cfg.rounds
        assert all(math.isfinite(v) and v > 0 for v in ratio["per_round"])
    for name, variant in results["variants"].items():
        assert len(variant["seconds"]) == cfg.rounds, name
        assert math.isfinite(variant["step_peak_mib"]), name
    table = bench.to_markdown(results)
    assert "`tglora` / `lora_streams`" in table and "| `naive_loop` |" in table


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_baselines_adapt_the_same_linears_and_replicate_streams_like_tglora(bench, cfg):
    x = bench.pixel_values(cfg)
    base = bench.build_backbone(cfg)
    model = bench.tglora_model(cfg, base, cfg.task_groups)  # B = 0: every stream equals the base model
    lora = bench.get_peft_model(bench.build_backbone(cfg), bench.lora_config(cfg))
    assert sorted(model.targeted_module_names) == sorted(lora.targeted_module_names)

    reference = bench.build_backbone(cfg).eval()
    bench.replicate_streams(reference, bench.task_tree(cfg))
    with torch.no_grad():
        got, want = model.eval()(pixel_values=x), reference(pixel_values=x)
    assert want.last_hidden_state.shape[0] == 4 * cfg.batch_size
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-6)
    assert isinstance(reference, SwinModel)


def test_cli_quick_arguments_parse(bench):
    with pytest.raises(SystemExit):
        bench.main(["--memory", "nonsense"])


@pytest.fixture(scope="module")
def matmul_bench(bench):  # imports bench_tglora by name, which the `bench` fixture registered
    path = BENCH.with_name("bench_grouped_matmul.py")
    spec = importlib.util.spec_from_file_location("bench_grouped_matmul", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_grouped_matmul_records_the_grouped_layers_and_every_kernel_computes_its_matmul(matmul_bench, cfg):
    layers = matmul_bench.grouped_layers(cfg)
    # tree 1,1,2,4 on depths 1,1,2,1: stage 2 (2 blocks) and stage 3 (1 block) run groups, 6 adapted linears a block
    stages = [name.split(".layers.")[1].split(".")[0] for name, _, _, _ in layers]
    assert sorted(stages) == ["2"] * 12 + ["3"] * 6
    assert [stage for _, stage, _, _ in layers] == [int(s) for s in stages]
    for name, _, layer, shape in layers:
        weights = layer.merged_group_weight
        groups = {"2": 2, "3": 4}[name.split(".layers.")[1].split(".")[0]]
        assert weights.shape[0] == groups
        x = torch.randn(shape).reshape(-1, shape[-1])
        rows = x.shape[0] // groups
        bias, base = layer.get_base_layer().bias, layer.get_base_layer().weight
        # naive references: each group's rows times its own weight, and every row times the base weight
        per_group = torch.cat([x[g * rows : (g + 1) * rows] @ weights[g].T + bias for g in range(groups)])
        one = x @ base.T + bias
        assert not torch.allclose(per_group, one)  # the groups' weights differ from the base (B != 0)
        expected = {"one_weight": one, "same_weight": one}
        for kernel, call in matmul_bench.kernels(layer, x).items():
            torch.testing.assert_close(call(), expected.get(kernel, per_group), rtol=1e-4, atol=1e-5, msg=kernel)


def test_grouped_matmul_table_has_a_row_per_shape_and_a_total(matmul_bench, cfg):
    rows = matmul_bench.run(cfg, repeats=1)
    assert {(r["stage"], r["groups"]) for r in rows} == {(2, 2), (3, 4)}
    assert sum(r["layers"] for r in rows) == 18
    for r in rows:
        assert r["ratios"] and all(math.isfinite(v["median"]) and v["median"] > 0 for v in r["ratios"].values())
    table = matmul_bench.to_markdown(rows, cfg)
    assert table.count("\n| 2 |") + table.count("\n| 3 |") == len(rows) and "| all grouped layers |" in table
