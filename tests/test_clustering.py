import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_tglora.clustering import build_task_tree, dendrogram_layout, linkage_matrix, validate_groups_per_stage


def random_similarity(num_tasks, seed):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(num_tasks, 5))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors @ vectors.T


def as_sets(partition):
    return {frozenset(group) for group in partition}


# Four tasks: A and B very similar, C and D similar, the two pairs dissimilar (hand-made, no ties).
TASKS = ["A", "B", "C", "D"]
HAND = np.array(
    [
        [1.0, 0.9, 0.1, 0.0],
        [0.9, 1.0, 0.2, 0.1],
        [0.1, 0.2, 1.0, 0.6],
        [0.0, 0.1, 0.6, 1.0],
    ]
)


def test_hand_made_tree():
    tree = build_task_tree(HAND, [1, 1, 2, 4], tasks=TASKS)
    assert tree == [[TASKS], [TASKS], [["A", "B"], ["C", "D"]], [["A"], ["B"], ["C"], ["D"]]]
    # three groups: the weaker pair (C, D at 0.6) splits before (A, B at 0.9)
    assert build_task_tree(HAND, [3], tasks=TASKS) == [[["A", "B"], ["C"], ["D"]]]


def test_hand_made_linkage_distances():
    # average linkage by hand: (A,B) at 0.1, (C,D) at 0.4, then mean of 1 - {0.1, 0.0, 0.2, 0.1} = 0.9
    link = linkage_matrix(HAND)
    np.testing.assert_allclose(link, [[0, 1, 0.1, 2], [2, 3, 0.4, 2], [4, 5, 0.9, 4]])
    # complete linkage uses the farthest pair (1 - 0.0) and single the nearest (1 - 0.2)
    assert linkage_matrix(HAND, "complete")[-1, 2] == pytest.approx(1.0)
    assert linkage_matrix(HAND, "single")[-1, 2] == pytest.approx(0.8)


def test_dendrogram_layout_places_clusters_side_by_side():
    order, segments = dendrogram_layout(linkage_matrix(HAND[[0, 2, 1, 3]][:, [0, 2, 1, 3]]))  # A, C, B, D
    assert order == [0, 2, 1, 3]  # A, B then C, D: each pair adjacent
    assert len(segments) == 3
    xs, ys = segments[-1]  # the root joins the midpoints of the two pairs at height 0.9
    assert xs == [0.5, 0.5, 2.5, 2.5] and ys == pytest.approx([0.1, 0.9, 0.9, 0.4])
    assert dendrogram_layout(np.zeros((0, 4))) == ([0], [])


def test_output_follows_tasks_order_and_reorders_named_similarity():
    sim = {"tasks": TASKS, "matrix": HAND.tolist()}
    tree = build_task_tree(sim, [2], tasks=["D", "A", "C", "B"])
    assert tree == [[["D", "C"], ["A", "B"]]]
    # a subset of the similarity's tasks uses the matching sub-matrix
    assert build_task_tree(sim, [2], tasks=["B", "C", "A"]) == [[["B", "A"], ["C"]]]


def test_ties_are_broken_deterministically():
    # all off-diagonal similarities equal: merges go by smallest task index, whatever the names
    flat = np.full((4, 4), 0.5) + 0.5 * np.eye(4)
    assert build_task_tree(flat, [3], tasks=["w", "x", "y", "z"]) == [[["w", "x"], ["y"], ["z"]]]
    assert build_task_tree(flat, [2], tasks=["w", "x", "y", "z"]) == [[["w", "x", "y"], ["z"]]]


def test_threshold_per_stage_and_last_stage():
    # similarity >= 0.95 keeps nothing together, >= 0.5 keeps both pairs, >= 0.05 keeps everything
    tree = build_task_tree(HAND, tasks=TASKS, threshold=[0.05, 0.5, 0.95])
    assert [len(stage) for stage in tree] == [1, 2, 4]
    tree = build_task_tree(HAND, tasks=TASKS, threshold=0.7, num_stages=4)
    assert [len(stage) for stage in tree] == [1, 1, 1, 3]
    assert tree[-1] == [["A", "B"], ["C"], ["D"]]


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_matches_scipy_reference(linkage):
    from scipy.cluster import hierarchy
    from scipy.spatial import distance

    for seed in range(20):
        num_tasks = 2 + seed % 6
        sim = random_similarity(num_tasks, seed)
        reference = hierarchy.linkage(distance.squareform(1 - sim, checks=False), method=linkage)
        ours = linkage_matrix(sim, linkage)
        np.testing.assert_allclose(ours[:, 2], reference[:, 2], atol=1e-9)
        for k in range(1, num_tasks + 1):
            labels = hierarchy.fcluster(reference, k, criterion="maxclust")
            expected = {frozenset(str(i) for i in np.flatnonzero(labels == c)) for c in set(labels)}
            names = [str(i) for i in range(num_tasks)]
            assert as_sets(build_task_tree(sim, [k], tasks=names, linkage=linkage)[0]) == expected


@settings(max_examples=60, deadline=None)
@given(
    num_tasks=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    increments=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    linkage=st.sampled_from(["average", "complete", "single"]),
    rounding=st.sampled_from([None, 1]),
)
def test_trees_are_valid_refinements(num_tasks, seed, increments, linkage, rounding):
    sim = random_similarity(num_tasks, seed)
    if rounding is not None:  # coarse values create many ties
        sim = np.round(sim, rounding)
    counts = np.minimum(1 + np.cumsum(increments) - increments[0], num_tasks).tolist()
    tasks = [f"t{i}" for i in range(num_tasks)]
    tree = build_task_tree(sim, counts, tasks=tasks, linkage=linkage)
    assert [len(stage) for stage in tree] == counts
    for stage in tree:
        assert sorted(name for group in stage for name in group) == sorted(tasks)  # a partition
        assert all(group for group in stage)
    for parent, child in itertools.pairwise(tree):
        for group in child:
            assert any(set(group) <= set(p) for p in parent)  # each child group inside one parent group
    assert tree == build_task_tree(sim.copy(), counts, tasks=tasks, linkage=linkage)  # deterministic
    thresholds = sorted(np.random.default_rng(seed).uniform(-1, 1, size=len(counts)).tolist())
    by_threshold = build_task_tree(sim, tasks=tasks, threshold=thresholds, linkage=linkage)
    sizes = [len(stage) for stage in by_threshold]
    assert sizes == sorted(sizes)
    for parent, child in itertools.pairwise(by_threshold):
        assert all(any(set(g) <= set(p) for p in parent) for g in child)


BAD_COUNTS = [
    ([1, 5], 4, r"groups_per_stage\[1\]=5 must be between 1 and the number of tasks \(4\)"),
    ([0], 4, r"groups_per_stage\[0\]=0"),
    ([2, 1], 4, r"non-decreasing"),
    ([], 4, r"non-empty"),
    ("1124", 4, r"non-empty list"),
    ([1, 2.0], 4, r"must be an int"),
]


@pytest.mark.parametrize(
    "counts, num_tasks, match", BAD_COUNTS, ids=["too-many", "zero", "decreasing", "empty", "str", "float"]
)
def test_validate_groups_per_stage_errors(counts, num_tasks, match):
    with pytest.raises(ValueError, match=match):
        validate_groups_per_stage(counts, num_tasks)


def test_bad_inputs():
    with pytest.raises(ValueError, match="exactly one of groups_per_stage"):
        build_task_tree(HAND, tasks=TASKS)
    with pytest.raises(ValueError, match="exactly one of groups_per_stage"):
        build_task_tree(HAND, [1], tasks=TASKS, threshold=0.5)
    with pytest.raises(ValueError, match="symmetric"):
        build_task_tree(HAND + np.triu(np.ones((4, 4)), 1), [1], tasks=TASKS)
    with pytest.raises(ValueError, match="NaN"):
        build_task_tree(np.full((2, 2), np.nan), [1], tasks=["a", "b"])
    with pytest.raises(ValueError, match="Pass tasks"):
        build_task_tree(HAND, [1])
    with pytest.raises(ValueError, match="missing: \\['E'\\]"):
        build_task_tree({"tasks": TASKS, "matrix": HAND}, [1], tasks=["A", "E"])
    with pytest.raises(ValueError, match="linkage='ward'"):
        build_task_tree(HAND, [1], tasks=TASKS, linkage="ward")
    with pytest.raises(ValueError, match="non-decreasing list"):
        build_task_tree(HAND, tasks=TASKS, threshold=[0.9, 0.1])


def test_accepts_json_loaded_dict(tmp_path):
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"tasks": TASKS, "matrix": HAND.tolist(), "num_batches": 8}))
    tree = build_task_tree(json.loads(path.read_text()), [1, 2])
    assert tree[1] == [["A", "B"], ["C", "D"]]


def test_clustering_imports_only_numpy():
    # the config builds trees from a JSON file through this module; it must stay light (numpy, no torch); matplotlib
    # only inside the plotting function
    import ast

    from peft_tglora import clustering

    with open(clustering.__file__) as f:
        tree = ast.parse(f.read())

    def imported(nodes):
        nodes = list(nodes)
        names = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}

    allowed = {"__future__", "collections", "dataclasses", "itertools", "json", "math", "pathlib", "numpy"}
    assert imported(tree.body) <= allowed
    plot = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "plot_similarity")
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n is not plot]
    assert not imported(node for f in functions for node in ast.walk(f))
    assert imported(ast.walk(plot)) == {"matplotlib"}
