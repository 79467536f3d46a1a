"""Per-annotation geometry rules, shared by the converter and the verifier.

Rules, in the order applied (each skip or change is counted in a `Tally` under the reason named):
  1. `bbox` must be 4 finite numbers [x, y, w, h]; else skip (`annotation_bbox_malformed`).
  2. The box [x, y, x + w, y + h] is clipped to the image [0, width] x [0, height]; a change of
     more than CLIP_TOLERANCE pixels is counted (`annotation_box_clipped`).
  3. A clipped box with zero width or height is skipped (`annotation_box_degenerate`).
  4. Polygon parts that are not lists of >= 3 finite (x, y) points are dropped and counted
     (`annotation_polygon_part_dropped`); an RLE (compressed string or uncompressed list of
     counts) must have `size` == [height, width] and decode to non-negative run lengths covering
     exactly height * width pixels. No usable polygon part left, or a bad RLE: skip
     (`annotation_segmentation_invalid`).
  5. (In `image_worker`, after rasterising) an all-zero mask is skipped (`annotation_mask_empty`).
  6. An `area` that is missing or not a finite number >= 0 is recomputed from the mask and
     counted (`annotation_area_from_mask`).
Dropping short polygon parts matters beyond tidiness: pycocotools' `frPyObjects` decides how to
read a polygon list from the length of its first part, and rasterises a 2-point part (4 numbers)
as a *box*, silently. Checking RLE here matters as much: pycocotools decodes a compressed string
into a buffer of `size` without checking that the runs fill it, so a short RLE gives a mask of
uninitialised memory (different bytes each run), and a malformed string raises a bare ValueError.
The rules therefore decode every RLE once, with their own decoder, and hand on only run lengths
they have checked.
"""

import dataclasses
import math

from tfrecord_tools import tally as tally_lib

# Boxes that leave the image by less than this (pixels) are clipped without being counted:
# COCO's float boxes routinely overshoot the border by rounding noise.
CLIP_TOLERANCE = 1e-3
MIN_POLYGON_POINTS = 3

# COCO's compressed RLE string (pycocotools' `rleToString`): each run length is written as 5-bit
# groups, least significant first, one character per group (chr(ord("0") + bits)); bit 0x20 of a
# character says another group follows, bit 0x10 of the last group is the sign. From the fourth
# run on, the number written is the difference to the run two places before.
RLE_FIRST_CHAR = ord("0")
RLE_ALPHABET_SIZE = 64  # characters "0" .. "o"
RLE_GROUP_BITS = 5
RLE_GROUP_MASK = 0x1F
RLE_MORE_BIT = 0x20
RLE_SIGN_BIT = 0x10
RLE_FIRST_DELTA_RUN = 3


class RleError(ValueError):
    """An RLE that does not describe exactly the image's pixels; the message says why."""


@dataclasses.dataclass
class CleanAnnotation:
    """An annotation that passed the rules, in the frames the record stores."""
    annotation_id: int
    category_id: int  # COCO id
    is_crowd: int  # 0 or 1
    box_xyxy: tuple  # (xmin, ymin, xmax, ymax), absolute pixels, clipped to the image
    segmentation: object  # cleaned polygon list, or the checked RLE (uncompressed, see checked_rle)
    area: object  # the JSON's area if valid, else None (computed from the mask later)


def _finite_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def clip_box(bbox_xywh, height, width):
    """COCO [x, y, w, h] -> clipped (xmin, ymin, xmax, ymax) and whether clipping mattered."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    box = (x, y, x + w, y + h)
    clipped = (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
               min(max(box[2], 0.0), width), min(max(box[3], 0.0), height))
    changed = max(abs(a - b) for a, b in zip(box, clipped)) > CLIP_TOLERANCE
    return clipped, changed


def clean_polygons(polygons):
    """Keeps the polygon parts with >= 3 finite points; returns (kept parts, number dropped)."""
    kept = []
    for part in polygons:
        if (isinstance(part, list) and len(part) >= 2 * MIN_POLYGON_POINTS and len(part) % 2 == 0
                and all(_finite_number(v) for v in part)):
            kept.append(part)
    return kept, len(polygons) - len(kept)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def rle_counts_from_string(counts):
    """COCO compressed RLE string -> its run lengths (list of int; not yet checked for sign).

    Raises:
      RleError: a character outside the alphabet, or the string ends inside a number.
    """
    runs = []
    value = shift = 0
    for position, char in enumerate(counts):
        code = ord(char) - RLE_FIRST_CHAR
        if not 0 <= code < RLE_ALPHABET_SIZE:
            raise RleError(f"compressed counts: character {char!r} at position {position} is "
                           f"not one of '0'..'o'")
        value |= (code & RLE_GROUP_MASK) << shift
        shift += RLE_GROUP_BITS
        if code & RLE_MORE_BIT:
            continue
        if code & RLE_SIGN_BIT:
            value -= 1 << shift  # two's complement of a `shift`-bit number
        if len(runs) >= RLE_FIRST_DELTA_RUN:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise RleError(f"compressed counts end inside a number (truncated after {len(counts)} "
                       f"characters)")
    return runs


def checked_rle(rle, height, width):
    """An RLE dict of an image of `height` x `width` -> {"size": [height, width], "counts": runs}.

    `counts` may be a compressed string (str or ASCII bytes) or a list of run lengths; the result
    always holds the list, checked: integers >= 0 summing to height * width.

    Raises:
      RleError: saying what is wrong.
    """
    size = rle.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))
            and list(size) == [height, width]):
        raise RleError(f"size {size!r:.40} is not the image's [height, width] = "
                       f"[{height}, {width}]")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as e:
            raise RleError(f"compressed counts are not ASCII: {e}") from e
    if isinstance(counts, str):
        runs = rle_counts_from_string(counts)
    elif isinstance(counts, list) and all(map(_is_int, counts)):
        runs = list(counts)
    else:
        raise RleError(f"counts should be a compressed string or a list of integers, found "
                       f"{counts!r:.40}")
    negative = [run for run in runs if run < 0]
    if negative:
        raise RleError(f"counts hold a negative run length ({negative[0]})")
    if sum(runs) != height * width:
        raise RleError(f"run lengths cover {sum(runs)} pixels, the image has {height * width}")
    return {"size": [height, width], "counts": runs}


def valid_rle(rle, height, width):
    """Whether an RLE dict passes `checked_rle`."""
    try:
        checked_rle(rle, height, width)
    except RleError:
        return False
    return True


def clean_annotation(annotation, height, width, tally):
    """Applies rules 1-4 to one annotation of an image of `height` x `width` pixels.

    Args:
      annotation: a COCO annotation dict (id, image_id, category_id already checked).
      height, width: the image size in pixels.
      tally: a Tally that receives the skip or conversion events.

    Returns:
      A CleanAnnotation, or None if the annotation is skipped.
    """
    annotation_id = annotation["id"]
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(_finite_number(v) for v in bbox)):
        tally.add(tally_lib.ANNOTATION_BBOX_MALFORMED, annotation_id)
        return None
    box, changed = clip_box(bbox, height, width)
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        tally.add(tally_lib.ANNOTATION_BOX_DEGENERATE, annotation_id)
        return None

    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        segmentation, dropped = clean_polygons(segmentation)
        if segmentation and dropped:
            tally.add(tally_lib.CONVERTED_POLYGON_DROPPED, annotation_id, count=dropped)
        usable = bool(segmentation)
    elif isinstance(segmentation, dict):
        try:
            segmentation = checked_rle(segmentation, height, width)
            usable = True
        except RleError:
            usable = False
    else:
        usable = False
    if not usable:
        tally.add(tally_lib.ANNOTATION_SEGMENTATION_INVALID, annotation_id)
        return None
    if changed:
        tally.add(tally_lib.CONVERTED_BOX_CLIPPED, annotation_id)

    area = annotation.get("area")
    return CleanAnnotation(
        annotation_id=annotation_id,
        category_id=annotation["category_id"],
        is_crowd=1 if annotation.get("iscrowd") else 0,
        box_xyxy=box,
        segmentation=segmentation,
        area=float(area) if _finite_number(area) and area >= 0 else None,
    )
