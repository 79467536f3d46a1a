"""Benchmark: training throughput of the smoke config on this CPU, with and without XLA.

Exact command (from the repository root, after `make install`)::

    .venv/bin/python benchmarks/bench_train_smoke.py --repeats 3 --epochs 3

Each run is a fresh `python -m official_maskrcnn.train --gin_file configs/smoke_cpu.gin` on the
smoke data (16 synthetic 96-px images, made once under runs/bench_smoke/), for `--epochs` epochs
of 8 steps at 2 images per step, without evaluation; runs with `run.jit_compile = True` and
`False` alternate. A run's throughput is the median images/s of its progress lines after the
first one (the first host call includes tracing and XLA compilation, reported separately as its
wall time). Reported: the median over repeats of each, as Markdown.
"""

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys

from machine import cpu_model, package_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "runs", "bench_smoke")
LINE = re.compile(r"^step \d+/\d+ .*\| ([\d.]+) img/s \| elapsed (\S+)")


def make_data():
    pattern = os.path.join(ROOT, "tfrecords", "train-*")
    if not os.path.exists(os.path.join(ROOT, "tfrecords")):
        subprocess.run([sys.executable, "-m", "tfrecord_tools.make_synthetic_coco",
                        "--output_dir", os.path.join(ROOT, "coco"), "--split", "train",
                        "--num_images", "16", "--image_size", "96", "--seed", "1"], check=True,
                       cwd=REPO)
        subprocess.run([sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord",
                        "--image_dir", os.path.join(ROOT, "coco", "train"),
                        "--annotations_file",
                        os.path.join(ROOT, "coco", "annotations", "instances_train.json"),
                        "--output_prefix", os.path.join(ROOT, "tfrecords", "train"),
                        "--num_shards", "2"], check=True, cwd=REPO)
    return pattern


def seconds(text):
    """'1:02' / '1:02:03' (tfrecord_tools.progress.format_seconds) -> seconds."""
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return total


def one_run(pattern, jit, epochs):
    model_dir = os.path.join(ROOT, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-m", "official_maskrcnn.train", "--gin_file", "configs/smoke_cpu.gin",
         "--model_dir", model_dir,
         "--gin_param", f"train/DatasetBuilder.file_pattern = '{pattern}'",
         "--gin_param", f"run.jit_compile = {jit}", "--gin_param", f"run.num_epochs = {epochs}",
         "--gin_param", "run.eval_annotations_file = None"],  # training only
        cwd=REPO, check=True, capture_output=True, text=True).stdout
    matches = [LINE.match(line) for line in out.splitlines()]
    matches = [m for m in matches if m]
    return statistics.median(float(m.group(1)) for m in matches[1:]), seconds(matches[0].group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    pattern = make_data()
    results = {True: [], False: []}
    for repeat in range(args.repeats):
        for jit in ((True, False) if repeat % 2 == 0 else (False, True)):
            results[jit].append(one_run(pattern, jit, args.epochs))
            print(f"repeat {repeat + 1} jit={jit}: {results[jit][-1]}", file=sys.stderr)
    print(f"Measured {datetime.date.today()} on {cpu_model()}, {os.cpu_count()} cores, "
          f"tensorflow {package_version('tensorflow')}; median of {args.repeats} runs.\n")
    print("| step compiled with | images/s after the first host call | first host call (s) |")
    print("|---|---|---|")
    for jit in (False, True):
        rates = statistics.median(r for r, _ in results[jit])
        first = statistics.median(s for _, s in results[jit])
        print(f"| {'XLA (jit_compile=True)' if jit else 'TF graph (jit_compile=False)'} "
              f"| {rates:.2f} | {first:.0f} |")


if __name__ == "__main__":
    main()
