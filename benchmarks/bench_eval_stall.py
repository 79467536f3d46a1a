"""Benchmark: how long training waits for each evaluation, synchronous vs asynchronous mode.

Exact command (from the repository root, after `make install`)::

    .venv/bin/python benchmarks/bench_eval_stall.py --repeats 2 --epochs 3

Each run is a fresh `python -m official_maskrcnn.train --gin_file configs/smoke_cpu.gin` on the
smoke data (16 train + 16 val synthetic 96-px images, made once under runs/bench_smoke/), with
`run.eval_async` False or True (alternating), `run.eval_processes = 2` and
`run.coco_backend = 'faster_coco_eval'`. The stall of an evaluation is the time the training loop
waited at that epoch's end (`training_stall` in `metrics.jsonl`: inference, plus pasting + RLE +
COCOeval when synchronous); `inference` is the part spent running the model over the eval set.
The first evaluation of a run includes tracing the inference function and is reported
separately. The projection to val2017's 5000 images multiplies the measured inference time per
image (later evaluations) by 5000: an extrapolation for this model and CPU, not a measurement.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from machine import cpu_model, package_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "runs", "bench_smoke")
NUM_VAL_IMAGES = 16


def make_data():
    for split, seed in (("train", "1"), ("val", "2")):
        if os.path.exists(os.path.join(ROOT, "tfrecords", f"{split}.manifest.json")):
            continue
        subprocess.run([sys.executable, "-m", "tfrecord_tools.make_synthetic_coco",
                        "--output_dir", os.path.join(ROOT, "coco"), "--split", split,
                        "--num_images", str(NUM_VAL_IMAGES), "--image_size", "96", "--seed", seed],
                       check=True, cwd=REPO)
        subprocess.run([sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord",
                        "--image_dir", os.path.join(ROOT, "coco", split), "--annotations_file",
                        os.path.join(ROOT, "coco", "annotations", f"instances_{split}.json"),
                        "--output_prefix", os.path.join(ROOT, "tfrecords", split),
                        "--num_shards", "2"], check=True, cwd=REPO)


def one_run(asynchronous, epochs):
    model_dir = os.path.join(ROOT, "model_eval")
    shutil.rmtree(model_dir, ignore_errors=True)
    bindings = [f"train/DatasetBuilder.file_pattern = '{ROOT}/tfrecords/train-*'",
                f"eval/DatasetBuilder.file_pattern = '{ROOT}/tfrecords/val-*'",
                f"coco_annotations_file = '{ROOT}/coco/annotations/instances_val.json'",
                f"run.num_epochs = {epochs}", f"run.eval_async = {asynchronous}",
                "run.eval_processes = 2", "run.coco_backend = 'faster_coco_eval'"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "official_maskrcnn.train", "--gin_file",
                    "configs/smoke_cpu.gin", "--model_dir", model_dir,
                    *[arg for binding in bindings for arg in ("--gin_param", binding)]],
                   cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        seconds = [json.loads(line)["seconds"] for line in f]
    return [s["training_stall"] for s in seconds], wall, [s["inference"] for s in seconds]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    make_data()
    results = {False: [], True: []}
    for repeat in range(args.repeats):
        for asynchronous in ((False, True) if repeat % 2 == 0 else (True, False)):
            results[asynchronous].append(one_run(asynchronous, args.epochs))
            print(f"repeat {repeat + 1} async={asynchronous}: {results[asynchronous][-1]}",
                  file=sys.stderr)
    print(f"Measured {datetime.date.today()} on {cpu_model()}, {os.cpu_count()} cores, "
          f"tensorflow {package_version('tensorflow')}; {args.repeats} runs per mode, "
          f"{args.epochs} evaluations of {NUM_VAL_IMAGES} images per run.\n")
    print("| mode | stall per evaluation, later ones (s, median) | of which inference (s) "
          "| stall - inference (s) | first evaluation (s) | run wall time (s, median) |")
    print("|---|---|---|---|---|---|")
    per_image = []
    for asynchronous in (False, True):
        runs = results[asynchronous]
        later = statistics.median(s for stalls, _, _ in runs for s in stalls[1:])
        inference = statistics.median(i for _, _, infer in runs for i in infer[1:])
        per_image.extend(i / NUM_VAL_IMAGES for _, _, infer in runs for i in infer[1:])
        first = statistics.median(stalls[0] for stalls, _, _ in runs)
        wall = statistics.median(w for _, w, _ in runs)
        print(f"| {'asynchronous' if asynchronous else 'synchronous'} | {later:.2f} "
              f"| {inference:.2f} | {later - inference:.2f} | {first:.1f} | {wall:.0f} |")
    inference_per_image = statistics.median(per_image)
    print(f"\nInference: {inference_per_image * 1000:.1f} ms per image (median of the later "
          f"evaluations); projected for val2017's 5000 images on this CPU and model: "
          f"{inference_per_image * 5000:.0f} s of stall per asynchronous evaluation "
          f"(extrapolation).")


if __name__ == "__main__":
    main()
