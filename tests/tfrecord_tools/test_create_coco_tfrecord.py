"""End-to-end tests of create_coco_tfrecord (and verify_tfrecord on what it writes)."""

import glob
import io
import json
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from official.vision.dataloaders import tf_example_decoder
from PIL import Image
from pycocotools.coco import COCO

from tests.tfrecord_tools import broken_coco
from tfrecord_tools import (
    conversion,
    create_coco_tfrecord,
    image_worker,
    make_synthetic_coco,
    tf_example,
    verify_tfrecord,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_IMAGES = os.path.join(COCO128, "train2017")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")


def shard_files(prefix):
    return sorted(glob.glob(prefix + "-*-of-*.tfrecord"))


def read_records(prefix):
    return [r for path in shard_files(prefix)
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def convert(image_dir, annotations_file, prefix, num_shards=2, num_workers=1):
    return conversion.convert(image_dir, annotations_file, prefix, num_shards, num_workers,
                              progress_stream=io.StringIO())


def verify_ok(test, prefix, annotations_file):
    report = verify_tfrecord.verify(prefix + "-*", annotations_file, out=io.StringIO())
    test.assertEqual(report.messages, [])
    test.assertEqual(report.count, 0)


class Coco128Test(tf.test.TestCase):
    """The real coco128 set through the CLI with 4 shards and 2 workers (the issue's command)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.prefix = os.path.join(cls.tmp, "two_workers", "train")
        with mock.patch("sys.stdout", io.StringIO()), mock.patch("sys.stderr", io.StringIO()):
            cls.exit_code = create_coco_tfrecord.main([
                "--image_dir", COCO128_IMAGES, "--annotations_file", COCO128_JSON,
                "--output_prefix", cls.prefix, "--num_shards", "4", "--num_workers", "2"])
        with open(cls.prefix + ".manifest.json") as f:
            cls.manifest = json.load(f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def test_counts_in_manifest_and_shards(self):
        self.assertEqual(self.exit_code, 0)
        self.assertLen(shard_files(self.prefix), 4)
        self.assertLen(read_records(self.prefix), 128)
        m = self.manifest
        self.assertEqual(m["images_written"], 128)
        self.assertEqual(m["annotations_written"], 939)
        self.assertEqual(m["crowd_annotations_written"], 10)
        self.assertEqual(m["images_without_annotations_written"], 2)
        self.assertEqual(m["skipped_images"], {})
        self.assertEqual(m["skipped_annotations"], {})
        self.assertEqual([s["records"] for s in m["shards"]], [32, 32, 32, 32])
        # The one grayscale JPEG of coco128 is converted; every other file is kept byte for byte.
        self.assertEqual(m["conversions"]["image_grayscale_to_rgb"]["count"], 1)

    def test_max_images_converts_the_first_n_images_of_the_json(self):
        prefix = os.path.join(self.tmp, "first8", "train")
        with mock.patch("sys.stdout", io.StringIO()), mock.patch("sys.stderr", io.StringIO()):
            code = create_coco_tfrecord.main([
                "--image_dir", COCO128_IMAGES, "--annotations_file", COCO128_JSON,
                "--output_prefix", prefix, "--num_shards", "1", "--num_workers", "1",
                "--max_images", "8"])
        self.assertEqual(code, 0)
        with open(COCO128_JSON) as f:
            first_ids = [image["id"] for image in json.load(f)["images"][:8]]
        ids = [tf.train.Example.FromString(r).features.feature["image/source_id"]
               for r in read_records(prefix)]
        self.assertEqual([int(i.bytes_list.value[0]) if i.bytes_list.value else
                          int(i.int64_list.value[0]) for i in ids], first_ids)
        with open(prefix + ".manifest.json") as f:
            manifest = json.load(f)
        self.assertEqual((manifest["images_written"], manifest["max_images"]), (8, 8))

    def test_label_map_is_contiguous_and_keeps_coco_ids(self):
        label_map = self.manifest["label_map"]
        self.assertEqual([e["label"] for e in label_map], list(range(1, 81)))
        by_label = {e["label"]: (e["coco_id"], e["name"]) for e in label_map}
        self.assertEqual(by_label[1], (1, "person"))
        self.assertEqual(by_label[12], (13, "stop sign"))  # COCO skips id 12
        self.assertEqual(by_label[80], (90, "toothbrush"))

    def test_verify_passes(self):
        verify_ok(self, self.prefix, COCO128_JSON)

    def test_rgb_jpegs_are_stored_unchanged(self):
        records = [tf_example.parse(r) for r in read_records(self.prefix)]
        by_name = {r["image/filename"][0].decode(): r["image/encoded"][0] for r in records}
        with open(os.path.join(COCO128_IMAGES, "000000000009.jpg"), "rb") as f:
            self.assertEqual(by_name["000000000009.jpg"], f.read())

    def test_deterministic_across_runs_and_worker_counts(self):
        prefix = os.path.join(self.tmp, "one_worker", "train")
        convert(COCO128_IMAGES, COCO128_JSON, prefix, num_shards=4, num_workers=1)
        for ours, theirs in zip(shard_files(prefix), shard_files(self.prefix)):
            with open(ours, "rb") as a, open(theirs, "rb") as b:
                self.assertEqual(a.read(), b.read(), f"{ours} differs from {theirs}")

    def test_model_garden_decoder_reads_the_same_content(self):
        decoder = tf_example_decoder.TfExampleDecoder(include_mask=True)
        coco = COCO(COCO128_JSON)
        label_of = {e["coco_id"]: e["label"] for e in self.manifest["label_map"]}
        checked_objects = 0
        for serialized in read_records(self.prefix)[:24]:
            ours = tf_example.parse(serialized)
            theirs = decoder.decode(tf.constant(serialized))
            image_id = int(ours["image/source_id"][0])
            self.assertEqual(int(theirs["source_id"].numpy()), image_id)
            annotation_ids = ours["image/object/annotation_id"]
            annotations = coco.loadAnns(annotation_ids)
            image = coco.imgs[image_id]
            h, w = image["height"], image["width"]
            self.assertEqual(theirs["image"].shape, (h, w, 3))
            want_boxes = np.array([[a["bbox"][1] / h, a["bbox"][0] / w,
                                    (a["bbox"][1] + a["bbox"][3]) / h,
                                    (a["bbox"][0] + a["bbox"][2]) / w] for a in annotations])
            self.assertAllClose(theirs["groundtruth_boxes"].numpy().reshape(-1, 4),
                                np.clip(want_boxes, 0, 1).reshape(-1, 4), atol=1e-4)
            self.assertAllEqual(theirs["groundtruth_classes"],
                                [label_of[a["category_id"]] for a in annotations])
            self.assertAllEqual(theirs["groundtruth_is_crowd"],
                                [bool(a["iscrowd"]) for a in annotations])
            masks = theirs["groundtruth_instance_masks"].numpy()
            self.assertEqual(masks.shape, (len(annotations), h, w))
            for mask, annotation in zip(masks, annotations):
                self.assertAllEqual(mask, coco.annToMask(annotation).astype(np.float32))
            checked_objects += len(annotations)
        self.assertGreater(checked_objects, 100)


class SyntheticRoundTripTest(tf.test.TestCase):

    def test_synthetic_dataset_converts_and_verifies(self):
        tmp = self.create_tempdir().full_path
        with mock.patch("sys.stderr", io.StringIO()):
            self.assertEqual(make_synthetic_coco.main([
                "--output_dir", tmp, "--split", "val", "--num_images", "24", "--image_size",
                "128", "--seed", "3"]), 0)
        annotations_file = os.path.join(tmp, "annotations", "instances_val.json")
        prefix = os.path.join(tmp, "records", "val")
        manifest = convert(os.path.join(tmp, "val"), annotations_file, prefix, num_workers=2)
        with open(annotations_file) as f:
            data = json.load(f)
        self.assertEqual(manifest["images_written"], 24)
        self.assertEqual(manifest["annotations_written"], len(data["annotations"]))
        self.assertGreater(manifest["crowd_annotations_written"], 0)
        self.assertGreater(manifest["images_without_annotations_written"], 0)
        self.assertEqual(manifest["skipped_annotations"], {})
        # Non-contiguous COCO ids become labels 1..K in id order.
        coco_ids = sorted(c["id"] for c in data["categories"])
        self.assertEqual([(e["label"], e["coco_id"]) for e in manifest["label_map"]],
                         list(enumerate(coco_ids, start=1)))
        self.assertNotEqual(coco_ids, list(range(1, len(coco_ids) + 1)))
        verify_ok(self, prefix, annotations_file)


class BadInputTest(tf.test.TestCase):
    """Every rule on purpose-built broken input: counted by reason, nothing else lost."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.image_dir, cls.annotations_file, cls.expected = broken_coco.write_broken_coco(cls.tmp)
        cls.prefix = os.path.join(cls.tmp, "out", "broken")
        cls.manifest = convert(cls.image_dir, cls.annotations_file, cls.prefix)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def test_totals(self):
        for key in ("images_in_json", "annotations_in_json", "images_written",
                    "images_without_annotations_written", "annotations_written",
                    "crowd_annotations_written"):
            self.assertEqual(self.manifest[key], self.expected[key], key)
        # Every JSON annotation is either written or counted under exactly one skip reason.
        self.assertEqual(self.manifest["annotations_written"]
                         + self.manifest["annotations_skipped"],
                         self.manifest["annotations_in_json"])
        self.assertEqual(self.manifest["images_written"] + self.manifest["images_skipped"],
                         self.manifest["images_in_json"])

    def test_each_reason_with_its_ids(self):
        for section in ("skipped_images", "skipped_annotations", "conversions"):
            got = {reason: entry["first_ids"] for reason, entry in self.manifest[section].items()}
            self.assertEqual(got, self.expected[section], section)
        for reason, count in self.expected["skip_counts"].items():
            self.assertEqual(self.manifest["skipped_annotations"][reason]["count"], count)

    def test_records_hold_rgb_jpegs_and_clipped_boxes(self):
        records = {int(r["image/source_id"][0]): r
                   for r in map(tf_example.parse, read_records(self.prefix))}
        self.assertEqual(sorted(records), [1, 2, 3, 4, 5, 6, 13])
        for record in records.values():
            image = Image.open(io.BytesIO(record["image/encoded"][0]))
            self.assertEqual((image.format, image.mode), ("JPEG", "RGB"))
        first = records[1]
        self.assertEqual(first["image/object/annotation_id"], [101, 102, 105, 110, 113])
        # Box 102 is [-5, 10, 20, 20] in the JSON: clipped to x in [0, 15].
        self.assertAllClose(first["image/object/bbox/xmin"][1], 0.0)
        self.assertAllClose(first["image/object/bbox/xmax"][1], 15 / broken_coco.WIDTH)
        self.assertEqual(first["image/object/is_crowd"], [0, 0, 0, 1, 0])
        self.assertEqual(first["image/object/area"][4], 400.0)  # computed from the 20x20 mask
        self.assertEqual(first["image/object/class/label"], [1, 1, 1, 2, 1])

    def test_verify_passes_with_the_manifest_accounting_for_skips(self):
        verify_ok(self, self.prefix, self.annotations_file)

    def test_verify_without_manifest_reports_the_absent_images(self):
        os.rename(self.prefix + ".manifest.json", self.prefix + ".moved")
        try:
            report = verify_tfrecord.verify(self.prefix + "-*", self.annotations_file,
                                            out=io.StringIO())
        finally:
            os.rename(self.prefix + ".moved", self.prefix + ".manifest.json")
        self.assertEqual(report.count, 1)
        self.assertIn("4 JSON image(s) have no record", report.messages[0])


class FatalErrorTest(tf.test.TestCase):
    """Input that is unusable as a whole: one clear message, exit code 2, nothing written."""

    def setUp(self):
        super().setUp()
        self.tmp = self.create_tempdir().full_path
        self.image_dir = os.path.join(self.tmp, "images")
        os.makedirs(self.image_dir)
        Image.new("RGB", (8, 8)).save(os.path.join(self.image_dir, "a.jpg"))
        self.json_path = os.path.join(self.tmp, "ann.json")
        self.write_json({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})

    def write_json(self, payload):
        with open(self.json_path, "w") as f:
            f.write(payload if isinstance(payload, str) else json.dumps(payload))

    def run_cli(self, **overrides):
        flags = {"image_dir": self.image_dir, "annotations_file": self.json_path,
                 "output_prefix": os.path.join(self.tmp, "out", "x"), "num_workers": "1"}
        flags.update(overrides)
        argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
        stderr = io.StringIO()
        with mock.patch("sys.stderr", stderr), mock.patch("sys.stdout", io.StringIO()):
            code = create_coco_tfrecord.main(argv)
        return code, stderr.getvalue()

    def assert_fails(self, expected_fragment, **overrides):
        code, stderr = self.run_cli(**overrides)
        self.assertEqual(code, 2, stderr)
        self.assertIn(expected_fragment, stderr)
        self.assertEqual(stderr.count("error:"), 1)
        self.assertEqual(glob.glob(os.path.join(self.tmp, "out", "*")), [])

    def test_malformed_json_names_file_and_line(self):
        self.write_json('{"images": [\n  {"id": 1,,}]}')
        self.assert_fails(f"{self.json_path}: malformed JSON at line 2")

    def test_missing_annotations_file(self):
        self.assert_fails("annotations file not found", annotations_file=self.json_path + "x")

    def test_missing_image_dir(self):
        self.assert_fails("--image_dir not found", image_dir=self.image_dir + "x")

    def test_empty_image_dir(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        self.assert_fails("--image_dir holds no files", image_dir=empty)

    def test_json_without_images_list(self):
        self.write_json({"annotations": [], "categories": []})
        self.assert_fails("expected a list under 'images', found nothing")

    def test_duplicate_category_id(self):
        self.write_json({"images": [], "annotations": [],
                         "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]})
        self.assert_fails("category id 1 is listed twice")

    def test_bad_shard_and_worker_counts(self):
        self.assert_fails("--num_shards must be >= 1", num_shards=0)
        self.assert_fails("--num_workers must be >= 1", num_workers=0)
        self.assert_fails("--max_images must be >= 1", max_images=0)

    def test_existing_shards_of_another_count_are_refused(self):
        self.assertEqual(self.run_cli(num_shards=3)[0], 0)
        code, stderr = self.run_cli(num_shards=2)
        self.assertEqual(code, 2)
        self.assertIn("another shard count already exist", stderr)
        self.assertLen(glob.glob(os.path.join(self.tmp, "out", "x-*")), 3)

    def test_interrupt_exits_130_and_leaves_no_shards(self):
        self.write_json({"images": [{"id": i, "file_name": "a.jpg", "height": 8, "width": 8}
                                    for i in range(1, 4)],
                         "annotations": [], "categories": [{"id": 1, "name": "a"}]})
        with mock.patch.object(image_worker, "process_image", side_effect=KeyboardInterrupt):
            code, stderr = self.run_cli()
        self.assertEqual(code, 130)
        self.assertIn("interrupted; the partial output was removed", stderr)
        self.assertEqual(os.listdir(os.path.join(self.tmp, "out")), [])

    def test_crash_mid_conversion_leaves_no_shards(self):
        self.write_json({"images": [{"id": i, "file_name": "a.jpg", "height": 8, "width": 8}
                                    for i in range(1, 6)],
                         "annotations": [], "categories": [{"id": 1, "name": "a"}]})
        real = image_worker.process_image
        calls = []

        def crash_on_third(task):
            calls.append(task.image["id"])
            if len(calls) == 3:
                raise RuntimeError("simulated crash")
            return real(task)

        with mock.patch.object(image_worker, "process_image", crash_on_third):
            with self.assertRaisesRegex(RuntimeError, "simulated crash"):
                convert(self.image_dir, self.json_path, os.path.join(self.tmp, "out", "x"))
        self.assertEqual(os.listdir(os.path.join(self.tmp, "out")), [])


if __name__ == "__main__":
    tf.test.main()
