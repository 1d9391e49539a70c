"""Recognise the field's multi-task archives in a folder and decode one image's labels with the reference code's rules.

Users of multi-task dense prediction download `PASCAL_MT.tgz` (ASTMT / MTI-Net; the same layout as ATRC / InvPT's
`PASCALContext.tar.gz`), MTI-Net's `NYUD_MT.tgz` or ATRC / InvPT's `NYUDv2.tar.gz`. `detect_archive(root)` names the
layout a folder holds; an `Archive` lists a split's ids from the archive's own split file and turns one id into the
project's label formats (`read`), following the reference loaders (facebookresearch/astmt, SimonVandenhende/
Multi-Task-Learning-PyTorch, scale-lab/MTLoRA; facts only, no code from them). docs/TASKS.md, "The field's archives",
gives each rule and where it comes from; `prepare.py` writes the decoded labels once in the project's folder layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from .labels import IGNORE_INDEX, channels_last, to_array


TABLES = Path(__file__).parent / "tables"
ETH_NYUD = "ASTMT's NYUD_MT.tgz (ETH; .mat semseg and depth, .jpg normals)"
USE_INSTEAD = (
    "MTI-Net's NYUD_MT.tgz (Google Drive id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw; read by Multi-Task-Learning-PyTorch "
    "and MTLoRA) or ATRC / InvPT's NYUDv2.tar.gz"
)


@cache
def load_table(name: str) -> dict:
    """A class-id table shipped with the package (`tables/<name>.json`; its `_source` key says where it comes from)."""
    return json.loads((TABLES / f"{name}.json").read_text())


# ---------------------------------------------------------------- label rules
def laplacian_edges(label_map: np.ndarray) -> np.ndarray:
    """
    Non-zero pixels of the 4-neighbour Laplacian `[[0,1,0],[1,-4,1],[0,1,0]]` with reflect-101 borders: what
    `cv2.Laplacian(label_map, cv2.CV_64F)` (ksize 1) marks, without OpenCV. Not "a neighbour differs": a pixel of
    class 15 between classes 10 and 20 sums to 0 and is no edge, as in the reference.
    """
    x = np.pad(label_map.astype(np.float64), 1, mode="reflect")  # numpy's "reflect" is OpenCV's BORDER_REFLECT_101
    lap = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    return lap != 0


def _thin_tables() -> tuple[np.ndarray, np.ndarray]:
    """
    Deletion tables of Guo & Hall's two-subiteration thinning (Comm. ACM 32(3), 1989, algorithm A1), indexed by the
    8 neighbours x1..x8 as bits 0..7, x1 = east and counter-clockwise (x2 north-east, x3 north, ..., x8 south-east).
    """
    n = np.arange(256)
    x = [None] + [(n >> i) & 1 == 1 for i in range(8)]  # x[1..8]
    x.append(x[1])  # x9 = x1, so that x[2i + 1] wraps
    # C(P): number of 4-connected background-to-object transitions around P
    c = sum((~x[2 * i - 1] & (x[2 * i] | x[2 * i + 1])).astype(int) for i in range(1, 5))
    n1 = sum((x[2 * k - 1] | x[2 * k]).astype(int) for k in range(1, 5))
    n2 = sum((x[2 * k] | x[2 * k + 1]).astype(int) for k in range(1, 5))
    n_min = np.minimum(n1, n2)
    removable = (c == 1) & (n_min >= 2) & (n_min <= 3)
    first = removable & ~((x[2] | x[3] | ~x[8]) & x[1])  # odd subiteration: (x2 v x3 v ~x8) ^ x1 = 0
    second = removable & ~((x[6] | x[7] | ~x[4]) & x[5])  # even subiteration: (x6 v x7 v ~x4) ^ x5 = 0
    return first, second


_THIN = _thin_tables()
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))  # x1..x8 as (dy, dx)


def thin(mask: np.ndarray, max_iterations: int | None = None) -> np.ndarray:
    """
    Thin a binary mask to one-pixel-wide, 8-connected curves (Guo & Hall; the algorithm of `skimage.morphology.thin`,
    re-implemented so that scikit-image is not needed): two subiterations that delete the pixels their table marks,
    repeated until nothing changes. Outside the image counts as background.
    """
    skel = np.asarray(mask, dtype=bool).copy()
    if skel.ndim != 2:
        raise ValueError(f"thin takes a 2-D mask, got shape {skel.shape}.")
    h, w = skel.shape
    iteration = 0
    while max_iterations is None or iteration < max_iterations:
        before = int(skel.sum())
        for table in _THIN:
            padded = np.pad(skel, 1)
            index = np.zeros((h, w), dtype=np.int64)
            for bit, (dy, dx) in enumerate(_NEIGHBOURS):
                index |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].astype(np.int64) << bit
            skel &= ~table[index]
        iteration += 1
        if int(skel.sum()) == before:
            break
    return skel


def pascal_edges(label_map: np.ndarray) -> np.ndarray:
    """PASCAL-Context edges: `thin(|Laplacian(LabelMap)| > 0)`, the reference's rule (no dilation)."""
    return thin(laplacian_edges(label_map))


def human_parts_from_mat(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """
    A PASCAL-Part annotation (`human_parts/<id>.mat`, struct `anno` = {imname, objects(1xN): class, class_ind, mask,
    parts(1xP): part_name, mask}) → uint8 `[H, W]` part ids: every part of every person (class_ind 15) painted with
    its id from `tables/pascal_context.json` (later parts overwrite earlier ones), 0 elsewhere; a map with no part
    pixel (no person, or persons without parts) becomes all `IGNORE_INDEX`, so the image is ignored for this task.
    """
    from scipy.io import loadmat

    table = load_table("pascal_context")
    part_ids, person = table["human_part_ids"], table["person_class_ind"]
    anno = loadmat(str(path))["anno"][0, 0]
    objects = anno["objects"].reshape(-1)
    out = None if shape is None else np.zeros(shape, dtype=np.uint8)
    for obj in objects:
        if out is None:
            out = np.zeros(np.asarray(obj["mask"]).shape, dtype=np.uint8)
        if int(np.asarray(obj["class_ind"]).reshape(-1)[0]) != person or np.asarray(obj["parts"]).size == 0:
            continue
        for part in np.asarray(obj["parts"]).reshape(-1):
            name = str(np.asarray(part["part_name"]).reshape(-1)[0])
            if name not in part_ids:
                raise ValueError(f"{str(path)!r}: unknown person part {name!r}; known parts are {sorted(part_ids)}.")
            mask = np.asarray(part["mask"]) > 0
            if mask.shape != out.shape:
                raise ValueError(f"{str(path)!r}: part {name!r} is {mask.shape} but the image is {out.shape}.")
            out[mask] = part_ids[name]
    if out is None:
        raise ValueError(f"{str(path)!r} has no objects and no image size was given.")
    return out if out.any() else np.full_like(out, IGNORE_INDEX)


def context_label_map(path: str | Path) -> np.ndarray:
    """`pascal-context/trainval/<id>.mat` → its `LabelMap` (PASCAL-Context ids 1..459) as int64 `[H, W]`."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    if "LabelMap" not in mat:
        raise ValueError(f"{str(path)!r} has no 'LabelMap' (keys: {sorted(k for k in mat if not k.startswith('_'))}).")
    return np.asarray(mat["LabelMap"]).astype(np.int64)


def mask_normals(normals_rgb: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """
    PASCAL's distilled normals are supervised only on the 170 "NYU-like" PASCAL-Context classes (table
    `normals_valid_context_ids`): other pixels are set to RGB 0, 0, 0, which decodes to an invalid (ignored) normal.
    """
    valid = np.isin(label_map, load_table("pascal_context")["normals_valid_context_ids"])
    return np.where(valid[..., None], normals_rgb[..., :3], 0).astype(np.uint8)


def nyud_semseg(label: np.ndarray) -> np.ndarray:
    """NYUD-v2 (MTI-Net / ATRC PNGs): 0 = void → `IGNORE_INDEX`, 1..40 → 0..39 (the reference's shift)."""
    label = np.asarray(label).astype(np.int64)
    if label.max(initial=0) > 40:
        raise ValueError(f"NYUD semseg ids lie in 0..40 (0 = void), found {int(label.max())}.")
    return np.where(label == 0, IGNORE_INDEX, label - 1).astype(np.uint8)


def saliency_binary(value: np.ndarray) -> np.ndarray:
    """`sal_distill` maps are soft 8-bit scores: positive where `v / 255 > 0.5`, no ignore value (the reference)."""
    return np.asarray(value)[..., 0] / 255.0 > 0.5 if np.ndim(value) == 3 else np.asarray(value) / 255.0 > 0.5


# ---------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Archive:
    """
    One archive layout: where its split lists, images and per-task files are, relative to its root.

    `files[task]` holds the relative paths a task's label is read from, `{id}` standing for the image id (first
    existing alternative wins, e.g. PASCAL semseg `VOC12` before `pascal-context`); `kinds[task]` names how `read`
    turns them into the project's format.
    """

    name: str
    dataset: str
    root: Path
    split_file: str
    image: str
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.files if not t.startswith("_"))  # "_context": an input of other tasks

    def ids(self, split: str) -> list[str]:
        """The ids of `split`, from the archive's split list (never from the files that happen to sit in a folder)."""
        path = self.root / self.split_file.format(split=split)
        if not path.is_file():
            lists = sorted(p.stem for p in path.parent.glob("*.txt"))
            raise FileNotFoundError(
                f"{self.name}: no split list {str(path)!r} for split {split!r}; the archive has lists {lists}."
            )
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"{self.name}: split list {str(path)!r} is empty.")
        return ids

    def image_path(self, image_id: str) -> Path:
        return self.root / self.image.format(id=image_id)

    def label_paths(self, task: str, image_id: str) -> list[Path]:
        """The files `task`'s label of `image_id` is read from (PASCAL normals also need the context label map)."""
        if task not in self.files:
            raise ValueError(f"{self.name} has no task {task!r}; it provides {list(self.tasks)}.")
        found = next((p for p in (self.root / f.format(id=image_id) for f in self.files[task]) if p.is_file()), None)
        if found is None:
            tried = " or ".join(repr(str(self.root / f.format(id=image_id))) for f in self.files[task])
            raise FileNotFoundError(
                f"{self.name}: id {image_id!r} is in the split list but its {task} file is missing ({tried}); "
                "re-extract the archive, or leave the task out with --tasks."
            )
        if self.kinds[task] == "pascal_normals":
            return [found, *self.label_paths("_context", image_id)]
        return [found]

    def check_task_folders(self, tasks) -> None:
        """Fail before any work when a task's folder is absent, naming it and the fix."""
        for task in tasks:
            if task not in self.files:
                raise ValueError(f"{self.name} has no task {task!r}; it provides {list(self.tasks)}.")
            for needed in [task, "_context"] if self.kinds[task] == "pascal_normals" else [task]:
                folders = sorted({(self.root / f).parent for f in self.files[needed]})
                if not any(d.is_dir() for d in folders):
                    raise FileNotFoundError(
                        f"{self.name}: the {task} folder {' or '.join(repr(str(d)) for d in folders)} is missing; "
                        "re-extract the archive, or leave the task out with --tasks."
                    )

    def read(self, task: str, image_id: str, shape: tuple[int, int]):
        """
        One label in the project's storage format: a `Path` to a file that is usable as stored, or an array (uint8
        class map, bool binary map, uint8 RGB normals). Its size must equal the image's `shape` (H, W).
        """
        paths = self.label_paths(task, image_id)
        kind, path = self.kinds[task], paths[0]
        if kind == "as_stored":
            out = path
        elif kind == "saliency":
            out = saliency_binary(to_array(path))
        elif kind == "nyud_semseg":
            out = nyud_semseg(to_array(path))
        elif kind == "human_parts":
            out = human_parts_from_mat(path, shape)
        elif kind == "pascal_edges":
            out = pascal_edges(context_label_map(path))
        elif kind == "pascal_normals":
            label_map = context_label_map(paths[1])
            if label_map.shape != shape:
                raise ValueError(f"{str(paths[1])!r} is {label_map.shape} but its image is {shape}.")
            out = mask_normals(to_array(path), label_map)
        else:  # pragma: no cover - the layouts below use only the kinds above
            raise AssertionError(f"unknown label kind {kind!r}")
        size = _file_size(out) if isinstance(out, Path) else tuple(out.shape[:2])
        if size != tuple(shape):
            raise ValueError(
                f"{self.name}: the {task} label of {image_id!r} ({str(path)!r}) is {size} but its image is "
                f"{tuple(shape)}; the label and the image must come from the same archive."
            )
        return out


def _file_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image or .npy file without decoding it (channels-first `[C, H, W]` arrays included)."""
    if path.suffix == ".npy":
        return channels_last(np.load(path, mmap_mode="r"), (1, 3)).shape[:2]  # a view: nothing is read
    from PIL import Image

    with Image.open(path) as im:
        return im.size[::-1]


def pascal_mt(root: Path) -> Archive:
    """`PASCAL_MT.tgz` (ASTMT / MTI-Net; ATRC / InvPT's `PASCALContext.tar.gz` has the same layout)."""
    return Archive(
        "PASCAL_MT (ASTMT / MTI-Net / ATRC PASCAL-Context)", "pascal_context", root, "ImageSets/Context/{split}.txt",
        "JPEGImages/{id}.jpg",
        files={
            "semseg": ("semseg/VOC12/{id}.png", "semseg/pascal-context/{id}.png"),
            "human_parts": ("human_parts/{id}.mat",),
            "saliency": ("sal_distill/{id}.png",),
            "normals": ("normals_distill/{id}.png",),
            "edges": ("pascal-context/trainval/{id}.mat",),
            "_context": ("pascal-context/trainval/{id}.mat",),
        },
        kinds={"semseg": "as_stored", "human_parts": "human_parts", "saliency": "saliency",
               "normals": "pascal_normals", "edges": "pascal_edges", "_context": "as_stored"},
    )  # fmt: skip


def nyud_mtinet(root: Path) -> Archive:
    """MTI-Net's `NYUD_MT.tgz` (read by Multi-Task-Learning-PyTorch and MTLoRA): .npy depth, normals and edges."""
    return Archive(
        "NYUD_MT (MTI-Net)", "nyud", root, "gt_sets/{split}.txt", "images/{id}.jpg",
        files={"semseg": ("segmentation/{id}.png",), "depth": ("depth/{id}.npy",), "normals": ("normals/{id}.npy",),
               "edges": ("edge/{id}.npy",)},
        kinds={"semseg": "nyud_semseg", "depth": "as_stored", "normals": "as_stored", "edges": "as_stored"},
    )  # fmt: skip


def nyud_atrc(root: Path) -> Archive:
    """ATRC / InvPT's `NYUDv2.tar.gz`: PNG images, normals and edges, .npy depth."""
    return Archive(
        "NYUDv2 (ATRC / InvPT)", "nyud", root, "gt_sets/{split}.txt", "images/{id}.png",
        files={"semseg": ("segmentation/{id}.png",), "depth": ("depth/{id}.npy",), "normals": ("normals/{id}.png",),
               "edges": ("edge/{id}.png",)},
        kinds={"semseg": "nyud_semseg", "depth": "as_stored", "normals": "as_stored", "edges": "as_stored"},
    )  # fmt: skip


KNOWN_LAYOUTS = (
    "the project's folder layout (root/<split>/images/<id>.jpg + root/<split>/<task>/<id>.png|.npy, docs/TASKS.md)",
    "PASCAL_MT (ImageSets/Context/, JPEGImages/, semseg/, human_parts/, sal_distill/, normals_distill/, pascal-context/)",
    "MTI-Net's NYUD_MT (gt_sets/, images/*.jpg, segmentation/*.png, depth/*.npy, normals/*.npy, edge/*.npy)",
    "ATRC / InvPT's NYUDv2 (gt_sets/, images/*.png, segmentation/*.png, depth/*.npy, normals/*.png, edge/*.png)",
)


def detect_archive(root: str | Path, split: str = "train") -> Archive | None:
    """
    The archive whose layout `root` holds, or `None` for the project's own folder layout (`root/<split>/images`).
    Raises, naming the known layouts, for a folder that is none of them, and refuses ASTMT's ETH `NYUD_MT`, whose
    labels differ (41-way `.mat` semseg), naming the archives to use instead.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data root {str(root)!r} is not a folder.")
    if (root / split / "images").is_dir():
        return None
    if (root / "ImageSets" / "Context").is_dir() and (root / "JPEGImages").is_dir():
        return pascal_mt(root)
    if (root / "gt_sets").is_dir() and (root / "images").is_dir():
        if (root / "segmentation").is_dir() and any((root / "segmentation").glob("*.mat")):
            raise ValueError(
                f"{str(root)!r} is {ETH_NYUD}: its labels differ from the ones the field reports on (41-way semseg, "
                f"another normals and depth encoding), so it is not read; download {USE_INSTEAD} instead."
            )
        if any((root / "images").glob("*.png")) or any((root / "normals").glob("*.png")):
            return nyud_atrc(root)
        return nyud_mtinet(root)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())[:12]
    raise ValueError(
        f"{str(root)!r} holds none of the known layouts (it has folders {subfolders}). Known layouts: "
        + "; ".join(KNOWN_LAYOUTS)
        + ". Point --data_root at the extracted archive's top folder."
    )
