"""The example scripts run for real on a tiny Swin and a few synthetic images: outputs, resume, DDP, Hub cache."""

import importlib.util
import json
import os
import re
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


def run_training(*argv, patches=None, base=TINY):
    """
    Run examples/train_tglora.py in this process (Accelerate's singletons reset around it), with attributes of the
    freshly loaded example replaced by `patches` (`{name: wrap}`, e.g. its loss).
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    module = load_example("train_tglora")
    for name, value in (patches or {}).items():
        setattr(module, name, value(getattr(module, name)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: steady timings on a shared 2-core machine
    try:
        return module.main([*base, *map(str, argv)])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def subprocess_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_python(argv, env, cwd, returncode=0, timeout=None):
    done = subprocess.run(
        [sys.executable, *argv], check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert (done.returncode == 0) == (returncode == 0), done.stderr[-3000:]
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
        with pytest.raises(SystemExit) as exit_info:  # a failed push fails the job, after saving everything
            run_training(
                "--output_dir", out, "--batch_size", 4, "--num_epochs", 2, "--with_tracking", "--logging_steps", 1,
                "--checkpointing_steps", "epoch", "--push_to_hub", "--hub_model_id", "user/tglora-tiny",
            )  # fmt: skip
    assert "Push to 'user/tglora-tiny' failed" in str(exit_info.value.code)
    metrics = json.loads((out / "all_results.json").read_text())["metrics"]
    return out, metrics, "\n".join(capture["lines"])


def test_outputs_adapter_heads_card_and_logs(trained):
    out, metrics, printed = trained
    for name in ["adapter_config.json", "adapter_model.safetensors", "heads/model.safetensors", "heads/config.json"]:
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
                 'load_multitask_model("user/tglora-tiny")', "`heads/`", "- PEFT "]:  # fmt: skip
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
    for name in ["adapter_model.safetensors", "heads/model.safetensors"]:
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# for the patched-run scripts below: the example loaded from argv[1] (RUN_EXAMPLE: and run on the rest of argv)
LOAD_EXAMPLE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("train_tglora", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""
RUN_EXAMPLE = LOAD_EXAMPLE + "module.main(sys.argv[2:])\n"


DIGESTS = (
    """
import hashlib, os
import peft_tglora.tasks.evaluation as evaluation
evaluate = evaluation.evaluate
def evaluate_and_digest(model, *args, **kwargs):  # each process writes a SHA-256 of its trained weights
    digest = hashlib.sha256()
    for name, param in sorted(getattr(model, "module", model).named_parameters()):
        if param.requires_grad:
            digest.update(name.encode() + param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    open(os.path.join(os.environ["DIGESTS"], f"rank_{os.environ['RANK']}"), "w").write(digest.hexdigest())
    return evaluate(model, *args, **kwargs)
import torch
evaluation.evaluate = evaluate_and_digest
"""
    + RUN_EXAMPLE
)


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "digests.py").write_text(DIGESTS)
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (its --cpu launcher spawns
    # several only through mpirun); torchrun's launcher plus the script's --cpu gives two gloo processes on a CPU
    command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(tmp_path / "digests.py"), str(EXAMPLES / "train_tglora.py"),
               "--cpu", *TINY, "--batch_size", "2", "--max_train_steps", "3", "--output_dir", str(out),
               "--push_to_hub", "--hub_model_id", "user/tglora-ddp"]  # fmt: skip
    # offline mode makes the push fail for real: the run must still finish and keep its outputs
    done = run_python(command, subprocess_env(HF_HUB_OFFLINE="1", DIGESTS=str(tmp_path)), tmp_path, returncode=1)
    assert json.loads((out / "all_results.json").read_text())["steps"] == 3
    digests = {(tmp_path / f"rank_{r}").read_text() for r in range(2)}
    assert len(digests) == 1, digests
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
from peft_tglora.tasks.evaluation import evaluate
from peft_tglora.tasks.model import load_multitask_model
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
    from peft_tglora.tasks.model import build_backbone, load_multitask_model

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


# ---- faults: a run that cannot finish properly fails loudly, never leaves broken results behind (issue 8)
def nan_on_call(*bad_calls, counter=None):
    """Wraps `multitask_loss`: its result is NaN on the given calls (1-based); `counter` counts the calls."""
    counter = counter if counter is not None else {}

    def wrap(loss_fn):
        def loss(*args, **kwargs):
            counter["calls"] = counter.get("calls", 0) + 1
            total, per_task = loss_fn(*args, **kwargs)
            return (total * float("nan"), per_task) if counter["calls"] in bad_calls else (total, per_task)

        return loss

    return wrap


def read_weights(folder):
    return {name: load_file(folder / name) for name in ["adapter_model.safetensors", "heads/model.safetensors"]}


def test_nonfinite_loss_stops_before_saving_anything(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 3: per-task losses .*semseg"):
        run_training("--max_train_steps", 4, "--checkpointing_steps", 1, "--output_dir", out,
                     patches={"multitask_loss": nan_on_call(3)})  # fmt: skip
    assert not (out / "adapter_model.safetensors").exists() and not (out / "all_results.json").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_1", "step_2"]  # none after the NaN
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoints/step_2/model.safetensors").values())


def test_nonfinite_steps_skipped_up_to_the_limit_and_results_are_strict_json(tmp_path, monkeypatch):
    # reference: a run whose loss is NaN at step 3 and skips it holds the same weights after step 3 as after step 2
    from peft_tglora.tasks import evaluation

    evaluate = evaluation.evaluate
    nan_metric = lambda *a, **k: {t: {**m, "nan_metric": float("nan")} for t, m in evaluate(*a, **k).items()}  # noqa: E731
    monkeypatch.setattr(evaluation, "evaluate", nan_metric)

    common = ["--checkpointing_steps", 1, "--checkpoints_total_limit", 0, "--max_nonfinite_steps", 1]
    run_training(*common, "--max_train_steps", 4, "--output_dir", tmp_path / "out",
                 patches={"multitask_loss": nan_on_call(3)})  # fmt: skip
    ckpt = tmp_path / "out" / "checkpoints"
    before, after = load_file(ckpt / "step_2/model.safetensors"), load_file(ckpt / "step_3/model.safetensors")
    trained = [k for k in before if "running_" not in k and "num_batches" not in k]  # norm statistics do move
    assert trained
    for key in trained:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    text = (tmp_path / "out" / "all_results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in all_results.json"))
    assert results["metrics"]["semseg"]["nan_metric"] is None and results["steps"] == 4
    with pytest.raises(FloatingPointError, match="--max_nonfinite_steps 1"):  # the second one is past the limit
        run_training(*common, "--max_train_steps", 4, "--output_dir", tmp_path / "two",
                     patches={"multitask_loss": nan_on_call(2, 3)})  # fmt: skip


KILLED_MID_SAVE = (
    """
import os, time
import accelerate.checkpointing as checkpointing
save = checkpointing.save
def save_and_hang(obj, path, *args, **kwargs):
    if "step_3" in str(path):  # the third checkpoint: write half a file, then wait for the SIGKILL
        open(path, "wb").write(b"half a safetensors file")
        open(os.environ["KILL_WHEN"], "w").close()
        time.sleep(600)
    return save(obj, path, *args, **kwargs)
checkpointing.save = save_and_hang
"""
    + RUN_EXAMPLE
)


@pytest.mark.slow
def test_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    import signal
    import time

    common = ["--max_train_steps", 5, "--checkpointing_steps", 1, "--lora_dropout", 0.1]
    run_training(*common, "--output_dir", tmp_path / "straight")
    marker, out = tmp_path / "saving", tmp_path / "killed"
    argv = [sys.executable, "-c", KILLED_MID_SAVE, str(EXAMPLES / "train_tglora.py"), *TINY, *map(str, common)]
    child = subprocess.Popen([*argv, "--output_dir", str(out)], env=subprocess_env(KILL_WHEN=str(marker)))
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the child never reached the third checkpoint"
    child.send_signal(signal.SIGKILL)
    child.wait()
    run_training(*common, "--output_dir", out, "--resume_from_checkpoint", "latest")  # step_2, not the half step_3
    straight, resumed = read_weights(tmp_path / "straight"), read_weights(out)
    for name in straight:
        for key in straight[name]:
            torch.testing.assert_close(resumed[name][key], straight[name][key], rtol=0, atol=1e-6, msg=key)
    assert not list((out / "checkpoints").glob("tmp-*"))  # the partial save was cleaned up


def test_resume_without_rng_state_warns(tmp_path):
    out = tmp_path / "out"
    run_training("--max_train_steps", 3, "--checkpointing_steps", 1, "--stop_after_steps", 1, "--output_dir", out)
    (out / "checkpoints" / "step_1" / "random_states_0.pkl").unlink()
    with pytest.warns(UserWarning, match="random_states_0.pkl.*NOT be bit-identical"):
        run_training("--max_train_steps", 2, "--output_dir", out, "--resume_from_checkpoint", "latest")


def test_resume_from_a_damaged_checkpoint_names_it(tmp_path):
    out = tmp_path / "out"
    run_training("--max_train_steps", 2, "--checkpointing_steps", 1, "--stop_after_steps", 1, "--output_dir", out)
    damaged = out / "checkpoints" / "step_1"
    (damaged / "optimizer.bin").write_bytes((damaged / "optimizer.bin").read_bytes()[:100])  # a truncated file
    with pytest.raises(RuntimeError, match=f"Cannot resume from '{damaged}'.*damaged"):
        run_training("--max_train_steps", 2, "--output_dir", out, "--resume_from_checkpoint", damaged)


def test_new_run_into_a_folder_with_checkpoints_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "out"
    run_training("--max_train_steps", 2, "--checkpointing_steps", 1, "--output_dir", out)
    before = (out / "checkpoints" / "step_2" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="holds checkpoints of another run .*--overwrite_output_dir"):
        run_training("--max_train_steps", 1, "--seed", 1, "--output_dir", out)
    assert (out / "checkpoints" / "step_2" / "model.safetensors").read_bytes() == before
    run_training("--max_train_steps", 1, "--seed", 1, "--checkpointing_steps", 1, "--output_dir", out,
                 "--overwrite_output_dir")  # fmt: skip
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"]  # "latest" is now the new run's


def test_unwritable_output_dir_fails_before_the_first_step(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    counter = {}
    with pytest.raises(PermissionError, match="--output_dir .*taken.* is not a writable folder"):
        run_training("--max_train_steps", 2, "--output_dir", tmp_path / "taken",
                     patches={"multitask_loss": nan_on_call(counter=counter)})  # fmt: skip
    assert counter.get("calls", 0) == 0


def test_bad_files_are_found_before_training_and_named(tmp_path):
    from peft_tglora.tasks import make_synthetic_multitask, save_multitask_folder

    tasks = ["semseg", "saliency"]
    for split, n in [("train", 8), ("val", 4)]:
        save_multitask_folder(make_synthetic_multitask(n, 32, tasks, seed=0), tmp_path / "data", split, tasks)
    images = sorted((tmp_path / "data" / "train" / "images").iterdir())
    images[1].write_bytes(b"not an image")
    labels = sorted((tmp_path / "data" / "train" / "semseg").iterdir())
    from PIL import Image

    Image.new("L", (16, 16)).save(labels[2])  # half the size of its image
    argv = ["--tasks", "semseg,saliency", "--task_groups", "1,1,2,2", "--data_root", tmp_path / "data"]
    argv += ["--max_train_steps", 2]
    counter = {}
    with pytest.raises(ValueError, match="2 rows cannot be used") as error:
        run_training(*argv, "--output_dir", tmp_path / "out", base=TINY[2:],
                     patches={"multitask_loss": nan_on_call(counter=counter)})  # fmt: skip
    assert str(images[1]) in str(error.value) and str(labels[2]) in str(error.value)
    assert counter.get("calls", 0) == 0
    with pytest.raises(RuntimeError, match=r"Cannot decode row \d .*data/train/"):  # unchecked: named at its batch
        run_training(*argv, "--output_dir", tmp_path / "unchecked", "--skip_data_check", base=TINY[2:])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss_weights", "normal=10"], r"--loss_weights names 'normal', .*'normals'"),
        (["--tasks", "semseg,normal"], r"--tasks \['normal'\] are not tasks of --dataset synthetic .*'normals'"),
        (["--task_groups", '[[["semseg", "normal"]]]'], r"--task_groups names tasks \['normal'\]"),
    ],
    ids=["loss_weights", "tasks", "task_groups"],
)
def test_unknown_task_names_are_an_error_listing_the_known_ones(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_example("train_tglora").parse_args(["--tasks", TASKS, *argv] if argv[0] != "--tasks" else argv)
    assert re.search(message, capsys.readouterr().err)


def test_checkpoints_rotate(tmp_path):
    assert load_example("train_tglora").parse_args([]).checkpoints_total_limit == 3  # a default, not "keep all"
    run_training("--max_train_steps", 4, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2,
                 "--output_dir", tmp_path)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]


STALLED_RANK = (
    LOAD_EXAMPLE
    + """
import os, time
multitask_loss = module.multitask_loss
calls = []
def stall_rank_1(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        time.sleep(600)  # stops without dying: e.g. a hung file system
    return multitask_loss(*args, **kwargs)
module.multitask_loss = stall_rank_1
module.main(sys.argv[2:])
"""
)


@pytest.mark.slow
def test_a_stalled_rank_makes_the_others_fail_after_ddp_timeout(tmp_path):
    import time

    (tmp_path / "stall.py").write_text(STALLED_RANK)
    command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(tmp_path / "stall.py"), str(EXAMPLES / "train_tglora.py"),
               "--cpu", *TINY, "--batch_size", "2", "--max_train_steps", "3", "--ddp_timeout", "5",
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    start = time.monotonic()
    done = run_python(command, subprocess_env(), tmp_path, returncode=1, timeout=240)
    assert time.monotonic() - start < 200
    assert "Timed out waiting 5000ms" in done.stderr, done.stderr[-3000:]  # gloo's error, after --ddp_timeout


def test_non_square_image_size(tmp_path):
    from peft_tglora.tasks.model import load_multitask_model

    metrics = run_training("--image_size", "48,64", "--max_train_steps", 1, "--output_dir", tmp_path)
    model, info = load_multitask_model(tmp_path)
    assert info["image_size"] == [48, 64]
    outputs = model(torch.zeros(1, 3, 48, 64))
    assert set(outputs) == set(metrics) and all(o.shape[-2:] == (48, 64) for o in outputs.values())
