"""Plain feature dicts (see `features`) <-> serialized `tf.train.Example`s."""

import tensorflow as tf

from tfrecord_tools import features as F


def _feature(kind, values):
    if kind == F.BYTES:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == F.INT64:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def serialize(features):
    """{key: list of values} -> deterministic serialized tf.train.Example bytes."""
    example = tf.train.Example(features=tf.train.Features(feature={
        key: _feature(F.KIND_OF_KEY[key], values) for key, values in features.items()}))
    # deterministic=True sorts the feature map, so equal dicts give equal bytes.
    return example.SerializeToString(deterministic=True)


def parse(serialized):
    """Serialized tf.train.Example -> {key: list of values} for the keys it holds."""
    example = tf.train.Example.FromString(serialized)
    parsed = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        parsed[key] = list(getattr(feature, kind).value) if kind else []
    return parsed
