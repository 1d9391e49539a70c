"""Every ```python block of README.md, examples/README.md and docs/*.md runs as pasted, on tiny local models.

Each block runs alone in a fresh interpreter (single-threaded, in its own working folder, offline). The Hub ids the
blocks name are served from a fake Hub: a Hugging Face cache (`HF_HOME`) holding tiny models saved with
`save_pretrained` under those ids (`HUB` below), and uploads (`push_to_hub`, `HfApi.upload_folder`) are written into
that cache, so a later `from_pretrained` of the pushed id reads what was pushed. The blocks' text is not changed.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import SwinConfig, SwinModel


ROOT = Path(__file__).parents[1]
FENCE = re.compile(r"^```(?:python3?|py)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks():
    """`(file, line, code)` for every ```python block, read when the tests are collected."""
    files = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield path.relative_to(ROOT).as_posix(), line, match.group(1)


BLOCKS = list(python_blocks())


def tiny_swin_224(folder):
    """Stands for microsoft/swin-tiny-patch4-window7-224: same patch, window and 4 stages, 8 channels wide."""
    torch.manual_seed(0)
    config = SwinConfig(image_size=224, patch_size=4, window_size=7, embed_dim=8, depths=[1] * 4, num_heads=[1] * 4)
    SwinModel(config).save_pretrained(folder)


def trained_demo(folder):
    """Stands for a repository pushed by the demo: what `examples/train_tglora.py --demo` writes, on a tinier Swin."""
    tiny = ["--synthetic_size", "8", "--max_train_steps", "1", "--batch_size", "4", "--eval_batch_size", "8"]
    tiny += ["--backbone_config", '{"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}']
    script = ROOT / "examples" / "train_tglora.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--demo", "--cpu", *tiny, "--output_dir", str(folder)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"the demo run that stands for your-name/tglora-demo failed:\n{proc.stderr[-3000:]}"


# Hub ids named by the blocks -> what builds the tiny local stand-in
HUB = {
    "microsoft/swin-tiny-patch4-window7-224": tiny_swin_224,
    "your-name/tglora-demo": trained_demo,
}

# Runs in the block's interpreter before the block: uploads go into the fake Hub (the local cache), nothing leaves
FAKE_UPLOADS = r"""
import fnmatch, os, shutil
from pathlib import Path
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl

def _snapshot(repo_id):
    repo = Path(os.environ["HF_HOME"], "hub", "models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    return repo / "snapshots" / ("0" * 40)

def _create_repo(self, repo_id, **kwargs):
    return RepoUrl(f"https://huggingface.co/{repo_id}")

def _create_commit(self, repo_id, operations, **kwargs):
    for op in operations:
        target = _snapshot(repo_id) / op.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(op.path_or_fileobj, target)
    return f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"

def _upload_folder(self, *, repo_id, folder_path, path_in_repo="", ignore_patterns=None, **kwargs):
    ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    for file in Path(folder_path).rglob("*"):
        name = file.relative_to(folder_path).as_posix()
        if file.is_file() and not any(fnmatch.fnmatch(name, p) for p in ignore):
            target = _snapshot(repo_id) / (path_in_repo or "") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"

HfApi.create_repo, HfApi.create_commit, HfApi.upload_folder = _create_repo, _create_commit, _upload_folder
"""


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """`fake_hub(code)`: an HF_HOME whose cache holds every `HUB` model that `code` names, as a download leaves it."""
    home = tmp_path_factory.mktemp("hf")

    def with_models_named_in(code):
        for repo_id, build in HUB.items():
            repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
            if repo_id in code and not repo.is_dir():  # built once, on first use
                build(repo / "snapshots" / ("0" * 40))
                (repo / "refs").mkdir(parents=True)
                (repo / "refs" / "main").write_text("0" * 40)
        return home

    return with_models_named_in


def test_blocks_are_found():
    files = {file for file, _, _ in BLOCKS}
    assert "README.md" in files, "no ```python block found in README.md: did the fence pattern break?"


@pytest.mark.slow
@pytest.mark.parametrize(("file", "line", "code"), BLOCKS, ids=[f"{f}:{n}" for f, n, _ in BLOCKS])
def test_block_runs_as_pasted(file, line, code, fake_hub, tmp_path):
    home = tmp_path / "hf"
    shutil.copytree(fake_hub(code), home)  # each block sees the fake Hub as built, not what another block pushed
    work = tmp_path / "work"
    work.mkdir()
    script = work / "_block.py"
    block = f"{file}, block at line {line}"
    script.write_text(FAKE_UPLOADS + f"\nexec(compile({code!r}, {block!r}, 'exec'), {{'__name__': '__main__'}})\n")
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",  # an id missing from HUB fails instead of downloading
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": "",  # the block sees the installed package only, as a reader's does
    }
    proc = subprocess.run(
        [sys.executable, script.name], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{block} fails as pasted:\n{proc.stderr[-4000:]}"
