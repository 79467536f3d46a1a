"""Train and eval parsers: a parsed record -> the model's fixed-shape inputs.

Shape legend: Hp, Wp padded image size (one per orientation group); I = max_instances;
M = mask_size. Classes are contiguous labels 1..K; 0 (background) never appears here.

Train output:
  images:      [Hp, Wp, 3] float32, normalised (see preprocess_ops.normalize_image), zero padded
               bottom/right after normalisation, as the reference pads its batches.
  image_size:  [2] int32 (h, w) of the resized image inside the padding (for border anchors).
  gt_boxes:    [I, 4] float32 [ymin, xmin, ymax, xmax] pixels of the resized (and flipped)
               image, reference (inclusive) corners; padded with -1.
  gt_classes:  [I] int32, padded with -1.
  gt_masks:    [I, M, M] float32 in [0, 1]: the instance mask resampled over its extent
               (`gt_mask_boxes`; bin centres, bilinear), flipped with the image; padded with -1.
  gt_mask_boxes: [I, 4] float32 [ymin, xmin, ymax, xmax] pixels of the resized (and flipped)
               image: the continuous extent [x, x + bw] x [y, y + bh] each crop of gt_masks
               covers (the span of the reference's polygons, one pixel past the inclusive
               gt_boxes' x2 = x + bw - 1 before the resize), clipped to the image, then
               flipped like gt_boxes (x' = w - x - 1, so up to 1 px past the left edge, where
               the reference's flipped polygons lie too); padded with -1. Only the mask
               targets use it; box coding, matching and areas keep gt_boxes.
  source_id:   [] int64.
Eval output: images, image_size, original_size [2] int32 (H, W), scale [2] float32
  (h / H, w / W) to map boxes back to the original image, source_id, is_valid [] bool (True).
"""

import tensorflow as tf

from official_maskrcnn.data import decoder, preprocess_ops

PAD_VALUE = -1


def trainable_instances(parsed, legacy_plus_one=True):
    """[N] bool: instances training keeps (not crowd, box non-empty after the reference's clip).

    An image with none of them is dropped from training, as the reference drops images without
    a usable annotation.
    """
    _, valid = preprocess_ops.normalized_to_reference_boxes(
        parsed["boxes_normalized"], parsed["height"], parsed["width"], legacy_plus_one)
    return tf.logical_and(tf.logical_not(parsed["is_crowd"]), valid)


def is_portrait(parsed):
    """The reference's aspect grouping: height / width >= 1 (squares included) goes to the
    portrait group. The one orientation rule of the pipeline: the padded shape, the scan, the
    training grouping and every batch count follow it."""
    return parsed["height"] >= parsed["width"]


class _ResizePadMixin:
    """Resize to the reference size, normalise, pad into the orientation group's shape."""

    def __init__(self, min_size, max_size, size_divisibility, pixel_mode):
        if pixel_mode not in preprocess_ops.PIXEL_MODES:
            raise ValueError(f"pixel_mode must be one of {preprocess_ops.PIXEL_MODES}, "
                             f"got {pixel_mode!r}")
        self.min_size, self.max_size = min_size, max_size
        self.size_divisibility = size_divisibility
        self.pixel_mode = pixel_mode

    @property
    def image_shapes(self):
        """((Hl, Wl), (Hp, Wp)): the static padded (height, width) of the landscape and the
        portrait group (`preprocess_ops.padded_image_size`), Python ints."""
        return tuple(preprocess_ops.padded_image_size(
            self.min_size, self.max_size, self.size_divisibility, portrait=portrait)
            for portrait in (False, True))

    def _normalize_and_resize(self, image, height, width, portrait):
        """uint8 image in the mode's channel order -> (normalised resized image, new_h, new_w,
        pad_h, pad_w).

        Normalising (per-channel affine) commutes with bilinear resizing, whose weights sum to 1,
        so it is done on the smaller original image.
        """
        new_h, new_w = preprocess_ops.reference_output_size(height, width, self.min_size,
                                                            self.max_size)
        landscape_hw, portrait_hw = self.image_shapes
        pad_h = tf.where(portrait, portrait_hw[0], landscape_hw[0])
        pad_w = tf.where(portrait, portrait_hw[1], landscape_hw[1])
        # Extreme aspect ratios (> ~20:1) can exceed the padded side by the reference's
        # truncation; clamp rather than fail (a documented, negligible deviation).
        new_h, new_w = tf.minimum(new_h, pad_h), tf.minimum(new_w, pad_w)
        normalized = preprocess_ops.normalize_values(tf.cast(image, tf.float32), self.pixel_mode)
        return (preprocess_ops.resize_image(normalized, new_h, new_w), new_h, new_w, pad_h,
                pad_w)

    @staticmethod
    def _pad(image, pad_h, pad_w):
        """Zero padding bottom/right, after normalisation, as the reference pads its batches."""
        size = tf.shape(image)
        padded = tf.pad(image, [[0, pad_h - size[0]], [0, pad_w - size[1]], [0, 0]])
        return tf.ensure_shape(padded, [None, None, 3])


class TrainParser(_ResizePadMixin):
    """Callable: (parsed record, per-element stateless seed [2]) -> train output dict."""

    def __init__(self, min_size=800, max_size=1333, size_divisibility=32, flip_probability=0.5,
                 pixel_mode="bgr_caffe", max_instances=100, mask_size=112, include_masks=True,
                 legacy_plus_one=True):
        super().__init__(min_size, max_size, size_divisibility, pixel_mode)
        self.flip_probability = flip_probability
        self.max_instances = max_instances
        self.mask_size = mask_size
        self.include_masks = include_masks
        self.legacy_plus_one = legacy_plus_one

    def __call__(self, parsed, seed):
        keep = trainable_instances(parsed, self.legacy_plus_one)
        boxes, _ = preprocess_ops.normalized_to_reference_boxes(
            parsed["boxes_normalized"], parsed["height"], parsed["width"], self.legacy_plus_one)
        boxes = tf.boolean_mask(boxes, keep)
        # The masks' extent: continuous corners whatever legacy_plus_one, since the reference's
        # polygons reach x + bw; cropping over the inclusive box would drop the last pixel
        # column and row of every object (issue 14).
        extents, _ = preprocess_ops.normalized_to_reference_boxes(
            parsed["boxes_normalized"], parsed["height"], parsed["width"], legacy_plus_one=False)
        extents = tf.boolean_mask(extents, keep)
        classes = tf.boolean_mask(parsed["classes"], keep)

        flip = tf.random.stateless_uniform([], seed=seed) < self.flip_probability
        # Channel order and flip on the small decoded image: both commute with the (symmetric,
        # half-pixel-centred) bilinear resize, and cost less before it.
        image = preprocess_ops.order_channels(decoder.decode_image(parsed["encoded_image"]),
                                              self.pixel_mode)
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        resized, new_h, new_w, pad_h, pad_w = self._normalize_and_resize(
            image, parsed["height"], parsed["width"], is_portrait(parsed))
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(parsed["height"], tf.float32)
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(parsed["width"], tf.float32)
        gt_boxes = self._flip_boxes(preprocess_ops.resize_boxes(boxes, scale_y, scale_x),
                                    flip, new_w)
        gt_mask_boxes = self._flip_boxes(preprocess_ops.resize_boxes(extents, scale_y, scale_x),
                                         flip, new_w)

        outputs = {
            "images": self._pad(resized, pad_h, pad_w),
            "image_size": tf.stack([new_h, new_w]),
            "gt_boxes": preprocess_ops.pad_to_fixed_size(gt_boxes, self.max_instances,
                                                         PAD_VALUE),
            "gt_classes": preprocess_ops.pad_to_fixed_size(classes, self.max_instances,
                                                           PAD_VALUE),
            "source_id": parsed["source_id"],
        }
        if self.include_masks:
            masks = decoder.decode_masks(tf.boolean_mask(parsed["masks_png"], keep),
                                         parsed["height"], parsed["width"])
            # Cropped over the extent in the original image: the same region as the resized
            # extent.
            crops = preprocess_ops.crop_and_resize_masks(masks, extents, self.mask_size)
            crops = tf.cond(flip, lambda: crops[:, :, ::-1], lambda: crops)
            outputs["gt_masks"] = preprocess_ops.pad_to_fixed_size(crops, self.max_instances,
                                                                   PAD_VALUE)
            outputs["gt_mask_boxes"] = preprocess_ops.pad_to_fixed_size(
                gt_mask_boxes, self.max_instances, PAD_VALUE)
        return outputs

    def _flip_boxes(self, boxes, flip, width):
        """[N, 4] resized boxes, mirrored in an image `width` wide when `flip`.

        Boxes and mask extents mirror alike (x' = w - x - 1 under legacy_plus_one), as the
        reference mirrors its boxes and its polygons alike (its polygon flip also subtracts
        TO_REMOVE = 1); every frame of the flipped image is then one reflection of the
        unflipped one, so the mask targets of mirrored ROIs are the mirrored targets.
        """
        return tf.cond(
            flip,
            lambda: preprocess_ops.flip_boxes_left_right(boxes, width, self.legacy_plus_one),
            lambda: boxes)


class EvalParser(_ResizePadMixin):
    """Callable: parsed record -> eval output dict (no flip, no ground truth)."""

    def __init__(self, min_size=800, max_size=1333, size_divisibility=32, pixel_mode="bgr_caffe"):
        super().__init__(min_size, max_size, size_divisibility, pixel_mode)

    def __call__(self, parsed):
        outputs = self.preprocess_image(decoder.decode_image(parsed["encoded_image"]),
                                        parsed["height"], parsed["width"])
        outputs.update(source_id=parsed["source_id"], is_valid=tf.constant(True))
        return outputs

    def preprocess_image(self, image, height=None, width=None):
        """The inference preprocessing of one decoded image, for every caller (the eval
        records, `predict`, a serving export): channel order, normalise + resize, pad.

        Args:
          image: [H, W, 3] uint8 RGB.
          height, width: H and W when known (a record's fields); default: the image's shape.
        Returns:
          images [Hp, Wp, 3] float32, image_size [2] int32 (h, w) inside the padding,
          original_size [2] int32 (H, W), scale [2] float32 (h / H, w / W).
        """
        if height is None:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
        image = preprocess_ops.order_channels(image, self.pixel_mode)
        resized, new_h, new_w, pad_h, pad_w = self._normalize_and_resize(
            image, height, width, is_portrait({"height": height, "width": width}))
        original_size = tf.stack([height, width])
        image_size = tf.stack([new_h, new_w])
        return {
            "images": self._pad(resized, pad_h, pad_w),
            "image_size": image_size,
            "original_size": original_size,
            "scale": tf.cast(image_size, tf.float32) / tf.cast(original_size, tf.float32),
        }
