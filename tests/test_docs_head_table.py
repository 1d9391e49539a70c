"""docs/TASKS.md's head parameter tables: every number recomputed from the heads and from a re-statement of MTLoRA's."""

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from torch import nn

from peft_tglora.tasks import MultiScaleHead, num_outputs_for


TASKS_MD = Path(__file__).parents[1] / "docs" / "TASKS.md"
HEADER = "| task | input widths | MTLoRA head |"
WIDTHS = {"before merging": [96, 192, 384, 768], "after merging": [192, 384, 768, 768]}  # Swin-T stage widths


def mtlora_head(in_channels: Sequence[int], num_outputs: int, channels=(18, 36, 72, 144)) -> nn.Module:
    """MTLoRA's per-task Downsampler + HRNet HighResolutionHead, written out from its description, for the counts."""
    total = sum(channels)
    return nn.ModuleDict(
        {
            "downsampler": nn.ModuleList(nn.Conv2d(c_in, c, 1, bias=False) for c_in, c in zip(in_channels, channels)),
            "last_layer": nn.Sequential(
                nn.Conv2d(total, 4 * total, 1),
                nn.BatchNorm2d(4 * total),
                nn.ReLU(),
                nn.Conv2d(4 * total, num_outputs, 1),
            ),
        }
    )


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_tables() -> list[tuple[str, list[list[str]]]]:
    """`(dataset, rows)` for each table whose header starts with `HEADER`; the dataset is named in the line above it."""
    lines = TASKS_MD.read_text().splitlines()
    tables = []
    for i, line in enumerate(lines):
        if not line.startswith(HEADER):
            continue
        above = next(text for text in reversed(lines[:i]) if text.strip())
        dataset = "nyud" if "NYUD" in above else "pascal_context" if "PASCAL" in above else above
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            rows.append([cell.strip() for cell in row.strip("|").split("|")])
        tables.append((dataset, rows))
    return tables


def test_tables_are_found():
    assert [dataset for dataset, _ in head_tables()] == ["pascal_context", "nyud"]


@pytest.mark.parametrize(("dataset", "rows"), head_tables(), ids=[d for d, _ in head_tables()])
def test_head_parameter_counts_in_tasks_md(dataset, rows):
    assert rows, f"the {dataset} head table in docs/TASKS.md has no rows"
    for task, widths_label, mtlora, default, kernel3 in rows:
        widths = next(w for key, w in WIDTHS.items() if key in widths_label)
        n = num_outputs_for(task, dataset)
        expected = [
            count(mtlora_head(widths, n)),
            count(MultiScaleHead(widths, n)),
            count(MultiScaleHead(widths, n, kernel_size=3, hidden_channels=270)),
        ]
        written = [int(re.sub(r"[,\s]", "", cell)) for cell in (mtlora, default, kernel3)]
        assert written == expected, f"docs/TASKS.md, {dataset} {task} ({widths_label}): {written} != {expected}"
