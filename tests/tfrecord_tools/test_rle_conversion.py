"""Bad RLE through the whole converter: skipped and counted, never fatal, never nondeterministic."""

import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tfrecord_tools import conversion, masks
from tfrecord_tools import tally as T
from tfrecord_tools import tf_example, verify_tfrecord

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_IMAGES = os.path.join(COCO128, "train2017")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")
HEIGHT, WIDTH = 48, 64


def _compressed_counts(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _shard_digests(prefix):
    digests = []
    for path in sorted(glob.glob(prefix + "-*-of-*.tfrecord")):
        with open(path, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    return digests


def _records(prefix):
    return [tf_example.parse(r) for path in sorted(glob.glob(prefix + "-*-of-*.tfrecord"))
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


class BadRleConversionTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = self.create_tempdir().full_path
        self.image_dir = os.path.join(self.tmp, "images")
        os.makedirs(self.image_dir)
        pixels = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(self.image_dir, "a.jpg"), quality=90)

    def write_json(self, segmentations):
        """One image whose annotation 100 + i has segmentations[i] -> the JSON's path."""
        annotations = [{"id": 100 + i, "image_id": 1, "category_id": 1, "iscrowd": 1,
                        "bbox": [10, 10, 20, 20], "area": 400.0, "segmentation": segmentation}
                       for i, segmentation in enumerate(segmentations)]
        annotations_file = os.path.join(self.tmp, "annotations.json")
        with open(annotations_file, "w") as f:
            json.dump({"images": [{"id": 1, "file_name": "a.jpg", "height": HEIGHT,
                                   "width": WIDTH}],
                       "annotations": annotations,
                       "categories": [{"id": 1, "name": "thing"}]}, f)
        return annotations_file

    def convert(self, segmentations, name):
        """Converts write_json(segmentations) in this process -> (prefix, manifest)."""
        annotations_file = self.write_json(segmentations)
        prefix = os.path.join(self.tmp, name, "rle")
        manifest = conversion.convert(self.image_dir, annotations_file, prefix, num_shards=1,
                                      num_workers=1, progress_stream=io.StringIO())
        return prefix, manifest

    def assert_verifies(self, prefix):
        annotations_file = os.path.join(self.tmp, "annotations.json")
        report = verify_tfrecord.verify(prefix + "-*", annotations_file, out=io.StringIO())
        self.assertEqual(report.messages, [])

    def test_rle_of_another_size_is_counted_and_shards_are_deterministic(self):
        good = np.zeros((HEIGHT, WIDTH), np.uint8)
        good[10:30, 10:30] = 1
        ten_by_ten = _compressed_counts(np.ones((10, 10)))  # valid, but covers 100 pixels only
        # The short RLE comes first: decoded after another mask, it would reuse that mask's freed
        # buffer and look deterministic.
        annotations_file = self.write_json([
            {"size": [HEIGHT, WIDTH], "counts": ten_by_ten},
            {"size": [HEIGHT, WIDTH], "counts": _compressed_counts(good)}])
        # Three separate processes, as three runs of the tool: pycocotools decoded the short RLE
        # into a buffer it never fully wrote, whose leftover bytes differ from process to process.
        prefixes = [os.path.join(self.tmp, f"run{i}", "rle") for i in range(3)]
        for prefix in prefixes:
            subprocess.run([sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord",
                            "--image_dir", self.image_dir, "--annotations_file", annotations_file,
                            "--output_prefix", prefix, "--num_shards", "1", "--num_workers", "1"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        digests = [_shard_digests(prefix) for prefix in prefixes]
        self.assertLen(digests[0], 1)
        self.assertEqual(digests[1], digests[0])
        self.assertEqual(digests[2], digests[0])
        with open(prefixes[0] + ".manifest.json") as f:
            manifest = json.load(f)
        self.assertEqual(manifest["annotations_written"], 1)
        self.assertEqual(manifest["annotations_skipped"], 1)
        self.assertEqual(manifest["skipped_annotations"][T.ANNOTATION_SEGMENTATION_INVALID]
                         ["first_ids"], [100])
        (record,) = _records(prefixes[0])
        self.assertEqual(list(record["image/object/annotation_id"]), [101])
        self.assertAllEqual(masks.decode_png(record["image/object/mask"][0]), good)
        self.assert_verifies(prefixes[0])

    def test_malformed_rle_is_skipped_not_fatal(self):
        good = np.zeros((HEIGHT, WIDTH), np.uint8)
        good[5:15, 30:50] = 1
        counts = _compressed_counts(good)
        full = {"size": [HEIGHT, WIDTH], "counts": [0, HEIGHT * WIDTH]}  # runs start with 0s
        segmentations = [
            {"size": [HEIGHT, WIDTH], "counts": counts},  # 100: kept
            {"size": [HEIGHT, WIDTH], "counts": "!!!"},  # characters outside the alphabet
            {"size": [HEIGHT, WIDTH], "counts": counts[:-1]},  # truncated
            {"size": [HEIGHT, WIDTH], "counts": "hm2M[2"},  # runs [3000, -3, 75]
            {"size": [HEIGHT, WIDTH], "counts": [-1, HEIGHT * WIDTH + 1]},
            {"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH + 1]},
            {"size": [WIDTH, HEIGHT], "counts": [HEIGHT * WIDTH]},
            full,  # 107: kept, an all-object mask
        ]
        prefix, manifest = self.convert(segmentations, "malformed")
        self.assertEqual(manifest["annotations_written"], 2)
        invalid = manifest["skipped_annotations"][T.ANNOTATION_SEGMENTATION_INVALID]
        self.assertEqual(invalid["count"], 6)
        self.assertEqual(invalid["first_ids"], [101, 102, 103, 104, 105])
        (record,) = _records(prefix)
        self.assertEqual(list(record["image/object/annotation_id"]), [100, 107])
        self.assertAllEqual(masks.decode_png(record["image/object/mask"][0]), good)
        self.assertTrue(masks.decode_png(record["image/object/mask"][1]).all())
        self.assert_verifies(prefix)


class Coco128CrowdRleTest(tf.test.TestCase):
    """coco128's crowd annotations (uncompressed RLE) convert as before, and so do the same masks
    given as compressed strings: both give pycocotools' annToMask and byte-identical shards."""

    def test_crowd_rle_compressed_and_uncompressed(self):
        tmp = self.create_tempdir().full_path
        with open(COCO128_JSON) as f:
            data = json.load(f)
        crowd_image_ids = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
        subset = {
            "images": [image for image in data["images"] if image["id"] in crowd_image_ids],
            "annotations": [a for a in data["annotations"] if a["image_id"] in crowd_image_ids],
            "categories": data["categories"],
        }
        compressed = json.loads(json.dumps(subset))
        for annotation in compressed["annotations"]:
            if annotation["iscrowd"]:
                height, width = annotation["segmentation"]["size"]
                rle = mask_utils.frPyObjects(annotation["segmentation"], height, width)
                annotation["segmentation"] = {"size": rle["size"],
                                              "counts": rle["counts"].decode("ascii")}
        prefixes = {}
        for name, payload in (("uncompressed", subset), ("compressed", compressed)):
            annotations_file = os.path.join(tmp, f"{name}.json")
            with open(annotations_file, "w") as f:
                json.dump(payload, f)
            prefixes[name] = os.path.join(tmp, name, "crowd")
            manifest = conversion.convert(COCO128_IMAGES, annotations_file, prefixes[name],
                                          num_shards=2, num_workers=1,
                                          progress_stream=io.StringIO())
            self.assertEqual(manifest["crowd_annotations_written"], 10)
            self.assertEqual(manifest["skipped_annotations"], {})
        self.assertEqual(_shard_digests(prefixes["compressed"]),
                         _shard_digests(prefixes["uncompressed"]))

        coco = COCO()
        coco.dataset = subset
        coco.createIndex()
        checked = 0
        for record in _records(prefixes["compressed"]):
            for i, annotation_id in enumerate(record["image/object/annotation_id"]):
                annotation = coco.anns[int(annotation_id)]
                if annotation["iscrowd"]:
                    self.assertAllEqual(masks.decode_png(record["image/object/mask"][i]),
                                        coco.annToMask(annotation))
                    checked += 1
        self.assertEqual(checked, 10)


if __name__ == "__main__":
    tf.test.main()
