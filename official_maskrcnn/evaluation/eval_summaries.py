"""TensorBoard events of the evaluations: the 24 COCO stats and a few drawn val images.

Written by `COCOEvalCallback` (the chief's only) into their own event folder, MODEL_DIR/eval
beside the training scalars of MODEL_DIR/train, at the global step of the checkpoint whose
weights were evaluated: the epoch's end for an evaluation at that end, asynchronous or not
(the result may be logged steps later), and that epoch's checkpoint for one redone on resume.

Tags: `eval/bbox/<stat>` and `eval/segm/<stat>` for the 12 stats of `coco_metrics.STAT_NAMES`
(`eval/bbox/AP`, `eval/segm/AP50`, ...: the names and values of `metrics.jsonl`, stored as
float32), and `eval/images/<source id>` for each picture of `summary_images.SummaryImages`.
"""

import tensorflow as tf

from official_maskrcnn.evaluation import coco_metrics

SCALAR_PREFIX = "eval"
IMAGE_PREFIX = "eval/images"


def scalar_tag(iou_type, stat_name):
    """E.g. ("bbox", "AP") -> "eval/bbox/AP"."""
    return f"{SCALAR_PREFIX}/{iou_type}/{stat_name}"


def image_tag(source_id):
    """E.g. 139 -> "eval/images/139"."""
    return f"{IMAGE_PREFIX}/{int(source_id)}"


class EvalSummaries:
    """Writes each evaluation's stats and pictures at one step.

    Args:
      log_dir: the event files' folder (MODEL_DIR/eval); created at the first write.
      images: optional `summary_images.SummaryImages` (None: no pictures).
    """

    def __init__(self, log_dir, images=None):
        self.log_dir = log_dir
        self.images = images
        self._writer = None

    def draw(self, outputs):
        """The pictures of an evaluation's outputs (`SummaryImages.draw`), {} without images.

        Called when the inference is done, since the outputs are not kept until the result
        arrives (asynchronous evaluation); the pictures are written with the stats."""
        return self.images.draw(outputs) if self.images is not None else {}

    def write(self, step, metrics, pictures=None):
        """The stats of `metrics` ({iou_type: {stat: float}}, `coco_metrics.evaluate`) and
        `pictures` ({source_id: [H, W, 3] uint8}, `draw`) at global step `step`; flushed."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=int(step)):
            for iou_type in coco_metrics.IOU_TYPES:
                for name in coco_metrics.STAT_NAMES:
                    tf.summary.scalar(scalar_tag(iou_type, name), metrics[iou_type][name])
            for source_id, picture in (pictures or {}).items():
                tf.summary.image(image_tag(source_id), picture[None], max_outputs=1)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
