"""A serving graph around a restored model: images in, COCO-ready detections with masks pasted
into the original pixels out, with nothing left for Python (what `export` saves).

Legend: B images, T the model's detection slots, K = max_detections kept, M the mask side,
Hc x Wc the canvas holding either orientation's padded shape, Hm x Wm the largest original image
of the batch.

Per image, exactly the steps of `predict` and the evaluation: decode (JPEG with the accurate IDCT
of the eval records, PNG, grayscale and alpha to RGB), `EvalParser.preprocess_image` (resize
800 / 1333 or the config's sizes, the config's pixel mode, padding to the orientation's fixed
shape), the model's inference call, then `coco_results`' mapping to the original image: boxes
divided by the resize scale, masks pasted by `ops.mask_paste` (the reference's rule). The
landscape and the portrait images of a batch run through the model as two sub-batches at their
own padded shapes, so every image gets the same result as alone.

Outputs (all per image, slots beyond num_detections zero):
  detection_boxes [B, K, 4] float32 [ymin, xmin, ymax, xmax] in original pixels, inclusive
    corners (the reference's "+1": width = xmax - xmin + 1);
  detection_scores [B, K] float32, decreasing;
  detection_classes [B, K] int32: COCO category ids when the export has a label map, else the
    model's labels 1..num_classes-1;
  num_detections [B] int32: kept detections (score >= score_threshold, at most K);
  detection_masks [B, K, M, M] float32: the mask head's probabilities over each box;
  detection_masks_image [B, K, Hm, Wm] uint8 in {0, 1}: the pasted masks; image i's are
    [:, :H_i, :W_i];
  original_size [B, 2] int32: (H_i, W_i).
"""

import functools

import tensorflow as tf

from official_maskrcnn.data import decoder, parsers
from official_maskrcnn.inference.image_files import PNG_MAGIC
from official_maskrcnn.ops import mask_paste
from tfrecord_tools import features

INPUT_TYPES = ("image_bytes", "image_tensor", "tf_example")
INPUT_NAME = "inputs"  # the signature's one input, as Model Garden's exports name it
ENCODED_IMAGE_KEY = features.ENCODED  # tf_example input: the converter's feature key
DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "detection_masks",
                  "num_detections")


def decode_any_image(encoded, index=None):
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB, as `image_files.decode_image` (JPEG through
    the eval records' decoder, grayscale replicated, alpha dropped).

    Other bytes fail the call with an InvalidArgumentError naming the input's position and its
    first bytes: an error of that request, never of the server.
    """
    is_jpeg = tf.io.is_jpeg(encoded)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)
    checked = tf.debugging.Assert(
        is_jpeg | is_png,
        ["serving input", -1 if index is None else index, "is not a JPEG or PNG image; its "
         "first bytes:", tf.strings.substr(encoded, 0, 8)])
    with tf.control_dependencies([checked]):
        return tf.cond(is_jpeg, lambda: decoder.decode_image(encoded),
                       lambda: tf.ensure_shape(tf.io.decode_png(encoded, channels=3),
                                               [None, None, 3]))


def input_signature(input_type, batch_size=None):
    """The `tf.TensorSpec` of the serving input: [B] string (image_bytes, tf_example) or
    [B, None, None, 3] uint8 (image_tensor); B = batch_size or None (any)."""
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, found {input_type!r}")
    if input_type == "image_tensor":
        return tf.TensorSpec([batch_size, None, None, 3], tf.uint8, name=INPUT_NAME)
    return tf.TensorSpec([batch_size], tf.string, name=INPUT_NAME)


def checked_input(inputs, input_type, batch_size=None):
    """`inputs`, its shape checked in the graph: a loaded SavedModel's signature may check only
    the dtype (a [2, H, W, 4] tensor, or a batch of 3 for a fixed batch of 2, would otherwise
    run or fail deep inside), so a wrong shape fails the call with an InvalidArgumentError
    naming the found and the expected shape. A data-path op (`tf.ensure_shape`), not an
    assertion beside it: nothing downstream can run first."""
    spec = input_signature(input_type, batch_size)
    return tf.ensure_shape(inputs, spec.shape, name="check_serving_input_shape")


class DetectionServer(tf.Module):
    """The model, the eval preprocessing and the output mapping, as one traced function.

    Args:
      model: a built `MaskRCNNModel` with its weights (inference outputs: DETECTION_KEYS).
      parser: the `parsers.EvalParser` of the config.
      category_ids: [num_classes] ints, the output id of each model label (index 0, the
        background, unused), or None to output the labels.
      score_threshold: keep detections with at least this score.
      max_detections: K, at most the model's T.
      mask_threshold: the pasting threshold (reference 0.5).
    """

    def __init__(self, model, parser, category_ids=None, score_threshold=0.0,
                 max_detections=100, mask_threshold=0.5):
        super().__init__(name="detection_server")
        # The model is called, not tracked: tracking a Keras model makes the SavedModel trace
        # its training call too (dynamic shapes it does not support). Its variables are
        # tracked instead, which is all the traced serving function captures.
        self._infer = functools.partial(model.__call__, training=False)
        self.model_variables = list(model.variables)
        self.parser = parser
        num_classes = model.settings.num_classes
        if category_ids is None:
            category_ids = list(range(num_classes))
        if len(category_ids) != num_classes:
            raise ValueError(f"category_ids has {len(category_ids)} entries, the model "
                             f"{num_classes} classes (background included)")
        self._category_ids = tf.constant(category_ids, tf.int32)
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)
        self.mask_threshold = float(mask_threshold)
        self._slots = model.settings.detection.max_detections
        self._mask_size = model.settings.detection.mask_size
        if not 1 <= self.max_detections <= self._slots:
            raise ValueError(f"max_detections must be in [1, {self._slots}] (the model's "
                             f"detection slots), found {self.max_detections}")
        self._shapes = parser.image_shapes  # ((Hl, Wl), (Hp, Wp))
        self._canvas = tuple(max(side) for side in zip(*self._shapes))

    def serving_function(self, input_type, batch_size=None):
        """A `tf.function` of one argument (`input_signature`) returning the output dict."""
        to_model_inputs = {"image_bytes": self._decode_bytes,
                           "image_tensor": self._preprocess_tensors,
                           "tf_example": self._decode_examples}
        preprocess = to_model_inputs[input_type]

        @tf.function(input_signature=[input_signature(input_type, batch_size)])
        def serve(inputs):
            return self.detect(preprocess(checked_input(inputs, input_type, batch_size)))

        return serve

    # ---------------------------------------------------------------- inputs

    def _preprocess(self, image):
        """[H, W, 3] uint8 -> (images [Hc, Wc, 3] float32, image_size [2], original_size [2],
        scale [2]): `EvalParser.preprocess_image`, its padded shape placed on the canvas."""
        out = self.parser.preprocess_image(image)
        padded = out["images"]
        canvas = tf.pad(padded, [[0, self._canvas[0] - tf.shape(padded)[0]],
                                 [0, self._canvas[1] - tf.shape(padded)[1]], [0, 0]])
        return (tf.ensure_shape(canvas, self._canvas + (3,)), out["image_size"],
                out["original_size"], out["scale"])

    def _preprocessed_spec(self):
        return (tf.TensorSpec(self._canvas + (3,), tf.float32), tf.TensorSpec([2], tf.int32),
                tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.float32))

    def _decode_bytes(self, encoded):
        positions = tf.range(tf.shape(encoded)[0])
        return tf.map_fn(lambda args: self._preprocess(decode_any_image(args[0], args[1])),
                         (encoded, positions), fn_output_signature=self._preprocessed_spec())

    def _preprocess_tensors(self, images):
        return tf.map_fn(self._preprocess, images, fn_output_signature=self._preprocessed_spec())

    def _decode_examples(self, serialized):
        features = tf.io.parse_example(
            serialized, {ENCODED_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)})
        return self._decode_bytes(features[ENCODED_IMAGE_KEY])

    # ---------------------------------------------------------------- model and outputs

    def detect(self, preprocessed):
        """`_preprocess`'s batched tuple -> the output dict of the module docstring."""
        images, image_size, original_size, scale = preprocessed
        outputs = self._run_by_orientation(images, image_size, parsers.is_portrait(
            {"height": original_size[:, 0], "width": original_size[:, 1]}))
        return self._in_original_pixels(outputs, original_size, scale)

    def _empty_outputs(self):
        t, m = self._slots, self._mask_size
        return (tf.zeros([0, t, 4]), tf.zeros([0, t]), tf.zeros([0, t], tf.int32),
                tf.zeros([0, t, m, m]), tf.zeros([0], tf.int32))

    def _run_by_orientation(self, images, image_size, portrait):
        """The model on the landscape and on the portrait images, each group at its own padded
        shape (the evaluation's static shapes); results back in input order."""
        indices, groups = [], []
        for is_portrait, (height, width) in zip((False, True), self._shapes):
            index = tf.cast(tf.where(tf.equal(portrait, is_portrait))[:, 0], tf.int32)

            def run(index=index, height=height, width=width):
                outputs = self._infer({"images": tf.gather(images, index)[:, :height, :width],
                                       "image_size": tf.gather(image_size, index)})
                return tuple(tf.cast(outputs[key], spec.dtype)
                             for key, spec in zip(DETECTION_KEYS, self._empty_outputs()))

            indices.append(index)
            groups.append(tf.cond(tf.size(index) > 0, run, self._empty_outputs))
        return {key: tf.dynamic_stitch(indices, [group[k] for group in groups])
                for k, key in enumerate(DETECTION_KEYS)}

    def _in_original_pixels(self, outputs, original_size, scale):
        """Kept detections (valid, score >= threshold, the first K) in original pixels, with
        their masks pasted into each image."""
        slots = tf.range(self._slots)[None, :]
        keep = ((slots < outputs["num_detections"][:, None])
                & (outputs["detection_classes"] != 0)
                & (outputs["detection_scores"] >= self.score_threshold))  # [B, T]
        # Slots are sorted by decreasing score; a stable sort brings the kept ones first.
        order = tf.argsort(tf.cast(~keep, tf.int32), axis=1, stable=True)[:, :self.max_detections]

        def kept(key):
            return tf.gather(outputs[key], order, batch_dims=1)

        valid = tf.gather(keep, order, batch_dims=1)  # [B, K]
        scale_yxyx = tf.tile(scale, [1, 2])[:, None, :]  # [B, 1, 4] (sy, sx, sy, sx)
        boxes = tf.where(valid[..., None], kept("detection_boxes") / scale_yxyx, 0.0)
        masks = tf.where(valid[..., None, None], kept("detection_masks"), 0.0)
        classes = tf.where(valid, tf.gather(self._category_ids, kept("detection_classes")), 0)
        return {
            "detection_boxes": boxes,
            "detection_scores": tf.where(valid, kept("detection_scores"), 0.0),
            "detection_classes": classes,
            "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
            "detection_masks": masks,
            "detection_masks_image": self._pasted(masks, boxes, original_size),
            "original_size": original_size,
        }

    def _pasted(self, masks, boxes_yxyx, original_size):
        """[B, K, M, M] masks, [B, K, 4] original-pixel boxes -> [B, K, Hm, Wm] uint8."""
        largest = tf.maximum(tf.reduce_max(original_size, axis=0), 0)  # [2]; 0 for no image
        shape = tf.concat([tf.shape(masks)[:2], largest], axis=0)

        def paste_image(args):
            image_masks, boxes, size = args
            pasted = mask_paste.paste_masks(image_masks, tf.gather(boxes, [1, 0, 3, 2], axis=1),
                                            size[0], size[1], self.mask_threshold)
            return tf.pad(pasted, [[0, 0], [0, largest[0] - size[0]], [0, largest[1] - size[1]]])

        def paste_all():
            return tf.map_fn(paste_image, (masks, boxes_yxyx, original_size),
                             fn_output_signature=tf.TensorSpec([self.max_detections, None, None],
                                                               tf.uint8))

        return tf.cond(shape[0] > 0, paste_all, lambda: tf.zeros(shape, tf.uint8))
