"""The epoch plan: how many batches each input pipeline yields, in numpy, from the start-up scan.

Legend: P input pipelines, R replicas per pipeline, B images per replica (per-replica batch
size), L_p and P_p the landscape and portrait records of pipeline p. Orientation is the scan's
`portrait` column, i.e. `parsers.is_portrait` (height / width >= 1, squares are portrait).

Batches are grouped by orientation (the reference's aspect grouping), so a set of records of
which `portrait` says n_p are portrait makes `num_batches` = ceil(n_l / B) + ceil(n_p / B)
batches of at most B images; every count below is that one function.

Sharding: training shards by file when there are at least as many files as input pipelines
(pipeline p reads files p, p + P, ...), by record otherwise (each reads every file and keeps the
records whose global index is p mod P). Evaluation always shards by record (records p, p + P,
... of `records_dataset`), so that its per-pipeline counts are known exactly.

Training epochs: every trainable record of a pipeline is used once per epoch, except for two
kinds of duplicates ("a partial last batch may be padded", REFERENCE.md). (1) Padding: the last,
partial batch of each orientation is completed with records of the previous full batch of that
orientation (or, if there was none, by repeating its own records). (2) Fillers: all pipelines
yield the same number of batches, R * steps_per_epoch with
    steps_per_epoch = max over pipelines p of ceil((ceil(L_p / B) + ceil(P_p / B)) / R),
L_p, P_p the pipeline's trainable landscape and portrait records; a pipeline with fewer batches
appends full batches from a second, differently permuted pass over its records. Cost, in
duplicate images per epoch: steps_per_epoch * global_batch_size - trainable images. Padding is
at most 2 (B - 1) per pipeline, fillers R - 1 batches per pipeline plus the imbalance between
shards (train2017, one pipeline, one replica, B = 16: at most 30 of 117,266 images, 0.03 %).
`train_epoch_plan` gives the exact figures; `DatasetBuilder.summary` has them for one pipeline
and the builder logs them once per distribution layout.

Evaluation: every image exactly once; each pipeline's last partial batch of each orientation is
padded with invalid entries, and a pipeline with fewer batches than the others appends
all-invalid batches, so that all yield `eval_batches_per_pipeline` batches (a multiple of R).
"""

import numpy as np

from official_maskrcnn.data.records import InputError


def ceil_div(numerator, denominator):
    """ceil(numerator / denominator) for non-negative Python ints, exactly (no float)."""
    return -(-numerator // denominator)


def num_batches(portrait, batch_size):
    """Batches of at most `batch_size` images that records make when grouped by orientation.

    Args:
      portrait: [n] bool, the orientation (`scan["portrait"]`) of each of the n records.
      batch_size: B, images per batch.
    Returns:
      int: ceil(landscape / B) + ceil(portrait / B).
    """
    num_portrait = int(np.count_nonzero(portrait))
    return (ceil_div(num_portrait, batch_size)
            + ceil_div(len(portrait) - num_portrait, batch_size))


def shards_by_file(num_files, num_pipelines):
    """Whether training shards by file (enough files for every pipeline) or by record."""
    return num_files >= num_pipelines


def pipeline_records(scan, num_files, num_pipelines, pipeline_id):
    """[num_records] bool: the trainable records pipeline `pipeline_id` trains on."""
    if shards_by_file(num_files, num_pipelines):  # as files.shard(num_pipelines, pipeline_id)
        mine = scan["file_index"] % num_pipelines == pipeline_id
    else:
        mine = np.arange(len(scan["portrait"])) % num_pipelines == pipeline_id
    return mine & scan["trainable"]


def per_replica_batch_size(global_batch_size, num_pipelines, replicas_per_pipeline):
    """B = global_batch_size / (P * R); ValueError unless it divides exactly."""
    replicas = num_pipelines * replicas_per_pipeline
    if global_batch_size % replicas:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                         f"{replicas} replicas ({num_pipelines} pipeline(s) x "
                         f"{replicas_per_pipeline})")
    return global_batch_size // replicas


def train_epoch_plan(scan, num_files, global_batch_size, num_pipelines=1,
                     replicas_per_pipeline=1):
    """How one training epoch is laid out over P pipelines of R replicas each.

    Args:
      scan: the `records.scan_records` arrays.
      num_files: how many files the records come from (decides the sharding).
      global_batch_size: images per step over all P * R replicas.
    Returns:
      dict: steps_per_epoch (int, equal on every pipeline), batch_size (B, per replica),
      and [P] lists: records (trainable records of the pipeline), batches (its batches
      with padding, before fillers), fillers (filler batches it appends), duplicates
      (images it yields beyond its distinct records: padding and fillers); the pipeline
      yields R * steps_per_epoch batches = records + duplicates images.
    Raises:
      InputError: a pipeline has no trainable record.
    """
    batch_size = per_replica_batch_size(global_batch_size, num_pipelines, replicas_per_pipeline)
    records, batches = [], []
    for pipeline_id in range(num_pipelines):
        mine = pipeline_records(scan, num_files, num_pipelines, pipeline_id)
        if not mine.any():
            raise InputError(
                f"input pipeline {pipeline_id} of {num_pipelines} has no trainable record "
                f"({num_files} file(s), {int(scan['trainable'].sum())} trainable records): "
                f"use fewer pipelines or more shards")
        records.append(int(mine.sum()))
        batches.append(num_batches(scan["portrait"][mine], batch_size))
    steps = max(ceil_div(n, replicas_per_pipeline) for n in batches)
    total = steps * replicas_per_pipeline
    return {"steps_per_epoch": steps, "batch_size": batch_size, "records": records,
            "batches": batches, "fillers": [total - n for n in batches],
            "duplicates": [total * batch_size - n for n in records]}


def eval_pipeline_batches(portrait, num_pipelines, pipeline_id, batch_size):
    """The batches of real images eval pipeline `pipeline_id` makes (records p, p + P, ...).

    Args:
      portrait: [num_records] bool, `scan["portrait"]` of every record.
    """
    return num_batches(portrait[pipeline_id::num_pipelines], batch_size)


def eval_batches_per_pipeline(portrait, num_pipelines, batch_size, replicas_per_pipeline):
    """The number of batches every eval pipeline yields (equal, so replicas stay in step): the
    most any pipeline makes, rounded up to a multiple of R."""
    most = max(eval_pipeline_batches(portrait, num_pipelines, pipeline_id, batch_size)
               for pipeline_id in range(num_pipelines))
    return ceil_div(most, replicas_per_pipeline) * replicas_per_pipeline
