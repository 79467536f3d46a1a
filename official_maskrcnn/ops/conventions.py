"""Pixel conventions shared by the TF ops and the numpy evaluation (no TensorFlow imported here:
the evaluation's worker processes import it)."""

# maskrcnn-benchmark's TO_REMOVE: box corners are inclusive pixel indices, so a box [x0, x1]
# covers x1 - x0 + 1 pixels (widths, areas, IoU, clipping to w - 1, the result boxes' w).
TO_REMOVE = 1
