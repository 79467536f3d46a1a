"""Input files and the start-up scan: bad input, the orientation rule, the scan's arrays."""

import os

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from official_maskrcnn.data import decoder, parsers, records
from tests.data.builder_records import SMALL, RecordsTestCase
from tfrecord_tools import tf_example


class OrientationRuleTest(tf.test.TestCase):
    """`parsers.is_portrait`, the one rule: height / width >= 1 is portrait, squares included."""

    SIZES = [(10, 10), (10, 11), (11, 10), (1, 1), (600, 800), (800, 600)]
    EXPECTED = [True, False, True, True, False, True]

    def test_eager(self):
        for (height, width), expected in zip(self.SIZES, self.EXPECTED):
            parsed = {"height": tf.constant(height, tf.int64),
                      "width": tf.constant(width, tf.int64)}
            self.assertEqual(bool(parsers.is_portrait(parsed)), expected, (height, width))

    def test_inside_tf_data(self):
        heights, widths = zip(*self.SIZES)
        dataset = tf.data.Dataset.from_tensor_slices(
            {"height": tf.constant(heights, tf.int64), "width": tf.constant(widths, tf.int64)})
        self.assertEqual(list(dataset.map(parsers.is_portrait).as_numpy_iterator()),
                         self.EXPECTED)


class ScanTest(RecordsTestCase):
    """The scan's arrays, in the global record order, against the COCO json."""

    def test_scan_arrays_follow_the_json(self):
        files = records.resolve_files(self.pattern)
        scan = records.scan_records(files)
        ids = self.record_source_ids()
        self.assertAllEqual(scan["portrait"], [self.is_portrait(i) for i in ids])
        squares = [n for n, i in enumerate(ids)
                   if self.images[i]["height"] == self.images[i]["width"]]
        self.assertNotEmpty(squares)  # the edge case occurs: squares are portrait
        self.assertTrue(scan["portrait"][squares].all())
        self.assertAllEqual(scan["trainable"], [i in self.usable_ids for i in ids])
        self.assertAllEqual(scan["num_trainable"] > 0, scan["trainable"])
        counts = [sum(1 for _ in tf.data.TFRecordDataset(path)) for path in files]
        self.assertAllEqual(scan["file_index"], np.repeat(np.arange(len(files)), counts))
        self.assertAllEqual(records.file_starts(scan["file_index"], len(files)),
                            np.cumsum([0] + counts[:-1]))
        # indexed_records numbers a file's records from its start in the global order.
        second = list(records.indexed_records(files[1], counts[0]).as_numpy_iterator())
        self.assertEqual([index for index, _ in second], list(range(counts[0], len(ids))))
        source_id = decoder.parse_example(second[0][1], include_masks=False)["source_id"]
        self.assertEqual(int(source_id), ids[counts[0]])

    def test_comma_separated_patterns_resolve_to_sorted_unique_files(self):
        files = records.resolve_files(self.pattern)
        self.assertEqual(records.resolve_files(f"{files[1]}, {self.pattern}"), files)


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
            # A real 8 x 8 JPEG: the start-up scan parses every image's header.
            "image/encoded": [tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()],
            "image/source_id": [b"1"], "image/height": [8],
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
