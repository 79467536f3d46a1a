"""Bounded NaN recovery: the tiny Mask R-CNN of test_trainer.py recovers twice (from the
initial state and from a mid-epoch checkpoint); a one-weight stand-in model (test_hooks.py)
checks the bound, K = 0, the resumed count, an exact resume after a recovery and two replicas.

The NaN is injected by `_PoisonedTrainer` where the sampling seed is one of a given set: a step
that only the unshifted seed makes non-finite, so that a recovery that did not shift the seed
would meet it again and use up its trials; a recovery that did sees it once.
"""

import io
import json
import os
import shutil
import signal

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.training import distribution, mlperf_logger, nan_recovery
from official_maskrcnn.training import trainer as trainer_lib
from tests.training.test_hooks import StandInModel
from tests.training.test_trainer import SIZE, TrainerTestBase


class _PoisonedTrainer(trainer_lib.Trainer):
    """A Trainer whose total_loss is NaN on the last replica at each (r, n) of `poisoned`: the
    1-based step n sampled with the seed shifted by r recoveries (`sampling_seed`).

    `grad_scale_by_shift`: the gradients are multiplied by 1 + r, so that the weights tell
    whether a run sampled with the seed shift it should have (the stand-in model has no
    sampling of its own).
    """

    def __init__(self, *args, poisoned=(), grad_scale_by_shift=False, **kwargs):
        self.poisoned = list(poisoned)
        self.grad_scale_by_shift = grad_scale_by_shift
        super().__init__(*args, **kwargs)

    def _forward_backward(self, inputs, seed):
        losses, grads = super()._forward_backward(inputs, seed)
        replicas = self.strategy.num_replicas_in_sync
        hit = tf.constant(False)
        for shift, step in self.poisoned:
            want = trainer_lib.sampling_seed(self.seed, shift, step - 1, replicas, replicas - 1)
            hit = hit | ((seed[0] == want[0]) & (seed[1] == want[1]))
        losses = dict(losses, total_loss=tf.where(hit, np.nan, losses["total_loss"]))
        if self.grad_scale_by_shift:
            factor = 1.0 + tf.cast((seed[0] - self.seed) // trainer_lib.SEED_SHIFT, tf.float32)
            grads = [g * tf.cast(factor, g.dtype) for g in grads]
        return losses, grads


class _EventHook(trainer_lib.Hook):
    """Records before_epoch and after_recovery (with the weights and the optimizer's step the
    recovery left)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.epochs, self.recoveries, self.restored_weights, self.optimizer_steps = [], [], [], []

    def before_epoch(self, epoch, step):
        self.epochs.append((epoch, step))

    def after_recovery(self, recovery):
        self.recoveries.append(recovery)
        self.restored_weights.append([v.numpy() for v in self.model.variables])
        self.optimizer_steps.append(int(self.optimizer.iterations.numpy()))


class _WeightsByStep(tf_keras.callbacks.Callback):
    """The weights when step s was first reached (0: at train begin)."""

    def __init__(self):
        super().__init__()
        self.by_step = {}

    def on_train_begin(self, logs=None):
        self.by_step.setdefault(0, [v.numpy() for v in self.model.variables])

    def on_train_batch_end(self, batch, logs=None):
        self.by_step.setdefault(logs["step"], [v.numpy() for v in self.model.variables])


class SamplingSeedTest(tf.test.TestCase):

    def test_no_recovery_is_the_old_seed_and_each_recovery_shifts_the_first_word(self):
        self.assertEqual(trainer_lib.sampling_seed(7, 0, 3, 2, 1), [7, 7])
        self.assertEqual(trainer_lib.sampling_seed(7, 2, 3, 2, 1), [7 + 2 * 2**32, 7])


class MaskRCNNRecoveryTest(TrainerTestBase):
    """The tiny Mask R-CNN, K = 2: a NaN at step 2 before any checkpoint but the initial one,
    then (seed shifted once) one at step 4 after the periodic checkpoint 2."""

    def test_two_nan_steps_are_recovered_and_the_run_reaches_total_steps(self):
        strategy = tf.distribute.get_strategy()
        model, optimizer = self.build(strategy)
        model_dir = self.create_tempdir().full_path
        step, checkpointer, hooks = self.checkpointing(strategy, model_dir, model, optimizer,
                                                       every_n_steps=2)
        events = _EventHook(model, optimizer)
        console = io.StringIO()
        mllog = mlperf_logger.MLPerfLogger(os.path.join(model_dir, "mlperf.log"))
        hooks += [events, nan_recovery.RecoveryLog(model_dir, mllog, console, run_id="r1")]
        requested = []

        def feed(epoch, k):
            requested.append((epoch, k))
            return self.batches[k % 2]

        weights = _WeightsByStep()
        trainer = self.trainer(strategy, model, optimizer, feed, steps_per_epoch=4,
                               num_epochs=2, steps_per_loop=2, trainer_class=_PoisonedTrainer,
                               step=step, checkpointer=checkpointer, hooks=hooks,
                               callbacks=[weights], nan_recovery_trials=2,
                               poisoned=[(0, 2), (1, 4)])
        logs = trainer.train()
        mllog.close()

        self.assertEqual((logs["step"], int(step.numpy())), (8, 8))
        self.assertEqual(int(trainer.recoveries.numpy()), 2)
        first, second = events.recoveries
        self.assertEqual((first.trial, first.trials, first.failed_step, first.restored_step),
                         (1, 2, 2, 0))
        self.assertTrue(first.checkpoint.endswith("ckpt-0"))  # saved before the first step
        self.assertEqual((second.trial, second.failed_step, second.restored_step,
                          second.restored_epoch, second.restored_batch), (2, 4, 2, 1, 2))
        self.assertTrue(second.checkpoint.endswith("ckpt-2"))
        self.assertTrue(np.isnan(first.losses["total_loss"]))
        # The restore: the weights the run had when it first reached the restored step, and
        # the optimizer's step with them (momentum and schedule restored too).
        for recovery, restored in zip(events.recoveries, events.restored_weights):
            for value, saved in zip(restored, weights.by_step[recovery.restored_step]):
                self.assertAllEqual(value, saved)
        self.assertEqual(events.optimizer_steps, [0, 2])
        # The data restarts at the restored step's epoch and batch; epoch events once each.
        self.assertEqual(requested, [(0, k) for k in range(4)] * 2 + [(0, 2), (0, 3)]
                         + [(1, k) for k in range(4)])
        self.assertEqual(events.epochs, [(0, 0), (1, 4)])

        self.assertEqual(nan_recovery.recoveries_done(model_dir), 2)
        records = nan_recovery.read_records(model_dir)
        self.assertEqual([(r["trial"], r["failed_step"], r["restored_step"], r["seed_shift"])
                          for r in records], [(1, 2, 0, 1), (2, 4, 2, 2)])
        self.assertEqual(records[0]["losses"]["total_loss"], "nan")
        self.assertEqual(records[0]["run_id"], "r1")
        lines = console.getvalue().splitlines()
        self.assertLen(lines, 2)
        self.assertRegex(lines[1], r"^nan recovery 2 of 2: step 4 \(epoch 1\) was not finite "
                                   r"\(rpn_score_loss=\S+, .*total_loss=nan; gradients finite\)"
                                   r" and was not applied; restored \S+ckpt-2 \(step 2\), "
                                   r"training again from epoch 1, batch 2 with the sampling "
                                   r"seed shifted by 2$")
        with open(os.path.join(model_dir, "mlperf.log")) as f:
            notes = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in f]
        self.assertEqual([(n["key"], n["value"]) for n in notes], [
            ("nan_recovery", {"failed_step": 2, "restored_step": 0, "trial": 1, "trials": 2}),
            ("nan_recovery", {"failed_step": 4, "restored_step": 2, "trial": 2, "trials": 2})])


class StandInRecoveryTest(tf.test.TestCase):
    """The bound, K = 0, the resumed count and exact resume, on a one-weight model."""

    STEPS_PER_EPOCH = 3

    def setUp(self):
        super().setUp()
        self.images = np.random.default_rng(0).random(
            [2, self.STEPS_PER_EPOCH, 2, SIZE, SIZE, 3], np.float32)

    def trainer(self, model_dir, trials, poisoned, strategy=None, recoveries=0, callbacks=(),
                grad_scale_by_shift=False):
        strategy = strategy or tf.distribute.get_strategy()
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            tf_keras.utils.set_random_seed(1)
            model = StandInModel()
            model({"images": tf.zeros([1, SIZE, SIZE, 3])})
            optimizer = tf_keras.optimizers.SGD(0.01)
        step, checkpointer, hooks = TrainerTestBase.checkpointing(strategy, model_dir, model,
                                                                  optimizer)
        self.console = io.StringIO()
        hooks.append(nan_recovery.RecoveryLog(model_dir, stream=self.console))

        def train_data(epoch, start_batch):
            dataset = tf.data.Dataset.from_tensor_slices(
                {"images": self.images[epoch, start_batch:].reshape([-1, SIZE, SIZE, 3])})
            return strategy.experimental_distribute_dataset(dataset.batch(2))

        settings = trainer_lib.LoopSettings(
            per_replica_batch_size=2 // replicas, steps_per_epoch=self.STEPS_PER_EPOCH,
            num_epochs=2, steps_per_loop=1, jit_compile=False, seed=7,
            nan_recovery_trials=trials)
        trainer = _PoisonedTrainer(
            strategy, model, optimizer, train_data, ((SIZE, SIZE), (SIZE, SIZE)), settings,
            step=step, checkpointer=checkpointer, hooks=hooks, callbacks=list(callbacks),
            recoveries=recoveries, poisoned=poisoned, grad_scale_by_shift=grad_scale_by_shift)
        trainer.build()
        checkpointer.restore()
        return trainer

    def test_without_recovery_the_first_nan_ends_the_run_as_before(self):
        model_dir = self.create_tempdir().full_path
        trainer = self.trainer(model_dir, 0, poisoned=[(0, 2)])
        with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                    r"non-finite step 2 .*the newest checkpoint is None\.$"):
            trainer.train()
        self.assertEqual(int(trainer.step.numpy()), 1)
        self.assertEqual(os.listdir(model_dir), [])  # no initial checkpoint, no record

    def test_the_nan_after_k_recoveries_fails_saying_they_were_used(self):
        model_dir = self.create_tempdir().full_path
        trainer = self.trainer(model_dir, 1, poisoned=[(0, 2), (1, 5)])
        with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                    r"^non-finite step 5 \(epoch 2\).* No NaN recovery left: "
                                    r"the run used 1 of 1 \(run.nan_recovery_trials = 1\)\.$"
                                    ) as raised:
            trainer.train()
        self.assertEqual(raised.exception.step, 5)
        self.assertIsInstance(raised.exception.__cause__, trainer_lib.NonFiniteLossError)
        self.assertEqual(int(trainer.step.numpy()), 4)  # not restored: nothing left to try
        self.assertEqual(nan_recovery.recoveries_done(model_dir), 1)
        self.assertIn("nan recovery 1 of 1: step 2 (epoch 1)", self.console.getvalue())

    def test_a_resumed_process_continues_the_count(self):
        model_dir = self.create_tempdir().full_path
        trainer = self.trainer(model_dir, 1, poisoned=[(1, 2)], recoveries=1)
        with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                    r"non-finite step 2 .*the run used 1 of 1 "):
            trainer.train()

    def test_a_run_resumed_after_a_recovery_ends_as_the_uninterrupted_one(self):
        # NaN at step 2, recovered from checkpoint 0; then SIGTERM at step 4 (checkpoint 4).
        def final_weights(trainer):
            trainer.train()
            self.assertEqual(int(trainer.step.numpy()), 6)
            return [v.numpy() for v in trainer.model.variables]

        poisoned = [(0, 2)]
        uninterrupted = final_weights(self.trainer(self.create_tempdir().full_path, 2,
                                                   poisoned, grad_scale_by_shift=True))

        class Terminate(tf_keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if logs["step"] == 4:
                    os.kill(os.getpid(), signal.SIGTERM)

        model_dir = self.create_tempdir().full_path
        with self.assertRaises(trainer_lib.Preempted):
            self.trainer(model_dir, 2, poisoned, callbacks=[Terminate()],
                         grad_scale_by_shift=True).train()
        done = nan_recovery.recoveries_done(model_dir)
        self.assertEqual(done, 1)
        # The comparison can fail: a resumed process that forgot the count (no seed shift).
        forgot_dir = os.path.join(self.create_tempdir().full_path, "copy")
        shutil.copytree(model_dir, forgot_dir)
        forgot = final_weights(self.trainer(forgot_dir, 2, poisoned, grad_scale_by_shift=True))
        self.assertNotAllClose(forgot, uninterrupted)

        resumed = self.trainer(model_dir, 2, poisoned, recoveries=done,
                               grad_scale_by_shift=True)
        self.assertEqual(int(resumed.step.numpy()), 4)
        for value, want in zip(final_weights(resumed), uninterrupted):
            self.assertAllEqual(value, want)

    def test_a_nan_on_one_of_two_replicas_is_recovered_on_both(self):
        strategy = distribution.build_strategy("mirrored")
        self.assertEqual(strategy.num_replicas_in_sync, 2)
        trainer = self.trainer(self.create_tempdir().full_path, 1, poisoned=[(0, 2)],
                               strategy=strategy)
        trainer.train()
        self.assertEqual((int(trainer.step.numpy()), int(trainer.recoveries.numpy())), (6, 1))
        self.assertIn("nan recovery 1 of 1: step 2 (epoch 1) was not finite",
                      self.console.getvalue())


if __name__ == "__main__":
    tf.test.main()
