"""An exported SavedModel (`official_maskrcnn.export`) as `predict` uses it: loaded with plain
`tf.saved_model.load`, fed in the input type it was exported for, its outputs turned into the
same detections as a checkpoint's (`predictor.image_detections`).
"""

import json
import os

import numpy as np
import tensorflow as tf

from official_maskrcnn.evaluation import coco_results, mask_pasting
from official_maskrcnn.inference import serving
from official_maskrcnn.inference.image_files import PredictError

# The export's assets (written by `official_maskrcnn.export`).
LABEL_MAP_FILE = "label_map.json"  # [{label, id, name}]
CONFIG_FILE = "config.gin"  # the parsed config
EXPORT_FILE = "export.json"  # the export's arguments: input_type, batch_size, thresholds


def _read_asset(export_dir, name):
    path = os.path.join(export_dir, "assets", name)
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (tf.errors.NotFoundError, json.JSONDecodeError) as e:
        raise PredictError(f"--saved_model {export_dir}: cannot read its {name} ({path}: "
                           f"{getattr(e, 'message', e)}); was it written by "
                           f"official_maskrcnn.export?") from e


class ExportedModel:
    """A loaded export: call it with one image, get its detections.

    Args:
      export_dir: the SavedModel folder.
    Raises:
      PredictError: not a SavedModel, or one without the export's assets.
    """

    def __init__(self, export_dir):
        if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
            raise PredictError(f"--saved_model {export_dir}: no saved_model.pb there")
        self.export_dir = export_dir
        self.settings = _read_asset(export_dir, EXPORT_FILE)
        self.label_map = _read_asset(export_dir, LABEL_MAP_FILE)
        self.class_names = {int(entry["id"]): entry["name"] for entry in self.label_map}
        self._serve = tf.saved_model.load(export_dir).signatures["serving_default"]
        self.batch_size = self.settings.get("batch_size")

    def _inputs(self, encoded, image):
        """One image as the signature's input, repeated to a fixed batch size."""
        input_type = self.settings["input_type"]
        if input_type == "image_tensor":
            value = image[None]
        elif input_type == "tf_example":
            example = tf.train.Example(features=tf.train.Features(feature={
                serving.ENCODED_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[encoded]))}))
            value = tf.constant([example.SerializeToString()])
        else:
            value = tf.constant([encoded])
        if self.batch_size:
            value = tf.repeat(value, self.batch_size, axis=0)
        return value

    def __call__(self, encoded, image, image_id, score_threshold, max_detections):
        """One image -> the dict of `predictor.image_detections` (results, labels = COCO
        category ids, scores, boxes_xyxy, masks [k, H, W] uint8).

        Args:
          encoded: the image file's bytes.
          image: its decoded [H, W, 3] uint8 (for image_tensor exports).
          image_id: the results' image_id.
          score_threshold, max_detections: applied on top of the export's own.
        """
        outputs = {key: value[0].numpy()
                   for key, value in self._serve(inputs=self._inputs(encoded, image)).items()}
        count = int(outputs["num_detections"])
        scores = outputs["detection_scores"][:count]
        keep = np.flatnonzero(scores >= score_threshold)[:max_detections]
        height, width = (int(v) for v in outputs["original_size"])
        boxes_xyxy = outputs["detection_boxes"][keep][:, [1, 0, 3, 2]].astype(np.float32)
        categories = outputs["detection_classes"][keep].astype(np.int64)
        masks = np.ascontiguousarray(outputs["detection_masks_image"][keep, :height, :width])
        rles = mask_pasting.encode_masks(masks)
        results = [{"image_id": int(image_id), "category_id": int(category),
                    "bbox": [float(v) for v in box], "score": float(score),
                    "segmentation": rle}
                   for category, box, score, rle in zip(
                       categories, coco_results.coco_boxes(boxes_xyxy), scores[keep], rles)]
        return {"results": results, "labels": categories, "scores": scores[keep],
                "boxes_xyxy": boxes_xyxy, "masks": masks}
