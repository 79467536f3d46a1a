"""The training loop on a tiny model: replica equivalence, NaN guard, callbacks, SIGTERM, resume.

(The hooks alone, and their order among the callbacks, are tested in test_hooks.py.)

Inputs are real parser output (a tiny synthetic COCO converted to records), fed through a fake
`train_data(epoch, start_batch)` so that each test controls exactly which batch each step sees.
"""

import dataclasses
import os
import signal
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.data import dataset_builder
from official_maskrcnn.modeling import factory
from official_maskrcnn.training import checkpointing, distribution
from official_maskrcnn.training import hooks as hooks_lib
from official_maskrcnn.training import optimizer as optimizer_lib
from official_maskrcnn.training import trainer as trainer_lib
from tests import synthetic_records

SIZE = 64  # min_size = max_size = 64: both orientations pad to 64 x 64
# Every anchor and every ROI candidate is sampled, so the sampling seed and an image's position
# in the batch do not matter: the replica-equivalence test then compares only the reduction.
EXHAUSTIVE = dict(
    num_classes=4, backbone_depth=18, backbone_norm="group_norm", freeze_at=0,
    fpn_num_filters=16, box_head_mlp_dim=32, mask_head_num_convs=1, mask_head_num_filters=8,
    rpn_batch_size_per_image=2048, rpn_positive_fraction=1.0, rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50, roi_num_samples=150, roi_fg_fraction=1.0)


def make_batches(root):
    """Two real training batches of 2 images each (dict of numpy arrays)."""
    pattern, _ = synthetic_records.write_split(root, "t", 8, seed=3, num_shards=1)
    builder = dataset_builder.DatasetBuilder(pattern, True, 2, min_size=SIZE, max_size=SIZE,
                                             seed=5)
    batches = []
    for batch in builder().take(2):
        batches.append({key: value.numpy() for key, value in batch.items()
                        if key != "source_id"})
    return batches


def duplicate_first_image(batch):
    return {key: np.repeat(value[:1], 2, axis=0) for key, value in batch.items()}


class LoopSettingsTest(tf.test.TestCase):

    def test_total_steps_is_capped_by_max_steps_when_given(self):
        settings = trainer_lib.LoopSettings(per_replica_batch_size=1, steps_per_epoch=5,
                                            num_epochs=3)
        self.assertEqual(settings.total_steps, 15)
        for max_steps, total in ((7, 7), (40, 15), (0, 15)):  # 0, like None: no cap
            self.assertEqual(dataclasses.replace(settings, max_steps=max_steps).total_steps,
                             total)

    def test_an_epoch_without_a_step_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "steps_per_epoch must be >= 1, found 0"):
            trainer_lib.LoopSettings(per_replica_batch_size=1, steps_per_epoch=0, num_epochs=1)

    def test_negative_nan_recovery_trials_are_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "nan_recovery_trials must be >= 0 .*found -1"):
            trainer_lib.LoopSettings(per_replica_batch_size=1, steps_per_epoch=1, num_epochs=1,
                                     nan_recovery_trials=-1)

    def test_the_step_variable_starts_at_zero_and_is_int64(self):
        step = trainer_lib.create_step_variable(tf.distribute.get_strategy())
        self.assertEqual((int(step.numpy()), step.dtype, step.trainable), (0, tf.int64, False))


class TrainerTestBase(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.batches = make_batches(cls.tmp)

    def build(self, strategy, settings=EXHAUSTIVE, learning_rate=0.01):
        with strategy.scope():
            tf_keras.utils.set_random_seed(1)
            model = factory.build_maskrcnn_model(**settings)
            model({k: tf.constant(v[:1]) for k, v in self.batches[0].items()}, training=True)
            optimizer = optimizer_lib.MomentumSGD(learning_rate)
        return model, optimizer

    def trainer(self, strategy, model, optimizer, feed, steps_per_epoch=2, num_epochs=2,
                steps_per_loop=10, trainer_class=trainer_lib.Trainer, nan_recovery_trials=0,
                **kwargs):
        """A Trainer whose epoch e, batch k is `feed(e, k)` (a dict of numpy arrays); `kwargs`
        go to the Trainer (step, checkpointer, hooks, callbacks, ...)."""
        def train_data(epoch, start_batch):
            batches = [feed(epoch, k) for k in range(start_batch, steps_per_epoch)]
            dataset = tf.data.Dataset.from_tensor_slices(
                {key: np.stack([b[key] for b in batches]) for key in batches[0]})
            dataset = dataset.unbatch().batch(2)
            return strategy.experimental_distribute_dataset(dataset)

        settings = trainer_lib.LoopSettings(
            per_replica_batch_size=2 // strategy.num_replicas_in_sync,
            steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
            steps_per_loop=steps_per_loop, jit_compile=False, seed=7,
            nan_recovery_trials=nan_recovery_trials)
        trainer = trainer_class(strategy, model, optimizer, train_data,
                                image_shapes=((SIZE, SIZE), (SIZE, SIZE)), settings=settings,
                                **kwargs)
        trainer.build()
        return trainer

    @staticmethod
    def checkpointing(strategy, model_dir, model, optimizer=None, every_n_steps=0):
        """(step variable, its Checkpointer, [PreemptionHook, CheckpointHook]) as train.py
        wires them."""
        step = trainer_lib.create_step_variable(strategy)
        objects = {"model": model, "step": step}
        if optimizer is not None:
            objects["optimizer"] = optimizer
        checkpointer = checkpointing.Checkpointer(model_dir, objects)
        checkpoints = hooks_lib.CheckpointHook(checkpointer, model, every_n_steps)
        hooks = [hooks_lib.PreemptionHook(strategy, save=checkpoints.save), checkpoints]
        return step, checkpointer, hooks


class _MisreducingTrainer(trainer_lib.Trainer):
    """A Trainer whose replica gradients are multiplied by `factor` (a variable, so that one
    trace serves every factor): 1 is the real Trainer; 2 forgets the division by the 2
    replicas, 0.5 divides twice. What the replica-equivalence comparison must reject."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with self.strategy.scope():
            self.factor = tf.Variable(1.0, dtype=tf.float64, trainable=False)

    def _forward_backward(self, inputs, seed):
        losses, grads = super()._forward_backward(inputs, seed)
        return losses, [g * tf.cast(self.factor, g.dtype) for g in grads]


class ReplicaEquivalenceTest(TrainerTestBase):
    """One replica with images [a, a] and two replicas with [a] each make the same update.

    Compared: the update w_after - w_before of one step, per variable, max |u_two - u_one| <=
    UPDATE_RTOL * max |u_one|. Exhaustive sampling makes the seed and position of an image
    irrelevant, so the two runs differ only in how the loss is normalised and reduced.

    The step runs in float64. In float32 the two runs' forward passes already differ by rounding
    (the same image in a batch of 2 or of 1 takes other kernel paths), and a ReLU whose input
    lies that close to 0 is open in one run and shut in the other: on an AMD EPYC two such flips
    in the mask head's upsampling changed the update of every backbone variable by ~3.5e-3
    (relative), 1000 times the rounding-level ~5e-6 of the RPN and box head variables; no
    accumulation-based tolerance covers that, and a tolerance that did would hide real
    normalisation bugs. In float64 the activations differ by ~1e-15, no gate flips, and the
    tolerance follows from rounding alone: the losses and box math stay float32 by design
    (DESIGN.md, Numerics), so each gradient element may pass a float32 island, where both runs
    round the same float64 value to the same float32 value unless it straddles a rounding
    boundary; one straddle moves an element by 2^-24 (6e-8) relative. UPDATE_RTOL = 1e-6 allows
    ~16 such ulps on a variable's largest element; float64 accumulation over the longest
    reduction here (S * Q^2 = 150 * 784 terms of the mask head) is bounded by n * 2^-53 ~ 1e-11.
    Seen: ~1e-14 (AMD EPYC). A reduction off by the replica count is off by 0.5 or 1
    (relative): 10^5 times the tolerance.
    """

    UPDATE_RTOL = 1e-6
    WRONG_FACTORS = (2.0, 0.5)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.batch = duplicate_first_image(cls.batches[0])
        cls.updates = None  # {"one": update, 1.0: update, 2.0: ..., 0.5: ...}

    def setUp(self):
        super().setUp()
        tf_keras.mixed_precision.set_global_policy("float64")
        self.initial = None
        if ReplicaEquivalenceTest.updates is None:
            ReplicaEquivalenceTest.updates = self.compute_updates()

    def tearDown(self):
        tf_keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    def compute_updates(self):
        """One step from the same start: one replica, then two replicas for each factor."""
        updates = {}
        for key, strategy, factors in [
                ("one", tf.distribute.OneDeviceStrategy("/cpu:0"), [1.0]),
                ("two", distribution.build_strategy("mirrored"), [1.0, *self.WRONG_FACTORS])]:
            model, optimizer = self.build(strategy)
            if self.initial is None:
                self.initial = {v.name: v.numpy() for v in model.variables}
            trainer = self.trainer(strategy, model, optimizer, lambda e, k: self.batch,
                                   steps_per_epoch=1, num_epochs=1,
                                   trainer_class=_MisreducingTrainer)
            for factor in factors:
                for variable in model.variables:
                    variable.assign(self.initial[variable.name])
                for variable in optimizer.variables:  # momentum and iterations: a fresh start
                    variable.assign(tf.zeros_like(variable))
                trainer.step.assign(0)
                trainer.factor.assign(factor)
                trainer.train()
                self.assertEqual(int(trainer.step.numpy()), 1)
                self.assertEqual({v.dtype for v in model.variables}, {tf.float64})
                updates[key if key == "one" else factor] = {
                    v.name: v.numpy() - self.initial[v.name] for v in model.variables}
        updates["initial"] = self.initial
        return updates

    @staticmethod
    def relative_errors(updates, expected):
        """Per variable: max |update - expected| / max |expected| (the error where both are 0)."""
        errors = {}
        for name, want in expected.items():
            scale = np.max(np.abs(want))
            error = np.max(np.abs(updates[name] - want))
            errors[name] = error / scale if scale > 0 else error
        return errors

    def test_two_replicas_with_one_image_each_update_as_one_replica_with_two(self):
        one, two, initial = self.updates["one"], self.updates[1.0], self.updates["initial"]
        for name, error in self.relative_errors(two, one).items():
            self.assertLessEqual(error, self.UPDATE_RTOL, msg=f"{name}: relative error {error:.3g}")
        # The update is far from zero in every part of the model (else a relative comparison
        # says little): some variable of each part moved by >= 1e-4 of its largest weight.
        for part in ("resnet", "fpn", "rpn_head", "box_head", "mask_head"):
            moved = max(np.max(np.abs(update)) / np.max(np.abs(initial[name]))
                        for name, update in one.items()
                        if f"/{part}/" in name and np.any(initial[name]))
            self.assertGreater(moved, 1e-4, msg=part)

    def test_the_comparison_rejects_a_reduction_off_by_the_replica_count(self):
        for factor in self.WRONG_FACTORS:  # not divided by the 2 replicas / divided twice
            worst = max(self.relative_errors(self.updates[factor], self.updates["one"]).values())
            self.assertGreater(worst, 0.3, msg=f"factor {factor}")


class LoopTest(TrainerTestBase):

    def setUp(self):
        super().setUp()
        self.strategy = tf.distribute.get_strategy()
        self.model, self.optimizer = self.build(self.strategy)

    def test_non_finite_step_stops_with_the_losses_and_rate_and_keeps_good_weights(self):
        # NaN pixels: ReLU maps them to 0 on CPU, so the loss can stay finite while the
        # group-norm gradients are NaN; the guard checks both.
        bad = dict(self.batches[1], images=np.full_like(self.batches[1]["images"], np.nan))
        snapshot = {}

        class Snapshot(tf_keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                snapshot[logs["step"]] = [v.numpy() for v in self.model.variables]

        model_dir = self.create_tempdir().full_path
        step, checkpointer, hooks = self.checkpointing(self.strategy, model_dir, self.model,
                                                       every_n_steps=2)
        trainer = self.trainer(self.strategy, self.model, self.optimizer,
                               lambda e, k: bad if k == 2 else self.batches[0],
                               steps_per_epoch=4, steps_per_loop=2, step=step,
                               checkpointer=checkpointer, hooks=hooks, callbacks=[Snapshot()])
        with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                    "non-finite step 3 ") as raised:
            trainer.train()
        message = str(raised.exception)
        for key in trainer_lib.ALL_LOSSES + ("learning_rate", "gradients NOT finite"):
            self.assertIn(key, message)
        # Step 3 ran in the same host call as step 4 would have, and was not applied.
        self.assertEqual(int(trainer.step.numpy()), 2)
        for value, saved in zip(self.model.variables, snapshot[2]):
            self.assertAllEqual(value, saved)
        self.assertTrue(trainer.checkpointer.latest.endswith("ckpt-2"))
        self.assertFalse(os.path.exists(os.path.join(model_dir, "ckpt-3.index")))

    def test_callbacks_see_every_event_and_stop_training_is_honoured(self):
        events = []

        class Recorder(tf_keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                events.append("train_begin")

            def on_epoch_begin(self, epoch, logs=None):
                events.append(f"epoch_begin {epoch}")

            def on_train_batch_end(self, batch, logs=None):
                events.append(f"batch_end {batch} step {logs['step']} n {logs['steps']}")
                if logs["step"] == 3:
                    self.model.stop_training = True

            def on_epoch_end(self, epoch, logs=None):
                events.append(f"epoch_end {epoch}")

            def on_train_end(self, logs=None):
                events.append("train_end")

        trainer = self.trainer(self.strategy, self.model, self.optimizer,
                               lambda e, k: self.batches[k % 2], steps_per_epoch=2,
                               num_epochs=3, steps_per_loop=1, callbacks=[Recorder()])
        logs = trainer.train()
        self.assertEqual(events, ["train_begin", "epoch_begin 0", "batch_end 0 step 1 n 1",
                                  "batch_end 1 step 2 n 1", "epoch_end 0", "epoch_begin 1",
                                  "batch_end 2 step 3 n 1", "epoch_end 1", "train_end"])
        self.assertEqual(logs["step"], 3)
        for key in trainer_lib.ALL_LOSSES:
            self.assertTrue(np.isfinite(logs[key]), key)

    def test_sigterm_checkpoints_at_the_host_call_boundary_and_resume_asks_for_that_batch(self):
        class Terminate(tf_keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if logs["step"] == 3:
                    os.kill(os.getpid(), signal.SIGTERM)

        model_dir = self.create_tempdir().full_path
        step, checkpointer, hooks = self.checkpointing(self.strategy, model_dir, self.model,
                                                       self.optimizer)
        trainer = self.trainer(self.strategy, self.model, self.optimizer,
                               lambda e, k: self.batches[k % 2], steps_per_epoch=3,
                               num_epochs=2, steps_per_loop=1, step=step,
                               checkpointer=checkpointer, hooks=hooks, callbacks=[Terminate()])
        with self.assertRaises(trainer_lib.Preempted) as raised:
            trainer.train()
        self.assertEqual(raised.exception.signum, signal.SIGTERM)
        self.assertEqual(raised.exception.step, 3)
        self.assertTrue(raised.exception.checkpoint.endswith("ckpt-3"))
        self.assertIs(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)  # handler restored

        model, optimizer = self.build(self.strategy)
        requested = []

        def feed(epoch, k):
            requested.append((epoch, k))
            return self.batches[k % 2]

        step, checkpointer, hooks = self.checkpointing(self.strategy, model_dir, model,
                                                       optimizer)
        resumed = self.trainer(self.strategy, model, optimizer, feed, steps_per_epoch=3,
                               num_epochs=2, steps_per_loop=1, step=step,
                               checkpointer=checkpointer, hooks=hooks)
        resumed.checkpointer.restore()
        self.assertEqual(int(resumed.step.numpy()), 3)
        self.assertEqual(int(optimizer.iterations.numpy()), 3)
        resumed.train()
        self.assertEqual(requested, [(1, 0), (1, 1), (1, 2)])  # epoch 2 from its first batch
        self.assertEqual(int(resumed.step.numpy()), 6)


class PrecisionAndXlaTest(TrainerTestBase):
    """Each policy / compilation mode trains two finite steps that change the float32 weights."""

    def tearDown(self):
        tf_keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    def train_two_steps(self, policy, jit_compile):
        tf_keras.mixed_precision.set_global_policy(policy)
        strategy = tf.distribute.get_strategy()
        model, optimizer = self.build(strategy)
        if policy == "mixed_float16":
            optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
        before = [v.numpy() for v in model.trainable_variables]
        trainer = self.trainer(strategy, model, optimizer, lambda e, k: self.batches[k],
                               steps_per_epoch=2, num_epochs=1, steps_per_loop=2)
        trainer._forward_backward_fn = tf.function(trainer._forward_backward,
                                                   jit_compile=jit_compile)
        logs = self.logs = trainer.train()
        for key in trainer_lib.ALL_LOSSES:
            self.assertTrue(np.isfinite(logs[key]), (policy, key, logs[key]))
        self.assertEqual(int(trainer.step.numpy()), 2)
        for variable in model.trainable_variables:
            self.assertEqual(variable.dtype, tf.float32)  # master weights stay float32
        changed = sum(not np.array_equal(a, b.numpy())
                      for a, b in zip(before, model.trainable_variables))
        self.assertGreater(changed, len(before) // 2)
        return model, optimizer

    def test_mixed_float16_with_dynamic_loss_scaling(self):
        model, optimizer = self.train_two_steps("mixed_float16", jit_compile=False)
        self.assertEqual(model.backbone.compute_dtype, "float16")
        self.assertGreater(float(optimizer.loss_scale.numpy()), 1.0)
        self.assertEqual(self.logs["loss_scale"], float(optimizer.loss_scale.numpy()))

    def test_mixed_bfloat16(self):
        model, _ = self.train_two_steps("mixed_bfloat16", jit_compile=False)
        self.assertEqual(model.backbone.compute_dtype, "bfloat16")
        self.assertNotIn("loss_scale", self.logs)  # no loss scaling

    def test_xla_compiled_step(self):
        self.train_two_steps("float32", jit_compile=True)


if __name__ == "__main__":
    tf.test.main()
