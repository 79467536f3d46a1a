r"""Evaluates a checkpoint on the eval set with the COCO API.

    python -m official_maskrcnn.evaluate --gin_file F --model_dir M [--checkpoint C]

Uses the training config (F, plus `--gin_param`): the model, `eval/DatasetBuilder` for the
records, `run.eval_annotations_file` for the ground truth, `run.strategy` / `num_gpus` /
`precision` / `eval_batch_size` / `eval_processes` / `eval_allow_subset` (without it the records
must hold every image of the annotation file). Restores the model weights of C (default:
the newest readable checkpoint in M; for a folder an unreadable newest checkpoint falls back to
the previous one with a warning, as training does), prints both 12-line COCO tables, and writes
into M:
`eval-<step>.metrics.json` (the 24 stats and timings) and `eval-<step>.results.json` (the COCO
results: boxes in original image pixels, COCO category ids, RLE masks).

The categories of `run.eval_annotations_file` must be those of the run's `label_map.json`
(beside C, when training saved one) and give the model's class count (which they set when the
config leaves `build_maskrcnn_model.num_classes` unset): otherwise one error naming both.

Exit codes: 0 done; 1 no (readable) checkpoint, a checkpoint of another config (e.g. another
class count), a bad config or bad input: one line says which.
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import json
import os
import sys

import tensorflow as tf
from absl import app, flags

from official_maskrcnn import runtime
from official_maskrcnn.data import decode_failures, label_maps, startup_checks
from official_maskrcnn.evaluation import coco_metrics
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from official_maskrcnn.training import checkpointing

FLAGS = flags.FLAGS  # --gin_file, --gin_param, --model_dir, --checkpoint: defined in `runtime`


class EvaluateError(RuntimeError):
    """Nothing to evaluate, or no ground truth configured."""


def checkpoint_step(path):
    """The step number of `.../ckpt-<step>` (None if the name has none)."""
    return checkpointing.checkpoint_step(path)


def evaluate_checkpoint(model_dir, checkpoint=None, settings=None):
    """Evaluates one checkpoint; returns (metrics, results, checkpoint path).

    Args:
      model_dir: the run's folder (checkpoints; outputs are written there).
      checkpoint: a checkpoint prefix or a folder (its newest readable one, falling back to
        older ones with a warning, as training does); None: the newest readable in model_dir.
      settings: a `runtime.RunSettings` (default: the one of the parsed gin config).
    """
    settings = settings or runtime.run_settings()
    annotations = settings.eval_annotations_file
    if not annotations:
        raise EvaluateError("no ground truth: set run.eval_annotations_file (the eval split's "
                            "COCO annotation JSON) in the config or with --gin_param")
    if not checkpoint and not checkpointing.list_checkpoints(model_dir)[0]:
        raise EvaluateError(f"no checkpoint in {model_dir} (and no --checkpoint given)")
    # Before the model is built: a missing checkpoint is reported at once.
    candidates = runtime.checkpoint_candidates(checkpoint or model_dir)
    # The ground truth's categories must be the run's label map (scores against shifted
    # categories would be wrong without any error), and give the model its class count.
    ground_truth_map = label_maps.from_annotations(
        coco_metrics.check_ground_truth_file(annotations))
    label_maps.check_same(runtime.saved_label_map(checkpoint or model_dir), ground_truth_map)
    label_maps.apply_num_classes(ground_truth_map, check=False)
    runtime.set_graph_rewrites(settings)
    strategy = runtime.build_strategy(settings)
    model = runtime.build_model(strategy, settings.precision)
    checkpoint = runtime.restore_model_weights(model, candidates)
    label_maps.check_model(ground_truth_map, model.settings.num_classes)
    builder = runtime.build_eval_dataset(settings.eval_global_batch_size)
    startup_checks.check_eval_ground_truth(builder, annotations, settings.eval_allow_subset)
    with decode_failures.named_decode_failures(builder):
        outputs = evaluator_lib.Evaluator(strategy, model, builder).predict()
    postprocessor = evaluator_lib.PostProcessor(annotations, settings.eval_processes,
                                                settings.coco_backend)
    try:
        metrics, columns = postprocessor.run(outputs)
    finally:
        postprocessor.close()
    return metrics, columns.to_dicts(), checkpoint


def write_outputs(model_dir, checkpoint, metrics, results):
    """Writes eval-<step>.metrics.json and eval-<step>.results.json; returns their paths."""
    step = checkpoint_step(checkpoint)
    stem = os.path.join(model_dir, f"eval-{step if step is not None else 'checkpoint'}")
    paths = stem + ".metrics.json", stem + ".results.json"
    with tf.io.gfile.GFile(paths[0], "w") as f:
        json.dump(dict(metrics, checkpoint=checkpoint, step=step), f, indent=1)
    with tf.io.gfile.GFile(paths[1], "w") as f:
        json.dump(results, f)
    return paths


def main(argv):
    del argv
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required")
    if not FLAGS.gin_file:
        raise app.UsageError("give at least one --gin_file (the training config)")
    try:
        runtime.parse_gin(FLAGS.gin_file, FLAGS.gin_param)
        metrics, results, checkpoint = evaluate_checkpoint(FLAGS.model_dir, FLAGS.checkpoint)
    except (EvaluateError, evaluator_lib.EvaluationError, *runtime.INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"checkpoint {checkpoint}: box AP {metrics['bbox']['AP']:.4f}, "
          f"mask AP {metrics['segm']['AP']:.4f}\n{coco_metrics.format_stats_table(metrics)}")
    for path in write_outputs(FLAGS.model_dir, checkpoint, metrics, results):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
