"""The benchmark's "list of layers": every weight-holding layer with its parameter counts.

`layer_rows(model)` lists the leaf layers (those without sub-layers) that hold weights, in a
stable order, with total and trainable parameter counts; `format_layer_table` renders them as
text for the training log. The totals equal `model.count_params()`.
"""

import numpy as np
import tf_keras


def _num_params(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def layer_rows(model):
    """[(path, class name, params, trainable params)] for each weight-holding leaf layer."""
    rows = []
    seen = set()
    for path, layer in _walk(model, model.name):
        if id(layer) in seen or not layer.weights:
            continue
        seen.add(id(layer))
        rows.append((path, type(layer).__name__, _num_params(layer.weights),
                     _num_params(layer.trainable_weights)))
    return rows


def _walk(layer, path):
    """Depth-first (path, leaf layer) pairs, children in the order Keras tracks them."""
    children = [child for child in getattr(layer, "_flatten_layers", lambda **_: [])(
        include_self=False, recursive=False) if isinstance(child, tf_keras.layers.Layer)]
    if not children:
        yield path, layer
    for child in children:
        yield from _walk(child, f"{path}/{child.name}")


def format_layer_table(model):
    """The table as text: one line per layer, then the totals."""
    rows = layer_rows(model)
    width = max([len(path) for path, *_ in rows] + [5])
    lines = [f"{'layer':<{width}}  {'type':<22} {'params':>12} {'trainable':>12}"]
    for path, kind, params, trainable in rows:
        lines.append(f"{path:<{width}}  {kind:<22} {params:>12,} {trainable:>12,}")
    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<22} {total:>12,} {trainable:>12,}")
    return "\n".join(lines)
