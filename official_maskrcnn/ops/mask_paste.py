"""The reference's mask pasting in TensorFlow: box-aligned M x M mask probabilities -> binary
masks of the whole original image, for graphs that must not call back into Python (a serving
export).

Legend: K detections, M the mask side (28), S = M + 2 the zero-padded side, H x W the image.

The rule is maskrcnn-benchmark's `paste_mask_in_image(padding=1)`, as
`evaluation.mask_pasting` documents it: pad the mask to S x S, scale its box by S / M about the
centre and truncate to int, resize bilinearly (torch, align_corners=False, float32, x first) to
the box's h x w, threshold (> threshold), write into the image clipped to it. Every product and
sum below is one float32 TensorFlow op in torch's order, so the pixels are those of the C
paster (`_mask_rle.c`), which tests/ops/test_mask_paste.py checks pixel for pixel.

Only the box's visible window is computed (cost ~ box area), one detection at a time
(`tf.map_fn`), so memory stays at one K x H x W uint8 result.
"""

import tensorflow as tf

MASK_PADDING = 1  # the reference's padding=1 (`mask_pasting.MASK_PADDING`)


def paste_boxes(boxes_xyxy, mask_size):
    """The reference's integer paste boxes (`mask_pasting.expanded_int_boxes` in TF).

    Args:
      boxes_xyxy: [K, 4] float32 [x1, y1, x2, y2] in original pixels (inclusive "+1").
      mask_size: M (Python int).
    Returns:
      [K, 4] int32 [x0, y0, x1, y1] inclusive: each box scaled by (M + 2) / M about its
      centre, truncated toward zero.
    """
    boxes = tf.cast(boxes_xyxy, tf.float32)
    scale = tf.constant((mask_size + 2.0 * MASK_PADDING) / mask_size, tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    half_w = (x2 - x1) * 0.5 * scale
    half_h = (y2 - y1) * 0.5 * scale
    centre_x = (x2 + x1) * 0.5
    centre_y = (y2 + y1) * 0.5
    expanded = tf.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w,
                         centre_y + half_h], axis=-1)
    return tf.cast(expanded, tf.int32)  # truncation toward zero, as box.to(torch.int32)


def _bilinear_taps(dst, in_size, out_size):
    """torch's bilinear source taps (align_corners=False) of output indices `dst` [N] int32
    along an axis resized from in_size to out_size (scalar int32 tensors): i0, i1 [N] int32 and
    their weights l0, l1 [N] float32."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    src = tf.maximum(scale * (tf.cast(dst, tf.float32) + 0.5) - 0.5, 0.0)
    i0 = tf.minimum(tf.cast(src, tf.int32), in_size - 1)
    i1 = i0 + tf.cast(i0 < in_size - 1, tf.int32)
    l1 = tf.clip_by_value(src - tf.cast(i0, tf.float32), 0.0, 1.0)
    return i0, i1, 1.0 - l1, l1


def paste_mask(mask, box, height, width, threshold=0.5):
    """One detection's pasted binary mask.

    Args:
      mask: [M, M] float32 probabilities.
      box: [4] int32 [x0, y0, x1, y1] inclusive paste box (`paste_boxes`).
      height, width: scalar int32, H and W of the image.
      threshold: a pixel is set when its resized value is > threshold.
    Returns:
      [H, W] uint8 in {0, 1}.
    """
    padded = tf.pad(tf.cast(mask, tf.float32), [[MASK_PADDING, MASK_PADDING]] * 2)  # [S, S]
    side = tf.shape(padded)[0]
    x0, y0, x1, y1 = tf.unstack(box)
    box_w, box_h = tf.maximum(x1 - x0 + 1, 1), tf.maximum(y1 - y0 + 1, 1)
    # The window of the box inside the image; empty when the box lies outside it.
    left, top = tf.clip_by_value(x0, 0, width), tf.clip_by_value(y0, 0, height)
    right = tf.clip_by_value(x1 + 1, left, width)
    bottom = tf.clip_by_value(y1 + 1, top, height)
    ix0, ix1, lx0, lx1 = _bilinear_taps(tf.range(left, right) - x0, side, box_w)
    iy0, iy1, ly0, ly1 = _bilinear_taps(tf.range(top, bottom) - y0, side, box_h)
    along_x = lx0 * tf.gather(padded, ix0, axis=1) + lx1 * tf.gather(padded, ix1, axis=1)  # [S, w]
    value = (ly0[:, None] * tf.gather(along_x, iy0) + ly1[:, None] * tf.gather(along_x, iy1))
    window = tf.cast(value > threshold, tf.uint8)  # [bottom - top, right - left]
    return tf.pad(window, [[top, height - bottom], [left, width - right]])


def paste_masks(masks, boxes_xyxy, height, width, threshold=0.5):
    """Box-aligned mask probabilities -> binary masks of the whole image.

    Args:
      masks: [K, M, M] float32 probabilities of each detection's class.
      boxes_xyxy: [K, 4] float32 [x1, y1, x2, y2] in pixels of the H x W image ("+1").
      height, width: scalar ints, H and W.
      threshold: binarisation threshold (strictly greater; reference 0.5).
    Returns:
      [K, H, W] uint8 in {0, 1}; the same pixels as `evaluation.mask_pasting.paste_masks`.
    """
    masks = tf.convert_to_tensor(masks, tf.float32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    boxes = paste_boxes(boxes_xyxy, masks.shape[-1])
    shape = tf.stack([tf.shape(masks)[0], height, width])

    def paste_each():
        pasted = tf.map_fn(lambda args: paste_mask(args[0], args[1], height, width, threshold),
                           (masks, boxes),
                           fn_output_signature=tf.TensorSpec([None, None], tf.uint8))
        return tf.reshape(pasted, shape)

    # map_fn over no detection would stack to shape [0] (no element to give H, W).
    return tf.cond(shape[0] > 0, paste_each, lambda: tf.zeros(shape, tf.uint8))
