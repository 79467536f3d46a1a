"""The input pipeline: files -> records -> parsed, filtered, resized batches, one per replica.

The only gin-configurable part of `data/`. Use it through `builder.distribute(strategy, epoch,
start_batch)` (= `strategy.distribute_datasets_from_function`): it is called once per input
pipeline with a `tf.distribute.InputContext` and returns that pipeline's dataset, batched at the
per-replica batch size B; the strategy hands consecutive batches to the pipeline's R replicas.

Legend: P input pipelines, R replicas per pipeline, B images per replica; Hl, Wl and Hp, Wp the
padded landscape and portrait image sizes (`image_shapes`).

Static shapes: images are padded to one of two shapes, landscape (Hl, Wl) and portrait
(Hp, Wp) = (Wl, Hl) (`preprocess_ops.padded_image_size`), and batches are grouped by
orientation, the reference's aspect grouping; the train step therefore compiles once per
orientation. Train batches: images [B, Hl, Wl, 3] or [B, Hp, Wp, 3] and the ground truth of
`parsers.TrainParser`; eval batches: images likewise and the fields of `parsers.EvalParser`
plus is_valid [B] bool (False on padding entries).

The parts, one idea each: `records` (file checks, the start-up scan), `epoch_plan` (sharding
and how many batches each pipeline yields: padding, fillers, their cost), `raw_batches` (the
training stream on raw records: stateless order, grouping, padding, flip seeds),
`eval_batches` (eval grouping, invalid padding and filler batches), `parsers` (one record ->
fixed-shape tensors).

Training epochs. The training dataset is a function of (seed, epoch, start_batch), so that a
preempted run resumes exactly mid-epoch and an epoch is the same number of steps on every
pipeline (`epoch_plan`):
  - Order: per pipeline and epoch, the files are permuted and read interleaved, and the records
    permuted within blocks of `shuffle_buffer`, with stateless seeds derived from (seed,
    pipeline, epoch): the same seed and epoch give the same batches, bit for bit, whatever
    `start_batch`, and TF's global seed plays no part. Flips use a stateless seed per element
    derived from (seed, pipeline, epoch, position of the element in the epoch).
  - Grouping happens on raw serialized records, keyed by orientation looked up in the startup
    `scan` (no decoding), so that `start_batch` skips whole raw batches before any JPEG/PNG
    decode or resize: resuming costs reading (not decoding) the skipped records.

Bad input fails at startup: `InputError` naming the file (`records.check_files`), or the record
(`records.scan_records`: truncated or damaged files, bad JPEG headers); the entries add
`startup_checks` (labels vs the model, eval records vs the ground truth) and name the record of
an image that fails to decode later (`decode_failures`).
"""

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from official_maskrcnn.data import decoder, epoch_plan, eval_batches, parsers, raw_batches, records
from official_maskrcnn.data.records import InputError

__all__ = ["DatasetBuilder", "InputError"]

AUTOTUNE = tf.data.AUTOTUNE


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
        self.file_pattern = file_pattern
        self.files = records.resolve_files(file_pattern)
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
        records.check_files(self.files, self.include_masks)
        self.scan = records.scan_records(self.files, legacy_plus_one)
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

    @property
    def image_shapes(self):
        """((Hl, Wl), (Hp, Wp)): the static padded (height, width) of landscape and portrait
        images, Python ints (`preprocess_ops.padded_image_size` of the parser's settings)."""
        return self.parser.image_shapes

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

    # Training epochs: planning (numpy, from the scan; see `epoch_plan`) ...

    def epoch_plan(self, num_pipelines=1, replicas_per_pipeline=1):
        """How one training epoch is laid out over P pipelines of R replicas each: the dict
        of `epoch_plan.train_epoch_plan` (steps_per_epoch, batch_size, and [P] lists records,
        batches, fillers, duplicates)."""
        return epoch_plan.train_epoch_plan(self.scan, len(self.files), self.global_batch_size,
                                           num_pipelines, replicas_per_pipeline)

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
        `seeds` holds each element's stateless flip seed (`raw_batches.with_flip_seeds`).
        """
        key = raw_batches.fold(tf.constant([self.seed, 0], tf.int64), pipeline_id, epoch)
        portrait = self.scan["portrait"]
        batches = raw_batches.pad_partial_batches(
            raw_batches.group_by_orientation(
                self._epoch_records(num_pipelines, pipeline_id, key, raw_batches.EPOCH_PASS),
                portrait, batch_size, drop_remainder=False), batch_size)
        if fillers:
            # A fresh permutation, repeated for the rare pipeline with fewer than B records
            # of either orientation; only full batches come out.
            again = self._epoch_records(num_pipelines, pipeline_id, key, raw_batches.FILLER_PASS)
            extra = raw_batches.group_by_orientation(again.repeat(), portrait, batch_size,
                                                     drop_remainder=True).take(fillers)
            batches = batches.concatenate(
                extra.map(lambda batch: {"index": batch["index"], "record": batch["record"]}))
        return raw_batches.with_flip_seeds(batches, key, batch_size)

    def _epoch_records(self, num_pipelines, pipeline_id, key, epoch_pass):
        """One permuted pass over the pipeline's trainable records: (index [], record []).

        `index` is the global record index (the `scan` arrays' index).
        """
        key = raw_batches.fold(key, epoch_pass)
        mine = tf.constant(epoch_plan.pipeline_records(self.scan, len(self.files), num_pipelines,
                                                       pipeline_id))
        if self.cache:
            pipeline_records = self._cached_pipeline_records(num_pipelines, pipeline_id, mine)
        else:
            file_ids = np.arange(len(self.files))
            if epoch_plan.shards_by_file(len(self.files), num_pipelines):
                file_ids = file_ids[pipeline_id::num_pipelines]
            paths = tf.constant([self.files[i] for i in file_ids])
            starts = tf.constant(
                records.file_starts(self.scan["file_index"], len(self.files))[file_ids])
            order = tf.argsort(tf.random.stateless_uniform(
                [len(file_ids)], seed=raw_batches.fold(key, raw_batches.FILE_ORDER)))
            files = tf.data.Dataset.from_tensor_slices(
                (tf.gather(paths, order), tf.gather(starts, order)))
            pipeline_records = files.interleave(
                records.indexed_records, cycle_length=min(self.cycle_length, len(file_ids)),
                block_length=1, num_parallel_calls=AUTOTUNE, deterministic=self.deterministic)
            pipeline_records = pipeline_records.filter(lambda index, _: tf.gather(mine, index))
        return raw_batches.block_shuffle(
            pipeline_records, raw_batches.fold(key, raw_batches.RECORD_ORDER),
            self.shuffle_buffer)

    def _cached_pipeline_records(self, num_pipelines, pipeline_id, mine):
        """The pipeline's (index, record), files in order, cached in memory on first use."""
        layout = (num_pipelines, pipeline_id)
        if layout not in self._cached_records:
            indexed = records.records_dataset(self.files).enumerate()
            self._cached_records[layout] = indexed.filter(
                lambda index, _: tf.gather(mine, index)).cache()
        return self._cached_records[layout]

    # Evaluation: every image exactly once, the same number of batches on every pipeline.

    def eval_batches_per_pipeline(self, num_pipelines, batch_size, replicas_per_pipeline):
        """The number of batches every eval pipeline yields (equal, so replicas stay in step)."""
        return epoch_plan.eval_batches_per_pipeline(self.scan["portrait"], num_pipelines,
                                                    batch_size, replicas_per_pipeline)

    def _eval_dataset(self, num_pipelines, pipeline_id, batch_size, replicas_per_pipeline):
        eval_records = records.records_dataset(self.files).shard(num_pipelines, pipeline_id)
        if self.cache:
            eval_records = eval_records.cache()
        parsed = eval_records.map(lambda s: decoder.parse_example(s, include_masks=False),
                                  num_parallel_calls=AUTOTUNE)
        examples = parsed.map(self.parser, num_parallel_calls=AUTOTUNE)
        batches = eval_batches.group_by_orientation(examples, batch_size)

        # Every pipeline yields the same number of batches: fill up with all-invalid ones.
        mine = epoch_plan.eval_pipeline_batches(self.scan["portrait"], num_pipelines,
                                                pipeline_id, batch_size)
        total = self.eval_batches_per_pipeline(num_pipelines, batch_size, replicas_per_pipeline)
        if total > mine:
            batches = batches.concatenate(
                eval_batches.invalid_batches(batch_size, self.image_shapes[0], total - mine))
        return batches.prefetch(AUTOTUNE)
