"""The MLPerf Mask R-CNN learning-rate schedule and the rules that scale it with the batch.

The reference (maskrcnn-benchmark's `WarmupMultiStepLR`) multiplies the base rate by a linear
warmup factor for the first `warmup_steps` steps and by `decay_factor` once per decay step
passed. The MLPerf rules let a submission change the base rate and the decay steps with the
global batch size; `reference_learning_rate`, `reference_decay_steps` and
`reference_total_steps` implement those rules (docs/REFERENCE.md, "Optimiser and schedule").

The optimizer evaluates the schedule at its iteration count, 0 for the first update. The
reference's trainer calls `scheduler.step()` before `optimizer.step()`, so its n-th update
(n = 1, 2, ...) uses lr(n). `step_offset=1` reproduces that exactly (the rate of the first update
is lr(1), the first decayed update is number decay_steps[0]); `build_optimizer` uses it.
"""

import fractions
import math
import numbers

import tensorflow as tf
import tf_keras

# The reference recipe for 16 images per step (docs/REFERENCE.md, "Optimiser and schedule").
REFERENCE_BATCH_SIZE = 16
REFERENCE_LEARNING_RATE = 0.02
REFERENCE_DECAY_STEPS = (60000, 80000)
REFERENCE_TOTAL_STEPS = 90000


def _check_positive_int(value, what):
    """Raises ValueError unless `value` is an int > 0 (bools are refused: True is not a batch)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class WarmupStepDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then piecewise-constant decay at fixed steps (the reference's schedule).

    lr(step) = base_learning_rate * w(step) * decay_factor ** n(step), where
      w(step) = warmup_factor * (1 - a) + a with a = step / warmup_steps while step <
                warmup_steps, else 1 (so warmup_factor = 0 warms up from 0);
      n(step) = number of decay steps <= step (Python's bisect_right), so the rate drops at
                exactly step == decay_steps[i].

    Called with a scalar step (Python number or tensor of any numeric dtype, e.g. the int64
    `optimizer.iterations`), eagerly or inside tf.function / XLA; returns a float32 scalar.
    """

    def __init__(
        self, base_learning_rate, warmup_steps, warmup_factor, decay_steps, decay_factor=0.1,
        step_offset=0
    ):
        """Stores and validates the schedule.

        Args:
          base_learning_rate: float > 0, the rate after warmup and before the first decay.
          warmup_steps: int >= 0, length of the linear warmup in steps (0 disables it).
          warmup_factor: float in [0, 1], the fraction of the base rate at step 0.
          decay_steps: sequence of strictly increasing ints > 0, where the rate is multiplied
            by `decay_factor`; may be empty.
          decay_factor: float > 0, the multiplier applied at each decay step.
          step_offset: int added to the step before evaluating (1: the reference's order of
            scheduler and optimizer steps, see the module docstring).
        Raises:
          ValueError: if an argument is out of range.
        """
        if not base_learning_rate > 0:
            raise ValueError(f"base_learning_rate must be > 0, got {base_learning_rate!r}.")
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, numbers.Integral)
            or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        if not 0.0 <= warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor must be in [0, 1], got {warmup_factor!r}.")
        if not decay_factor > 0:
            raise ValueError(f"decay_factor must be > 0, got {decay_factor!r}.")
        decay_steps = list(decay_steps)
        for step in decay_steps:
            _check_positive_int(step, f"each of decay_steps {decay_steps}")
        if any(later <= earlier for earlier, later in zip(decay_steps, decay_steps[1:])):
            raise ValueError(f"decay_steps must be strictly increasing, got {decay_steps}.")
        self.base_learning_rate = float(base_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.decay_steps = [int(step) for step in decay_steps]
        self.decay_factor = float(decay_factor)
        self.step_offset = int(step_offset)

    def __call__(self, step):
        """The rate for `step` (scalar, any numeric dtype) as a float32 scalar tensor."""
        with tf.name_scope("WarmupStepDecay"):
            # float32 throughout (no float64: TPUs' XLA lacks it); integer steps stay exact up
            # to 2**24, far beyond any training length.
            step = tf.cast(step, tf.float32) + float(self.step_offset)
            one = tf.constant(1.0, tf.float32)
            warmup = one
            if self.warmup_steps > 0:
                alpha = step / float(self.warmup_steps)
                ramp = self.warmup_factor * (1.0 - alpha) + alpha
                warmup = tf.where(step < float(self.warmup_steps), ramp, one)
            decay = one
            if self.decay_steps:
                boundaries = tf.constant(self.decay_steps, tf.float32)
                num_decays = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32))
                decay = tf.pow(tf.constant(self.decay_factor, tf.float32), num_decays)
            return self.base_learning_rate * warmup * decay

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
            "decay_steps": list(self.decay_steps),
            "decay_factor": self.decay_factor,
            "step_offset": self.step_offset,
        }


def reference_learning_rate(
    global_batch_size,
    base_learning_rate=REFERENCE_LEARNING_RATE,
    base_batch_size=REFERENCE_BATCH_SIZE,
):
    """The base rate scaled linearly with the global batch: 0.02 * global_batch_size / 16.

    docs/REFERENCE.md ("Optimiser and schedule"): the rules allow 0.02 * K for K times the
    reference batch of 16 images (and 0.02 / K below it), i.e. linear scaling.

    Args:
      global_batch_size: int > 0, images per optimizer step summed over all replicas.
      base_learning_rate: float > 0, the rate at `base_batch_size`.
      base_batch_size: int > 0, the batch the base rate belongs to.
    Returns:
      float, the learning rate.
    """
    _check_positive_int(global_batch_size, "global_batch_size")
    _check_positive_int(base_batch_size, "base_batch_size")
    if not base_learning_rate > 0:
        raise ValueError(f"base_learning_rate must be > 0, got {base_learning_rate!r}.")
    return base_learning_rate * global_batch_size / base_batch_size


def reference_decay_steps(
    global_batch_size,
    k=0,
    base_steps=REFERENCE_DECAY_STEPS,
    base_batch_size=REFERENCE_BATCH_SIZE,
):
    """The MLPerf rule for decay steps: base_steps * (1 + k / 10) * 16 / global_batch_size.

    docs/REFERENCE.md ("Optimiser and schedule"): decay at (60000, 80000) steps of 16 images;
    the rules allow (60000, 80000) * (1 + K / 10) * 16 / global_batch for an integer K.
    Computed with exact fractions, then rounded to the nearest int (ties to even), so that e.g.
    (1 + 1/10) does not pick up float error before rounding.

    Args:
      global_batch_size: int > 0, images per optimizer step summed over all replicas.
      k: int, the rules' K; 1 + k / 10 must be > 0.
      base_steps: increasing ints, the decay steps at `base_batch_size`.
      base_batch_size: int > 0, the batch `base_steps` belong to.
    Returns:
      tuple of ints, the decay steps at `global_batch_size`.
    Raises:
      ValueError: on a non-positive batch, non-integer or too negative k, or decay steps that
        are not strictly increasing and positive after rounding.
    """
    _check_positive_int(global_batch_size, "global_batch_size")
    _check_positive_int(base_batch_size, "base_batch_size")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= -10:
        raise ValueError(f"k must be an integer > -10 (so that 1 + k/10 > 0), got {k!r}.")
    scale = fractions.Fraction(10 + k, 10) * fractions.Fraction(base_batch_size, global_batch_size)
    steps = tuple(int(round(fractions.Fraction(step) * scale)) for step in base_steps)
    if any(step <= 0 for step in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"decay steps {base_steps} scaled to global batch {global_batch_size} with k={k} "
            f"give {steps}, which are not positive and strictly increasing."
        )
    return steps


def reference_total_steps(
    global_batch_size,
    base_total_steps=REFERENCE_TOTAL_STEPS,
    base_batch_size=REFERENCE_BATCH_SIZE,
):
    """Training length of the reference, in steps: ceil(90000 * 16 / global_batch_size).

    docs/REFERENCE.md ("Optimiser and schedule"): 90000 steps of 16 images, about 12.3 epochs;
    a run stops earlier as soon as both accuracy targets are met.

    Args:
      global_batch_size: int > 0, images per optimizer step summed over all replicas.
      base_total_steps: int > 0, the length at `base_batch_size`.
      base_batch_size: int > 0.
    Returns:
      int, the number of steps covering at least as many images as the reference.
    """
    _check_positive_int(global_batch_size, "global_batch_size")
    _check_positive_int(base_total_steps, "base_total_steps")
    _check_positive_int(base_batch_size, "base_batch_size")
    return math.ceil(fractions.Fraction(base_total_steps * base_batch_size, global_batch_size))
