"""The dataset builder: filtering, shapes, sharding, exactly-once eval, determinism, errors."""

import io
import json
import os
import shutil
import tempfile
from unittest import mock

import gin
import numpy as np
import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from tfrecord_tools import conversion, make_synthetic_coco, tf_example

NUM_IMAGES = 13  # not a multiple of any batch size used below
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


class DatasetBuilderTest(tf.test.TestCase):

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

    def builder(self, is_training=True, batch=2, **kwargs):
        kwargs = {**SMALL, "seed": 3, **kwargs}
        return db.DatasetBuilder(self.pattern, is_training, batch, **kwargs)

    def test_training_filters_crowd_only_and_empty_images_and_counts_them(self):
        builder = self.builder(batch=1, repeat=False)
        self.assertEqual(builder.num_records, NUM_IMAGES)
        self.assertEqual(builder.num_train_images, len(self.usable_ids))
        self.assertNotIn(2, self.usable_ids)
        self.assertIn(f"{NUM_IMAGES - len(self.usable_ids)} dropped", builder.summary)
        seen = [int(b["source_id"][0]) for b in builder()]
        self.assertCountEqual(seen, self.usable_ids)  # one epoch: each usable image once

    def test_train_batches_have_static_shapes_dtypes_and_padding(self):
        builder = self.builder(batch=2, max_instances=6, mask_size=16)
        orientations = set()
        for batch in builder().take(8):
            batch = as_numpy(batch)
            images = batch["images"]
            self.assertIn(images.shape, [(2, 64, 96, 3), (2, 96, 64, 3)])
            orientations.add(images.shape)
            self.assertEqual(images.dtype, np.float32)
            self.assertEqual(batch["gt_boxes"].shape, (2, 6, 4))
            self.assertEqual(batch["gt_classes"].dtype, np.int32)
            self.assertEqual(batch["gt_masks"].shape, (2, 6, 16, 16))
            for i in range(2):
                h, w = batch["image_size"][i]
                valid = batch["gt_classes"][i] > 0
                self.assertGreater(valid.sum(), 0)  # training never sees an image without gt
                # Padding: -1 after the valid instances, valid ones first.
                self.assertTrue(np.all(batch["gt_classes"][i][~valid] == -1))
                self.assertTrue(np.all(batch["gt_boxes"][i][~valid] == -1))
                self.assertTrue(np.all(batch["gt_masks"][i][~valid] == -1))
                self.assertEqual(int(valid.sum()), int(np.argmin(valid)) if not valid.all()
                                 else len(valid))
                boxes = batch["gt_boxes"][i][valid]
                self.assertTrue(np.all(boxes[:, 2] <= h - 1) and np.all(boxes[:, 3] <= w - 1))
                self.assertTrue(np.all(boxes[:, :2] >= 0))
                masks = batch["gt_masks"][i][valid]
                self.assertTrue(np.all((masks >= 0) & (masks <= 1)))
                # Beyond the resized image the padding is exactly zero.
                self.assertAllEqual(images[i, h:], np.zeros_like(images[i, h:]))
                self.assertAllEqual(images[i, :, w:], np.zeros_like(images[i, :, w:]))
        self.assertLen(orientations, 2)  # both groups occur, each batch is one orientation

    def test_same_seed_same_batches_other_seed_other_order(self):
        def first_batches(seed):
            dataset = self.builder(batch=2, seed=seed)()
            return [as_numpy(b) for b in dataset.take(6)]

        a, b, c = first_batches(11), first_batches(11), first_batches(12)
        for x, y in zip(a, b):
            for key in x:
                self.assertAllEqual(x[key], y[key])
        order = [list(x["source_id"]) for x in a]
        self.assertNotEqual(order, [list(x["source_id"]) for x in c])

    def test_flips_happen_and_depend_on_the_seed_only(self):
        builder = self.builder(batch=1, repeat=False, flip_probability=0.5)
        unflipped = self.builder(batch=1, repeat=False, flip_probability=0.0)
        flipped_any = False
        for x, y in zip(builder(), unflipped()):
            self.assertEqual(int(x["source_id"][0]), int(y["source_id"][0]))
            if not np.allclose(x["gt_boxes"].numpy(), y["gt_boxes"].numpy()):
                flipped_any = True
                w = float(y["image_size"][0][1])
                valid = y["gt_classes"].numpy()[0] > 0
                ours = x["gt_boxes"].numpy()[0][valid]
                plain = y["gt_boxes"].numpy()[0][valid]
                self.assertAllClose(ours[:, 1], w - 1 - plain[:, 3])
                self.assertAllClose(x["gt_masks"].numpy()[0][valid],
                                    y["gt_masks"].numpy()[0][valid][:, :, ::-1])
        self.assertTrue(flipped_any)

    def test_train_sharding_by_record_gives_disjoint_pipelines(self):
        one_file = self.builder(batch=2, repeat=False)
        one_file.files = one_file.files[:1]  # fewer files than pipelines: shard by record
        seen = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(2, pipeline_id, 2)
            ids = [i for b in one_file(context) for i in b["source_id"].numpy().tolist()]
            seen.append(set(ids))
        self.assertEmpty(seen[0] & seen[1])
        self.assertNotEmpty(seen[0])
        self.assertNotEmpty(seen[1])

    def test_eval_every_image_exactly_once_with_two_pipelines(self):
        builder = self.builder(is_training=False, batch=4)
        counts = []
        valid_ids = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(2, pipeline_id, 2)  # 2 replicas, batch 2 each
            batches = [as_numpy(b) for b in builder(context)]
            counts.append(len(batches))
            for batch in batches:
                self.assertEqual(batch["images"].shape[0], 2)
                valid_ids += batch["source_id"][batch["is_valid"]].tolist()
                # Invalid entries are all-zero padding.
                self.assertAllEqual(batch["images"][~batch["is_valid"]],
                                    np.zeros_like(batch["images"][~batch["is_valid"]]))
        self.assertEqual(counts[0], counts[1])
        self.assertCountEqual(valid_ids, [image["id"] for image in self.coco["images"]])

    def test_eval_exactly_once_under_mirrored_strategy_on_two_devices(self):
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        self.assertLen(devices, 2)
        strategy = tf.distribute.MirroredStrategy(devices)
        builder = self.builder(is_training=False, batch=6)  # 3 per replica, 13 images
        dataset = builder.distribute(strategy)
        seen, steps = [], 0
        for batch in dataset:
            steps += 1
            ids = strategy.experimental_local_results(batch["source_id"])
            valid = strategy.experimental_local_results(batch["is_valid"])
            sizes = strategy.experimental_local_results(batch["original_size"])
            scales = strategy.experimental_local_results(batch["scale"])
            for replica_ids, replica_valid, size, scale in zip(ids, valid, sizes, scales):
                for image_id, ok, hw, s in zip(replica_ids.numpy(), replica_valid.numpy(),
                                               size.numpy(), scale.numpy()):
                    if ok:
                        seen.append(int(image_id))
                        image = self.images[int(image_id)]
                        self.assertAllEqual(hw, [image["height"], image["width"]])
                        self.assertGreater(s[0], 0)
        self.assertCountEqual(seen, list(self.images))
        self.assertGreater(steps, 0)


class GinTest(tf.test.TestCase):

    def test_builder_arguments_come_from_gin(self):
        root = self.create_tempdir().full_path
        pattern, _, _ = make_records(root, num_shards=1)
        gin.parse_config([f"DatasetBuilder.file_pattern = '{pattern}'",
                          "DatasetBuilder.min_size = 32", "DatasetBuilder.max_size = 64",
                          "DatasetBuilder.mask_size = 8"])
        try:
            builder = db.DatasetBuilder(is_training=True, global_batch_size=1)
            batch = next(iter(builder()))
        finally:
            gin.clear_config()
        self.assertIn(tuple(batch["images"].shape[1:3]), [(32, 64), (64, 32)])
        self.assertEqual(batch["gt_masks"].shape[2:], (8, 8))


class BadInputTest(tf.test.TestCase):

    def test_pattern_matching_nothing(self):
        with self.assertRaisesRegex(db.InputError, "matches no file"):
            db.DatasetBuilder("/nonexistent/dir/train-*", True, 2)

    def test_file_that_is_not_a_tfrecord(self):
        path = os.path.join(self.create_tempdir().full_path, "x-00000-of-00001.tfrecord")
        with open(path, "wb") as f:
            f.write(b"some text that is certainly not a TFRecord file at all")
        with self.assertRaisesRegex(db.InputError, f"{path}: not a TFRecord file"):
            db.DatasetBuilder(path, True, 2, **SMALL)

    def test_records_without_masks(self):
        path = os.path.join(self.create_tempdir().full_path, "nomask.tfrecord")
        record = {
            "image/encoded": [b"\xff\xd8"], "image/source_id": [b"1"], "image/height": [8],
            "image/width": [8], "image/object/bbox/ymin": [0.1], "image/object/bbox/xmin": [0.1],
            "image/object/bbox/ymax": [0.9], "image/object/bbox/xmax": [0.9],
            "image/object/class/label": [1], "image/object/is_crowd": [0],
        }
        with tf.io.TFRecordWriter(path) as writer:
            writer.write(tf_example.serialize(record))
        with self.assertRaisesRegex(db.InputError, f"{path}: records lack the feature.*mask"):
            db.DatasetBuilder(path, True, 2, **SMALL)
        # Without masks needed (evaluation), the same file is accepted.
        self.assertEqual(db.DatasetBuilder(path, False, 2, **SMALL).num_records, 1)


if __name__ == "__main__":
    tf.test.main()
