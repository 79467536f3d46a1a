"""Loading a COCO instances JSON into what the converter needs, with its JSON-level rules.

A file that cannot be read as COCO at all (missing, malformed JSON, no `images` or `categories`
list, ambiguous categories) raises `ConversionError` with one message naming the file and what is
wrong. Individual bad entries are skipped and counted in a `Tally` instead:
  - image entries without a valid id, file_name, width or height; later duplicates of an image id;
  - annotations that are not objects with integer ids, that repeat an earlier annotation id, that
    name an unknown image id or an unknown category id.
Per-annotation geometry (boxes, polygons, RLE) is checked later, per image, by `annotation_rules`.

Labels: the categories listed in the JSON, sorted by COCO id, become contiguous labels 1..K
(0 is left for the background). For COCO 2017 this gives the usual 80-class mapping.
"""

import dataclasses
import hashlib
import json
import os

from tfrecord_tools import tally as tally_lib


class ConversionError(Exception):
    """A problem with the input as a whole: reported once, then the tool exits non-zero."""


@dataclasses.dataclass(frozen=True)
class LabelEntry:
    """One row of the label map: contiguous model label <-> COCO category."""
    label: int
    coco_id: int
    name: str


@dataclasses.dataclass
class CocoIndex:
    """The usable content of a COCO JSON, in the file's image order."""
    images: list  # image dicts (id, file_name, height, width, ...), duplicates removed
    annotations_by_image: dict  # image id -> list of annotation dicts, in file order
    label_map: list  # LabelEntry, sorted by label
    num_images_in_json: int
    num_annotations_in_json: int
    tally: tally_lib.Tally  # JSON-level skips

    @property
    def label_of_coco_id(self):
        return {entry.coco_id: entry.label for entry in self.label_map}


def file_sha256(path, chunk_bytes=1 << 20):
    """Hex sha256 of a file, read in chunks so memory stays small."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_coco_json(path):
    """Parses the JSON file; raises ConversionError naming the file on any failure."""
    if not os.path.isfile(path):
        raise ConversionError(f"annotations file not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot be read as JSON text: {e}") from e


def build_label_map(categories, path):
    """Sorted-by-id categories -> LabelEntry list with labels 1..K."""
    seen = {}
    for position, category in enumerate(categories):
        if not (isinstance(category, dict) and _is_int(category.get("id"))
                and isinstance(category.get("name"), str)):
            raise ConversionError(
                f"{path}: categories[{position}] should be an object with an integer 'id' and a "
                f"string 'name', found {category!r:.200}")
        if category["id"] in seen:
            raise ConversionError(
                f"{path}: category id {category['id']} is listed twice "
                f"({seen[category['id']]!r} and {category['name']!r}); the label map is ambiguous")
        seen[category["id"]] = category["name"]
    if not seen:
        raise ConversionError(f"{path}: 'categories' is empty; at least one class is needed")
    return [
        LabelEntry(label=label, coco_id=coco_id, name=seen[coco_id])
        for label, coco_id in enumerate(sorted(seen), start=1)
    ]


def load_coco_index(path):
    """Reads a COCO instances JSON and applies the JSON-level rules (module docstring)."""
    data = read_coco_json(path)
    if not isinstance(data, dict):
        raise ConversionError(
            f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', "
            f"found a {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            found = "nothing" if key not in data else f"a {type(data[key]).__name__}"
            raise ConversionError(f"{path}: expected a list under '{key}', found {found}")
    raw_annotations = data.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise ConversionError(
            f"{path}: expected a list under 'annotations', found a "
            f"{type(raw_annotations).__name__}")

    label_map = build_label_map(data["categories"], path)
    known_categories = {entry.coco_id for entry in label_map}
    tally = tally_lib.Tally()

    images, annotations_by_image = [], {}
    for image in data["images"]:
        if not _valid_image_entry(image):
            image_id = image.get("id") if isinstance(image, dict) else None
            tally.add(tally_lib.IMAGE_MALFORMED, image_id)
        elif image["id"] in annotations_by_image:
            tally.add(tally_lib.IMAGE_DUPLICATE_ID, image["id"])
        else:
            images.append(image)
            annotations_by_image[image["id"]] = []

    seen_annotation_ids = set()
    for annotation in raw_annotations:
        reason = _annotation_json_rule(annotation, seen_annotation_ids, annotations_by_image,
                                       known_categories)
        if reason:
            tally.add(reason, annotation.get("id") if isinstance(annotation, dict) else None)
            continue
        seen_annotation_ids.add(annotation["id"])
        annotations_by_image[annotation["image_id"]].append(annotation)

    return CocoIndex(images=images, annotations_by_image=annotations_by_image,
                     label_map=label_map, num_images_in_json=len(data["images"]),
                     num_annotations_in_json=len(raw_annotations), tally=tally)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_image_entry(image):
    return (isinstance(image, dict) and _is_int(image.get("id"))
            and isinstance(image.get("file_name"), str) and image["file_name"]
            and _is_int(image.get("height")) and image["height"] > 0
            and _is_int(image.get("width")) and image["width"] > 0)


def _annotation_json_rule(annotation, seen_ids, annotations_by_image, known_categories):
    """The skip reason of an annotation at the JSON level, or None to keep it."""
    if not (isinstance(annotation, dict) and _is_int(annotation.get("id"))
            and _is_int(annotation.get("image_id")) and _is_int(annotation.get("category_id"))):
        return tally_lib.ANNOTATION_MALFORMED
    if annotation["id"] in seen_ids:
        return tally_lib.ANNOTATION_DUPLICATE_ID
    if annotation["image_id"] not in annotations_by_image:
        return tally_lib.ANNOTATION_UNKNOWN_IMAGE
    if annotation["category_id"] not in known_categories:
        return tally_lib.ANNOTATION_UNKNOWN_CATEGORY
    return None
