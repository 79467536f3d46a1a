"""ROIAlign with the MLPerf reference's semantics, in pure TensorFlow (XLA-compilable).

Shape legend: B images, R ROIs per image, H, W the size of one feature map (Hl, Wl at FPN level
l), C channels, P `output_size` (bins per side), S `sampling_ratio` (sample points per bin side),
N the number of feature-map cells (H * W, or the sum of Hl * Wl over the FPN levels).

Boxes are `[ymin, xmin, ymax, xmax]` in absolute pixels of the network input image.

The reference (maskrcnn-benchmark, `csrc/cpu/ROIAlign_cpu.cpp` and its CUDA twin) is the legacy
ROIAlign, i.e. torchvision's `aligned=False`:
  - roi_start = box * spatial_scale, with no half-pixel shift; the ROI size is clamped to >= 1
    feature cell ("force malformed ROIs to be 1x1"); bin = roi_size / P;
  - S x S samples per bin at roi_start + bin_index * bin + (k + 0.5) * bin / S;
  - a sample with y < -1 or y > H (x likewise) contributes 0; otherwise y is clamped to >= 0 and,
    when floor(y) >= H - 1, snapped to H - 1 (so the border cell is repeated, not zero padded);
    the four neighbours are weighted bilinearly;
  - a bin is the mean of its S * S samples (out-of-map samples count in the denominator).
No gradient flows into the boxes: the reference's backward returns none for the ROIs.

FPN level assignment (maskrcnn-benchmark `modeling/poolers.py`, `LevelMapper`, FPN paper eq. 1):
k = floor(4 + log2(sqrt(area) / 224 + 1e-6)) clamped to the available levels, where the area uses
the reference's inclusive-corner convention `BoxList.area()`: (xmax - xmin + 1) * (ymax - ymin + 1).
"""

import tensorflow as tf

from official_maskrcnn.ops.conventions import TO_REMOVE

# LevelMapper defaults of the reference: a 224 x 224 ROI (the ImageNet crop) maps to level 4.
CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6
# Samples further than this outside the map (in feature cells) contribute zero, as in the kernel.
OUT_OF_MAP_MARGIN = 1.0


def roi_align(features, boxes, output_size, spatial_scale, sampling_ratio=2):
    """Legacy (non-aligned) ROIAlign of the reference on one feature map.

    Args:
      features: [B, H, W, C] feature map, any float dtype.
      boxes: [B, R, 4] float [ymin, xmin, ymax, xmax] in input-image pixels. Padding boxes are
        allowed; they produce finite values that the caller masks out.
      output_size: P, a Python int (7 for the box head, 14 for the mask head).
      spatial_scale: Python float, 1 / stride of `features` (e.g. 0.25 for stride 4).
      sampling_ratio: S, a positive Python int (2 in the reference).
    Returns:
      [B, R, P, P, C] in the dtype of `features`. The interpolation and the bin mean are
      computed in float32 whatever that dtype (only the exact gather runs in the input dtype).
    """
    shape = tf.shape(features)
    batch, height, width = shape[0], shape[1], shape[2]
    num_boxes = tf.shape(boxes)[1]
    per_box = tf.ones([batch, num_boxes], tf.float32)
    flat_features = tf.reshape(features, [batch, -1, features.shape[-1]])
    return _roi_align_flat(
        flat_features, boxes,
        heights=per_box * tf.cast(height, tf.float32),
        widths=per_box * tf.cast(width, tf.float32),
        offsets=tf.zeros([batch, num_boxes], tf.int32),
        scales=per_box * spatial_scale,
        output_size=output_size, sampling_ratio=sampling_ratio)


def assign_fpn_levels(boxes, min_level=2, max_level=5):
    """The reference's LevelMapper: the FPN level each box is pooled from.

    Args:
      boxes: [..., 4] float [ymin, xmin, ymax, xmax] in input-image pixels.
      min_level, max_level: Python ints, the range of available levels.
    Returns:
      [...] int32 level in [min_level, max_level].
    """
    boxes = tf.cast(boxes, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    area = (xmax - xmin + TO_REMOVE) * (ymax - ymin + TO_REMOVE)
    # The reference never sees inverted boxes; clamping keeps sqrt away from NaN for padding.
    scale = tf.sqrt(tf.maximum(area, 0.0))
    log2 = tf.math.log(scale / CANONICAL_SCALE + LEVEL_EPS) / tf.math.log(2.0)
    levels = tf.floor(CANONICAL_LEVEL + log2)
    levels = tf.clip_by_value(levels, float(min_level), float(max_level))
    return tf.cast(levels, tf.int32)


def multilevel_roi_align(features, boxes, output_size, sampling_ratio=2):
    """ROIAlign on FPN features, each box pooled from the level the reference assigns it.

    All levels are flattened and concatenated into one [B, N, C] map, and each box carries the
    height, width, scale and offset of its level into a single gather. This costs the same as a
    one-level ROIAlign (no per-level padding to a fixed box count, no pooling of every box on
    every level) and keeps all shapes static.

    Args:
      features: dict level -> [B, Hl, Wl, C]; keys are ints or digit strings forming a
        contiguous range (2..5 for ResNet-50-FPN); level l has stride 2**l. C and the dtype are
        the same on every level.
      boxes: [B, R, 4] float [ymin, xmin, ymax, xmax] in input-image pixels.
      output_size: P, a Python int.
      sampling_ratio: S, a positive Python int.
    Returns:
      [B, R, P, P, C] in the dtype of the features.
    """
    by_level = {int(level): value for level, value in features.items()}
    levels = sorted(by_level)
    if levels != list(range(levels[0], levels[-1] + 1)):
        raise ValueError(f"multilevel_roi_align: expected contiguous FPN levels, got {levels}")
    batch = tf.shape(boxes)[0]
    channels = by_level[levels[0]].shape[-1]
    heights, widths, sizes, flats = [], [], [], []
    for level in levels:
        shape = tf.shape(by_level[level])
        heights.append(shape[1])
        widths.append(shape[2])
        sizes.append(shape[1] * shape[2])
        flats.append(tf.reshape(by_level[level], [batch, -1, channels]))
    flat_features = tf.concat(flats, axis=1)
    # Where each level starts in the concatenated map: exclusive cumulative sum of Hl * Wl.
    offsets = tf.cumsum(tf.stack(sizes), exclusive=True)
    scales = tf.constant([2.0 ** -level for level in levels], tf.float32)

    level_index = assign_fpn_levels(boxes, levels[0], levels[-1]) - levels[0]
    return _roi_align_flat(
        flat_features, boxes,
        heights=tf.gather(tf.cast(tf.stack(heights), tf.float32), level_index),
        widths=tf.gather(tf.cast(tf.stack(widths), tf.float32), level_index),
        offsets=tf.gather(offsets, level_index),
        scales=tf.gather(scales, level_index),
        output_size=output_size, sampling_ratio=sampling_ratio)


def _roi_align_flat(flat_features, boxes, heights, widths, offsets, scales, output_size,
                    sampling_ratio):
    """ROIAlign where every box names its own map inside a flattened feature tensor.

    Args:
      flat_features: [B, N, C]; a box's map is rows offset .. offset + height * width - 1, in
        row-major (y, x) order.
      boxes: [B, R, 4] float [ymin, xmin, ymax, xmax] in input-image pixels.
      heights, widths: [B, R] float32, the size of each box's map.
      offsets: [B, R] int32, where each box's map starts in N.
      scales: [B, R] float32, the spatial scale (1 / stride) of each box's map.
    Returns:
      [B, R, P, P, C] in the dtype of `flat_features`.
    """
    if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
        # The reference's adaptive mode (sampling_ratio <= 0: ceil(roi_size / P) samples) has a
        # data-dependent sample count, which static shapes cannot express.
        raise ValueError(
            f"roi_align: sampling_ratio must be a positive int, got {sampling_ratio!r}")
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    ymin, xmin, ymax, xmax = tf.unstack(boxes * scales[..., None], axis=-1)
    ys = _sample_coordinates(ymin, ymax, output_size, sampling_ratio)
    xs = _sample_coordinates(xmin, xmax, output_size, sampling_ratio)
    y_corners = _linear_neighbours(ys, heights[..., None])
    x_corners = _linear_neighbours(xs, widths[..., None])

    batch = tf.shape(boxes)[0]
    num_boxes = tf.shape(boxes)[1]
    channels = flat_features.shape[-1]
    grid = output_size * sampling_ratio
    row_stride = tf.cast(widths, tf.int32)[..., None, None]
    base = offsets[..., None, None]
    samples = 0.0
    # Four gathers of [B, R * (P S)^2, C], one per neighbour (low/high in y times low/high in
    # x), summed as they come, rather than one gather four times as large.
    for y_index, y_weight in y_corners:
        for x_index, x_weight in x_corners:
            # [B, R, PS, 1] with [B, R, 1, PS] -> [B, R, PS (y), PS (x)].
            index = base + y_index[..., :, None] * row_stride + x_index[..., None, :]
            weight = y_weight[..., :, None] * x_weight[..., None, :]
            values = tf.gather(flat_features, tf.reshape(index, [batch, -1]), batch_dims=1)
            # The gather is exact in any dtype; only the weighting needs float32.
            values = tf.reshape(tf.cast(values, tf.float32), [batch, num_boxes, grid, grid, -1])
            samples += weight[..., None] * values
    # The S x S samples of a bin, averaged: an average pooling of the [PS, PS] sample grid
    # (faster than a mean over the non-adjacent axes of [B, R, P, S, P, S, C], forward and
    # backward).
    pooled = tf.nn.avg_pool2d(tf.reshape(samples, [-1, grid, grid, channels]), sampling_ratio,
                              sampling_ratio, "VALID")
    pooled = tf.reshape(pooled, [batch, num_boxes, output_size, output_size, channels])
    return tf.cast(pooled, flat_features.dtype)


def _sample_coordinates(start, end, output_size, sampling_ratio):
    """Sample positions along one axis, in feature cells.

    Args:
      start, end: [B, R] float32 ROI corners already multiplied by the spatial scale.
    Returns:
      [B, R, P * S] float32; entry p * S + k is sample k of bin p.
    """
    roi_size = tf.maximum(end - start, 1.0)
    bin_size = roi_size / output_size
    grid = tf.range(output_size * sampling_ratio)
    bin_index = tf.cast(grid // sampling_ratio, tf.float32)
    sample_index = tf.cast(grid % sampling_ratio, tf.float32)
    # Same operation order as the kernel (start + p * bin + (k + .5) * bin / S), so float32
    # rounding matches it as closely as possible.
    bin_size = bin_size[..., None]
    return (start[..., None] + bin_index * bin_size
            + (sample_index + 0.5) * bin_size / sampling_ratio)


def _linear_neighbours(coords, size):
    """The kernel's 1-D interpolation rule: the two neighbours of each sample and their weights.

    Args:
      coords: [B, R, G] float32 sample positions in feature cells.
      size: [B, R, 1] float32 map size along this axis.
    Returns:
      ((low_index, low_weight), (high_index, high_weight)), indices [B, R, G] int32 inside
      [0, size - 1], weights [B, R, G] float32, both weights 0 for samples off the map.
    """
    inside = tf.logical_and(coords >= -OUT_OF_MAP_MARGIN, coords <= size)
    coords = tf.maximum(coords, 0.0)
    low = tf.floor(coords)
    # At or past the last cell the kernel snaps the sample onto it: both neighbours are that cell.
    at_edge = low >= size - 1.0
    low = tf.where(at_edge, size - 1.0, low)
    high = tf.where(at_edge, low, low + 1.0)
    coords = tf.where(at_edge, low, coords)
    high_weight = tf.where(inside, coords - low, 0.0)
    low_weight = tf.where(inside, 1.0 - (coords - low), 0.0)
    return ((tf.cast(low, tf.int32), low_weight), (tf.cast(high, tf.int32), high_weight))
