"""The loop's hooks alone (fakes for the logger and the checkpointer), then their order among
the Keras callbacks in a real Trainer running a one-weight stand-in model.

The expected step lists are worked out by hand in each test from the rule being tested.
"""

import os
import signal

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.training import hooks as hooks_lib
from official_maskrcnn.training import trainer as trainer_lib


class RecordingLogger:
    """Stands in for `mlperf_logger.MLPerfLogger`: records the epoch events in `events`."""

    def __init__(self, events=None):
        self.events = [] if events is None else events

    def epoch_start(self, epoch_num):
        self.events.append(f"epoch_start {epoch_num}")

    def epoch_stop(self, epoch_num):
        self.events.append(f"epoch_stop {epoch_num}")


class CountingCheckpointer:
    """Stands in for `checkpointing.Checkpointer`: records the step of each save in `events`."""

    def __init__(self, events=None):
        self.events = [] if events is None else events
        self.saved = []
        self.variables = None

    @property
    def latest(self):
        return f"ckpt-{self.saved[-1]}" if self.saved else None

    def save(self, step, variables):
        self.saved.append(step)
        self.variables = variables
        self.events.append(f"save {step}")
        return f"ckpt-{step}"


class MLPerfEpochHookTest(tf.test.TestCase):

    def test_epochs_are_logged_one_based(self):
        logger = RecordingLogger()
        hook = hooks_lib.MLPerfEpochHook(logger)
        hook.before_epoch(0, 0)
        hook.after_epoch(0, 4, 4)
        hook.before_epoch(1, 4)
        hook.after_epoch(1, 6, 8)  # cut short by stop_training: still closed
        self.assertEqual(logger.events, ["epoch_start 1", "epoch_stop 1", "epoch_start 2",
                                         "epoch_stop 2"])


class CheckpointHookTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.model = tf_keras.Sequential([tf_keras.layers.Dense(1)])
        self.model.build([None, 2])
        self.checkpointer = CountingCheckpointer()

    def run_epoch(self, hook, host_call_ends, epoch_end):
        """An epoch from step 0: host calls ending at `host_call_ends`, then the epoch's end."""
        previous = 0
        for step in host_call_ends:
            hook.after_host_call(step, step - previous, epoch_end)
            previous = step
        hook.after_epoch(0, host_call_ends[-1], epoch_end)

    def test_periodic_saves_fall_on_host_call_boundaries_and_not_on_the_epoch_end(self):
        # N = 4, 3 steps per host call, an epoch of 10 steps: calls end at 3, 6, 9, 10.
        # 3 crosses no multiple of 4; 6 crosses 4; 9 crosses 8; 10 is the epoch's end (the
        # epoch-end save).
        hook = hooks_lib.CheckpointHook(self.checkpointer, self.model, every_n_steps=4)
        self.run_epoch(hook, [3, 6, 9, 10], epoch_end=10)
        self.assertEqual(self.checkpointer.saved, [6, 9, 10])
        self.assertEqual(self.checkpointer.variables, self.model.variables)

    def test_a_multiple_at_the_epoch_end_is_saved_once(self):
        # N = 2, 2 steps per call, an epoch of 4 steps: 2 crosses 2 (periodic); 4 crosses 4 but
        # is the epoch's end, saved by the epoch-end rule only.
        hook = hooks_lib.CheckpointHook(self.checkpointer, self.model, every_n_steps=2)
        self.run_epoch(hook, [2, 4], epoch_end=4)
        self.assertEqual(self.checkpointer.saved, [2, 4])

    def test_without_n_only_epoch_ends_are_saved(self):
        hook = hooks_lib.CheckpointHook(self.checkpointer, self.model)
        self.run_epoch(hook, [1, 2, 3], epoch_end=3)
        self.assertEqual(self.checkpointer.saved, [3])

    def test_an_epoch_cut_short_gets_no_epoch_end_checkpoint(self):
        hook = hooks_lib.CheckpointHook(self.checkpointer, self.model)
        hook.after_host_call(2, 2, 10)
        hook.after_epoch(0, 2, 10)  # stop_training after step 2 of 10
        self.assertEqual(self.checkpointer.saved, [])


class OtherWorkerSignalled:
    """Stands in for a two-worker strategy whose other worker was signalled: the all-reduced
    count of signalled workers is this worker's flag + 1."""

    def run(self, fn):
        return fn()

    def reduce(self, op, value, axis):
        del op, axis
        return value + 1.0


class PreemptionHookTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.saved = []
        self.strategy = tf.distribute.get_strategy()

    def save(self, step):
        self.saved.append(step)
        return f"ckpt-{step}"

    def test_without_a_signal_nothing_happens(self):
        hook = hooks_lib.PreemptionHook(self.strategy, save=self.save)
        hook.after_host_call(5, 5, 10)
        self.assertEqual(self.saved, [])

    def test_a_real_sigterm_saves_then_raises_with_the_step_and_restores_the_handler(self):
        def previous(signum, frame):
            raise AssertionError("the hook's handler should be installed")

        old = signal.signal(signal.SIGTERM, previous)
        try:
            hook = hooks_lib.PreemptionHook(self.strategy, save=self.save)
            hook.before_train()
            os.kill(os.getpid(), signal.SIGTERM)
            self.assertEqual(hook.signum, signal.SIGTERM)  # only flagged: nothing saved yet
            self.assertEqual(self.saved, [])
            with self.assertRaises(trainer_lib.Preempted) as raised:
                hook.after_host_call(7, 1, 10)
            hook.after_train()
            self.assertIs(signal.getsignal(signal.SIGTERM), previous)
        finally:
            signal.signal(signal.SIGTERM, old)
        self.assertEqual(self.saved, [7])
        self.assertEqual((raised.exception.signum, raised.exception.step,
                          raised.exception.checkpoint), (signal.SIGTERM, 7, "ckpt-7"))

    def test_sigint_is_reported_as_sigint_and_without_save_there_is_no_checkpoint(self):
        hook = hooks_lib.PreemptionHook(self.strategy)
        hook.signum = signal.SIGINT  # what the handler does
        with self.assertRaises(trainer_lib.Preempted) as raised:
            hook.after_host_call(3, 1, 10)
        self.assertEqual((raised.exception.signum, raised.exception.checkpoint),
                         (signal.SIGINT, None))

    def test_workers_agree_through_the_all_reduce(self):
        # The real reduction over this process: nobody signalled, nobody stops; the local
        # signal keeps its number.
        hook = hooks_lib.PreemptionHook(self.strategy, num_workers=2, save=self.save)
        self.assertEqual(hook.stop_requested(), 0)
        hook.signum = signal.SIGINT
        self.assertEqual(hook.stop_requested(), signal.SIGINT)
        # Another worker was signalled: this one stops too, at the same step, with a checkpoint.
        hook = hooks_lib.PreemptionHook(OtherWorkerSignalled(), num_workers=2, save=self.save)
        with self.assertRaises(trainer_lib.Preempted) as raised:
            hook.after_host_call(4, 2, 10)
        self.assertEqual((raised.exception.signum, raised.exception.step), (signal.SIGTERM, 4))
        self.assertEqual(self.saved, [4])
        # One worker alone decides by its own flag, without a collective.
        self.assertEqual(hooks_lib.PreemptionHook(OtherWorkerSignalled()).stop_requested(), 0)


SIZE = 8
LOSS_SCALE = {name: float(i + 1) for i, name in enumerate(trainer_lib.ALL_LOSSES)}


class StandInModel(tf_keras.Model):
    """Stands in for `MaskRCNNModel` in the loop: one Dense layer, the six named losses
    (finite, different), and the `seed` input accepted and ignored."""

    def __init__(self):
        super().__init__()
        self.dense = tf_keras.layers.Dense(1)

    def call(self, inputs, training=False):
        pooled = tf.reduce_mean(inputs["images"], axis=[1, 2])  # [batch, 3]
        loss = tf.reduce_mean(tf.square(self.dense(pooled) - 1.0))
        return {name: scale * loss for name, scale in LOSS_SCALE.items()}


class Recorder(tf_keras.callbacks.Callback):
    """Records the callback events into a shared list; may act at a given step."""

    def __init__(self, events, at_step=None, action=None):
        super().__init__()
        self.events = events
        self.at_step = at_step
        self.action = action

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(f"batch_end step {logs['step']}")
        if logs["step"] == self.at_step:
            self.action(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(f"epoch_end {epoch}")

    def on_train_end(self, logs=None):
        self.events.append("train_end")


class HookOrderTest(tf.test.TestCase):
    """The hooks as train.py orders them, among the callbacks of a real Trainer."""

    def run_trainer(self, steps_per_epoch=3, num_epochs=2, steps_per_loop=2, every_n_steps=2,
                    at_step=None, action=None):
        strategy = tf.distribute.get_strategy()
        model = StandInModel()
        model({"images": tf.zeros([1, SIZE, SIZE, 3])})
        events = []
        self.checkpointer = CountingCheckpointer(events)
        checkpoints = hooks_lib.CheckpointHook(self.checkpointer, model, every_n_steps)
        self.preemption = hooks_lib.PreemptionHook(strategy, save=checkpoints.save)
        hooks = [hooks_lib.MLPerfEpochHook(RecordingLogger(events)), self.preemption,
                 checkpoints]
        images = np.random.default_rng(0).random([steps_per_epoch, SIZE, SIZE, 3], np.float32)

        def train_data(epoch, start_batch):
            dataset = tf.data.Dataset.from_tensor_slices({"images": images[start_batch:]})
            return strategy.experimental_distribute_dataset(dataset.batch(1))

        settings = trainer_lib.LoopSettings(
            per_replica_batch_size=1, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
            steps_per_loop=steps_per_loop, jit_compile=False)
        trainer = trainer_lib.Trainer(
            strategy, model, tf_keras.optimizers.SGD(0.01), train_data,
            ((SIZE, SIZE), (SIZE, SIZE)), settings, checkpointer=self.checkpointer, hooks=hooks,
            callbacks=[Recorder(events, at_step, action)])
        trainer.build()
        return trainer, events

    def test_epoch_events_checkpoints_and_callbacks_interleave_as_in_the_reference_run(self):
        # 3 steps per epoch, 2 per host call, N = 2: calls end at 2 (crosses 2: periodic save)
        # and 3 (the epoch's end); then 5 (crosses 4) and 6 (the end).
        trainer, events = self.run_trainer()
        trainer.train()
        self.assertEqual(events, [
            "train_begin",
            "epoch_start 1", "epoch_begin 0", "batch_end step 2", "save 2", "batch_end step 3",
            "epoch_stop 1", "save 3", "epoch_end 0",
            "epoch_start 2", "epoch_begin 1", "batch_end step 5", "save 5", "batch_end step 6",
            "epoch_stop 2", "save 6", "epoch_end 1",
            "train_end"])

    def test_a_stop_request_saves_once_after_the_callbacks_then_raises(self):
        # Flagged during step 2's callbacks, where a periodic save is also due: one save.
        def flag(model):
            self.preemption.signum = signal.SIGTERM

        trainer, events = self.run_trainer(at_step=2, action=flag)
        with self.assertRaises(trainer_lib.Preempted) as raised:
            trainer.train()
        self.assertEqual(events, ["train_begin", "epoch_start 1", "epoch_begin 0",
                                  "batch_end step 2", "save 2"])
        self.assertEqual((raised.exception.step, raised.exception.checkpoint), (2, "ckpt-2"))
        self.assertEqual(int(trainer.step.numpy()), 2)

    def test_stop_training_closes_the_epoch_without_its_checkpoint(self):
        def stop(model):
            model.stop_training = True

        trainer, events = self.run_trainer(steps_per_loop=1, every_n_steps=0, at_step=1,
                                           action=stop)
        trainer.train()
        self.assertEqual(events, ["train_begin", "epoch_start 1", "epoch_begin 0",
                                  "batch_end step 1", "epoch_stop 1", "epoch_end 0",
                                  "train_end"])

    def test_a_non_finite_step_names_the_newest_checkpoint(self):
        trainer, _ = self.run_trainer()
        self.checkpointer.save(2, [])
        trainer.model.dense.kernel.assign(tf.fill([3, 1], np.nan))
        with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                    "non-finite step 1 .*newest checkpoint is ckpt-2"):
            trainer.train()


if __name__ == "__main__":
    tf.test.main()
