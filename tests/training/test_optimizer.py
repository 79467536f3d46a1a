"""Tests for MomentumSGD against an independent numpy version of torch's SGD.

The numpy reference below follows torch.optim.SGD's documented update with two parameter
groups, as the MLPerf reference builds them: weights (rate lr, decay wd) and biases (rate
2 * lr, decay 0). Each test runs a few steps with a warmup + decay schedule that crosses both
the end of warmup and a decay step.
"""

import bisect
import os

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.training import distribution
from official_maskrcnn.training import optimizer as optimizer_lib
from official_maskrcnn.training import schedule as schedule_lib

# Schedule for the tests: warmup over steps 0..2, full rate at 3..4, decayed from step 5 on.
BASE_LR = 0.1
WARMUP_STEPS = 3
WARMUP_FACTOR = 1.0 / 3
DECAY_STEPS = (5,)
NUM_STEPS = 7
MOMENTUM = 0.9
# Far larger than the reference's 1e-4, so that forgetting (or mis-grouping) the decay shows
# at the tests' 1e-6 tolerance.
WEIGHT_DECAY = 0.05
BIAS_LR_FACTOR = 2.0

# name -> shape of the variables the tests train ('beta' and 'bias' are in the bias group).
SHAPES = {"dense/kernel": (3, 2), "dense/bias": (2,), "norm/gamma": (2,), "norm/beta": (2,)}


def numpy_lr(step):
    """The reference's WarmupMultiStepLR for the test schedule, written out independently."""
    if step < WARMUP_STEPS:
        alpha = step / WARMUP_STEPS
        warmup = WARMUP_FACTOR * (1 - alpha) + alpha
    else:
        warmup = 1.0
    return BASE_LR * warmup * 0.1 ** bisect.bisect_right(DECAY_STEPS, step)


def numpy_torch_sgd(initial, grads_per_step):
    """torch.optim.SGD (momentum, no dampening, no nesterov) with a weight and a bias group.

    Args:
      initial: dict name -> float64 array.
      grads_per_step: list (one per step) of dicts name -> gradient array.
    Returns:
      dict name -> array after all steps.
    """
    params = {name: value.astype(np.float64).copy() for name, value in initial.items()}
    buffers = {}
    for step, grads in enumerate(grads_per_step):
        for name, grad in grads.items():
            bias = name.endswith(("bias", "beta"))
            lr = numpy_lr(step) * (BIAS_LR_FACTOR if bias else 1.0)
            wd = 0.0 if bias else WEIGHT_DECAY
            d_p = grad + wd * params[name]
            # torch starts the buffer as a copy of the first (decayed) gradient.
            buffers[name] = d_p.copy() if name not in buffers else MOMENTUM * buffers[name] + d_p
            params[name] = params[name] - lr * buffers[name]
    return params


def make_optimizer():
    schedule = schedule_lib.WarmupStepDecay(
        base_learning_rate=BASE_LR, warmup_steps=WARMUP_STEPS, warmup_factor=WARMUP_FACTOR,
        decay_steps=DECAY_STEPS)
    return optimizer_lib.MomentumSGD(
        schedule, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, bias_lr_factor=BIAS_LR_FACTOR)


def random_problem(seed=0):
    """Initial values and NUM_STEPS fixed gradients, float32, for every name in SHAPES."""
    rng = np.random.default_rng(seed)
    initial = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads = [
        {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(NUM_STEPS)
    ]
    return initial, grads


def make_variables(initial):
    return {name: tf.Variable(value, name=name) for name, value in initial.items()}


class MomentumSGDTestCase(tf.test.TestCase):

    def assert_close_to(self, actual, expected, rtol=1e-6):
        """Per variable: max |actual - expected| <= rtol * max |expected|.

        The float32 update rounds d_p, the momentum buffer and w once per step, each within
        half an ulp (<= 6e-8 relative); over NUM_STEPS = 7 steps the error of w stays below
        ~7 * 1.5 * 6e-8 = 6e-7 of the largest weight, so 1e-6 bounds float32 against the
        float64 reference. Seen: 0.9e-7 eager, 1.6e-7 under XLA (AMD EPYC).
        """
        for name in expected:
            got = np.asarray(actual[name], np.float64)
            want = np.asarray(expected[name], np.float64)
            error = np.max(np.abs(got - want)) / np.max(np.abs(want))
            self.assertLessEqual(error, rtol, msg=f"{name}: relative error {error:.3g}")


class IsBiasTest(tf.test.TestCase):

    def test_names(self):
        def var(name):
            return tf.Variable(0.0, name=name)

        for name in ("bias", "dense/bias", "fpn/p2/bias", "bn/beta", "head/gn/beta"):
            self.assertTrue(optimizer_lib.is_bias(var(name)), name)
        for name in ("dense/kernel", "bn/gamma", "bias_head/kernel", "beta_scale"):
            self.assertFalse(optimizer_lib.is_bias(var(name)), name)


class MomentumSGDTest(MomentumSGDTestCase):

    def _run(self, step_fn=None):
        """Runs NUM_STEPS updates on SHAPES plus a frozen variable; returns numpy values."""
        initial, grads = random_problem()
        variables = make_variables(initial)
        frozen = tf.Variable(np.ones((2, 2), np.float32), name="frozen/kernel")
        optimizer = make_optimizer()

        def apply(step_grads):
            optimizer.apply_gradients(
                [(step_grads[name], variables[name]) for name in SHAPES])

        step_fn = step_fn(apply) if step_fn else apply
        for step_grads in grads:
            step_fn({name: tf.constant(g) for name, g in step_grads.items()})
        self.assertEqual(int(optimizer.iterations), NUM_STEPS)
        self.assertAllEqual(frozen, np.ones((2, 2), np.float32))
        expected = numpy_torch_sgd(initial, grads)
        return {name: v.numpy() for name, v in variables.items()}, expected

    def test_matches_numpy_torch_sgd_eager(self):
        actual, expected = self._run()
        self.assert_close_to(actual, expected)

    def test_matches_numpy_torch_sgd_under_xla(self):
        actual, expected = self._run(lambda apply: tf.function(apply, jit_compile=True))
        self.assert_close_to(actual, expected)

    def test_sparse_gradient_equals_dense(self):
        initial = np.arange(12, dtype=np.float32).reshape(4, 3)
        results = []
        for sparse in (False, True):
            table = tf.Variable(initial, name="embedding/kernel")
            optimizer = make_optimizer()
            for _ in range(2):
                with tf.GradientTape() as tape:
                    # The same rows by gather (IndexedSlices gradient) or by a one-hot matmul.
                    rows = (tf.gather(table, [0, 2, 2]) if sparse
                            else tf.matmul(tf.one_hot([0, 2, 2], 4), table))
                    loss = tf.reduce_sum(rows * rows)
                grad = tape.gradient(loss, table)
                self.assertEqual(isinstance(grad, tf.IndexedSlices), sparse)
                optimizer.apply_gradients([(grad, table)])
            results.append(table.numpy())
        self.assertAllClose(results[0], results[1], rtol=1e-6, atol=0)

    def test_config_round_trip(self):
        optimizer = make_optimizer()
        config = optimizer.get_config()
        self.assertEqual(config["weight_decay"], WEIGHT_DECAY)
        restored = optimizer_lib.MomentumSGD.from_config(config)
        self.assertEqual(restored.get_config(), config)
        self.assertIsInstance(restored.schedule, schedule_lib.WarmupStepDecay)
        # The base class's decoupled decay stays off: ours is the only one applied.
        self.assertIsNone(restored.weight_decay)


class CheckpointTest(MomentumSGDTestCase):

    def test_restore_and_continue_equals_uninterrupted(self):
        initial, grads = random_problem(seed=1)
        save_after = 2

        def apply(optimizer, variables, step_grads):
            optimizer.apply_gradients([(step_grads[name], variables[name]) for name in SHAPES])

        variables = make_variables(initial)
        optimizer = make_optimizer()
        checkpoint = tf.train.Checkpoint(optimizer=optimizer, variables=variables)
        for step, step_grads in enumerate(grads):
            if step == save_after:
                path = checkpoint.save(os.path.join(self.get_temp_dir(), "ckpt"))
            apply(optimizer, variables, step_grads)
        uninterrupted = {name: v.numpy() for name, v in variables.items()}

        # Fresh variables (different values) and an unbuilt optimizer: the slots are created
        # by the first apply_gradients and must pick up the saved values (deferred restore).
        resumed_variables = make_variables({n: np.zeros_like(v) for n, v in initial.items()})
        resumed_optimizer = make_optimizer()
        status = tf.train.Checkpoint(
            optimizer=resumed_optimizer, variables=resumed_variables).restore(path)
        self.assertEqual(int(resumed_optimizer.iterations), save_after)
        for step_grads in grads[save_after:]:
            apply(resumed_optimizer, resumed_variables, step_grads)
        status.assert_consumed()
        self.assert_close_to(
            {name: v.numpy() for name, v in resumed_variables.items()}, uninterrupted, rtol=0)


class MirroredStrategyTest(MomentumSGDTestCase):

    def test_two_replicas_equal_one_replica_on_full_batch(self):
        """Linear least squares, batch 8: two replicas of 4 equal one device with all 8."""
        rng = np.random.default_rng(2)
        features = rng.normal(size=(8, 3)).astype(np.float32)
        targets = rng.normal(size=(8, 1)).astype(np.float32)
        initial = {"dense/kernel": rng.normal(size=(3, 1)).astype(np.float32),
                   "dense/bias": np.zeros((1,), np.float32)}

        def loss_fn(variables, x, y):
            """Per-example squared error, [batch]."""
            prediction = tf.matmul(x, variables["dense/kernel"]) + variables["dense/bias"]
            return 0.5 * tf.reduce_sum(tf.square(prediction - y), axis=1)

        # One device, the full batch, the plain mean.
        variables = make_variables(initial)
        optimizer = make_optimizer()
        for _ in range(4):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(variables, features, targets))
            names = list(variables)
            grads = tape.gradient(loss, [variables[n] for n in names])
            optimizer.apply_gradients(zip(grads, [variables[n] for n in names]))
        single = {name: v.numpy() for name, v in variables.items()}

        strategy = distribution.build_strategy("mirrored")
        self.assertEqual(strategy.num_replicas_in_sync, 2)
        with strategy.scope():
            mirrored_variables = make_variables(initial)
            mirrored_optimizer = make_optimizer()

        def replica_batch(context):
            half = slice(4 * context.replica_id_in_sync_group,
                         4 * (context.replica_id_in_sync_group + 1))
            return features[half], targets[half]

        batches = strategy.experimental_distribute_values_from_function(replica_batch)

        @tf.function
        def train_step(batch):
            def replica_step(x, y):
                with tf.GradientTape() as tape:
                    # Mean over this replica's half / 2: the replicas' sum is the global mean.
                    loss = tf.nn.compute_average_loss(
                        loss_fn(mirrored_variables, x, y), global_batch_size=8)
                names = list(mirrored_variables)
                trained = [mirrored_variables[n] for n in names]
                mirrored_optimizer.apply_gradients(zip(tape.gradient(loss, trained), trained))

            strategy.run(replica_step, args=batch)

        for _ in range(4):
            train_step(batches)
        self.assertEqual(mirrored_optimizer.iterations.numpy(), 4)
        for name, variable in mirrored_variables.items():
            replicas = strategy.experimental_local_results(variable)
            self.assertAllEqual(replicas[0], replicas[1])
        self.assert_close_to(
            {name: v.numpy() for name, v in mirrored_variables.items()}, single)


class LossScaleOptimizerTest(MomentumSGDTestCase):

    def _loss(self, variables):
        # A loss whose gradients are nonzero everywhere and differ per step as weights move.
        return sum(tf.reduce_sum(tf.sin(v) * (i + 1.0)) for i, v in enumerate(variables.values()))

    def test_wrapped_equals_unwrapped_in_float32(self):
        initial, _ = random_problem(seed=3)
        plain_variables = make_variables(initial)
        plain = make_optimizer()
        scaled_variables = make_variables(initial)
        wrapped = tf_keras.mixed_precision.LossScaleOptimizer(make_optimizer(), dynamic=True)

        for _ in range(4):
            with tf.GradientTape() as tape:
                loss = self._loss(plain_variables)
            trained = list(plain_variables.values())
            plain.apply_gradients(zip(tape.gradient(loss, trained), trained))

            with tf.GradientTape() as tape:
                scaled_loss = wrapped.get_scaled_loss(self._loss(scaled_variables))
            trained = list(scaled_variables.values())
            grads = wrapped.get_unscaled_gradients(tape.gradient(scaled_loss, trained))
            wrapped.apply_gradients(zip(grads, trained))

        self.assertEqual(int(wrapped.iterations), 4)
        self.assert_close_to(
            {n: v.numpy() for n, v in scaled_variables.items()},
            {n: v.numpy() for n, v in plain_variables.items()})

    def test_non_finite_gradient_skips_update(self):
        initial, _ = random_problem(seed=4)
        variables = make_variables(initial)
        wrapped = tf_keras.mixed_precision.LossScaleOptimizer(make_optimizer(), dynamic=True)
        trained = list(variables.values())
        wrapped.apply_gradients(zip([tf.ones_like(v) for v in trained], trained))
        before = [v.numpy() for v in trained]
        momenta = [m.numpy() for m in wrapped.inner_optimizer.momentums]
        scale = float(wrapped.loss_scale)

        grads = [tf.fill(v.shape, np.float32(np.inf)) for v in trained]
        wrapped.apply_gradients(zip(grads, trained))
        for value, variable in zip(before, trained):
            self.assertAllEqual(variable, value)
        for value, slot in zip(momenta, wrapped.inner_optimizer.momentums):
            self.assertAllEqual(slot, value)
        self.assertEqual(float(wrapped.loss_scale), scale / 2)
        # A skipped step still advances `iterations`, hence the schedule.
        self.assertEqual(int(wrapped.iterations), 2)


class BuildOptimizerTest(tf.test.TestCase):

    def test_rules_from_global_batch(self):
        optimizer = optimizer_lib.build_optimizer(32)
        schedule = optimizer.schedule
        self.assertIsInstance(optimizer, optimizer_lib.MomentumSGD)
        self.assertAllClose(schedule.base_learning_rate, 0.04)
        self.assertEqual(schedule.decay_steps, [30000, 40000])
        self.assertEqual(schedule.warmup_steps, 500)
        self.assertAllClose(schedule.warmup_factor, 1.0 / 3)
        # The reference steps its scheduler before the first update: update 1 uses lr(1).
        self.assertEqual(schedule.step_offset, 1)
        self.assertAllClose(schedule(0), 0.04 * (1 / 3 + (2 / 3) / 500), rtol=1e-6)
        self.assertAllClose(schedule(29999), 0.004, rtol=1e-6)
        config = optimizer.get_config()
        self.assertEqual(
            (config["momentum"], config["weight_decay"], config["bias_lr_factor"],
             config["bias_weight_decay"]),
            (0.9, 1e-4, 2.0, 0.0))

    def test_explicit_values_and_k(self):
        optimizer = optimizer_lib.build_optimizer(
            8, base_learning_rate=0.015, warmup_steps=0, decay_k=1)
        schedule = optimizer.schedule
        self.assertAllClose(schedule.base_learning_rate, 0.015)
        self.assertEqual(schedule.decay_steps, [132000, 176000])
        optimizer = optimizer_lib.build_optimizer(8, decay_steps=(10, 20))
        self.assertEqual(optimizer.schedule.decay_steps, [10, 20])


if __name__ == "__main__":
    tf.test.main()
