"""Image files given to inference, read and checked before any model is built.

`check_inputs` reads and decodes every path (JPEG or PNG, told apart by their first bytes, not
their names), gives each an image id and a picture path, and reports every bad path at once.
Decoding matches the eval records: JPEG through `data.decoder.decode_image`, grayscale and RGBA
converted to RGB, so a decoded image is [H, W, 3] uint8.
"""

import dataclasses
import os
import re

import tensorflow as tf

from official_maskrcnn.data import decoder

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COCO_STYLE_STEM = re.compile(r"^\d+$")


class PredictError(ValueError):
    """A bad image, checkpoint, config or argument of inference; the message says which and
    where."""


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One input image, checked: its path, format ("jpeg" / "png"), size, id and picture path."""
    path: str
    image_format: str
    height: int
    width: int
    image_id: int
    picture_path: str


def image_format(path, head):
    """"jpeg" or "png" from the file's first bytes (not its name); PredictError otherwise."""
    if not head:
        raise PredictError(f"{path}: empty file, expected a JPEG or PNG image")
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    raise PredictError(f"{path}: not a JPEG or PNG image (first bytes {head[:8]!r})")


def read_image_bytes(path):
    """(encoded bytes, "jpeg" | "png"); PredictError naming the path if missing or unreadable."""
    if not tf.io.gfile.exists(path):
        raise PredictError(f"{path}: no such file")
    if tf.io.gfile.isdir(path):
        raise PredictError(f"{path}: is a folder, expected an image file")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            encoded = f.read()
    except tf.errors.OpError as e:
        raise PredictError(f"{path}: cannot be read ({e.message})") from e
    return encoded, image_format(path, encoded[:8])


def decode_image(encoded, kind, path="image"):
    """JPEG / PNG bytes -> [H, W, 3] uint8 RGB tensor (grayscale replicated, alpha dropped).

    JPEG is decoded as the eval records are (`decoder.decode_image`, PIL's accurate IDCT).
    """
    try:
        if kind == "jpeg":
            return decoder.decode_image(encoded)
        return tf.ensure_shape(tf.io.decode_png(encoded, channels=3), [None, None, 3])
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise PredictError(f"{path}: the {kind.upper()} data does not decode "
                           f"({message})") from e


def assign_image_ids(paths):
    """Image ids: when every file stem is a number (COCO style, `000000000139.jpg` -> 139) and
    no two are equal, those numbers (so results can be scored against COCO annotations); else
    every image's 1-based position (mixing the two rules could give two images one id)."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    if stems and all(COCO_STYLE_STEM.match(stem) for stem in stems):
        numbers = [int(stem) for stem in stems]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(1, len(paths) + 1))


def check_inputs(paths, output_dir):
    """Reads and decodes every image (nothing is written); returns [ImageInput] in input order.

    The picture of `dir/name.jpg` is `output_dir/name.png`; two inputs with one stem, or a
    picture that would overwrite its input, are errors.

    Raises:
      PredictError: listing every unreadable / undecodable path, or colliding output names.
    """
    if not paths:
        raise PredictError("no image given: pass image files after the flags")
    problems, checked = [], []
    pictures = {}
    for path, image_id in zip(paths, assign_image_ids(paths)):
        picture = os.path.join(output_dir,
                               os.path.splitext(os.path.basename(path))[0] + ".png")
        if picture in pictures:
            problems.append(f"{path}: its picture {picture} would overwrite that of "
                            f"{pictures[picture]} (same file stem)")
            continue
        pictures[picture] = path
        if os.path.abspath(picture) == os.path.abspath(path):
            problems.append(f"{path}: its picture would overwrite it (choose another "
                            f"--output_dir)")
            continue
        try:
            encoded, kind = read_image_bytes(path)
            height, width, _ = decode_image(encoded, kind, path).shape
        except PredictError as e:
            problems.append(str(e))
            continue
        checked.append(ImageInput(path, kind, int(height), int(width), image_id, picture))
    if problems:
        raise PredictError(f"{len(problems)} of {len(paths)} input(s) cannot be used (nothing "
                           "was written):\n  " + "\n  ".join(problems))
    return checked
