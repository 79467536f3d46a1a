r"""Detections and pictures for image files, from a checkpoint and the training config.

    python -m official_maskrcnn.predict --gin_file F --checkpoint C --output_dir O \
        [--score_threshold 0.5] [--max_detections 100] [--gin_param B ...] IMAGE...
    python -m official_maskrcnn.predict --saved_model E --output_dir O [...] IMAGE...

Uses the training config (F, plus `--gin_param`): the model (`build_maskrcnn_model`,
`run.precision`), the eval preprocessing (`DatasetBuilder.min_size`, `max_size`,
`size_divisibility`, `pixel_mode`, unscoped or in the `eval/` scope, as the eval parser gets
them). Class names and category ids come from the run's `label_map.json` beside C (training
saves it, `data/label_maps.py`; checked against `run.eval_annotations_file` when that file
exists), else from `run.eval_annotations_file`'s categories; without either a class is named
"class <label>" and its category_id is the label (1..K-1). A config that leaves
`build_maskrcnn_model.num_classes` unset takes it from that label map. C is a checkpoint
prefix (`.../ckpt-<step>`) or a folder (its newest readable checkpoint: an unreadable newest one
falls back to the previous one with a warning, as training does); only the model is restored.

With --saved_model E (an export of `official_maskrcnn.export`) the exported graph does all of
the below instead of the checkpoint and config (class names and category ids from E's
label_map.json; its own score threshold and detection cap apply first).

Each image (JPEG or PNG; grayscale and RGBA are converted to RGB) is resized, normalised and
padded exactly as the eval parser does, run through the model's inference call (one traced
function per padded shape), and its detections are mapped back to the original pixels with the
reference's semantics (`coco_results`: boxes / scale, masks pasted by `paste_masks`). A detection
is kept when its score is >= --score_threshold (on top of the model's own
`detection_score_threshold`, 0.05), at most --max_detections per image, highest scores first
(the model returns at most `build_maskrcnn_model.max_detections`, 100).

Writes into O:
  <image stem>.png   the original image with each kept detection drawn: its mask blended in a
                     colour of a fixed palette (alpha 0.45), its box outline and "name 0.87";
  predictions.json   the kept detections in COCO result format (image_id, category_id, bbox
                     [x, y, w, h] in original pixels with the reference's w = x2 - x1 + 1,
                     score, segmentation as RLE with 'counts' a str), which pycocotools'
                     `COCO.loadRes` reads;
  images.json        {image_id: absolute image path}.
and prints one line per image (detections kept, the picture's path).

Image ids: when every input's file stem is a number (COCO style, `000000000139.jpg` -> 139) and
no two are equal, the ids are those numbers, so predictions.json can be scored against the COCO
annotations; otherwise every image gets its 1-based position on the command line (mixing the
two rules could give two images the same id).

Inputs are checked before the model is built: every path must be a readable JPEG or PNG that
decodes, the output names must be distinct and must not overwrite an input; otherwise nothing is
written and the error lists every bad path.

Exit codes: 0 done; 1 a bad image, checkpoint, config or argument (the message says which).
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import io
import json
import os
import sys

import tensorflow as tf
from absl import app, flags
from PIL import Image

from official_maskrcnn import runtime, visualization
from official_maskrcnn.inference import exported_model, image_files
from official_maskrcnn.inference import predictor as predictor_lib
from official_maskrcnn.inference.image_files import PredictError

FLAGS = flags.FLAGS  # --gin_file, --gin_param, --checkpoint: defined in `runtime`
flags.DEFINE_string("output_dir", None, "Where the pictures, predictions.json and images.json go.")
# --score_threshold (default here 0.5) and --max_detections: defined in `runtime`, shared with
# `export`.
DEFAULT_SCORE_THRESHOLD = 0.5
flags.DEFINE_string("saved_model", None, "An export of `official_maskrcnn.export` to run instead "
                    "of --checkpoint and --gin_file.")

PREDICTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"


def draw(image, detections, class_names):
    """The picture: the highest-scoring detection drawn last (on top), colours by rank."""
    return visualization.draw_scored_detections(
        image, detections["boxes_xyxy"], detections["masks"], detections["labels"],
        detections["scores"], class_names)


def write_png(path, image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def write_json(path, value):
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f)


# ------------------------------------------------------------------ the command

def predict(image_paths, output_dir, checkpoint, score_threshold=0.5, max_detections=100,
            settings=None, stream=sys.stdout):
    """Runs the command on the parsed gin config; returns the COCO results (all images).

    Args:
      image_paths: image files (JPEG / PNG).
      output_dir: created; receives the pictures, predictions.json and images.json.
      checkpoint: a checkpoint prefix or a folder (its newest readable checkpoint).
      score_threshold, max_detections: which detections are kept (module docstring).
      settings: a `runtime.RunSettings` (default: the one of the parsed gin config).
      stream: where the per-image lines go.
    Raises:
      PredictError: bad arguments, inputs, checkpoint or annotations; raised before anything
        is written.
    """
    _check_arguments(output_dir, score_threshold, max_detections)
    settings = settings or runtime.run_settings()
    candidates = predictor_lib.resolve_checkpoint(checkpoint)
    parser = predictor_lib.eval_preprocessing()
    label_map = predictor_lib.run_label_map(checkpoint, settings.eval_annotations_file)
    inputs = image_files.check_inputs(list(image_paths), output_dir)
    runtime.set_graph_rewrites(settings)
    model, _ = predictor_lib.restore_model(candidates, settings.precision)
    class_names, label_to_category = predictor_lib.class_maps(label_map,
                                                              model.settings.num_classes)
    predictor = predictor_lib.Predictor(model, parser)

    def detect(unused_encoded, image, image_id):
        outputs = predictor(image)
        keep = predictor_lib.select_detections(outputs, score_threshold, max_detections)
        return predictor_lib.image_detections(outputs, keep, image_id, label_to_category)

    return _write_predictions(inputs, output_dir, detect, class_names, stream)


def predict_saved_model(image_paths, output_dir, saved_model, score_threshold=0.5,
                        max_detections=100, stream=sys.stdout):
    """`predict` with an exported SavedModel (`official_maskrcnn.export`) instead of a
    checkpoint and config: the same pictures and files; class names and category ids from the
    export's label map. Returns the COCO results (all images).

    Raises:
      PredictError: bad arguments, inputs or export; raised before anything is written.
    """
    _check_arguments(output_dir, score_threshold, max_detections)
    inputs = image_files.check_inputs(list(image_paths), output_dir)
    exported = exported_model.ExportedModel(saved_model)

    def detect(encoded, image, image_id):
        return exported(encoded, image.numpy(), image_id, score_threshold, max_detections)

    return _write_predictions(inputs, output_dir, detect, exported.class_names, stream)


def _check_arguments(output_dir, score_threshold, max_detections):
    if not 0.0 <= score_threshold <= 1.0:
        raise PredictError(f"--score_threshold must be in [0, 1], found {score_threshold}")
    if max_detections < 1:
        raise PredictError(f"--max_detections must be >= 1, found {max_detections}")
    if not output_dir:
        raise PredictError("--output_dir is required")


def _write_predictions(inputs, output_dir, detect, class_names, stream):
    """Runs detect(encoded bytes, [H, W, 3] uint8 image, image_id) -> detections
    (`predictor.image_detections`' dict, labels keyed like class_names) on every checked input;
    writes the pictures, predictions.json and images.json; returns all COCO results."""
    tf.io.gfile.makedirs(output_dir)
    all_results = []
    for item in inputs:
        encoded, _ = image_files.read_image_bytes(item.path)
        image = image_files.decode_image(encoded, item.image_format, item.path)
        detections = detect(encoded, image, item.image_id)
        write_png(item.picture_path, draw(image.numpy(), detections, class_names))
        all_results.extend(detections["results"])
        print(f"{item.path}: image_id {item.image_id}, {len(detections['scores'])} detection(s) "
              f"kept -> {item.picture_path}", file=stream, flush=True)
    write_json(os.path.join(output_dir, PREDICTIONS_FILE), all_results)
    write_json(os.path.join(output_dir, IMAGES_FILE),
               {str(item.image_id): os.path.abspath(item.path) for item in inputs})
    print(f"wrote {len(all_results)} detection(s) of {len(inputs)} image(s) to "
          f"{os.path.join(output_dir, PREDICTIONS_FILE)}", file=stream, flush=True)
    return all_results


def run_command(gin_files, gin_params, checkpoint, output_dir, image_paths, score_threshold=0.5,
                max_detections=100, stdout=sys.stdout, stderr=sys.stderr, saved_model=None):
    """The CLI after flag parsing: parses gin, predicts; returns the exit code (0 or 1)."""
    try:
        if saved_model:
            if checkpoint or gin_files or gin_params:
                raise PredictError("--saved_model carries its model and config: give it without "
                                   "--checkpoint, --gin_file or --gin_param")
            predict_saved_model(image_paths, output_dir, saved_model, score_threshold,
                                max_detections, stream=stdout)
            return 0
        if not gin_files:
            raise PredictError("give at least one --gin_file (the training config)")
        runtime.parse_gin(gin_files, gin_params)
        predict(image_paths, output_dir, checkpoint, score_threshold, max_detections,
                stream=stdout)
    except (PredictError, *runtime.INPUT_ERRORS) as e:
        print(f"error: {e}", file=stderr, flush=True)
        return 1
    return 0


def main(argv):
    sys.exit(run_command(FLAGS.gin_file, FLAGS.gin_param, FLAGS.checkpoint, FLAGS.output_dir,
                         argv[1:], runtime.flag_or(FLAGS.score_threshold, DEFAULT_SCORE_THRESHOLD),
                         FLAGS.max_detections,
                         saved_model=FLAGS.saved_model))


if __name__ == "__main__":
    app.run(main)
