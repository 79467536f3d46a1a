"""Inference on single images: a restored model plus the eval preprocessing, and its outputs
back in the original pixels.

`Predictor` runs `EvalParser.preprocess_image` (the eval records' own steps) and the model's
inference call, traced once per padded shape; `select_detections` / `image_detections` keep the
detections above a score and map them to the original image with the reference's semantics
(`coco_results`: boxes / scale, masks pasted by `paste_masks`). The rest builds what a run needs
from the parsed gin config: the eval parser, the label map, the restored model.
"""

import inspect

import gin
import numpy as np
import tensorflow as tf

from official_maskrcnn import runtime
from official_maskrcnn.data import dataset_builder, label_maps, parsers
from official_maskrcnn.evaluation import coco_results
from official_maskrcnn.inference.image_files import PredictError
from official_maskrcnn.training import checkpointing

PREPROCESSING_KEYS = ("min_size", "max_size", "size_divisibility", "pixel_mode")


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
    """The annotation JSON's categories as a `label_maps.LabelMap` (labels 1..K, sorted by
    category id, as the converter numbered them); None without a file."""
    try:
        return label_maps.from_annotations(annotations_file)
    except label_maps.LabelMapError as e:
        raise PredictError(f"run.eval_annotations_file: {e}") from e


def run_label_map(checkpoint, annotations_file):
    """The label map predict and export use (`data/label_maps.py`): the `label_map.json` that
    training saved beside `checkpoint`, checked against `annotations_file`'s categories when
    that file exists; without a saved one, those categories; None without either. The model's
    `num_classes` is set from it when the config leaves it unset.

    Raises:
      label_maps.LabelMapError: the two disagree.
      PredictError: no saved map and an unusable `annotations_file`.
    """
    saved = runtime.saved_label_map(checkpoint) if checkpoint else None
    if saved is None:
        label_map = load_label_map(annotations_file)
    else:
        if annotations_file and tf.io.gfile.exists(annotations_file):
            label_maps.check_same(saved, load_label_map(annotations_file))
        label_map = saved
    label_maps.apply_num_classes(label_map, check=False)  # `class_maps` checks the model
    return label_map


def class_maps(label_map, num_classes):
    """({label: name}, {label: category_id}) for the model's labels 1..num_classes-1: from the
    `label_maps.LabelMap`, or "class <label>" and category_id = label without one."""
    if label_map is None:
        labels = range(1, num_classes)
        return {label: f"class {label}" for label in labels}, {label: label for label in labels}
    if label_map.num_classes != num_classes:
        raise PredictError(f"{label_map.source} has {len(label_map.entries)} categories, but "
                           f"the model has {num_classes - 1} classes (build_maskrcnn_model."
                           f"num_classes = {num_classes}, background included)")
    return label_map.class_names, label_map.label_to_category


def resolve_checkpoint(checkpoint):
    """What restoring `checkpoint` may use (`runtime.checkpoint_candidates`: [the prefix], or a
    folder's checkpoints oldest first); PredictError if there is none."""
    if not checkpoint:
        raise PredictError("--checkpoint is required (a prefix .../ckpt-N or a model folder)")
    try:
        return runtime.checkpoint_candidates(checkpoint)
    except runtime.CheckpointNotFoundError as e:
        raise PredictError(str(e)) from e


def restore_model(checkpoint, precision):
    """The gin-configured model on the default strategy with the weights of `checkpoint` (a
    prefix, a folder or `resolve_checkpoint`'s list: a folder's unreadable newest checkpoint
    falls back to the previous one with a warning, as training does). Returns (model, the
    checkpoint path restored)."""
    model = runtime.build_model(tf.distribute.get_strategy(), precision)
    try:
        restored = runtime.restore_model_weights(model, checkpoint)
    except (runtime.CheckpointMismatchError, runtime.CheckpointNotFoundError,
            checkpointing.CheckpointError) as e:
        raise PredictError(f"--checkpoint {e}") from e
    return model, restored


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
