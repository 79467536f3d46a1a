"""Benchmark: how long training waits for each evaluation, synchronous vs asynchronous mode.

Exact command (from the repository root, after `make install`)::

    .venv/bin/python benchmarks/bench_eval_stall.py --repeats 2 --epochs 3

Each run is a fresh `python -m official_maskrcnn.train --gin_file configs/smoke_cpu.gin` on the
smoke data (16 train + 16 val synthetic 96-px images, made once under runs/bench_smoke/), with
`run.eval_async` False or True (alternating) and `run.eval_processes = 2`. The stall of an
evaluation is the time the training loop waited at that epoch's end (`training_stall` in
`metrics.jsonl`: inference, plus pasting + RLE + COCOeval when synchronous). The first
evaluation of a run includes tracing the inference function and is reported separately.
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


def make_data():
    for split, seed in (("train", "1"), ("val", "2")):
        if os.path.exists(os.path.join(ROOT, "tfrecords", f"{split}.manifest.json")):
            continue
        subprocess.run([sys.executable, "-m", "tfrecord_tools.make_synthetic_coco",
                        "--output_dir", os.path.join(ROOT, "coco"), "--split", split,
                        "--num_images", "16", "--image_size", "96", "--seed", seed],
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
                "run.eval_processes = 2"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "official_maskrcnn.train", "--gin_file",
                    "configs/smoke_cpu.gin", "--model_dir", model_dir,
                    *[arg for binding in bindings for arg in ("--gin_param", binding)]],
                   cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        stalls = [json.loads(line)["seconds"]["training_stall"] for line in f]
    return stalls, wall


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
          f"{args.epochs} evaluations of 16 images per run.\n")
    print("| mode | stall per evaluation, later ones (s, median) | first evaluation (s) "
          "| run wall time (s, median) |")
    print("|---|---|---|---|")
    for asynchronous in (False, True):
        later = statistics.median(s for stalls, _ in results[asynchronous] for s in stalls[1:])
        first = statistics.median(stalls[0] for stalls, _ in results[asynchronous])
        wall = statistics.median(w for _, w in results[asynchronous])
        print(f"| {'asynchronous' if asynchronous else 'synchronous'} | {later:.2f} "
              f"| {first:.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
