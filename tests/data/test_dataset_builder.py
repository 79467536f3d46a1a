"""The dataset builder: filtering, shapes, sharding, exactly-once eval, determinism, gin."""

import gin
import numpy as np
import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from tests.data.builder_records import (
    NUM_IMAGES,
    CountingParser,
    RecordsTestCase,
    as_numpy,
    assert_same_batches,
    make_records,
    source_ids,
)


class DatasetBuilderTest(RecordsTestCase):

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
        first_file = sorted(tf.io.gfile.glob(self.pattern))[0]
        one_file = self.builder(batch=2, pattern=first_file)  # 1 file, 2 pipelines: by record
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
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
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


class TrainEpochTest(RecordsTestCase):
    """Training as a function of (seed, epoch, start_batch); expectations from the COCO json."""

    def test_same_epoch_same_batches_other_epoch_other_order(self):
        a = [as_numpy(b) for b in self.builder(batch=2)(epoch=1)]
        b = [as_numpy(b) for b in self.builder(batch=2)(epoch=1)]  # a fresh builder
        assert_same_batches(self, a, b)
        epoch_0 = source_ids(self.builder(batch=2)(epoch=0))
        self.assertNotEqual(epoch_0, [x["source_id"].tolist() for x in a])
        self.assertEqual({i for batch in epoch_0 for i in batch}, self.usable_ids)

    def test_start_batch_is_the_epoch_without_its_first_batches_flips_included(self):
        builder = self.builder(batch=2, flip_probability=0.5)
        steps = builder.steps_per_epoch()
        full = [as_numpy(b) for b in builder(epoch=2)]
        self.assertLen(full, steps)
        for start in (1, steps - 2):
            resumed = [as_numpy(b) for b in builder(epoch=2, start_batch=start)]
            assert_same_batches(self, resumed, full[start:])
        self.assertEmpty(list(builder(epoch=2, start_batch=steps)))
        with self.assertRaisesRegex(ValueError, r"start_batch must be in \[0, "):
            builder(epoch=2, start_batch=steps + 1)
        # The compared tail has flipped images, so the flip seeds were really put to the test.
        plain = [as_numpy(b) for b in self.builder(batch=2, flip_probability=0.0)(epoch=2)]
        self.assertEqual([x["source_id"].tolist() for x in plain],
                         [x["source_id"].tolist() for x in full])
        self.assertTrue(any(not np.array_equal(x["images"], y["images"])
                            for x, y in zip(full[steps - 2:], plain[steps - 2:])))

    def test_skipped_batches_are_never_decoded(self):
        builder = self.builder(batch=2)
        steps = builder.steps_per_epoch()
        counter = builder.parser = CountingParser(builder.parser)
        self.assertLen(list(builder(epoch=0, start_batch=steps - 1)), 1)
        self.assertEqual(counter.calls, 2)  # only the last batch's two images
        self.assertLen(list(builder(epoch=0)), steps)
        self.assertEqual(counter.calls, 2 + 2 * steps)

    def test_epoch_none_streams_the_epochs_one_after_another(self):
        builder = self.builder(batch=2)
        steps = builder.steps_per_epoch()
        epochs = [[as_numpy(b) for b in builder(epoch=e)] for e in range(2)]
        stream = [as_numpy(b) for b in builder(epoch=None, start_batch=steps - 1).take(steps + 1)]
        assert_same_batches(self, stream, epochs[0][-1:] + epochs[1])
        once = self.builder(batch=2, repeat=False)
        self.assertEqual(source_ids(once(epoch=None)), source_ids(builder(epoch=0)))

    def test_train_element_spec_is_static_but_for_the_orientation(self):
        spec = self.builder(batch=2, max_instances=6, mask_size=16)().element_spec
        self.assertEqual(spec["images"].shape.as_list(), [2, None, None, 3])
        self.assertEqual(spec["gt_boxes"].shape.as_list(), [2, 6, 4])
        self.assertEqual(spec["gt_masks"].shape.as_list(), [2, 6, 16, 16])
        self.assertEqual(spec["source_id"].shape.as_list(), [2])

    def test_two_replicas_of_one_pipeline_under_mirrored_strategy(self):
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        self.assertLen(devices, 2)
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
        builder = self.builder(batch=4)  # 2 images per replica
        steps = builder.steps_per_epoch(1, 2)

        def run(start_batch):
            steps_seen = []
            for batch in builder.distribute(strategy, epoch=1, start_batch=start_batch):
                for images in strategy.experimental_local_results(batch["images"]):
                    self.assertIn(tuple(images.shape), [(2, 64, 96, 3), (2, 96, 64, 3)])
                steps_seen.append([ids.numpy().tolist() for ids in
                                   strategy.experimental_local_results(batch["source_id"])])
            return steps_seen

        full = run(0)
        self.assertLen(full, steps)
        self.assertEqual({i for step in full for ids in step for i in ids}, self.usable_ids)
        self.assertEqual(run(steps - 2), full[-2:])
        # The strategy hands the pipeline's consecutive batches to consecutive replicas.
        pipeline = source_ids(builder(tf.distribute.InputContext(1, 0, 2), epoch=1))
        self.assertEqual([ids for step in full for ids in step], pipeline)

    def test_cached_records_give_the_same_epoch_again(self):
        builder = self.builder(batch=2, cache=True)
        first = source_ids(builder(epoch=1))  # fills the cache
        self.assertEqual({i for batch in first for i in batch}, self.usable_ids)
        self.assertEqual(source_ids(builder(epoch=1, start_batch=2)), first[2:])
        self.assertNotEqual(source_ids(builder(epoch=0)), first)


class OrientationTest(RecordsTestCase):
    """One orientation rule (`parsers.is_portrait`) for the padded shapes, the training
    grouping (the scan) and the eval grouping."""

    def test_image_shapes_are_the_padded_shapes_of_both_orientations(self):
        self.assertEqual(self.builder().image_shapes, ((64, 96), (96, 64)))
        self.assertEqual(self.builder(is_training=False).image_shapes, ((64, 96), (96, 64)))
        self.assertEqual(self.builder(min_size=800, max_size=1333).image_shapes,
                         ((800, 1344), (1344, 800)))
        self.assertEqual(self.builder(min_size=33, max_size=64).image_shapes,
                         ((64, 64), (64, 64)))

    def orientations(self, builder, dataset):
        """{source id: set of orientations (True: portrait) of the batches it came in}."""
        landscape, portrait = builder.image_shapes
        found = {}
        for batch in dataset:
            shape = tuple(batch["images"].shape[1:3])
            self.assertIn(shape, [landscape, portrait])
            ids = batch["source_id"].numpy()
            valid = batch["is_valid"].numpy() if "is_valid" in batch else np.ones(len(ids), bool)
            for image_id in ids[valid]:
                found.setdefault(int(image_id), set()).add(shape == portrait)
        return found

    def test_train_and_eval_classify_every_record_the_same_way(self):
        expected = {image_id: {self.is_portrait(image_id)} for image_id in self.images}
        self.assertIn({True}, [expected[i] for i in self.usable_ids])
        self.assertIn({False}, [expected[i] for i in self.usable_ids])
        train = self.builder(batch=2)
        evaluation = self.builder(is_training=False, batch=2)
        scan = dict(zip(self.record_source_ids(), train.scan["portrait"]))
        self.assertEqual({i: {bool(p)} for i, p in scan.items()}, expected)
        self.assertEqual(self.orientations(train, train(epoch=0)),
                         {i: expected[i] for i in self.usable_ids})
        self.assertEqual(self.orientations(evaluation, evaluation()), expected)

    def test_square_padded_shape_keeps_two_eval_groups_and_equal_pipelines(self):
        # min_size = max_size = 64: both orientations pad to 64 x 64. Grouping by the padded
        # shape gave pipelines of 4 and 3 batches (P=2) and 3, 3, 2 (P=3) here.
        for num_pipelines in (2, 3):
            builder = self.builder(is_training=False, batch=2 * num_pipelines, min_size=64,
                                   max_size=64)  # 2 images per replica, 1 replica per pipeline
            self.assertEqual(builder.image_shapes, ((64, 64), (64, 64)))
            counts, seen = [], []
            for pipeline_id in range(num_pipelines):
                context = tf.distribute.InputContext(num_pipelines, pipeline_id, num_pipelines)
                batches = [as_numpy(b) for b in builder(context)]
                counts.append(len(batches))
                for batch in batches:
                    sizes = batch["original_size"][batch["is_valid"]]
                    self.assertLessEqual(len(set((sizes[:, 0] >= sizes[:, 1]).tolist())), 1)
                    seen += batch["source_id"][batch["is_valid"]].tolist()
            self.assertEqual(counts, [builder.eval_batches_per_pipeline(num_pipelines, 2, 1)]
                             * num_pipelines)
            self.assertCountEqual(seen, list(self.images))


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


if __name__ == "__main__":
    tf.test.main()
