"""Tiny synthetic COCO splits converted to TFRecords, quietly: the data of the training tests."""

import io
import os
from unittest import mock

from tfrecord_tools import conversion, make_synthetic_coco


def write_split(root, split, num_images, seed, num_shards, image_size=96,
                num_classes=make_synthetic_coco.DEFAULT_NUM_CLASSES):
    """Generates `root/coco/<split>` + its JSON (shapes of the first `num_classes` classes)
    and converts it to `root/tfrecords/<split>-*`.

    Returns:
      (file pattern of the records, path of the annotation JSON).
    """
    coco = os.path.join(root, "coco")
    with mock.patch("sys.stderr", io.StringIO()):
        make_synthetic_coco.main(["--output_dir", coco, "--split", split, "--num_images",
                                  str(num_images), "--image_size", str(image_size),
                                  "--seed", str(seed), "--num_classes", str(num_classes)])
    annotations = os.path.join(coco, "annotations", f"instances_{split}.json")
    prefix = os.path.join(root, "tfrecords", split)
    conversion.convert(os.path.join(coco, split), annotations, prefix, num_shards, 1,
                       progress_stream=io.StringIO())
    return prefix + "-*", annotations
