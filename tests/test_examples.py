"""The example scripts run for real on a tiny Swin and a few synthetic images: outputs, resume, DDP, Hub cache."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = "semseg,human_parts,saliency,normals"
TINY = [
    "--tasks", TASKS, "--task_groups", "1,1,2,4", "--image_size", "64", "--synthetic_size", "16", "--r", "4",
    "--head_width", "4", "--head_hidden", "16", "--eval_batch_size", "8",
    "--backbone_config", '{"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}',
]  # fmt: skip


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_training(*argv, base=TINY):
    """Run examples/train_tglora.py in this process (Accelerate's singletons reset around it)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: steady timings on a shared 2-core machine
    try:
        return load_example("train_tglora").main([*base, *map(str, argv)])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def subprocess_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_python(argv, env, cwd):
    done = subprocess.run([sys.executable, *argv], check=False, env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One complete run: 2 epochs x 4 steps, TensorBoard, checkpoint per epoch, and a push that fails (no network)."""
    out = tmp_path_factory.mktemp("run") / "out"
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise ConnectionError("no network in the tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.HfApi, "create_repo", refuse)
        capture = {}
        mp.setattr("builtins.print", lambda *a, **k: capture.setdefault("lines", []).append(" ".join(map(str, a))))
        metrics = run_training(
            "--output_dir", out, "--batch_size", 4, "--num_epochs", 2, "--with_tracking", "--logging_steps", 1,
            "--checkpointing_steps", "epoch", "--push_to_hub", "--hub_model_id", "user/tglora-tiny",
        )  # fmt: skip
    return out, metrics, "\n".join(capture["lines"])


def test_outputs_adapter_heads_card_and_logs(trained):
    out, metrics, printed = trained
    for name in ["adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "heads_config.json"]:
        assert (out / name).is_file(), name
    assert (out / "base_model" / "config.json").is_file()  # the random demo backbone travels with the adapter
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_8"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TGLORA" and config["task_groups"][2] == [
        ["semseg", "human_parts"],
        ["saliency", "normals"],
    ]
    results = json.loads((out / "all_results.json").read_text())
    assert results["steps"] == 8 and results["metrics"] == metrics
    assert set(metrics) == set(TASKS.split(",")) and 0 <= metrics["semseg"]["mIoU"] <= 100
    card = (out / "README.md").read_text()
    for text in ["TGLoRA adapter", "{semseg, human_parts} {saliency, normals}", "mIoU", "import peft_tglora",
                 'load_multitask_model("user/tglora-tiny")', "heads.safetensors"]:  # fmt: skip
        assert text in card, text
    assert "| normals | mean_angular_error |" in printed  # the final table


def test_failed_push_keeps_local_results_and_says_so(trained):
    out, _, printed = trained
    assert "Push to 'user/tglora-tiny' failed" in printed and str(out.resolve()) in printed
    assert load_file(out / "adapter_model.safetensors")  # intact and readable


def test_checkpoints_hold_only_trained_weights(trained):
    out, _, _ = trained
    state = load_file(out / "checkpoints" / "step_8" / "model.safetensors")
    assert state and all("tglora_" in k or k.startswith("heads.") for k in state), sorted(state)[:5]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # accumulation 2 over 8 batches: 4 steps per epoch; the interruption after step 3 falls mid-epoch and mid-way
    # through a shuffle; dropout and stochastic depth make the global RNG matter too
    common = ["--batch_size", 2, "--gradient_accumulation_steps", 2, "--num_epochs", 2, "--lora_dropout", 0.1,
              "--checkpointing_steps", 3, "--eval_every", 1]  # fmt: skip
    run_training(*common, "--output_dir", tmp_path / "straight")
    assert run_training(*common, "--output_dir", tmp_path / "resumed", "--stop_after_steps", 3) is None
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_3"]
    run_training(*common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    for name in ["adapter_model.safetensors", "heads.safetensors"]:
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (its --cpu launcher spawns
    # several only through mpirun); torchrun's launcher plus the script's --cpu gives two gloo processes on a CPU
    command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(EXAMPLES / "train_tglora.py"), "--cpu", *TINY,
               "--batch_size", "2", "--max_train_steps", "3", "--output_dir", str(out),
               "--push_to_hub", "--hub_model_id", "user/tglora-ddp"]  # fmt: skip
    # offline mode makes the push fail for real: the run must still finish and keep its outputs
    done = run_python(command, subprocess_env(HF_HUB_OFFLINE="1"), tmp_path)
    results = json.loads((out / "all_results.json").read_text())
    assert results["steps"] == 3
    assert len(results["weight_digests"]) == 2 and results["weights_in_sync"], results["weight_digests"]
    assert "failed" in done.stdout and (out / "adapter_model.safetensors").is_file()


def hub_cache(folder, hf_home, repo_id, sha="0123456789abcdef0123456789abcdef01234567"):
    """The layout `huggingface_hub` leaves after a download: models--owner--name/{refs/main, snapshots/<sha>/...}."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)


EVALUATE_FROM_HUB = """
import json, sys, torch
import peft_tglora
from peft_tglora.tasks import MultiTaskDataset, collate, eval_transforms, make_synthetic_multitask
from peft_tglora.training import evaluate, load_multitask_model
model, info = load_multitask_model(sys.argv[1])
rows = make_synthetic_multitask(8, 64, info["tasks"], seed=1)
loader = torch.utils.data.DataLoader(MultiTaskDataset(rows, info["tasks"], eval_transforms(64)), batch_size=8, collate_fn=collate)
print("METRICS" + json.dumps(evaluate(model, loader, info["tasks"], info["num_classes"])))
"""


@pytest.mark.slow
def test_adapter_loads_from_hub_cache_offline_and_reproduces_metrics(trained, tmp_path):
    out, metrics, _ = trained
    hub_cache(out, tmp_path / "hf", "user/tglora-tiny")
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    done = run_python(["-c", EVALUATE_FROM_HUB, "user/tglora-tiny"], env, tmp_path)
    reloaded = json.loads(done.stdout.split("METRICS")[1])
    for task, values in metrics.items():
        for name, value in values.items():
            assert reloaded[task][name] == pytest.approx(value, abs=1e-6), (task, name)
    # and the inference example, by repository id, offline
    inference = [str(EXAMPLES / "inference.py"), "--model", "user/tglora-tiny", "--synthetic", "2"]
    run_python([*inference, "--output_dir", str(tmp_path / "preds")], env, tmp_path)
    for stem in ["synthetic_0", "synthetic_1"]:
        for task in [*TASKS.split(","), "all"]:
            assert (tmp_path / "preds" / f"{stem}_{task}.png").is_file()


def test_inference_writes_one_image_per_task(trained, tmp_path):
    from PIL import Image

    out, _, _ = trained
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    written = load_example("inference").main(["--model", str(out), "--images", str(tmp_path / "red.png"),
                                              "--output_dir", str(tmp_path / "preds")])  # fmt: skip
    assert sorted(p.name for p in written) == sorted(f"red_{t}.png" for t in TASKS.split(","))
    assert Image.open(tmp_path / "preds" / "red_semseg.png").size == (40, 30)  # back at the image's own size
    assert Image.open(tmp_path / "preds" / "red_all.png").size == (40 * 5, 30)


def test_backbone_from_a_local_folder(tmp_path):
    from peft_tglora.training import build_backbone, load_multitask_model

    build_backbone(
        "tiny-swin", 64, {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
    ).save_pretrained(tmp_path / "swin")
    out = tmp_path / "out"
    metrics = run_training(
        "--backbone", tmp_path / "swin", "--max_train_steps", 2, "--output_dir", out, base=TINY[:-2]
    )
    assert not (out / "base_model").exists()  # a backbone with a path is loaded from it, not copied
    model, info = load_multitask_model(out)
    assert info["backbone"] == str(tmp_path / "swin")
    assert set(model(torch.zeros(1, 3, 64, 64))) == set(metrics)
