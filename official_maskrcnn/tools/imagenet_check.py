"""ImageNet self-check of a converted backbone: does it still recognise a pizza?

The backbone weights of R-50.pkl were trained as an ImageNet classifier whose last layer, the
`fc1000` blobs, ships in the same pickle. Restoring the converted checkpoint, running a few real
images through the same preprocessing the input pipeline gives the backbone, global-average-pooling
C5 and applying `fc1000` must put each image's ImageNet class in the top 5. A wrong blob mapping,
a swapped channel order or a wrong mean turns the predictions into noise; nothing else in the
conversion can see that (the shapes all fit).

Data (package data, `imagenet_check_data/`): three 224x224 crops of coco128 images (a pizza, a
school bus, a teddy bear), `images.json` with each file's COCO source, licence and the accepted
ImageNet class indices, and `imagenet_classes.txt`, the 1000 ILSVRC-2012 classes, line i = class i,
`synset<TAB>names` (from tensorflow-datasets, Apache-2.0).

Shape legend: N check images, S their side (224), C = 2048 C5 channels, K = 1000 ImageNet classes
(no background class).
"""

import json
from importlib import resources

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import decoder
from official_maskrcnn.data.parsers import EvalParser
from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError

DATA_PACKAGE = "official_maskrcnn.tools"
DATA_DIR = "imagenet_check_data"
IMAGES_JSON = "images.json"
CLASS_NAMES_FILE = "imagenet_classes.txt"
NUM_CLASSES = 1000
TOP_K = 5
# The pickle's classifier: logits [N, K] = pooled C5 [N, C] @ fc1000_w.T + fc1000_b.
CLASSIFIER_WEIGHTS, CLASSIFIER_BIAS = "fc1000_w", "fc1000_b"
C5_LEVEL, C5_CHANNELS = "5", 2048
# What R-50.pkl expects (REFERENCE.md: BGR, 0..255, minus Detectron's mean, std 1) and what
# configs/mlperf_r50_fpn.gin feeds it (DatasetBuilder.pixel_mode).
DETECTRON_PIXEL_MODE = "bgr_caffe"


class SelfCheckFailed(BackboneWeightsError):
    """An image's expected ImageNet class is not in the top 5: the weights or the pixels are off."""


def data_path(name):
    """The package data file `name` of the check (a Traversable; `.read_bytes()`, `.open()`)."""
    return resources.files(DATA_PACKAGE).joinpath(DATA_DIR, name)


def load_class_names():
    """The K ImageNet class names, index -> "name, synonym, ..." (the synset id dropped)."""
    path = data_path(CLASS_NAMES_FILE)
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != NUM_CLASSES or any("\t" not in line for line in lines):
        raise ValueError(f"{path}: expected {NUM_CLASSES} lines 'synset<TAB>names', found "
                         f"{len(lines)} lines")
    return [line.split("\t", 1)[1] for line in lines]


def load_check_images():
    """The check images: [{"file", "encoded" (JPEG bytes), "expected" {class index: name},
    "coco" (source, licence)}], in `images.json` order."""
    listing = json.loads(data_path(IMAGES_JSON).read_text(encoding="utf-8"))
    images = []
    for entry in listing["images"]:
        expected = {int(index): name for index, name in entry["expected_classes"].items()}
        bad = [i for i in expected if not 0 <= i < NUM_CLASSES]
        if not expected or bad:
            raise ValueError(f"{data_path(IMAGES_JSON)}: {entry['file']}: expected class "
                             f"indices in [0, {NUM_CLASSES}), found {sorted(expected)}")
        images.append({"file": entry["file"], "encoded": data_path(entry["file"]).read_bytes(),
                       "expected": expected, "coco": entry["coco"]})
    return images


def classifier_from_blobs(blobs, source):
    """The pickle's fc1000 as (weights [K, C], bias [K]) float32, or None when it has neither.

    Raises:
      BackboneWeightsError naming `source` and the blob when only one of the two is present or
      a shape differs.
    """
    present = [name for name in (CLASSIFIER_WEIGHTS, CLASSIFIER_BIAS) if name in blobs]
    if not present:
        return None
    if len(present) == 1:
        missing = CLASSIFIER_BIAS if present[0] == CLASSIFIER_WEIGHTS else CLASSIFIER_WEIGHTS
        raise BackboneWeightsError(f"{source}: has {present[0]} but not {missing}; the "
                                   "self-check needs both")
    weights = np.asarray(blobs[CLASSIFIER_WEIGHTS], np.float32)
    bias = np.asarray(blobs[CLASSIFIER_BIAS], np.float32)
    for name, value, shape in ((CLASSIFIER_WEIGHTS, weights, (NUM_CLASSES, C5_CHANNELS)),
                               (CLASSIFIER_BIAS, bias, (NUM_CLASSES,))):
        if value.shape != shape:
            raise BackboneWeightsError(f"{source}: blob {name}: expected shape {shape}, found "
                                       f"{value.shape}")
    return weights, bias


def preprocess(encoded, pixel_mode, size, name="image"):
    """JPEG bytes of an S x S image -> [S, S, 3] float32, as the model's input pipeline does it.

    The inference preprocessing itself (`EvalParser.preprocess_image`: the records' JPEG decoder,
    channel order, mean), not a copy, so a pixel mistake there shows here. min = max size = S
    keeps an S x S image as it is, with no padding (padding would dilute the average pool).
    """
    parser = EvalParser(min_size=size, max_size=size, size_divisibility=1, pixel_mode=pixel_mode)
    outputs = parser.preprocess_image(decoder.decode_image(encoded))
    if outputs["original_size"].numpy().tolist() != [size, size]:
        raise ValueError(f"{name}: expected a {size}x{size} image, found "
                         f"{outputs['original_size'].numpy().tolist()}")
    return outputs["images"]


def pooled_features(backbone, images):
    """images [N, S, S, 3] -> [N, C] float32: global average pool of the backbone's C5."""
    c5 = backbone(images, training=False)[C5_LEVEL]
    return tf.reduce_mean(c5, axis=[1, 2]).numpy()


def softmax_probabilities(pooled, weights, bias):
    """pooled [N, C], weights [K, C], bias [K] -> probabilities [N, K] float64."""
    logits = pooled.astype(np.float64) @ weights.T.astype(np.float64) + bias
    logits -= logits.max(axis=1, keepdims=True)  # exp of large logits would overflow
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def run_self_check(backbone, weights, bias, pixel_mode=DETECTRON_PIXEL_MODE, size=224):
    """Classifies the check images with `backbone` + the classifier.

    Args:
      backbone: a built ResNet returning {"5": [N, h, w, C]}.
      weights: [K, C], bias: [K], the pickle's fc1000.
      pixel_mode: how the pixels are normalised (`preprocess_ops.PIXEL_MODES`).
      size: S, the side of the check images.
    Returns:
      [{"file", "expected" {index: name}, "top" [(index, name, probability)] * TOP_K best first,
        "passed": an expected index is in "top"}], one per image.
    """
    names = load_class_names()
    images = load_check_images()
    batch = tf.stack([preprocess(image["encoded"], pixel_mode, size, image["file"])
                      for image in images])
    probabilities = softmax_probabilities(pooled_features(backbone, batch), weights, bias)
    results = []
    for image, probs in zip(images, probabilities):
        # Stable sort: among equal probabilities the lower index ranks first, deterministically.
        best = np.argsort(-probs, kind="stable")[:TOP_K]
        top = [(int(i), names[i], float(probs[i])) for i in best]
        results.append({"file": image["file"], "expected": image["expected"], "top": top,
                        "passed": any(i in image["expected"] for i, _, _ in top)})
    return results


def check_checkpoint(prefix, weights, bias, pixel_mode=DETECTRON_PIXEL_MODE):
    """`run_self_check` on the reference backbone restored from the checkpoint at `prefix`,
    through `load_backbone_checkpoint`, the path training takes."""
    backbone = checkpoint.build_reference_backbone()
    checkpoint.load_backbone_checkpoint(backbone, prefix)
    return run_self_check(backbone, weights, bias, pixel_mode)


def _short(name):
    """"pizza, pizza pie" -> "pizza": the first of the synset's names."""
    return name.split(",")[0]


def format_result(result):
    """Lines: the image, its expected classes and the verdict, then its top 5, best first:
        coco_000000000450_pizza.jpg (expected 963 pizza): ok
            1.  963 pizza                 91.20%
    """
    expected = ", ".join(f"{i} {_short(n)}" for i, n in sorted(result["expected"].items()))
    verdict = "ok" if result["passed"] else f"NOT in the top {TOP_K}"
    lines = [f"{result['file']} (expected {expected}): {verdict}"]
    for rank, (index, name, probability) in enumerate(result["top"], 1):
        lines.append(f"    {rank}. {index:4d} {_short(name):24s} {100 * probability:6.2f}%")
    return lines


def failure_message(results):
    """The error text for the failed images of `results` (each named with its top 5)."""
    failed = [r for r in results if not r["passed"]]
    lines = [f"self-check failed: the expected ImageNet class is not in the top {TOP_K} of "
             f"{len(failed)} of {len(results)} image(s) (wrong blob mapping, channel order or "
             "mean?):"]
    for result in failed:
        lines += format_result(result)
    return "\n".join(lines)
