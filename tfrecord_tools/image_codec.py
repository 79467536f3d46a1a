"""Reading an image file into the RGB JPEG bytes a record holds, with the image rules.

Rules (reasons as in `tally`):
  - a file that does not exist                       skip     `image_missing`
  - a file that cannot be opened or fully decoded    skip     `image_corrupt`
  - decoded size differs from the JSON's             skip     `image_size_mismatch`
    (the annotations are in the JSON's pixel frame, so they would not fit the pixels)
  - an RGB JPEG is stored byte for byte, unchanged
  - grayscale, CMYK, palette or other modes, and non-JPEG formats (e.g. PNG) are converted to RGB
    and re-encoded as JPEG at quality JPEG_QUALITY   count    `image_*_to_rgb`,
                                                              `image_reencoded_as_jpeg`
EXIF orientation is ignored on purpose: COCO annotations refer to the stored pixel grid, and so
does TensorFlow's `decode_jpeg`.
"""

import io

from PIL import Image

from tfrecord_tools import tally as tally_lib

JPEG_QUALITY = 95

_CONVERSION_OF_MODE = {
    "1": tally_lib.CONVERTED_GRAYSCALE,
    "L": tally_lib.CONVERTED_GRAYSCALE,
    "LA": tally_lib.CONVERTED_GRAYSCALE,
    "CMYK": tally_lib.CONVERTED_CMYK,
    "P": tally_lib.CONVERTED_PALETTE,
    "PA": tally_lib.CONVERTED_PALETTE,
}


class ImageSkip(Exception):
    """The image cannot be used; `reason` is a tally reason, the message says why."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def read_rgb_jpeg(path, expected_height, expected_width):
    """Returns (jpeg_bytes, conversion_reason or None) for the image file at `path`.

    Raises:
      ImageSkip: the file is missing, corrupt, or of another size than expected.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageSkip(tally_lib.IMAGE_MISSING, f"{path}: no such file") from None
    except OSError as e:
        raise ImageSkip(tally_lib.IMAGE_CORRUPT, f"{path}: cannot be read: {e}") from None

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if (height, width) != (expected_height, expected_width):
            raise ImageSkip(
                tally_lib.IMAGE_SIZE_MISMATCH,
                f"{path}: the JSON says {expected_width}x{expected_height} (w x h), "
                f"the file is {width}x{height}")
        is_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB"
        if is_rgb_jpeg:
            # Decoding at 1/8 scale still reads every entropy-coded block, so truncated or
            # broken files fail here, at a fraction of the cost of a full decode.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        image.load()
    except ImageSkip:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        raise ImageSkip(tally_lib.IMAGE_CORRUPT,
                        f"{path}: not a readable image: {type(e).__name__}: {e}") from None

    if is_rgb_jpeg:
        return data, None
    if image.format == "JPEG" or image.mode != "RGB":
        reason = _CONVERSION_OF_MODE.get(image.mode, tally_lib.CONVERTED_OTHER_MODE)
    else:
        reason = tally_lib.CONVERTED_NOT_JPEG
    return encode_jpeg(image.convert("RGB")), reason


def encode_jpeg(rgb_image):
    """PIL RGB image -> JPEG bytes (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    rgb_image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
