"""Image files for inference: format by content, RGB decoding, ids, and every bad path named."""

import os
import shutil

import numpy as np
import tensorflow as tf
from PIL import Image

from official_maskrcnn.inference import image_files
from official_maskrcnn.inference.image_files import PredictError


def write_image(path, height, width, mode="RGB", seed=0):
    """A random image saved by PIL in the format of the path's extension; returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


class ImageFilesTest(tf.test.TestCase):

    def test_inputs_are_checked_in_order_with_ids_and_pictures(self):
        folder = self.create_tempdir().full_path
        jpeg = os.path.join(folder, "000000000139.jpg")
        png = os.path.join(folder, "7.png")
        write_image(jpeg, 30, 40)
        write_image(png, 50, 20, mode="L")
        output_dir = os.path.join(folder, "out")
        checked = image_files.check_inputs([jpeg, png], output_dir)
        self.assertEqual([(c.path, c.image_format, c.height, c.width, c.image_id)
                          for c in checked],
                         [(jpeg, "jpeg", 30, 40, 139), (png, "png", 50, 20, 7)])
        self.assertEqual([c.picture_path for c in checked],
                         [os.path.join(output_dir, "000000000139.png"),
                          os.path.join(output_dir, "7.png")])
        self.assertFalse(os.path.exists(output_dir))
        with self.assertRaisesRegex(PredictError, "no image given"):
            image_files.check_inputs([], output_dir)

    def test_format_comes_from_the_bytes_not_the_name(self):
        folder = self.create_tempdir().full_path
        disguised = os.path.join(folder, "photo.jpg")
        write_image(os.path.join(folder, "real.png"), 4, 5)
        shutil.copy(os.path.join(folder, "real.png"), disguised)
        self.assertEqual(image_files.read_image_bytes(disguised)[1], "png")
        empty = os.path.join(folder, "empty.png")
        open(empty, "wb").close()
        with self.assertRaisesRegex(PredictError, f"{empty}: empty file"):
            image_files.read_image_bytes(empty)
        with self.assertRaisesRegex(PredictError, f"{folder}: is a folder"):
            image_files.read_image_bytes(folder)

    def test_truncated_image_and_colliding_names_are_errors(self):
        folder = self.create_tempdir().full_path
        source = os.path.join(self.create_tempdir().full_path, "000000000042.jpg")
        write_image(source, 64, 48)
        truncated = os.path.join(folder, "cut.jpg")
        with open(source, "rb") as f, open(truncated, "wb") as out:
            out.write(f.read()[:200])
        with self.assertRaisesRegex(PredictError, f"{truncated}: the JPEG data does not"):
            image_files.check_inputs([truncated], folder)
        gray = os.path.join(self.create_tempdir().full_path, "000000000043.png")
        write_image(gray, 9, 11, mode="L")
        twin = os.path.join(folder, os.path.basename(gray))
        shutil.copy(gray, twin)
        with self.assertRaisesRegex(PredictError, "same file stem"):
            image_files.check_inputs([gray, twin], folder)
        with self.assertRaisesRegex(PredictError, "would overwrite it"):
            image_files.check_inputs([twin], folder)
        # RGBA and grayscale PNGs decode to RGB.
        rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
        rgba = os.path.join(folder, "rgba.png")
        Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])).save(rgba)
        self.assertAllEqual(image_files.decode_image(*image_files.read_image_bytes(rgba)), rgb)
        gray = os.path.join(folder, "gray.png")
        Image.fromarray(rgb[..., 0]).save(gray)
        self.assertAllEqual(image_files.decode_image(*image_files.read_image_bytes(gray)),
                            np.repeat(rgb[..., :1], 3, axis=2))

    def test_every_bad_path_is_listed(self):
        folder = self.create_tempdir().full_path
        good = os.path.join(folder, "good.jpg")
        write_image(good, 8, 8)
        text = os.path.join(folder, "notes.jpg")
        with open(text, "w") as f:
            f.write("not an image\n")
        missing = os.path.join(folder, "missing.png")
        with self.assertRaises(PredictError) as raised:
            image_files.check_inputs([good, missing, text], os.path.join(folder, "out"))
        message = str(raised.exception)
        self.assertIn("2 of 3 input(s) cannot be used (nothing was written)", message)
        self.assertIn(f"{missing}: no such file", message)
        self.assertIn(f"{text}: not a JPEG or PNG image (first bytes b'not an i')", message)

    def test_image_ids_are_coco_numbers_only_when_all_are(self):
        self.assertEqual(image_files.assign_image_ids(["a/000000000139.jpg", "b/7.png"]), [139, 7])
        self.assertEqual(image_files.assign_image_ids(["a/000000000139.jpg", "cat.jpg"]), [1, 2])
        self.assertEqual(image_files.assign_image_ids(["a/5.jpg", "b/005.png"]), [1, 2])
        self.assertEqual(image_files.assign_image_ids([]), [])


if __name__ == "__main__":
    tf.test.main()
