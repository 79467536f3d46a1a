"""The input pipeline: files -> records -> parsed, filtered, resized batches, one per replica.

The only gin-configurable part of `data/`. Use it through
`strategy.distribute_datasets_from_function(builder)`: it is called once per input pipeline with
a `tf.distribute.InputContext` and returns that pipeline's dataset, batched at the per-replica
batch size.

Sharding: by file when there are at least as many files as input pipelines (each pipeline
reads only its files), by record otherwise (each reads every file and keeps every P-th record).
Evaluation always shards by record, so that its per-pipeline counts are known exactly.

Static shapes: images are padded to one of two shapes, landscape (Hp, Wp) and portrait (Wp, Hp)
(`preprocess_ops.padded_image_size`), and batches are grouped by orientation, the reference's
aspect grouping; the train step therefore compiles once per orientation.

Bad input fails here, at startup: a pattern that matches no file, a file that is not a TFRecord,
records without masks when masks are needed -> `InputError` naming the file.
"""

import math

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from official_maskrcnn.data import decoder, parsers
from official_maskrcnn.data import preprocess_ops as ops

AUTOTUNE = tf.data.AUTOTUNE


class InputError(ValueError):
    """The input files cannot feed the pipeline; the message names the file and the problem."""


def resolve_files(file_pattern):
    """Sorted files matching a glob (or comma-separated globs); InputError if none."""
    files = sorted({path for pattern in file_pattern.split(",")
                    for path in tf.io.gfile.glob(pattern.strip())})
    if not files:
        raise InputError(f"file pattern {file_pattern!r} matches no file")
    return files


def check_files(files, include_masks):
    """Reads the first record of every file: each must be a TFRecord of our layout."""
    required = ["image/encoded", "image/height", "image/width", "image/object/bbox/ymin",
                "image/object/class/label", "image/object/is_crowd"]
    if include_masks:
        required.append(decoder.MASK_KEY)
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise InputError(f"{path}: not a TFRecord file ({e.message.splitlines()[0]})") from e
        if not first:
            continue  # an empty shard is valid (e.g. more shards than images)
        try:
            example = tf.train.Example.FromString(first[0])
        except Exception as e:  # protobuf's DecodeError
            raise InputError(f"{path}: its first record is not a tf.train.Example: {e}") from e
        missing = [key for key in required if key not in example.features.feature]
        if missing:
            hint = (" (convert with masks: python -m tfrecord_tools.create_coco_tfrecord)"
                    if decoder.MASK_KEY in missing else "")
            raise InputError(f"{path}: records lack the feature(s) {missing}{hint}")


def scan_records(files, legacy_plus_one=True):
    """One pass over the small features of every record, in `records_dataset` order.

    Returns:
      dict of [num_records] numpy arrays: portrait (bool), trainable (bool: keeps >= 1 instance
      for training), num_trainable (int: instances training keeps).
    """
    def small(serialized):
        parsed = decoder.parse_example(serialized, include_masks=False)
        keep = parsers.trainable_instances(parsed, legacy_plus_one)
        return parsers.is_portrait(parsed), tf.reduce_sum(tf.cast(keep, tf.int32))

    portrait, counts = [], []
    for p, n in records_dataset(files).map(small, num_parallel_calls=AUTOTUNE).batch(1024):
        portrait.append(p.numpy())
        counts.append(n.numpy())
    num_trainable = np.concatenate(counts) if counts else np.zeros([0], np.int32)
    return {"portrait": np.concatenate(portrait) if portrait else np.zeros([0], bool),
            "trainable": num_trainable > 0, "num_trainable": num_trainable}


def records_dataset(files):
    """All records of `files` in a fixed order (files in order, records in order)."""
    return tf.data.TFRecordDataset(files)


def pad_batch(batch, batch_size):
    """Pads every tensor of a partial eval batch to `batch_size` with zeros (is_valid False)."""
    def pad(tensor):
        missing = batch_size - tf.shape(tensor)[0]
        filler = tf.zeros(tf.concat([[missing], tf.shape(tensor)[1:]], 0), tensor.dtype)
        return tf.concat([tensor, filler], 0)

    return {key: pad(value) for key, value in batch.items()}


@gin.configurable
class DatasetBuilder:
    """Builds the train or eval dataset of one input pipeline (see the module docstring).

    Args:
      file_pattern: glob(s) of the TFRecord shards (comma-separated for several).
      is_training: train (shuffle, filter, flip, ground truth) or eval (every image once).
      global_batch_size: images per step over all replicas.
      min_size, max_size: the reference resize (shorter side, cap on the longer side).
      size_divisibility: padded sides are multiples of this.
      pixel_mode: "bgr_caffe" (Detectron R-50.pkl, the reference) or "rgb_imagenet".
      flip_probability: horizontal flip probability in training.
      max_instances: ground truth is padded (or truncated) to this many instances.
      mask_size: side M of the box-aligned mask crops.
      include_masks: parse masks (training).
      legacy_plus_one: the reference's inclusive box corners (see preprocess_ops).
      shuffle_buffer: records in the shuffle buffer (training).
      seed: seeds file order, record shuffle and flips; None draws one at random (logged).
      deterministic: keep element order fixed under parallelism (tf.data's `deterministic`).
      cache: cache the raw records in memory after the first pass (small datasets).
      repeat: repeat the training data forever (epochs are then counted by the caller).
      cycle_length: files read in parallel (training).
    """

    def __init__(self, file_pattern, is_training, global_batch_size, min_size=800,
                 max_size=1333, size_divisibility=32, pixel_mode="bgr_caffe",
                 flip_probability=0.5, max_instances=100, mask_size=112, include_masks=True,
                 legacy_plus_one=True, shuffle_buffer=1024, seed=None, deterministic=True,
                 cache=False, repeat=True, cycle_length=8):
        self.files = resolve_files(file_pattern)
        self.is_training = is_training
        self.global_batch_size = global_batch_size
        self.include_masks = include_masks and is_training
        self.legacy_plus_one = legacy_plus_one
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else seed
        self.deterministic = deterministic
        self.cache = cache
        self.repeat = repeat
        self.cycle_length = cycle_length
        if is_training:
            self.parser = parsers.TrainParser(
                min_size, max_size, size_divisibility, flip_probability, pixel_mode,
                max_instances, mask_size, self.include_masks, legacy_plus_one)
        else:
            self.parser = parsers.EvalParser(min_size, max_size, size_divisibility, pixel_mode)
        check_files(self.files, self.include_masks)
        self.scan = scan_records(self.files, legacy_plus_one)
        self._log_summary(max_instances)

    @property
    def num_records(self):
        return len(self.scan["portrait"])

    @property
    def num_train_images(self):
        """Images training uses: records with >= 1 instance left after dropping crowds."""
        return int(self.scan["trainable"].sum())

    def _log_summary(self, max_instances):
        message = (f"input: {len(self.files)} file(s), {self.num_records} records, "
                   f"seed {self.seed}")
        if self.is_training:
            dropped = self.num_records - self.num_train_images
            truncated = int((self.scan["num_trainable"] > max_instances).sum())
            message += (f"; training uses {self.num_train_images} images ({dropped} dropped: no "
                        f"annotation left after removing crowd and empty boxes)")
            if truncated:
                message += (f"; WARNING {truncated} image(s) have more than max_instances="
                            f"{max_instances} instances and are truncated")
        logging.info(message)
        self.summary = message

    def options(self):
        options = tf.data.Options()
        options.deterministic = self.deterministic
        options.autotune.enabled = True
        options.experimental_optimization.map_parallelization = True
        options.experimental_optimization.parallel_batch = True
        options.experimental_slack = True
        return options

    def __call__(self, input_context=None):
        """The dataset of the pipeline `input_context` describes (the only one without)."""
        num_pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        batch_size = (input_context.get_per_replica_batch_size(self.global_batch_size)
                      if input_context else self.global_batch_size)
        if self.is_training:
            dataset = self._train_dataset(num_pipelines, pipeline_id, batch_size)
        else:
            replicas_per_pipeline = (input_context.num_replicas_in_sync // num_pipelines
                                     if input_context else 1)
            dataset = self._eval_dataset(num_pipelines, pipeline_id, batch_size,
                                         replicas_per_pipeline)
        return dataset.with_options(self.options())

    def distribute(self, strategy):
        """The distributed dataset for `strategy`."""
        return strategy.distribute_datasets_from_function(self)

    def _train_dataset(self, num_pipelines, pipeline_id, batch_size):
        files = tf.data.Dataset.from_tensor_slices(self.files)
        by_file = len(self.files) >= num_pipelines
        if by_file:
            files = files.shard(num_pipelines, pipeline_id)
        files = files.shuffle(len(self.files), seed=self.seed, reshuffle_each_iteration=True)
        records = files.interleave(
            tf.data.TFRecordDataset, cycle_length=min(self.cycle_length, len(self.files)),
            block_length=1, num_parallel_calls=AUTOTUNE, deterministic=self.deterministic)
        if not by_file:
            records = records.shard(num_pipelines, pipeline_id)
        if self.cache:
            records = records.cache()
        records = records.shuffle(self.shuffle_buffer, seed=self.seed + pipeline_id,
                                  reshuffle_each_iteration=True)
        if self.repeat:
            records = records.repeat()
        parsed = records.map(decoder.parse_example, num_parallel_calls=AUTOTUNE)
        parsed = parsed.filter(
            lambda p: tf.reduce_any(parsers.trainable_instances(p, self.legacy_plus_one)))
        # A stateless seed per element: flips depend on (seed, position), not on thread timing.
        seeded = parsed.enumerate().map(
            lambda index, p: (p, tf.stack([tf.cast(self.seed, tf.int64) + pipeline_id, index])))
        examples = seeded.map(self.parser, num_parallel_calls=AUTOTUNE)
        batches = examples.group_by_window(
            key_func=lambda e: tf.cast(tf.shape(e["images"])[0] > tf.shape(e["images"])[1],
                                       tf.int64),
            reduce_func=lambda _, window: window.batch(batch_size, drop_remainder=True),
            window_size=batch_size)
        return batches.prefetch(AUTOTUNE)

    def eval_batches_per_pipeline(self, num_pipelines, batch_size, replicas_per_pipeline):
        """The number of batches every eval pipeline yields (equal, so replicas stay in step)."""
        portrait = self.scan["portrait"]
        most = 0
        for pipeline_id in range(num_pipelines):
            mine = portrait[pipeline_id::num_pipelines]
            n_portrait = int(mine.sum())
            batches = (math.ceil(n_portrait / batch_size)
                       + math.ceil((len(mine) - n_portrait) / batch_size))
            most = max(most, batches)
        return -(-most // replicas_per_pipeline) * replicas_per_pipeline

    def _eval_dataset(self, num_pipelines, pipeline_id, batch_size, replicas_per_pipeline):
        records = records_dataset(self.files).shard(num_pipelines, pipeline_id)
        if self.cache:
            records = records.cache()
        parsed = records.map(lambda s: decoder.parse_example(s, include_masks=False),
                             num_parallel_calls=AUTOTUNE)
        examples = parsed.map(self.parser, num_parallel_calls=AUTOTUNE)
        batches = examples.group_by_window(
            key_func=lambda e: tf.cast(tf.shape(e["images"])[0] > tf.shape(e["images"])[1],
                                       tf.int64),
            reduce_func=lambda _, window: window.batch(batch_size),
            window_size=batch_size)
        batches = batches.map(lambda b: pad_batch(b, batch_size))

        # Every pipeline yields the same number of batches: fill up with all-invalid ones.
        portrait = self.scan["portrait"][pipeline_id::num_pipelines]
        mine = (math.ceil(int(portrait.sum()) / batch_size)
                + math.ceil(int((~portrait).sum()) / batch_size))
        total = self.eval_batches_per_pipeline(num_pipelines, batch_size, replicas_per_pipeline)
        if total > mine:
            batches = batches.concatenate(self._invalid_batches(batch_size, total - mine))
        return batches.prefetch(AUTOTUNE)

    def _invalid_batches(self, batch_size, count):
        height, width = ops.padded_image_size(self.parser.min_size, self.parser.max_size,
                                              self.parser.size_divisibility, portrait=False)
        batch = {
            "images": tf.zeros([batch_size, height, width, 3], tf.float32),
            "image_size": tf.zeros([batch_size, 2], tf.int32),
            "original_size": tf.zeros([batch_size, 2], tf.int32),
            "scale": tf.zeros([batch_size, 2], tf.float32),
            "source_id": tf.zeros([batch_size], tf.int64),
            "is_valid": tf.zeros([batch_size], tf.bool),
        }
        return tf.data.Dataset.from_tensors(batch).repeat(count)
