"""Instance masks: rasterising COCO segmentations and the PNG encoding stored in records.

A record stores each instance mask as an 8-bit grayscale PNG at the full image resolution with
values 0 (background) and 1 (object), like Model Garden's converter; decoders treat any value > 0
as the object.
"""

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# zlib's run-length strategy suits binary masks. On coco128's 939 masks (median of 5 passes): 1.40
# ms and 828 bytes per mask, against 2.22 ms and 914 bytes for the default strategy at PIL's
# default level 6, and 1.27 ms but 2085 bytes at level 1.
PNG_ZLIB_STRATEGY_RLE = 3  # zlib's Z_RLE


def segmentation_to_rle(segmentation, height, width):
    """A cleaned COCO segmentation -> one compressed RLE (pycocotools' own encoding).

    Takes what `annotation_rules.clean_annotation` returns: a polygon list, whose parts are merged
    into one region as pycocotools' `COCO.annToRLE` does, or an RLE whose counts the rules have
    decoded into a checked list of run lengths, which pycocotools compresses. (A compressed string
    straight from the JSON never reaches pycocotools' decoder, which does not check it.)
    """
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation.get("counts"), list):
        raise ValueError("expected the run lengths checked by annotation_rules.checked_rle, found "
                         f"counts of type {type(segmentation.get('counts')).__name__}")
    return mask_utils.frPyObjects(segmentation, height, width)


def rasterize(segmentation, height, width):
    """-> uint8 mask [height, width] with values 0/1."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width))


def rle_area(rle):
    """Number of object pixels of a compressed RLE, without decoding it."""
    return int(mask_utils.area(rle))


def decode_rle(rle):
    """Compressed RLE -> uint8 mask [height, width] with values 0/1."""
    return mask_utils.decode(rle)


def encode_png(mask):
    """uint8 mask [height, width] of 0/1 -> PNG bytes (8-bit grayscale)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(
        buffer, format="PNG", compress_type=PNG_ZLIB_STRATEGY_RLE)
    return buffer.getvalue()


def decode_png(png_bytes):
    """PNG bytes -> uint8 mask [height, width] of 0/1 (any value > 0 counts as the object)."""
    with Image.open(io.BytesIO(png_bytes)) as image:
        return (np.asarray(image.convert("L")) > 0).astype(np.uint8)
