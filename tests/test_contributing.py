"""CONTRIBUTING.md's picture of the house names every module of the package and the examples, and only files that exist."""

import re
from pathlib import Path


ROOT = Path(__file__).parents[1]


def pictured_paths() -> set[str]:
    """Paths of the tree under "The house in one picture": two spaces of indent per level, names before the gap."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"## The house in one picture\s*```\n(.*?)```", text, re.DOTALL)
    assert block, "CONTRIBUTING.md has no tree under '## The house in one picture'"
    paths, parents = set(), []
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.split(r"\s{2,}", line.strip())[0]
        parents = parents[:depth]
        for name in names.split(", "):
            paths.add("/".join([*parents, name.rstrip("/")]))
        if names.endswith("/") and ", " not in names:
            parents.append(names.rstrip("/"))
    return paths


def test_the_picture_names_only_files_that_exist():
    missing = sorted(p for p in pictured_paths() if not (ROOT / p).exists())
    assert not missing, f"CONTRIBUTING.md pictures files that do not exist: {missing}"


def test_the_picture_names_every_module():
    pictured = pictured_paths()
    modules = [*ROOT.glob("peft_tglora/**/*.py"), *ROOT.glob("examples/*.py")]
    unnamed = sorted(
        rel
        for rel in (m.relative_to(ROOT).as_posix() for m in modules)
        if rel not in pictured and not (rel.endswith("/__init__.py") and rel.count("/") > 1)  # subpackage inits
    )
    assert not unnamed, f"add one line per file to CONTRIBUTING.md's picture for: {unnamed}"
