"""Mask-target fidelity on coco128: the model's 28x28 targets against polygons rasterised at 28x28.

The issue's requirement: "on coco128, targets built your way against targets rasterised directly
from the polygon at 28x28 for the same boxes (the reference), mean IoU >= 0.95"; issue 14 raised
the bar once the crops and targets covered each object's continuous extent.

Ours: records from our converter -> `decoder.parse_example` -> `parsers.TrainParser` (800/1333,
112 x 112 crops over the extents `gt_mask_boxes`) -> the 28 x 28 targets the model builds,
`ops.mask_targets` itself, at each instance's proposals: its inclusive "+1" gt box (the
reference adds the gt boxes to its proposals) and JITTERS foreground-like boxes around it
(every side moved by up to JITTER of the box's side, IoU >= 0.5, fixed seed).
Reference (maskrcnn-benchmark `SegmentationMask.crop(box).resize((28, 28))` on polygons): the
annotation's polygons shifted by the proposal's (x1, y1) and scaled by 28 / max(x2 - x1, 1) and
28 / max(y2 - y1, 1), rasterised at 28 x 28 by pycocotools, in original pixels (the parser's
boxes divided by the resize ratio). Flipped: the reference flips boxes and polygons alike in the
resized image, x' = w - x - 1 (its polygon `transpose` subtracts TO_REMOVE = 1 too), i.e.
x' = W - x - 1 / s in original pixels (s = w / W); every image is measured both ways.

Instances are matched to COCO annotations by order: the parser keeps the record's order of the
instances it does not drop (crowd, boxes empty after the clip), and each record lists its
`image/object/annotation_id`s in that order.

Measured on coco128 (all 929 non-crowd instances, 3716 proposals; printed by the test, run with
`-s` to see it), before and after issue 14 (crops and the zeroing outside them over the
inclusive box, which cut off every object's last pixel column and row, then over the
continuous extent):
  - proposals: mean IoU 0.9572 -> 0.9628, median 0.9728 -> 0.9753, small objects (area < 32^2)
    0.9268 -> 0.9387, medium and large 0.9817 -> 0.9822; flipped 0.9570 -> 0.9625;
  - the gt boxes alone: 0.9611 -> 0.9606 (the 112 crop samples one pixel more per side; the
    extent matters only where a proposal reaches past the box).
Mirroring the extent exactly with the image (x' = w - x) instead of like the boxes would give
0.9355 on the flipped images. The worst are objects of a few pixels, whose pixel masks cannot
follow a polygon drawn at 28 x 28. Runtime about 35 s on 2 cores (conversion and 800 x 1333
resizes, twice).

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
from official_maskrcnn.ops import mask_targets
from tfrecord_tools import conversion
from tfrecord_tools import features as F
from tfrecord_tools import tf_example

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_IMAGES = os.path.join(COCO128, "train2017")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")

CROP_SIZE = 112  # the parser's box-aligned crop side
TARGET_SIZE = 28  # the mask head's output side
# Issue 14 raised the 0.95 to just below today's 0.9628; the inclusive box gave 0.9572.
MIN_MEAN_IOU = 0.96
# Flipped and unflipped images measure alike (0.9625 and 0.9628); a flip off by one pixel: 0.9355.
FLIP_IOU_ATOL = 0.002
JITTERS = 3  # proposals per instance besides its gt box
JITTER = 0.15  # each side moved by up to this fraction of the box's side
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


def reference_target(polygons, box_xyxy, size=TARGET_SIZE, flip_width=None):
    """The reference's target: polygons cropped to the box and rasterised at size x size.

    flip_width: None, or the reference's flip of the polygons first, x' = flip_width - x.
    """
    x1, y1, x2, y2 = box_xyxy
    scale_x = size / max(x2 - x1, 1.0)
    scale_y = size / max(y2 - y1, 1.0)
    moved = []
    for polygon in polygons:
        p = np.asarray(polygon, np.float64).copy()
        if flip_width is not None:
            p[0::2] = flip_width - p[0::2]
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
            "gt_mask_boxes": outputs["gt_mask_boxes"],
            "image_size": outputs["image_size"],
            "original_size": tf.stack([parsed["height"], parsed["width"]]),
            "keep": parsers.trainable_instances(parsed),
        }
    return parse


def box_iou(a, b):
    """[N] IoU of [N, 4] boxes a and b, continuous corners."""
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def proposals(gt_boxes, image_size, rng):
    """[I * (1 + JITTERS), 4] ROIs and [same] gt index: each gt box (the reference adds them to
    its proposals) and JITTERS foreground-like proposals around it, every side moved by up to
    JITTER of the box's side, clipped to the image; those below IoU 0.5 with their box (no
    foreground) are replaced by the box itself."""
    num = len(gt_boxes)
    sides = np.tile(gt_boxes[:, 2:] - gt_boxes[:, :2], 2)  # [I, 4]
    moved = gt_boxes[:, None] + rng.uniform(-JITTER, JITTER, [num, JITTERS, 4]) * sides[:, None]
    moved = np.clip(moved, 0, np.tile(image_size - 1.0, 2)).reshape(-1, 4)
    owner = np.repeat(np.arange(num), JITTERS)
    background = box_iou(moved, gt_boxes[owner]) < 0.5
    moved[background] = gt_boxes[owner][background]
    return (np.concatenate([gt_boxes, moved]).astype(np.float32),
            np.concatenate([np.arange(num), owner]))


def measure(records, annotations, flip):
    """{ious, areas, at_gt, matched_ids, crops, extents}: ious, areas and at_gt (the ROI is the
    gt box) per compared ROI; matched_ids, crops and extents per instance."""
    parser = parsers.TrainParser(min_size=800, max_size=1333, mask_size=CROP_SIZE,
                                 flip_probability=1.0 if flip else 0.0)
    dataset = tf.data.Dataset.from_tensor_slices(records).map(
        parse_for_fidelity(parser), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    rng = np.random.default_rng(14)
    found = {key: [] for key in ("ious", "areas", "at_gt", "matched_ids", "crops", "extents")}
    for record, out in zip(records, dataset.as_numpy_iterator()):
        ids = np.array(tf_example.parse(record)[F.ANNOTATION_ID])[out["keep"]]
        ids = ids[:len(out["gt_boxes"])]  # the parser truncates to max_instances
        if not len(ids):
            continue
        scale = out["image_size"] / out["original_size"]  # (h / H, w / W)
        # The reference's flip in the resized image, x' = w - 1 - x, in original pixels.
        flip_width = (out["image_size"][1] - 1.0) / scale[1] if flip else None
        rois, owner = proposals(out["gt_boxes"][:len(ids)], out["image_size"], rng)
        targets = mask_targets.mask_targets(
            out["gt_masks"][None], out["gt_mask_boxes"][None], rois[None], owner[None],
            TARGET_SIZE).numpy()[0]
        for roi, target, i in zip(rois, targets, owner):
            annotation = annotations[int(ids[i])]
            ymin, xmin, ymax, xmax = roi / np.tile(scale, 2)
            reference = reference_target(annotation["segmentation"], (xmin, ymin, xmax, ymax),
                                         flip_width=flip_width)
            found["ious"].append(iou(target, reference))
            found["areas"].append(annotation["area"])
        found["at_gt"] += [True] * len(ids) + [False] * (len(rois) - len(ids))
        found["matched_ids"] += [int(i) for i in ids]
        found["crops"].append(out["gt_masks"][:len(ids)])
        found["extents"].append(out["gt_mask_boxes"][:len(ids)])
    for key in ("ious", "areas", "at_gt"):
        found[key] = np.array(found[key])
    for key in ("crops", "extents"):
        found[key] = np.concatenate(found[key])
    return found


def summarize(found):
    ious, small, at_gt = found["ious"], found["areas"] < SMALL_AREA, found["at_gt"]
    return (f"at {len(ious)} proposals: mean IoU {ious.mean():.4f}, median "
            f"{np.median(ious):.4f}, small (area < 32^2) {ious[small].mean():.4f}, medium+large "
            f"{ious[~small].mean():.4f}, min {ious.min():.4f}; at the {at_gt.sum()} gt boxes "
            f"alone: mean {ious[at_gt].mean():.4f}, small {ious[at_gt & small].mean():.4f} "
            f"({(at_gt & small).sum()}), medium+large {ious[at_gt & ~small].mean():.4f}")


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
        cls.num_records = len(records)
        cls.found = measure(records, annotations, flip=False)
        cls.flipped = measure(records, annotations, flip=True)
        cls.ious, cls.areas, cls.at_gt = (cls.found[key] for key in ("ious", "areas", "at_gt"))
        cls.matched_ids = cls.found["matched_ids"]
        cls.summary = (f"coco128 mask fidelity (28x28 targets from 112x112 crops vs polygons "
                       f"at 28x28): {summarize(cls.found)}; flipped: {summarize(cls.flipped)}")
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

    def test_flipped_images_are_as_faithful(self):
        # The same instances, each flipped with its image, against the reference's flipped
        # polygons: an extent or crop mirrored by another reflection than the boxes' would
        # shift every target by a pixel and show here.
        self.assertEqual(self.flipped["matched_ids"], self.matched_ids)
        self.assertGreaterEqual(self.flipped["ious"].mean(), MIN_MEAN_IOU, msg=self.summary)
        self.assertAllClose(self.flipped["ious"].mean(), self.ious.mean(), atol=FLIP_IOU_ATOL,
                            msg=self.summary)

    def test_target_over_the_whole_extent_is_the_resampled_crop(self):
        # Independently of the op: an ROI equal to the extent samples the crop at crop index
        # (k + 0.5) * 112 / 28 - 0.5, i.e. bilinear_resample. Compared away from the 0.5
        # threshold, where float32 against float64 rounding could decide.
        found = self.found
        index = np.arange(len(found["crops"]))[None]
        ours = mask_targets.mask_targets(found["crops"][None], found["extents"][None],
                                         found["extents"][None], index, TARGET_SIZE).numpy()[0]
        values = bilinear_resample(found["crops"], TARGET_SIZE)
        clear = np.abs(values - 0.5) > 1e-4
        self.assertGreater(clear.mean(), 0.99)
        self.assertAllEqual(ours[clear], (values >= 0.5)[clear])

    def test_small_objects_are_not_broken(self):
        # Not a requirement of the issue, a guard: a box or half-pixel convention error shows
        # first on small objects (one pixel is several bins); ~0.94 is measured.
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
