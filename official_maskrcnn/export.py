r"""A trained model as a SavedModel for serving: images in, COCO-ready detections out.

    python -m official_maskrcnn.export --gin_file F --checkpoint C --export_dir E \
        [--input_type image_bytes|image_tensor|tf_example] [--batch_size N|dynamic] \
        [--score_threshold S] [--max_detections K] [--overwrite] [--gin_param B ...]

Uses the training config (F, plus `--gin_param`) as `predict` does: the model, the eval
preprocessing and, for the label map, the run's `label_map.json` beside C, else
`run.eval_annotations_file` (optional; `predictor.run_label_map`). C is a checkpoint
prefix or a folder (its newest readable checkpoint).

E gets a SavedModel whose `serving_default` signature takes one input, `inputs`:
  image_bytes   [B] string: encoded JPEG or PNG images of any sizes (the default);
  image_tensor  [B, H, W, 3] uint8 RGB (one size per call);
  tf_example    [B] string: serialized tf.Examples with the converter's `image/encoded`;
with B fixed by --batch_size or any ("dynamic", the default). Everything runs in the graph
(`inference.serving`): decoding, the evaluation's preprocessing, the model, boxes and masks mapped
to the original pixels with the reference's rules. Outputs, per image, slots beyond
num_detections zero:
  detection_boxes        [B, K, 4] float32 [ymin, xmin, ymax, xmax], original pixels, inclusive;
  detection_scores       [B, K] float32, decreasing;
  detection_classes      [B, K] int32 COCO category ids (labels without a label map);
  num_detections         [B] int32;
  detection_masks        [B, K, 28, 28] float32 mask probabilities over each box;
  detection_masks_image  [B, K, Hm, Wm] uint8 pasted binary masks (Hm, Wm: the batch's largest
                         original image; image i's are [:, :H_i, :W_i]);
  original_size          [B, 2] int32 (H_i, W_i).
Beside the model, in E/assets: label_map.json ([{label, id, name}], the model's labels and their
category ids and names), config.gin (the parsed config) and export.json (these arguments and the
checkpoint); `predict --saved_model E` reads them. The SavedModel is written to a
temporary folder and moved into place, so a failed export leaves no half-written E.

Exit codes: 0 exported; 1 a bad argument, checkpoint or config (the message says which).
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import json
import os
import shutil
import sys
import tempfile
import time

import gin
import tensorflow as tf
from absl import app, flags

from official_maskrcnn import runtime
from official_maskrcnn.inference import exported_model
from official_maskrcnn.inference import predictor as predictor_lib
from official_maskrcnn.inference import serving
from official_maskrcnn.inference.image_files import PredictError

FLAGS = flags.FLAGS  # --gin_file, --gin_param, --checkpoint: defined in `runtime`
flags.DEFINE_string("export_dir", None, "Where the SavedModel goes (must not exist, see "
                    "--overwrite).")
flags.DEFINE_enum("input_type", "image_bytes", list(serving.INPUT_TYPES),
                  "What the serving signature takes.")
flags.DEFINE_string("batch_size", "dynamic", "Images per call: a positive int, or 'dynamic'.")
# --score_threshold (default here 0.05, the model's own) and --max_detections (at most the
# model's build_maskrcnn_model.max_detections): defined in `runtime`, shared with `predict`.
DEFAULT_SCORE_THRESHOLD = 0.05
flags.DEFINE_boolean("overwrite", False, "Replace an existing --export_dir.")

# The asset names: exported_model.LABEL_MAP_FILE, CONFIG_FILE, EXPORT_FILE (what predict reads).
ASSET_FILES = (exported_model.LABEL_MAP_FILE, exported_model.CONFIG_FILE,
               exported_model.EXPORT_FILE)


class ExportError(PredictError):
    """A bad argument, checkpoint or config of the export; the message says which."""


def parse_batch_size(value):
    """'dynamic' -> None; a positive int (or its text) -> int; ExportError otherwise."""
    if value is None or str(value).strip().lower() == "dynamic":
        return None
    try:
        size = int(str(value))
    except ValueError:
        size = 0
    if size < 1:
        raise ExportError(f"--batch_size must be a positive integer or 'dynamic', found "
                          f"{value!r}")
    return size


def label_map_entries(class_names, label_to_category):
    """[{label, id, name}] for the model's labels 1..K-1 (label_map.json)."""
    return [{"label": int(label), "id": int(label_to_category[label]), "name": name}
            for label, name in sorted(class_names.items())]


class _ExportModule(tf.Module):
    """What the SavedModel tracks: the server (its model's variables) and the assets."""

    def __init__(self, server, asset_paths):
        super().__init__(name="export")
        self.server = server
        self.assets = {name: tf.saved_model.Asset(path) for name, path in asset_paths.items()}


def export(export_dir, checkpoint, input_type="image_bytes", batch_size=None,
           score_threshold=0.05, max_detections=100, overwrite=False, settings=None,
           stream=sys.stdout):
    """Runs the command on the parsed gin config; returns the export folder.

    Raises:
      ExportError / PredictError: bad arguments, checkpoint, annotations or config, before
        anything is written.
    """
    if not export_dir:
        raise ExportError("--export_dir is required")
    if input_type not in serving.INPUT_TYPES:
        raise ExportError(f"--input_type must be one of {serving.INPUT_TYPES}, found "
                          f"{input_type!r}")
    batch_size = parse_batch_size(batch_size)
    if not 0.0 <= score_threshold <= 1.0:
        raise ExportError(f"--score_threshold must be in [0, 1], found {score_threshold}")
    if tf.io.gfile.exists(export_dir) and not overwrite:
        raise ExportError(f"--export_dir {export_dir} exists; pass --overwrite to replace it")
    settings = settings or runtime.run_settings()
    candidates = predictor_lib.resolve_checkpoint(checkpoint)
    parser = predictor_lib.eval_preprocessing()
    label_map = predictor_lib.run_label_map(checkpoint, settings.eval_annotations_file)
    started = time.perf_counter()
    model, restored = predictor_lib.restore_model(candidates, settings.precision)
    class_names, label_to_category = predictor_lib.class_maps(label_map,
                                                              model.settings.num_classes)
    category_ids = [0] + [label_to_category[label]
                          for label in range(1, model.settings.num_classes)]
    try:
        server = serving.DetectionServer(model, parser, category_ids, score_threshold,
                                         max_detections)
    except ValueError as e:
        raise ExportError(f"--max_detections: {e}") from e

    parent = os.path.dirname(os.path.abspath(export_dir))
    tf.io.gfile.makedirs(parent)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        asset_dir = os.path.join(staging, "assets-in")
        os.makedirs(asset_dir)
        assets = {name: os.path.join(asset_dir, name)
                  for name in ASSET_FILES}
        with open(assets[exported_model.LABEL_MAP_FILE], "w", encoding="utf-8") as f:
            json.dump(label_map_entries(class_names, label_to_category), f, indent=1)
        with open(assets[exported_model.CONFIG_FILE], "w", encoding="utf-8") as f:
            f.write(gin.config_str())
        with open(assets[exported_model.EXPORT_FILE], "w", encoding="utf-8") as f:
            json.dump({"input_type": input_type, "batch_size": batch_size,
                       "score_threshold": score_threshold, "max_detections": max_detections,
                       "checkpoint": restored}, f, indent=1)
        module = _ExportModule(server, assets)
        serve = server.serving_function(input_type, batch_size)
        saved = os.path.join(staging, "saved_model")
        tf.saved_model.save(module, saved,
                            signatures={"serving_default": serve.get_concrete_function()})
        previous = os.path.join(staging, "previous")
        if tf.io.gfile.exists(export_dir):
            os.replace(export_dir, previous)  # deleted with the staging folder once replaced
        try:
            os.replace(saved, export_dir)
        except OSError:
            if os.path.exists(previous):
                os.replace(previous, export_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {restored} ({input_type}, batch {batch_size or 'dynamic'}, score >= "
          f"{score_threshold}, at most {max_detections} detections) to {export_dir} in "
          f"{time.perf_counter() - started:.1f} s", file=stream, flush=True)
    return export_dir


def run_command(gin_files, gin_params, checkpoint, export_dir, input_type="image_bytes",
                batch_size="dynamic", score_threshold=0.05, max_detections=100, overwrite=False,
                stdout=sys.stdout, stderr=sys.stderr):
    """The CLI after flag parsing: parses gin, exports; returns the exit code (0 or 1)."""
    try:
        if not gin_files:
            raise ExportError("give at least one --gin_file (the training config)")
        runtime.parse_gin(gin_files, gin_params)
        export(export_dir, checkpoint, input_type, batch_size, score_threshold, max_detections,
               overwrite, stream=stdout)
    except (PredictError, *runtime.INPUT_ERRORS) as e:
        print(f"error: {e}", file=stderr, flush=True)
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(1)
    sys.exit(run_command(FLAGS.gin_file, FLAGS.gin_param, FLAGS.checkpoint, FLAGS.export_dir,
                         FLAGS.input_type, FLAGS.batch_size,
                         runtime.flag_or(FLAGS.score_threshold, DEFAULT_SCORE_THRESHOLD),
                         FLAGS.max_detections, FLAGS.overwrite))


if __name__ == "__main__":
    app.run(main)
