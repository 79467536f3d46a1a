"""Writes a small synthetic COCO-layout dataset of simple shapes (the project's default data).

    python -m tfrecord_tools.make_synthetic_coco --output_dir D --split NAME --num_images N \
        [--image_size S] [--seed K] [--num_classes C]

writes the images `D/NAME/<012d image id>.jpg` and `D/annotations/instances_NAME.json` (standard
COCO instances JSON). Generating 256 images of 256 pixels takes about 2 s on one CPU core.

Classes (non-contiguous ids on purpose, so that code mapping COCO ids to contiguous labels is
exercised as with real COCO; a class is recognisable by shape alone, colours are random):
    3 = rectangle (axis-aligned), 7 = ellipse (rotated), 11 = triangle (rotated), and with
    --num_classes 4 or 5 also 14 = cross (a plus sign, rotated), 20 = star (five points, rotated).

Each image: a plain background (dark or light, with mild Gaussian noise) and 1-4 objects whose
longer box side is 10%-45% of the shorter image side (an object is left out when no free room is
found for it in MAX_PLACEMENT_TRIES tries, which is rare), each filled with one colour whose
luminance differs from the background's by at least 90, so the classes stay separable after
conversion to grayscale.
Image ids run from 1 to N; annotation ids from 1 in image order.

Special cases (counts are round(fraction * N), at least 1 each whenever N >= 10):
    - ~5% of images are background only (no annotation);
    - ~10% are grayscale, saved as single-channel ('L') JPEGs;
    - ~10% hold one crowd region (`iscrowd: 1`): a cluster of 5-10 small blobs of one class, whose
      union is annotated as uncompressed RLE `{"counts": [...], "size": [h, w]}` as in COCO;
    - ~5% of images have their first object (30%-45% of the shorter side) cut into two disjoint
      parts by a straight gap of max(3 px, 8% of its size), annotated as one object with 2
      polygons; besides, any other object is cut so with probability 5%. Only objects of at least
      MIN_SPLIT_EXTENT_PX = 24 px are cut, so the guarantee needs --image_size >= 128;
    - aspect ratios: landscape (width S, height 3S/4 or 5S/8), portrait (the transpose) and
      square (S x S), where S = --image_size is the longer side; a seeded shuffle of the cycle
      landscape, portrait, square, so all three appear whenever N >= 3.

Occlusion policy: none. Objects (and crowd regions) are placed so that their masks are disjoint
and at least MIN_GAP_PX pixels apart; only their boxes may overlap. Every annotation therefore
describes exactly the visible pixels, and the whole shape lies inside the image.

Pixels agree with annotations exactly: each object is drawn by filling the mask that pycocotools
rasterises from the object's (rounded) annotation polygons, so `area` (pycocotools `mask.area` of
the merged RLE) is the number of pixels painted before JPEG compression. `bbox` is [x, y, w, h],
the tight extent of the polygon coordinates (like COCO); for crowd regions it is the extent of the
RLE mask (`mask.toBbox`).

Determinism: the same arguments give byte-identical JPEGs (quality 95, 4:4:4 chroma, see
JPEG_SUBSAMPLING) and JSON (fixed key order). Each image draws from its own generator seeded by
(seed, crc32(split), image id), so two splits generated with the same seed still differ.
"""

import argparse
import json
import os
import sys
import zlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from tfrecord_tools.progress import Progress

# Every class the generator can draw; a dataset uses the first --num_classes of them.
ALL_CATEGORIES = (
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 7, "name": "ellipse", "supercategory": "shape"},
    {"id": 11, "name": "triangle", "supercategory": "shape"},
    {"id": 14, "name": "cross", "supercategory": "shape"},
    {"id": 20, "name": "star", "supercategory": "shape"},
)
DEFAULT_NUM_CLASSES = 3
CATEGORIES = ALL_CATEGORIES[:DEFAULT_NUM_CLASSES]
RECTANGLE_ID, ELLIPSE_ID, TRIANGLE_ID, CROSS_ID, STAR_ID = 3, 7, 11, 14, 20
# The cross's arm width and the star's inner radius, as fractions of the outer extent.
CROSS_ARM_RANGE = (0.3, 0.45)
STAR_INNER_RANGE = (0.4, 0.5)

EMPTY_FRACTION = 0.05
GRAYSCALE_FRACTION = 0.10
CROWD_FRACTION = 0.10
FORCED_SPLIT_FRACTION = 0.05
# Fraction of the remaining, large-enough objects that are also cut in two.
SPLIT_PROBABILITY = 0.05
MIN_IMAGE_SIZE = 32
JPEG_QUALITY = 95
# Pillow's `subsampling=0` is 4:4:4 chroma: with the default 4:2:0 the colour of an object bleeds
# up to a pixel past its mask edge (drawn-vs-mask IoU down to ~0.76 for small objects at 128 px);
# with 4:4:4 the thresholded pixels equal the masks, for ~35% larger files.
JPEG_SUBSAMPLING = 0
# Pixels kept free around every object: JPEG ringing of one object must not reach the next.
MIN_GAP_PX = 3
# An object is cut only if its extent is at least this many pixels, so both parts stay visible.
MIN_SPLIT_EXTENT_PX = 24
ELLIPSE_VERTICES = 40
MAX_PLACEMENT_TRIES = 30
# Objects span this fraction of the shorter image side (their bbox's longer side).
OBJECT_EXTENT_RANGE = (0.10, 0.45)
MIN_LUMINANCE_CONTRAST = 90.0
# Landscape is S wide, portrait S high, square S x S; the shorter side is 5/8 or 6/8 of S.
ORIENTATIONS = ("landscape", "portrait", "square")


def image_shape(orientation, image_size, short_side_eighths):
    """Returns (height, width) in pixels; `image_size` is the longer side."""
    short_side = image_size * short_side_eighths // 8
    if orientation == "landscape":
        return short_side, image_size
    if orientation == "portrait":
        return image_size, short_side
    return image_size, image_size


def _special_count(fraction, num_images):
    count = int(round(fraction * num_images))
    return max(1, count) if num_images >= 10 else count


def plan_images(num_images, image_size, seed, split):
    """Decides each image's size and special cases, before any pixel is drawn.

    Returns:
      A list of `num_images` dicts with keys `id` (1-based), `file_name`, `height`, `width`,
      `empty`, `grayscale`, `crowd`, `force_split` (bools) and `seed` (for the image's generator).
    """
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    order = rng.permutation(num_images)
    # Disjoint index ranges of one permutation: an empty image has no crowd and no cut object.
    num_empty = _special_count(EMPTY_FRACTION, num_images)
    num_crowd = _special_count(CROWD_FRACTION, num_images)
    num_split = _special_count(FORCED_SPLIT_FRACTION, num_images)
    empty = set(order[:num_empty].tolist())
    crowd = set(order[num_empty:num_empty + num_crowd].tolist())
    force_split = set(order[num_empty + num_crowd:num_empty + num_crowd + num_split].tolist())
    grayscale = set(rng.permutation(num_images)[:_special_count(GRAYSCALE_FRACTION, num_images)]
                    .tolist())
    # Cycling before shuffling guarantees all three orientations as soon as N >= 3.
    orientations = rng.permutation(np.arange(num_images) % len(ORIENTATIONS))
    short_sides = rng.choice([5, 6], size=num_images)
    plans = []
    for index in range(num_images):
        image_id = index + 1
        height, width = image_shape(
            ORIENTATIONS[orientations[index]], image_size, int(short_sides[index]))
        plans.append({
            "id": image_id,
            "file_name": f"{image_id:012d}.jpg",
            "height": height,
            "width": width,
            "empty": index in empty,
            "grayscale": index in grayscale,
            "crowd": index in crowd,
            "force_split": index in force_split,
            "seed": [seed, zlib.crc32(split.encode("utf-8")), image_id],
        })
    return plans


# ----------------------------------------------------------------------------------------------
# Geometry: polygons are float arrays [num_vertices, 2] of (x, y) image coordinates.


def shape_polygon(rng, category_id, extent):
    """Returns a polygon [num_vertices, 2] of the class's shape centred on (0, 0).

    `extent` is the target length of the polygon's longer bbox side, in pixels.
    """
    if category_id == RECTANGLE_ID:
        aspect = rng.uniform(0.5, 1.0)
        half_w, half_h = extent / 2, extent * aspect / 2
        if rng.random() < 0.5:
            half_w, half_h = half_h, half_w
        return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h],
                         [-half_w, half_h]])
    if category_id == ELLIPSE_ID:
        angles = np.linspace(0.0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
        points = np.stack([np.cos(angles), rng.uniform(0.5, 1.0) * np.sin(angles)], axis=1)
    elif category_id == TRIANGLE_ID:
        # Jittered equilateral: every angle stays well away from 0, so it never looks like a line.
        angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        points = np.stack([np.cos(angles), rng.uniform(0.7, 1.0) * np.sin(angles)], axis=1)
    elif category_id == CROSS_ID:
        # A plus sign: 12 vertices, arms of half-width a around the centre of a unit square.
        a = rng.uniform(*CROSS_ARM_RANGE) / 2
        points = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                           [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]])
    elif category_id == STAR_ID:
        # Five points: outer and inner radii alternate, so the outline is concave.
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(*STAR_INNER_RANGE))
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown category id {category_id}, expected one of "
                         f"{[c['id'] for c in ALL_CATEGORIES]}")
    rotation = rng.uniform(0.0, 2 * np.pi)
    cos, sin = np.cos(rotation), np.sin(rotation)
    points = points @ np.array([[cos, sin], [-sin, cos]])
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points * (extent / (points.max(axis=0) - points.min(axis=0)).max())


def clip_half_plane(polygon, normal, offset):
    """Keeps the part of a convex polygon where dot(normal, p) <= offset (Sutherland-Hodgman).

    Returns a polygon [num_vertices', 2], with no vertex if nothing is kept.
    """
    kept = []
    distances = polygon @ normal - offset
    for i in range(len(polygon)):
        j = (i + 1) % len(polygon)
        if distances[i] <= 0:
            kept.append(polygon[i])
        if (distances[i] < 0 < distances[j]) or (distances[j] < 0 < distances[i]):
            t = distances[i] / (distances[i] - distances[j])
            kept.append(polygon[i] + t * (polygon[j] - polygon[i]))
    return np.array(kept).reshape(-1, 2)


def polygon_area(polygon):
    """Shoelace area of a polygon [num_vertices, 2]."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def split_polygon(rng, polygon, gap):
    """Cuts a convex polygon in two along a random line near its centre, `gap` pixels apart.

    Returns two polygons, each holding at least 20% of the original area.
    """
    centre = polygon.mean(axis=0)
    extent = (polygon.max(axis=0) - polygon.min(axis=0)).max()
    while True:
        angle = rng.uniform(0.0, np.pi)
        normal = np.array([np.cos(angle), np.sin(angle)])
        cut = centre @ normal + rng.uniform(-0.1, 0.1) * extent
        first = clip_half_plane(polygon, normal, cut - gap / 2)
        second = clip_half_plane(polygon, -normal, -(cut + gap / 2))
        # A line near the centroid of a convex shape always leaves two sizeable parts; the loop
        # only guards against thin shapes cut along their length.
        if min(len(first), len(second)) >= 3 and min(
                polygon_area(first), polygon_area(second)) >= 0.2 * polygon_area(polygon):
            return first, second


def polygons_to_segmentation(polygons):
    """Converts polygons to COCO `segmentation`: a list of flat [x1, y1, x2, y2, ...] lists."""
    return [[round(float(v), 2) for v in polygon.reshape(-1)] for polygon in polygons]


def segmentation_bbox(segmentation):
    """Returns the COCO bbox [x, y, w, h] (floats): the tight extent of all polygon coordinates."""
    xs = [x for polygon in segmentation for x in polygon[0::2]]
    ys = [y for polygon in segmentation for y in polygon[1::2]]
    return [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def segmentation_to_rle(segmentation, height, width):
    """Rasterises polygons with pycocotools and returns their merged (compressed) RLE."""
    return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))


def mask_to_uncompressed_rle(mask):
    """Encodes a binary mask [height, width] as COCO uncompressed RLE (the crowd format).

    Counts are run lengths over the mask in column-major order, starting with a run of zeros
    (of length 0 if the first pixel is set). Example: [[0, 1], [1, 1]] -> counts [1, 3].
    """
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _dilate(mask, radius):
    """Binary dilation of a mask [height, width] by a square of side 2 * radius + 1."""
    rows = mask.copy()
    for shift in range(1, radius + 1):
        rows[shift:, :] |= mask[:-shift, :]
        rows[:-shift, :] |= mask[shift:, :]
    out = rows.copy()
    for shift in range(1, radius + 1):
        out[:, shift:] |= rows[:, :-shift]
        out[:, :-shift] |= rows[:, shift:]
    return out


# ----------------------------------------------------------------------------------------------
# Pixels: colours and one image.


def _luminance(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting_colour(rng, background):
    """A random RGB colour whose luminance differs from the background's by enough."""
    for _ in range(100):
        colour = rng.integers(0, 256, size=3)
        if abs(_luminance(colour) - _luminance(background)) >= MIN_LUMINANCE_CONTRAST:
            return colour
    return 255 - background


def _place(rng, polygons_local, height, width):
    """Translates local polygons to a random position fully inside the image, or None."""
    points = np.concatenate(polygons_local)
    low, high = points.min(axis=0), points.max(axis=0)
    # Keep one pixel of margin so that rounding never pushes a vertex outside the image.
    x_range = (1.0 - low[0], width - 1.0 - high[0])
    y_range = (1.0 - low[1], height - 1.0 - high[1])
    if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
        return None
    shift = np.array([rng.uniform(*x_range), rng.uniform(*y_range)])
    return [polygon + shift for polygon in polygons_local]


def _sample_object(rng, category_id, extent, cut):
    polygon = shape_polygon(rng, category_id, extent)
    if not cut:
        return [polygon]
    return list(split_polygon(rng, polygon, gap=max(3.0, 0.08 * extent)))


def _try_place_object(rng, occupied, height, width, category_id, extent_range, cut):
    """Samples and places one polygon object not touching `occupied`; returns its annotation."""
    for _ in range(MAX_PLACEMENT_TRIES):
        extent = rng.uniform(*extent_range)
        polygons = _place(rng, _sample_object(rng, category_id, extent,
                                              cut and extent >= MIN_SPLIT_EXTENT_PX),
                          height, width)
        if polygons is None:
            continue
        segmentation = polygons_to_segmentation(polygons)
        rle = segmentation_to_rle(segmentation, height, width)
        mask = mask_util.decode(rle).astype(bool)
        if not mask.any() or (mask & occupied).any():
            continue
        return {
            "mask": mask,
            "annotation": {
                "category_id": category_id,
                "segmentation": segmentation,
                "area": float(mask_util.area(rle)),
                "bbox": segmentation_bbox(segmentation),
                "iscrowd": 0,
            },
        }
    return None


def _try_place_crowd(rng, occupied, height, width, short_side):
    """Places a cluster of small blobs of one class; returns its crowd (RLE) annotation."""
    category_id = int(rng.choice([c["id"] for c in CATEGORIES]))
    for _ in range(MAX_PLACEMENT_TRIES):
        cluster = rng.uniform(0.25, 0.4) * short_side
        blob_range = (max(3.0, 0.05 * short_side), max(4.0, 0.09 * short_side))
        blobs = []
        for _ in range(int(rng.integers(5, 11))):
            blob = shape_polygon(rng, category_id, rng.uniform(*blob_range))
            blobs.append(blob + rng.uniform(-cluster / 2, cluster / 2, size=2))
        polygons = _place(rng, blobs, height, width)
        if polygons is None:
            continue
        segmentation = polygons_to_segmentation(polygons)
        mask = mask_util.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)
        if not mask.any() or (mask & occupied).any():
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {
            "mask": mask,
            "annotation": {
                "category_id": category_id,
                "segmentation": mask_to_uncompressed_rle(mask),
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 1,
            },
        }
    return None


def make_image_and_annotations(rng, height, width, *, empty=False, grayscale=False,
                               crowd=False, force_split=False, categories=CATEGORIES):
    """Draws one synthetic image and returns it with its annotations.

    Args:
      rng: numpy Generator; the only source of randomness.
      height, width: image size in pixels.
      empty: draw the background only.
      grayscale: return a single-channel ('L') image.
      crowd: add one crowd region (placed first, as it needs the most room).
      force_split: cut the first object into two polygons (if it is large enough).
      categories: the classes objects are drawn from (category dicts of ALL_CATEGORIES).

    Returns:
      A dict with `image` (PIL Image, mode 'RGB' or 'L', size (width, height)) and
      `annotations`: a list of COCO annotation dicts without `id` and `image_id`
      (`category_id`, `segmentation`, `area`, `bbox` [x, y, w, h], `iscrowd`).
    """
    short_side = min(height, width)
    background = rng.integers(20, 91, size=3) if rng.random() < 0.5 else rng.integers(
        165, 236, size=3)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = background
    occupied = np.zeros((height, width), dtype=bool)
    annotations = []
    placed = []
    if not empty:
        if crowd:
            placed.append(_try_place_crowd(rng, occupied, height, width, short_side))
            if placed[-1]:
                occupied |= _dilate(placed[-1]["mask"], MIN_GAP_PX)
        extent_range = tuple(max(6.0, f * short_side) for f in OBJECT_EXTENT_RANGE)
        for index in range(int(rng.integers(1, 5))):
            category_id = int(rng.choice([c["id"] for c in categories]))
            forced = force_split and index == 0
            cut = forced or rng.random() < SPLIT_PROBABILITY
            # A forced cut needs a large object; its parts must stay clearly visible.
            object_range = (max(extent_range[0], 0.3 * short_side), extent_range[1]) \
                if forced else extent_range
            placed.append(_try_place_object(
                rng, occupied, height, width, category_id, object_range, cut))
            if placed[-1]:
                occupied |= _dilate(placed[-1]["mask"], MIN_GAP_PX)
    for item in placed:
        if item is None:
            continue  # No free room left in this image: the object is simply not drawn.
        canvas[item["mask"]] = _contrasting_colour(rng, background)
        annotations.append(item["annotation"])
    canvas += rng.normal(0.0, rng.uniform(0.0, 4.0), size=canvas.shape)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    if grayscale:
        image = image.convert("L")
    return {"image": image, "annotations": annotations}


# ----------------------------------------------------------------------------------------------
# Files.


def generate_split(output_dir, split, num_images, image_size=256, seed=0, progress_stream=None,
                   num_classes=DEFAULT_NUM_CLASSES):
    """Writes `output_dir/split/*.jpg` and `output_dir/annotations/instances_<split>.json`.

    The objects are of the first `num_classes` classes of ALL_CATEGORIES (1..5; the default 3
    gives the same files as before the other two classes existed).

    The JSON is written last, through a temporary file, so a partial run never leaves a JSON
    naming images that do not exist. A progress line goes to `progress_stream` if given.
    Returns the COCO dict that was written.
    """
    progress = progress_stream and Progress(num_images, label="make_synthetic_coco",
                                            stream=progress_stream)
    image_dir = os.path.join(output_dir, split)
    annotation_dir = os.path.join(output_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(annotation_dir, exist_ok=True)
    if not 1 <= num_classes <= len(ALL_CATEGORIES):
        raise ValueError(f"num_classes must be in 1..{len(ALL_CATEGORIES)}, found {num_classes}")
    categories = ALL_CATEGORIES[:num_classes]
    images, annotations = [], []
    plans = plan_images(num_images, image_size, seed, split)
    for count, plan in enumerate(plans, start=1):
        result = make_image_and_annotations(
            np.random.default_rng(plan["seed"]), plan["height"], plan["width"],
            empty=plan["empty"], grayscale=plan["grayscale"], crowd=plan["crowd"],
            force_split=plan["force_split"], categories=categories)
        result["image"].save(os.path.join(image_dir, plan["file_name"]), format="JPEG",
                             quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
        images.append({key: plan[key] for key in ("id", "file_name", "height", "width")})
        for annotation in result["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": plan["id"],
                                **annotation})
        if progress:
            progress.update(count)
    if progress:
        progress.finish()
    coco = {
        "info": {
            "description": "Synthetic shapes (tfrecord_tools.make_synthetic_coco)",
            "version": "1.0",
            "year": 2024,
            "contributor": "official_maskrcnn",
            "split": split,
            "seed": seed,
            "image_size": image_size,
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(category) for category in categories],
    }
    json_path = os.path.join(annotation_dir, f"instances_{split}.json")
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    os.replace(json_path + ".tmp", json_path)
    return coco


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tfrecord_tools.make_synthetic_coco",
        description="Write a synthetic COCO-layout dataset of simple shapes.")
    parser.add_argument("--output_dir", required=True, help="root of the COCO layout")
    parser.add_argument("--split", required=True, help="split name, e.g. train or val")
    parser.add_argument("--num_images", type=int, required=True, help="number of images, >= 1")
    parser.add_argument("--image_size", type=int, default=256,
                        help=f"longer image side in pixels, >= {MIN_IMAGE_SIZE} (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    classes = ", ".join(f"{c['id']} {c['name']}" for c in ALL_CATEGORIES)
    parser.add_argument("--num_classes", type=int, default=DEFAULT_NUM_CLASSES,
                        help=f"how many of the classes {classes} to draw, in that order "
                             f"(default {DEFAULT_NUM_CLASSES})")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image_size must be >= {MIN_IMAGE_SIZE}, got {args.image_size}")
    if not args.split or args.split in (".", "..", "annotations") or any(
            sep in args.split for sep in ("/", os.sep)):
        parser.error(f"--split must be a plain directory name, got {args.split!r}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not 1 <= args.num_classes <= len(ALL_CATEGORIES):
        parser.error(f"--num_classes must be in 1..{len(ALL_CATEGORIES)}, got {args.num_classes}")
    return args


def main(argv=None):
    """Command-line entry point; returns the process exit code."""
    args = _parse_args(argv)
    coco = generate_split(args.output_dir, args.split, args.num_images, args.image_size,
                          args.seed, progress_stream=sys.stderr, num_classes=args.num_classes)
    annotations = coco["annotations"]
    print(f"make_synthetic_coco: {len(coco['images'])} images, {len(annotations)} annotations "
          f"({sum(a['iscrowd'] for a in annotations)} crowd, "
          f"{sum(not a['iscrowd'] and len(a['segmentation']) > 1 for a in annotations)} "
          f"multi-polygon) -> {os.path.join(args.output_dir, args.split)} and "
          f"{os.path.join(args.output_dir, 'annotations', f'instances_{args.split}.json')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
