"""The per-image work of the converter: image bytes, cleaned annotations, masks -> features.

Runs in worker processes, so it imports no TensorFlow and returns plain Python values; the parent
turns them into `tf.train.Example`s. Pure: the same task always gives the same result, which is
what makes the shards byte-identical whatever the worker count.
"""

import dataclasses
import hashlib
import os

from tfrecord_tools import annotation_rules
from tfrecord_tools import features as F
from tfrecord_tools import image_codec, masks
from tfrecord_tools import tally as tally_lib


@dataclasses.dataclass
class ImageTask:
    """Everything needed to convert one image."""
    image: dict  # COCO image entry: id, file_name, height, width
    annotations: list  # its COCO annotation dicts, JSON-level rules already applied
    image_dir: str
    label_of_coco_id: dict  # COCO category id -> contiguous label
    name_of_coco_id: dict  # COCO category id -> category name


@dataclasses.dataclass
class ImageResult:
    """The outcome for one image: features to write, or the reason it was skipped."""
    image_id: int
    features: dict = None  # feature key -> list of values; None when skipped
    skip_reason: str = None
    skip_message: str = None
    num_annotations_in: int = 0
    tally: tally_lib.Tally = dataclasses.field(default_factory=tally_lib.Tally)

    @property
    def num_objects(self):
        return len(self.features[F.LABEL]) if self.features else 0

    @property
    def num_crowd(self):
        return sum(self.features[F.IS_CROWD]) if self.features else 0


def process_image(task):
    """Converts one image (see the rules in `image_codec` and `annotation_rules`).

    Returns:
      An ImageResult. Image-level problems are returned as a skip, never raised.
    """
    image = task.image
    height, width = image["height"], image["width"]
    result = ImageResult(image_id=image["id"], num_annotations_in=len(task.annotations))
    try:
        jpeg, conversion = image_codec.read_rgb_jpeg(
            os.path.join(task.image_dir, image["file_name"]), height, width)
    except image_codec.ImageSkip as skip:
        result.skip_reason, result.skip_message = skip.reason, str(skip)
        result.tally.add(skip.reason, image["id"])
        if task.annotations:
            result.tally.add(tally_lib.ANNOTATIONS_OF_SKIPPED_IMAGE, task.annotations[0]["id"],
                             count=len(task.annotations))
        return result
    if conversion:
        result.tally.add(conversion, image["id"])

    features = {key: [] for key in F.OBJECT_KEYS}
    features.update({
        F.ENCODED: [jpeg],
        F.FORMAT: [b"jpeg"],
        F.SOURCE_ID: [str(image["id"]).encode()],
        F.FILENAME: [image["file_name"].encode()],
        F.SHA256: [hashlib.sha256(jpeg).hexdigest().encode()],
        F.HEIGHT: [height],
        F.WIDTH: [width],
    })
    for annotation in task.annotations:
        _add_object(features, annotation, task, height, width, result.tally)
    result.features = features
    return result


def _add_object(features, annotation, task, height, width, tally):
    """Appends one annotation to the per-object feature lists, or counts why it was skipped."""
    # Conversions of an annotation count only if it is finally kept.
    scratch = tally_lib.Tally()
    clean = annotation_rules.clean_annotation(annotation, height, width, scratch)
    if clean is None:
        tally.merge(scratch)
        return
    rle = masks.segmentation_to_rle(clean.segmentation, height, width)
    mask_area = masks.rle_area(rle)
    if mask_area == 0:
        tally.add(tally_lib.ANNOTATION_MASK_EMPTY, clean.annotation_id)
        return
    if clean.area is None:
        scratch.add(tally_lib.CONVERTED_AREA_COMPUTED, clean.annotation_id)
    tally.merge(scratch)

    xmin, ymin, xmax, ymax = clean.box_xyxy
    features[F.YMIN].append(ymin / height)
    features[F.XMIN].append(xmin / width)
    features[F.YMAX].append(ymax / height)
    features[F.XMAX].append(xmax / width)
    features[F.LABEL].append(task.label_of_coco_id[clean.category_id])
    features[F.TEXT].append(task.name_of_coco_id[clean.category_id].encode())
    features[F.IS_CROWD].append(clean.is_crowd)
    features[F.AREA].append(clean.area if clean.area is not None else float(mask_area))
    features[F.MASK].append(masks.encode_png(masks.decode_rle(rle)))
    features[F.ANNOTATION_ID].append(clean.annotation_id)
