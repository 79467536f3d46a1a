"""Tests for the warmup + step-decay schedule and the MLPerf batch-scaling rules."""

import tensorflow as tf
import tf_keras

from official_maskrcnn.training import schedule as schedule_lib


def _reference_schedule():
    """The reference recipe for 16 images: 0.02, 500 warmup steps from 1/3, decay 60k/80k."""
    return schedule_lib.WarmupStepDecay(
        base_learning_rate=0.02, warmup_steps=500, warmup_factor=1.0 / 3,
        decay_steps=(60000, 80000))


# (step, expected rate), worked by hand from lr = 0.02 * w * 0.1 ** n.
_REFERENCE_VALUES = (
    (0, 0.02 / 3),  # w = 1/3 at the first update
    (250, 0.02 * 2.0 / 3),  # a = 1/2: w = 1/3 * 1/2 + 1/2
    (499, 0.02 * (0.002 / 3 + 0.998)),  # a = 0.998, last warmup step
    (500, 0.02),  # warmup over
    (59999, 0.02),
    (60000, 0.002),  # first decay applies at the decay step itself (bisect_right)
    (60001, 0.002),
    (79999, 0.002),
    (80000, 0.0002),
    (80001, 0.0002),
    (10**6, 0.0002),
)


class WarmupStepDecayTest(tf.test.TestCase):

    def test_reference_values_eager(self):
        lr = _reference_schedule()
        for step, expected in _REFERENCE_VALUES:
            value = lr(step)
            self.assertEqual(value.dtype, tf.float32)
            self.assertAllClose(value, expected, rtol=1e-6, atol=0, msg=f"step {step}")

    def test_reference_values_int64_step_under_xla(self):
        lr = _reference_schedule()
        steps = tf.constant([step for step, _ in _REFERENCE_VALUES], tf.int64)
        # optimizer.iterations is an int64 scalar; the schedule is traced once per function.
        compiled = tf.function(lambda s: tf.map_fn(lr, s, fn_output_signature=tf.float32),
                               jit_compile=True)
        values = compiled(steps)
        self.assertEqual(values.dtype, tf.float32)
        self.assertAllClose(values, [value for _, value in _REFERENCE_VALUES], rtol=1e-6, atol=0)

    def test_warmup_from_zero(self):
        lr = schedule_lib.WarmupStepDecay(
            base_learning_rate=0.1, warmup_steps=100, warmup_factor=0.0, decay_steps=(200,))
        self.assertAllClose(
            [lr(0), lr(25), lr(99), lr(100), lr(199), lr(200)],
            [0.0, 0.025, 0.099, 0.1, 0.1, 0.01], rtol=1e-6, atol=0)

    def test_no_warmup_no_decay(self):
        lr = schedule_lib.WarmupStepDecay(
            base_learning_rate=0.5, warmup_steps=0, warmup_factor=0.0, decay_steps=())
        self.assertAllClose([lr(0), lr(10**5)], [0.5, 0.5], rtol=0, atol=0)

    def test_step_offset_shifts_the_whole_schedule(self):
        plain = schedule_lib.WarmupStepDecay(0.02, 500, 1 / 3, [60000, 80000])
        shifted = schedule_lib.WarmupStepDecay(0.02, 500, 1 / 3, [60000, 80000], step_offset=1)
        for step in (0, 1, 498, 499, 59998, 59999, 60000, 79999):
            self.assertAllClose(shifted(step), plain(step + 1), rtol=1e-7)
        self.assertEqual(shifted.get_config()["step_offset"], 1)

    def test_config_round_trip(self):
        lr = _reference_schedule()
        config = lr.get_config()
        self.assertEqual(config["decay_steps"], [60000, 80000])
        restored = schedule_lib.WarmupStepDecay.from_config(config)
        self.assertEqual(restored.get_config(), config)
        # Registered as Keras-serializable, so optimizers can (de)serialise it by name.
        revived = tf_keras.optimizers.schedules.deserialize(
            tf_keras.optimizers.schedules.serialize(lr))
        self.assertIsInstance(revived, schedule_lib.WarmupStepDecay)
        self.assertEqual(revived.get_config(), config)

    def test_bad_arguments_raise(self):
        good = dict(base_learning_rate=0.02, warmup_steps=500, warmup_factor=0.5,
                    decay_steps=(10, 20), decay_factor=0.1)
        bad_cases = {
            "base_learning_rate": [0.0, -0.1],
            "warmup_steps": [-1, 2.5, True],
            "warmup_factor": [-0.1, 1.5],
            "decay_steps": [(20, 10), (10, 10), (0, 10), (10.5, 20)],
            "decay_factor": [0.0, -1.0],
        }
        for key, values in bad_cases.items():
            for value in values:
                with self.assertRaisesRegex(ValueError, key, msg=f"{key}={value!r}"):
                    schedule_lib.WarmupStepDecay(**{**good, key: value})


class ReferenceRulesTest(tf.test.TestCase):

    def test_reference_batch_is_identity(self):
        self.assertAllClose(schedule_lib.reference_learning_rate(16), 0.02)
        self.assertEqual(schedule_lib.reference_decay_steps(16), (60000, 80000))
        self.assertEqual(schedule_lib.reference_total_steps(16), 90000)

    def test_batch_32(self):
        self.assertAllClose(schedule_lib.reference_learning_rate(32), 0.04)
        self.assertEqual(schedule_lib.reference_decay_steps(32), (30000, 40000))
        self.assertEqual(schedule_lib.reference_total_steps(32), 45000)

    def test_batch_8_with_k_1(self):
        # (60000, 80000) * 1.1 * 16 / 8; 1.1 in floats would give 132000.00000000003.
        self.assertAllClose(schedule_lib.reference_learning_rate(8), 0.01)
        self.assertEqual(schedule_lib.reference_decay_steps(8, k=1), (132000, 176000))
        self.assertEqual(schedule_lib.reference_total_steps(8), 180000)

    def test_rounding(self):
        # 80000 * 16 / 48 = 26666.67 -> 26667; 90000 * 16 / 7 = 205714.29 -> ceil 205715.
        self.assertEqual(schedule_lib.reference_decay_steps(48), (20000, 26667))
        self.assertEqual(schedule_lib.reference_total_steps(7), 205715)

    def test_bad_arguments_raise(self):
        for batch in (0, -16, 2.5, True, None):
            with self.assertRaisesRegex(ValueError, "global_batch_size"):
                schedule_lib.reference_learning_rate(batch)
            with self.assertRaisesRegex(ValueError, "global_batch_size"):
                schedule_lib.reference_decay_steps(batch)
            with self.assertRaisesRegex(ValueError, "global_batch_size"):
                schedule_lib.reference_total_steps(batch)
        for k in (-10, 0.5):
            with self.assertRaisesRegex(ValueError, "k must be"):
                schedule_lib.reference_decay_steps(16, k=k)
        with self.assertRaisesRegex(ValueError, "strictly increasing"):
            schedule_lib.reference_decay_steps(16, base_steps=(80000, 60000))
        with self.assertRaisesRegex(ValueError, "base_learning_rate"):
            schedule_lib.reference_learning_rate(16, base_learning_rate=0.0)


if __name__ == "__main__":
    tf.test.main()
