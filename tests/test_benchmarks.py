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
