import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_tglora.clustering import build_task_tree
from peft_tglora.similarity import (
    TaskSimilarity,
    _SignedBucketProjection,
    compute_task_similarity,
    shared_parameters,
)


class TinyBackbone(nn.Module):
    """Two conv stages; returns per-task features like a TGLoRA model with one shared group."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = list(tasks)
        self.stage1 = nn.Conv2d(3, 4, 3, padding=1)
        self.stage2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, pixel_values):
        f1 = torch.tanh(self.stage1(pixel_values))
        f2 = torch.tanh(self.stage2(f1))
        return SimpleNamespace(task_features=dict.fromkeys(self.tasks, (f1, f2)))


class Head(nn.Module):
    def __init__(self, out_channels=1):
        super().__init__()
        self.proj = nn.Conv2d(6, out_channels, 1)

    def forward(self, features):
        return F.interpolate(self.proj(features[-1]), scale_factor=2.0, mode="bilinear")


def mse(key):
    return lambda prediction, batch: F.mse_loss(prediction[:, 0], batch[key])


def make_batches(num, seed, batch_size=3):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        x = torch.randn(batch_size, 3, 8, 8, generator=generator)
        out.append({"pixel_values": x, "a": x[:, 0] * x[:, 1], "b": x.mean(1), "c": -x[:, 2]})
    return out


def setup(tasks=("a", "b", "c"), seed=0):
    torch.manual_seed(seed)
    backbone = TinyBackbone(tasks).requires_grad_(False)  # frozen, as in the paper
    heads = {t: Head() for t in tasks}
    losses = {t: mse(t) for t in tasks}
    return backbone, heads, losses


def brute_force(backbone, heads, losses, loaders, tasks, num_batches, params=None):
    """The paper's formula, written plainly: per-batch gradients per parameter, literal S over every pair of batches."""
    params = list(backbone.parameters()) if params is None else params
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    grads = {}
    for task in tasks:
        grads[task] = []
        for batch in loaders[task][:num_batches]:
            loss = losses[task](heads[task](backbone(batch["pixel_values"]).task_features[task]), batch)
            per_param = [torch.autograd.grad(loss, p, retain_graph=True)[0].flatten() for p in params]
            grads[task].append(torch.cat(per_param).double())
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)

    def s(g, h):
        scale = g.norm() + h.norm()
        return F.cosine_similarity(g / scale, h / scale, dim=0).item()

    matrix = np.zeros((len(tasks), len(tasks)))
    for (i, t), (j, u) in itertools.product(enumerate(tasks), repeat=2):
        matrix[i, j] = np.mean([s(g, h) for g in grads[t] for h in grads[u]])
    within = [np.mean([s(g, h) for g, h in itertools.permutations(grads[t], 2)]) for t in tasks]
    return matrix, within


@pytest.mark.parametrize("shared_loader", [False, True], ids=["loader-per-task", "one-loader"])
def test_matches_brute_force(shared_loader):
    tasks = ["a", "b", "c"]
    backbone, heads, losses = setup(tasks)
    if shared_loader:
        batches = make_batches(4, seed=1)
        loaders, reference_loaders = batches, dict.fromkeys(tasks, batches)
    else:
        loaders = {t: make_batches(3 + i, seed=10 + i) for i, t in enumerate(tasks)}  # unequal counts too
        reference_loaders = loaders
    sim = compute_task_similarity(
        backbone, heads, losses, loaders, num_batches=4, head_warmup_steps=0, disable_progress=True
    )
    expected, within = brute_force(backbone, heads, losses, reference_loaders, tasks, 4)
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(sim.matrix[off_diagonal], expected[off_diagonal], atol=1e-5)
    np.testing.assert_allclose(sim.within_task, within, atol=1e-5)
    np.testing.assert_array_equal(np.diag(sim.matrix), 1.0)
    np.testing.assert_array_equal(sim.matrix, sim.matrix.T)
    assert sim.tasks == tasks
    assert sim.num_batches == ([4, 4, 4] if shared_loader else [3, 4, 4])
    assert sim.num_parameters == sum(p.numel() for p in backbone.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())  # restored


def test_duplicate_task_is_most_similar_and_opposite_is_negative():
    torch.manual_seed(0)
    backbone = TinyBackbone(["a", "a_again", "b", "neg_a"]).requires_grad_(False)
    head_a = Head()
    heads = {"a": head_a, "a_again": head_a, "b": Head(), "neg_a": head_a}
    losses = {"a": mse("a"), "a_again": mse("a"), "b": mse("b"), "neg_a": lambda p, batch: -mse("a")(p, batch)}
    sim = compute_task_similarity(
        backbone, heads, losses, make_batches(4, seed=2), head_warmup_steps=0, disable_progress=True
    )
    m = sim.matrix
    masked = m - 2 * np.eye(4)
    i, j = np.unravel_index(np.argmax(masked), m.shape)
    assert {sim.tasks[i], sim.tasks[j]} == {"a", "a_again"}
    assert m[0, 1] == pytest.approx(sim.within_task[0] * 3 / 4 + 1 / 4)  # identical gradients: only batch pairs differ
    assert m[0, 3] == pytest.approx(-m[0, 1])  # opposite gradients give the negated similarity
    assert m[0, 3] < 0
    groups = build_task_tree(sim, [3])[0]
    assert ["a", "a_again"] in groups


def test_duplicate_task_with_warm_up_and_projection_lands_in_one_group():
    backbone, heads, losses = setup(["a", "b", "c"], seed=3)
    heads["a_again"], losses["a_again"] = heads["a"], losses["a"]
    backbone.tasks.append("a_again")
    sim = compute_task_similarity(
        backbone, heads, losses, make_batches(6, seed=4), num_batches=6, projection_dim=64, disable_progress=True
    )
    assert sim.projection_dim == 64 and sim.head_warmup_steps == 10
    ia, ib = sim.tasks.index("a"), sim.tasks.index("a_again")
    # the warm-up trains each task's copy of the head on the same data, so the two copies stay identical
    assert sim.matrix[ia, ib] == pytest.approx(sim.within_task[ia] * 5 / 6 + 1 / 6, abs=1e-6)
    assert ["a", "a_again"] in build_task_tree(sim, [1, 2, 3])[2]


def test_deterministic_for_a_seed_with_shuffling_loader():
    backbone, heads, losses = setup()
    dataset = make_batches(1, seed=5, batch_size=24)[0]
    samples = [{k: v[i] for k, v in dataset.items()} for i in range(24)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4, shuffle=True)
    runs = [
        compute_task_similarity(backbone, heads, losses, loader, num_batches=3, seed=s, disable_progress=True).matrix
        for s in (7, 7, 8)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])  # another seed draws other batches
    assert not any(p.requires_grad for p in backbone.parameters())


def test_heads_are_not_changed():
    backbone, heads, losses = setup()
    before = {t: [p.clone() for p in h.parameters()] for t, h in heads.items()}
    compute_task_similarity(backbone, heads, losses, make_batches(3, seed=0), num_batches=2, disable_progress=True)
    for t, head in heads.items():
        assert all(torch.equal(a, b) for a, b in zip(before[t], head.parameters()))


def test_projection_preserves_inner_products():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 50, generator=generator)
    exact = _SignedBucketProjection(50, 50, seed=1, device=torch.device("cpu"))  # one coordinate per bucket
    assert torch.dot(exact(x), exact(y)).item() == pytest.approx(torch.dot(x, y).item(), abs=1e-5)
    estimates = []
    for seed in range(400):
        project = _SignedBucketProjection(50, 8, seed=seed, device=torch.device("cpu"))
        estimates.append(torch.dot(project(x), project(y)).item())
    # unbiased: the mean over seeds approaches the true inner product (std error ~ |x||y| / sqrt(8 * 400))
    assert np.mean(estimates) == pytest.approx(torch.dot(x, y).item(), abs=4 * 50 / np.sqrt(8 * 400))


def test_wrt_choices_with_peft_lora():
    import peft

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["0"], r=2))
    base = shared_parameters(lora, "backbone")
    assert [p.shape for p in base] == [torch.Size([8, 4])]  # only the adapted layer's frozen weight
    assert base[0] is lora.base_model.model[0].base_layer.weight
    adapters = shared_parameters(lora, "adapters")
    assert sorted(p.shape for p in adapters) == sorted([torch.Size([2, 4]), torch.Size([8, 2])])
    assert len(shared_parameters(model.__class__(nn.Linear(2, 2)), "backbone")) == 2  # no adapters: all params
    with pytest.raises(ValueError, match="wrt='adapters' found no trainable"):
        shared_parameters(nn.Linear(2, 2), "adapters")
    with pytest.raises(ValueError, match="wrt='weights' is not supported"):
        shared_parameters(nn.Linear(2, 2), "weights")


def test_explicit_parameters():
    backbone, heads, losses = setup()
    sim = compute_task_similarity(
        backbone,
        heads,
        losses,
        make_batches(2, seed=0),
        num_batches=2,
        wrt=[backbone.stage2.weight],
        head_warmup_steps=0,
        disable_progress=True,
    )
    assert sim.wrt == "explicit" and sim.num_parameters == backbone.stage2.weight.numel()


def test_json_round_trip_and_plot(tmp_path):
    backbone, heads, losses = setup()
    sim = compute_task_similarity(
        backbone, heads, losses, make_batches(2, seed=0), num_batches=2, disable_progress=True
    )
    path = sim.to_json(tmp_path / "out" / "sim.json")
    data = json.loads(path.read_text())
    assert data["tasks"] == ["a", "b", "c"] and np.allclose(data["matrix"], sim.matrix)
    loaded = TaskSimilarity.from_json(path)
    np.testing.assert_array_equal(loaded.matrix, sim.matrix)
    assert loaded.to_dict() == sim.to_dict()
    png = sim.plot(tmp_path / "sim.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"matrix": [[1]]}')
    with pytest.raises(ValueError, match="needs the keys 'tasks' and 'matrix'"):
        TaskSimilarity.from_json(tmp_path / "bad.json")


def test_json_loads_into_tglora_config(tmp_path):
    from peft_tglora import TGLoraConfig

    sim = TaskSimilarity(tasks=["a", "b", "c", "d"], matrix=np.array(json.loads(json.dumps(HAND))))
    path = sim.to_json(tmp_path / "sim.json")
    config = TGLoraConfig(tasks=sim.tasks, task_groups=[1, 1, 2, 4], similarity_file=str(path))
    assert config.task_groups[2] == [["a", "b"], ["c", "d"]]
    tree = build_task_tree(TaskSimilarity.from_json(path), [1, 2])
    assert TGLoraConfig(tasks=sim.tasks, task_groups=[tree[0], tree[0], tree[1], tree[1]]).task_groups[3] == tree[1]


HAND = [[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.6], [0.0, 0.1, 0.6, 1.0]]


def nan_loss(prediction, batch):
    return F.mse_loss(prediction[:, 0], batch["a"] * float("nan"))


def detached_loss(prediction, batch):
    return prediction.detach().mean() * 0 + prediction.mean() * 0


BAD_CASES = [
    ("no-data", {"loaders": {"a": make_batches(2, 0), "b": [], "c": make_batches(2, 0)}}, "Task 'b' has no data"),
    (
        "names",
        {"losses": {"a": mse("a"), "b": mse("b"), "x": mse("c")}},
        r"losses lacks \['c'\] and has extra \['x'\]",
    ),
    ("loader-names", {"loaders": {"a": [], "b": []}}, r"dataloaders lacks \['c'\]"),
    ("nan", {"losses": {"a": mse("a"), "b": nan_loss, "c": mse("c")}}, "Task 'b' gave a NaN/inf or all-zero"),
    ("zero", {"losses": {"a": mse("a"), "b": mse("b"), "c": detached_loss}}, "Task 'c' gave a NaN/inf or all-zero"),
    ("num-batches", {"num_batches": 0}, "num_batches=0 must be an int >= 1"),
    ("projection", {"projection_dim": 0}, "projection_dim=0"),
    ("wrt", {"wrt": "all"}, "wrt='all' is not supported"),
    ("batch", {"loaders": [torch.zeros(2, 3, 8, 8)]}, "Each batch must be a dict with 'pixel_values'"),
    ("features", {"features_fn": lambda m, x: {"a": m(x).task_features["a"]}}, "no entry for task 'b'"),
]


@pytest.mark.parametrize("case, change, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_clear_error(case, change, match):
    backbone, heads, losses = setup()
    kwargs = {"num_batches": 2, "head_warmup_steps": 0, "disable_progress": True}
    kwargs.update({k: v for k, v in change.items() if k not in ("losses", "loaders")})
    losses = change.get("losses", losses)
    loaders = change.get("loaders", make_batches(2, seed=0))
    with pytest.raises(ValueError, match=match):
        compute_task_similarity(backbone, heads, losses, loaders, **kwargs)
    assert not any(p.requires_grad for p in backbone.parameters())  # restored even on error


def test_plain_backbone_needs_features_fn():
    _, heads, losses = setup()
    plain = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="without `task_features`"):
        compute_task_similarity(plain, heads, losses, make_batches(1, 0), disable_progress=True)
    sim = compute_task_similarity(
        plain,
        heads,
        losses,
        make_batches(2, 0),
        features_fn=lambda m, x: dict.fromkeys("abc", (m(x),)),
        disable_progress=True,
    )
    assert sim.matrix.shape == (3, 3)


def test_single_process_accelerator_gives_same_result():
    import accelerate

    backbone, heads, losses = setup()
    batches = make_batches(3, seed=0)
    plain = compute_task_similarity(backbone, heads, losses, batches, num_batches=3, disable_progress=True)
    accelerator = accelerate.Accelerator(cpu=True)
    prepared = accelerator.prepare(backbone)
    with_acc = compute_task_similarity(
        prepared, heads, losses, batches, num_batches=3, accelerator=accelerator, disable_progress=True
    )
    np.testing.assert_allclose(with_acc.matrix, plain.matrix, atol=1e-6)


def _distributed_worker(rank, world_size, port, batches, out_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        backbone, heads, losses = setup()
        shard = batches[rank::world_size]  # what a distributed sampler would give this process
        sim = compute_task_similarity(
            backbone, heads, losses, shard, num_batches=len(shard), head_warmup_steps=0, disable_progress=True
        )
        if rank == 0:
            sim.to_json(out_path)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gather_gradients(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    batches = make_batches(4, seed=9)
    out = tmp_path / "sim.json"
    torch.multiprocessing.spawn(_distributed_worker, args=(2, port, batches, str(out)), nprocs=2, join=True)
    backbone, heads, losses = setup()
    single = compute_task_similarity(
        backbone, heads, losses, batches, num_batches=4, head_warmup_steps=0, disable_progress=True
    )
    gathered = TaskSimilarity.from_json(out)
    assert gathered.num_batches == [4, 4, 4]  # 2 batches on each of 2 processes
    np.testing.assert_allclose(gathered.matrix, single.matrix, atol=1e-6)
    np.testing.assert_allclose(gathered.within_task, single.within_task, atol=1e-6)


def test_cli_from_json_writes_tree_loadable_by_config(tmp_path):
    from peft_tglora.similarity_cli import run

    source = TaskSimilarity(tasks=["a", "b", "c", "d"], matrix=np.array(HAND)).to_json(tmp_path / "in.json")
    record = run(["--from-json", str(source), "--groups-per-stage", "1,1,2,4", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "task_tree.json").read_text())
    assert saved == record
    assert saved["task_groups"][2] == [["a", "b"], ["c", "d"]]
    assert json.loads((tmp_path / "out" / "similarity.json").read_text())["matrix"] == HAND
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 0
    one_threshold = run(["--from-json", str(source), "--threshold", "0.7", "--out", str(tmp_path / "t")])
    assert one_threshold["groups_per_stage"] == [1, 1, 1, 3]
    from peft_tglora import TGLoraConfig

    config = TGLoraConfig(tasks=saved["tasks"], task_groups=saved["task_groups"])
    assert config.task_groups == saved["task_groups"]


@pytest.mark.slow
def test_cli_demo_computes_on_synthetic_data(tmp_path):
    from peft_tglora.similarity_cli import run

    args = ["--demo", "--tasks", "semseg,saliency,depth", "--synthetic_size", "8", "--batch_size", "4"]
    record = run([*args, "--num_batches", "2", "--seeds", "0,1", "--head_warmup_steps", "1", "--no_progress",
                  "--out", str(tmp_path)])  # fmt: skip
    sim = TaskSimilarity.from_json(tmp_path / "similarity.json")
    assert sim.tasks == ["semseg", "saliency", "depth"] and sim.num_batches == [2, 2, 2]
    assert record["groups_per_stage"] == [1, 1, 2, 3]
    assert np.all(np.abs(sim.matrix) <= 1) and np.array_equal(sim.matrix, sim.matrix.T)
    assert sim.stability["seeds"] == [0, 1] and len(sim.stability["partitions_per_half"]) == 2


def test_cli_needs_real_data_unless_demo(capsys):
    from peft_tglora.similarity_cli import parse_args

    for argv in ([], ["--dataset", "synthetic"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "synthetic data only with --demo" in capsys.readouterr().err
    assert parse_args(["--dataset", "nyud", "--data_root", "x", "--image_size", "120,160"]).image_size == (120, 160)


def test_tglora_shared_tree_matches_brute_force():
    from peft import get_peft_model
    from transformers import SwinConfig, SwinModel

    from peft_tglora import TGLoraConfig

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
    tasks = ["a", "b", "c"]
    model = get_peft_model(SwinModel(config), TGLoraConfig(tasks=tasks, task_groups="shared", r=2))

    class SwinHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(16, 1, 1)

        def forward(self, features):
            return F.interpolate(self.proj(features[-1]), size=(32, 32), mode="bilinear")

    heads = {t: SwinHead() for t in tasks}
    losses = {
        t: lambda p, batch, t=t: F.mse_loss(p[:, 0], F.interpolate(batch[t][:, None], size=(32, 32))[:, 0])
        for t in tasks
    }
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32, generator=generator)
        batches.append({"pixel_values": x, "a": x[:, 0] * x[:, 1], "b": x.mean(1), "c": -x[:, 2]})
    adapted = shared_parameters(model, "backbone")
    assert len(adapted) > 0 and not any(p.requires_grad for p in adapted)  # frozen base weights of adapted linears
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sim = compute_task_similarity(
        model, heads, losses, batches, num_batches=3, head_warmup_steps=0, disable_progress=True
    )
    assert model.training  # restored; the similarity runs in eval mode (Swin's drop-path off), so does the reference
    expected, _ = brute_force(model.eval(), heads, losses, dict.fromkeys(tasks, batches), tasks, 3, params=adapted)
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(sim.matrix[off_diagonal], expected[off_diagonal], atol=1e-5)
    assert sim.num_parameters == sum(p.numel() for p in adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # flags restored
    by_adapters = compute_task_similarity(
        model, heads, losses, batches, num_batches=3, wrt="adapters", head_warmup_steps=0, disable_progress=True
    )
    assert by_adapters.wrt == "adapters" and by_adapters.num_parameters == sum(
        p.numel() for p in shared_parameters(model, "adapters")
    )


def _package_import_graph():
    """Module -> the peft_tglora modules it imports anywhere in its source (lazy imports inside functions included)."""
    import ast
    from pathlib import Path

    import peft_tglora

    root = Path(peft_tglora.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = ["peft_tglora", *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        names[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in names.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if base not in names:
                    continue
                # `from . import x` names the submodule x when there is one, else something of the package itself
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in names]
                edges |= set(subs) if len(subs) == len(node.names) else {base, *subs}
        graph[name] = edges - {name}
    return graph


def test_imports_flow_one_way():
    graph = _package_import_graph()
    assert "peft_tglora.similarity_cli" not in graph["peft_tglora.similarity"]  # the CLI uses the library
    # what `import peft_tglora` can ever reach, lazy imports included: never the gradient tool or the training helpers
    core, todo = set(), ["peft_tglora"]
    while todo:
        module = todo.pop()
        if module not in core:
            core.add(module)
            todo.extend(graph[module])
    assert not {m for m in core if m.startswith(("peft_tglora.similarity", "peft_tglora.tasks"))}, sorted(core)
    # no cycle anywhere in the package, lazy imports included (depth-first search for a back edge)
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_import_peft_tglora_stays_light():
    import subprocess
    import sys

    script = (
        "import sys, peft_tglora\n"
        "heavy = ('peft_tglora.similarity', 'peft_tglora.tasks', 'matplotlib', 'datasets')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "assert not loaded, loaded\n"
        "import peft_tglora.similarity\n"
        "assert 'peft_tglora.similarity_cli' not in sys.modules\n"
        "assert peft_tglora.similarity.TaskSimilarity is peft_tglora.TaskSimilarity\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_warm_up_longer_than_the_loader_goes_over_it_again():
    backbone, heads, losses = setup()
    calls = []
    counted = {t: (lambda p, b, f=f, t=t: calls.append(t) or f(p, b)) for t, f in losses.items()}
    compute_task_similarity(
        backbone, heads, counted, make_batches(2, seed=0), num_batches=2, head_warmup_steps=5, disable_progress=True
    )
    # 3 tasks: 5 warm-up steps (2 batches, then 2 again, then 1) and 2 gradient batches, each one loss per task
    assert len(calls) == 3 * (5 + 2)
