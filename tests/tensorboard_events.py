"""Reading TensorBoard event folders back with tensorboard's own reader (`EventAccumulator`)."""

import io

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

# TF2 summaries are tensor events; 0 keeps every event (the default samples a few per tag).
_KEEP_ALL = {event_accumulator.TENSORS: 0}


def _events(log_dir):
    accumulator = event_accumulator.EventAccumulator(log_dir, size_guidance=_KEEP_ALL)
    accumulator.Reload()
    return {tag: accumulator.Tensors(tag) for tag in accumulator.Tags()[event_accumulator.TENSORS]}


def scalars(log_dir):
    """{tag: [(step, float32 value), ...]} of the scalar summaries in `log_dir`, in file order."""
    return {tag: [(event.step, tf.make_ndarray(event.tensor_proto).item()) for event in events]
            for tag, events in _events(log_dir).items()
            if not events[0].tensor_proto.string_val}


def images(log_dir):
    """{tag: [(step, [H, W, C] uint8), ...]} of the image summaries in `log_dir` (their first
    image each: the tensor is [width, height, PNG...])."""
    decoded = {}
    for tag, events in _events(log_dir).items():
        if not events[0].tensor_proto.string_val:
            continue
        decoded[tag] = [(event.step, np.asarray(Image.open(io.BytesIO(
            event.tensor_proto.string_val[2])))) for event in events]
    return decoded
