"""The input pipeline: files -> records -> parsed, filtered, resized batches, one per replica.

The only gin-configurable part of `data/`. Use it through `builder.distribute(strategy, epoch,
start_batch)` (= `strategy.distribute_datasets_from_function`): it is called once per input
pipeline with a `tf.distribute.InputContext` and returns that pipeline's dataset, batched at the
per-replica batch size B; the strategy hands consecutive batches to the pipeline's R replicas.

Sharding: by file when there are at least as many files as input pipelines (pipeline p reads
files p, p + P, ...), by record otherwise (each reads every file and keeps the records whose
global index is p mod P). Evaluation always shards by record, so that its per-pipeline counts
are known exactly.

Static shapes: images are padded to one of two shapes, landscape (Hp, Wp) and portrait (Wp, Hp)
(`preprocess_ops.padded_image_size`), and batches are grouped by orientation, the reference's
aspect grouping; the train step therefore compiles once per orientation.

Training epochs. The training dataset is a function of (seed, epoch, start_batch), so that a
preempted run resumes exactly mid-epoch and an epoch is the same number of steps on every
pipeline:
  - Order: per pipeline and epoch, the files are permuted and read interleaved, and the records
    permuted within blocks of `shuffle_buffer`, with stateless seeds derived from (seed,
    pipeline, epoch): the same seed and epoch give the same batches, bit for bit, whatever
    `start_batch`, and TF's global seed plays no part. Flips use a stateless seed per element
    derived from (seed, pipeline, epoch, position of the element in the epoch).
  - Grouping happens on raw serialized records, keyed by orientation looked up in the startup
    `scan` (no decoding), so that `start_batch` skips whole raw batches before any JPEG/PNG
    decode or resize: resuming costs reading (not decoding) the skipped records.
  - Every trainable record of a pipeline is used once per epoch, except for two kinds of
    duplicates ("a partial last batch may be padded", REFERENCE.md). (1) Padding: the last,
    partial batch of each orientation is completed with records of the previous full batch of
    that orientation (or, if there was none, by repeating its own records). (2) Fillers: all
    pipelines yield the same number of batches, R * steps_per_epoch with
        steps_per_epoch = max over pipelines p of ceil((ceil(L_p / B) + ceil(P_p / B)) / R),
    L_p, P_p the pipeline's trainable landscape and portrait records; a pipeline with fewer
    batches appends full batches from a second, differently permuted pass over its records.
    Cost, in duplicate images per epoch: steps_per_epoch * global_batch_size - trainable
    images. Padding is at most 2 (B - 1) per pipeline, fillers R - 1 batches per pipeline plus
    the imbalance between shards (train2017, one pipeline, one replica, B = 16: at most 30 of
    117,266 images, 0.03 %). `epoch_plan` gives the exact figures; they are in `summary` for one
    pipeline and logged once per distribution layout.

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
      dict of [num_records] numpy arrays, indexed by the global record index (the position in
      `records_dataset(files)`): portrait (bool), trainable (bool: keeps >= 1 instance for
      training), num_trainable (int: instances training keeps), file_index (int: the record's
      file in `files`).
    """
    def small(file_index, serialized):
        parsed = decoder.parse_example(serialized, include_masks=False)
        keep = parsers.trainable_instances(parsed, legacy_plus_one)
        return (file_index, parsers.is_portrait(parsed),
                tf.reduce_sum(tf.cast(keep, tf.int32)))

    indexed = tf.data.Dataset.from_tensor_slices(files).enumerate().flat_map(
        lambda i, path: tf.data.TFRecordDataset(path).map(lambda s: (i, s)))
    columns = [[], [], []]
    for values in indexed.map(small, num_parallel_calls=AUTOTUNE).batch(1024):
        for column, value in zip(columns, values):
            column.append(value.numpy())
    file_index, portrait, num_trainable = (
        np.concatenate(column) if column else np.zeros([0], dtype)
        for column, dtype in zip(columns, [np.int64, bool, np.int32]))
    return {"portrait": portrait, "trainable": num_trainable > 0,
            "num_trainable": num_trainable, "file_index": file_index}


def records_dataset(files):
    """All records of `files` in a fixed order (files in order, records in order)."""
    return tf.data.TFRecordDataset(files)


def _indexed_records(path, start):
    """The records of one file with their global index: (start + position in file, record)."""
    return tf.data.TFRecordDataset(path).enumerate().map(
        lambda position, record: (start + position, record))


def pad_batch(batch, batch_size):
    """Pads every tensor of a partial eval batch to `batch_size` with zeros (is_valid False)."""
    def pad(tensor):
        missing = batch_size - tf.shape(tensor)[0]
        filler = tf.zeros(tf.concat([[missing], tf.shape(tensor)[1:]], 0), tensor.dtype)
        return tf.concat([tensor, filler], 0)

    return {key: pad(value) for key, value in batch.items()}


# Purposes of the stateless seeds derived from (seed, pipeline, epoch): distinct streams.
_FILE_ORDER, _RECORD_ORDER, _FLIPS = 0, 1, 2
# Passes over a pipeline's records within an epoch: the epoch itself, then the fillers.
_EPOCH_PASS, _FILLER_PASS = 0, 1
_NUM_ORIENTATIONS = 2  # landscape (key 0), portrait (key 1)


def _fold(seed, *data):
    """A stateless seed [2] int64 derived from `seed` [2] and ints / int64 scalar tensors."""
    for value in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


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
      shuffle_buffer: training permutes the records within consecutive blocks of this many
        (after the file permutation and interleave); memory is one block of raw records.
      seed: seeds file order, record order and flips; None draws one at random (logged).
      deterministic: keep the file interleave's order fixed under parallelism. False is faster
        on slow storage but makes epochs irreproducible (no exact mid-epoch resume).
      cache: cache each pipeline's raw trainable records in memory after the first pass (small
        datasets); the files are then read in a fixed order, the record permutation remains.
      repeat: what `epoch=None` gives in training: all epochs 0, 1, 2, ... one after the other
        forever (True) or only epoch 0 (False). An explicit epoch always gives one epoch.
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
        self._cached_records = {}  # (num_pipelines, pipeline_id) -> cached raw records
        self._logged_layouts = set()
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
            if self.num_train_images:
                plan = self.epoch_plan()
                message += (f"; one pipeline: {plan['steps_per_epoch']} steps per epoch, "
                            f"{plan['duplicates'][0]} duplicate image(s) per epoch (padding of "
                            f"partial batches)")
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

    def __call__(self, input_context=None, epoch=0, start_batch=0):
        """The dataset of the pipeline `input_context` describes (the only one without).

        Training: the batches of epoch `epoch` (0-based) from step `start_batch` (0-based) on,
        i.e. R * (steps_per_epoch(P, R) - start_batch) batches of B images for the pipeline's
        R replicas (R = 1 without a context); `epoch=None` streams epochs 0, 1, ... (see
        `repeat`), `start_batch` then applies to epoch 0. Eval ignores epoch and start_batch.
        """
        num_pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        batch_size = (input_context.get_per_replica_batch_size(self.global_batch_size)
                      if input_context else self.global_batch_size)
        replicas_per_pipeline = (input_context.num_replicas_in_sync // num_pipelines
                                 if input_context else 1)
        if self.is_training:
            dataset = self._train_dataset(num_pipelines, pipeline_id, replicas_per_pipeline,
                                          epoch, start_batch)
        else:
            dataset = self._eval_dataset(num_pipelines, pipeline_id, batch_size,
                                         replicas_per_pipeline)
        return dataset.with_options(self.options())

    def distribute(self, strategy, epoch=0, start_batch=0):
        """The distributed dataset for `strategy`: epoch `epoch` from step `start_batch` on."""
        return strategy.distribute_datasets_from_function(
            lambda context: self(context, epoch, start_batch))

    # Training epochs: planning (numpy, from the scan) ...

    def _by_file(self, num_pipelines):
        return len(self.files) >= num_pipelines

    def _pipeline_records(self, num_pipelines, pipeline_id):
        """[num_records] bool: the trainable records pipeline `pipeline_id` trains on."""
        if self._by_file(num_pipelines):  # as files.shard(num_pipelines, pipeline_id)
            mine = self.scan["file_index"] % num_pipelines == pipeline_id
        else:
            mine = np.arange(self.num_records) % num_pipelines == pipeline_id
        return mine & self.scan["trainable"]

    def epoch_plan(self, num_pipelines=1, replicas_per_pipeline=1):
        """How one training epoch is laid out over P pipelines of R replicas each.

        Returns:
          dict: steps_per_epoch (int, equal on every pipeline), batch_size (B, per replica),
          and [P] lists: records (trainable records of the pipeline), batches (its batches
          with padding, before fillers), fillers (filler batches it appends), duplicates
          (images it yields beyond its distinct records: padding and fillers); the pipeline
          yields R * steps_per_epoch batches = records + duplicates images.
        """
        replicas = num_pipelines * replicas_per_pipeline
        if self.global_batch_size % replicas:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"the {replicas} replicas ({num_pipelines} pipeline(s) x "
                             f"{replicas_per_pipeline})")
        batch_size = self.global_batch_size // replicas
        records, batches = [], []
        for pipeline_id in range(num_pipelines):
            mine = self._pipeline_records(num_pipelines, pipeline_id)
            portrait = int((mine & self.scan["portrait"]).sum())
            landscape = int(mine.sum()) - portrait
            if portrait + landscape == 0:
                raise InputError(
                    f"input pipeline {pipeline_id} of {num_pipelines} has no trainable record "
                    f"({len(self.files)} file(s), {self.num_train_images} trainable records): "
                    f"use fewer pipelines or more shards")
            records.append(portrait + landscape)
            batches.append(math.ceil(portrait / batch_size)
                           + math.ceil(landscape / batch_size))
        steps = max(math.ceil(n / replicas_per_pipeline) for n in batches)
        total = steps * replicas_per_pipeline
        return {"steps_per_epoch": steps, "batch_size": batch_size, "records": records,
                "batches": batches, "fillers": [total - n for n in batches],
                "duplicates": [total * batch_size - n for n in records]}

    def steps_per_epoch(self, num_pipelines=1, replicas_per_pipeline=1):
        """Steps of one training epoch, equal on every pipeline (see `epoch_plan`)."""
        return self.epoch_plan(num_pipelines, replicas_per_pipeline)["steps_per_epoch"]

    def _log_layout(self, num_pipelines, replicas_per_pipeline, plan):
        if (num_pipelines, replicas_per_pipeline) in self._logged_layouts:
            return
        self._logged_layouts.add((num_pipelines, replicas_per_pipeline))
        duplicates = sum(plan["duplicates"])
        logging.info(
            "input: %d pipeline(s) x %d replica(s), %d images per replica: %d steps per epoch; "
            "%d of %d image(s) per epoch are duplicates (padding and filler batches, %.3f%%)",
            num_pipelines, replicas_per_pipeline, plan["batch_size"], plan["steps_per_epoch"],
            duplicates, self.num_train_images + duplicates,
            100 * duplicates / (self.num_train_images + duplicates))

    # ... and the datasets.

    def _train_dataset(self, num_pipelines, pipeline_id, replicas_per_pipeline, epoch,
                       start_batch):
        """Raw batches of the epoch(s), skipped to start_batch, then parsed (see module doc)."""
        plan = self.epoch_plan(num_pipelines, replicas_per_pipeline)
        self._log_layout(num_pipelines, replicas_per_pipeline, plan)
        steps = plan["steps_per_epoch"]
        if not 0 <= start_batch <= steps:
            raise ValueError(f"start_batch must be in [0, {steps}] (steps per epoch), got "
                             f"{start_batch}")
        batch_size = plan["batch_size"]
        layout = (num_pipelines, pipeline_id, batch_size, plan["fillers"][pipeline_id])
        first = 0 if epoch is None else epoch
        raw = self._raw_epoch(*layout, first).skip(start_batch * replicas_per_pipeline)
        if epoch is None and self.repeat:
            later = tf.data.Dataset.range(first + 1, np.iinfo(np.int64).max)
            raw = raw.concatenate(later.flat_map(lambda e: self._raw_epoch(*layout, e)))

        def parse(record, seed):
            return self.parser(decoder.parse_example(record, self.include_masks), seed)

        # Contiguous runs of batch_size elements come from one raw batch (one orientation), so
        # re-batching restores the groups; `deterministic=True` keeps them contiguous whatever
        # the options say.
        examples = raw.unbatch().map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
        return examples.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)

    def _raw_epoch(self, num_pipelines, pipeline_id, batch_size, fillers, epoch):
        """One epoch of one pipeline, as raw batches (records [B] string, seeds [B, 2] int64).

        All batches are full and of one orientation; `epoch` is an int or int64 scalar tensor.
        `seeds` holds each element's stateless flip seed: (key of (seed, pipeline, epoch),
        position of the element in the epoch), so skipping batches does not shift the flips.
        """
        key = _fold(tf.constant([self.seed, 0], tf.int64), pipeline_id, epoch)
        batches = self._pad_partial_batches(
            self._grouped(self._epoch_records(num_pipelines, pipeline_id, key, _EPOCH_PASS),
                          batch_size, drop_remainder=False), batch_size)
        if fillers:
            # A fresh permutation, repeated for the rare pipeline with fewer than B records
            # of either orientation; only full batches come out.
            again = self._epoch_records(num_pipelines, pipeline_id, key, _FILLER_PASS)
            extra = self._grouped(again.repeat(), batch_size, drop_remainder=True).take(fillers)
            batches = batches.concatenate(
                extra.map(lambda batch: {"index": batch["index"], "record": batch["record"]}))
        flip_key = tf.random.stateless_uniform([], seed=_fold(key, _FLIPS), minval=0,
                                               maxval=np.iinfo(np.int64).max, dtype=tf.int64)

        def with_seeds(batch_index, batch):
            positions = batch_index * batch_size + tf.range(batch_size, dtype=tf.int64)
            seeds = tf.stack([tf.fill([batch_size], flip_key), positions], axis=1)
            return batch["record"], seeds

        return batches.enumerate().map(with_seeds)

    def _epoch_records(self, num_pipelines, pipeline_id, key, epoch_pass):
        """One permuted pass over the pipeline's trainable records: (index [], record []).

        `index` is the global record index (the `scan` arrays' index).
        """
        key = _fold(key, epoch_pass)
        mine = tf.constant(self._pipeline_records(num_pipelines, pipeline_id))
        if self.cache:
            records = self._cached_pipeline_records(num_pipelines, pipeline_id, mine)
        else:
            file_ids = np.arange(len(self.files))
            if self._by_file(num_pipelines):
                file_ids = file_ids[pipeline_id::num_pipelines]
            paths = tf.constant([self.files[i] for i in file_ids])
            starts = tf.constant(self._file_starts()[file_ids])
            order = tf.argsort(tf.random.stateless_uniform([len(file_ids)],
                                                           seed=_fold(key, _FILE_ORDER)))
            files = tf.data.Dataset.from_tensor_slices(
                (tf.gather(paths, order), tf.gather(starts, order)))
            records = files.interleave(
                _indexed_records, cycle_length=min(self.cycle_length, len(file_ids)),
                block_length=1, num_parallel_calls=AUTOTUNE, deterministic=self.deterministic)
            records = records.filter(lambda index, _: tf.gather(mine, index))
        return self._block_shuffle(records, _fold(key, _RECORD_ORDER))

    def _file_starts(self):
        """[num_files] int64: global index of each file's first record."""
        counts = np.bincount(self.scan["file_index"], minlength=len(self.files))
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def _cached_pipeline_records(self, num_pipelines, pipeline_id, mine):
        """The pipeline's (index, record), files in order, cached in memory on first use."""
        layout = (num_pipelines, pipeline_id)
        if layout not in self._cached_records:
            records = records_dataset(self.files).enumerate()
            self._cached_records[layout] = records.filter(
                lambda index, _: tf.gather(mine, index)).cache()
        return self._cached_records[layout]

    def _block_shuffle(self, records, seed):
        """Permutes (index, record) within consecutive blocks of `shuffle_buffer`.

        Stateless (seed [2] and the block number), unlike `Dataset.shuffle`, whose order also
        depends on TF's global seed: the order must be a function of (seed, epoch) only.
        """
        def permute(block_index, block):
            index, record = block
            noise = tf.random.stateless_uniform(tf.shape(index), seed=_fold(seed, block_index))
            order = tf.argsort(noise)
            return tf.gather(index, order), tf.gather(record, order)

        return records.batch(self.shuffle_buffer).enumerate().map(permute).unbatch()

    def _grouped(self, records, batch_size, drop_remainder):
        """(index, record) -> dicts of index [n], record [n], key [] (orientation), n <= B.

        Orientation comes from the scan, not from decoding. With drop_remainder=False the last
        window of each orientation may be partial (n < B), and only these.
        """
        portrait = tf.constant(self.scan["portrait"])

        def orientation(index, _):
            return tf.cast(tf.gather(portrait, index), tf.int64)

        def to_batch(key, window):
            return window.batch(batch_size, drop_remainder=drop_remainder).map(
                lambda index, record: {"index": index, "record": record, "key": key})

        return records.group_by_window(orientation, to_batch, window_size=batch_size)

    @staticmethod
    def _pad_partial_batches(batches, batch_size):
        """Completes each partial batch with records of the same orientation: those of the last
        full batch of that orientation in this pass, or, if there was none, its own again.

        Keeps (in a `scan` state) the last full batch of each orientation, [2, B] index and
        record. Returns dicts with index [B], record [B].
        """
        initial = (tf.zeros([_NUM_ORIENTATIONS, batch_size], tf.int64),
                   tf.fill([_NUM_ORIENTATIONS, batch_size], ""),
                   tf.zeros([_NUM_ORIENTATIONS], tf.bool))

        def pad(state, batch):
            last_index, last_record, has_full = state
            index, record, key = batch["index"], batch["record"], batch["key"]
            size = tf.shape(index)[0]
            is_full = tf.equal(size, batch_size)
            # Worked example, B = 4, own records [a, b] with no earlier full batch:
            # tile -> [a, b, a, b], missing = 2 -> padded [a, b, a, b].
            repeats = -(-batch_size // size)
            donor_index = tf.where(has_full[key], last_index[key],
                                   tf.tile(index, [repeats])[:batch_size])
            donor_record = tf.where(has_full[key], last_record[key],
                                    tf.tile(record, [repeats])[:batch_size])
            missing = batch_size - size
            index = tf.ensure_shape(tf.concat([index, donor_index[:missing]], 0), [batch_size])
            record = tf.ensure_shape(tf.concat([record, donor_record[:missing]], 0),
                                     [batch_size])
            row = tf.reshape(key, [1, 1])
            state = tf.cond(
                is_full,
                lambda: (tf.tensor_scatter_nd_update(last_index, row, index[None]),
                         tf.tensor_scatter_nd_update(last_record, row, record[None]),
                         tf.tensor_scatter_nd_update(has_full, row, [True])),
                lambda: (last_index, last_record, has_full))
            return state, {"index": index, "record": record}

        return batches.scan(initial, pad)

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
