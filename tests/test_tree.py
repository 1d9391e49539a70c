"""Tree bookkeeping: parent streams, group lookup, presets and counts, checked by hand on small trees."""

import pytest

from peft_tglora.tree import TaskTree, resolve_task_groups


TASKS = ["a", "b", "c", "d"]


def test_parents_and_groups_by_hand():
    tree = TaskTree.from_groups(
        TASKS, [[TASKS], [["a", "b"], ["c", "d"]], [["a"], ["b"], ["c", "d"]], [["a"], ["b"], ["c"], ["d"]]]
    )
    assert tree.groups_per_stage == (1, 2, 3, 4)
    assert tree.parent_indices == ((0,), (0, 0), (0, 0, 1), (0, 1, 2, 2))
    assert [tree.splits_at(s) for s in range(4)] == [False, True, True, True]
    assert [tree.group_of("d", s) for s in range(4)] == [0, 1, 2, 3]


def test_stage_zero_may_split_and_unsplit_stages_do_not_copy():
    tree = TaskTree.from_groups(TASKS, [[["a", "b"], ["c", "d"]], [["a", "b"], ["c", "d"]]])
    assert tree.parent_indices == ((0, 0), (0, 1))
    assert tree.splits_at(0) and not tree.splits_at(1)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("shared", [[TASKS]] * 3),
        ("per_task", [[["a"], ["b"], ["c"], ["d"]]] * 3),
        ("1,2,4", [[TASKS], [["a", "b"], ["c", "d"]], [["a"], ["b"], ["c"], ["d"]]]),
        ([1, 3], [[TASKS], [["a"], ["b"], ["c", "d"]]]),  # the first of the largest chunks splits first
        ("2,3", [[["a", "b"], ["c", "d"]], [["a"], ["b"], ["c", "d"]]]),
    ],
)
def test_presets_and_counts(spec, expected):
    groups = resolve_task_groups(TASKS, spec, num_stages=3 if isinstance(spec, str) and "," not in spec else None)
    assert groups == expected
    TaskTree.from_groups(TASKS, groups)  # a valid refinement


def test_counts_always_nest():
    tasks = [f"t{i}" for i in range(7)]
    for counts in ([1, 2, 3, 5, 7], [2, 3], [3, 4, 6], [1, 7]):
        TaskTree.from_groups(tasks, resolve_task_groups(tasks, counts))


def test_pictures():
    tree = TaskTree.from_groups(["a", "b"], [[["a", "b"]], [["a"], ["b"]]])
    assert tree.to_text() == "stage 0: [a, b]\nstage 1: [a] [b]"
    mermaid = tree.to_mermaid()
    assert "x --> s0g0" in mermaid and "s0g0 --> s1g1" in mermaid and "s1g1 --> t1" in mermaid
