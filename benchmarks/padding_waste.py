"""Benchmark: how much of a padded input batch is padding, fixed shapes vs the reference.

Exact command (from the repository root; about 5 s, most of it the TensorFlow import for the
cross-check)::

    .venv/bin/python benchmarks/padding_waste.py --draws 20 --seed 0

Reads the image sizes of coco128 (``../shared/data/coco128``, resolved from the repository root)
from its JSON, resizes them with the reference rule (shorter side 800, longer at most 1333; a
numpy port of maskrcnn-benchmark's ``Resize.get_size``, checked equal to our
``preprocess_ops.reference_output_size`` on these sizes unless ``--no_tf_check``), and prints, as
Markdown, the padding waste = padding pixels / all pixels of the padded images, per orientation
group (portrait when h >= w, as our parser and the reference's aspect grouping) and overall:

* (a) ours: every image padded to its group's fixed shape, landscape 800 x 1344, portrait
  1344 x 800 (``preprocess_ops.padded_image_size``);
* (b) per image to multiples of 32: the lower bound of any batching that pads to 32;
* (c) the reference: each batch padded to its largest height and largest width, both rounded up
  to 32 (maskrcnn-benchmark ``to_image_list``), batches of B images drawn at random within each
  orientation group (a seeded shuffle, then consecutive groups of B, the last one partial);
  averaged over ``--draws`` shuffles (min and max over draws given too).
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128_JSON = os.path.join(REPO, "..", "shared", "data", "coco128", "annotations",
                            "instances_train2017.json")


def reference_size(height, width, min_size, max_size):
    """maskrcnn-benchmark `Resize.get_size` (Python port) -> (new_h, new_w)."""
    size = min_size
    short, long = float(min(height, width)), float(max(height, width))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def check_against_ours(sizes, resized, min_size, max_size):
    """Raises if `preprocess_ops.reference_output_size` disagrees with the port on `sizes`."""
    import tensorflow as tf  # only for this check: the rest of the script is numpy

    sys.path.insert(0, REPO)
    from official_maskrcnn.data import preprocess_ops

    h, w = preprocess_ops.reference_output_size(
        tf.constant(sizes[:, 0]), tf.constant(sizes[:, 1]), min_size, max_size)
    ours = np.stack([h.numpy(), w.numpy()], axis=-1)
    mismatch = np.nonzero(np.any(ours != resized, axis=-1))[0]
    if len(mismatch):
        i = mismatch[0]
        raise AssertionError(f"reference_output_size{tuple(sizes[i])} = {tuple(ours[i])}, the "
                             f"port gives {tuple(resized[i])} ({len(mismatch)} mismatches)")


def ceil_to(values, divisor):
    return -(-np.asarray(values) // divisor) * divisor


def fixed_shape_waste(resized, padded_hw):
    """(a): every image of the group in one fixed padded shape."""
    used = float(np.prod(resized, axis=-1).sum())
    return 1.0 - used / (len(resized) * padded_hw[0] * padded_hw[1])


def per_image_waste(resized, divisor):
    """(b): each image padded alone to multiples of `divisor`."""
    used = float(np.prod(resized, axis=-1).sum())
    return 1.0 - used / float(np.prod(ceil_to(resized, divisor), axis=-1).sum())


def per_batch_waste(resized, batch_size, divisor, rng):
    """(c): one random batching of the group; each batch padded to its max h, max w."""
    order = rng.permutation(len(resized))
    used = padded = 0.0
    for start in range(0, len(order), batch_size):
        batch = resized[order[start:start + batch_size]]
        batch_hw = ceil_to(batch.max(axis=0), divisor)
        used += float(np.prod(batch, axis=-1).sum())
        padded += len(batch) * float(batch_hw[0] * batch_hw[1])
    return 1.0 - used / padded


def measure(sizes, min_size, max_size, divisor, batch_sizes, draws, seed):
    """-> list of row dicts, one per group (landscape, portrait, all)."""
    resized = np.array([reference_size(h, w, min_size, max_size) for h, w in sizes])
    portrait = sizes[:, 0] >= sizes[:, 1]
    # Fixed shapes as in preprocess_ops.padded_image_size: both sides rounded up to `divisor`.
    short, long = int(ceil_to(min_size, divisor)), int(ceil_to(max_size, divisor))
    shapes = {False: (short, long), True: (long, short)}
    rng = np.random.default_rng(seed)

    rows, totals = [], {"used": 0.0, "fixed": 0.0, "per_image": 0.0}
    batch_totals = {b: np.zeros(draws) for b in batch_sizes}
    batch_used = {b: np.zeros(draws) for b in batch_sizes}
    for name, is_portrait in (("landscape", False), ("portrait", True)):
        group = resized[portrait == is_portrait]
        if not len(group):
            continue
        used = float(np.prod(group, axis=-1).sum())
        row = {"group": name, "images": len(group), "shape": shapes[is_portrait],
               "mean_hw": group.mean(axis=0),
               "fixed": fixed_shape_waste(group, shapes[is_portrait]),
               "per_image": per_image_waste(group, divisor), "batch": {}}
        totals["used"] += used
        totals["fixed"] += len(group) * shapes[is_portrait][0] * shapes[is_portrait][1]
        totals["per_image"] += float(np.prod(ceil_to(group, divisor), axis=-1).sum())
        for b in batch_sizes:
            wastes = np.array([per_batch_waste(group, b, divisor, rng) for _ in range(draws)])
            row["batch"][b] = wastes
            # Padded pixels of each draw, to pool the two groups draw by draw.
            batch_totals[b] += used / (1.0 - wastes)
            batch_used[b] += used
        rows.append(row)
    rows.append({
        "group": "all", "images": len(resized), "shape": None, "mean_hw": resized.mean(axis=0),
        "fixed": 1.0 - totals["used"] / totals["fixed"],
        "per_image": 1.0 - totals["used"] / totals["per_image"],
        "batch": {b: 1.0 - batch_used[b] / batch_totals[b] for b in batch_sizes},
    })
    return rows


def markdown(rows, args, num_sizes):
    pct = "{:.1%}".format
    lines = [
        f"## Padding waste on {num_sizes} images ({os.path.basename(args.annotations)}), "
        f"resize {args.min_size}/{args.max_size}, sides padded to multiples of {args.divisor}",
        "",
        "Waste = padding pixels / all pixels of the padded images. (c): mean over "
        f"{args.draws} seeded random batchings (seed {args.seed}) within each orientation group, "
        "[min, max] over draws; the last batch of a group may be partial.",
        "",
    ]
    header = ["group", "images", "mean resized h x w", "(a) ours: fixed shape",
              "(b) per image, /32"]
    header += [f"(c) reference, batch {b}" for b in args.batch_sizes]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        shape = f" ({row['shape'][0]}x{row['shape'][1]})" if row["shape"] else ""
        cells = [row["group"], str(row["images"]),
                 f"{row['mean_hw'][0]:.0f} x {row['mean_hw'][1]:.0f}",
                 pct(row["fixed"]) + shape, pct(row["per_image"])]
        for b in args.batch_sizes:
            wastes = row["batch"][b]
            cells.append(f"{pct(wastes.mean())} [{pct(wastes.min())}, {pct(wastes.max())}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default=COCO128_JSON, help="COCO instances JSON")
    parser.add_argument("--min_size", type=int, default=800)
    parser.add_argument("--max_size", type=int, default=1333)
    parser.add_argument("--divisor", type=int, default=32, help="size divisibility")
    parser.add_argument("--batch_sizes", default="2,16",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--draws", type=int, default=20, help="random batchings per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_tf_check", action="store_true",
                        help="skip checking the numpy resize port against ours (no TF import)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with open(args.annotations) as f:
        images = json.load(f)["images"]
    sizes = np.array([[image["height"], image["width"]] for image in images], np.int64)
    if not args.no_tf_check:
        resized = np.array([reference_size(h, w, args.min_size, args.max_size) for h, w in sizes])
        check_against_ours(sizes, resized, args.min_size, args.max_size)
    rows = measure(sizes, args.min_size, args.max_size, args.divisor, args.batch_sizes,
                   args.draws, args.seed)
    print(markdown(rows, args, len(sizes)))
    if not args.no_tf_check:
        print("\nThe numpy resize port equals preprocess_ops.reference_output_size on all "
              f"{len(sizes)} sizes.")
    return rows


if __name__ == "__main__":
    main()
