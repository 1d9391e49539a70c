"""Decode an extracted multi-task archive once into the project's folder layout, so that training reads cheap files.

    python -m peft_tglora.tasks.prepare pascal_context /data/PASCAL_MT /data/pascal_prepared --num_workers 8

PASCAL's human parts are `.mat` structs and its edges and normals need the PASCAL-Context label map (`.mat`) of every
image: decoding them costs tens of milliseconds per image, too much to repeat every epoch. This writes each split's
ids (from the archive's split list) as `OUT/<split>/images/<id>.jpg|.png` and `OUT/<split>/<task>/<id>.png|.npy`
(PNG class maps with 255 = ignore, 0 / 255 binary maps, RGB normals with 0, 0, 0 = invalid, .npy depth and NYUD
normals), linking files that need no conversion. A task folder is complete once its `.complete` marker exists, so
an interrupted run resumes. `load_multitask_dataset(..., root=<archive>)` calls `prepare_split` itself, into a cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from .archives import Archive, _file_size, detect_archive


logger = logging.getLogger(__name__)
MARKER = ".complete"
FORMAT_VERSION = 1  # bump when a decoding rule changes, so that caches are rebuilt


def default_cache_dir() -> Path:
    """`$PEFT_TGLORA_CACHE`, else `$XDG_CACHE_HOME/peft_tglora/prepared` (`~/.cache/...`)."""
    if os.environ.get("PEFT_TGLORA_CACHE"):
        return Path(os.environ["PEFT_TGLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_tglora" / "prepared"


def cache_folder(archive: Archive, cache_dir: str | os.PathLike | None = None) -> Path:
    """One folder per extracted archive (named after its dataset and a hash of its absolute path)."""
    key = hashlib.sha1(f"{archive.root.resolve()}|v{FORMAT_VERSION}".encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"{archive.dataset}-{key}"


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # no copy of the bytes; falls back to a copy across file systems
    except OSError:
        shutil.copyfile(src, dst)


def _write(value, folder: Path, image_id: str) -> None:
    from PIL import Image

    if isinstance(value, Path):
        _link_or_copy(value, folder / f"{image_id}{value.suffix.lower()}")
    elif value.dtype == bool:
        Image.fromarray(value.astype(np.uint8) * 255).save(folder / f"{image_id}.png")
    elif value.dtype == np.uint8:
        Image.fromarray(value).save(folder / f"{image_id}.png")
    else:
        np.save(folder / f"{image_id}.npy", value)


def _prepare_one(image_id: str, archive: Archive, tasks: Sequence[str], split_dir: Path, with_image: bool) -> None:
    image = archive.image_path(image_id)
    if not image.is_file():
        raise FileNotFoundError(
            f"{archive.name}: id {image_id!r} is in the split list but its image {str(image)!r} is missing; "
            "re-extract the archive."
        )
    shape = _file_size(image)
    if with_image:
        _write(image, split_dir / "images", image_id)
    for task in tasks:
        _write(archive.read(task, image_id, shape), split_dir / task, image_id)


def prepare_split(
    archive: Archive,
    out: str | os.PathLike,
    split: str,
    tasks: Sequence[str] | None = None,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """
    Write `split` of `archive` (the tasks not yet complete in `out`) in the project's folder layout; returns the
    root to give `load_multitask_dataset`. Every missing file or wrong-sized label raises before the split is marked
    complete, naming the file.
    """
    from tqdm.auto import tqdm

    tasks = list(archive.tasks if tasks is None else tasks)
    archive.check_task_folders(tasks)
    split_dir = Path(out) / split
    with_image = not (split_dir / "images" / MARKER).is_file()
    todo = [t for t in tasks if not (split_dir / t / MARKER).is_file()]
    if not with_image and not todo:
        return Path(out)
    ids = archive.ids(split)
    for sub in (["images"] if with_image else []) + todo:
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    work = partial(_prepare_one, archive=archive, tasks=todo, split_dir=split_dir, with_image=with_image)
    desc = f"{archive.name} {split}: {', '.join((['images'] if with_image else []) + todo)}"
    if num_workers > 0:
        from multiprocessing import get_context

        with get_context("spawn").Pool(num_workers) as pool:
            for _ in tqdm(
                pool.imap_unordered(work, ids, chunksize=16), total=len(ids), desc=desc, disable=not progress
            ):
                pass
    else:
        for image_id in tqdm(ids, desc=desc, disable=not progress):
            work(image_id)
    for sub in (["images"] if with_image else []) + todo:
        (split_dir / sub / MARKER).touch()
    # what was prepared from where, for people looking at the folder (nothing reads it back)
    info_path = Path(out) / "prepared.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(archive=archive.name, dataset=archive.dataset, source=str(archive.root.resolve()))
    info["format_version"] = FORMAT_VERSION
    done = info.setdefault("splits", {}).setdefault(split, {"tasks": []})
    done.update(images=len(ids), tasks=sorted({*done["tasks"], *todo}))
    info_path.write_text(json.dumps(info, indent=1))
    return Path(out)


def prepared_root(
    name: str,
    root: str | os.PathLike,
    split: str,
    tasks: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Path:
    """
    The folder in the project's layout that holds `split` of the data at `root`: `root` itself when it already has
    that layout, else the archive found there, prepared into a cache once (both named in the log).
    """
    archive = detect_archive(root, split)
    if archive is None:
        return Path(root)
    if archive.dataset != name:
        raise ValueError(
            f"{str(root)!r} holds {archive.name}, a {archive.dataset!r} archive, but the dataset is {name!r}; pass "
            f"--dataset {archive.dataset} or point --data_root at a {name!r} archive."
        )
    out = cache_folder(archive, cache_dir)
    logger.info("Data root %s is %s; %s split prepared in %s.", root, archive.name, split, out)
    return prepare_split(archive, out, split, tasks, num_workers=num_workers)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["pascal_context", "nyud"])
    p.add_argument("root", help="The extracted archive (PASCAL_MT, MTI-Net's NYUD_MT or ATRC's NYUDv2).")
    p.add_argument("out", help="Output folder, in the project's layout; give it to --data_root.")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--tasks", nargs="+", default=None, help="Default: every task of the archive.")
    p.add_argument("--num_workers", type=int, default=0, help="Processes decoding in parallel (0: this one).")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    archive = detect_archive(args.root, args.splits[0])
    if archive is None:
        raise SystemExit(f"{args.root!r} is already in the project's folder layout; nothing to prepare.")
    if archive.dataset != args.dataset:
        raise SystemExit(f"{args.root!r} holds {archive.name}, a {archive.dataset!r} archive, not {args.dataset!r}.")
    logger.info("%s is %s; writing %s.", args.root, archive.name, args.out)
    for split in args.splits:
        prepare_split(archive, args.out, split, args.tasks, num_workers=args.num_workers)
    return Path(args.out)


if __name__ == "__main__":
    main()
