"""The record layout: TF Object Detection / Model Garden feature keys and their value types.

One record per image. Per-object lists are parallel (same length, same order); an image without
annotations has them all present and empty.

| key                                  | type   | content                                          |
|--------------------------------------|--------|--------------------------------------------------|
| image/encoded                        | bytes  | RGB JPEG                                         |
| image/format                         | bytes  | b"jpeg"                                          |
| image/source_id                      | bytes  | COCO image id as decimal text                    |
| image/filename                       | bytes  | file_name from the JSON                          |
| image/key/sha256                     | bytes  | hex sha256 of image/encoded                      |
| image/height, image/width            | int64  | pixels                                           |
| image/object/bbox/{ymin,xmin,ymax,xmax} | float | box clipped to the image, in [0, 1]   |
| image/object/class/label             | int64  | contiguous label 1..K (manifest's label_map)     |
| image/object/class/text              | bytes  | category name                                    |
| image/object/is_crowd                | int64  | 0 or 1                                           |
| image/object/area                    | float  | COCO area (pixels), or mask area if missing      |
| image/object/mask                    | bytes  | PNG, 8-bit, 0/1, full image resolution           |
| image/object/annotation_id           | int64  | COCO annotation id (ours; others ignore it)      |
This module holds plain Python only (no TensorFlow), so worker processes can import it cheaply.
"""

ENCODED = "image/encoded"
FORMAT = "image/format"
SOURCE_ID = "image/source_id"
FILENAME = "image/filename"
SHA256 = "image/key/sha256"
HEIGHT = "image/height"
WIDTH = "image/width"
YMIN = "image/object/bbox/ymin"
XMIN = "image/object/bbox/xmin"
YMAX = "image/object/bbox/ymax"
XMAX = "image/object/bbox/xmax"
LABEL = "image/object/class/label"
TEXT = "image/object/class/text"
IS_CROWD = "image/object/is_crowd"
AREA = "image/object/area"
MASK = "image/object/mask"
ANNOTATION_ID = "image/object/annotation_id"

BYTES, INT64, FLOAT = "bytes", "int64", "float"
KIND_OF_KEY = {
    ENCODED: BYTES, FORMAT: BYTES, SOURCE_ID: BYTES, FILENAME: BYTES, SHA256: BYTES,
    HEIGHT: INT64, WIDTH: INT64,
    YMIN: FLOAT, XMIN: FLOAT, YMAX: FLOAT, XMAX: FLOAT,
    LABEL: INT64, TEXT: BYTES, IS_CROWD: INT64, AREA: FLOAT, MASK: BYTES, ANNOTATION_ID: INT64,
}
OBJECT_KEYS = (YMIN, XMIN, YMAX, XMAX, LABEL, TEXT, IS_CROWD, AREA, MASK, ANNOTATION_ID)
