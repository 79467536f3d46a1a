"""Tests of `preprocess_ops` and `TrainParser` against the MLPerf reference's semantics.

Every expectation is either a hand-computed literal or an independent pure-Python/numpy port of
the reference (maskrcnn-benchmark) written here, never a call back into the code under test.
Each op runs twice, eagerly and inside `tf.data` (graph mode), because the two differ more than
expected (Python control flow, static shapes, rounding modes).

Box format: [ymin, xmin, ymax, xmax] absolute pixels unless a name says otherwise; COCO boxes
are [x, y, w, h] ("xywh").
"""

import io

import numpy as np
import tensorflow as tf
from PIL import Image
from scipy import ndimage

from official_maskrcnn.data import decoder, parsers
from official_maskrcnn.data import preprocess_ops as ops
from official_maskrcnn.ops import mask_targets
from tfrecord_tools import features as F
from tfrecord_tools import masks as mask_codec
from tfrecord_tools import tf_example

CAFFE_BGR_MEAN = np.array([102.9801, 115.9465, 122.7717])
IMAGENET_RGB_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_RGB_STD = np.array([0.229, 0.224, 0.225])


def run_both(fn, *args):
    """[eager result, tf.data result] of fn(*args), each as (nested) numpy values.

    The ops take tensors (the pipeline never passes numpy arrays), so the eager run converts the
    arguments first; the tf.data run traces `fn` in graph mode inside `Dataset.map`, as the input
    pipeline does.
    """
    eager = fn(*(tf.convert_to_tensor(a) for a in args))
    eager = tf.nest.map_structure(lambda t: np.asarray(t), eager)
    dataset = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
    in_data = next(iter(dataset.as_numpy_iterator()))
    return [eager, in_data]


def reference_get_size(height, width, min_size=800, max_size=1333):
    """Independent port of maskrcnn-benchmark `Resize.get_size`; returns (new_h, new_w)."""
    w, h = width, height
    size = min_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def numpy_crop_and_resize(mask, box, crop_size):
    """Independent crop: bilinear samples at the bin centres of `box` (inside the image).

    Bin j's centre is the continuous position x1 + (j + 0.5) * (x2 - x1) / M; pixel i covers
    [i, i + 1), so the sample's array index is position - 0.5; in the outer half pixel of the
    image (index in [-0.5, 0) or beyond the last centre) the edge pixel's value holds.
    """
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    centres = (np.arange(crop_size) + 0.5) / crop_size
    rows = ymin + centres * (ymax - ymin) - 0.5
    cols = xmin + centres * (xmax - xmin) - 0.5
    grid_y, grid_x = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(np.asarray(mask, np.float64), [grid_y, grid_x], order=1,
                                   mode="nearest")


class ReferenceOutputSizeTest(tf.test.TestCase):

    # (H, W) -> (h, w) with min_size 800, max_size 1333, worked out by hand:
    HAND_CASES = {
        (480, 640): (800, 1066),  # 800 * 640 / 480 = 1066.67, truncated
        (640, 480): (1066, 800),  # the transpose
        # 1500 / 500 * 800 = 2400 > 1333: size = round(1333 * 500 / 1500) = round(444.33) = 444,
        # long side int(444 * 1500 / 500) = 1332.
        (500, 1500): (444, 1332),
        (800, 800): (800, 800),  # short side already 800: returned unchanged
        (1000, 1000): (800, 800),
        (427, 640): (800, 1199),  # COCO-typical: 800 * 640 / 427 = 1199.06
        (640, 427): (1199, 800),
        (800, 1000): (800, 1000),  # short side already 800: unchanged
        # 200 / 100 * 800 > 1333: size = round(666.5) = 666 (Python rounds half to even), long
        # side int(666 * 2) = 1332.
        (100, 200): (666, 1332),
        # The capped size equals the short side (round(1333 * 500 / 1333) = 500): unchanged.
        (500, 1333): (500, 1333),
        # Capped: round(1333 * 800 / 2000) = round(533.2) = 533; int(533 * 2000 / 800) = 1332.
        (800, 2000): (533, 1332),
    }

    def test_reference_port_matches_hand_cases(self):
        # Guards the independent port itself before it is used as the expectation.
        for (h, w), expected in self.HAND_CASES.items():
            self.assertEqual(reference_get_size(h, w), expected, msg=f"{h}x{w}")

    def test_hand_cases(self):
        for (h, w), expected in self.HAND_CASES.items():
            for mode, got in zip(("eager", "tf.data"), run_both(
                    lambda a, b: ops.reference_output_size(a, b, 800, 1333), h, w)):
                self.assertEqual(tuple(int(v) for v in got), expected, msg=f"{h}x{w} {mode}")

    def test_random_sizes_match_reference_port(self):
        rng = np.random.default_rng(0)
        sizes = rng.integers(16, 4001, size=(300, 2))
        # Small settings too: the parser tests below use min_size 32, max_size 64.
        for min_size, max_size in ((800, 1333), (32, 64), (600, 1000)):
            expected = np.array([reference_get_size(h, w, min_size, max_size) for h, w in sizes])
            eager = np.array([[int(v) for v in ops.reference_output_size(
                int(h), int(w), min_size, max_size)] for h, w in sizes])
            dataset = tf.data.Dataset.from_tensor_slices((sizes[:, 0], sizes[:, 1])).map(
                lambda h, w: tf.stack(ops.reference_output_size(h, w, min_size, max_size)))
            in_data = np.stack(list(dataset.as_numpy_iterator()))
            self.assertAllEqual(eager, expected, msg=f"eager {min_size}/{max_size}")
            self.assertAllEqual(in_data, expected, msg=f"tf.data {min_size}/{max_size}")

    def test_output_dtype_is_int32(self):
        for got in run_both(lambda a, b: ops.reference_output_size(a, b, 800, 1333), 480, 640):
            self.assertEqual(got[0].dtype, np.int32)
            self.assertEqual(got[1].dtype, np.int32)


def normalized(boxes_xywh, height, width):
    """COCO [x, y, w, h] boxes -> the record's [ymin, xmin, ymax, xmax] in [0, 1] (float32)."""
    b = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    return np.stack([b[:, 1] / height, b[:, 0] / width, (b[:, 1] + b[:, 3]) / height,
                     (b[:, 0] + b[:, 2]) / width], axis=-1).astype(np.float32)


class NormalizedToReferenceBoxesTest(tf.test.TestCase):
    H, W = 40, 60

    def convert(self, boxes_xywh, legacy_plus_one=True, boxes_normalized=None):
        if boxes_normalized is None:
            boxes_normalized = normalized(boxes_xywh, self.H, self.W)
        return run_both(lambda b: ops.normalized_to_reference_boxes(
            b, self.H, self.W, legacy_plus_one), boxes_normalized)

    def test_inclusive_corners_and_validity(self):
        boxes_xywh = [
            [10, 5, 20, 10],  # plain: (y1, x1, y2, x2) = (5, 10, 14, 29)
            [40, 30, 20, 10],  # reaches the right and bottom edges: x2 = 59, y2 = 39
            [45, 10, 1, 8],  # 1 px wide: x2 = x1, dropped as in the reference
            [10, 30, 10, 1],  # 1 px tall: dropped
            [59, 0, 1, 40],  # 1 px wide at the right edge: dropped
            [20, 20, 2, 2],  # 2 x 2 px: kept, x2 = x1 + 1
            [0, 0, 60, 40],  # the whole image
        ]
        expected_boxes = [[5, 10, 14, 29], [30, 40, 39, 59], [10, 45, 17, 45], [30, 10, 30, 19],
                          [0, 59, 39, 59], [20, 20, 21, 21], [0, 0, 39, 59]]
        expected_valid = [True, True, False, False, False, True, True]
        for mode, (boxes, valid) in zip(("eager", "tf.data"), self.convert(boxes_xywh)):
            self.assertAllClose(boxes, expected_boxes, atol=1e-4, msg=mode)
            self.assertAllEqual(valid, expected_valid, msg=mode)
            self.assertEqual(boxes.dtype, np.float32)

    def test_clips_to_the_image(self):
        # Normalised corners outside [0, 1] (not written by our converter, but legal input).
        boxes_normalized = np.array([[-0.1, -0.5, 1.2, 1.5], [0.5, 1.1, 0.9, 1.3]], np.float32)
        expected = [[0, 0, 39, 59], [20, 59, 35, 59]]
        for mode, (boxes, valid) in zip(("eager", "tf.data"),
                                        self.convert(None, boxes_normalized=boxes_normalized)):
            self.assertAllClose(boxes, expected, atol=1e-4, msg=mode)
            # The second box lies right of the image: clipped to zero width, dropped.
            self.assertAllEqual(valid, [True, False], msg=mode)

    def test_continuous_corners(self):
        # legacy_plus_one=False: x2 = x + w, clipped to [0, W]; a 1 px box is kept.
        boxes_xywh = [[10, 5, 20, 10], [45, 10, 1, 8], [40, 30, 20, 10], [45, 10, 0, 8]]
        expected = [[5, 10, 15, 30], [10, 45, 18, 46], [30, 40, 40, 60], [10, 45, 18, 45]]
        for mode, (boxes, valid) in zip(("eager", "tf.data"),
                                        self.convert(boxes_xywh, legacy_plus_one=False)):
            self.assertAllClose(boxes, expected, atol=1e-4, msg=mode)
            self.assertAllEqual(valid, [True, True, True, False], msg=mode)

    def test_empty(self):
        for boxes, valid in self.convert(np.zeros([0, 4])):
            self.assertEqual(boxes.shape, (0, 4))
            self.assertEqual(valid.shape, (0,))

    def test_one_pixel_boxes_are_invalid_at_every_position(self):
        """The reference drops EVERY box 1 px wide (x2 = x + 1 - 1 = x1), wherever it lies.

        Our records store (x + 1) / W as float32, and float32(float32((x + 1) / W) * W) - 1 can
        exceed float32(float32(x / W) * W) by one ulp, so the filter must not depend on that
        rounding. Checked for COCO-typical widths and heights.
        """
        wrongly_kept = {}
        for size in (427, 480, 640):
            positions = np.arange(size - 1, dtype=np.float64)
            # 1 px wide boxes in a size x size image (x varies), and 1 px tall ones (y varies).
            wide = normalized([[x, 0, 1, 10] for x in positions], size, size)
            tall = normalized([[0, y, 10, 1] for y in positions], size, size)
            for name, boxes_normalized in (("1 px wide", wide), ("1 px tall", tall)):
                for mode, (_, valid) in zip(("eager", "tf.data"), run_both(
                        lambda b: ops.normalized_to_reference_boxes(b, size, size),
                        boxes_normalized)):
                    kept = positions[valid].astype(int)
                    if len(kept):
                        wrongly_kept[f"{name}, {size}x{size}, {mode}"] = (
                            f"{len(kept)} of {size - 1} kept, at {kept[:6].tolist()}...")
        self.assertEqual(len(wrongly_kept), 0,
                         msg=f"1 px boxes the reference drops were kept: {wrongly_kept}")


class ResizeAndFlipBoxesTest(tf.test.TestCase):

    def test_resize_boxes(self):
        boxes = np.array([[1, 2, 3, 4], [10, 20, 30, 40]], np.float32)
        expected = [[2, 1, 6, 2], [20, 10, 60, 20]]
        for got in run_both(lambda b: ops.resize_boxes(b, 2.0, 0.5), boxes):
            self.assertAllClose(got, expected)

    def test_flip_inclusive(self):
        # Image 60 px wide: x' = 60 - x - 1.
        boxes = np.array([[5, 10, 14, 29], [0, 0, 39, 59]], np.float32)
        expected = [[5, 30, 14, 49], [0, 0, 39, 59]]
        for got in run_both(lambda b: ops.flip_boxes_left_right(b, 60), boxes):
            self.assertAllClose(got, expected)

    def test_flip_continuous(self):
        boxes = np.array([[5, 10, 15, 30]], np.float32)
        for got in run_both(lambda b: ops.flip_boxes_left_right(b, 60, False), boxes):
            self.assertAllClose(got, [[5, 30, 15, 50]])

    def test_flip_twice_is_identity(self):
        boxes = np.random.default_rng(1).uniform(0, 47, size=(20, 4)).astype(np.float32)
        boxes[:, 2:] += boxes[:, :2]
        for plus_one in (True, False):
            for got in run_both(lambda b: ops.flip_boxes_left_right(
                    ops.flip_boxes_left_right(b, 97, plus_one), 97, plus_one), boxes):
                # w - x (w = 96 or 97) is exact for x >= w / 2 (Sterbenz) and within half an
                # ulp of 96 (3.8e-6) below; flipping back is then exact: IEEE, any CPU.
                self.assertAllClose(got, boxes, atol=1e-5)

    def test_flip_accepts_int_width_tensor(self):
        # The parser passes the resized width as an int32 tensor.
        boxes = np.array([[0, 4.8, 10, 20.0]], np.float32)
        for got in run_both(lambda b, w: ops.flip_boxes_left_right(b, w), boxes, np.int32(48)):
            self.assertAllClose(got, [[0, 27.0, 10, 42.2]], atol=1e-5)


class NormalizeImageTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.image = np.random.default_rng(2).uniform(0, 255, size=(5, 7, 3)).astype(np.float32)

    def test_bgr_caffe(self):
        expected = self.image[..., ::-1] - CAFFE_BGR_MEAN
        for got in run_both(lambda i: ops.normalize_image(i, "bgr_caffe"), self.image):
            self.assertAllClose(got, expected, atol=1e-4)
        # The default mode is the reference's.
        for got in run_both(ops.normalize_image, self.image):
            self.assertAllClose(got, expected, atol=1e-4)

    def test_bgr_caffe_constant_colour(self):
        image = np.zeros([2, 3, 3], np.float32) + np.array([200, 100, 50], np.float32)
        expected = [50 - 102.9801, 100 - 115.9465, 200 - 122.7717]
        for got in run_both(ops.normalize_image, image):
            self.assertAllClose(got, np.broadcast_to(expected, got.shape), atol=1e-4)

    def test_rgb_imagenet(self):
        expected = (self.image / 255.0 - IMAGENET_RGB_MEAN) / IMAGENET_RGB_STD
        for got in run_both(lambda i: ops.normalize_image(i, "rgb_imagenet"), self.image):
            self.assertAllClose(got, expected, atol=1e-5)

    def test_bad_mode_raises(self):
        with self.assertRaisesRegex(ValueError, "pixel_mode"):
            ops.normalize_image(self.image, "rgb")
        with self.assertRaisesRegex(ValueError, "pixel_mode"):
            tf.data.Dataset.from_tensors(self.image).map(
                lambda i: ops.normalize_image(i, "bgr"))


class PadToFixedSizeTest(tf.test.TestCase):

    def test_pads_with_value(self):
        boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
        for got in run_both(lambda b: ops.pad_to_fixed_size(b, 5, -1), boxes):
            self.assertAllEqual(got[:3], boxes)
            self.assertAllEqual(got[3:], -np.ones([2, 4]))
            self.assertEqual(got.dtype, np.float32)

    def test_truncates(self):
        classes = np.arange(7, dtype=np.int32)
        for got in run_both(lambda c: ops.pad_to_fixed_size(c, 5, -1), classes):
            self.assertAllEqual(got, [0, 1, 2, 3, 4])
            self.assertEqual(got.dtype, np.int32)

    def test_empty_and_3d(self):
        masks = np.zeros([0, 3, 3], np.float32)
        for got in run_both(lambda m: ops.pad_to_fixed_size(m, 2, -1), masks):
            self.assertAllEqual(got, -np.ones([2, 3, 3]))

    def test_static_shape_from_dynamic_input(self):
        # In tf.data the instance count is unknown (boolean_mask); the output must be static.
        boxes = np.array([[1, 1, 2, 2], [-5, 0, 0, 0], [3, 3, 4, 4]], np.float32)
        dataset = tf.data.Dataset.from_tensors(boxes).map(
            lambda b: ops.pad_to_fixed_size(tf.boolean_mask(b, b[:, 0] >= 0), 4, -1))
        self.assertEqual(dataset.element_spec.shape.as_list(), [4, 4])
        got = next(iter(dataset.as_numpy_iterator()))
        self.assertAllEqual(got, [[1, 1, 2, 2], [3, 3, 4, 4], [-1] * 4, [-1] * 4])


class PaddedImageSizeTest(tf.test.TestCase):

    def test_sizes(self):
        self.assertEqual(ops.padded_image_size(800, 1333, 32, portrait=False), (800, 1344))
        self.assertEqual(ops.padded_image_size(800, 1333, 32, portrait=True), (1344, 800))
        self.assertEqual(ops.padded_image_size(32, 64, 32, portrait=False), (32, 64))
        self.assertEqual(ops.padded_image_size(33, 64, 32, portrait=True), (64, 64))
        self.assertEqual(ops.padded_image_size(800, 1333, 1, portrait=False), (800, 1333))

    def test_python_ints(self):
        # Static shapes need Python ints, not tensors.
        for side in ops.padded_image_size(800, 1333, 32, portrait=True):
            self.assertIsInstance(side, int)


class CropAndResizeMasksTest(tf.test.TestCase):

    def crop(self, masks, boxes, crop_size):
        return run_both(lambda m, b: ops.crop_and_resize_masks(m, b, crop_size), masks, boxes)

    def test_matches_numpy_on_random_masks_and_boxes(self):
        rng = np.random.default_rng(3)
        height, width, num = 37, 53, 12
        # Smooth blobs rather than noise, so interpolation errors would show.
        noise = rng.uniform(size=(num, height, width))
        masks = (ndimage.gaussian_filter(noise, sigma=(0, 3, 3)) > 0.5).astype(np.uint8)
        # Boxes inside the image (the parser clips them), some touching its edges.
        y1 = np.clip(rng.uniform(-5, height - 2, num), 0, None)
        x1 = np.clip(rng.uniform(-5, width - 2, num), 0, None)
        boxes = np.stack([y1, x1, np.minimum(y1 + rng.uniform(1, 30, num), height),
                          np.minimum(x1 + rng.uniform(1, 40, num), width)],
                         axis=-1).astype(np.float32)
        for crop_size in (7, 28):
            expected = np.stack([numpy_crop_and_resize(m, b, crop_size)
                                 for m, b in zip(masks, boxes)])
            for mode, got in zip(("eager", "tf.data"), self.crop(masks, boxes, crop_size)):
                self.assertEqual(got.shape, (num, crop_size, crop_size))
                self.assertEqual(got.dtype, np.float32)
                self.assertAllClose(got, expected, atol=1e-4, msg=f"{mode} M={crop_size}")

    def test_identity_over_the_whole_image(self):
        # M = H = W and the box is the whole image: bin centres are the pixel centres.
        mask = np.random.default_rng(4).integers(0, 2, size=(1, 8, 8)).astype(np.uint8)
        for got in self.crop(mask, np.array([[0, 0, 8, 8]], np.float32), 8):
            self.assertAllClose(got, mask, atol=1e-5)

    def test_all_ones_inside(self):
        masks = np.ones([1, 10, 10], np.uint8)
        for got in self.crop(masks, np.array([[2, 2, 8, 8]], np.float32), 4):
            self.assertAllClose(got, np.ones([1, 4, 4]))

    def test_outer_half_pixel_takes_the_edge_value(self):
        # A 1-pixel-wide box at the left edge: its bin centre x = 0.25 lies between the image
        # edge and pixel 0's centre, so it reads pixel 0 (crop_and_resize alone would read 0).
        masks = np.zeros([1, 10, 10], np.uint8)
        masks[:, :, 0] = 1
        for got in self.crop(masks, np.array([[0, 0, 10, 0.5]], np.float32), 2):
            self.assertAllClose(got, [[[1, 1], [1, 1]]], atol=1e-6)

    def test_left_half_mask(self):
        # Left half on; 2 bins over the whole 10 px: centres x = 2.5 (index 2) and 7.5 (index 7).
        masks = np.zeros([1, 10, 10], np.uint8)
        masks[:, :, :5] = 1
        for got in self.crop(masks, np.array([[0, 0, 10, 10]], np.float32), 2):
            self.assertAllClose(got, [[[1, 0], [1, 0]]], atol=1e-6)

    def test_bilinear_between_pixels(self):
        # One column on (x = 4); 1 bin over [3.5, 4.5] has its centre at x = 4.0 (index 3.5):
        # halfway between pixel 3 (off) and pixel 4 (on).
        masks = np.zeros([1, 6, 8], np.uint8)
        masks[:, :, 4] = 1
        for got in self.crop(masks, np.array([[2, 3.5, 3, 4.5]], np.float32), 1):
            self.assertAllClose(got, [[[0.5]]], atol=1e-6)

    def test_no_instances(self):
        for got in self.crop(np.zeros([0, 5, 6], np.uint8), np.zeros([0, 4], np.float32), 3):
            self.assertEqual(got.shape, (0, 3, 3))


# ---------------------------------------------------------------------------------------------
# TrainParser end to end on hand-made records.

def encode_jpeg(image):
    """[H, W, 3] uint8 -> JPEG bytes (4:4:4 like the converter, so flat colours survive)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def make_record(image, instances, source_id=7):
    """A serialized record like `image_worker` writes.

    Args:
      image: [H, W, 3] uint8.
      instances: list of dicts with bbox_xywh, label, is_crowd, mask ([H, W] uint8 0/1).
    """
    height, width = image.shape[:2]
    jpeg = encode_jpeg(image)
    features = {key: [] for key in F.OBJECT_KEYS}
    features.update({
        F.ENCODED: [jpeg], F.FORMAT: [b"jpeg"], F.SOURCE_ID: [str(source_id).encode()],
        F.FILENAME: [b"x.jpg"], F.SHA256: [b"0" * 64], F.HEIGHT: [height], F.WIDTH: [width],
    })
    for annotation_id, instance in enumerate(instances, start=1):
        x, y, w, h = instance["bbox_xywh"]
        features[F.YMIN].append(y / height)
        features[F.XMIN].append(x / width)
        features[F.YMAX].append((y + h) / height)
        features[F.XMAX].append((x + w) / width)
        features[F.LABEL].append(instance["label"])
        features[F.TEXT].append(b"thing")
        features[F.IS_CROWD].append(instance["is_crowd"])
        features[F.AREA].append(float(instance["mask"].sum()))
        features[F.MASK].append(mask_codec.encode_png(instance["mask"]))
        features[F.ANNOTATION_ID].append(annotation_id)
    return tf_example.serialize(features)


def box_mask(height, width, bbox_xywh):
    """A filled rectangle mask of a COCO box."""
    x, y, w, h = bbox_xywh
    mask = np.zeros([height, width], np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


class TrainParserTest(tf.test.TestCase):
    """A 40 x 60 landscape image; min_size 32, max_size 64 -> resized 32 x 48, padded 32 x 64.

    Both scales are 32 / 40 = 48 / 60 = 0.8. Instances, in record order (COCO xywh):
      A  [6, 4, 20, 16]  label 1: an L-shaped mask (asymmetric), box (y1, x1, y2, x2) =
                         (4, 6, 19, 25) -> resized (3.2, 4.8, 15.2, 20.0)
      -  [30, 5, 10, 10] label 2, crowd: dropped
      -  [45, 10, 1, 8]  label 5, 1 px wide: dropped
      B  [35, 20, 24, 18] label 3: a filled rectangle, box (20, 35, 37, 58) ->
                         resized (16.0, 28.0, 29.6, 46.4)
      -  [10, 30, 10, 1] label 4, 1 px tall: dropped
    Flipped in the resized image (w = 48): x' = 47 - x, so A -> (3.2, 27.0, 15.2, 42.2) and
    B -> (16.0, 0.6, 29.6, 19.0).
    The masks' continuous extents (y, x, y + h, x + w): A (4, 6, 20, 26) -> resized
    (3.2, 4.8, 16.0, 20.8), B (20, 35, 38, 59) -> (16.0, 28.0, 30.4, 47.2); flipped like the
    boxes (x' = 47 - x): A (3.2, 26.2, 16.0, 42.2), B (16.0, -0.2, 30.4, 19.0).
    """
    H, W = 40, 60
    COLOUR_RGB = (200, 100, 50)  # survives JPEG exactly (checked in the test)
    MASK_SIZE = 16
    MAX_INSTANCES = 6
    EXPECTED_BOXES = np.array([[3.2, 4.8, 15.2, 20.0], [16.0, 28.0, 29.6, 46.4]])
    EXPECTED_FLIPPED = np.array([[3.2, 27.0, 15.2, 42.2], [16.0, 0.6, 29.6, 19.0]])
    ORIGINAL_BOXES = np.array([[4, 6, 19, 25], [20, 35, 37, 58]], np.float32)
    ORIGINAL_EXTENTS = np.array([[4, 6, 20, 26], [20, 35, 38, 59]], np.float32)
    EXPECTED_EXTENTS = np.array([[3.2, 4.8, 16.0, 20.8], [16.0, 28.0, 30.4, 47.2]])
    EXPECTED_FLIPPED_EXTENTS = np.array([[3.2, 26.2, 16.0, 42.2], [16.0, -0.2, 30.4, 19.0]])

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        h, w = cls.H, cls.W
        l_mask = np.zeros([h, w], np.uint8)
        l_mask[4:20, 6:12] = 1  # the upright bar of the L
        l_mask[16:20, 6:26] = 1  # its foot, to the right: the box is the mask's tight extent
        cls.masks = [l_mask, box_mask(h, w, [30, 5, 10, 10]), box_mask(h, w, [45, 10, 1, 8]),
                     box_mask(h, w, [35, 20, 24, 18]), box_mask(h, w, [10, 30, 10, 1])]
        boxes = [[6, 4, 20, 16], [30, 5, 10, 10], [45, 10, 1, 8], [35, 20, 24, 18],
                 [10, 30, 10, 1]]
        labels, crowd = [1, 2, 5, 3, 4], [0, 1, 0, 0, 0]
        cls.image = np.zeros([h, w, 3], np.uint8) + np.array(cls.COLOUR_RGB, np.uint8)
        cls.record = make_record(cls.image, [
            {"bbox_xywh": b, "label": c, "is_crowd": k, "mask": m}
            for b, c, k, m in zip(boxes, labels, crowd, cls.masks)])

    def parser(self, flip_probability, **kwargs):
        return parsers.TrainParser(min_size=32, max_size=64, flip_probability=flip_probability,
                                   max_instances=self.MAX_INSTANCES, mask_size=self.MASK_SIZE,
                                   **kwargs)

    def parse_both(self, record, parser):
        """[eager output, tf.data output] of parser on one serialized record."""
        seed = tf.constant([1, 2], tf.int64)
        eager = parser(decoder.parse_example(tf.constant(record)), seed)
        eager = {key: value.numpy() for key, value in eager.items()}
        dataset = tf.data.Dataset.from_tensors(record).map(decoder.parse_example).map(
            lambda p: parser(p, seed))
        return [eager, next(iter(dataset.as_numpy_iterator()))], dataset.element_spec

    def test_jpeg_keeps_the_colour(self):
        # Precondition of the pixel checks below.
        decoded = decoder.decode_image(encode_jpeg(self.image)).numpy()
        self.assertAllEqual(decoded, self.image)

    def test_static_shapes_and_dtypes(self):
        _, spec = self.parse_both(self.record, self.parser(0.0))
        n, m = self.MAX_INSTANCES, self.MASK_SIZE
        expected = {
            "gt_boxes": ([n, 4], tf.float32), "gt_classes": ([n], tf.int32),
            "gt_masks": ([n, m, m], tf.float32), "gt_mask_boxes": ([n, 4], tf.float32),
            "image_size": ([2], tf.int32),
            "source_id": ([], tf.int64),
        }
        for key, (shape, dtype) in expected.items():
            self.assertEqual(spec[key].shape.as_list(), shape, msg=key)
            self.assertEqual(spec[key].dtype, dtype, msg=key)
        # The padded image size depends on the orientation, a runtime value: only its rank and
        # channels are static here (the runtime size is checked below).
        self.assertEqual(spec["images"].shape.as_list()[-1], 3)
        self.assertEqual(spec["images"].dtype, tf.float32)

    def test_boxes_classes_and_padding(self):
        for flip_probability, expected_boxes in ((0.0, self.EXPECTED_BOXES),
                                                 (1.0, self.EXPECTED_FLIPPED)):
            outputs, _ = self.parse_both(self.record, self.parser(flip_probability))
            for mode, out in zip(("eager", "tf.data"), outputs):
                msg = f"{mode}, flip_probability {flip_probability}"
                self.assertAllClose(out["gt_boxes"][:2], expected_boxes, atol=1e-4, msg=msg)
                self.assertAllEqual(out["gt_boxes"][2:], -np.ones([4, 4]), msg=msg)
                # Crowd (2) and the 1 px boxes (5, 4) dropped; record order kept.
                self.assertAllEqual(out["gt_classes"], [1, 3, -1, -1, -1, -1], msg=msg)
                self.assertAllEqual(out["gt_masks"][2:], -np.ones([4, 16, 16]), msg=msg)
                self.assertAllEqual(out["image_size"], [32, 48], msg=msg)
                self.assertEqual(out["source_id"], 7, msg=msg)

    def test_mask_extents_and_their_flip(self):
        for flip_probability, want in ((0.0, self.EXPECTED_EXTENTS),
                                       (1.0, self.EXPECTED_FLIPPED_EXTENTS)):
            outputs, _ = self.parse_both(self.record, self.parser(flip_probability))
            for mode, out in zip(("eager", "tf.data"), outputs):
                msg = f"{mode}, flip_probability {flip_probability}"
                self.assertAllClose(out["gt_mask_boxes"][:2], want, atol=1e-4, msg=msg)
                self.assertAllEqual(out["gt_mask_boxes"][2:], -np.ones([4, 4]), msg=msg)
                # One pixel (0.8 resized) past the inclusive boxes at ymax and xmax (unflipped),
                # at ymax and xmin (flipped); the other corners are the boxes'.
                boxes = self.EXPECTED_FLIPPED if flip_probability else self.EXPECTED_BOXES
                self.assertAllClose(out["gt_mask_boxes"][:2] - boxes,
                                    np.tile([0, -0.8, 0.8, 0] if flip_probability else
                                            [0, 0, 0.8, 0.8], [2, 1]), atol=1e-4, msg=msg)
        # With continuous boxes (legacy_plus_one=False) the extents are the boxes.
        outputs, _ = self.parse_both(self.record, self.parser(1.0, legacy_plus_one=False))
        for out in outputs:
            self.assertAllClose(out["gt_mask_boxes"], out["gt_boxes"])

    def test_masks_and_their_flip(self):
        kept_masks = np.stack([self.masks[0], self.masks[3]])
        # The crops cover each object's continuous extent [x, x + w] (the polygons' span), not
        # its inclusive box (x2 = x + w - 1, which this expectation used before issue 14 and
        # which cut off the last pixel column and row).
        expected = np.stack([numpy_crop_and_resize(mask, box, self.MASK_SIZE)
                             for mask, box in zip(kept_masks, self.ORIGINAL_EXTENTS)])
        # The rectangle B fills its extent: every bin of its crop is inside it.
        self.assertAllClose(expected[1], np.ones([self.MASK_SIZE, self.MASK_SIZE]))
        # The L mask is asymmetric, so a missing or wrong flip shows.
        self.assertGreater(np.abs(expected[0] - expected[0][:, ::-1]).max(), 0.5)
        # The reference flips polygons like boxes, x' = W - x - 1: relative to the flipped box
        # the flipped mask is the exact mirror. Independently: the reference's flipped mask
        # (pixel i takes pixel W - 2 - i) cropped over the flipped extent of the original image
        # (the extent, not the box, for the reason above).
        flipped_masks = np.zeros_like(kept_masks)
        flipped_masks[:, :, :self.W - 1] = kept_masks[:, :, self.W - 2::-1]
        flipped_boxes = self.ORIGINAL_EXTENTS.copy()
        flipped_boxes[:, 1] = self.W - 1 - self.ORIGINAL_EXTENTS[:, 3]
        flipped_boxes[:, 3] = self.W - 1 - self.ORIGINAL_EXTENTS[:, 1]
        expected_flipped = np.stack([numpy_crop_and_resize(mask, box, self.MASK_SIZE)
                                     for mask, box in zip(flipped_masks, flipped_boxes)])
        self.assertAllClose(expected_flipped, expected[:, :, ::-1], atol=1e-5)

        for flip_probability, want in ((0.0, expected), (1.0, expected_flipped)):
            outputs, _ = self.parse_both(self.record, self.parser(flip_probability))
            for mode, out in zip(("eager", "tf.data"), outputs):
                self.assertAllClose(out["gt_masks"][:2], want, atol=1e-4,
                                    msg=f"{mode}, flip_probability {flip_probability}")
        unflipped, _ = self.parse_both(self.record, self.parser(0.0))
        flipped, _ = self.parse_both(self.record, self.parser(1.0))
        self.assertAllClose(flipped[0]["gt_masks"][:2], unflipped[0]["gt_masks"][:2, :, ::-1])

    def test_mask_targets_of_mirrored_rois_are_the_mirrored_targets(self):
        # The flip stays exact: the gt boxes, the mask extents and the ROIs all mirror by the
        # one reflection x' = w - 1 - x (w = 48), the crops are reversed, so the 28 x 28 target
        # of a mirrored ROI is the mirror of the unflipped ROI's target, bin for bin.
        unflipped, _ = self.parse_both(self.record, self.parser(0.0))
        flipped, _ = self.parse_both(self.record, self.parser(1.0))
        rois = np.concatenate([self.EXPECTED_BOXES, self.EXPECTED_BOXES + [-1.3, 2.1, 0.7, -1.9],
                               self.EXPECTED_BOXES + [0.4, -3.2, 2.6, 1.5]]).astype(np.float32)
        mirrored = rois.copy()
        mirrored[:, 1], mirrored[:, 3] = 47 - rois[:, 3], 47 - rois[:, 1]
        matched = np.array([[0, 1] * 3], np.int32)
        targets = [mask_targets.mask_targets(out["gt_masks"][None], out["gt_mask_boxes"][None],
                                             boxes[None], matched).numpy()[0]
                   for out, boxes in ((unflipped[0], rois), (flipped[0], mirrored))]
        self.assertGreater(targets[0].sum(), 500)
        self.assertAllEqual(targets[1], targets[0][:, :, ::-1])
        # An ROI over the rectangle B's whole extent sees only B: all ones, also in its last
        # bins, whose centres lie past the inclusive box (zeroed there before issue 14).
        for out in (unflipped[0], flipped[0]):
            extents = out["gt_mask_boxes"][None, :2]
            whole = mask_targets.mask_targets(out["gt_masks"][None], out["gt_mask_boxes"][None],
                                              extents, np.array([[0, 1]], np.int32))
            self.assertAllEqual(whole.numpy()[0, 1], np.ones([28, 28]))

    def test_pixels_bgr_caffe_and_zero_padding(self):
        r, g, b = self.COLOUR_RGB
        expected = np.array([b - 102.9801, g - 115.9465, r - 122.7717])
        for flip_probability in (0.0, 1.0):
            outputs, _ = self.parse_both(self.record, self.parser(flip_probability))
            for mode, out in zip(("eager", "tf.data"), outputs):
                msg = f"{mode}, flip_probability {flip_probability}"
                images = out["images"]
                self.assertEqual(images.shape, (32, 64, 3), msg=msg)
                self.assertAllClose(images[:32, :48], np.broadcast_to(expected, (32, 48, 3)),
                                    atol=1e-3, msg=msg)
                self.assertAllEqual(images[:, 48:], np.zeros([32, 16, 3]), msg=msg)

    def test_pixels_rgb_imagenet(self):
        expected = (np.array(self.COLOUR_RGB) / 255.0 - IMAGENET_RGB_MEAN) / IMAGENET_RGB_STD
        outputs, _ = self.parse_both(self.record, self.parser(0.0, pixel_mode="rgb_imagenet"))
        for out in outputs:
            self.assertAllClose(out["images"][:, :48], np.broadcast_to(expected, (32, 48, 3)),
                                atol=1e-4)
            self.assertAllEqual(out["images"][:, 48:], np.zeros([32, 16, 3]))

    def test_image_is_flipped(self):
        # Left half red, right half blue: after the flip the left part of the image is blue.
        image = np.zeros([self.H, self.W, 3], np.uint8)
        image[:, :30] = (255, 0, 0)
        image[:, 30:] = (0, 0, 255)
        record = make_record(image, [{"bbox_xywh": [6, 4, 20, 16], "label": 1, "is_crowd": 0,
                                      "mask": box_mask(self.H, self.W, [6, 4, 20, 16])}])
        red = np.array([0 - 102.9801, 0 - 115.9465, 255 - 122.7717])  # BGR order
        blue = np.array([255 - 102.9801, 0 - 115.9465, 0 - 122.7717])
        for flip_probability, (left, right) in ((0.0, (red, blue)), (1.0, (blue, red))):
            outputs, _ = self.parse_both(record, self.parser(flip_probability))
            for out in outputs:
                # Columns far from the colour edge (resized at x = 24), where JPEG ringing and
                # the resize kernel leave the flat colour within a few levels.
                self.assertAllClose(out["images"][:, :16].mean(axis=(0, 1)), left, atol=4)
                self.assertAllClose(out["images"][:, 32:48].mean(axis=(0, 1)), right, atol=4)

    def test_portrait(self):
        # The transpose: 60 x 40 -> resized 48 x 32, padded 64 x 32 (portrait group).
        image = np.zeros([self.W, self.H, 3], np.uint8) + np.array(self.COLOUR_RGB, np.uint8)
        record = make_record(image, [{"bbox_xywh": [4, 6, 16, 20], "label": 2, "is_crowd": 0,
                                      "mask": box_mask(self.W, self.H, [4, 6, 16, 20])}])
        for flip_probability, expected_box in ((0.0, [4.8, 3.2, 20.0, 15.2]),
                                               (1.0, [4.8, 31 - 15.2, 20.0, 31 - 3.2])):
            outputs, _ = self.parse_both(record, self.parser(flip_probability))
            for out in outputs:
                self.assertEqual(out["images"].shape, (64, 32, 3))
                self.assertAllEqual(out["image_size"], [48, 32])
                self.assertAllEqual(out["images"][48:], np.zeros([16, 32, 3]))
                self.assertAllClose(out["gt_boxes"][0], expected_box, atol=1e-4)
                self.assertAllEqual(out["gt_classes"], [2, -1, -1, -1, -1, -1])
                # Cropped over the rectangle's continuous extent (6, 4, 26, 20), not over its
                # inclusive box (6, 4, 25, 19) as this expectation was before issue 14: every
                # bin centre is inside the filled rectangle, so the crop is all ones.
                expected_mask = numpy_crop_and_resize(
                    box_mask(self.W, self.H, [4, 6, 16, 20]), [6, 4, 26, 20], 16)
                self.assertAllClose(expected_mask, np.ones([16, 16]))
                if flip_probability:
                    expected_mask = expected_mask[:, ::-1]
                self.assertAllClose(out["gt_masks"][0], expected_mask, atol=1e-4)


if __name__ == "__main__":
    tf.test.main()
