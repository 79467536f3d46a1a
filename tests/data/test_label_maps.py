"""The label map from the converter's manifests, label_map.json, and num_classes from the data."""

import io
import json
import os
import shutil
import tempfile
from unittest import mock

import gin
import tensorflow as tf

from official_maskrcnn import runtime
from official_maskrcnn.data import label_maps
from official_maskrcnn.data.label_maps import LabelMapError
from tfrecord_tools import conversion, make_synthetic_coco, shard_writer


def make_split(root, split, num_classes, num_images=3):
    """A synthetic split of `num_classes` classes converted into records; returns
    (annotations file, records prefix)."""
    with mock.patch("sys.stderr", io.StringIO()):
        make_synthetic_coco.main(["--output_dir", os.path.join(root, "coco"), "--split", split,
                                  "--num_images", str(num_images), "--image_size", "64",
                                  "--num_classes", str(num_classes)])
    annotations = os.path.join(root, "coco", "annotations", f"instances_{split}.json")
    prefix = os.path.join(root, "rec", split)
    conversion.convert(os.path.join(root, "coco", split), annotations, prefix, 2, 1,
                       progress_stream=io.StringIO())
    return annotations, prefix


class LabelMapFilesTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="label_maps_")
        cls.annotations5, cls.prefix5 = make_split(cls.root, "five", 5)
        cls.annotations3, cls.prefix3 = make_split(cls.root, "three", 3)
        _, cls.prefix5b = make_split(cls.root, "fiveb", 5)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root)
        super().tearDownClass()

    def test_manifest_map_is_the_annotations_categories_by_sorted_id(self):
        label_map = label_maps.from_records(self.prefix5 + "-*")
        self.assertEqual(label_map.source, shard_writer.manifest_path(self.prefix5))
        self.assertEqual(label_map.label_to_category, {1: 3, 2: 7, 3: 11, 4: 14, 5: 20})
        self.assertEqual(label_map.class_names[5], "star")
        self.assertEqual(label_map.num_classes, 6)
        label_maps.check_same(label_map, label_maps.from_annotations(self.annotations5))

    def test_two_prefixes_must_agree(self):
        both = label_maps.from_records(f"{self.prefix5}-*,{self.prefix5b}-*")
        self.assertEqual(both.num_classes, 6)
        with self.assertRaises(LabelMapError) as raised:
            label_maps.from_records(f"{self.prefix5}-*,{self.prefix3}-*")
        message = str(raised.exception)
        self.assertIn(shard_writer.manifest_path(self.prefix3), message)
        self.assertIn(shard_writer.manifest_path(self.prefix5), message)
        self.assertIn("5 classes vs 3", message)

    def test_records_without_a_manifest_or_pattern_have_none(self):
        self.assertIsNone(label_maps.from_records(None))
        folder = self.create_tempdir().full_path
        for name in os.listdir(os.path.dirname(self.prefix3)):
            if name.startswith("three-") and name.endswith(".tfrecord"):
                tf.io.gfile.copy(os.path.join(os.path.dirname(self.prefix3), name),
                                 os.path.join(folder, name))
        self.assertIsNone(label_maps.from_records(os.path.join(folder, "three-*")))
        # A manifest of an older converter, without a label map, is an error naming it.
        with open(shard_writer.manifest_path(os.path.join(folder, "three")), "w") as f:
            json.dump({"manifest_version": 1}, f)
        with self.assertRaisesRegex(LabelMapError, "three.manifest.json: a manifest without"):
            label_maps.from_records(os.path.join(folder, "three-*"))

    def test_a_pattern_without_files_is_an_input_error(self):
        with self.assertRaisesRegex(label_maps.records.InputError, "matches no file"):
            label_maps.from_records(os.path.join(self.root, "nothing-*"))

    def test_write_and_read_back(self):
        label_map = label_maps.from_annotations(self.annotations5)
        folder = self.create_tempdir().full_path
        path = label_maps.write(folder, label_map)
        self.assertEqual(os.listdir(folder), [label_maps.LABEL_MAP_FILE])
        with open(path) as f:
            self.assertEqual(json.load(f)[3], {"label": 4, "id": 14, "name": "cross"})
        again = label_maps.read(path)
        self.assertEqual(again.entries, label_map.entries)
        self.assertEqual(again.source, path)

    def test_unusable_label_map_files_are_named(self):
        folder = self.create_tempdir().full_path
        path = os.path.join(folder, label_maps.LABEL_MAP_FILE)
        for content, message in (
                ("{not json", "not JSON"),
                ("[]", "non-empty list"),
                ('[{"label": 1, "name": "a"}]', "row 0 should have an integer 'label' and 'id'"),
                ('[{"label": 1, "id": 5, "name": "a"}, {"label": 3, "id": 6, "name": "b"}]',
                 r"labels should be 1..2 \(0 is the background\), found \[1, 3\]")):
            with open(path, "w") as f:
                f.write(content)
            with self.assertRaisesRegex(LabelMapError, message) as raised:
                label_maps.read(path)
            self.assertIn(path, str(raised.exception))

    def test_check_same_names_both_files_and_the_labels_that_differ(self):
        first = label_maps.from_annotations(self.annotations5)
        shifted = label_maps.from_entries(
            [entry.__class__(entry.label, entry.coco_id + (entry.label >= 4), entry.name)
             for entry in first.entries], "other.json")
        with self.assertRaises(LabelMapError) as raised:
            label_maps.check_same(first, shifted)
        message = str(raised.exception)
        self.assertIn(self.annotations5, message)
        self.assertIn("other.json", message)
        self.assertIn("label 4: category id 14 vs 15, label 5: category id 20 vs 21", message)
        self.assertNotIn("label 3", message)
        # Names are not compared; None on either side is nothing to check.
        renamed = label_maps.from_entries(
            [entry.__class__(entry.label, entry.coco_id, entry.name.upper())
             for entry in first.entries], "renamed.json")
        label_maps.check_same(first, renamed)
        label_maps.check_same(None, first)
        label_maps.check_same(first, None)

    def test_saved_label_map_of_a_folder_a_prefix_and_the_best_checkpoint(self):
        model_dir = self.create_tempdir().full_path
        self.assertIsNone(runtime.saved_label_map(model_dir))
        label_maps.write(model_dir, label_maps.from_annotations(self.annotations3))
        best = os.path.join(model_dir, "best")
        os.makedirs(best)
        for checkpoint in (model_dir, os.path.join(model_dir, "ckpt-4"), best,
                           os.path.join(best, "ckpt-2")):
            self.assertEqual(runtime.saved_label_map(checkpoint).num_classes, 4, checkpoint)
        # Only the best checkpoint's folder looks one level up.
        other = os.path.join(model_dir, "other")
        os.makedirs(other)
        self.assertIsNone(runtime.saved_label_map(other))


class NumClassesTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        gin.clear_config()
        self.addCleanup(gin.clear_config)
        entries = [label_maps.coco_index.LabelEntry(label, 10 * label, f"c{label}")
                   for label in range(1, 6)]
        self.label_map = label_maps.from_entries(entries, "/data/train.manifest.json")

    def test_unset_num_classes_is_set_from_the_map(self):
        runtime.parse_gin([], [])
        self.assertIsNone(label_maps.configured_num_classes())
        self.assertEqual(label_maps.apply_num_classes(self.label_map), (6, True))
        self.assertEqual(gin.query_parameter(label_maps.NUM_CLASSES_PARAMETER), 6)
        self.assertEqual(label_maps.apply_num_classes(None), (None, False))

    def test_configured_num_classes_is_checked(self):
        runtime.parse_gin([], [f"{label_maps.NUM_CLASSES_PARAMETER} = 6"])
        self.assertEqual(label_maps.apply_num_classes(self.label_map), (6, False))
        gin.clear_config()
        runtime.parse_gin([], [f"{label_maps.NUM_CLASSES_PARAMETER} = 81"])
        with self.assertRaises(LabelMapError) as raised:
            label_maps.apply_num_classes(self.label_map)
        message = str(raised.exception)
        for part in ("build_maskrcnn_model.num_classes = 81", "/data/train.manifest.json",
                     "lists 5 classes (num_classes = 6)"):
            self.assertIn(part, message)
        self.assertEqual(gin.query_parameter(label_maps.NUM_CLASSES_PARAMETER), 81)
        # A macro is compared by its value.
        gin.clear_config()
        runtime.parse_gin([], ["classes = 6", f"{label_maps.NUM_CLASSES_PARAMETER} = %classes"])
        self.assertEqual(label_maps.apply_num_classes(self.label_map), (6, False))


if __name__ == "__main__":
    tf.test.main()
