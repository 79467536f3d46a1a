"""The label map: the model's labels 1..K-1 <-> the dataset's category ids and names.

Label 0 is the background, so a model of `num_classes` K has K - 1 foreground classes. The
converter (`tfrecord_tools.create_coco_tfrecord`) numbers the categories of the annotation JSON
by sorted id and writes that map into `PREFIX.manifest.json` beside the shards. From there:
  - training reads it from the manifests of its records (`from_records`), sets
    `build_maskrcnn_model.num_classes` from it when the config leaves it unset and otherwise
    checks it (`apply_num_classes`), checks it against the eval records' and the eval ground
    truth's, and saves it as `label_map.json` in the model dir (`write`);
  - evaluate, predict and export read that file beside the checkpoint
    (`runtime.saved_label_map`), so they name classes and map labels to category ids without
    the training data.
Records that carry no manifest (another converter) fall back to the eval annotation JSON's
categories, numbered the same way, and the configured `num_classes`.

Every disagreement (two manifests, a manifest and the ground truth, the model dir's file and
the data, `num_classes` and the map) is a `LabelMapError` naming both sides: a shifted map
scores every detection against another class, silently.
"""

import dataclasses
import json
import os

import gin
import tensorflow as tf

from official_maskrcnn import gin_bindings
from official_maskrcnn.data import records
from tfrecord_tools import coco_index, shard_writer

LABEL_MAP_FILE = "label_map.json"  # [{label, id, name}], in the model dir and in an export
NUM_CLASSES_PARAMETER = "build_maskrcnn_model.num_classes"
# Labels a mismatch message lists.
NUM_EXAMPLES = 5


class LabelMapError(records.InputError):
    """Two label maps, or a label map and `num_classes`, disagree; or a map cannot be read."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """The foreground classes of a dataset, in label order.

    Attributes:
      entries: tuple of `coco_index.LabelEntry` (label, coco_id, name), labels 1..K-1.
      source: the file it was read from (named by every message about it).
    """
    entries: tuple
    source: str

    @property
    def num_classes(self):
        """K of the model: the foreground classes plus the background."""
        return len(self.entries) + 1

    @property
    def class_names(self):
        """{label: name}."""
        return {entry.label: entry.name for entry in self.entries}

    @property
    def label_to_category(self):
        """{label: dataset category id}."""
        return {entry.label: entry.coco_id for entry in self.entries}

    def to_json(self):
        """The `label_map.json` content: [{label, id, name}]."""
        return [{"label": entry.label, "id": entry.coco_id, "name": entry.name}
                for entry in self.entries]


def from_entries(entries, source):
    """A LabelMap of LabelEntry-like rows; LabelMapError unless the labels are exactly 1..K."""
    entries = tuple(sorted(entries, key=lambda entry: entry.label))
    labels = [entry.label for entry in entries]
    if labels != list(range(1, len(entries) + 1)):
        raise LabelMapError(f"{source}: the labels should be 1..{len(entries)} (0 is the "
                            f"background), found {labels[:2 * NUM_EXAMPLES]}")
    return LabelMap(entries, source)


def _entries_from_json(rows, source, id_key):
    """[{label, <id_key>, name}] -> LabelEntry list; LabelMapError naming the bad row."""
    if not isinstance(rows, list) or not rows:
        raise LabelMapError(f"{source}: the label map should be a non-empty list of "
                            f"{{label, {id_key}, name}}, found {rows!r:.200}")
    entries = []
    for position, row in enumerate(rows):
        try:
            entries.append(coco_index.LabelEntry(label=int(row["label"]),
                                                 coco_id=int(row[id_key]),
                                                 name=str(row["name"])))
        except (TypeError, KeyError, ValueError):
            raise LabelMapError(f"{source}: label map row {position} should have an integer "
                                f"'label' and '{id_key}' and a 'name', found {row!r:.200}"
                                ) from None
    return entries


def _read_json(path):
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except ValueError as e:
        raise LabelMapError(f"{path}: not JSON ({e})") from e


def read(path):
    """The LabelMap of a `label_map.json` (model dir or export); LabelMapError if unusable."""
    return from_entries(_entries_from_json(_read_json(path), path, "id"), path)


def write(model_dir, label_map):
    """Writes `label_map.json` into `model_dir` (atomically: a reader never sees half a file)."""
    path = os.path.join(model_dir, LABEL_MAP_FILE)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(label_map.to_json(), f, indent=1)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path


def from_records(file_pattern):
    """The label map of the converter's manifests beside the records of `file_pattern`.

    Returns:
      a LabelMap (source: a manifest), or None when no matched shard has a manifest (records
      of another converter, or files not named as `tfrecord_tools` names shards) or there is
      no pattern.
    Raises:
      records.InputError: the pattern matches no file.
      LabelMapError: a manifest without a usable label map, or two manifests that disagree.
    """
    if not file_pattern:
        return None
    prefixes = sorted({shard_writer.prefix_of_shard(path)
                       for path in records.resolve_files(file_pattern)} - {None})
    found = None
    for prefix in prefixes:
        path = shard_writer.manifest_path(prefix)
        if not tf.io.gfile.exists(path):
            continue
        manifest = _read_json(path)
        if not isinstance(manifest, dict) or "label_map" not in manifest:
            raise LabelMapError(f"{path}: a manifest without 'label_map' (written by an older "
                                f"converter? convert the data again)")
        label_map = from_entries(_entries_from_json(manifest["label_map"], path, "coco_id"),
                                 path)
        if found is None:
            found = label_map
        else:
            check_same(found, label_map)
    return found


def from_annotations(annotations_file):
    """The categories of a COCO annotation JSON, numbered as the converter numbers them
    (sorted by id, labels 1..K); None without a file.

    Raises:
      LabelMapError: the file is not COCO JSON with a usable 'categories' list.
    """
    if not annotations_file:
        return None
    try:
        data = coco_index.read_coco_json(annotations_file)
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise coco_index.ConversionError(
                f"{annotations_file}: expected a COCO JSON object with a 'categories' list")
        entries = coco_index.build_label_map(data["categories"], annotations_file)
    except coco_index.ConversionError as e:
        raise LabelMapError(str(e)) from e
    return from_entries(entries, annotations_file)


def check_same(expected, found):
    """LabelMapError naming both sources unless the two maps give every label the same
    category id (names are not compared: a dataset may spell a class differently)."""
    if expected is None or found is None:
        return
    if expected.label_to_category == found.label_to_category:
        return
    if len(expected.entries) != len(found.entries):
        detail = f"{len(expected.entries)} classes vs {len(found.entries)}"
    else:
        differing = [label for label, category in expected.label_to_category.items()
                     if found.label_to_category[label] != category]
        detail = ", ".join(f"label {label}: category id "
                           f"{expected.label_to_category[label]} vs "
                           f"{found.label_to_category[label]}"
                           for label in differing[:NUM_EXAMPLES])
    raise LabelMapError(f"the label maps of {expected.source} and {found.source} disagree "
                        f"({detail}); records, ground truth and model must share one label map "
                        f"(convert every split from annotation files with the same categories)")


def configured_num_classes():
    """`build_maskrcnn_model.num_classes` as the config binds it (a macro resolved); None when
    it is unbound."""
    return gin_bindings.bound_value(NUM_CLASSES_PARAMETER)


def apply_num_classes(label_map, check=True):
    """Makes the model's class count the label map's: binds `num_classes` when the config
    leaves it unset; returns (num_classes, whether it was set here). None: nothing to apply.

    `check=False` (evaluate, predict, export) leaves a configured `num_classes` alone: there
    the checkpoint is the authority, and restoring it into a model of another class count is
    its own, more precise error; what remains is checked against the restored model
    (`check_model`).

    Raises:
      LabelMapError: with `check`, the config binds another `num_classes`; the message names
        both numbers and the label map's file.
    """
    if label_map is None:
        return None, False
    configured = configured_num_classes()
    if configured is None:
        with gin.unlock_config():
            gin.bind_parameter(NUM_CLASSES_PARAMETER, label_map.num_classes)
        return label_map.num_classes, True
    if check and configured != label_map.num_classes:
        raise LabelMapError(
            f"{NUM_CLASSES_PARAMETER} = {configured} ({configured - 1} classes and the "
            f"background), but {label_map.source} lists {len(label_map.entries)} classes "
            f"(num_classes = {label_map.num_classes}); fix the config (e.g. --gin_param "
            f"'{NUM_CLASSES_PARAMETER} = {label_map.num_classes}'), or leave it unset to take "
            f"it from the data")
    return configured, False


def check_model(label_map, num_classes):
    """LabelMapError unless the model's `num_classes` K is the label map's (None: no map)."""
    if label_map is not None and label_map.num_classes != num_classes:
        raise LabelMapError(f"{label_map.source} lists {len(label_map.entries)} classes, but the "
                            f"model has {num_classes - 1} (build_maskrcnn_model.num_classes = "
                            f"{num_classes}, background included)")
