"""Benchmark: the serving export of the benchmark's model (`configs/mlperf_r50_fpn.gin`, ResNet-50
FPN, 81 classes, 800 / 1333 resize): export time, SavedModel size, and latency per image of the
SavedModel against the in-framework `predict` path on the same coco128 images, in one run.

Exact command (from the repository root, after `make install`)::

    .venv/bin/python benchmarks/bench_export.py --images 6 --repeats 5

The model has random weights (R-50.pkl cannot be downloaded here), so its detection score
threshold is set to 0 (`build_maskrcnn_model.detection_score_threshold = 0.0`) and every image
gets the full 100 detections with their masks: the most pasting work a request can ask for.
`--images` coco128 images (alternating landscape and portrait) are served one per call:
- in-framework: `Predictor` (the traced model call), `select_detections`, `image_detections`
  (boxes to original pixels, masks pasted by the C paster, COCO results with RLE), as `predict`;
- SavedModel: `serving_default(inputs=[jpeg bytes])` in this process (decode, preprocessing,
  model, in-graph paste of 100 full-image masks), outputs to numpy.
Each image once per repeat, the two paths interleaved; the medians over all calls after a warm-up
call per orientation.
"""

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from machine import cpu_model, package_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128 = os.path.join(os.path.dirname(REPO), "shared", "data", "coco128")
CONFIG = os.path.join(REPO, "configs", "mlperf_r50_fpn.gin")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def pick_images(count):
    """coco128 JPEG paths, landscape and portrait alternating."""
    from PIL import Image
    folder = os.path.join(COCO128, "train2017")
    groups = {False: [], True: []}
    for name in sorted(os.listdir(folder)):
        width, height = Image.open(os.path.join(folder, name)).size
        groups[height >= width].append(os.path.join(folder, name))
    return [groups[i % 2 == 1][i // 2] for i in range(count)]


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def main(argv):
    args = parse_args(argv)
    import tensorflow as tf

    from official_maskrcnn import export, runtime
    from official_maskrcnn.inference import image_files
    from official_maskrcnn.inference import predictor as predictor_lib

    annotations = os.path.join(COCO128, "annotations", "instances_train2017.json")
    runtime.parse_gin([CONFIG], ["build_maskrcnn_model.backbone_checkpoint = None",
                                 "build_maskrcnn_model.detection_score_threshold = 0.0",
                                 f"run.eval_annotations_file = '{annotations}'"])
    tmp = tempfile.mkdtemp()
    try:
        tf.random.set_seed(0)
        model = runtime.build_model(tf.distribute.get_strategy(), "float32")
        checkpoint = tf.train.Checkpoint(model=model).save(os.path.join(tmp, "model", "ckpt"))
        export_dir = os.path.join(tmp, "export")
        start = time.perf_counter()
        export.export(export_dir, checkpoint, score_threshold=0.0, stream=open(os.devnull, "w"))
        export_seconds = time.perf_counter() - start
        size = directory_bytes(export_dir)
        variables = directory_bytes(os.path.join(export_dir, "variables"))

        serve = tf.saved_model.load(export_dir).signatures["serving_default"]
        label_map = predictor_lib.load_label_map(annotations)
        _, label_to_category = predictor_lib.class_maps(label_map, model.settings.num_classes)
        predictor = predictor_lib.Predictor(model, predictor_lib.eval_preprocessing())
        paths = pick_images(args.images)
        encoded = [image_files.read_image_bytes(path)[0] for path in paths]

        def in_framework(i):
            image = image_files.decode_image(encoded[i], "jpeg", paths[i])
            outputs = predictor(image)
            keep = predictor_lib.select_detections(outputs, 0.0, 100)
            return len(predictor_lib.image_detections(outputs, keep, 1, label_to_category)
                       ["results"])

        def saved_model(i):
            outputs = {key: value.numpy() for key, value in
                       serve(inputs=tf.constant([encoded[i]])).items()}
            return int(outputs["num_detections"][0])

        variants = {"in-framework predict": in_framework, "SavedModel": saved_model}
        for warm in range(min(2, len(paths))):  # one per orientation: tracing
            for fn in variants.values():
                fn(warm)
        seconds = {name: [] for name in variants}
        detections = {}
        for repeat in range(args.repeats):
            for i in range(len(paths)):
                order = list(variants) if (repeat + i) % 2 == 0 else list(reversed(variants))
                for name in order:
                    start = time.perf_counter()
                    detections[name, i] = variants[name](i)
                    seconds[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### Serving export of configs/mlperf_r50_fpn.gin\n\nCommand: `.venv/bin/python "
          f"benchmarks/bench_export.py {' '.join(argv)}`\n\nMachine ({date}): {cpu_model()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, Linux {platform.release()}; Python "
          f"{platform.python_version()}, tensorflow {package_version('tensorflow')}.\n")
    print(f"Export: {export_seconds:.1f} s (restore, trace, save); SavedModel "
          f"{size / 2**20:.1f} MiB, of which variables {variables / 2**20:.1f} MiB.\n")
    counts = sorted({v for v in detections.values()})
    print(f"Latency per image ({len(paths)} coco128 images, {args.repeats} repeats, detections "
          f"per image {counts}):\n\n| path | median s / image | min | max |\n|---|---:|---:|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
              f"{max(values):.3f} |")
    ratio = statistics.median(seconds["SavedModel"]) / statistics.median(
        seconds["in-framework predict"])
    print(f"\nSavedModel / in-framework: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
