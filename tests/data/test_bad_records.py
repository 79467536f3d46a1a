"""Bad data named early: damaged shards, damaged JPEGs, labels beyond the model, eval ground truth.

Each test builds a damaged copy of the shared tiny records (`damaged_records`) and expects an
`InputError` naming the file, the record (its position in the file) and its source id.
"""

import json
import os
import re

import tensorflow as tf

from official_maskrcnn.data import dataset_builder as db
from official_maskrcnn.data import decode_failures, startup_checks
from tests.data import damaged_records
from tests.data.builder_records import RecordsTestCase


class RecordsLayout(RecordsTestCase):
    """Where each record of the shared data lives: file, position, byte offset, source id."""

    def setUp(self):
        super().setUp()
        self.files = sorted(tf.io.gfile.glob(self.pattern))
        self.ids = self.record_source_ids()
        self.lengths = [[len(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
                        for path in self.files]

    def place(self, index):
        """(file index, position in the file) of global record `index`."""
        first = len(self.lengths[0])
        return (0, index) if index < first else (1, index - first)

    def offset(self, file_index, position):
        """Byte offset of a record in its file: each frame adds 16 bytes around the record."""
        return sum(length + 16 for length in self.lengths[file_index][:position])

    def copy_path(self, file_index):
        return os.path.join(self.create_tempdir().full_path, os.path.basename(
            self.files[file_index]))

    def name_regex(self, pattern, index):
        """The record as `records.record_name` names it, in the copy `pattern`."""
        file_index, position = self.place(index)
        path = sorted(tf.io.gfile.glob(pattern))[file_index]
        return f"{re.escape(path)}: record {position} \\(source id {self.ids[index]}\\)"


class DamagedShardTest(RecordsLayout):
    """Finding d: a truncated or CRC-damaged shard is named with the record and its offset."""

    def damaged_second_shard(self, damage):
        path = self.copy_path(1)
        with open(self.files[1], "rb") as f:
            data = bytearray(f.read())
        damage(data)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_truncated_shard_names_the_file_the_record_and_its_offset(self):
        offset = self.offset(1, 2)
        path = self.damaged_second_shard(lambda data: data.__delitem__(
            slice(offset + 100, None)))
        with self.assertRaisesRegex(
                db.InputError, f"^{re.escape(path)}: record 2 \\(byte offset {offset}\\) cannot "
                               f"be read, the file is truncated or damaged: truncated record"):
            db.DatasetBuilder(f"{self.files[0]},{path}", True, 2, min_size=64, max_size=96)

    def test_crc_damaged_shard_names_the_file_the_record_and_its_offset(self):
        offset = self.offset(1, 3)

        def flip(data):
            data[offset + 12 + 50] ^= 0xFF  # a byte of record 3's data: its CRC fails

        path = self.damaged_second_shard(flip)
        with self.assertRaisesRegex(
                db.InputError, f"^{re.escape(path)}: record 3 \\(byte offset {offset}\\) cannot "
                               f"be read, the file is truncated or damaged: corrupted record"):
            db.DatasetBuilder(path, False, 2, min_size=64, max_size=96)


class DamagedImageTest(RecordsLayout):
    """Finding c: a damaged JPEG is named at startup (header) or when it is decoded (body)."""

    def damaged(self, index, change):
        return damaged_records.rewrite(self.pattern, self.create_tempdir().full_path,
                                       damaged_records.edit_image(index, change))

    def test_damaged_jpeg_header_fails_at_startup_naming_the_record(self):
        index = len(self.lengths[0]) + 1  # in the second file
        pattern = self.damaged(index, damaged_records.header_damaged)
        for is_training in (True, False):
            with self.assertRaisesRegex(
                    db.InputError, f"^{re.escape(sorted(tf.io.gfile.glob(pattern))[1])}: "
                                   f"record 1 \\(byte offset {self.offset(1, 1)}, source id "
                                   f"{self.ids[index]}\\) cannot be used: .*not a JPEG"):
                self.builder(is_training, pattern=pattern)

    def test_jpeg_of_another_size_than_the_record_fails_at_startup(self):
        index = 2
        image = self.images[self.ids[index]]

        def other_size(jpeg):
            height, width = image["height"], image["width"]
            pixels = tf.zeros([height // 2, width, 3], tf.uint8)
            return tf.io.encode_jpeg(pixels).numpy()

        pattern = self.damaged(index, other_size)
        with self.assertRaisesRegex(
                db.InputError, f"^{self.name_regex(pattern, index)}: the JPEG is "
                               f"\\({image['height'] // 2}, {image['width']}\\) "
                               f"\\(height, width\\) but the record says "
                               f"\\({image['height']}, {image['width']}\\)"):
            self.builder(pattern=pattern)

    def test_truncated_jpeg_body_passes_startup_and_is_named_when_decoded(self):
        index = next(n for n, i in enumerate(self.ids) if i in self.usable_ids)
        pattern = self.damaged(index, damaged_records.body_truncated)
        for is_training in (True, False):
            builder = self.builder(is_training, pattern=pattern)  # the header is sound
            self.assertEqual(decode_failures.find_undecodable(builder), [index])
            # Without naming, the decoder's error says nothing of the file (why this exists).
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "JPEG") as raw:
                list(builder())
            self.assertNotIn(os.path.basename(builder.files[0]), raw.exception.message)
            with self.assertRaisesRegex(
                    decode_failures.UndecodableRecordError,
                    f"^{self.name_regex(pattern, index)}: its image or masks do not decode "
                    f"\\(.*JPEG.*\\); 1 record\\(s\\) of .* do not, source ids "
                    f"\\[{self.ids[index]}\\]"):
                with decode_failures.named_decode_failures(None, builder):
                    list(builder())

    def test_other_errors_pass_unchanged(self):
        builder = self.builder()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "^not about images$"):
            with decode_failures.named_decode_failures(builder):
                raise tf.errors.InvalidArgumentError(None, None, "not about images")
        # A decode error that no record explains is not blamed on the records either.
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "Invalid JPEG data"):
            with decode_failures.named_decode_failures(builder):
                raise tf.errors.InvalidArgumentError(None, None, "Invalid JPEG data")


class LabelTest(RecordsLayout):
    """Finding b: labels outside the model's 1..K-1 are named at startup, not at the first step."""

    def test_scan_holds_each_records_smallest_and_largest_label(self):
        scan = self.builder().scan
        labels = [list(tf.train.Example.FromString(r).features.feature[
            "image/object/class/label"].int64_list.value)
            for path in self.files for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
        self.assertAllEqual(scan["max_label"], [max(v, default=0) for v in labels])
        self.assertAllEqual(scan["min_label"], [min(v, default=1) for v in labels])
        self.assertAllEqual(scan["source_id"], self.ids)
        self.assertAllEqual(scan["height"], [self.images[i]["height"] for i in self.ids])
        self.assertAllEqual(scan["width"], [self.images[i]["width"] for i in self.ids])

    def test_raw_coco_ids_beyond_num_classes_are_named(self):
        index = 5
        pattern = damaged_records.rewrite(self.pattern, self.create_tempdir().full_path,
                                          damaged_records.set_labels(index, [1, 90]))
        builder = self.builder(pattern=pattern)
        startup_checks.check_labels(builder, num_classes=91)  # 1..90: fits
        with self.assertRaisesRegex(
                startup_checks.LabelError,
                f"^{self.name_regex(pattern, index)}: class label 90, but the model has "
                f"num_classes=81 \\(labels 1..80, 0 is the background\\); 1 record\\(s\\) of "
                f"{re.escape(pattern)} have labels outside, largest 90, e.g. source ids "
                f"\\[{self.ids[index]}\\]"):
            startup_checks.check_labels(builder, num_classes=81)

    def test_label_zero_is_the_background_not_an_object(self):
        pattern = damaged_records.rewrite(self.pattern, self.create_tempdir().full_path,
                                          damaged_records.set_labels(0, [0]))
        with self.assertRaisesRegex(startup_checks.LabelError, "class label 0, but"):
            startup_checks.check_labels(self.builder(pattern=pattern), num_classes=4)

    def test_labels_of_the_converter_fit_the_synthetic_classes(self):
        startup_checks.check_labels(self.builder(), num_classes=4)  # 3 shapes + background
        with self.assertRaisesRegex(startup_checks.LabelError, "class label 3, but the model "
                                                               "has num_classes=3"):
            startup_checks.check_labels(self.builder(), num_classes=3)


class EvalGroundTruthTest(RecordsLayout):
    """Finding a: eval records and the annotation JSON agree on ids and sizes, at startup."""

    def write_json(self, edit):
        coco = json.loads(json.dumps(self.coco))
        edit(coco)
        path = os.path.join(self.create_tempdir().full_path, "instances_other.json")
        with open(path, "w") as f:
            json.dump(coco, f)
        return path

    def assert_mismatch(self, path, regex):
        builder = self.builder(is_training=False)
        where = (f"^eval records {re.escape(self.pattern)} \\({len(self.ids)} records\\) and "
                 f"{re.escape(path)} \\(\\d+ images\\)")
        with self.assertRaisesRegex(startup_checks.GroundTruthMismatchError, where + regex):
            startup_checks.check_eval_ground_truth(builder, path)

    def test_the_converted_json_agrees(self):
        scored = startup_checks.check_eval_ground_truth(self.builder(is_training=False),
                                                        os.path.join(self.tmp, "annotations",
                                                                     "instances_s.json"))
        self.assertEqual(scored, len(self.ids))  # the MLPerf log's eval_samples

    def test_a_subset_of_the_json_needs_eval_allow_subset(self):
        # The records hold all but two of the JSON's images (ids 900, 901 have no record).
        def edit(coco):
            coco["images"] += [dict(coco["images"][0], id=901), dict(coco["images"][0], id=900)]

        path = self.write_json(edit)
        self.assert_mismatch(
            path, " disagree: 0 record id\\(s\\) not in the JSON, e.g. \\[\\]; 2 JSON image "
                  "id\\(s\\) without a record, e.g. \\[900, 901\\] \\(the eval set is the whole "
                  "split; .* set run.eval_allow_subset = True\\)$")
        builder = self.builder(is_training=False)
        self.assertEqual(startup_checks.check_eval_ground_truth(builder, path,
                                                                allow_subset=True),
                         len(self.ids))
        # A subset is still checked for sizes.
        first = self.coco["images"][0]

        def resize_first(coco):
            edit(coco)
            coco["images"][0]["width"] += 1

        with self.assertRaisesRegex(startup_checks.GroundTruthMismatchError,
                                    f"1 image\\(s\\) have another \\(height, width\\), e.g. id "
                                    f"{first['id']}"):
            startup_checks.check_eval_ground_truth(builder, self.write_json(resize_first),
                                                   allow_subset=True)

    def test_records_the_json_lacks_fail_even_with_eval_allow_subset(self):
        dropped = self.ids[:7]

        def edit(coco):
            coco["images"] = [i for i in coco["images"] if i["id"] not in dropped]

        path = self.write_json(edit)
        for allow_subset in (False, True):
            builder = self.builder(is_training=False)
            with self.assertRaisesRegex(
                    startup_checks.GroundTruthMismatchError,
                    f" disagree: 7 record id\\(s\\) not in the JSON, e.g. "
                    f"\\[{', '.join(str(i) for i in sorted(dropped)[:5])}\\]; 0 JSON image "
                    f"id\\(s\\) without a record, e.g. \\[\\] \\(the JSON of another split\\?\\)$"):
                startup_checks.check_eval_ground_truth(builder, path, allow_subset)

    def test_ids_missing_either_way_are_counted_with_examples(self):
        dropped = self.ids[4]

        def edit(coco):
            coco["images"] = [i for i in coco["images"] if i["id"] != dropped]
            coco["images"] += [dict(coco["images"][0], id=900), dict(coco["images"][0], id=901)]

        self.assert_mismatch(
            self.write_json(edit), f" disagree: 1 record id\\(s\\) not in the JSON, e.g. "
                                   f"\\[{dropped}\\]; 2 JSON image id\\(s\\) without a record, "
                                   f"e.g. \\[900, 901\\]")

    def test_another_split_with_the_same_ids_is_caught_by_the_sizes(self):
        def edit(coco):
            for image in coco["images"][:3]:
                image["height"] += 1

        first = self.coco["images"][0]
        self.assert_mismatch(
            self.write_json(edit),
            f" disagree: 3 image\\(s\\) have another \\(height, width\\), e.g. .*id "
            f"{first['id']}: record \\({first['height']}, {first['width']}\\), JSON "
            f"\\({first['height'] + 1}, {first['width']}\\)")

    def test_duplicate_eval_records(self):
        pattern = f"{self.files[0]},{self.files[0]}-copy"
        tf.io.gfile.copy(self.files[0], self.files[0] + "-copy", overwrite=True)
        self.addCleanup(tf.io.gfile.remove, self.files[0] + "-copy")
        builder = self.builder(is_training=False, pattern=pattern)
        with self.assertRaisesRegex(startup_checks.GroundTruthMismatchError,
                                    f"{len(self.lengths[0])} source id\\(s\\) occur in more "
                                    f"than one record"):
            startup_checks.check_eval_ground_truth(builder, os.path.join(
                self.tmp, "annotations", "instances_s.json"))

    def test_missing_or_unreadable_json(self):
        builder = self.builder(is_training=False)
        missing = os.path.join(self.tmp, "no_such.json")
        with self.assertRaisesRegex(startup_checks.GroundTruthMismatchError,
                                    f"^{re.escape(missing)}: no such file"):
            startup_checks.check_eval_ground_truth(builder, missing)
        broken = self.write_json(lambda coco: coco.pop("images"))
        with self.assertRaisesRegex(startup_checks.GroundTruthMismatchError,
                                    f"^{re.escape(broken)}: not a COCO annotation file"):
            startup_checks.check_eval_ground_truth(builder, broken)


if __name__ == "__main__":
    tf.test.main()
