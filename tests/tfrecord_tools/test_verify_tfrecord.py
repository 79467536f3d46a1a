"""verify_tfrecord catches each kind of damage to converted records."""

import glob
import io
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from tfrecord_tools import conversion, make_synthetic_coco, masks, tf_example, verify_tfrecord


class VerifyTamperTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        with mock.patch("sys.stderr", io.StringIO()):
            make_synthetic_coco.main(["--output_dir", cls.tmp, "--split", "s", "--num_images",
                                      "12", "--image_size", "96", "--seed", "5"])
        cls.annotations_file = os.path.join(cls.tmp, "annotations", "instances_s.json")
        cls.clean_dir = os.path.join(cls.tmp, "clean")
        conversion.convert(os.path.join(cls.tmp, "s"), cls.annotations_file,
                           os.path.join(cls.clean_dir, "s"), num_shards=2, num_workers=1,
                           progress_stream=io.StringIO())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def tampered_copy(self, edit_records):
        """Copies the clean shards, rewrites shard 0 as `edit_records(list of dicts)` returns."""
        directory = self.create_tempdir().full_path
        for path in glob.glob(os.path.join(self.clean_dir, "*")):
            shutil.copy(path, directory)
        shard = os.path.join(directory, "s-00000-of-00002.tfrecord")
        records = [tf_example.parse(r) for r in tf.data.TFRecordDataset(shard).as_numpy_iterator()]
        records = edit_records(records)
        with tf.io.TFRecordWriter(shard) as writer:
            for record in records:
                writer.write(tf_example.serialize(record))
        return os.path.join(directory, "s")

    def verify(self, prefix):
        return verify_tfrecord.verify(prefix + "-*", self.annotations_file, out=io.StringIO())

    def assert_reported(self, report, fragment):
        self.assertGreater(report.count, 0)
        self.assertTrue(any(fragment in m for m in report.messages),
                        f"{fragment!r} not in {report.messages}")

    @staticmethod
    def first_with_objects(records):
        return next(r for r in records if r["image/object/annotation_id"])

    def test_clean_records_pass(self):
        report = self.verify(os.path.join(self.clean_dir, "s"))
        self.assertEqual((report.count, report.messages), (0, []))

    def test_moved_box(self):
        def edit(records):
            self.first_with_objects(records)["image/object/bbox/xmin"][0] += 0.01
            return records
        self.assert_reported(self.verify(self.tampered_copy(edit)), "box (ymin, xmin, ymax, xmax)")

    def test_wrong_label(self):
        def edit(records):
            record = self.first_with_objects(records)
            record["image/object/class/label"][0] = record["image/object/class/label"][0] % 3 + 1
            return records
        self.assert_reported(self.verify(self.tampered_copy(edit)), "label")

    def test_one_mask_pixel_changed(self):
        def edit(records):
            record = self.first_with_objects(records)
            mask = masks.decode_png(record["image/object/mask"][0])
            mask[0, 0] = 1 - mask[0, 0]
            record["image/object/mask"][0] = masks.encode_png(mask)
            return records
        self.assert_reported(self.verify(self.tampered_copy(edit)), "in 1 pixel(s)")

    def test_dropped_annotation(self):
        def edit(records):
            record = self.first_with_objects(records)
            for key in list(record):
                if key.startswith("image/object/"):
                    record[key] = record[key][1:]
            return records
        self.assert_reported(self.verify(self.tampered_copy(edit)),
                             "passes the rules but is missing")

    def test_duplicated_and_dropped_records(self):
        report = self.verify(self.tampered_copy(lambda records: records + records[:1]))
        self.assert_reported(report, "written more than once")
        self.assert_reported(report, "sha256 differs from the manifest")
        report = self.verify(self.tampered_copy(lambda records: records[1:]))
        self.assert_reported(report, "1 JSON image(s) have no record")
        self.assert_reported(report, "records, the file holds")

    def test_flipped_crowd_flag(self):
        def edit(records):
            record = self.first_with_objects(records)
            record["image/object/is_crowd"][0] = 1 - record["image/object/is_crowd"][0]
            return records
        self.assert_reported(self.verify(self.tampered_copy(edit)), "is_crowd")

    def test_cli_exit_codes(self):
        prefix = os.path.join(self.clean_dir, "s")
        argv = ["--annotations_file", self.annotations_file, "--file_pattern"]
        with mock.patch("sys.stdout", io.StringIO()) as out:
            self.assertEqual(verify_tfrecord.main(argv + [prefix + "-*"]), 0)
        self.assertIn("OK", out.getvalue())

        def edit(records):
            self.first_with_objects(records)["image/object/bbox/ymax"][0] = np.float32(0.0)
            return records
        tampered = self.tampered_copy(edit)
        quiet_stdout = mock.patch("sys.stdout", io.StringIO())
        with mock.patch("sys.stderr", io.StringIO()) as err, quiet_stdout:
            self.assertEqual(verify_tfrecord.main(argv + [tampered + "-*"]), 1)
        self.assertIn("FAILED", err.getvalue())

        with mock.patch("sys.stderr", io.StringIO()) as err:
            self.assertEqual(verify_tfrecord.main(argv + [prefix + "-nothing-*"]), 2)
        self.assertIn("matches no file", err.getvalue())

        not_a_record = os.path.join(self.create_tempdir().full_path, "j-00000-of-00001.tfrecord")
        with open(not_a_record, "wb") as f:
            f.write(b"definitely not a TFRecord file, just some text bytes")
        with mock.patch("sys.stderr", io.StringIO()) as err, quiet_stdout:
            self.assertEqual(verify_tfrecord.main(argv + [not_a_record]), 2)
        self.assertIn("not a valid TFRecord file", err.getvalue())


if __name__ == "__main__":
    tf.test.main()
