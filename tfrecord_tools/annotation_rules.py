"""Per-annotation geometry rules, shared by the converter and the verifier.

Rules, in the order applied (each skip or change is counted in a `Tally` under the reason named):
  1. `bbox` must be 4 finite numbers [x, y, w, h]; else skip (`annotation_bbox_malformed`).
  2. The box [x, y, x + w, y + h] is clipped to the image [0, width] x [0, height]; a change of
     more than CLIP_TOLERANCE pixels is counted (`annotation_box_clipped`).
  3. A clipped box with zero width or height is skipped (`annotation_box_degenerate`).
  4. Polygon parts that are not lists of >= 3 finite (x, y) points are dropped and counted
     (`annotation_polygon_part_dropped`); an RLE must have `size` == [height, width] and, if
     uncompressed, counts summing to height * width. No usable polygon part left, or a bad RLE:
     skip (`annotation_segmentation_invalid`).
  5. (In `image_worker`, after rasterising) an all-zero mask is skipped (`annotation_mask_empty`).
  6. An `area` that is missing or not a finite number >= 0 is recomputed from the mask and
     counted (`annotation_area_from_mask`).
Dropping short polygon parts matters beyond tidiness: pycocotools' `frPyObjects` decides how to
read a polygon list from the length of its first part, and rasterises a 2-point part (4 numbers)
as a *box*, silently.
"""

import dataclasses
import math

from tfrecord_tools import tally as tally_lib

# Boxes that leave the image by less than this (pixels) are clipped without being counted:
# COCO's float boxes routinely overshoot the border by rounding noise.
CLIP_TOLERANCE = 1e-3
MIN_POLYGON_POINTS = 3


@dataclasses.dataclass
class CleanAnnotation:
    """An annotation that passed the rules, in the frames the record stores."""
    annotation_id: int
    category_id: int  # COCO id
    is_crowd: int  # 0 or 1
    box_xyxy: tuple  # (xmin, ymin, xmax, ymax), absolute pixels, clipped to the image
    segmentation: object  # cleaned polygon list, or the RLE dict as given
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


def valid_rle(rle, height, width):
    """Whether an RLE dict has the image's size and (if uncompressed) counts covering it."""
    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
        return False
    if isinstance(counts, list):
        return (all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                and sum(counts) == height * width)
    return isinstance(counts, (str, bytes)) and len(counts) > 0


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
    else:
        usable = isinstance(segmentation, dict) and valid_rle(segmentation, height, width)
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
