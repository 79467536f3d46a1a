r"""Detections and pictures for image files, from a checkpoint and the training config.

    python -m official_maskrcnn.predict --gin_file F --checkpoint C --output_dir O \
        [--score_threshold 0.5] [--max_detections 100] [--gin_param B ...] IMAGE...

Uses the training config (F, plus `--gin_param`): the model (`build_maskrcnn_model`,
`run.precision`), the eval preprocessing (`DatasetBuilder.min_size`, `max_size`,
`size_divisibility`, `pixel_mode`, unscoped or in the `eval/` scope, as the eval parser gets
them) and `run.eval_annotations_file` (optional) for class names and COCO category ids; without
it a class is named "class <label>" and its category_id is the label (1..K-1). C is a checkpoint
prefix (`.../ckpt-<step>`) or a folder (its newest checkpoint); only the model is restored.

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

import dataclasses
import inspect
import io
import json
import os
import re
import sys

import gin
import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from official_maskrcnn import runtime, visualization
from official_maskrcnn.data import dataset_builder, decoder, parsers
from official_maskrcnn.evaluation import coco_results
from tfrecord_tools import coco_index

FLAGS = flags.FLAGS  # --gin_file, --gin_param, --checkpoint: defined in `runtime`
flags.DEFINE_string("output_dir", None, "Where the pictures, predictions.json and images.json go.")
flags.DEFINE_float("score_threshold", 0.5, "Keep detections with at least this score.")
flags.DEFINE_integer("max_detections", 100, "Keep at most this many detections per image.")

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PREPROCESSING_KEYS = ("min_size", "max_size", "size_divisibility", "pixel_mode")
PREDICTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
COCO_STYLE_STEM = re.compile(r"^\d+$")


class PredictError(ValueError):
    """A bad image, checkpoint, config or argument; the message says which and where."""


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One input image, checked: its path, format ("jpeg" / "png"), size, id and picture path."""
    path: str
    image_format: str
    height: int
    width: int
    image_id: int
    picture_path: str


# ------------------------------------------------------------------ reading and checking inputs

def image_format(path, head):
    """"jpeg" or "png" from the file's first bytes (not its name); PredictError otherwise."""
    if not head:
        raise PredictError(f"{path}: empty file, expected a JPEG or PNG image")
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    raise PredictError(f"{path}: not a JPEG or PNG image (first bytes {head[:8]!r})")


def read_image_bytes(path):
    """(encoded bytes, "jpeg" | "png"); PredictError naming the path if missing or unreadable."""
    if not tf.io.gfile.exists(path):
        raise PredictError(f"{path}: no such file")
    if tf.io.gfile.isdir(path):
        raise PredictError(f"{path}: is a folder, expected an image file")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            encoded = f.read()
    except tf.errors.OpError as e:
        raise PredictError(f"{path}: cannot be read ({e.message})") from e
    return encoded, image_format(path, encoded[:8])


def decode_image(encoded, kind, path="image"):
    """JPEG / PNG bytes -> [H, W, 3] uint8 RGB tensor (grayscale replicated, alpha dropped).

    JPEG is decoded as the eval records are (`decoder.decode_image`, PIL's accurate IDCT).
    """
    try:
        if kind == "jpeg":
            return decoder.decode_image(encoded)
        return tf.ensure_shape(tf.io.decode_png(encoded, channels=3), [None, None, 3])
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise PredictError(f"{path}: the {kind.upper()} data does not decode "
                           f"({message})") from e


def assign_image_ids(paths):
    """The ids of the module docstring: the COCO-style numbers of the stems if every stem is one
    and they are distinct, else 1-based positions."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    if stems and all(COCO_STYLE_STEM.match(stem) for stem in stems):
        numbers = [int(stem) for stem in stems]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(1, len(paths) + 1))


def check_inputs(paths, output_dir):
    """Reads and decodes every image (nothing is written); returns [ImageInput] in input order.

    Raises:
      PredictError: listing every unreadable / undecodable path, or colliding output names.
    """
    if not paths:
        raise PredictError("no image given: pass image files after the flags")
    problems, checked = [], []
    pictures = {}
    for path, image_id in zip(paths, assign_image_ids(paths)):
        picture = os.path.join(output_dir,
                               os.path.splitext(os.path.basename(path))[0] + ".png")
        if picture in pictures:
            problems.append(f"{path}: its picture {picture} would overwrite that of "
                            f"{pictures[picture]} (same file stem)")
            continue
        pictures[picture] = path
        if os.path.abspath(picture) == os.path.abspath(path):
            problems.append(f"{path}: its picture would overwrite it (choose another "
                            f"--output_dir)")
            continue
        try:
            encoded, kind = read_image_bytes(path)
            height, width, _ = decode_image(encoded, kind, path).shape
        except PredictError as e:
            problems.append(str(e))
            continue
        checked.append(ImageInput(path, kind, int(height), int(width), image_id, picture))
    if problems:
        raise PredictError(f"{len(problems)} of {len(paths)} input(s) cannot be used (nothing "
                           "was written):\n  " + "\n  ".join(problems))
    return checked


# ------------------------------------------------------------------ config, classes, checkpoint

def eval_preprocessing():
    """The eval parser's settings from gin (`eval/DatasetBuilder`, falling back to unscoped
    `DatasetBuilder` bindings, then the constructor defaults) -> a `parsers.EvalParser`."""
    signature = inspect.signature(dataset_builder.DatasetBuilder)
    settings = {key: signature.parameters[key].default for key in PREPROCESSING_KEYS}
    bindings = gin.get_bindings("eval/DatasetBuilder")
    settings.update({key: bindings[key] for key in PREPROCESSING_KEYS if key in bindings})
    try:
        return parsers.EvalParser(**settings)
    except ValueError as e:
        raise PredictError(f"DatasetBuilder (eval): {e}") from e


def load_label_map(annotations_file):
    """The annotation JSON's categories as `coco_index.LabelEntry`s (labels 1..K, sorted by
    category id, as the converter numbered them); None without a file."""
    if not annotations_file:
        return None
    try:
        data = coco_index.read_coco_json(annotations_file)
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise coco_index.ConversionError(
                f"{annotations_file}: expected a COCO JSON object with a 'categories' list")
        return coco_index.build_label_map(data["categories"], annotations_file)
    except coco_index.ConversionError as e:
        raise PredictError(f"run.eval_annotations_file: {e}") from e


def class_maps(label_map, num_classes):
    """({label: name}, {label: category_id}) for the model's labels 1..num_classes-1: from the
    label map, or "class <label>" and category_id = label without one."""
    if label_map is None:
        labels = range(1, num_classes)
        return {label: f"class {label}" for label in labels}, {label: label for label in labels}
    if len(label_map) != num_classes - 1:
        raise PredictError(f"run.eval_annotations_file has {len(label_map)} categories, but the "
                           f"model has {num_classes - 1} classes (build_maskrcnn_model."
                           f"num_classes = {num_classes}, background included)")
    return ({entry.label: entry.name for entry in label_map},
            {entry.label: entry.coco_id for entry in label_map})


def resolve_checkpoint(checkpoint):
    """A checkpoint prefix from a prefix or a folder; PredictError if there is none."""
    if not checkpoint:
        raise PredictError("--checkpoint is required (a prefix .../ckpt-N or a model folder)")
    try:
        return runtime.resolve_checkpoint(checkpoint)
    except runtime.CheckpointNotFoundError as e:
        raise PredictError(str(e)) from e


def restore_model(checkpoint, precision):
    """The gin-configured model on the default strategy with the weights of `checkpoint`."""
    model = runtime.build_model(tf.distribute.get_strategy(), precision)
    try:
        runtime.restore_model_weights(model, checkpoint)
    except runtime.CheckpointMismatchError as e:
        raise PredictError(f"--checkpoint {e}") from e
    return model


# ------------------------------------------------------------------ inference

class Predictor:
    """A restored model + the eval preprocessing: uint8 image -> detections in original pixels.

    Args:
      model: a built `MaskRCNNModel` with its weights.
      parser: the `parsers.EvalParser` whose resize / normalisation / padding to apply.
    """

    def __init__(self, model, parser):
        self.model = model
        self.parser = parser
        # Traced once per padded shape (two orientations), like the evaluator's function.
        self.infer = tf.function(self._infer, jit_compile=False)

    def _infer(self, inputs):
        return self.model(inputs, training=False)

    def preprocess(self, image):
        """[H, W, 3] uint8 RGB -> the eval parser's images [Hp, Wp, 3], image_size [2] (h, w),
        original_size [2] (H, W), scale [2] (h / H, w / W).

        `EvalParser.preprocess_image`, the eval records' own steps after their JPEG decode, on
        an image that may come from a PNG: channel order, normalise + resize, pad.
        """
        return self.parser.preprocess_image(image)

    def __call__(self, image):
        """[H, W, 3] uint8 -> dict of numpy arrays for one image (batch of 1): the model's
        detection outputs plus original_size [1, 2] and scale [1, 2]."""
        inputs = self.preprocess(image)
        outputs = self.infer({"images": inputs["images"][None],
                              "image_size": inputs["image_size"][None]})
        outputs = {key: value.numpy() for key, value in outputs.items()}
        outputs["original_size"] = inputs["original_size"].numpy()[None]
        outputs["scale"] = inputs["scale"].numpy()[None]
        return outputs


def select_detections(outputs, score_threshold, max_detections):
    """The slots of image 0 to keep: valid, score >= threshold, the first max_detections
    (slots are sorted by decreasing score). Returns [k] int indices."""
    classes = outputs["detection_classes"][0]
    scores = outputs["detection_scores"][0]
    slots = np.arange(classes.shape[0])
    keep = ((slots < int(outputs["num_detections"][0]))
            & (classes != coco_results.BACKGROUND_LABEL) & (scores >= score_threshold))
    return np.flatnonzero(keep)[:max_detections]


def image_detections(outputs, keep, image_id, label_to_category):
    """Kept detections of one image in original pixels.

    Returns:
      dict: results (COCO result dicts, `coco_results.detections_to_coco`), labels [k] int,
      scores [k], boxes_xyxy [k, 4] float32 original pixels (inclusive corners), masks [k, H, W]
      uint8 (`coco_results.paste_masks`, the same pixels as the results' RLE).
    """
    kept = {key: outputs[key][:, keep] for key in
            ("detection_boxes", "detection_scores", "detection_classes", "detection_masks")}
    kept.update(source_id=np.array([image_id], np.int64), original_size=outputs["original_size"],
                scale=outputs["scale"], num_detections=np.array([keep.size], np.int32))
    results = coco_results.detections_to_coco(kept, label_to_category)
    boxes_xyxy = coco_results.original_boxes_xyxy(kept["detection_boxes"][0], outputs["scale"][0])
    height, width = (int(v) for v in outputs["original_size"][0])
    return {
        "results": results,
        "labels": kept["detection_classes"][0].astype(np.int64),
        "scores": kept["detection_scores"][0],
        "boxes_xyxy": boxes_xyxy,
        "masks": coco_results.paste_masks(kept["detection_masks"][0], boxes_xyxy, height, width),
    }


def draw(image, detections, class_names):
    """The picture: the highest-scoring detection drawn last (on top), colours by rank."""
    order = np.arange(len(detections["scores"]))[::-1]
    labels = [visualization.format_label(class_names.get(int(label), f"class {label}"), score)
              for label, score in zip(detections["labels"], detections["scores"])]
    return visualization.draw_detections(
        image, detections["boxes_xyxy"][order], detections["masks"][order],
        [labels[t] for t in order], [visualization.color_for(t) for t in order])


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
      checkpoint: a checkpoint prefix or a folder (its newest checkpoint).
      score_threshold, max_detections: which detections are kept (module docstring).
      settings: a `runtime.RunSettings` (default: the one of the parsed gin config).
      stream: where the per-image lines go.
    Raises:
      PredictError: bad arguments, inputs, checkpoint or annotations; raised before anything
        is written.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise PredictError(f"--score_threshold must be in [0, 1], found {score_threshold}")
    if max_detections < 1:
        raise PredictError(f"--max_detections must be >= 1, found {max_detections}")
    if not output_dir:
        raise PredictError("--output_dir is required")
    settings = settings or runtime.run_settings()
    checkpoint = resolve_checkpoint(checkpoint)
    parser = eval_preprocessing()
    label_map = load_label_map(settings.eval_annotations_file)
    inputs = check_inputs(list(image_paths), output_dir)
    model = restore_model(checkpoint, settings.precision)
    class_names, label_to_category = class_maps(label_map, model.get_config()["num_classes"])
    predictor = Predictor(model, parser)

    tf.io.gfile.makedirs(output_dir)
    all_results = []
    for item in inputs:
        encoded, _ = read_image_bytes(item.path)
        image = decode_image(encoded, item.image_format, item.path)
        outputs = predictor(image)
        keep = select_detections(outputs, score_threshold, max_detections)
        detections = image_detections(outputs, keep, item.image_id, label_to_category)
        write_png(item.picture_path, draw(image.numpy(), detections, class_names))
        all_results.extend(detections["results"])
        print(f"{item.path}: image_id {item.image_id}, {keep.size} detection(s) kept -> "
              f"{item.picture_path}", file=stream, flush=True)
    write_json(os.path.join(output_dir, PREDICTIONS_FILE), all_results)
    write_json(os.path.join(output_dir, IMAGES_FILE),
               {str(item.image_id): os.path.abspath(item.path) for item in inputs})
    print(f"wrote {len(all_results)} detection(s) of {len(inputs)} image(s) to "
          f"{os.path.join(output_dir, PREDICTIONS_FILE)}", file=stream, flush=True)
    return all_results


def run_command(gin_files, gin_params, checkpoint, output_dir, image_paths, score_threshold=0.5,
                max_detections=100, stdout=sys.stdout, stderr=sys.stderr):
    """The CLI after flag parsing: parses gin, predicts; returns the exit code (0 or 1)."""
    try:
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
                         argv[1:], FLAGS.score_threshold, FLAGS.max_detections))


if __name__ == "__main__":
    app.run(main)
