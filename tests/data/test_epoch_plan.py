"""The epoch plan: batch counts, sharding, fillers and duplicates, by hand and on records."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from official_maskrcnn.data import epoch_plan
from tests.data.builder_records import RecordsTestCase, source_ids

# Six records in two files, by hand: orientation and whether training keeps them.
PORTRAIT = np.array([True, False, False, True, True, False])
SCAN = {"portrait": PORTRAIT, "trainable": np.array([True, True, False, True, True, True]),
        "file_index": np.array([0, 0, 0, 1, 1, 1])}
NUM_FILES = 2


class BatchCountTest(tf.test.TestCase):
    """`num_batches`, the one count of every plan: ceil(landscape / B) + ceil(portrait / B)."""

    def test_ceil_div(self):
        self.assertEqual([epoch_plan.ceil_div(n, d) for n, d in [(0, 3), (7, 2), (6, 3), (1, 5)]],
                         [0, 4, 2, 1])

    def test_each_orientation_rounds_up_separately(self):
        cases = [([], 2, 0), ([False] * 3, 2, 2), ([True, False], 2, 2), ([True] * 4, 2, 2),
                 ([True] * 5 + [False], 4, 3), ([True, False, True], 1, 3)]
        for portrait, batch_size, expected in cases:
            with self.subTest(portrait=portrait, batch_size=batch_size):
                self.assertEqual(
                    epoch_plan.num_batches(np.array(portrait, bool), batch_size), expected)


class TrainEpochPlanTest(tf.test.TestCase):
    """`train_epoch_plan` on the six hand-made records; every figure computed by hand."""

    def plan(self, global_batch_size, num_pipelines=1, replicas=1):
        return epoch_plan.train_epoch_plan(SCAN, NUM_FILES, global_batch_size, num_pipelines,
                                           replicas)

    def test_one_pipeline(self):
        # Trainable: records 0, 3, 4 portrait, 1, 5 landscape; B = 2 -> 2 + 1 batches.
        self.assertEqual(self.plan(2), {"steps_per_epoch": 3, "batch_size": 2, "records": [5],
                                        "batches": [3], "fillers": [0], "duplicates": [1]})

    def test_two_pipelines_shard_by_file(self):
        # File 0: records 0 (portrait), 1 (landscape); file 1: 3, 4 (portrait), 5 (landscape).
        self.assertTrue(epoch_plan.shards_by_file(NUM_FILES, 2))
        self.assertAllEqual(epoch_plan.pipeline_records(SCAN, NUM_FILES, 2, 1),
                            [False, False, False, True, True, True])
        self.assertEqual(self.plan(4, 2), {"steps_per_epoch": 2, "batch_size": 2,
                                           "records": [2, 3], "batches": [2, 2],
                                           "fillers": [0, 0], "duplicates": [2, 1]})

    def test_three_pipelines_shard_by_record_and_fill_up(self):
        # Pipeline p keeps records p and p + 3: {0, 3}, {1, 4}, {5} (record 2 is untrainable).
        self.assertFalse(epoch_plan.shards_by_file(NUM_FILES, 3))
        self.assertEqual(self.plan(3, 3), {"steps_per_epoch": 2, "batch_size": 1,
                                           "records": [2, 2, 1], "batches": [2, 2, 1],
                                           "fillers": [0, 0, 1], "duplicates": [0, 0, 1]})

    def test_replicas_round_the_batches_up_to_whole_steps(self):
        # 3 batches for 2 replicas: 2 steps = 4 batches, one of them a filler.
        self.assertEqual(self.plan(4, 1, 2), {"steps_per_epoch": 2, "batch_size": 2,
                                              "records": [5], "batches": [3], "fillers": [1],
                                              "duplicates": [3]})

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "global_batch_size 3 is not divisible by the 2"):
            self.plan(3, 2)
        with self.assertRaisesRegex(db.InputError, "input pipeline 2 of 6 has no trainable"):
            self.plan(6, 6)


class EvalBatchesTest(tf.test.TestCase):
    """Eval shards by record: pipeline p gets records p, p + P, ...; all yield the most."""

    def test_counts_by_hand(self):
        # P = 3, B = 2: {0, 3} portrait -> 1; {1, 4} one of each -> 2; {2, 5} landscape -> 1.
        self.assertEqual([epoch_plan.eval_pipeline_batches(PORTRAIT, 3, p, 2) for p in range(3)],
                         [1, 2, 1])
        self.assertEqual(epoch_plan.eval_batches_per_pipeline(PORTRAIT, 3, 2, 1), 2)
        # P = 2, B = 1: 3 batches each; 2 replicas per pipeline round that up to 4.
        self.assertEqual(epoch_plan.eval_batches_per_pipeline(PORTRAIT, 2, 1, 1), 3)
        self.assertEqual(epoch_plan.eval_batches_per_pipeline(PORTRAIT, 2, 1, 2), 4)


class EpochPlanOnRecordsTest(RecordsTestCase):
    """The plan against the batches the builder really yields; expectations from the COCO json."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.files = sorted(tf.io.gfile.glob(cls.pattern))
        cls.records = []  # (source_id, file_index) in the global record order
        for file_index, path in enumerate(cls.files):
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                feature = tf.train.Example.FromString(serialized).features.feature
                cls.records.append((int(feature["image/source_id"].bytes_list.value[0]),
                                    file_index))

    def expected_layout(self, num_pipelines, batch_size, replicas=1):
        """([P] lists of the trainable ids of each pipeline, steps per epoch), by hand."""
        by_file = len(self.files) >= num_pipelines
        ids = [[] for _ in range(num_pipelines)]
        for index, (source_id, file_index) in enumerate(self.records):
            if source_id in self.usable_ids:
                ids[(file_index if by_file else index) % num_pipelines].append(source_id)

        def batches(mine):
            portrait = sum(self.is_portrait(i) for i in mine)
            return -(-portrait // batch_size) + -(-(len(mine) - portrait) // batch_size)

        return ids, max(-(-batches(mine) // replicas) for mine in ids)

    def test_every_trainable_image_once_per_epoch_plus_the_documented_padding(self):
        for batch_size in (2, 4):
            builder = self.builder(batch=batch_size)
            batches = source_ids(builder(epoch=0))
            _, steps = self.expected_layout(1, batch_size)
            plan = builder.epoch_plan()
            self.assertEqual(plan["steps_per_epoch"], steps)
            self.assertLen(batches, steps)
            ids = [i for batch in batches for i in batch]
            self.assertEqual(set(ids), self.usable_ids)
            self.assertEqual(len(ids) - len(self.usable_ids), plan["duplicates"][0])
            self.assertGreater(plan["duplicates"][0], 0)  # 11 images: some padding is needed
            self.assertIn(f"{plan['duplicates'][0]} duplicate image(s)", builder.summary)
            for batch in batches:  # padding keeps each batch to one orientation
                self.assertLen({self.is_portrait(i) for i in batch}, 1)

    def test_steps_per_epoch_is_the_batch_count_of_every_pipeline(self):
        # (pipelines, global batch, replicas per pipeline): one pipeline; two by file (7 and 4
        # images: fillers); three by record (2 files; a pipeline with 1 landscape image: padded
        # with itself); two replicas fed by one pipeline; 2 x 2 (7 batches -> 8: a filler).
        for num_pipelines, global_batch, replicas in [(1, 2, 1), (2, 4, 1), (3, 6, 1),
                                                      (1, 4, 2), (2, 4, 2)]:
            with self.subTest(pipelines=num_pipelines, replicas=replicas):
                builder = self.builder(batch=global_batch)
                per_replica = global_batch // (num_pipelines * replicas)
                ids, steps = self.expected_layout(num_pipelines, per_replica, replicas)
                self.assertEqual(builder.steps_per_epoch(num_pipelines, replicas), steps)
                for pipeline_id in range(num_pipelines):
                    context = tf.distribute.InputContext(num_pipelines, pipeline_id,
                                                         num_pipelines * replicas)
                    batches = source_ids(builder(context, epoch=1))
                    self.assertLen(batches, steps * replicas)
                    self.assertTrue(all(len(batch) == per_replica for batch in batches))
                    self.assertEqual({i for batch in batches for i in batch},
                                     set(ids[pipeline_id]))

    def test_a_pipeline_without_records_is_an_input_error(self):
        builder = self.builder(batch=20)
        with self.assertRaisesRegex(db.InputError, "input pipeline .* of 20 has no trainable"):
            builder.steps_per_epoch(20)


if __name__ == "__main__":
    tf.test.main()
