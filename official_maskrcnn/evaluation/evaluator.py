"""Distributed inference over the eval set, gathered on the host, then COCO metrics.

`Evaluator.predict()` runs the model's inference call on every replica (one compiled function per
padded orientation, like training), gathers every replica's outputs with `strategy.gather`
(all workers receive everything), drops the padding entries (`is_valid` False) and checks that
every record was seen exactly once. `PostProcessor` turns those outputs into COCO results (box
conversion, mask pasting, RLE; in worker processes) and runs COCOeval (in category shards over
those processes), either at once or in the background (`submit` returns a future).
"""

import concurrent.futures
import contextlib
import gc
import time

import numpy as np
import tensorflow as tf
from absl import logging

from official_maskrcnn.evaluation import coco_metrics, coco_results

DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "detection_masks",
                  "num_detections")
INPUT_KEYS = ("source_id", "original_size", "scale", "is_valid")


class EvaluationError(RuntimeError):
    """The eval outputs do not cover every image exactly once."""


class Evaluator:
    """Runs inference on the eval dataset of `builder` under `strategy`.

    Args:
      strategy: the run's strategy (the model was built in its scope).
      model: a `MaskRCNNModel`.
      builder: an eval `DatasetBuilder` (is_training=False).
    """

    def __init__(self, strategy, model, builder):
        self.strategy = strategy
        self.model = model
        self.builder = builder
        replicas = strategy.num_replicas_in_sync
        if builder.global_batch_size % replicas:
            raise ValueError(f"eval global_batch_size={builder.global_batch_size} is not a "
                             f"multiple of the {replicas} replicas")
        self.batch_size = builder.global_batch_size // replicas
        self._predict_fn = tf.function(self._replica_predict, jit_compile=False)
        self._dataset = builder.distribute(strategy)

    @property
    def num_images(self):
        return self.builder.num_records

    def _replica_predict(self, inputs):
        """One replica's batch -> detections + the inputs' bookkeeping fields.

        Called eagerly per batch with concrete tensors, so the tf.function traces (and compiles)
        once per padded shape, like the training step.
        """
        outputs = self.model({"images": inputs["images"], "image_size": inputs["image_size"]},
                             training=False)
        outputs = {key: outputs[key] for key in DETECTION_KEYS}
        outputs.update({key: inputs[key] for key in INPUT_KEYS})
        # Collective all-gather (several workers) has no bool kernel.
        outputs["is_valid"] = tf.cast(outputs["is_valid"], tf.int32)
        return outputs

    def predict(self):
        """Every eval image's detections, gathered on the host.

        Returns:
          dict of numpy arrays over the N valid images (order: batches as they came): the
          model's detection outputs and source_id [N], original_size [N, 2], scale [N, 2].
        Raises:
          EvaluationError: an image is missing or seen twice.
        """
        start = time.perf_counter()
        chunks = []
        for batch in self._dataset:
            outputs = self.strategy.run(self._predict_fn, args=(batch,))
            chunks.append({key: self.strategy.gather(value, axis=0).numpy()
                           for key, value in outputs.items()})
        outputs = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
        valid = outputs.pop("is_valid").astype(bool)
        outputs = {key: value[valid] for key, value in outputs.items()}
        ids = outputs["source_id"]
        unique, counts = np.unique(ids, return_counts=True)
        if len(ids) != self.num_images or (counts > 1).any():
            raise EvaluationError(
                f"eval saw {len(ids)} image(s) ({len(unique)} distinct) for {self.num_images} "
                f"records; duplicated ids: {unique[counts > 1][:10].tolist()}")
        logging.info("inference on %d images in %.1f s", len(ids), time.perf_counter() - start)
        return outputs


@contextlib.contextmanager
def cyclic_gc_paused():
    """Pauses Python's cyclic garbage collector (reference counting goes on). The results of an
    evaluation are ~10^5 new containers, enough to trigger full collections, and in a process
    holding TensorFlow each walks its ~4 x 10^5 objects: 0.1-0.2 s per collection, seen adding
    ~1 ms per image to the post-processing. The results hold no reference cycles; other
    threads' collections (the training loop's, in asynchronous mode) wait until the end."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _score(converter, columns, annotations_file, image_ids, backend):
    """COCO metrics of `columns` (`coco_results.ResultColumns`). With worker processes,
    COCOeval runs in the workers in category shards of similar work
    (`coco_metrics.category_shards`), joined by `coco_metrics.summarize`: the same stats as one
    COCOeval, bit for bit. This process only splits the columns and joins the shards' arrays
    (its heap, with TensorFlow's objects, is the slowest place for COCOeval's many small Python
    objects; the result dicts are built in the workers)."""
    if converter.num_processes <= 1 or not len(columns):
        return coco_metrics.evaluate(annotations_file, columns.to_dicts(), image_ids=image_ids,
                                     backend=backend, mask_geometry=columns.mask_geometry())
    ground_truth = coco_metrics.load_ground_truth(annotations_file, backend)
    shards = coco_metrics.category_shards(ground_truth, columns.category_ids.tolist(),
                                          converter.num_processes)
    # Every result's category is in a shard, one the ground truth lacks too: that shard's
    # check names it.
    payloads = [(columns.take(np.flatnonzero(np.isin(columns.category_ids, shard))), shard)
                for shard in shards]
    return coco_metrics.summarize(
        converter.map_shared(coco_results.accumulate_shard, payloads, annotations_file,
                             image_ids, coco_metrics.IOU_TYPES, backend),
        coco_metrics.IOU_TYPES, backend)


def _postprocess(converter, outputs, label_to_category, annotations_file, image_ids, backend):
    """Outputs -> COCO results as columns (pasting masks in the converter's processes, images
    split between them) -> metrics (`_score`)."""
    start = time.perf_counter()
    with cyclic_gc_paused():
        columns = converter.convert_columns(outputs, label_to_category)
        convert_seconds = time.perf_counter() - start
        metrics = _score(converter, columns, annotations_file, image_ids, backend)
    metrics["seconds"] = {"convert": convert_seconds, "total": time.perf_counter() - start}
    metrics["coco_backend"] = backend
    metrics["num_images"] = len(image_ids)  # COCOeval's imgIds: the images the outputs hold
    return metrics, columns


class PostProcessor:
    """COCO results and metrics from gathered outputs, now or in the background.

    The background work runs in one thread of this process. With `num_processes` >= 2, worker
    processes that live as long as this object paste masks and encode RLE (images split between
    them), then run COCOeval in category shards (`_score`); this process splits and joins.

    Args:
      annotations_file: the COCO annotation JSON of the eval split (its categories give the
        label map, as the converter built it).
      num_processes: processes pasting masks, encoding RLE and scoring (1: all in this
        process).
      backend: the COCOeval implementation, one of `coco_metrics.BACKENDS`.
    """

    def __init__(self, annotations_file, num_processes=1, backend="pycocotools"):
        coco_metrics.check_backend(backend)
        self.annotations_file = annotations_file
        self.backend = backend
        ground_truth = coco_metrics.load_ground_truth(annotations_file, backend)
        categories = ground_truth.loadCats(ground_truth.getCatIds())
        self.label_to_category = coco_results.label_to_category_id(categories)
        self.class_names = coco_results.label_to_name(categories)  # for pictures
        self._converter = coco_results.ResultConverter(num_processes)
        self._background = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def submit(self, outputs):
        """Starts post-processing `outputs` (see `Evaluator.predict`); returns a future of
        (metrics, results as `coco_results.ResultColumns`; `.to_dicts()` for the list)."""
        image_ids = sorted(int(i) for i in outputs["source_id"])
        return self._background.submit(_postprocess, self._converter, outputs,
                                       self.label_to_category, self.annotations_file, image_ids,
                                       self.backend)

    def run(self, outputs):
        """Post-processes now: (metrics, `coco_results.ResultColumns`)."""
        return self.submit(outputs).result()

    def close(self):
        self._background.shutdown(wait=True)
        self._converter.close()
