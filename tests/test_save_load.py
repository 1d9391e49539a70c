"""Save -> load in a fresh interpreter, from a folder and from the Hub cache layout offline; push_to_hub's upload."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backbones import tiny_backbone
from peft import PeftConfig, get_peft_model
from safetensors.torch import load_file

from peft_tglora import TGLoraConfig


TESTS = Path(__file__).parent
TASKS = ["semseg", "depth", "normals"]

LOAD_AND_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
import peft_tglora
from backbones import tiny_backbone
from peft import PeftModel
model = PeftModel.from_pretrained(tiny_backbone("swin"), {source!r})
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    out = model(x)
torch.save({{t: [f.clone() for f in fs] for t, fs in out.task_features.items()}}, {result!r})
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    config = TGLoraConfig(tasks=TASKS, task_groups=[1, 1, 2, 3], r=4, init_lora_weights=False)
    model = get_peft_model(tiny_backbone("swin"), config)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = {t: [f.clone() for f in fs] for t, fs in model(x).task_features.items()}
    model.save_pretrained(path)
    return path, expected


def run_fresh(source, result, env=None):
    code = LOAD_AND_RUN.format(tests=str(TESTS), source=str(source), result=str(result))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for task in expected:
        for a, b in zip(got[task], expected[task]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_saved_files_are_safetensors_only(saved):
    path, _ = saved
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TGLORA"
    assert config["task_groups"][2] == [["semseg", "depth"], ["normals"]]  # counts are saved as the tree itself
    keys = load_file(path / "adapter_model.safetensors")
    assert keys and all(".tglora_" in k for k in keys)
    assert not any(".default" in k for k in keys)  # adapter names are stripped as in LoRA
    loaded = PeftConfig.from_pretrained(path)
    assert isinstance(loaded, TGLoraConfig) and loaded.task_groups == config["task_groups"]


def test_load_in_fresh_process_from_folder(saved, tmp_path):
    path, expected = saved
    assert_same(run_fresh(path, tmp_path / "out.pt"), expected)


def test_load_in_fresh_process_from_hub_cache_offline(saved, tmp_path):
    path, expected = saved
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--user--swin-tglora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((path / name).read_bytes())
    (hub / "models--user--swin-tglora" / "refs").mkdir()
    (hub / "models--user--swin-tglora" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    assert_same(run_fresh("user/swin-tglora", tmp_path / "out.pt", env=env), expected)


def test_push_to_hub_uploads_the_adapter(saved, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=TASKS, task_groups="1,1,2,3", r=4))
    model.push_to_hub("user/swin-tglora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "TGLORA"
