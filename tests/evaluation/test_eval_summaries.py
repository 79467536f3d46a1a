"""The evaluations' TensorBoard events: the 24 stats, and the fixed val images drawn from the
eval outputs (`eval_summaries`, `summary_images`), read back with tensorboard's reader."""

import os
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from official_maskrcnn import visualization
from official_maskrcnn.evaluation import coco_metrics, coco_results, eval_summaries
from official_maskrcnn.evaluation import summary_images as summary_images_lib
from tests import synthetic_records, tensorboard_events

NAMES = {1: "rectangle", 2: "ellipse", 3: "triangle"}
SIZE = 64  # the synthetic images' longer side (the other one varies)
MASK = 28


def distinct_metrics(offset):
    """Every stat a different value (a swapped tag would show)."""
    return {iou_type: {name: offset + 0.01 * i + 0.1 * j
                       for i, name in enumerate(coco_metrics.STAT_NAMES)}
            for j, iou_type in enumerate(coco_metrics.IOU_TYPES)}


class EvalSummariesTest(tf.test.TestCase):

    def test_each_evaluation_writes_the_24_stats_and_its_pictures_at_its_step(self):
        log_dir = os.path.join(self.create_tempdir().full_path, "eval")
        summaries = eval_summaries.EvalSummaries(log_dir)
        self.assertFalse(os.path.exists(log_dir))  # nothing before the first evaluation
        picture = np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8)
        summaries.write(8, distinct_metrics(0.0), {139: picture})
        summaries.write(16, distinct_metrics(0.5))
        summaries.close()

        scalars = tensorboard_events.scalars(log_dir)
        self.assertLen(scalars, 24)
        for iou_type in coco_metrics.IOU_TYPES:
            for name in coco_metrics.STAT_NAMES:
                self.assertEqual(scalars[f"eval/{iou_type}/{name}"],
                                 [(8, np.float32(distinct_metrics(0.0)[iou_type][name])),
                                  (16, np.float32(distinct_metrics(0.5)[iou_type][name]))])
        images = tensorboard_events.images(log_dir)
        self.assertEqual(list(images), ["eval/images/139"])
        (step, read), = images["eval/images/139"]
        self.assertEqual(step, 8)
        self.assertAllEqual(read, picture)  # PNG: lossless

    def test_draw_without_images_is_empty(self):
        self.assertEqual(eval_summaries.EvalSummaries("unused").draw({"source_id": [1]}), {})


class SummaryImagesTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        root = tempfile.mkdtemp()
        pattern, _ = synthetic_records.write_split(root, "val", 5, seed=2, num_shards=2,
                                                   image_size=SIZE)
        cls.files = sorted(tf.io.gfile.glob(pattern))
        cls.image_dir = os.path.join(root, "coco", "val")
        # The records' source ids in file order, read here without the package's decoder.
        cls.record_ids, cls.sizes = [], {}
        for serialized in tf.data.TFRecordDataset(cls.files).as_numpy_iterator():
            feature = tf.train.Example.FromString(serialized).features.feature
            source_id = int(feature["image/source_id"].bytes_list.value[0])
            cls.record_ids.append(source_id)
            cls.sizes[source_id] = (feature["image/height"].int64_list.value[0],
                                    feature["image/width"].int64_list.value[0])

    def outputs(self, source_ids, slots=3):
        """Eval outputs with no detection, source ids in the given order, the network input
        twice the original size (scale 2)."""
        n = len(source_ids)
        return {"source_id": np.array(source_ids, np.int64),
                "original_size": np.array([self.sizes[i] for i in source_ids], np.int32),
                "scale": np.full([n, 2], 2.0, np.float32),
                "num_detections": np.zeros([n], np.int32),
                "detection_boxes": np.zeros([n, slots, 4], np.float32),
                "detection_scores": np.zeros([n, slots], np.float32),
                "detection_classes": np.zeros([n, slots], np.int32),
                "detection_masks": np.zeros([n, slots, MASK, MASK], np.float32)}

    def test_the_first_records_decoded_at_their_original_size(self):
        images = summary_images_lib.SummaryImages(self.files, 3, NAMES)
        self.assertEqual(images.source_ids, self.record_ids[:3])
        for source_id, image in zip(images.source_ids, images.images):
            self.assertEqual((image.shape, image.dtype),
                             (self.sizes[source_id] + (3,), np.uint8))
            name = [n for n in os.listdir(self.image_dir) if int(n.split(".")[0]) == source_id]
            on_disk = np.asarray(Image.open(os.path.join(self.image_dir, name[0])).convert("RGB"))
            # The same JPEG, decoded by Pillow here: equal up to the IDCT's rounding.
            self.assertLess(np.abs(on_disk.astype(int) - image).mean(), 1.0)

    def test_more_images_than_records_gives_every_record(self):
        images = summary_images_lib.SummaryImages(self.files, 50, NAMES)
        self.assertEqual(images.source_ids, self.record_ids)

    def test_draws_the_kept_detections_in_original_pixels_from_the_matching_row(self):
        images = summary_images_lib.SummaryImages(self.files, 2, NAMES)
        first, second = images.source_ids
        # Rows in another order than the records, an extra image, as gathered outputs come.
        outputs = self.outputs([self.record_ids[4], second, first])
        row = 2
        # Slot 0 kept; slot 1 below the 0.5 threshold; slot 2 beyond num_detections.
        outputs["num_detections"][row] = 2
        outputs["detection_boxes"][row] = [[20, 10, 60, 50], [0, 0, 100, 100], [0, 0, 90, 90]]
        outputs["detection_scores"][row] = [0.9, 0.3, 0.95]
        outputs["detection_classes"][row] = [2, 1, 3]
        outputs["detection_masks"][row] = 1.0
        pictures = images.draw(outputs)
        self.assertEqual(list(pictures), [first, second])
        # No detection kept: the original image as it is.
        self.assertAllEqual(pictures[second], images.images[1])

        drawn, original = pictures[first], images.images[0]
        self.assertEqual(drawn.shape, original.shape)
        self.assertEqual(max(drawn.shape), SIZE)
        # The box [ymin, xmin, ymax, xmax] = [20, 10, 60, 50] of the network input is
        # x1, y1, x2, y2 = 5, 10, 25, 30 in the original (/ 2): its corner is outlined in the
        # top detection's colour, and nothing is drawn beyond the pasted mask's reach.
        self.assertAllEqual(drawn[30, 25], visualization.color_for(0))
        self.assertAllEqual(drawn[40:, 35:], original[40:, 35:])
        self.assertNotAllEqual(drawn[10:31, 5:26], original[10:31, 5:26])
        masks = coco_results.paste_masks(np.ones([1, MASK, MASK], np.float32),
                                         [[5, 10, 25, 30]], *original.shape[:2])
        expected = visualization.draw_detections(
            original, [[5, 10, 25, 30]], masks, [visualization.format_label("ellipse", 0.9)])
        self.assertAllEqual(drawn, expected)

    def test_large_pictures_are_downscaled_to_max_side(self):
        images = summary_images_lib.SummaryImages(self.files, 1, NAMES, max_side=32)
        picture, = images.draw(self.outputs(images.source_ids)).values()
        height, width = self.sizes[images.source_ids[0]]
        self.assertEqual(picture.shape, (round(height / 2), round(width / 2), 3))  # 64 -> 32

    def test_an_image_missing_from_the_outputs_is_named(self):
        images = summary_images_lib.SummaryImages(self.files, 1, NAMES)
        with self.assertRaisesRegex(KeyError, f"source id {images.source_ids[0]}"):
            images.draw(self.outputs([self.record_ids[4]]))

    def test_zero_images_is_an_error(self):
        with self.assertRaisesRegex(ValueError, "num_images >= 1, found 0"):
            summary_images_lib.SummaryImages(self.files, 0, NAMES)


if __name__ == "__main__":
    tf.test.main()
