"""Benchmark: COCO eval post-processing (boxes, mask pasting, RLE, COCOeval bbox and segm), per
stage and end to end, in 1 and 2 processes, idle and beside a busy core, both COCOeval back ends,
against tf-models-official's `COCOEvaluator` on the same detections in the same run, and two
2-process ceilings measured between the repeats: the machine's (`machine.ProcessScaling`, a
pure-Python loop) and this workload's (`WorkloadScaling`, two independent copies of the whole
one-process post-processing side by side).

Exact command (from the repository root)::

    .venv/bin/python benchmarks/bench_eval_postprocess.py --repeats 3
    .venv/bin/python benchmarks/bench_eval_postprocess.py --repeats 3 --copies 4  # 512 images

Detections: for each of coco128's 128 real images (resized as the reference: shorter side 800,
longer at most 1333), 100 per image: every non-crowd ground-truth object with its box jittered
(sigma 5 % of its size) and its ground-truth mask cut over the box and resampled to 28 x 28
(plus noise), then random boxes with smooth random masks and random classes up to 100; random
scores.

Stages (one process, median over repeats, ms per image): boxes back to original pixels and the
result dicts; pasting, RLE and its compression (`mask_pasting.pasted_masks`, one C call per
image); bbox and segm COCOeval (results loaded + evaluate + accumulate + summarize) with each
back end.

End to end (`evaluator.PostProcessor.run`, exactly what training runs after inference; its worker
pool started before timing, as once per training run): pycocotools and faster_coco_eval in 1 and
2 processes; Model Garden's `COCOEvaluator(include_mask=True)` (`update_state` + `result()`;
built before timing, it loads the JSON). Each variant idle and with a CPU burner (a process
spinning on one core, as training beside an asynchronous evaluation). Variants interleaved, order
reversed on odd repeats. "ms / image / process" = wall time x processes / images.
"""

import argparse
import collections
import contextlib
import datetime
import functools
import io
import os
import platform
import statistics
import sys
import time

import numpy as np
from machine import ProcessScaling, cpu_model, package_version

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
    parser.add_argument("--copies", type=int, default=1,
                        help="evaluate K copies of the annotations' images (new ids, same "
                             "pixels and objects): how the costs scale past 128 images")
    return parser.parse_args(argv)


def write_copies(annotations, copies, directory):
    """The annotation JSON with every image (and its objects) `copies` times, under new ids
    (copy k adds k x a power of ten above every id): a larger eval set of the same images.
    Returns its path."""
    import json
    with open(annotations, encoding="utf-8") as handle:
        dataset = json.load(handle)
    offset = 10 ** len(str(max(entry["id"] for entry in
                               dataset["images"] + dataset["annotations"])))
    images, objects = [], []
    for k in range(copies):
        images += [dict(image, id=image["id"] + k * offset) for image in dataset["images"]]
        objects += [dict(ann, id=ann["id"] + k * offset, image_id=ann["image_id"] + k * offset)
                    for ann in dataset["annotations"]]
    path = os.path.join(directory, f"copies{copies}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dict(dataset, images=images, annotations=objects), handle)
    return path


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
    with contextlib.redirect_stdout(io.StringIO()):  # its pycocotools prints every table
        return evaluator.result()


STAGES = ("boxes + result dicts", "pasting + RLE (C)")


def _median_ms(seconds, num_images):
    return statistics.median(seconds) / num_images * 1000


def time_stages(outputs, label_map, annotations, repeats):
    """{stage: [seconds per repeat]} of the one-process pipeline, stage by stage."""
    from official_maskrcnn.evaluation import coco_metrics, coco_results
    from official_maskrcnn.evaluation import evaluator as evaluator_lib
    from official_maskrcnn.evaluation import mask_pasting
    per_image = []
    for i in range(len(outputs["source_id"])):
        keep = outputs["detection_classes"][i] > 0
        boxes = coco_results.original_boxes_xyxy(outputs["detection_boxes"][i][keep],
                                                 outputs["scale"][i])
        per_image.append((outputs["detection_masks"][i][keep], boxes,
                          *outputs["original_size"][i]))
    results = coco_results.detections_to_coco(outputs, label_map)
    seconds = collections.defaultdict(list)
    # As `PostProcessor` runs them: without full garbage collections over TensorFlow's objects.
    with evaluator_lib.cyclic_gc_paused():
        for _ in range(repeats):
            start = time.perf_counter()
            coco_results.detections_to_coco(outputs, label_map, include_masks=False)
            seconds[STAGES[0]].append(time.perf_counter() - start)
            start = time.perf_counter()
            for args in per_image:
                mask_pasting.pasted_masks(*args, 0.5)
            seconds[STAGES[1]].append(time.perf_counter() - start)
            for backend in coco_metrics.BACKENDS:
                for iou_type in coco_metrics.IOU_TYPES:
                    start = time.perf_counter()
                    coco_metrics.evaluate(annotations, results, iou_types=(iou_type,),
                                          backend=backend)
                    seconds[f"{iou_type} COCOeval, {backend}"].append(
                        time.perf_counter() - start)
    return seconds


def stat_differences(results, annotations):
    """max |faster_coco_eval - pycocotools| over the 12 stats of each iou type."""
    from official_maskrcnn.evaluation import coco_metrics
    slow = coco_metrics.evaluate(annotations, results)
    fast = coco_metrics.evaluate(annotations, results, backend="faster_coco_eval")
    return {t: max(abs(fast[t][n] - slow[t][n]) for n in coco_metrics.STAT_NAMES)
            for t in coco_metrics.IOU_TYPES}, slow


_COPY = {}


def _start_copy(annotations, num_detections, seed, backend):
    """Worker initializer of `WorkloadScaling`: the benchmark's detections and a one-process
    `PostProcessor`, warmed up."""
    from official_maskrcnn.evaluation import coco_metrics, coco_results
    from official_maskrcnn.evaluation import evaluator as evaluator_lib
    ground_truth = coco_metrics.load_ground_truth(annotations)
    label_map = coco_results.label_to_category_id(
        ground_truth.loadCats(ground_truth.getCatIds()))
    _COPY["outputs"] = make_outputs(ground_truth, {v: k for k, v in label_map.items()},
                                    num_detections, np.random.default_rng(seed))
    _COPY["post"] = evaluator_lib.PostProcessor(annotations, 1, backend)
    _COPY["post"].run({k: v[:2] for k, v in _COPY["outputs"].items()})


def _run_copy(start_at):
    """One whole one-process post-processing, started at wall time `start_at`: seconds."""
    time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    _COPY["post"].run(_COPY["outputs"])
    return time.perf_counter() - start


class WorkloadScaling:
    """This workload's own ceiling for 2 processes against 1: the whole one-process
    post-processing (same detections, same back end) timed alone and as two concurrent copies
    in two processes that share nothing. Unlike `machine.ProcessScaling`'s pure-Python loop it
    feels what two copies of *this* work cost each other on the machine (memory bandwidth,
    caches, two vCPUs of one core), so no split of one evaluation over two processes can beat
    it. `measure()` once per repeat; `ceiling()` = 2 x median(one) / median(two)."""

    def __init__(self, annotations, num_detections, seed, backend):
        import concurrent.futures
        import multiprocessing
        self.one, self.two = [], []
        context = multiprocessing.get_context("spawn")
        self._pools = [concurrent.futures.ProcessPoolExecutor(
            1, mp_context=context, initializer=_start_copy,
            initargs=(annotations, num_detections, seed, backend)) for _ in range(2)]
        for future in [pool.submit(time.time) for pool in self._pools]:
            future.result()

    def measure(self):
        self.one.append(self._pools[len(self.one) % 2].submit(_run_copy, 0.0).result())
        start_at = time.time() + 0.2  # both copies start together
        futures = [pool.submit(_run_copy, start_at) for pool in self._pools]
        self.two.append(max(future.result() for future in futures))

    def ceiling(self):
        return 2 * statistics.median(self.one) / statistics.median(self.two)

    def close(self):
        for pool in self._pools:
            pool.shutdown()


class Burner:
    """A process spinning on one core while the context is open."""

    def __enter__(self):
        import subprocess
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc_info):
        self.process.kill()
        self.process.wait()


def main(argv):
    args = parse_args(argv)
    if args.copies > 1:
        import tempfile
        args.annotations = write_copies(args.annotations, args.copies, tempfile.mkdtemp())
    from official_maskrcnn.evaluation import coco_metrics, coco_results
    from official_maskrcnn.evaluation import evaluator as evaluator_lib
    ground_truth = coco_metrics.load_ground_truth(args.annotations)
    label_map = coco_results.label_to_category_id(
        ground_truth.loadCats(ground_truth.getCatIds()))
    outputs = make_outputs(ground_truth, {v: k for k, v in label_map.items()}, args.detections,
                           np.random.default_rng(args.seed))
    num_images = len(outputs["source_id"])
    for backend in coco_metrics.BACKENDS:  # ground truth loaded before timing, as in training
        coco_metrics.load_ground_truth(args.annotations, backend)

    stages = time_stages(outputs, label_map, args.annotations, args.repeats)
    differences, reference = stat_differences(coco_results.detections_to_coco(outputs, label_map),
                                              args.annotations)

    from official.vision.evaluation import coco_evaluator
    mg_evaluator = coco_evaluator.COCOEvaluator(annotation_file=args.annotations,
                                                include_mask=True)
    post = {}
    for backend in coco_metrics.BACKENDS:
        for processes in (1, 2):
            post[backend, processes] = evaluator_lib.PostProcessor(args.annotations, processes,
                                                                   backend)
            post[backend, processes].run({k: v[:2] for k, v in outputs.items()})  # warm
    variants = {f"ours, {backend}, {processes} process{'es' if processes > 1 else ''}":
                (processes, functools.partial(post[backend, processes].run, outputs))
                for backend, processes in post}
    variants["Model Garden COCOEvaluator"] = (1, lambda: run_model_garden(
        mg_evaluator, outputs, label_map))
    seconds, aps = collections.defaultdict(list), {}
    scaling = ProcessScaling()
    workload = WorkloadScaling(args.annotations, args.detections, args.seed, "faster_coco_eval")
    for repeat in range(args.repeats):
        scaling.measure()
        workload.measure()
        for busy in (False, True):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            with Burner() if busy else contextlib.nullcontext():
                for name in order:
                    start = time.perf_counter()
                    result = variants[name][1]()
                    seconds[name, busy].append(time.perf_counter() - start)
                    if name.startswith("ours"):
                        aps[name] = (result[0]["bbox"]["AP"], result[0]["segm"]["AP"])
                    else:
                        aps[name] = (float(result["AP"]), float(result["mask_AP"]))
    for p in post.values():
        p.close()
    scaling.close()
    workload.close()

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### Eval post-processing (boxes, pasting, RLE, COCOeval bbox & segm)\n\n"
          f"Command: `.venv/bin/python benchmarks/bench_eval_postprocess.py "
          f"{' '.join(argv)}`\n\nMachine ({date}): {cpu_model()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, Linux {platform.release()}; Python "
          f"{platform.python_version()}, pycocotools {package_version('pycocotools')}, "
          f"faster-coco-eval {package_version('faster-coco-eval')}, numpy "
          f"{package_version('numpy')}, tf-models-official "
          f"{package_version('tf-models-official')}.\n\n"
          f"Data: coco128{f' x {args.copies} copies' if args.copies > 1 else ''}, "
          f"{num_images} images x {args.detections} detections, "
          f"{args.repeats} interleaved repeats.\n")
    print("Stages, one process, idle (ms / image, median):\n\n| stage | ms / image | all repeats "
          "(ms / image) |\n|---|---:|---|")
    for stage, values in stages.items():
        runs = ", ".join(f"{v / num_images * 1000:.2f}" for v in values)
        print(f"| {stage} | {_median_ms(values, num_images):.2f} | {runs} |")
    for backend in coco_metrics.BACKENDS:
        total = sum(_median_ms(stages[s], num_images) for s in STAGES) + sum(
            _median_ms(stages[f"{t} COCOeval, {backend}"], num_images)
            for t in coco_metrics.IOU_TYPES)
        print(f"| **sum, {backend}** | **{total:.2f}** | |")
    print(f"\nfaster_coco_eval vs pycocotools on these results: max |delta| over the 12 stats: "
          f"bbox {differences['bbox']:.1e}, segm {differences['segm']:.1e} (box AP "
          f"{reference['bbox']['AP']:.4f}, mask AP {reference['segm']['AP']:.4f}).\n")
    peer = statistics.median(seconds["Model Garden COCOEvaluator", False])
    one = {backend: statistics.median(seconds[f"ours, {backend}, 1 process", False])
           for backend in coco_metrics.BACKENDS}
    print("End to end (`PostProcessor.run`; Model Garden: `update_state` + `result()`):\n\n"
          "| variant | CPU burner | s / 1000 images (median) | ms / image / process | all "
          "repeats (s) | Model Garden idle / this | speed-up vs 1 process | box AP | mask AP "
          "|\n|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name, (processes, _) in variants.items():
        for busy in (False, True):
            median = statistics.median(seconds[name, busy])
            runs = ", ".join(f"{s:.2f}" for s in seconds[name, busy])
            backend = next((b for b in coco_metrics.BACKENDS if f", {b}," in name), None)
            speedup = f"{one[backend] / median:.2f}" if backend else ""
            print(f"| {name} | {'yes' if busy else 'no'} | {median / num_images * 1000:.1f} | "
                  f"{median * processes / num_images * 1000:.2f} | {runs} | {peer / median:.2f} "
                  f"| {speedup} | {aps[name][0]:.4f} | {aps[name][1]:.4f} |")
    print(f"\nThis machine's own ceiling for 2 processes against 1 (`machine.ProcessScaling`: a "
          f"pure-Python loop alone and as two concurrent copies, once per repeat): "
          f"**{scaling.ceiling():.2f}x** (one: "
          f"{', '.join(f'{s:.2f}' for s in scaling.one)} s; two: "
          f"{', '.join(f'{s:.2f}' for s in scaling.two)} s).")
    print(f"\nThis workload's own ceiling (`WorkloadScaling`: the whole one-process "
          f"post-processing with faster_coco_eval alone and as two concurrent copies in two "
          f"processes sharing nothing, once per repeat): **{workload.ceiling():.2f}x** (one: "
          f"{', '.join(f'{s:.2f}' for s in workload.one)} s; two: "
          f"{', '.join(f'{s:.2f}' for s in workload.two)} s).")
    fastest = min(statistics.median(seconds[name, False]) * processes / num_images
                  for name, (processes, _) in variants.items() if name.startswith("ours"))
    print(f"\nExtrapolation (not a measurement): at the fastest ms / image / process above, "
          f"val2017's 5000 images over 10 such processes take {fastest * 5000 / 10:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
