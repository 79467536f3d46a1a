"""The entry layer: run settings from gin, the graph rewrites they set, the strategy rule,
checkpoint resolution and restore errors (with the training's fallback for a folder), and the one
inference preprocessing (`EvalParser.preprocess_image`)."""

import glob
import logging
import os

import gin
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from official_maskrcnn import runtime
from official_maskrcnn.data import decoder, parsers
from official_maskrcnn.modeling import factory
from official_maskrcnn.training import checkpointing
from official_maskrcnn.training import optimizer as optimizer_lib
from tests.data.test_preprocess_ops import make_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_classes=3, backbone_depth=18, backbone_norm="group_norm", freeze_at=0,
            fpn_num_filters=8, box_head_mlp_dim=8, mask_head_num_convs=1,
            mask_head_num_filters=8)


class RunSettingsTest(tf.test.TestCase):

    def tearDown(self):
        gin.clear_config()
        super().tearDown()

    def test_gin_bindings_then_overrides(self):
        gin.parse_config(["run.num_epochs = 3", "run.eval_batch_size = 4"])
        settings = runtime.run_settings()
        self.assertEqual(settings.num_epochs, 3)
        self.assertEqual(settings.global_batch_size, 16)  # the default
        self.assertEqual(settings.eval_global_batch_size, 4)
        self.assertEqual(runtime.run_settings(num_epochs=7).num_epochs, 7)
        self.assertEqual(runtime.run_settings(eval_batch_size=None).eval_global_batch_size, 16)

    def test_bad_values_name_the_setting(self):
        with self.assertRaisesRegex(ValueError, "run.precision: .* found 'float64'"):
            runtime.run_settings(precision="float64")
        with self.assertRaisesRegex(ValueError, "run.strategy: .* found 'tpu'"):
            runtime.run_settings(strategy="tpu")
        with self.assertRaisesRegex(ValueError, "run.coco_backend: .*faster_coco_eval.* found "
                                    "'fast'"):
            runtime.run_settings(coco_backend="fast")
        for trials in (-1, 1.5, None):
            with self.assertRaisesRegex(ValueError, r"run.nan_recovery_trials: expected an "
                                        rf"integer >= 0 \(0: off\), found {trials!r}"):
                runtime.run_settings(nan_recovery_trials=trials)
        for bad in (-1, 1.5, True, None):
            with self.assertRaisesRegex(ValueError, r"run.summary_images: expected an integer "
                                        rf">= 0 \(0: no images\), found {bad!r}"):
                runtime.run_settings(summary_images=bad)
        self.assertEqual(runtime.run_settings(summary_images=0).summary_images, 0)

    def test_only_the_config_that_evaluates_a_subset_allows_one(self):
        # MLPerf evaluates the entire validation set: the recipe must never allow a subset;
        # coco128_overfit evaluates 16 of its JSON's 128 images, on purpose.
        self.assertFalse(runtime.run_settings().eval_allow_subset)  # the default
        for name, allowed in (("mlperf_r50_fpn", False), ("smoke_cpu", False), ("demo", False),
                              ("coco128_overfit", True)):
            gin.clear_config()
            runtime.parse_gin([os.path.join(REPO, "configs", f"{name}.gin")], [])
            self.assertEqual(runtime.run_settings().eval_allow_subset, allowed, name)

    def test_nan_recovery_is_off_by_default_and_in_the_mlperf_recipe(self):
        self.assertEqual(runtime.run_settings().nan_recovery_trials, 0)
        runtime.parse_gin([os.path.join(REPO, "configs", "mlperf_r50_fpn.gin")], [])
        self.assertEqual(runtime.run_settings().nan_recovery_trials, 0)
        self.assertEqual(runtime.run_settings(nan_recovery_trials=3).nan_recovery_trials, 3)

    def test_mirrored_over_zero_gpus_is_the_default_strategy(self):
        strategy = runtime.build_strategy(runtime.run_settings(strategy="mirrored", num_gpus=0))
        self.assertIs(strategy, tf.distribute.get_strategy())
        two = runtime.build_strategy(runtime.run_settings(strategy="mirrored"))
        self.assertEqual(two.num_replicas_in_sync, 2)  # the two logical CPUs of conftest


def optimized_op_types(function, *args):
    """The op types of the graphs TensorFlow ran for one call of `function`, after Grappler."""
    tf_context = context.context()
    tf_context.enable_run_metadata()
    try:
        function(*args)
        metadata = tf_context.export_run_metadata()
    finally:
        tf_context.disable_run_metadata()
    return {node.op for graph in metadata.function_graphs
            for node in graph.post_optimization_graph.node}


class GraphRewritesTest(tf.test.TestCase):

    def test_the_memory_optimizer_setting_decides_if_a_sum_accumulates_in_arrival_order(self):
        self.assertIs(runtime.RunSettings().grappler_memory_optimizer, False)
        # Four live 64 MiB summands: above 80 % of the 256 MiB TensorFlow declares for a CPU,
        # the memory optimizer's threshold for rewriting an AddN into an accumulation into a
        # TemporaryVariable, in the order the summands arrive.
        values = tf.ones([16 * 1024 * 1024])
        try:
            for enabled in (True, False):
                runtime.set_graph_rewrites(
                    runtime.RunSettings(grappler_memory_optimizer=enabled))

                @tf.function
                def sum_of_four(x):
                    return tf.reduce_sum(tf.add_n([x * float(k) for k in range(1, 5)]))

                self.assertEqual("TemporaryVariable" in optimized_op_types(sum_of_four, values),
                                 enabled)
        finally:
            runtime.set_graph_rewrites(runtime.RunSettings())


class CheckpointTest(tf.test.TestCase):

    def test_resolve_a_prefix_or_the_newest_in_a_folder(self):
        folder = self.create_tempdir().full_path
        with self.assertRaisesRegex(runtime.CheckpointNotFoundError,
                                    "no checkpoint in this folder"):
            runtime.resolve_checkpoint(folder)
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(x=tf.Variable(1.0)), folder, 3)
        first, second = manager.save(), manager.save()
        self.assertEqual(runtime.resolve_checkpoint(folder), second)
        self.assertEqual(runtime.resolve_checkpoint(first), first)
        with self.assertRaisesRegex(runtime.CheckpointNotFoundError,
                                    f"no such checkpoint .*{os.path.basename(first)}x.index"):
            runtime.resolve_checkpoint(first + "x")

    def test_restore_of_another_model_names_the_checkpoint(self):
        model = factory.build_maskrcnn_model(**TINY)
        model(runtime.dummy_training_inputs(), training=True)
        prefix = tf.train.Checkpoint(model=model).save(
            os.path.join(self.create_tempdir().full_path, "ckpt"))
        runtime.restore_model_weights(model, prefix)  # its own checkpoint: fine
        wider = factory.build_maskrcnn_model(**dict(TINY, fpn_num_filters=16))
        wider(runtime.dummy_training_inputs(), training=True)
        with self.assertRaisesRegex(runtime.CheckpointMismatchError,
                                    f"{prefix} does not hold this config's model"):
            runtime.restore_model_weights(wider, prefix)


def tiny_model(**overrides):
    model = factory.build_maskrcnn_model(**dict(TINY, **overrides))
    model(runtime.dummy_training_inputs(), training=True)
    return model


def save_training_checkpoints(model, folder, steps):
    """Checkpoints as training writes them: model, optimizer slots and step."""
    optimizer = optimizer_lib.MomentumSGD(0.01)
    optimizer.build(model.trainable_variables)
    checkpointer = checkpointing.Checkpointer(
        folder, {"model": model, "optimizer": optimizer, "step": tf.Variable(0, tf.int64)})
    return [checkpointer.save(step, []) for step in steps]


class CountMessages(logging.Handler):
    def __init__(self, fragment):
        super().__init__()
        self.fragment = fragment
        self.count = 0

    def emit(self, record):
        self.count += self.fragment in record.getMessage()


class RestoreFallbackTest(tf.test.TestCase):
    """restore_model_weights on a folder: the training's fallback; on a prefix: that one only."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tiny_model()

    def test_a_folder_falls_back_past_a_truncated_newest_checkpoint(self):
        folder = self.create_tempdir().full_path
        first, second = save_training_checkpoints(self.model, folder, [1, 2])
        with open(glob.glob(second + ".data-*")[0], "r+b") as f:
            f.truncate(100)  # a copy cut short
        unrestored = CountMessages("could not be found in the restored object")
        tf.get_logger().addHandler(unrestored)
        try:
            with self.assertLogs(level="WARNING") as logs:
                restored = runtime.restore_model_weights(self.model, folder)
        finally:
            tf.get_logger().removeHandler(unrestored)
        self.assertEqual(restored, first)
        self.assertEqual(unrestored.count, 0)  # one warning, not one per value
        self.assertIn(f"checkpoint {second} cannot be restored", "\n".join(logs.output))
        # Named explicitly, the truncated one is one clear error naming it, not an IndexError.
        with self.assertRaises(checkpointing.CheckpointError) as raised:
            runtime.restore_model_weights(self.model, second)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"{second}: IndexError: Read less bytes than requested", message)

    def test_an_empty_or_missing_folder_is_a_clear_error(self):
        folder = self.create_tempdir().full_path
        with self.assertRaisesRegex(runtime.CheckpointNotFoundError,
                                    "no checkpoint in this folder"):
            runtime.restore_model_weights(self.model, folder)

    def test_another_class_count_is_one_line_without_tensorflow_warnings(self):
        folder = self.create_tempdir().full_path
        (prefix,) = save_training_checkpoints(self.model, folder, [5])
        self.assertEqual(tf.train.load_checkpoint(prefix).get_variable_to_shape_map()[
            runtime.CLASS_LOGITS_BIAS_KEY], [3])  # the key the class count is read from
        for other, expected in ((tiny_model(num_classes=5),
                                 f"{prefix} holds a model of 3 classes, the config builds 5"),
                                (tiny_model(fpn_num_filters=16),
                                 f"{prefix} does not hold this config's model")):
            unrestored = CountMessages("could not be found in the restored object")
            tf.get_logger().addHandler(unrestored)
            try:
                with self.assertRaises(runtime.CheckpointMismatchError) as raised:
                    runtime.restore_model_weights(other, folder)
            finally:
                tf.get_logger().removeHandler(unrestored)
            self.assertStartsWith(str(raised.exception), expected)
            self.assertNotIn("\n", str(raised.exception))
            self.assertEqual(unrestored.count, 0)


class InferencePreprocessingTest(tf.test.TestCase):

    def test_records_and_decoded_images_get_the_same_inputs(self):
        parser = parsers.EvalParser(min_size=64, max_size=96)
        rng = np.random.default_rng(0)
        for shape in ((50, 70, 3), (90, 40, 3)):  # landscape, portrait
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            parsed = decoder.parse_example(tf.constant(make_record(image, [])))
            from_record = parser(parsed)
            direct = parser.preprocess_image(decoder.decode_image(parsed["encoded_image"]))
            self.assertEqual(set(from_record) - set(direct), {"source_id", "is_valid"})
            for key, value in direct.items():
                self.assertAllEqual(value, from_record[key], msg=f"{shape} {key}")
            self.assertAllEqual(direct["original_size"], shape[:2])
            portrait = shape[0] >= shape[1]
            self.assertEqual(direct["images"].shape[0] > direct["images"].shape[1], portrait)
