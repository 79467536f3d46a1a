"""Counting what the converter skipped or changed, by reason.

Every rule of the converter that drops or alters input names a reason from the tables below, so
the manifest and the final report can say exactly what happened to the data and where. Nothing is
skipped without being counted here.
"""

import collections

# How many offending ids to remember per reason (enough to go and look, small enough to print).
MAX_EXAMPLE_IDS = 5

# Image-level skips: the image and all its annotations are left out.
IMAGE_MISSING = "image_missing"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
IMAGE_DUPLICATE_ID = "image_duplicate_id"
IMAGE_MALFORMED = "image_malformed"

# Annotation-level skips: only that annotation is left out.
ANNOTATIONS_OF_SKIPPED_IMAGE = "annotation_of_skipped_image"
ANNOTATION_MALFORMED = "annotation_malformed"
ANNOTATION_UNKNOWN_IMAGE = "annotation_unknown_image_id"
ANNOTATION_UNKNOWN_CATEGORY = "annotation_unknown_category_id"
ANNOTATION_DUPLICATE_ID = "annotation_duplicate_id"
ANNOTATION_BBOX_MALFORMED = "annotation_bbox_malformed"
ANNOTATION_BOX_DEGENERATE = "annotation_box_degenerate"
ANNOTATION_SEGMENTATION_INVALID = "annotation_segmentation_invalid"
ANNOTATION_MASK_EMPTY = "annotation_mask_empty"

# Conversions: the item is kept, changed by a documented rule.
CONVERTED_GRAYSCALE = "image_grayscale_to_rgb"
CONVERTED_CMYK = "image_cmyk_to_rgb"
CONVERTED_PALETTE = "image_palette_to_rgb"
CONVERTED_OTHER_MODE = "image_other_mode_to_rgb"
CONVERTED_NOT_JPEG = "image_reencoded_as_jpeg"
CONVERTED_BOX_CLIPPED = "annotation_box_clipped"
CONVERTED_POLYGON_DROPPED = "annotation_polygon_part_dropped"
CONVERTED_AREA_COMPUTED = "annotation_area_from_mask"

IMAGE_SKIP_REASONS = {
    IMAGE_MISSING: "file named in the JSON does not exist in --image_dir",
    IMAGE_CORRUPT: "file cannot be opened or fully decoded as an image",
    IMAGE_SIZE_MISMATCH: "decoded width/height differ from the JSON's width/height",
    IMAGE_DUPLICATE_ID: "an earlier image entry has the same id (the first one is kept)",
    IMAGE_MALFORMED: "image entry lacks a valid id, file_name, width or height",
}
ANNOTATION_SKIP_REASONS = {
    ANNOTATIONS_OF_SKIPPED_IMAGE: "its image was skipped",
    ANNOTATION_MALFORMED: "not an object with integer id, image_id and category_id",
    ANNOTATION_UNKNOWN_IMAGE: "image_id matches no image entry",
    ANNOTATION_UNKNOWN_CATEGORY: "category_id is not in the JSON's categories",
    ANNOTATION_DUPLICATE_ID: "an earlier annotation has the same id (the first one is kept)",
    ANNOTATION_BBOX_MALFORMED: "bbox is not 4 finite numbers",
    ANNOTATION_BOX_DEGENERATE: "box has no area once clipped to the image",
    ANNOTATION_SEGMENTATION_INVALID: ("no polygon of >= 3 points, or an RLE that is malformed or "
                                      "does not cover exactly the image"),
    ANNOTATION_MASK_EMPTY: "segmentation rasterises to an empty mask",
}
CONVERSION_REASONS = {
    CONVERTED_GRAYSCALE: "grayscale image converted to RGB and re-encoded as JPEG",
    CONVERTED_CMYK: "CMYK image converted to RGB and re-encoded as JPEG",
    CONVERTED_PALETTE: "palette image converted to RGB and re-encoded as JPEG",
    CONVERTED_OTHER_MODE: "image of another mode (e.g. RGBA, 16-bit) converted to RGB JPEG",
    CONVERTED_NOT_JPEG: "RGB image stored in another format (e.g. PNG) re-encoded as JPEG",
    CONVERTED_BOX_CLIPPED: "box left the image and was clipped to it",
    CONVERTED_POLYGON_DROPPED: "a polygon part with < 3 points was dropped from a multi-polygon",
    CONVERTED_AREA_COMPUTED: "area missing or not a finite number >= 0; computed from the mask",
}
ALL_REASONS = {**IMAGE_SKIP_REASONS, **ANNOTATION_SKIP_REASONS, **CONVERSION_REASONS}


class Tally:
    """Counts events by reason and remembers the first few ids of each.

    Tallies from worker processes are merged in input order, so the remembered ids are the same
    whatever the worker count.
    """

    def __init__(self):
        self.counts = collections.Counter()
        self.example_ids = collections.defaultdict(list)

    def add(self, reason, item_id, count=1):
        """Records `count` events of `reason`; `item_id` is the offending image or annotation id."""
        if reason not in ALL_REASONS:
            raise KeyError(f"unknown tally reason {reason!r}")
        self.counts[reason] += count
        ids = self.example_ids[reason]
        if len(ids) < MAX_EXAMPLE_IDS:
            ids.append(item_id)

    def merge(self, other):
        """Adds another tally's counts and example ids to this one."""
        for reason, count in other.counts.items():
            self.counts[reason] += count
            ids = self.example_ids[reason]
            room = MAX_EXAMPLE_IDS - len(ids)
            ids.extend(other.example_ids[reason][:room])

    def total(self, reasons):
        """Sum of the counts of the given reasons."""
        return sum(self.counts[reason] for reason in reasons)

    def to_json(self, reasons):
        """{reason: {"count", "first_ids", "rule"}} for the reasons of one table that occurred."""
        return {
            reason: {
                "count": self.counts[reason],
                "first_ids": list(self.example_ids[reason]),
                "rule": description,
            }
            for reason, description in reasons.items() if self.counts[reason]
        }
