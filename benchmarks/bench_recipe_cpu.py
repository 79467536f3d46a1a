"""Benchmark: the MLPerf recipe itself (configs/mlperf_r50_fpn.gin) trained on this CPU at 800x1344.

Exact command (repository root, after `make install`; about 25 minutes on 2 Intel Xeon cores)::

    .venv/bin/python benchmarks/bench_recipe_cpu.py

What runs, as a new user would run it (`./run_and_time.sh`, the recipe unchanged but for):
- the data: coco128's first `--train_images` images as DATA_DIR/train-* and the next
  `--val_images` as DATA_DIR/val-*, with their annotations as
  DATA_DIR/annotations/instances_val2017.json (so the eval records cover the whole annotations
  file: the recipe's full-val-set check stays on);
- `r50_checkpoint`: a backbone from `official_maskrcnn.tools.calibrate_backbone` on 16 of those
  training images (frozen-BN statistics measured on real pictures; R-50.pkl cannot be
  downloaded here, and a randomly initialised frozen-BN ResNet-50 diverges at step 3);
- `global_batch_size = 2` and `run.eval_batch_size = 2` (the recipe's 16 are for 8
  accelerators; 16 images of 800x1344 in one CPU inference call took over 20 GB and the OOM
  killer ended the run), `run.num_epochs` / `run.max_steps` for a few dozen steps, and
  `run.steps_per_loop = 1` so that every step is one host call (its losses and wall time are
  TensorBoard scalars); NUM_GPUS=0 (CPU).

Checked (the script exits 1 when one fails): every loss finite, the mean total loss of the last
quarter of the steps below the first quarter's, XLA compiled the train step exactly once per
image orientation (the compiled HLO modules are counted in an XLA dump, `--xla_dump_to`), the
evaluation ran, and the 3.1.0 compliance checker accepts mlperf.log except for the accuracy
target. Reported as Markdown: compile time per orientation (the first step of that orientation
minus the median later step), s/step with and without XLA (medians over the steps after each
orientation's first), peak RSS of the training process (its `wait4` rusage), the loss curve.
The run without XLA only times steps (`--no_xla_steps`, no evaluation).
"""

import argparse
import collections
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from machine import cpu_model, mem_total_gib, package_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "runs", "bench_recipe")
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")
CONFIG = os.path.join(REPO, "configs", "mlperf_r50_fpn.gin")
# XLA dumps one set of files per compiled HLO module: module_<id>.<name>.<stage>.txt.
MODULE_FILE = re.compile(r"^module_(\d+)\.(.+?)\.before_optimizations\.txt$")


def run(command, **kwargs):
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=REPO, **kwargs)


def make_data(train_images, val_images):
    """DATA_DIR with train-*, val-* and annotations/instances_val2017.json (the val subset's)."""
    data_dir = os.path.join(ROOT, f"data_{train_images}_{val_images}")
    if os.path.exists(os.path.join(data_dir, "val.manifest.json")):
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(os.path.join(data_dir, "annotations"))
    with open(COCO128_JSON, encoding="utf-8") as handle:
        coco = json.load(handle)
    if train_images + val_images > len(coco["images"]):
        raise SystemExit(f"coco128 has {len(coco['images'])} images, asked for "
                         f"{train_images} + {val_images}")
    val = coco["images"][train_images:train_images + val_images]
    val_ids = {image["id"] for image in val}
    val_json = os.path.join(data_dir, "annotations", "instances_val2017.json")
    with open(val_json, "w", encoding="utf-8") as handle:
        json.dump(dict(coco, images=val, annotations=[
            a for a in coco["annotations"] if a["image_id"] in val_ids]), handle)
    image_dir = os.path.join(COCO128, "train2017")
    run([sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord", "--image_dir", image_dir,
         "--annotations_file", COCO128_JSON, "--output_prefix", os.path.join(data_dir, "train"),
         "--num_shards", "2", "--max_images", str(train_images)])
    run([sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord", "--image_dir", image_dir,
         "--annotations_file", val_json, "--output_prefix", os.path.join(data_dir, "val"),
         "--num_shards", "1"])
    return data_dir


def calibrate(data_dir):
    prefix = os.path.join(ROOT, "r50_calibrated", "R-50")
    if not glob.glob(prefix + ".index"):
        run([sys.executable, "-m", "official_maskrcnn.tools.calibrate_backbone",
             "--gin_file", CONFIG, "--file_pattern", os.path.join(data_dir, "train-*"),
             "--num_images", "16", "--output", prefix])
    return prefix


def train(data_dir, backbone, model_dir, gin_params, xla_dump=None):
    """./run_and_time.sh with the recipe; returns (seconds, peak RSS GiB of the process tree)."""
    shutil.rmtree(model_dir, ignore_errors=True)
    env = dict(os.environ, DATA_DIR=data_dir, MODEL_DIR=model_dir, NUM_GPUS="0", SEED="1",
               PYTHON=sys.executable)
    if xla_dump:
        shutil.rmtree(xla_dump, ignore_errors=True)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={xla_dump}").strip()
    command = [os.path.join(REPO, "run_and_time.sh"),
               "--gin_param", f"r50_checkpoint = '{backbone}'",
               "--gin_param", "global_batch_size = 2", "--gin_param", "run.eval_batch_size = 2",
               "--gin_param", "run.steps_per_loop = 1"]
    for param in gin_params:
        command += ["--gin_param", param]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    log_path = model_dir + ".log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training failed (exit {os.waitstatus_to_exitcode(status)}); see "
                         f"{log_path}")
    return seconds, usage.ru_maxrss / 2.0**20  # ru_maxrss is in KiB on Linux


def step_scalars(model_dir):
    """{step: {tag: value}} of the per-host-call scalars in MODEL_DIR/train."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(model_dir, "train"), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    steps = collections.defaultdict(dict)
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        for event in accumulator.Tensors(tag):
            value = tf.make_ndarray(event.tensor_proto)
            if value.dtype.kind == "f":
                steps[event.step][tag] = float(value)
    return dict(sorted(steps.items()))


def compiled_modules(xla_dump):
    """{module name: number of compiled modules with that name} in an XLA dump folder."""
    names = collections.Counter()
    for path in glob.glob(os.path.join(xla_dump, "module_*.before_optimizations.txt")):
        match = MODULE_FILE.match(os.path.basename(path))
        if match:
            names[match.group(2)] += 1
    return names


def module_image_shapes(xla_dump, name_part):
    """{module file: the [batch, H, W, 3] image shapes its entry computation takes} for the
    modules whose name contains `name_part`."""
    shapes = {}
    for path in sorted(glob.glob(os.path.join(xla_dump, "module_*.before_optimizations.txt"))):
        if name_part not in os.path.basename(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            entry = next((line for line in handle if line.startswith("ENTRY")), "")
        # [B, H, W, 3] parameters larger than 7 x 7: the images, not the 3-channel kernels (the
        # RPN's score kernel is [1, 1, 256, 3]; no kernel in the model is larger than 7 x 7).
        shapes[os.path.basename(path)] = sorted(
            {f"f32[{b},{h},{w},3]" for b, h, w in re.findall(r"f32\[(\d+),(\d+),(\d+),3\]", entry)
             if min(int(h), int(w)) > 7})
    return shapes


def quarter_means(values):
    quarter = max(1, len(values) // 4)
    return statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_images", type=int, default=32,
                        help="coco128 images trained on (an epoch is half as many steps)")
    parser.add_argument("--val_images", type=int, default=8, help="coco128 images evaluated")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the XLA run")
    parser.add_argument("--no_xla_steps", type=int, default=8,
                        help="steps of the run without XLA (0: skip it)")
    parser.add_argument("--report_only", action="store_true",
                        help="no training: report on the runs already under runs/bench_recipe/")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from official_maskrcnn.training import mlperf_compliance

    data_dir = make_data(args.train_images, args.val_images)
    backbone = calibrate(data_dir)
    xla_dir, dump = os.path.join(ROOT, "model_xla"), os.path.join(ROOT, "xla_dump")
    graph_dir = os.path.join(ROOT, "model_graph")
    runs_json = os.path.join(ROOT, "runs.json")  # wall times and peak RSS, for --report_only
    if not args.report_only:
        measured = {"xla": train(data_dir, backbone, xla_dir, [f"run.num_epochs = {args.epochs}"],
                                 xla_dump=dump)}
        if args.no_xla_steps:
            measured["graph"] = train(
                data_dir, backbone, graph_dir,
                [f"run.max_steps = {args.no_xla_steps}", "run.jit_compile = False",
                 "run.eval_annotations_file = None"])
        # When the runs ended: --report_only reports it, not the time of the report.
        measured["measured_at"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
        with open(runs_json, "w", encoding="utf-8") as handle:
            json.dump(measured, handle)
    with open(runs_json, encoding="utf-8") as handle:
        measured = json.load(handle)
    xla_seconds, xla_rss = measured["xla"]
    graph_seconds, graph_rss = measured.get("graph", (None, None))

    failures = []
    xla = step_scalars(xla_dir)
    step_seconds = {step: 2.0 / v["images_per_second"] for step, v in xla.items()}
    totals = [v["total_loss"] for v in xla.values()]
    finite = all(value == value and abs(value) != float("inf")
                 for v in xla.values() for key, value in v.items() if key.endswith("_loss"))
    first_quarter, last_quarter = quarter_means(totals)
    if not finite:
        failures.append("a loss is not finite")
    if not last_quarter < first_quarter:
        failures.append(f"total loss not falling: first quarter {first_quarter:.4f}, last "
                        f"quarter {last_quarter:.4f}")
    modules = compiled_modules(dump)
    train_modules = {name: count for name, count in modules.items() if "forward_backward" in name}
    shapes = module_image_shapes(dump, "forward_backward")
    image_shapes = sorted(shape for found in shapes.values() for shape in found)
    if sum(train_modules.values()) != 2 or len(set(image_shapes)) != 2:
        failures.append(f"train step compiled {sum(train_modules.values())} times (expected 2, "
                        f"one per orientation): {train_modules}, image shapes {image_shapes}")
    # The two compilations: the first step, and the slowest later step (the other
    # orientation's first); compile time = that step minus the median step.
    later = sorted(step_seconds)[1:]
    other = max(later, key=step_seconds.get)
    steady = statistics.median(step_seconds[s] for s in later if s != other)
    with open(os.path.join(xla_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        evals = [json.loads(line) for line in handle if line.strip()]
    if not evals:
        failures.append("no evaluation in metrics.jsonl")
    compliance = mlperf_compliance.check_compliance(os.path.join(xla_dir, "mlperf.log"))
    other_failures = compliance.failures_excluding({"eval_accuracy"})
    if other_failures:
        failures.append("compliance checker: " + "; ".join(f.text for f in other_failures))

    measured_at = measured.get("measured_at", "(time not recorded by this runs.json)")
    print(f"Measured {measured_at} UTC on "
          f"{cpu_model()}, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB; tensorflow "
          f"{package_version('tensorflow')}. coco128: {args.train_images} train images, "
          f"{args.val_images} val images; batch 2; backbone calibrated on 16 train images.\n")
    print("| measure | XLA (jit_compile=True) | TF graph (jit_compile=False) |")
    print("|---|---:|---:|")
    if graph_seconds is not None:
        graph = step_scalars(graph_dir)
        graph_steps = {s: 2.0 / v["images_per_second"] for s, v in graph.items()}
        graph_later = sorted(graph_steps)[1:]
        graph_other = max(graph_later, key=graph_steps.get)
        graph_steady = statistics.median(graph_steps[s] for s in graph_later if s != graph_other)
        g = (f"{graph_steady:.1f}", f"{graph_steps[min(graph_steps)]:.1f}",
             f"{graph_rss:.1f}", f"{graph_seconds:.0f} ({len(graph)} steps, no eval)")
    else:
        g = ("", "", "", "")
    print(f"| s/step, median of the steps after each orientation's first | {steady:.1f} | {g[0]} |")
    print(f"| first step (tracing + compilation of one orientation), s | "
          f"{step_seconds[min(step_seconds)]:.1f} | {g[1]} |")
    print(f"| compile time per orientation (first step of it minus the median), s | "
          f"{step_seconds[min(step_seconds)] - steady:.1f}, {step_seconds[other] - steady:.1f} "
          f"(step {other}) | |")
    print(f"| peak RSS of the training process, GiB | {xla_rss:.1f} | {g[2]} |")
    print(f"| whole run_and_time.sh, s | {xla_seconds:.0f} ({len(xla)} steps, "
          f"{len(evals)} evaluations) | {g[3]} |")
    print(f"\nXLA modules compiled (from the dump): {dict(modules)}; train-step image shapes: "
          f"{image_shapes}.\n")
    for entry in evals:
        print(f"Evaluation at epoch {entry['epoch']} ({entry['num_images']} images): box AP "
              f"{entry['bbox']['AP']:.4f}, mask AP {entry['segm']['AP']:.4f}, inference "
              f"{entry['seconds']['inference']:.1f} s, training stall "
              f"{entry['seconds']['training_stall']:.1f} s.")
    print("\nCompliance checker 3.1.0 on mlperf.log, its failures (the accuracy target's are "
          "expected):", "; ".join(f.text for f in compliance.failures) or "none", "\n")
    print("Loss curve of the XLA run (each step one host call):\n")
    keys = ["total_loss", "rpn_score_loss", "rpn_box_loss", "frcnn_class_loss", "frcnn_box_loss",
            "mask_loss"]
    keys = [k for k in keys if k in next(iter(xla.values()))]
    print("| step | " + " | ".join(k.replace("_loss", "") for k in keys) + " | s/step |")
    print("|---:|" + "---:|" * (len(keys) + 1))
    for step, values in xla.items():
        print(f"| {step} | " + " | ".join(f"{values[k]:.4f}" for k in keys)
              + f" | {step_seconds[step]:.1f} |")
    print(f"\nTotal loss: mean of the first quarter {first_quarter:.4f}, of the last quarter "
          f"{last_quarter:.4f}.")
    if failures:
        print("\nFAILED:\n- " + "\n- ".join(failures))
        return 1
    print("\nAll checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
