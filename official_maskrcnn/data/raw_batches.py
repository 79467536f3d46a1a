"""Training batches of raw records, before any decode: stateless order, grouping, padding, seeds.

Legend: B images per replica; index [] int64 the global record index (the `scan` arrays'
index), record [] string a serialized tf.Example.

The training stream works on raw serialized records and decodes only what it yields, so that
skipping to a batch (resuming mid-epoch) costs reading, not decoding, the skipped records:
  - order: `block_shuffle` permutes (index, record) within blocks, with stateless seeds
    (`fold`), so the order is a function of the seed and the epoch only;
  - grouping: `group_by_orientation` keys each record by the scan's orientation (no decoding)
    and batches each orientation separately;
  - padding: `pad_partial_batches` completes each orientation's last, partial batch (counted by
    `epoch_plan`, which explains both kinds of duplicates, padding and fillers);
  - flips: `with_flip_seeds` gives each element a stateless seed from its position in the epoch,
    so skipping batches does not shift the flips.
"""

import numpy as np
import tensorflow as tf

# Purposes of the stateless seeds derived from (seed, pipeline, epoch): distinct streams.
FILE_ORDER, RECORD_ORDER, FLIPS = 0, 1, 2
# Passes over a pipeline's records within an epoch: the epoch itself, then the fillers.
EPOCH_PASS, FILLER_PASS = 0, 1
NUM_ORIENTATIONS = 2  # landscape (key 0), portrait (key 1)


def fold(seed, *data):
    """A stateless seed [2] int64 derived from `seed` [2] and ints / int64 scalar tensors."""
    for value in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


def block_shuffle(records, seed, block_size):
    """Permutes (index, record) within consecutive blocks of `block_size`.

    Stateless (seed [2] and the block number), unlike `Dataset.shuffle`, whose order also
    depends on TF's global seed: the order must be a function of (seed, epoch) only.
    """
    def permute(block_index, block):
        index, record = block
        noise = tf.random.stateless_uniform(tf.shape(index), seed=fold(seed, block_index))
        order = tf.argsort(noise)
        return tf.gather(index, order), tf.gather(record, order)

    return records.batch(block_size).enumerate().map(permute).unbatch()


def group_by_orientation(records, portrait, batch_size, drop_remainder):
    """(index, record) -> dicts of index [n], record [n], key [] (orientation), n <= B.

    Args:
      portrait: [num_records] bool numpy, the scan's orientation of every record: no decoding.
    With drop_remainder=False the last window of each orientation may be partial (n < B), and
    only these.
    """
    portrait = tf.constant(portrait)

    def orientation(index, _):
        return tf.cast(tf.gather(portrait, index), tf.int64)

    def to_batch(key, window):
        return window.batch(batch_size, drop_remainder=drop_remainder).map(
            lambda index, record: {"index": index, "record": record, "key": key})

    return records.group_by_window(orientation, to_batch, window_size=batch_size)


def pad_partial_batches(batches, batch_size):
    """Completes each partial batch with records of the same orientation: those of the last
    full batch of that orientation in this pass, or, if there was none, its own again.

    Keeps (in a `scan` state) the last full batch of each orientation, [2, B] index and
    record. Returns dicts with index [B], record [B].
    """
    initial = (tf.zeros([NUM_ORIENTATIONS, batch_size], tf.int64),
               tf.fill([NUM_ORIENTATIONS, batch_size], ""),
               tf.zeros([NUM_ORIENTATIONS], tf.bool))

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
        record = tf.ensure_shape(tf.concat([record, donor_record[:missing]], 0), [batch_size])
        row = tf.reshape(key, [1, 1])
        state = tf.cond(
            is_full,
            lambda: (tf.tensor_scatter_nd_update(last_index, row, index[None]),
                     tf.tensor_scatter_nd_update(last_record, row, record[None]),
                     tf.tensor_scatter_nd_update(has_full, row, [True])),
            lambda: (last_index, last_record, has_full))
        return state, {"index": index, "record": record}

    return batches.scan(initial, pad)


def with_flip_seeds(batches, key, batch_size):
    """Dicts with record [B] -> (records [B] string, seeds [B, 2] int64).

    seeds[i] = (a flip key drawn from `key` [2], position of the element in the epoch), so
    the flips of a batch do not depend on how many batches were skipped before it.
    """
    flip_key = tf.random.stateless_uniform([], seed=fold(key, FLIPS), minval=0,
                                           maxval=np.iinfo(np.int64).max, dtype=tf.int64)

    def seeded(batch_index, batch):
        positions = batch_index * batch_size + tf.range(batch_size, dtype=tf.int64)
        seeds = tf.stack([tf.fill([batch_size], flip_key), positions], axis=1)
        return batch["record"], seeds

    return batches.enumerate().map(seeded)
