"""Benchmark: training input pipeline per CPU core, ours vs Model Garden, and RPN anchor labelling.

Exact command (from the repository root)::

    .venv/bin/python benchmarks/bench_input_pipeline.py --threads 1,2 --passes 2 --repeats 3

(the defaults; about 5.5 minutes on a 2-core Xeon, ~7.5 with ``--passes 3``). Progress lines go
to stderr, the Markdown report to stdout.

Defaults convert coco128 (``../shared/data/coco128``) into 4 temporary shards with
``python -m tfrecord_tools.create_coco_tfrecord`` (untimed; ``--file_pattern`` uses existing
shards instead). Both pipelines read the SAME records, held in memory as raw serialized bytes
(``Dataset.from_tensor_slices``, loaded once, untimed), so no disk read is timed.

What it measures:

1. Training-parser throughput (images/s) as tf.data pipelines, no batching:

   * ours: records -> ``decoder.parse_example`` -> filter records without a trainable instance
     (``parsers.trainable_instances``) -> per-element stateless seed (as ``dataset_builder``
     makes it) -> ``parsers.TrainParser()`` (reference geometry: shorter side 800, longer <=
     1333, padded to 800x1344 / 1344x800, flip 0.5, BGR caffe pixels, 100 instances, 112x112
     mask crops);
   * Model Garden (tf-models-official): the same trainable records (the filter is applied once,
     untimed, before its pipeline: it pays no filter cost) ->
     ``TfExampleDecoder(include_mask=True).decode`` ->
     ``maskrcnn_input.Parser(...).parse_fn(is_training=True)`` with min_level 2, max_level 6,
     num_scales 1, aspect_ratios [0.5, 1, 2], anchor_size 8 (32 px at stride 4), RPN 0.7/0.3,
     256 anchors per image, fg 0.5, aug_rand_hflip, skip_crowd_during_training,
     max_num_instances 100, include_mask, mask_crop_size 112. It computes the RPN anchor
     targets; ours does not (they are computed in the model).

   Model Garden's geometry (``--mg_geometry``): it resizes into a fixed ``output_size`` keeping
   the aspect ratio (scale = min(out_h / h, out_w / w)) and pads to a multiple of
   2**max_level = 64; it cannot do the reference's "800, cap 1333" rule. The default
   ``oriented`` is the closest: two parsers, output_size [800, 1344] for landscape and
   [1344, 800] for portrait images (chosen per image with ``tf.cond``, our aspect grouping),
   so the resized image is the reference's up to the 1344 vs 1333 cap (e.g. 640x480 -> 800x1066
   for both), padded to 832x1344 / 1344x832 (ours 800x1344). ``800x1344`` (one parser, portrait
   images shrink to 800 high: less work for Model Garden) and ``1344x1344`` (Model Garden's
   square style: more pixels and ~450k anchors) are available for comparison.

   Each (pipeline, threads) dataset is built once; every run iterates a fresh iterator over the
   records repeated forever: ``--warmup`` images untimed (tracing, thread start-up), then
   ``--passes`` x (trainable images) timed, which is every trainable image exactly ``--passes``
   times. Threads T: ``options.threading.private_threadpool_size = T``,
   ``max_intra_op_parallelism = 1``, every map ``num_parallel_calls = T``. T = 1 is the
   per-core figure. Per run: wall images/s, process CPU ms per image (``time.process_time``,
   all threads of this process), and the load of OTHER processes on the machine in cores
   (``/proc/stat`` busy minus our CPU, over the timed window), which shows contention.

2. RPN anchor labelling as Model Garden's parser runs it, alone, on one core:
   ``anchor.build_anchor_generator(2, 6, 1, [0.5, 1, 2], 8)(image_size)`` +
   ``anchor.RpnAnchorLabeler(0.7, 0.3, 256, 0.5).label_anchors`` for an 800x1344 (landscape) or
   1344x800 (portrait) image, ~268k anchors, with each trainable image's ground-truth boxes at
   the reference resize, as a tf.data map with 1 thread (``--anchor_passes`` passes per repeat),
   in ms/image, next to our whole train parser's ms/image on one core.

Runs are interleaved (for each repeat: ours and Model Garden per thread count, order reversed on
odd repeats, then the anchor labelling); the report gives medians over ``--repeats``, all runs,
and the ratios ours / Model Garden (> 1: ours faster), as Markdown on stdout.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from machine import cpu_model, mem_total_gib, package_version
from official.vision.dataloaders import maskrcnn_input, tf_example_decoder
from official.vision.ops import anchor

from official_maskrcnn.data import decoder, parsers
from official_maskrcnn.data import preprocess_ops as ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "coco128"))
DEFAULT_IMAGE_DIR = os.path.join(DEFAULT_DATA, "train2017")
DEFAULT_ANNOTATIONS = os.path.join(DEFAULT_DATA, "annotations", "instances_train2017.json")
CONVERTER_MODULE = "tfrecord_tools.create_coco_tfrecord"

# The reference geometry and the settings both parsers share.
MIN_SIZE, MAX_SIZE, SIZE_DIVISIBILITY = 800, 1333, 32
MAX_INSTANCES, MASK_SIZE = 100, 112
SEED = 1234
# Model Garden's RPN / anchor settings closest to the reference.
MG_MIN_LEVEL, MG_MAX_LEVEL, MG_NUM_SCALES = 2, 6, 1
MG_ASPECT_RATIOS = [0.5, 1.0, 2.0]
MG_ANCHOR_SIZE = 8
RPN_MATCH, RPN_UNMATCHED, RPN_PER_IMAGE, RPN_FG_FRACTION = 0.7, 0.3, 256, 0.5
MG_GEOMETRIES = {
    "oriented": ([800, 1344], [1344, 800]),
    "800x1344": ([800, 1344], None),
    "1344x1344": ([1344, 1344], None),
}
ANCHOR_IMAGE_SIZES = {False: (800, 1344), True: (1344, 800)}  # keyed by portrait
PIPELINES = ("ours", "mg")
PIPELINE_NAMES = {"ours": "ours (`TrainParser`)", "mg": "Model Garden (`maskrcnn_input.Parser`)"}


class BenchmarkError(RuntimeError):
    """The records cannot be made or read, or a parser produced a wrong output."""


def parse_threads(text):
    """Parses a comma-separated list of positive thread counts, e.g. ``"1,2"``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad thread list {text!r}: {err}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return sorted(set(values))


def parse_args(argv):
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--file_pattern",
        default=None,
        help="Existing TFRecord shards (glob). Default: convert coco128 into a temp dir.",
    )
    parser.add_argument("--image_dir", default=DEFAULT_IMAGE_DIR, help="COCO image directory.")
    parser.add_argument(
        "--annotations_file", default=DEFAULT_ANNOTATIONS, help="COCO instances JSON."
    )
    parser.add_argument(
        "--threads", type=parse_threads, default=[1, 2], help="Thread counts, e.g. 1,2."
    )
    parser.add_argument("--passes", type=int, default=2, help="Timed passes per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per configuration.")
    parser.add_argument("--warmup", type=int, default=16, help="Untimed images per run.")
    parser.add_argument(
        "--anchor_passes", type=int, default=1, help="Timed passes of anchor labelling per repeat."
    )
    parser.add_argument(
        "--mg_geometry",
        choices=sorted(MG_GEOMETRIES),
        default="oriented",
        help="Model Garden output_size (see the module docstring).",
    )
    parser.add_argument("--json_out", default=None, help="Optional path for the raw results.")
    args = parser.parse_args(argv)
    if min(args.passes, args.repeats, args.anchor_passes) < 1 or args.warmup < 0:
        parser.error("--passes, --repeats, --anchor_passes must be >= 1 and --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def converter_command(image_dir, annotations_file, prefix):
    """The command that converts coco128 into 4 shards (the project's converter)."""
    return [
        sys.executable, "-m", CONVERTER_MODULE,
        "--image_dir", image_dir,
        "--annotations_file", annotations_file,
        "--output_prefix", prefix,
        "--num_shards", "4",
        "--num_workers", "2",
    ]


def make_records(args, tmp_dir):
    """Returns (sorted shard files, converter command or None); converts coco128 if needed."""
    if args.file_pattern:
        files = sorted(glob.glob(args.file_pattern))
        if not files:
            raise BenchmarkError(f"--file_pattern {args.file_pattern!r} matches no file")
        return files, None
    cmd = converter_command(args.image_dir, args.annotations_file, os.path.join(tmp_dir, "train"))
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchmarkError(f"conversion failed: {shlex.join(cmd)}\n{result.stderr[-4000:]}")
    files = sorted(glob.glob(os.path.join(tmp_dir, "train-*-of-*.tfrecord")))
    if not files:
        raise BenchmarkError(f"the converter wrote no shard into {tmp_dir}")
    return files, cmd


def load_records(files):
    """All serialized records of ``files`` in order, as a list of bytes."""
    return [record.numpy() for record in tf.data.TFRecordDataset(files)]


def scan_record(serialized):
    """Trainable flag, portrait flag and reference-resized trainable gt boxes of one record."""
    parsed = decoder.parse_example(serialized, include_masks=False)
    keep = parsers.trainable_instances(parsed)
    boxes, _ = ops.normalized_to_reference_boxes(
        parsed["boxes_normalized"], parsed["height"], parsed["width"]
    )
    new_h, new_w = ops.reference_output_size(parsed["height"], parsed["width"], MIN_SIZE, MAX_SIZE)
    scale_y = tf.cast(new_h, tf.float32) / tf.cast(parsed["height"], tf.float32)
    scale_x = tf.cast(new_w, tf.float32) / tf.cast(parsed["width"], tf.float32)
    boxes = ops.resize_boxes(tf.boolean_mask(boxes, keep), scale_y, scale_x)
    classes = tf.cast(tf.boolean_mask(parsed["classes"], keep), tf.float32)
    return {
        "trainable": bool(tf.reduce_any(keep)),
        "portrait": bool(parsers.is_portrait(parsed)),
        "boxes": boxes.numpy(),
        "classes": classes.numpy(),
    }


def scan_records(records):
    """Per-record scan (untimed), in record order."""
    return [scan_record(record) for record in records]


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def thread_options(threads):
    """tf.data options pinning the pipeline to ``threads`` threads, one thread per op."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


def records_dataset(records):
    """The raw serialized records, in memory, repeated forever."""
    return tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string)).repeat()


def ours_dataset(records, threads):
    """Our training pipeline, as ``dataset_builder`` chains it, without shuffle or batching."""
    train_parser = parsers.TrainParser(
        min_size=MIN_SIZE, max_size=MAX_SIZE, size_divisibility=SIZE_DIVISIBILITY,
        flip_probability=0.5, pixel_mode="bgr_caffe", max_instances=MAX_INSTANCES,
        mask_size=MASK_SIZE, include_masks=True,
    )
    parsed = records_dataset(records).map(decoder.parse_example, num_parallel_calls=threads)
    parsed = parsed.filter(lambda p: tf.reduce_any(parsers.trainable_instances(p)))
    seeded = parsed.enumerate().map(
        lambda index, p: (p, tf.stack([tf.constant(SEED, tf.int64), index])),
        num_parallel_calls=threads,
    )
    return seeded.map(train_parser, num_parallel_calls=threads).with_options(
        thread_options(threads)
    )


def mg_parser(output_size):
    """Model Garden's Mask R-CNN train parse function at its closest settings."""
    return maskrcnn_input.Parser(
        output_size=output_size,
        min_level=MG_MIN_LEVEL,
        max_level=MG_MAX_LEVEL,
        num_scales=MG_NUM_SCALES,
        aspect_ratios=MG_ASPECT_RATIOS,
        anchor_size=MG_ANCHOR_SIZE,
        rpn_match_threshold=RPN_MATCH,
        rpn_unmatched_threshold=RPN_UNMATCHED,
        rpn_batch_size_per_im=RPN_PER_IMAGE,
        rpn_fg_fraction=RPN_FG_FRACTION,
        aug_rand_hflip=True,
        skip_crowd_during_training=True,
        max_num_instances=MAX_INSTANCES,
        include_mask=True,
        mask_crop_size=MASK_SIZE,
    ).parse_fn(is_training=True)


def mg_parse_fn(geometry):
    """serialized -> Model Garden's (image, labels), per the ``--mg_geometry`` choice."""
    mg_decoder = tf_example_decoder.TfExampleDecoder(include_mask=True)
    landscape_size, portrait_size = MG_GEOMETRIES[geometry]
    landscape = mg_parser(landscape_size)
    portrait = mg_parser(portrait_size) if portrait_size else None

    def parse(serialized):
        data = mg_decoder.decode(serialized)
        if portrait is None:
            return landscape(data)
        return tf.cond(
            data["height"] >= data["width"], lambda: portrait(data), lambda: landscape(data)
        )

    return parse


def mg_dataset(trainable_records, threads, geometry):
    """Model Garden's decoder + train parser over the trainable records (pre-filtered)."""
    parse = mg_parse_fn(geometry)
    return (
        records_dataset(trainable_records)
        .map(parse, num_parallel_calls=threads)
        .with_options(thread_options(threads))
    )


def anchor_label_fn(image_size):
    """(padded boxes, padded classes, count) -> Model Garden's RPN score and box targets.

    Both target dicts are returned, as its parser returns them, so that no part of the labelling
    can be pruned from the graph as unused.
    """
    generator = anchor.build_anchor_generator(
        min_level=MG_MIN_LEVEL, max_level=MG_MAX_LEVEL, num_scales=MG_NUM_SCALES,
        aspect_ratios=MG_ASPECT_RATIOS, anchor_size=MG_ANCHOR_SIZE,
    )
    labeler = anchor.RpnAnchorLabeler(RPN_MATCH, RPN_UNMATCHED, RPN_PER_IMAGE, RPN_FG_FRACTION)

    def label(boxes, classes, count):
        anchor_boxes = generator(image_size=image_size)
        return labeler.label_anchors(
            anchor_boxes, boxes[:count], tf.expand_dims(classes[:count], -1)
        )

    return label


def anchor_dataset(scans):
    """Anchor labelling of every trainable image on one thread, repeated forever."""
    datasets = []
    for portrait in (False, True):
        group = [s for s in scans if s["trainable"] and s["portrait"] == portrait]
        if not group:
            continue
        boxes = np.full([len(group), MAX_INSTANCES, 4], -1.0, np.float32)
        classes = np.full([len(group), MAX_INSTANCES], -1.0, np.float32)
        counts = np.zeros([len(group)], np.int32)
        for i, scan in enumerate(group):
            count = min(len(scan["boxes"]), MAX_INSTANCES)
            boxes[i, :count], classes[i, :count], counts[i] = (
                scan["boxes"][:count], scan["classes"][:count], count
            )
        data = tf.data.Dataset.from_tensor_slices((boxes, classes, counts))
        datasets.append(data.map(anchor_label_fn(ANCHOR_IMAGE_SIZES[portrait])))
    dataset = datasets[0] if len(datasets) == 1 else datasets[0].concatenate(datasets[1])
    return dataset.repeat().with_options(thread_options(1))


def num_anchors(image_size):
    """How many anchors Model Garden's generator makes for ``image_size``."""
    generator = anchor.build_anchor_generator(
        min_level=MG_MIN_LEVEL, max_level=MG_MAX_LEVEL, num_scales=MG_NUM_SCALES,
        aspect_ratios=MG_ASPECT_RATIOS, anchor_size=MG_ANCHOR_SIZE,
    )
    return int(sum(int(tf.size(level)) // 4 for level in generator(image_size).values()))


# --------------------------------------------------------------------------------------------
# Output checks (warm-up elements only, untimed)
# --------------------------------------------------------------------------------------------


def check_ours(element):
    """Raises BenchmarkError if one of our parser's outputs has a wrong shape or values."""
    shape = tuple(element["images"].shape)
    expected = {(800, 1344, 3), (1344, 800, 3)}
    if shape not in expected:
        raise BenchmarkError(f"ours: images shape {shape}, expected one of {sorted(expected)}")
    classes = element["gt_classes"].numpy()
    boxes = element["gt_boxes"].numpy()[classes > 0]
    masks = element["gt_masks"].numpy()[classes > 0]
    new_h, new_w = element["image_size"].numpy()
    problems = []
    if not len(boxes):
        problems.append("no ground-truth box")
    if element["gt_masks"].shape[1:] != (MASK_SIZE, MASK_SIZE):
        problems.append(f"gt_masks shape {element['gt_masks'].shape}")
    if len(boxes) and (boxes.min() < 0 or boxes[:, 2].max() > new_h or boxes[:, 3].max() > new_w):
        problems.append(f"boxes outside the {new_h}x{new_w} image")
    if len(masks) and (masks.min() < 0.0 or masks.max() > 1.0 or masks.max() == 0.0):
        problems.append("masks not in [0, 1] or all zero")
    if problems:
        raise BenchmarkError(f"ours: source_id {int(element['source_id'])}: {problems}")


def check_mg(element):
    """Raises BenchmarkError if Model Garden's output does not have its expected shapes."""
    image, labels = element
    if image.shape[0] % 64 or image.shape[1] % 64 or image.shape[2] != 3:
        raise BenchmarkError(f"mg: images shape {tuple(image.shape)}")
    if labels["gt_masks"].shape != (MAX_INSTANCES, MASK_SIZE, MASK_SIZE):
        raise BenchmarkError(f"mg: gt_masks shape {tuple(labels['gt_masks'].shape)}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def machine_busy_s():
    """Seconds of busy CPU (all cores, user + system + irq + steal...) from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_dataset(dataset, warmup, count, check=None):
    """Iterates a fresh iterator: ``warmup`` elements (checked) untimed, then ``count`` timed."""
    iterator = iter(dataset)
    for _ in range(warmup):
        element = next(iterator)
        if check is not None:
            check(element)
    busy0, cpu0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(count):
        next(iterator)
    wall1, cpu1, busy1 = time.perf_counter(), time.process_time(), machine_busy_s()
    del iterator
    wall, cpu = wall1 - wall0, cpu1 - cpu0
    return {
        "images": count,
        "wall_s": wall,
        "images_per_s": count / wall,
        "wall_ms_per_image": 1000.0 * wall / count,
        "cpu_ms_per_image": 1000.0 * cpu / count,
        "own_cores": cpu / wall,
        "other_load_cores": max(0.0, (busy1 - busy0 - cpu) / wall),
    }


def build_datasets(args, records, scans):
    """The (pipeline, threads) datasets and the anchor dataset, each traced once."""
    trainable = [record for record, scan in zip(records, scans) if scan["trainable"]]
    datasets = {}
    for threads in args.threads:
        datasets[("ours", threads)] = ours_dataset(records, threads)
        datasets[("mg", threads)] = mg_dataset(trainable, threads, args.mg_geometry)
    return datasets, anchor_dataset(scans)


def run_all(args, datasets, anchors, num_images):
    """Runs every configuration ``args.repeats`` times, interleaved; returns the raw runs."""
    runs = {key: [] for key in datasets}
    runs["anchors"] = []
    checks = {"ours": check_ours, "mg": check_mg}
    for repeat in range(args.repeats):
        for threads in args.threads:
            order = PIPELINES[::-1] if repeat % 2 else PIPELINES
            for pipeline in order:
                result = time_dataset(
                    datasets[(pipeline, threads)], args.warmup, args.passes * num_images,
                    checks[pipeline],
                )
                runs[(pipeline, threads)].append(result)
                log_run(repeat, args.repeats, f"{pipeline} x{threads}", result)
        result = time_dataset(anchors, args.warmup, args.anchor_passes * num_images)
        runs["anchors"].append(result)
        log_run(repeat, args.repeats, "anchors x1", result)
    return runs


def log_run(repeat, repeats, name, result):
    """One progress line on stderr."""
    print(
        f"[{repeat + 1}/{repeats}] {name:<11} {result['images_per_s']:7.2f} img/s "
        f"{result['cpu_ms_per_image']:7.1f} CPU ms/img, other load "
        f"{result['other_load_cores']:.2f} cores",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------------------------

SUMMARY_KEYS = (
    "images_per_s",
    "wall_ms_per_image",
    "cpu_ms_per_image",
    "own_cores",
    "other_load_cores",
)


def summarize(runs):
    """Median over repeats of each metric, per configuration."""
    summary = {}
    for key, results in runs.items():
        summary[key] = {name: statistics.median(r[name] for r in results) for name in SUMMARY_KEYS}
        summary[key]["images_per_s_all"] = [r["images_per_s"] for r in results]
        summary[key]["other_load_max"] = max(r["other_load_cores"] for r in results)
    return summary


def ratio_rows(summary, threads_list):
    """Ours / Model Garden per thread count: images/s ratio and CPU-per-image ratio."""
    rows = []
    for threads in threads_list:
        ours, peer = summary[("ours", threads)], summary[("mg", threads)]
        rows.append(
            {
                "threads": threads,
                "ours_images_per_s": ours["images_per_s"],
                "mg_images_per_s": peer["images_per_s"],
                "speed_ratio": ours["images_per_s"] / peer["images_per_s"],
                "ours_cpu_ms": ours["cpu_ms_per_image"],
                "mg_cpu_ms": peer["cpu_ms_per_image"],
                "cpu_ratio": peer["cpu_ms_per_image"] / ours["cpu_ms_per_image"],
            }
        )
    return rows


def machine_info():
    """Machine and software description."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tensorflow": package_version("tensorflow"),
        "tf-models-official": package_version("tf-models-official"),
        "numpy": package_version("numpy"),
    }


def machine_line(machine):
    """The report's machine line."""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"{machine['mem_total_gib']} GiB RAM, Linux {machine['kernel']}; Python "
        f"{machine['python']}, tensorflow {machine['tensorflow']}, tf-models-official "
        f"{machine['tf-models-official']}, numpy {machine['numpy']}."
    )


def throughput_table(args, summary):
    """Markdown rows of the per-configuration table."""
    lines = [
        "| pipeline | threads | images/s (median) | images/s (all runs) | wall ms/img "
        "| CPU ms/img | own cores | other load, cores (median / max) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for threads in args.threads:
        for pipeline in PIPELINES:
            row = summary[(pipeline, threads)]
            all_runs = ", ".join(f"{value:.2f}" for value in row["images_per_s_all"])
            lines.append(
                f"| {PIPELINE_NAMES[pipeline]} | {threads} | {row['images_per_s']:.2f} "
                f"| {all_runs} | {row['wall_ms_per_image']:.1f} | {row['cpu_ms_per_image']:.1f} "
                f"| {row['own_cores']:.2f} | {row['other_load_cores']:.2f} / "
                f"{row['other_load_max']:.2f} |"
            )
    return lines


def ratio_table(rows):
    """Markdown rows of the ratio table."""
    lines = [
        "| threads | ours images/s | MG images/s | speed ratio ours/MG | ours CPU ms/img "
        "| MG CPU ms/img | CPU ratio MG/ours |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['threads']} | {row['ours_images_per_s']:.2f} | {row['mg_images_per_s']:.2f} "
            f"| **{row['speed_ratio']:.2f}** | {row['ours_cpu_ms']:.1f} | {row['mg_cpu_ms']:.1f} "
            f"| {row['cpu_ratio']:.2f} |"
        )
    return lines


def anchor_lines(summary, info):
    """The anchor-labelling paragraph: its cost next to our parser's, both on one core."""
    anchors = summary["anchors"]
    ours = summary.get(("ours", 1))
    all_runs = ", ".join(f"{1000.0 / value:.1f}" for value in anchors["images_per_s_all"])
    line = (
        f"RPN anchor labelling (Model Garden's `build_anchor_generator` + "
        f"`RpnAnchorLabeler.label_anchors`, {info['anchors_landscape']:,} anchors for 800x1344 / "
        f"{info['anchors_portrait']:,} for 1344x800, {info['gt_boxes']} gt boxes over "
        f"{info['num_images']} images, 1 thread): **{anchors['wall_ms_per_image']:.1f} ms/image** "
        f"(CPU {anchors['cpu_ms_per_image']:.1f} ms; runs: {all_runs} ms)"
    )
    if ours is not None:
        line += (
            f" vs our whole train parser on 1 thread: **{ours['wall_ms_per_image']:.1f} "
            f"ms/image** (CPU {ours['cpu_ms_per_image']:.1f} ms): anchor labelling = "
            f"{anchors['wall_ms_per_image'] / ours['wall_ms_per_image']:.2f}x our parser."
        )
    return [line]


def markdown_report(args, machine, info, summary, rows, commands):
    """Builds the Markdown report."""
    lines = [
        f"### Training input pipeline: ours vs tf-models-official ({machine['date_utc']})",
        "",
        machine_line(machine),
        "",
        f"Records: {info['num_records']} records in {info['num_files']} shard(s), "
        f"{info['num_images']} with a trainable instance (both pipelines process exactly those). "
        f"Per run: {args.warmup} warm-up images untimed, then {args.passes} pass(es) = "
        f"{args.passes * info['num_images']} images timed; no batching; records in memory. "
        f"Threads T: private tf.data thread pool of T, intra-op 1, num_parallel_calls T. "
        f"Model Garden geometry `{args.mg_geometry}` (output_size "
        f"{MG_GEOMETRIES[args.mg_geometry]}; landscape, portrait), with RPN anchor targets; ours "
        f"resizes to the reference (800, max 1333) and pads to 800x1344 / 1344x800, without them. "
        f"Median of {args.repeats} interleaved run(s). CPU ms/img = this process's CPU time "
        f"(all threads) / images; other load = machine busy cores minus ours (contention).",
        "",
    ]
    lines += throughput_table(args, summary)
    lines += ["", "Ratios (speed > 1 and CPU ratio > 1: ours faster / cheaper):", ""]
    lines += ratio_table(rows)
    lines += [""] + anchor_lines(summary, info)
    lines += ["", "Commands (cwd = repository root):", "", "```sh"] + commands + ["```"]
    return "\n".join(lines)


def json_key(key):
    """A JSON-friendly name for a configuration key."""
    return key if isinstance(key, str) else f"{key[0]}_x{key[1]}"


def write_json(path, args, machine, info, runs, summary, rows):
    """Writes the raw runs and the summary."""
    raw = {
        "machine": machine,
        "args": vars(args),
        "info": info,
        "runs": {json_key(key): value for key, value in runs.items()},
        "summary": {json_key(key): value for key, value in summary.items()},
        "ratios": rows,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(raw, handle, indent=2)


def display(path):
    """``path`` relative to the repository root when it is inside or next to it."""
    rel = os.path.relpath(os.path.abspath(path), REPO_ROOT)
    return path if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def bench_command(argv):
    """The benchmark's own command line as run from the repository root."""
    return shlex.join([display(sys.executable), "benchmarks/bench_input_pipeline.py", *argv])


def prepare(args, tmp_dir):
    """Records, scans and the info block (all untimed)."""
    files, convert_cmd = make_records(args, tmp_dir)
    records = load_records(files)
    scans = scan_records(records)
    num_images = sum(scan["trainable"] for scan in scans)
    if not num_images:
        raise BenchmarkError("no record has a trainable instance")
    info = {
        "num_files": len(files),
        "num_records": len(records),
        "num_images": num_images,
        "gt_boxes": int(sum(len(scan["boxes"]) for scan in scans if scan["trainable"])),
        "anchors_landscape": num_anchors(ANCHOR_IMAGE_SIZES[False]),
        "anchors_portrait": num_anchors(ANCHOR_IMAGE_SIZES[True]),
    }
    return records, scans, info, convert_cmd


def main(argv=None):
    """Runs the benchmark and prints the Markdown report; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    tmp_dir = tempfile.mkdtemp(prefix="bench_input_pipeline_")
    try:
        start = time.perf_counter()
        records, scans, info, convert_cmd = prepare(args, tmp_dir)
        datasets, anchors = build_datasets(args, records, scans)
        print(f"setup: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        machine = machine_info()
        runs = run_all(args, datasets, anchors, info["num_images"])
    except (BenchmarkError, tf.errors.OpError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    summary = summarize(runs)
    rows = ratio_rows(summary, args.threads)
    commands = [bench_command(argv)]
    if convert_cmd:
        commands.append(
            "# records, converted untimed into a temporary directory:\n"
            + shlex.join([display(convert_cmd[0])] + convert_cmd[1:])
        )
    print(markdown_report(args, machine, info, summary, rows, commands))
    if args.json_out:
        write_json(args.json_out, args, machine, info, runs, summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
