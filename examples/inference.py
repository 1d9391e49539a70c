# Predict every task of a trained TGLoRA model and write each prediction as an image.
#
# The model is an output folder of examples/train_tglora.py or a Hub repository holding one (adapter, heads and,
# for the demo's random backbone, base_model/); it is fetched once and then served from the Hub cache, also offline:
#   python examples/inference.py --model your-name/tglora-demo --images photo.jpg --output_dir predictions
#   python examples/inference.py --model tglora-demo --synthetic 4 --output_dir predictions   # no images at hand
# For each image it writes <stem>_<task>.png (class maps in a palette, saliency and depth as grey levels, normals as
# RGB = (n + 1) / 2) and <stem>_all.png, the input and every task side by side.
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import peft_tglora  # noqa: F401  (registers TGLoRA with PEFT)
from peft_tglora.tasks import decode_image, eval_transforms, get_task_spec, make_synthetic_multitask, postprocess
from peft_tglora.tasks.model import load_multitask_model


def load_images(args):
    """`(stem, float [3, H, W] in [0, 1])` for each --images file, or synthetic scenes with --synthetic N."""
    if args.synthetic:
        rows = make_synthetic_multitask(args.synthetic, args.synthetic_size, tasks=["semseg"], seed=args.seed)
        return [(f"synthetic_{i}", decode_image(row["image"])) for i, row in enumerate(rows)]
    return [(Path(p).stem, decode_image(p)) for p in args.images]


def to_image(task, prediction):
    """A postprocessed prediction of one image → a PIL image, coloured by the task table's rule."""
    return Image.fromarray(get_task_spec(task).visualise(prediction.float().cpu().numpy()))


def side_by_side(images):
    width = sum(im.width for im in images)
    panel = Image.new("RGB", (width, max(im.height for im in images)))
    x = 0
    for im in images:
        panel.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return panel


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description="Write each task's prediction of a trained TGLoRA model as images.")
    parser.add_argument("--model", required=True, help="Hub repository id or local output folder.")
    parser.add_argument("--revision", default=None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="Image files.")
    source.add_argument("--synthetic", type=int, help="Predict N synthetic scenes instead.")
    parser.add_argument("--synthetic_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--output_dir", default="predictions")
    args = parser.parse_args(argv)

    model, info = load_multitask_model(args.model, revision=args.revision)
    transform = eval_transforms(info["image_size"])  # the training resolution and normalisation
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, image in load_images(args):
        pixel_values = transform({"image": image})["pixel_values"][None]
        outputs = model(pixel_values)
        height, width = image.shape[-2:]
        panel = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))]
        for task, output in outputs.items():
            # back to the image's own size before postprocessing, as a user would overlay it
            output = torch.nn.functional.interpolate(output.float(), (height, width), mode="bilinear")
            picture = to_image(task, postprocess(task, output)[0])
            picture.save(output_dir / f"{stem}_{task}.png")
            written.append(output_dir / f"{stem}_{task}.png")
            panel.append(picture)
        side_by_side(panel).save(output_dir / f"{stem}_all.png")
    print(f"Wrote {len(written)} predictions ({', '.join(outputs)}) to {output_dir.resolve()}")
    return written


if __name__ == "__main__":
    main()
