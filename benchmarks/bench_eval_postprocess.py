"""Benchmark: COCO eval post-processing (mask pasting + RLE + COCOeval bbox and segm), ours vs
tf-models-official's `COCOEvaluator`, on the same detections in the same run.

Exact command (from the repository root)::

    .venv/bin/python benchmarks/bench_eval_postprocess.py --repeats 3

Detections: for each of coco128's 128 real images (resized as the reference: shorter side 800,
longer at most 1333), 100 per image: every non-crowd ground-truth object with its box jittered
(sigma 5 % of its size) and its ground-truth mask cut over the box and resampled to 28 x 28
(plus noise), then random boxes with smooth random masks and random classes up to 100; random
scores. Timed per repeat, variants interleaved (order reversed on odd repeats):
  - ours, 1 process: `coco_results.detections_to_coco` + `coco_metrics.evaluate`;
  - ours, 2 processes: a `ResultConverter(2)` started before timing (started once per run in
    training), then `coco_metrics.evaluate`;
  - Model Garden: `COCOEvaluator(include_mask=True)` built before timing (it loads the JSON);
    timed `update_state` (numpy -> tensors of its expected format: COCO category ids,
    `image_info` with the scale) + `result()`.
Ground truth is loaded before timing for both. Reported: median seconds per 1000 images.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
from machine import cpu_model, package_version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128_JSON = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "coco128",
                            "annotations", "instances_train2017.json")
MASK_SIZE = 28


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--annotations", default=COCO128_JSON)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _resize(array, size, box=None):
    from PIL import Image
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR, box=box))


def make_outputs(ground_truth, label_of, num_detections, rng):
    """Batched model-style outputs (see coco_results.detections_to_coco) for every image."""
    ids = sorted(ground_truth.getImgIds())
    n, t = len(ids), num_detections
    outputs = {"source_id": np.array(ids, np.int64), "original_size": np.zeros((n, 2), np.int32),
               "scale": np.zeros((n, 2), np.float32), "num_detections": np.full(n, t, np.int32),
               "detection_boxes": np.zeros((n, t, 4), np.float32),
               "detection_scores": rng.random((n, t)).astype(np.float32),
               "detection_classes": rng.integers(1, len(label_of) + 1, (n, t)).astype(np.int32),
               "detection_masks": np.zeros((n, t, MASK_SIZE, MASK_SIZE), np.float32)}
    for i, image_id in enumerate(ids):
        info = ground_truth.imgs[image_id]
        h, w = info["height"], info["width"]
        factor = min(800 / min(h, w), 1333 / max(h, w))
        scale = (round(h * factor) / h, round(w * factor) / w)
        outputs["original_size"][i], outputs["scale"][i] = (h, w), scale
        anns = [a for a in ground_truth.imgToAnns[image_id] if not a["iscrowd"]][:t]
        for k in range(t):
            if k < len(anns):
                x, y, bw, bh = anns[k]["bbox"]
                x, y = x + rng.normal(0, 0.05) * bw, y + rng.normal(0, 0.05) * bh
                bw, bh = bw * np.exp(rng.normal(0, 0.05)), bh * np.exp(rng.normal(0, 0.05))
                gt_mask = np.pad(ground_truth.annToMask(anns[k]), 2 * MASK_SIZE)
                box = np.clip(np.array([x, y, x + bw, y + bh]) + 2 * MASK_SIZE, 0,
                              [gt_mask.shape[1], gt_mask.shape[0]] * 2)
                box = tuple(float(v) for v in box)
                mask = _resize(gt_mask, (MASK_SIZE, MASK_SIZE), box)
                mask = mask + rng.normal(0, 0.1, mask.shape)
                outputs["detection_classes"][i, k] = label_of[anns[k]["category_id"]]
            else:
                bw, bh = w * rng.uniform(0.02, 0.6), h * rng.uniform(0.02, 0.6)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                mask = _resize(rng.random((5, 5)), (MASK_SIZE, MASK_SIZE)) * 1.4 - 0.2
            outputs["detection_masks"][i, k] = np.clip(mask, 0, 1)
            outputs["detection_boxes"][i, k] = np.array(
                [y * scale[0], x * scale[1], (y + bh - 1) * scale[0], (x + bw - 1) * scale[1]])
    return outputs


def run_ours(converter, outputs, label_map, ground_truth):
    from official_maskrcnn.evaluation import coco_metrics
    results = converter.convert(outputs, label_map)
    return coco_metrics.evaluate(ground_truth, results)


def run_model_garden(evaluator, outputs, label_map):
    import tensorflow as tf
    n = len(outputs["source_id"])
    image_info = np.zeros((n, 4, 2), np.float32)
    image_info[:, 0] = outputs["original_size"]
    image_info[:, 1] = outputs["original_size"] * outputs["scale"]
    image_info[:, 2] = outputs["scale"]
    to_coco = np.vectorize(label_map.get)
    predictions = {
        "source_id": outputs["source_id"], "image_info": image_info,
        "num_detections": outputs["num_detections"],
        "detection_boxes": outputs["detection_boxes"],
        "detection_classes": to_coco(outputs["detection_classes"]).astype(np.int32),
        "detection_scores": outputs["detection_scores"],
        "detection_masks": outputs["detection_masks"]}
    evaluator.update_state(None, {k: tf.constant(v) for k, v in predictions.items()})
    return evaluator.result()


def main(argv):
    args = parse_args(argv)
    from official_maskrcnn.evaluation import coco_metrics, coco_results
    ground_truth = coco_metrics.load_ground_truth(args.annotations)
    label_map = coco_results.label_to_category_id(
        ground_truth.loadCats(ground_truth.getCatIds()))
    outputs = make_outputs(ground_truth, {v: k for k, v in label_map.items()}, args.detections,
                           np.random.default_rng(args.seed))
    num_images = len(outputs["source_id"])

    from official.vision.evaluation import coco_evaluator
    mg_evaluator = coco_evaluator.COCOEvaluator(annotation_file=args.annotations,
                                                include_mask=True)
    serial = coco_results.ResultConverter(1)
    start = time.perf_counter()
    pool = coco_results.ResultConverter(2)
    pool.convert({k: v[:1] for k, v in outputs.items()}, label_map)  # workers up and warm
    pool_start = time.perf_counter() - start

    variants = {
        "ours, 1 process": lambda: run_ours(serial, outputs, label_map, ground_truth),
        "ours, 2 processes": lambda: run_ours(pool, outputs, label_map, ground_truth),
        "Model Garden COCOEvaluator": lambda: run_model_garden(mg_evaluator, outputs,
                                                               label_map),
    }
    seconds, aps = {name: [] for name in variants}, {}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            metrics = variants[name]()
            seconds[name].append(time.perf_counter() - start)
            if name.startswith("ours"):
                aps[name] = (metrics["bbox"]["AP"], metrics["segm"]["AP"])
            else:
                aps[name] = (float(metrics["AP"]), float(metrics["mask_AP"]))
    pool.close()

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### Eval post-processing (pasting + RLE + COCOeval bbox & segm)\n\n"
          f"Command: `.venv/bin/python benchmarks/bench_eval_postprocess.py "
          f"{' '.join(argv)}`\n\nMachine ({date}): {cpu_model()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, Linux {platform.release()}; Python "
          f"{platform.python_version()}, pycocotools {package_version('pycocotools')}, numpy "
          f"{package_version('numpy')}, tf-models-official "
          f"{package_version('tf-models-official')}.\n\n"
          f"Data: coco128, {num_images} images x {args.detections} detections, "
          f"{args.repeats} interleaved repeats; 2-process pool start-up {pool_start:.1f} s "
          f"(once per run, not timed below).\n")
    reference = statistics.median(seconds["Model Garden COCOEvaluator"])
    print("| variant | s / 1000 images (median) | all repeats (s) | vs Model Garden "
          "| box AP | mask AP |\n|---|---|---|---|---|---|")
    for name in variants:
        median = statistics.median(seconds[name])
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"| {name} | {median / num_images * 1000:.1f} | {runs} | "
              f"{reference / median:.2f}x faster | {aps[name][0]:.4f} | {aps[name][1]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
