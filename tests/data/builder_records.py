"""The tiny converted dataset the data-pipeline tests share, and helpers to read batches."""

import io
import json
import os
import shutil
import tempfile
from unittest import mock

import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from tfrecord_tools import conversion, make_synthetic_coco

NUM_IMAGES = 13  # not a multiple of any batch size the tests use
SMALL = {"min_size": 64, "max_size": 96}  # padded shapes: landscape 64x96, portrait 96x64


def make_records(root, num_shards=2):
    """A synthetic set where image 2 has only crowd annotations and one box is 1 px wide.

    Returns (file pattern, the COCO dict, the ids of the images training must use).
    """
    with mock.patch("sys.stderr", io.StringIO()):
        make_synthetic_coco.main(["--output_dir", root, "--split", "s", "--num_images",
                                  str(NUM_IMAGES), "--image_size", "96", "--seed", "7"])
    json_path = os.path.join(root, "annotations", "instances_s.json")
    with open(json_path) as f:
        coco = json.load(f)
    for annotation in coco["annotations"]:
        if annotation["image_id"] == 2:
            annotation["iscrowd"] = 1
    thin = next(a for a in coco["annotations"] if a["image_id"] == 3)
    thin["bbox"][2] = 1.0  # the reference drops boxes with width <= 1 px
    with open(json_path, "w") as f:
        json.dump(coco, f)
    conversion.convert(os.path.join(root, "s"), json_path, os.path.join(root, "rec", "s"),
                       num_shards, 1, progress_stream=io.StringIO())
    usable = {a["image_id"] for a in coco["annotations"]
              if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1}
    return os.path.join(root, "rec", "s-*"), coco, usable


def as_numpy(batch):
    return {key: value.numpy() for key, value in batch.items()}


def source_ids(dataset):
    """[num_batches] lists of the source ids of each batch."""
    return [batch["source_id"].numpy().tolist() for batch in dataset]


def assert_same_batches(test, a, b):
    test.assertEqual(len(a), len(b))
    for x, y in zip(a, b):
        test.assertEqual(set(x), set(y))
        for key in x:
            test.assertAllEqual(x[key], y[key])


class CountingParser:
    """Wraps a TrainParser and counts its calls (decode + resize), from inside tf.data."""

    def __init__(self, parser):
        self.parser = parser
        self.calls = 0

    def __call__(self, parsed, seed):
        outputs = self.parser(parsed, seed)

        def count(source_id):
            self.calls += 1
            return source_id

        counted = tf.py_function(count, [outputs["source_id"]], tf.int64)
        outputs["source_id"] = tf.ensure_shape(counted, [])
        return outputs


class RecordsTestCase(tf.test.TestCase):
    """Shares one tiny converted dataset (two shards) between the tests of a class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.pattern, cls.coco, cls.usable_ids = make_records(cls.tmp)
        cls.images = {image["id"]: image for image in cls.coco["images"]}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def builder(self, is_training=True, batch=2, pattern=None, **kwargs):
        kwargs = {**SMALL, "seed": 3, "mask_size": 16, **kwargs}
        return db.DatasetBuilder(pattern or self.pattern, is_training, batch, **kwargs)

    def record_source_ids(self):
        """[num_records] source ids in the global record order (the `scan` arrays' order)."""
        files = sorted(tf.io.gfile.glob(self.pattern))
        return [int(tf.train.Example.FromString(serialized).features.feature[
            "image/source_id"].bytes_list.value[0])
            for path in files for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator()]

    def is_portrait(self, image_id):
        """The orientation rule computed from the COCO json: height / width >= 1."""
        return self.images[image_id]["height"] >= self.images[image_id]["width"]
