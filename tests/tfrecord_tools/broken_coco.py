"""A purpose-built COCO dataset with one instance of every bad-input case the converter handles.

`write_broken_coco(root)` writes images and `annotations.json` under `root` and returns the
manifest counts the converter must report, so a test can compare them one by one.
"""

import io
import json
import os

import numpy as np
from PIL import Image

from tfrecord_tools import tally as T

HEIGHT, WIDTH = 48, 64
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]


def _pixels(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def _square(x, y, size):
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def _ann(ann_id, image_id, category_id=3, bbox=(10, 10, 20, 20), segmentation=None, **extra):
    annotation = {
        "id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
        "bbox": list(bbox), "area": 400.0,
        "segmentation": _square(10, 10, 20) if segmentation is None else segmentation,
    }
    annotation.update(extra)
    return annotation


def _uncompressed_rle(mask):
    """Binary mask [h, w] -> COCO's uncompressed (crowd) RLE with column-major counts."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_broken_coco(root):
    """Writes the dataset; returns (image_dir, annotations_file, expected) with expected counts."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    rgb = Image.fromarray(_pixels(0))
    files = {
        "good.jpg": lambda p: rgb.save(p, format="JPEG", quality=90),
        "gray.jpg": lambda p: rgb.convert("L").save(p, format="JPEG"),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, format="JPEG"),
        "palette.png": lambda p: rgb.convert("P").save(p, format="PNG"),
        "rgb.png": lambda p: rgb.save(p, format="PNG"),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p, format="PNG"),
        "empty_ok.jpg": lambda p: rgb.save(p, format="JPEG"),
        "wrong_size.jpg": lambda p: rgb.resize((WIDTH + 8, HEIGHT)).save(p, format="JPEG"),
    }
    for name, write in files.items():
        write(os.path.join(image_dir, name))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    with open(os.path.join(image_dir, "truncated.jpg"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with open(os.path.join(image_dir, "not_an_image.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")

    def image(image_id, file_name, **extra):
        return {"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH, **extra}

    images = [
        image(1, "good.jpg"), image(2, "gray.jpg"), image(3, "cmyk.jpg"),
        image(4, "palette.png"), image(5, "rgb.png"), image(6, "rgba.png"),
        image(7, "missing.jpg"), image(8, "truncated.jpg"), image(9, "not_an_image.jpg"),
        image(10, "wrong_size.jpg"), image(1, "gray.jpg"),  # duplicate id 1
        {"id": 12, "height": HEIGHT, "width": WIDTH},  # no file_name
        image(13, "empty_ok.jpg"),
    ]
    crowd_mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    crowd_mask[5:15, 30:50] = 1
    annotations = [
        _ann(101, 1),  # good
        _ann(102, 1, bbox=(-5, 10, 20, 20)),  # leaves the image: clipped, kept
        _ann(103, 1, bbox=(10, 10, 0, 20)),  # zero width: degenerate
        _ann(104, 1, bbox=(1, 2, 3)),  # malformed bbox
        _ann(105, 1, segmentation=_square(10, 10, 20) + [[1, 1, 2, 2]]),  # 2-point part dropped
        _ann(106, 1, segmentation=[[1, 1, 5, 5]]),  # only a 2-point polygon: invalid
        _ann(107, 1, segmentation=[]),  # empty segmentation: invalid
        _ann(108, 1, category_id=999),  # unknown category
        _ann(101, 1),  # duplicate annotation id
        _ann(110, 1, category_id=7, bbox=(30, 5, 20, 10), iscrowd=1,
             segmentation=_uncompressed_rle(crowd_mask)),  # crowd RLE: kept
        _ann(111, 1, segmentation={"counts": [HEIGHT * WIDTH], "size": [HEIGHT + 1, WIDTH]}),
        _ann(112, 1, segmentation=[[10, 10, 20, 10, 30, 10]]),  # collinear: empty mask
        {k: v for k, v in _ann(113, 1).items() if k != "area"},  # area missing: computed
        _ann(114, 999),  # unknown image id
        {"id": "x", "image_id": 1, "category_id": 3},  # malformed annotation
        _ann(201, 2), _ann(301, 3), _ann(401, 4), _ann(501, 5), _ann(601, 6),
        _ann(701, 7), _ann(702, 7),  # their image is missing
        _ann(801, 8),  # its image is truncated
        _ann(1001, 10),  # its image has the wrong size
    ]
    annotations_file = os.path.join(root, "annotations.json")
    with open(annotations_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)

    expected = {
        "images_in_json": 13,
        "annotations_in_json": len(annotations),
        "images_written": 7,  # ids 1-6 and 13
        "images_without_annotations_written": 1,
        # image 1 keeps 101, 102, 105, 110, 113; images 2-6 keep one each
        "annotations_written": 10,
        "crowd_annotations_written": 1,
        "skipped_images": {
            T.IMAGE_MISSING: [7], T.IMAGE_CORRUPT: [8, 9], T.IMAGE_SIZE_MISMATCH: [10],
            T.IMAGE_DUPLICATE_ID: [1], T.IMAGE_MALFORMED: [12],
        },
        "skipped_annotations": {
            T.ANNOTATION_BOX_DEGENERATE: [103], T.ANNOTATION_BBOX_MALFORMED: [104],
            T.ANNOTATION_SEGMENTATION_INVALID: [106, 107, 111],
            T.ANNOTATION_UNKNOWN_CATEGORY: [108],
            T.ANNOTATION_DUPLICATE_ID: [101], T.ANNOTATION_MASK_EMPTY: [112],
            T.ANNOTATION_UNKNOWN_IMAGE: [114], T.ANNOTATION_MALFORMED: ["x"],
            T.ANNOTATIONS_OF_SKIPPED_IMAGE: [701, 801, 1001],
        },
        "skip_counts": {T.ANNOTATIONS_OF_SKIPPED_IMAGE: 4},
        "conversions": {
            T.CONVERTED_BOX_CLIPPED: [102], T.CONVERTED_POLYGON_DROPPED: [105],
            T.CONVERTED_AREA_COMPUTED: [113], T.CONVERTED_GRAYSCALE: [2], T.CONVERTED_CMYK: [3],
            T.CONVERTED_PALETTE: [4], T.CONVERTED_NOT_JPEG: [5], T.CONVERTED_OTHER_MODE: [6],
        },
    }
    return image_dir, annotations_file, expected
