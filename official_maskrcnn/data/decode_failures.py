"""Naming the record behind an image or mask that fails to decode during training or evaluation.

A JPEG whose header is sound but whose body is damaged (e.g. truncated) passes the start-up scan
(it reads headers only: a full decode of train2017 would cost minutes of CPU inside the timed
run) and fails in `decode_jpeg` mid-epoch, as a raw InvalidArgumentError that names no file;
every resume then dies on the same record. A tf.data map cannot catch an op's error, and the
failing element has no identity left once the error is raised, so the record is found after the
fact: `named_decode_failures` catches such an error and decodes every record of the builders
once, in parallel, with `Dataset.ignore_errors` dropping the failures; the indices missing from
the output are the bad records. That pass costs one full decode of the data, paid only when a
decode has already failed.
"""

import contextlib
import re

import tensorflow as tf

from official_maskrcnn.data import decoder, records
from official_maskrcnn.data.records import RecordError

# The messages of TF's image decoders (decode_jpeg, decode_png, the format sniffing of both).
_DECODE_ERROR = re.compile(r"JPEG|PNG|image file format|Decode(Jpeg|Png|Image)", re.IGNORECASE)


class UndecodableRecordError(RecordError):
    """A record's image or masks do not decode; the message names the record."""


def _decode_all(serialized, include_masks):
    """Decodes a record's image (and masks) as the parsers do; returns their shapes, int32."""
    parsed = decoder.parse_example(serialized, include_masks)
    checks = [tf.shape(decoder.decode_image(parsed["encoded_image"]))]
    if include_masks:
        checks.append(tf.shape(decoder.decode_masks(parsed["masks_png"], parsed["height"],
                                                    parsed["width"])))
    return tf.concat(checks, 0)


def find_undecodable(builder):
    """Global indices [n] (sorted) of the builder's records whose image or masks fail to decode."""
    # The shapes are returned, not merely depended on: graph optimisation prunes a stateless
    # op whose output is unused, control dependency or not, and the decode would not run.
    def decode(index, serialized):
        return index, _decode_all(serialized, builder.include_masks)

    decoded = records.records_dataset(builder.files).enumerate().map(
        decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    seen = {int(index) for index, _ in decoded.as_numpy_iterator()}
    return sorted(set(range(builder.num_records)) - seen)


def _reason(builder, index):
    """The decoder's message for the record at `index` (decoded again, eagerly)."""
    serialized = next(iter(records.records_dataset(builder.files).skip(index).take(1)))
    try:
        _decode_all(serialized, builder.include_masks)
    except tf.errors.InvalidArgumentError as e:
        return records.first_line(e)
    return "decodes alone"


@contextlib.contextmanager
def named_decode_failures(*builders):
    """Turns a decode failure inside the block into an `UndecodableRecordError` naming the
    record(s); any other error, or one no record of `builders` explains, passes unchanged.

    Args:
      builders: the `DatasetBuilder`s whose data the block reads (None entries are ignored).
    """
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        if not _DECODE_ERROR.search(e.message):
            raise
        for builder in builders:
            bad = find_undecodable(builder) if builder is not None else []
            if bad:
                ids = builder.scan["source_id"][bad[:5]].tolist()
                raise UndecodableRecordError(
                    f"{records.record_name(builder.files, builder.scan, bad[0])}: its image or "
                    f"masks do not decode ({_reason(builder, bad[0])}); {len(bad)} record(s) "
                    f"of {builder.file_pattern} do not, source ids {ids}; re-convert their "
                    f"images; checkpoints written so far are intact") from e
        raise
