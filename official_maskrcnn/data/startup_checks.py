"""Start-up checks that need more than the records: the model's classes, the eval ground truth.

They read only the start-up scan (`records.scan_records`, already taken by every
`DatasetBuilder`) and the annotation JSON, so they cost milliseconds, and they run before the
first step: without them a label beyond the model's classes fails at the first step as a raw
gather error (on a GPU an out-of-range gather may instead give zeros, silently), and eval records
that disagree with the ground truth fail only after a whole epoch of training and inference,
or, for the ground truth of another split with the same ids, are scored without any error.
Each check raises an `InputError` subclass: the entries print it as one `error:` line, exit 1.
"""

import json

import numpy as np

from official_maskrcnn.data import records
from official_maskrcnn.data.records import InputError

# Examples a message lists: enough to recognise the pattern, short enough for one line.
NUM_EXAMPLES = 5
# The likely cause of an id mismatch: records of ids the JSON lacks, or only some of its images.
SPLIT_HINT = "the JSON of another split?"
SUBSET_HINT = ("the eval set is the whole split; to score only the records' images on purpose, "
               "e.g. records converted with --max_images, set run.eval_allow_subset = True")


class LabelError(InputError):
    """A record's class label is not one of the model's foreground classes 1..K-1."""


class GroundTruthMismatchError(InputError):
    """The eval records and the eval annotation JSON describe different images."""


def check_labels(builder, num_classes):
    """Every label of the builder's records is in 1..num_classes-1 (0 is the background).

    Args:
      builder: a `DatasetBuilder` (its `scan` holds each record's min and max label).
      num_classes: K of the model, background included.
    Raises:
      LabelError: naming the first offending record, the label found and the range allowed.
    """
    scan = builder.scan
    bad = np.flatnonzero((scan["max_label"] >= num_classes) | (scan["min_label"] < 1))
    if not bad.size:
        return
    first = bad[0]
    found = (scan["max_label"][first] if scan["max_label"][first] >= num_classes
             else scan["min_label"][first])
    raise LabelError(
        f"{records.record_name(builder.files, scan, first)}: class label {found}, but the model "
        f"has num_classes={num_classes} (labels 1..{num_classes - 1}, 0 is the background); "
        f"{bad.size} record(s) of {builder.file_pattern} have labels outside, largest "
        f"{scan['max_label'].max()}, e.g. source ids "
        f"{scan['source_id'][bad[:NUM_EXAMPLES]].tolist()} (records with raw COCO category "
        f"ids, e.g. from another converter, need tfrecord_tools.create_coco_tfrecord's "
        f"contiguous labels, or num_classes above the largest label)")


def load_image_sizes(annotations_file):
    """{image id: (height, width)} of a COCO annotation JSON's `images`.

    Raises:
      GroundTruthMismatchError: the file is missing, not JSON, or has no usable `images` list.
    """
    try:
        with open(annotations_file) as f:
            images = json.load(f)["images"]
        return {int(image["id"]): (int(image["height"]), int(image["width"]))
                for image in images}
    except FileNotFoundError:
        raise GroundTruthMismatchError(f"{annotations_file}: no such file "
                                       f"(run.eval_annotations_file)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise GroundTruthMismatchError(f"{annotations_file}: not a COCO annotation file with an "
                                       f"'images' list of id, height, width ({e!r})") from e


def check_eval_ground_truth(builder, annotations_file, allow_subset=False):
    """The eval records hold the annotation JSON's images (all of them unless `allow_subset`),
    each once, with the same sizes; returns how many images the evaluation scores.

    Ids both ways: a record the JSON lacks fails the COCO evaluation after an epoch; an image
    of the JSON without a record is scored as missed, or, scored on the records' ids alone,
    silently evaluates less than the split (MLPerf evaluates "the entire validation set").
    Sizes: the ground truth of another split whose ids happen to match (e.g. synthetic data, or
    renumbered images) has other sizes.

    Args:
      builder: the eval `DatasetBuilder` (its `scan` holds source_id, height, width).
      annotations_file: the eval split's COCO annotation JSON (`run.eval_annotations_file`).
      allow_subset: accept records of only some of the JSON's images (`run.eval_allow_subset`,
        e.g. records converted with `--max_images`); the evaluation scores those images alone.
    Returns:
      int, the number of images scored: the records' (distinct, all in the JSON).
    Raises:
      GroundTruthMismatchError: one line naming both, the counts and the first ids.
    """
    sizes = load_image_sizes(annotations_file)
    scan = builder.scan
    where = (f"eval records {builder.file_pattern} ({len(scan['source_id'])} records) and "
             f"{annotations_file} ({len(sizes)} images)")
    ids, counts = np.unique(scan["source_id"], return_counts=True)
    twice = ids[counts > 1]
    if twice.size:
        raise GroundTruthMismatchError(
            f"{where}: {twice.size} source id(s) occur in more than one record, e.g. "
            f"{twice[:NUM_EXAMPLES].tolist()}")
    only_records = sorted(set(ids.tolist()) - set(sizes))
    only_json = sorted(set(sizes) - set(ids.tolist()))
    if only_records or (only_json and not allow_subset):
        raise GroundTruthMismatchError(
            f"{where} disagree: {len(only_records)} record id(s) not in the JSON, e.g. "
            f"{only_records[:NUM_EXAMPLES]}; {len(only_json)} JSON image id(s) without a record, "
            f"e.g. {only_json[:NUM_EXAMPLES]} ({SPLIT_HINT if only_records else SUBSET_HINT})")
    wrong = [(int(i), (int(h), int(w)), sizes[int(i)])
             for i, h, w in zip(scan["source_id"], scan["height"], scan["width"])
             if (h, w) != sizes[int(i)]]
    if wrong:
        examples = ", ".join(f"id {i}: record {r}, JSON {j}" for i, r, j in wrong[:3])
        raise GroundTruthMismatchError(
            f"{where} disagree: {len(wrong)} image(s) have another (height, width), e.g. "
            f"{examples} (the JSON of another split with the same ids?)")
    return int(ids.size)
