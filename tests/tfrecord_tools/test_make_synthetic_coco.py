"""Tests for tfrecord_tools.make_synthetic_coco: synthetic COCO data must be valid and learnable.

TensorFlow is not imported (the module under test does not need it), so this file runs in seconds.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from tfrecord_tools import make_synthetic_coco

NUM_IMAGES = 40
IMAGE_SIZE = 128
SEED = 7
SPLIT = "train"
# A drawn object and the background differ by >= 90 in luminance, so by far more than this in at
# least one channel; JPEG noise and the generator's Gaussian noise stay well below it.
FOREGROUND_THRESHOLD = 40


def _generate(output_dir, split=SPLIT, num_images=NUM_IMAGES, image_size=IMAGE_SIZE, seed=SEED,
              num_classes=None):
    """Runs main() in-process, silencing its progress lines; returns the COCO dict written."""
    argv = ["--output_dir", output_dir, "--split", split, "--num_images", str(num_images),
            "--image_size", str(image_size), "--seed", str(seed)]
    if num_classes is not None:
        argv += ["--num_classes", str(num_classes)]
    with contextlib.redirect_stderr(io.StringIO()):
        exit_code = make_synthetic_coco.main(argv)
    assert exit_code == 0, exit_code
    with open(os.path.join(output_dir, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _polygon_mask(segmentation, height, width):
    return mask_util.decode(
        mask_util.merge(mask_util.frPyObjects(segmentation, height, width))).astype(bool)


def _annotation_mask(annotation, height, width):
    if annotation["iscrowd"]:
        rle = mask_util.frPyObjects(annotation["segmentation"], height, width)
        return mask_util.decode(rle).astype(bool)
    return _polygon_mask(annotation["segmentation"], height, width)


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class GeneratedDatasetTest(unittest.TestCase):
    """Generates one dataset per class and checks every documented property of it."""

    NUM_CLASSES = None  # the default

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="synthetic_coco_")
        cls.output_dir = os.path.join(cls.root, "a")
        cls.coco = _generate(cls.output_dir, num_classes=cls.NUM_CLASSES)
        cls.images = {image["id"]: image for image in cls.coco["images"]}
        cls.by_image = {image_id: [] for image_id in cls.images}
        for annotation in cls.coco["annotations"]:
            cls.by_image[annotation["image_id"]].append(annotation)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root)

    def assertLen(self, container, expected):
        self.assertEqual(len(container), expected, container)

    def _image_path(self, image):
        return os.path.join(self.output_dir, SPLIT, image["file_name"])

    def _pixels(self, image):
        with Image.open(self._image_path(image)) as pil_image:
            pixels = np.asarray(pil_image.convert("RGB"), dtype=np.float32)
        return pixels

    def test_top_level_layout(self):
        self.assertEqual(
            set(self.coco), {"info", "licenses", "images", "annotations", "categories"})
        self.assertLen(self.coco["images"], NUM_IMAGES)
        self.assertEqual(sorted(os.listdir(os.path.join(self.output_dir, SPLIT))),
                         sorted(image["file_name"] for image in self.coco["images"]))

    def test_categories_have_non_contiguous_ids_and_all_are_used(self):
        ids = sorted(category["id"] for category in self.coco["categories"])
        self.assertGreaterEqual(len(ids), 3)
        self.assertNotEqual(ids, list(range(ids[0], ids[0] + len(ids))))
        self.assertLen({category["name"] for category in self.coco["categories"]}, len(ids))
        for category in self.coco["categories"]:
            self.assertEqual(set(category), {"id", "name", "supercategory"})
        used = {annotation["category_id"] for annotation in self.coco["annotations"]}
        self.assertEqual(used, set(ids))

    def test_ids_are_unique_start_at_one_and_name_the_files(self):
        image_ids = [image["id"] for image in self.coco["images"]]
        self.assertEqual(image_ids, list(range(1, NUM_IMAGES + 1)))
        for image in self.coco["images"]:
            self.assertEqual(image["file_name"], f"{image['id']:012d}.jpg")
        annotation_ids = [annotation["id"] for annotation in self.coco["annotations"]]
        self.assertEqual(annotation_ids, list(range(1, len(annotation_ids) + 1)))
        for annotation in self.coco["annotations"]:
            self.assertIn(annotation["image_id"], self.images)
            self.assertEqual(set(annotation),
                             {"id", "image_id", "category_id", "segmentation", "area", "bbox",
                              "iscrowd"})

    def test_json_sizes_equal_file_sizes_and_all_orientations_present(self):
        orientations = set()
        for image in self.coco["images"]:
            with Image.open(self._image_path(image)) as pil_image:
                self.assertEqual(pil_image.format, "JPEG")
                self.assertEqual(pil_image.size, (image["width"], image["height"]))
            self.assertEqual(max(image["height"], image["width"]), IMAGE_SIZE)
            if image["width"] > image["height"]:
                orientations.add("landscape")
            elif image["width"] < image["height"]:
                orientations.add("portrait")
            else:
                orientations.add("square")
        self.assertEqual(orientations, {"landscape", "portrait", "square"})

    def test_some_images_are_grayscale_and_the_rest_rgb(self):
        modes = []
        for image in self.coco["images"]:
            with Image.open(self._image_path(image)) as pil_image:
                modes.append(pil_image.mode)
        self.assertEqual(set(modes), {"L", "RGB"})
        self.assertGreaterEqual(modes.count("L"), 1)
        self.assertLess(modes.count("L"), NUM_IMAGES // 4)

    def test_some_images_have_no_annotation(self):
        empty = [image_id for image_id, annotations in self.by_image.items() if not annotations]
        self.assertGreaterEqual(len(empty), 1)
        self.assertLess(len(empty), NUM_IMAGES // 4)
        # Background only: no pixel stands out from the image's median colour.
        pixels = self._pixels(self.images[empty[0]])
        difference = np.abs(pixels - np.median(pixels.reshape(-1, 3), axis=0)).max(axis=-1)
        self.assertFalse((difference > FOREGROUND_THRESHOLD).any())

    def test_polygons_are_flat_float_lists_and_some_objects_have_two(self):
        multi_polygon = 0
        for annotation in self.coco["annotations"]:
            if annotation["iscrowd"]:
                continue
            segmentation = annotation["segmentation"]
            self.assertIsInstance(segmentation, list)
            for polygon in segmentation:
                self.assertGreaterEqual(len(polygon), 6)
                self.assertEqual(len(polygon) % 2, 0)
                self.assertTrue(all(isinstance(v, float) for v in polygon), polygon)
            if len(segmentation) > 1:
                multi_polygon += 1
                image = self.images[annotation["image_id"]]
                parts = [_polygon_mask([polygon], image["height"], image["width"])
                         for polygon in segmentation]
                # Two visible, disjoint parts of one object.
                self.assertTrue(all(part.sum() > 10 for part in parts))
                self.assertFalse((parts[0] & parts[1]).any())
        self.assertGreaterEqual(multi_polygon, 1)

    def test_crowd_annotations_are_uncompressed_rle_that_pycocotools_decodes(self):
        crowds = [a for a in self.coco["annotations"] if a["iscrowd"]]
        self.assertGreaterEqual(len(crowds), 1)
        for annotation in crowds:
            image = self.images[annotation["image_id"]]
            rle = annotation["segmentation"]
            self.assertEqual(set(rle), {"counts", "size"})
            self.assertEqual(rle["size"], [image["height"], image["width"]])
            self.assertTrue(all(isinstance(c, int) and c >= 0 for c in rle["counts"]))
            self.assertEqual(sum(rle["counts"]), image["height"] * image["width"])
            mask = _annotation_mask(annotation, image["height"], image["width"])
            self.assertGreater(mask.sum(), 0)
            self.assertEqual(annotation["area"], float(mask.sum()))
            rows, cols = np.nonzero(mask)
            self.assertEqual(annotation["bbox"],
                             [float(cols.min()), float(rows.min()),
                              float(cols.max() + 1 - cols.min()),
                              float(rows.max() + 1 - rows.min())])

    def test_boxes_are_polygon_extents_inside_the_image(self):
        for annotation in self.coco["annotations"]:
            image = self.images[annotation["image_id"]]
            x, y, w, h = annotation["bbox"]
            self.assertTrue(all(isinstance(v, float) for v in annotation["bbox"]))
            self.assertGreater(w, 0)
            self.assertGreater(h, 0)
            self.assertGreaterEqual(x, 0)
            self.assertGreaterEqual(y, 0)
            self.assertLessEqual(x + w, image["width"] + 1e-6)
            self.assertLessEqual(y + h, image["height"] + 1e-6)
            if annotation["iscrowd"]:
                continue
            xs = np.concatenate([polygon[0::2] for polygon in annotation["segmentation"]])
            ys = np.concatenate([polygon[1::2] for polygon in annotation["segmentation"]])
            self.assertTrue((xs >= 0).all() and (xs <= image["width"]).all())
            self.assertTrue((ys >= 0).all() and (ys <= image["height"]).all())
            np.testing.assert_allclose(
                annotation["bbox"], [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()],
                atol=0.011)

    def test_area_is_pycocotools_area_of_the_merged_polygons(self):
        for annotation in self.coco["annotations"]:
            if annotation["iscrowd"]:
                continue
            image = self.images[annotation["image_id"]]
            rles = mask_util.frPyObjects(annotation["segmentation"], image["height"],
                                         image["width"])
            self.assertEqual(annotation["area"], float(mask_util.area(mask_util.merge(rles))))
            self.assertGreater(annotation["area"], 0)

    def test_objects_are_large_enough_to_learn(self):
        for annotation in self.coco["annotations"]:
            if annotation["iscrowd"]:
                continue
            image = self.images[annotation["image_id"]]
            extent = max(annotation["bbox"][2:]) / min(image["height"], image["width"])
            self.assertGreaterEqual(extent, 0.09)
            self.assertLessEqual(extent, 0.5)
        counts = [len(annotations) for annotations in self.by_image.values()]
        self.assertLessEqual(max(counts), 5)  # 1-4 objects plus at most one crowd region.

    def test_object_masks_do_not_overlap(self):
        for image_id, annotations in self.by_image.items():
            image = self.images[image_id]
            covered = np.zeros((image["height"], image["width"]), dtype=np.int32)
            for annotation in annotations:
                covered += _annotation_mask(annotation, image["height"], image["width"])
            self.assertLessEqual(covered.max(), 1, f"image {image_id}")

    def test_drawn_pixels_agree_with_rasterised_annotations(self):
        checked = 0
        for image_id, annotations in self.by_image.items():
            if not annotations:
                continue
            image = self.images[image_id]
            pixels = self._pixels(image)
            masks = [_annotation_mask(a, image["height"], image["width"]) for a in annotations]
            union = np.any(masks, axis=0)
            background = np.median(pixels[~union], axis=0)
            foreground = np.abs(pixels - background).max(axis=-1) > FOREGROUND_THRESHOLD
            # Nothing is drawn outside the annotations (JPEG is 4:4:4, so no chroma bleeding).
            self.assertLessEqual((foreground & ~union).sum(), 5, f"image {image_id}")
            for annotation, mask in zip(annotations, masks):
                # The object's pixels differ from the background colour...
                self.assertGreater(np.abs(pixels[mask].mean(axis=0) - background).max(),
                                   2 * FOREGROUND_THRESHOLD)
                if annotation["area"] < 50:
                    continue  # ...and, for objects large enough to ignore JPEG edges, exactly.
                x, y, w, h = (int(v) for v in annotation["bbox"])
                window = (slice(max(0, y - 3), y + h + 4), slice(max(0, x - 3), x + w + 4))
                # Another object may lie inside this one's box: count only this object's pixels.
                drawn = (foreground & ~(union & ~mask))[window]
                expected = mask[window]
                iou = (drawn & expected).sum() / (drawn | expected).sum()
                self.assertGreater(iou, 0.9, f"annotation {annotation['id']}")
                checked += 1
        self.assertGreaterEqual(checked, 20)


class FiveClassDatasetTest(GeneratedDatasetTest):
    """Every property of the default dataset holds with all five classes (cross and star)."""

    NUM_CLASSES = 5

    def test_the_five_classes_and_their_ids(self):
        self.assertEqual([(c["id"], c["name"]) for c in self.coco["categories"]],
                         [(3, "rectangle"), (7, "ellipse"), (11, "triangle"), (14, "cross"),
                          (20, "star")])
        self.assertEqual({a["category_id"] for a in self.coco["annotations"]},
                         {3, 7, 11, 14, 20})


class DeterminismTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="synthetic_coco_")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root)

    def _files(self, output_dir, split=SPLIT):
        names = sorted(os.listdir(os.path.join(output_dir, split)))
        files = {name: _read_bytes(os.path.join(output_dir, split, name)) for name in names}
        files["json"] = _read_bytes(
            os.path.join(output_dir, "annotations", f"instances_{split}.json"))
        return files

    def test_same_arguments_give_identical_bytes_and_other_seeds_differ(self):
        kwargs = dict(num_images=12, image_size=96)
        for name, seed in (("first", SEED), ("second", SEED), ("other", SEED + 1)):
            _generate(os.path.join(self.root, name), seed=seed, **kwargs)
        first = self._files(os.path.join(self.root, "first"))
        self.assertEqual(len(first), 13)
        self.assertEqual(first, self._files(os.path.join(self.root, "second")))
        other = self._files(os.path.join(self.root, "other"))
        self.assertEqual(set(other), set(first))
        self.assertNotEqual(other["json"], first["json"])
        self.assertTrue(all(other[name] != first[name] for name in first))

    def test_splits_with_the_same_seed_differ(self):
        output_dir = os.path.join(self.root, "splits")
        _generate(output_dir, split="train", num_images=3, image_size=64)
        _generate(output_dir, split="val", num_images=3, image_size=64)
        train, val = self._files(output_dir, "train"), self._files(output_dir, "val")
        self.assertTrue(all(train[name] != val[name] for name in train))


class UncompressedRleTest(unittest.TestCase):

    def test_hand_computed_counts(self):
        # Column-major: [[0, 1], [1, 1]] reads 0, 1, 1, 1 -> one zero, then three ones.
        rle = make_synthetic_coco.mask_to_uncompressed_rle(np.array([[0, 1], [1, 1]]))
        self.assertEqual(rle, {"counts": [1, 3], "size": [2, 2]})
        # A set first pixel starts with an empty run of zeros.
        rle = make_synthetic_coco.mask_to_uncompressed_rle(np.array([[1, 0, 0], [1, 0, 1]]))
        self.assertEqual(rle, {"counts": [0, 2, 3, 1], "size": [2, 3]})
        rle = make_synthetic_coco.mask_to_uncompressed_rle(np.zeros((3, 2)))
        self.assertEqual(rle, {"counts": [6], "size": [3, 2]})

    def test_pycocotools_decodes_to_the_same_mask(self):
        rng = np.random.default_rng(0)
        for shape in ((1, 1), (5, 7), (33, 17)):
            mask = rng.random(shape) < 0.4
            mask[0, 0] = shape[0] % 2 == 1
            rle = make_synthetic_coco.mask_to_uncompressed_rle(mask)
            decoded = mask_util.decode(mask_util.frPyObjects(rle, *shape))
            np.testing.assert_array_equal(decoded.astype(bool), mask)
            compressed = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            self.assertEqual(mask_util.area(compressed), mask.sum())


class GeometryTest(unittest.TestCase):

    def test_split_polygon_gives_two_disjoint_parts_covering_most_of_the_shape(self):
        rng = np.random.default_rng(3)
        square = np.array([[10.0, 10.0], [50.0, 10.0], [50.0, 50.0], [10.0, 50.0]])
        first, second = make_synthetic_coco.split_polygon(rng, square, gap=4.0)
        area = make_synthetic_coco.polygon_area
        self.assertEqual(area(square), 1600.0)
        # The gap band is 4 pixels wide and at most the square's diagonal long.
        self.assertGreaterEqual(area(first) + area(second), 1600.0 - 4.0 * 40.0 * np.sqrt(2))
        self.assertLess(area(first) + area(second), 1600.0)
        masks = [_polygon_mask(make_synthetic_coco.polygons_to_segmentation([p]), 64, 64)
                 for p in (first, second)]
        self.assertFalse((masks[0] & masks[1]).any())

    def test_every_shape_has_the_requested_extent(self):
        rng = np.random.default_rng(4)
        for category in make_synthetic_coco.ALL_CATEGORIES:
            polygon = make_synthetic_coco.shape_polygon(rng, category["id"], 30.0)
            extent = polygon.max(axis=0) - polygon.min(axis=0)
            self.assertAlmostEqual(extent.max(), 30.0, places=6)
        with self.assertRaisesRegex(ValueError, "unknown category id 4"):
            make_synthetic_coco.shape_polygon(rng, 4, 30.0)


class CommandLineTest(unittest.TestCase):

    def _exit_code(self, argv):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as context:
            make_synthetic_coco.main(argv)
        return context.exception.code, stderr.getvalue()

    def test_bad_arguments_exit_non_zero_with_a_message(self):
        with tempfile.TemporaryDirectory() as output_dir:
            base = ["--output_dir", output_dir, "--split", "train"]
            for extra, message in (
                    (["--num_images", "0"], "--num_images must be >= 1, got 0"),
                    (["--num_images", "-3"], "--num_images must be >= 1, got -3"),
                    (["--num_images", "2", "--image_size", "31"],
                     "--image_size must be >= 32, got 31"),
                    (["--num_images", "two"], "invalid int value"),
                    (["--num_images", "2", "--num_classes", "0"],
                     "--num_classes must be in 1..5, got 0"),
                    (["--num_images", "2", "--num_classes", "6"],
                     "--num_classes must be in 1..5, got 6"),
            ):
                code, stderr = self._exit_code(base + extra)
                self.assertNotEqual(code, 0)
                self.assertIn(message, stderr)
            code, stderr = self._exit_code(["--output_dir", output_dir, "--num_images", "2"])
            self.assertNotEqual(code, 0)
            self.assertIn("--split", stderr)
            code, _ = self._exit_code(base[:2] + ["--split", "../x", "--num_images", "2"])
            self.assertNotEqual(code, 0)
            # Nothing was written for any rejected command.
            self.assertEqual(os.listdir(output_dir), [])

    def test_smallest_dataset(self):
        with tempfile.TemporaryDirectory() as output_dir:
            coco = _generate(output_dir, num_images=1, image_size=32)
            self.assertEqual(len(coco["images"]), 1)
            self.assertEqual(max(coco["images"][0]["height"], coco["images"][0]["width"]), 32)

    def test_module_runs_as_a_script(self):
        with tempfile.TemporaryDirectory() as output_dir:
            result = subprocess.run(
                [sys.executable, "-m", "tfrecord_tools.make_synthetic_coco", "--output_dir",
                 output_dir, "--split", "val", "--num_images", "2", "--image_size", "64"],
                capture_output=True, text=True, timeout=60, check=False,
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("2/2 images", result.stderr)
            self.assertTrue(
                os.path.exists(os.path.join(output_dir, "annotations", "instances_val.json")))
            self.assertEqual(sorted(os.listdir(os.path.join(output_dir, "val"))),
                             ["000000000001.jpg", "000000000002.jpg"])


if __name__ == "__main__":
    unittest.main()
