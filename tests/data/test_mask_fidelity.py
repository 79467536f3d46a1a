"""Mask-target fidelity on coco128: our box-aligned crops against polygons rasterised at 28x28.

The issue's requirement: "on coco128, targets built your way against targets rasterised directly
from the polygon at 28x28 for the same boxes (the reference), mean IoU >= 0.95".

Ours: records from our converter -> `decoder.parse_example` -> `parsers.TrainParser` (800/1333,
no flip, 112 x 112 crops) -> for a proposal equal to the ground-truth box, the 28 x 28 target
the model builds from a crop: bilinear samples at the 28 x 28 bin centres of the crop (crop
index (k + 0.5) * 112 / 28 - 0.5), thresholded at >= 0.5.
Reference (maskrcnn-benchmark `SegmentationMask.crop(box).resize((28, 28))` on polygons): the
annotation's polygons shifted by the box's (x1, y1) and scaled by 28 / max(x2 - x1, 1) and
28 / max(y2 - y1, 1), rasterised at 28 x 28 by pycocotools. The box is the reference's inclusive
box (x, y, x + w - 1, y + h - 1) clipped to the image, in original pixels: the parser's box
divided by the resize ratio.

Instances are matched to COCO annotations by order: the parser keeps the record's order of the
instances it does not drop (crowd, boxes empty after the clip), and each record lists its
`image/object/annotation_id`s in that order.

Measured on coco128 (all 929 non-crowd instances; printed by the test, run with `-s` to see it):
mean IoU 0.9609, median 0.9734, small objects (area < 32^2, 414 of them) 0.9356, medium and large
0.9812. The worst are objects of a few pixels (area 3 px: IoU 0.27), whose pixel masks cannot
follow a polygon drawn at 28 x 28. Runtime about 12 s (conversion and 800 x 1333 resizes).

    .venv/bin/python -m pytest tests/data/test_mask_fidelity.py -q -s
"""

import glob
import io
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

from official_maskrcnn.data import decoder, parsers
from tfrecord_tools import conversion
from tfrecord_tools import features as F
from tfrecord_tools import tf_example

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_IMAGES = os.path.join(COCO128, "train2017")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")

CROP_SIZE = 112  # the parser's box-aligned crop side
TARGET_SIZE = 28  # the mask head's output side
MIN_MEAN_IOU = 0.95  # the requirement
SMALL_AREA = 32 ** 2  # COCO's "small" objects


def bilinear_resample(crops, out_size):
    """[N, M, M] crops -> [N, S, S]: bilinear samples at the S x S bin centres of each crop.

    Bin k's centre is the continuous position (k + 0.5) * M / S, i.e. the crop index
    (k + 0.5) * M / S - 0.5 (for M = 112, S = 28: 4k + 1.5, the mean of crop rows 4k+1, 4k+2).
    """
    size = crops.shape[-1]
    index = (np.arange(out_size) + 0.5) * size / out_size - 0.5
    low = np.clip(np.floor(index).astype(int), 0, size - 1)
    high = np.clip(low + 1, 0, size - 1)
    frac = index - np.floor(index)
    rows = crops[:, low, :] * (1 - frac)[:, None] + crops[:, high, :] * frac[:, None]
    return rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac


def reference_target(polygons, box_xyxy, size=TARGET_SIZE):
    """The reference's target: polygons cropped to the box and rasterised at size x size."""
    x1, y1, x2, y2 = box_xyxy
    scale_x = size / max(x2 - x1, 1.0)
    scale_y = size / max(y2 - y1, 1.0)
    moved = []
    for polygon in polygons:
        p = np.asarray(polygon, np.float64).copy()
        p[0::2] = (p[0::2] - x1) * scale_x
        p[1::2] = (p[1::2] - y1) * scale_y
        moved.append(p.tolist())
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(moved, size, size)))


def iou(a, b):
    """IoU of two binary masks; two empty masks agree perfectly."""
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def parse_for_fidelity(parser):
    """serialized record -> the parser's ground truth plus what matching needs (no image)."""
    def parse(serialized):
        parsed = decoder.parse_example(serialized)
        outputs = parser(parsed, tf.constant([0, 0], tf.int64))
        return {
            "gt_boxes": outputs["gt_boxes"],
            "gt_masks": outputs["gt_masks"],
            "image_size": outputs["image_size"],
            "original_size": tf.stack([parsed["height"], parsed["width"]]),
            "keep": parsers.trainable_instances(parsed),
        }
    return parse


class Coco128MaskFidelityTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        prefix = os.path.join(cls.tmp, "train")
        conversion.convert(COCO128_IMAGES, COCO128_JSON, prefix, num_shards=1, num_workers=1,
                           progress_stream=io.StringIO())
        with open(COCO128_JSON) as f:
            cls.coco = json.load(f)
        annotations = {a["id"]: a for a in cls.coco["annotations"]}

        files = sorted(glob.glob(prefix + "-*-of-*.tfrecord"))
        records = [r for path in files for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
        parser = parsers.TrainParser(min_size=800, max_size=1333, flip_probability=0.0,
                                     mask_size=CROP_SIZE)
        dataset = tf.data.Dataset.from_tensor_slices(records).map(
            parse_for_fidelity(parser), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        cls.ious, cls.areas, cls.matched_ids = [], [], []
        cls.num_records = len(records)
        for record, out in zip(records, dataset.as_numpy_iterator()):
            ids = np.array(tf_example.parse(record)[F.ANNOTATION_ID])[out["keep"]]
            ids = ids[:len(out["gt_boxes"])]  # the parser truncates to max_instances
            scale = out["image_size"] / out["original_size"]  # (h / H, w / W)
            ours = bilinear_resample(out["gt_masks"][:len(ids)], TARGET_SIZE) >= 0.5
            for i, annotation_id in enumerate(ids):
                annotation = annotations[int(annotation_id)]
                ymin, xmin, ymax, xmax = out["gt_boxes"][i] / np.tile(scale, 2)
                reference = reference_target(annotation["segmentation"], (xmin, ymin, xmax, ymax))
                cls.ious.append(iou(ours[i], reference))
                cls.areas.append(annotation["area"])
                cls.matched_ids.append(int(annotation_id))
        cls.ious, cls.areas = np.array(cls.ious), np.array(cls.areas)
        small = cls.areas < SMALL_AREA
        cls.summary = (
            f"coco128 mask fidelity (28x28 from 112x112 crops vs polygons at 28x28): "
            f"{len(cls.ious)} instances, mean IoU {cls.ious.mean():.4f}, "
            f"median {np.median(cls.ious):.4f}; small (area < 32^2, {small.sum()}): mean "
            f"{cls.ious[small].mean():.4f}; medium+large ({(~small).sum()}): mean "
            f"{cls.ious[~small].mean():.4f}; min {cls.ious.min():.4f}")
        print("\n" + cls.summary)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_every_non_crowd_annotation_is_compared(self):
        # The matching must cover the whole set, else a good mean could hide dropped objects.
        non_crowd = {a["id"] for a in self.coco["annotations"] if not a["iscrowd"]}
        self.assertEqual(self.num_records, len(self.coco["images"]))
        self.assertEqual(len(self.matched_ids), len(set(self.matched_ids)))
        self.assertEqual(set(self.matched_ids), non_crowd)

    def test_mean_iou(self):
        self.assertGreaterEqual(self.ious.mean(), MIN_MEAN_IOU, msg=self.summary)

    def test_small_objects_are_not_broken(self):
        # Not a requirement of the issue, a guard: a box or half-pixel convention error shows
        # first on small objects (one pixel is several bins); ~0.93 is measured.
        small = self.areas < SMALL_AREA
        self.assertGreater(small.sum(), 100)
        self.assertGreaterEqual(self.ious[small].mean(), 0.90, msg=self.summary)

    def test_bilinear_resample_helper(self):
        # 112 -> 28 samples at crop index 4k + 1.5: the mean of rows/cols 4k+1 and 4k+2.
        crop = np.random.default_rng(0).uniform(size=(1, 112, 112))
        expected = crop[0].reshape(28, 4, 28, 4)[:, 1:3, :, 1:3].mean(axis=(1, 3))
        self.assertAllClose(bilinear_resample(crop, 28)[0], expected)

    def test_reference_target_helper(self):
        # A square polygon covering its whole inclusive box [10, 10 + 20 - 1] spills past the
        # 28 x 28 grid on the right/bottom (the box is 19 px, the object 20): all ones.
        square = [[10, 10, 30, 10, 30, 30, 10, 30]]
        self.assertAllEqual(reference_target(square, (10, 10, 29, 29)), np.ones([28, 28]))
        # The left half of the box only.
        half = [[10, 10, 19.5, 10, 19.5, 30, 10, 30]]
        target = reference_target(half, (10, 10, 29, 29))
        self.assertAllEqual(target[:, :14], np.ones([28, 14]))
        self.assertAllEqual(target[:, 15:], np.zeros([28, 13]))


if __name__ == "__main__":
    tf.test.main()
