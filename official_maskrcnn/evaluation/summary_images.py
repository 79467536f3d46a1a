"""A few fixed val images with an evaluation's detections drawn, for TensorBoard.

Shape shorthand: N images drawn, T detection slots per image, M mask side (28), H x W an original
image.

The images are the first N records of the eval files (in `records.records_dataset` order, the
same every run), decoded once from their JPEG bytes at their original size, at the first use:
inside the run's evaluation, where a damaged JPEG is named like any other decode failure
(`data.decode_failures`), and not at all by a run that never evaluates. Each evaluation's
inference already holds their detections (`Evaluator.predict` covers every record), so drawing
them costs no second inference pass: the detections with a score >= `SCORE_THRESHOLD` are mapped
back to the original pixels as the COCO results are (`coco_results`: boxes / scale, masks pasted
by `paste_masks`) and drawn by `visualization.draw_scored_detections`, as `predict` draws them.
"""

import numpy as np
from PIL import Image

from official_maskrcnn import visualization
from official_maskrcnn.data import decoder, records
from official_maskrcnn.evaluation import coco_results

# `predict`'s default: the pictures show what a user of predict would see. The model keeps
# detections down to 0.05, a hundred faint boxes that would hide the image.
SCORE_THRESHOLD = 0.5
# Pictures with a longer side above this are downscaled (after drawing): COCO images (<= 640)
# stay at their original size, larger custom data does not bloat the event files.
MAX_SIDE = 1024


class SummaryImages:
    """The first `num_images` eval records and their drawn detections.

    Args:
      files: the eval record files, in order (`DatasetBuilder.files`).
      num_images: N >= 1 (fewer when the files hold fewer records).
      class_names: {model label: name} for the labels drawn (`PostProcessor.class_names`).
      score_threshold: detections drawn have at least this score.
      max_side: pictures are downscaled to at most this longer side.
    Attributes (read on first use):
      source_ids: [N] the images' source ids (COCO image ids), in record order.
      images: N [H, W, 3] uint8 RGB originals.
    Raises:
      ValueError: num_images < 1.
    """

    def __init__(self, files, num_images, class_names, score_threshold=SCORE_THRESHOLD,
                 max_side=MAX_SIDE):
        if num_images < 1:
            raise ValueError(f"SummaryImages needs num_images >= 1, found {num_images}")
        self.files = list(files)
        self.num_images = num_images
        self.class_names = dict(class_names)
        self.score_threshold = score_threshold
        self.max_side = max_side
        self._decoded = None  # (source_ids, images)

    @property
    def source_ids(self):
        return self._originals()[0]

    @property
    def images(self):
        return self._originals()[1]

    def _originals(self):
        if self._decoded is None:
            source_ids, images = [], []
            for serialized in records.records_dataset(self.files).take(self.num_images):
                parsed = decoder.parse_example(serialized, include_masks=False)
                source_ids.append(int(parsed["source_id"]))
                images.append(decoder.decode_image(parsed["encoded_image"]).numpy())
            self._decoded = source_ids, images
        return self._decoded

    def draw(self, outputs):
        """The pictures of one evaluation.

        Args:
          outputs: `Evaluator.predict`'s dict over all eval images: source_id [n],
            original_size [n, 2], scale [n, 2], num_detections [n], detection_boxes [n, T, 4]
            ([ymin, xmin, ymax, xmax] of the network input), detection_scores [n, T],
            detection_classes [n, T], detection_masks [n, T, M, M].
        Returns:
          {source_id: [h, w, 3] uint8}, in record order; (h, w) is (H, W), or downscaled to
          `max_side`.
        Raises:
          KeyError: outputs lack one of the images (naming its source id).
        """
        rows = {int(source_id): row for row, source_id in enumerate(outputs["source_id"])}
        pictures = {}
        for source_id, image in zip(self.source_ids, self.images):
            if source_id not in rows:
                raise KeyError(f"the eval outputs have no image of source id {source_id}")
            pictures[source_id] = self._downscaled(self._draw_one(image, outputs,
                                                                  rows[source_id]))
        return pictures

    def _draw_one(self, image, outputs, row):
        classes = np.asarray(outputs["detection_classes"][row]).astype(np.int64)
        scores = np.asarray(outputs["detection_scores"][row], np.float32)
        slots = np.arange(classes.shape[0])
        keep = np.flatnonzero((slots < int(outputs["num_detections"][row]))
                              & (classes != coco_results.BACKGROUND_LABEL)
                              & (scores >= self.score_threshold))
        boxes_xyxy = coco_results.original_boxes_xyxy(outputs["detection_boxes"][row][keep],
                                                      outputs["scale"][row])
        height, width = image.shape[:2]
        masks = coco_results.paste_masks(outputs["detection_masks"][row][keep], boxes_xyxy,
                                         height, width)
        return visualization.draw_scored_detections(image, boxes_xyxy, masks, classes[keep],
                                                    scores[keep], self.class_names)

    def _downscaled(self, picture):
        height, width = picture.shape[:2]
        longer = max(height, width)
        if longer <= self.max_side:
            return picture
        size = (max(1, round(width * self.max_side / longer)),
                max(1, round(height * self.max_side / longer)))
        return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
