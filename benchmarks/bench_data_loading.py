"""What reading the field's PASCAL_MT archive costs: one-time preparation per image, then loading per sample vs a step.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_loading.py            # about 2 CPU-minutes

Builds a PASCAL_MT-shaped archive of `--images` synthetic 375x500 images (the VOC size) in a temporary folder, with
every task in the archive's own formats (a PASCAL-Part `.mat` with one person of 10 parts, a PASCAL-Context
`LabelMap` of 24 regions, soft saliency, RGB normals), then times

1. decoding one image's labels straight from the archive (`Archive.read`, per task): what every epoch would pay
   without preparation;
2. the one-time preparation (`prepare_split`, all five tasks), per image;
3. the training loader per sample on the prepared folder: decode + resize to `--size` + the reference augmentation
   (random scale / rotation, flip) + normalise, in one process;
4. one Swin-T training step (forward + backward of a `SwinModel` with the default Swin-T config) at `--size`, batch 1,
   on the same CPU, so that the two can be compared on one machine.

The paper's setting is batch 32 at 448 px on a GPU, where a step is far shorter than on this CPU: the printout gives
the loader's share of a CPU step and the number of loader processes that keep a GPU step of `--gpu_step_ms` fed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import savemat

from peft_tglora.tasks import load_multitask_dataset
from peft_tglora.tasks.archives import pascal_mt
from peft_tglora.tasks.data import MultiTaskDataset
from peft_tglora.tasks.prepare import prepare_split
from peft_tglora.tasks.transforms import reference_augmentation, train_transforms


H, W = 375, 500
TASKS = ["semseg", "human_parts", "saliency", "normals", "edges"]
PARTS = ["head", "hair", "leye", "reye", "nose", "mouth", "torso", "neck", "llarm", "rlarm"]


def make_archive(root: Path, n: int) -> list[str]:
    """A PASCAL_MT-shaped archive of `n` images, every label in its archive format."""
    rng = np.random.default_rng(0)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for d in ["ImageSets/Context", "JPEGImages", "semseg/pascal-context", "human_parts", "sal_distill",
              "normals_distill", "pascal-context/trainval"]:  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(ids) + "\n")
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        regions = rng.choice([3, 4, 6, 9, 1, 2, 5, 7, 284, 285], (6, 4))  # 24 blocks of context ids
        label_map = np.kron(regions, np.ones((H // 6 + 1, W // 4 + 1)))[:H, :W].astype(np.uint16)
        savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": label_map})
        Image.fromarray((label_map % 21).astype(np.uint8)).save(root / "semseg/pascal-context" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(root / "sal_distill" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "normals_distill" / f"{i}.png")
        parts = np.zeros((1, len(PARTS)), dtype=[("part_name", "O"), ("mask", "O")])
        for j, name in enumerate(PARTS):
            mask = np.zeros((H, W), np.uint8)
            mask[20 * j : 20 * j + 40, 100:220] = 1
            parts[0, j] = (name, mask)
        objs = np.zeros((1, 1), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
        objs[0, 0] = ("person", np.array([[15.0]]), (sum(p[1] for p in parts[0]) > 0).astype(np.uint8), parts)
        savemat(root / "human_parts" / f"{i}.mat", {"anno": {"imname": i, "objects": objs}})
    return ids


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def swin_step_seconds(size: int, repeats: int) -> float:
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(image_size=size)).train()  # the default config is Swin-T
    x = torch.randn(1, 3, size, size)

    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=x).last_hidden_state.square().mean().backward()

    return timed(step, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--gpu_step_ms", type=float, default=None, help="A measured GPU step time to size workers for.")
    p.add_argument("--skip_step", action="store_true", help="Do not time the Swin-T step (tests).")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "PASCAL_MT"
        ids = make_archive(root, args.images)
        archive = pascal_mt(root)
        for task in TASKS:
            out[f"raw_{task}_ms"] = 1000 * timed(lambda t=task: archive.read(t, ids[0], (H, W)), args.repeats)
        start = time.perf_counter()
        prepare_split(archive, Path(tmp) / "prepared", "train", TASKS, progress=False)
        out["prepare_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(ids)
        data = load_multitask_dataset("pascal_context", "train", root=Path(tmp) / "prepared", tasks=TASKS)
        transform = train_transforms(args.size, augment=reference_augmentation("pascal_context"))
        dataset = MultiTaskDataset(data, TASKS, transform)
        out["loader_ms_per_sample"] = (
            1000 * timed(lambda: [dataset[i] for i in range(len(dataset))], args.repeats) / len(dataset)
        )
    if not args.skip_step:
        out["swin_t_step_ms_per_sample"] = 1000 * swin_step_seconds(args.size, args.repeats)
    print(f"PASCAL_MT-shaped archive, {args.images} images of {H}x{W}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); medians of {args.repeats} repeats")  # fmt: skip
    print("| what | ms |\n|---|---|")
    for task in TASKS:
        print(f"| decode {task} from the archive, per image | {out[f'raw_{task}_ms']:.1f} |")
    print(f"| one-time preparation, all 5 tasks, per image | {out['prepare_ms_per_image']:.1f} |")
    print(
        f"| loader after preparation, per sample ({args.size} px, scale/rotate, flip) | {out['loader_ms_per_sample']:.1f} |"
    )
    if "swin_t_step_ms_per_sample" in out:
        step = out["swin_t_step_ms_per_sample"]
        print(f"| Swin-T step (fwd + bwd), {args.size} px, per sample, same CPU | {step:.1f} |")
        print(
            f"\nLoader share of a step on this CPU, one process: {100 * out['loader_ms_per_sample'] / (out['loader_ms_per_sample'] + step):.1f} %"
        )
    batch_ms = out["loader_ms_per_sample"] * args.batch_size
    print(f"Loading a batch of {args.batch_size}: {batch_ms:.0f} ms of CPU time.")
    if args.gpu_step_ms:
        workers = math.ceil(batch_ms / args.gpu_step_ms)
        print(f"Loader processes that keep a {args.gpu_step_ms:.0f} ms GPU step fed: {workers} (then data waits ~0).")
    return out


if __name__ == "__main__":
    main()
