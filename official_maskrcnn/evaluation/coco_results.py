"""Model detections -> COCO result entries (box, score, category id, RLE mask), as the reference.

Shape shorthand: N images, T detection slots per image, M mask side (28), H x W the original image.
Labels are contiguous 1..K-1 inside the model (0 = background / padding slot); COCO category ids
are the JSON's (non-contiguous: 1..90 for COCO). No TensorFlow here: this module runs in the
worker processes of `ResultConverter`, which must start fast and stay small.

Reference semantics (MLPerf maskrcnn-benchmark, `coco_eval.prepare_for_coco_*` and
`mask_head/inference.py`):
  - boxes are rescaled from the network input to the original image by original / resized per
    axis (`BoxList.resize`), then written as [x, y, w, h] with the legacy "+1" width
    (w = x2 - x1 + 1, h = y2 - y1 + 1);
  - masks are pasted into the original image and thresholded at 0.5 (`mask_pasting`).
"""

import concurrent.futures
import contextlib
import multiprocessing
import pickle
import sys
import threading
import time
import types

import numpy as np
from absl import logging

from official_maskrcnn.evaluation import coco_metrics, shared_arrays
from official_maskrcnn.evaluation.mask_pasting import (  # noqa: F401 (re-exported)
    MASK_PADDING,
    encode_masks,
    expanded_int_boxes,
    paste_masks,
    pasted_rles,
    pasted_rles_with_geometry,
)
from official_maskrcnn.ops.conventions import TO_REMOVE
from tfrecord_tools import coco_index

BACKGROUND_LABEL = 0  # detection_classes value of padding / invalid slots


def label_to_category_id(categories):
    """Contiguous model label -> COCO category id, as `tfrecord_tools` assigned them.

    Args:
      categories: the `categories` list of the COCO JSON (dicts with 'id' and 'name').
    Returns:
      dict {label (1..K): category id}.
    """
    entries = coco_index.build_label_map(categories, "categories")
    return {entry.label: entry.coco_id for entry in entries}


def label_to_name(categories):
    """Contiguous model label -> category name (`label_to_category_id`'s labels).

    Args:
      categories: the `categories` list of the COCO JSON (dicts with 'id' and 'name').
    Returns:
      dict {label (1..K): name}.
    """
    return {entry.label: entry.name
            for entry in coco_index.build_label_map(categories, "categories")}


def original_boxes_xyxy(boxes_yxyx, scale):
    """Detection boxes of the network input -> [x1, y1, x2, y2] pixels of the original image.

    Args:
      boxes_yxyx: [N, 4] [ymin, xmin, ymax, xmax] pixels of the resized image.
      scale: [2] (h / H, w / W), resized over original size (the eval parser's `scale`).
    Returns:
      [N, 4] float32 (the reference multiplies by original / resized, i.e. divides by scale).
    """
    scale_y, scale_x = (float(s) for s in scale)
    boxes_yxyx = np.asarray(boxes_yxyx, np.float32)
    return boxes_yxyx[:, [1, 0, 3, 2]] / np.array([scale_x, scale_y, scale_x, scale_y],
                                                  np.float32)


def coco_boxes(boxes_xyxy):
    """[T, 4] float32 [x1, y1, x2, y2] inclusive original pixels -> [T, 4] float32 COCO
    [x, y, w, h] with the reference's w = x2 - x1 + 1 (`TO_REMOVE`)."""
    boxes_xyxy = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    return np.concatenate(
        [boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2] + TO_REMOVE], axis=1)


class ResultColumns:
    """COCO results held as columns, in result order: what crosses between processes (a few
    arrays and one list of strings pickle and load several times faster than as many dicts)
    and what the post-processor returns. `to_dicts()` gives the `COCO.loadRes` list.

    Attributes (n results):
      image_ids: [n] int64 COCO image ids.
      category_ids: [n] int64 COCO category ids.
      boxes: [n, 4] float32 COCO [x, y, w, h] in original pixels.
      scores: [n] float32.
      mask_sizes: [n, 2] int64 (H, W) of each mask's image, or None (results without masks).
      mask_counts: list of n compressed RLE 'counts' strings, or None (without masks).
      mask_areas: [n] int64 pixels of each mask, or None (not known: computed from the RLE
        when needed).
      mask_bboxes: [n, 4] float64 [x, y, w, h] of each mask's pixels (zeros: empty mask), or
        None with mask_areas. The paster knows both (`mask_pasting.pasted_masks`): the segm
        scoring takes them instead of decoding every RLE again
        (`coco_metrics.accumulate(mask_geometry=...)`).
    """

    def __init__(self, image_ids, category_ids, boxes, scores, mask_sizes=None,
                 mask_counts=None, mask_areas=None, mask_bboxes=None):
        self.image_ids = np.asarray(image_ids, np.int64).reshape(-1)
        self.category_ids = np.asarray(category_ids, np.int64).reshape(-1)
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(scores, np.float32).reshape(-1)
        if (mask_sizes is None) != (mask_counts is None):
            raise ValueError("mask_sizes and mask_counts go together (both or neither)")
        if (mask_areas is None) != (mask_bboxes is None):
            raise ValueError("mask_areas and mask_bboxes go together (both or neither)")
        if mask_areas is not None and mask_counts is None:
            raise ValueError("mask_areas and mask_bboxes need the masks (mask_counts)")
        self.mask_sizes = (None if mask_sizes is None else
                           np.asarray(mask_sizes, np.int64).reshape(-1, 2))
        self.mask_counts = None if mask_counts is None else list(mask_counts)
        self.mask_areas = (None if mask_areas is None else
                           np.asarray(mask_areas, np.int64).reshape(-1))
        self.mask_bboxes = (None if mask_bboxes is None else
                            np.asarray(mask_bboxes, np.float64).reshape(-1, 4))
        lengths = {len(self.image_ids), len(self.category_ids), len(self.boxes),
                   len(self.scores)}
        if self.has_masks:
            lengths |= {len(self.mask_sizes), len(self.mask_counts)}
        if self.has_mask_geometry:
            lengths |= {len(self.mask_areas), len(self.mask_bboxes)}
        if len(lengths) != 1:
            raise ValueError(f"result columns of different lengths: {sorted(lengths)}")

    @classmethod
    def empty(cls, include_masks=True):
        masks = ((np.zeros([0, 2], np.int64), [], np.zeros([0], np.int64),
                  np.zeros([0, 4], np.float64)) if include_masks else ())
        return cls(np.zeros([0], np.int64), np.zeros([0], np.int64), np.zeros([0, 4], np.float32),
                   np.zeros([0], np.float32), *masks)

    @property
    def has_masks(self):
        return self.mask_counts is not None

    @property
    def has_mask_geometry(self):
        return self.mask_areas is not None

    def __len__(self):
        return len(self.image_ids)

    @classmethod
    def concatenate(cls, parts, include_masks=True):
        """The results of `parts` one after the other (no parts: empty, with masks or not). The
        mask geometry is kept when every part has it."""
        parts = list(parts)
        if not parts:
            return cls.empty(include_masks)
        with_masks = {part.has_masks for part in parts}
        if len(with_masks) != 1:
            raise ValueError("cannot join result columns with and without masks")
        masks = ()
        if parts[0].has_masks:
            masks = (np.concatenate([part.mask_sizes for part in parts]),
                     [counts for part in parts for counts in part.mask_counts])
            if all(part.has_mask_geometry for part in parts):
                masks += (np.concatenate([part.mask_areas for part in parts]),
                          np.concatenate([part.mask_bboxes for part in parts]))
        return cls(np.concatenate([part.image_ids for part in parts]),
                   np.concatenate([part.category_ids for part in parts]),
                   np.concatenate([part.boxes for part in parts]),
                   np.concatenate([part.scores for part in parts]), *masks)

    def take(self, positions):
        """The results at `positions` (int array), in that order."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        masks = ()
        if self.has_masks:
            masks = (self.mask_sizes[positions],
                     [self.mask_counts[i] for i in positions.tolist()])
            if self.has_mask_geometry:
                masks += (self.mask_areas[positions], self.mask_bboxes[positions])
        return type(self)(self.image_ids[positions], self.category_ids[positions],
                          self.boxes[positions], self.scores[positions], *masks)

    def mask_geometry(self):
        """[(area, [x, y, w, h])] of the masks (`coco_metrics.accumulate`'s mask_geometry:
        Python ints and floats, as pycocotools' `area` and `toBbox` give them), or None."""
        if not self.has_mask_geometry:
            return None
        return list(zip(self.mask_areas.tolist(), self.mask_bboxes.tolist()))

    def to_dicts(self):
        """[{image_id, category_id, bbox [x, y, w, h], score[, segmentation {size: [H, W],
        counts: str}]}]: Python ints and floats (the float32 values exactly), JSON-ready."""
        results = [{"image_id": image_id, "category_id": category_id, "bbox": box,
                    "score": score}
                   for image_id, category_id, box, score in zip(
                       self.image_ids.tolist(), self.category_ids.tolist(),
                       self.boxes.tolist(), self.scores.tolist())]
        if self.has_masks:
            for result, size, counts in zip(results, self.mask_sizes.tolist(),
                                            self.mask_counts):
                result["segmentation"] = {"size": size, "counts": counts}
        return results


def _image_columns(outputs, index, label_to_category, mask_threshold, include_masks):
    """ResultColumns of image `index` of the batched outputs (None: no result)."""
    if "is_valid" in outputs and not bool(outputs["is_valid"][index]):
        return None
    classes = np.asarray(outputs["detection_classes"][index]).astype(np.int64)
    num = min(int(outputs["num_detections"][index]), classes.shape[0])
    keep = np.flatnonzero(classes[:num] != BACKGROUND_LABEL)
    if keep.size == 0:
        return None
    image_id = int(outputs["source_id"][index])
    unknown = sorted(set(classes[keep].tolist()) - set(label_to_category))
    if unknown:
        raise ValueError(f"image {image_id}: detection_classes {unknown[:10]} have no COCO "
                         f"category (the label map has labels 1..{max(label_to_category)})")
    boxes_xyxy = original_boxes_xyxy(outputs["detection_boxes"][index][keep],
                                     outputs["scale"][index])
    masks = ()
    if include_masks:
        height, width = (int(v) for v in outputs["original_size"][index])
        counts, areas, bboxes = zip(*pasted_rles_with_geometry(
            outputs["detection_masks"][index][keep], boxes_xyxy, height, width,
            mask_threshold))
        masks = (np.tile(np.array([height, width], np.int64), (keep.size, 1)), counts, areas,
                 bboxes)
    return ResultColumns(np.full(keep.size, image_id, np.int64),
                         [label_to_category[label] for label in classes[keep].tolist()],
                         coco_boxes(boxes_xyxy), outputs["detection_scores"][index][keep],
                         *masks)


def detections_to_columns(outputs, label_to_category, mask_threshold=0.5, include_masks=True):
    """`detections_to_coco`'s results as `ResultColumns` (same arguments, same order)."""
    # No BLAS and no threads here (the paster is single-threaded C): a core kept busy by
    # training cannot stall it beyond its own share (BLAS threads once made it 60x slower).
    parts = [_image_columns(outputs, index, label_to_category, mask_threshold, include_masks)
             for index in range(len(outputs["source_id"]))]
    return ResultColumns.concatenate([part for part in parts if part is not None],
                                     include_masks)


def detections_to_coco(outputs, label_to_category, mask_threshold=0.5, include_masks=True):
    """Batched model outputs -> COCO result dicts (the list `COCO.loadRes` takes).

    Args:
      outputs: dict of numpy arrays over N images:
        source_id [N] int (COCO image id); original_size [N, 2] (H, W); scale [N, 2]
        (resized / original for y and x); is_valid [N] bool (optional, False: padding entry,
        skipped); num_detections [N]; detection_boxes [N, T, 4] [ymin, xmin, ymax, xmax] in
        pixels of the resized image ("+1" convention); detection_scores [N, T];
        detection_classes [N, T] contiguous labels (0: invalid slot, skipped);
        detection_masks [N, T, M, M] probabilities (only read with include_masks).
        Rows at or beyond num_detections are skipped.
      label_to_category: {label: COCO category id}, see `label_to_category_id`.
      mask_threshold: the pasting threshold (reference 0.5).
      include_masks: add 'segmentation' (RLE, 'counts' as str).
    Returns:
      list of dicts {image_id, category_id, bbox [x, y, w, h] in original pixels, score[,
      segmentation]}, images in input order, detections in slot order.
    Raises:
      ValueError: a valid detection's label has no COCO category.
    """
    return detections_to_columns(outputs, label_to_category, mask_threshold,
                                 include_masks).to_dicts()


def accumulate_columns(annotations_file, columns, image_ids, category_ids, iou_types, backend):
    """`coco_metrics.accumulate` of results given as `ResultColumns` (a worker's part of the
    scoring: the dicts are built here, not in the process that sent the columns)."""
    return coco_metrics.accumulate(annotations_file, columns.to_dicts(), image_ids,
                                   category_ids, iou_types, backend, columns.mask_geometry())


def accumulate_shard(shard, annotations_file, image_ids, iou_types, backend):
    """`accumulate_columns` of shard = (ResultColumns, category ids): a scoring worker's task
    (`ResultConverter.map_shared`)."""
    columns, category_ids = shard
    return accumulate_columns(annotations_file, columns, image_ids, category_ids, iou_types,
                              backend)


def _call_with_shared_payload(fn, payload_ref, *args):
    """In a worker: fn(payload, *args), the payload unpickled from shared memory."""
    return fn(pickle.loads(shared_arrays.read(payload_ref)), *args)


def _chunk_bounds(num_images, num_chunks):
    """Up to num_chunks (start, stop) ranges of consecutive images, in order, none empty."""
    bounds = np.linspace(0, num_images, num_chunks + 1).round().astype(int).tolist()
    return [(start, stop) for start, stop in zip(bounds[:-1], bounds[1:]) if stop > start]


def _shared_masks_chunk_columns(masks_ref, start, stop, chunk, label_to_category,
                                mask_threshold):
    """A worker's `detections_to_columns` of `chunk` (the outputs of images start..stop without
    their masks), reading the masks [N, T, M, M] of all images from shared memory in place."""
    chunk = dict(chunk, detection_masks=shared_arrays.read(masks_ref)[start:stop])
    return detections_to_columns(chunk, label_to_category, mask_threshold, include_masks=True)


@contextlib.contextmanager
def _main_module_hidden():
    """Within the context, processes started with 'spawn' do not import the parent's main
    module: spawn re-imports it in every child, and for `python -m official_maskrcnn.train` that
    means TensorFlow in each worker (seconds to start, hundreds of MB, and a garbage collector
    walking TensorFlow's objects during every evaluation). An empty module stands in for it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class ResultConverter:
    """`detections_to_coco` over a pool of worker processes that lives across calls.

    Processes are started with the 'spawn' method (safe next to TensorFlow's threads) and import
    only this module (numpy, pycocotools), so they start in about a second, once. The mask
    probabilities reach them through a shared memory block (`shared_arrays`, reused across
    calls, as large as the largest call's masks) when /dev/shm has room, else pickled with
    their chunks. One call at a time (others wait). Use as a context manager or call `close()`.

    Args:
      num_processes: worker processes; <= 1 converts in the calling process.
      chunks_per_process: images are cut into num_processes * chunks_per_process consecutive
        chunks, for load balance (detections per image vary).
    """

    def __init__(self, num_processes, chunks_per_process=4):
        self.num_processes = int(num_processes)
        self.chunks_per_process = int(chunks_per_process)
        self._executor = None
        self._shared_masks = shared_arrays.SharedBuffer()
        self._shared_payloads = shared_arrays.SharedBuffer()
        self._warned_without_shared_memory = False
        self._lock = threading.Lock()
        if self.num_processes > 1:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.num_processes, mp_context=multiprocessing.get_context("spawn"))
            with _main_module_hidden():
                # Start every worker now (the executor starts them on demand, one per busy
                # submit): tasks that all wait for the last one to be submitted.
                started = [self._executor.submit(time.sleep, 0.05)
                           for _ in range(self.num_processes)]
            for future in started:
                future.result()

    def convert(self, outputs, label_to_category, mask_threshold=0.5, include_masks=True):
        """Same arguments and result (same order) as `detections_to_coco`."""
        return self.convert_columns(outputs, label_to_category, mask_threshold,
                                    include_masks).to_dicts()

    def convert_columns(self, outputs, label_to_category, mask_threshold=0.5,
                        include_masks=True):
        """Same arguments and results (same order) as `detections_to_columns`."""
        if self._executor is None:
            return detections_to_columns(outputs, label_to_category, mask_threshold,
                                         include_masks)
        bounds = _chunk_bounds(len(outputs["source_id"]),
                               self.num_processes * self.chunks_per_process)
        with self._lock:  # the shared block holds one call's masks
            masks_ref = None
            if include_masks:
                masks_ref = self._shared_masks.put(outputs["detection_masks"])
                self._warn_once_without_shared_memory(masks_ref, outputs["detection_masks"])
            if masks_ref is None:  # the masks, if any, are pickled with their chunks
                tasks = [(detections_to_columns,
                          {key: value[start:stop] for key, value in outputs.items()},
                          label_to_category, mask_threshold, include_masks)
                         for start, stop in bounds]
            else:
                tasks = [(_shared_masks_chunk_columns, masks_ref, start, stop,
                          {key: value[start:stop] for key, value in outputs.items()
                           if key != "detection_masks"}, label_to_category, mask_threshold)
                         for start, stop in bounds]
            # Task order = image order.
            return ResultColumns.concatenate(self._run_all(tasks), include_masks)

    def map_shared(self, fn, payloads, *args):
        """[fn(payload, *args) for payload in payloads], run in the workers. The payloads go
        pickled into a shared memory block (reused across calls) instead of through the pool's
        pipe, a few ms per MB that the workers would wait (with their tasks when /dev/shm lacks
        room). One call at a time (others wait)."""
        if self._executor is None:
            raise ValueError("no worker processes (num_processes <= 1)")
        blobs = [np.frombuffer(pickle.dumps(payload, pickle.HIGHEST_PROTOCOL), np.uint8)
                 for payload in payloads]
        with self._lock:  # the payload block holds one call's payloads
            refs = self._shared_payloads.put_all(blobs)
            self._warn_once_without_shared_memory(refs, *blobs)
            if refs is None:
                return self._run_all([(fn, payload, *args) for payload in payloads])
            return self._run_all([(_call_with_shared_payload, fn, ref, *args) for ref in refs])

    def _run_all(self, tasks):
        """The results of tasks (fn, *args) run in the workers, in task order. Returns (or
        raises the first task's error) only once every task has ended: none reads a shared
        block after the caller releases it."""
        futures = [self._executor.submit(*task) for task in tasks]
        try:
            return [future.result() for future in futures]
        finally:
            concurrent.futures.wait(futures)

    def _warn_once_without_shared_memory(self, refs, *arrays):
        if refs is None and not self._warned_without_shared_memory:
            self._warned_without_shared_memory = True
            logging.warning(
                "evaluation: no room in shared memory (/dev/shm) for %.1f MB: the workers get "
                "their data through pipes instead (same results, slower; in Docker, give the "
                "container --shm-size=4g)", sum(array.nbytes for array in arrays) / 2**20)

    def submit(self, fn, *args):
        """Runs fn(*args) in a worker; returns a future."""
        if self._executor is None:
            raise ValueError("no worker processes (num_processes <= 1)")
        return self._executor.submit(fn, *args)

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._shared_masks.close()
        self._shared_payloads.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def convert_in_processes(outputs, label_to_category, num_processes, mask_threshold=0.5,
                         include_masks=True):
    """`detections_to_coco` split over `num_processes` fresh processes (<= 1: in this process);
    results in the serial order. Starts and stops its pool: for repeated calls keep a
    `ResultConverter` instead."""
    with ResultConverter(num_processes) as converter:
        return converter.convert(outputs, label_to_category, mask_threshold, include_masks)
